//! OAuth 2.0: pending authorizations (one-time `state`, encrypted PKCE verifier, nonce) and
//! grants (encrypted refresh token, the latest access token, status, errors, the refresh
//! lease that makes refresh single-flight across replicas, and the fencing generation).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("oauth_pending")
                .col(string("state").primary_key())
                .col(string("tenant_id"))
                .col(blob("verifier_ct"))
                .col(string("nonce"))
                .col(string("requested_by"))
                .col(string("redirect_uri"))
                .col(timestamp_with_time_zone("created_at"))
                .col(timestamp_with_time_zone("expires_at"))
                .col(timestamp_with_time_zone_null("used_at"))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_oauth_pending_tenant")
                        .from("oauth_pending", "tenant_id")
                        .to("tenants", "id")
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table("oauth_grants")
                .col(string("tenant_id").primary_key())
                .col(string("status"))
                .col(blob_null("refresh_token_ct"))
                .col(blob_null("access_token_ct"))
                .col(timestamp_with_time_zone_null("access_expires_at"))
                .col(timestamp_with_time_zone_null("access_issued_at"))
                .col(string_null("username"))
                .col(timestamp_with_time_zone("obtained_at"))
                .col(timestamp_with_time_zone_null("refreshed_at"))
                .col(text_null("last_error"))
                .col(timestamp_with_time_zone_null("failing_since"))
                .col(string_null("lease_owner"))
                .col(timestamp_with_time_zone_null("lease_until"))
                .col(big_integer("generation"))
                .col(timestamp_with_time_zone("updated_at"))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_oauth_grants_tenant")
                        .from("oauth_grants", "tenant_id")
                        .to("tenants", "id")
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in ["oauth_grants", "oauth_pending"] {
            m.drop_table(Table::drop().table(t).to_owned()).await?;
        }
        Ok(())
    }
}
