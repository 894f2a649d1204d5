//! Tenants, their email settings (a JSON document plus encrypted secret columns), sites,
//! the audit log and instance metadata (the master-key check value).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("tenants")
                .col(string("id").primary_key())
                .col(string("name"))
                .col(text("admin_emails"))
                .col(string("status"))
                .col(timestamp_with_time_zone("created_at"))
                .col(timestamp_with_time_zone("updated_at"))
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("email_settings")
                .col(string("tenant_id").primary_key())
                .col(text("document"))
                .col(blob_null("password_ct"))
                .col(blob_null("client_secret_ct"))
                .col(timestamp_with_time_zone("updated_at"))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_email_settings_tenant")
                        .from("email_settings", "tenant_id")
                        .to("tenants", "id")
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("sites")
                .col(string("id").primary_key())
                .col(string("tenant_id"))
                .col(string("name"))
                .col(string("secret_hash"))
                .col(text_null("override_document"))
                .col(blob_null("override_password_ct"))
                .col(timestamp_with_time_zone("created_at"))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_sites_tenant")
                        .from("sites", "tenant_id")
                        .to("tenants", "id")
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_sites_tenant")
                .table("sites")
                .col("tenant_id")
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("audit_log")
                .col(big_pk_auto("id"))
                .col(string_null("tenant_id"))
                .col(string("actor"))
                .col(string("role"))
                .col(string("action"))
                .col(text("fields"))
                .col(timestamp_with_time_zone("at"))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_audit_tenant")
                .table("audit_log")
                .col("tenant_id")
                .col("id")
                .to_owned(),
        )
        .await?;

        m.create_table(
            Table::create()
                .table("instance_meta")
                .col(string("key").primary_key())
                .col(blob("value"))
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            "instance_meta",
            "audit_log",
            "sites",
            "email_settings",
            "tenants",
        ] {
            m.drop_table(Table::drop().table(t).to_owned()).await?;
        }
        Ok(())
    }
}
