//! Invitations of a tenant's administrators: one per admin email, a one-time token stored
//! hashed with an expiry, sent through the cluster settings by the outbox.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use mail_core::crypto::{random_bytes, sha256};
use mail_core::domain::{EmailAddress, TenantId};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder,
    TransactionTrait,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::outbox::{self, KIND_INVITATION, StoredMessage};
use crate::error::{ApiError, ApiResult};
use crate::routes::sites::hex;
use crate::store::Store;
use crate::store::entities::{invitation, outbox as outbox_e};

/// How long an invitation link works.
pub const VALIDITY: chrono::Duration = chrono::Duration::days(7);

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InvitationStatus {
    Queued,
    Sent,
    Failed,
    Accepted,
    Expired,
}

/// An invitation as Cloud Central sees it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InvitationView {
    pub id: String,
    pub email: String,
    pub status: InvitationStatus,
    /// Why a queued invitation waits (e.g. "cluster email settings missing"), or the last
    /// transient error.
    pub reason: Option<String>,
    /// For `failed`: the SMTP server's reply.
    pub last_error: Option<String>,
    /// For `sent`: the SMTP server's final reply.
    pub smtp_reply: Option<String>,
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub accepted_at: Option<DateTime<Utc>>,
}

fn link(template: &str, token: &str) -> String {
    template.replace("{token}", token)
}

fn message(
    tenant_name: &str,
    to: &EmailAddress,
    url: &str,
    expires: DateTime<Utc>,
) -> StoredMessage {
    StoredMessage {
        message_id: outbox::new_message_id(),
        from: None,
        to: vec![to.as_str().to_owned()],
        subject: format!("You are invited to manage email for {tenant_name}"),
        text: format!(
            "Hello,\r\n\r\nyou have been invited to administer the email configuration of {tenant_name}.\r\n\r\nAccept the invitation here (the link works once, until {}):\r\n{url}\r\n\r\nIf you did not expect this invitation, ignore this message.\r\n",
            expires.format("%Y-%m-%d %H:%M UTC")
        ),
    }
}

/// Creates (and queues) an invitation for every admin email that has none yet. Repeating
/// the same tenant PUT therefore sends nothing new.
pub async fn ensure(
    store: &Store,
    tenant: &TenantId,
    tenant_name: &str,
    emails: &[EmailAddress],
    template: &str,
    now: DateTime<Utc>,
) -> ApiResult<usize> {
    let existing: Vec<String> = invitation::Entity::find()
        .filter(invitation::Column::TenantId.eq(tenant.as_str()))
        .all(&store.db)
        .await?
        .into_iter()
        .map(|i| i.email.to_ascii_lowercase())
        .collect();
    let mut created = 0;
    for email in emails {
        if existing.contains(&email.as_str().to_ascii_lowercase()) {
            continue;
        }
        let txn = store.db.begin().await?;
        let token = URL_SAFE_NO_PAD.encode(random_bytes::<32>());
        let expires = now + VALIDITY;
        let msg = message(tenant_name, email, &link(template, &token), expires);
        let outbox_id = outbox::enqueue(
            &txn,
            store,
            KIND_INVITATION,
            Some(tenant.as_str()),
            &msg,
            now,
        )
        .await?;
        invitation::ActiveModel {
            id: Set(uuid::Uuid::new_v4().to_string()),
            tenant_id: Set(tenant.as_str().to_owned()),
            email: Set(email.as_str().to_owned()),
            token_hash: Set(hex(&sha256(token.as_bytes()))),
            created_at: Set(now),
            expires_at: Set(expires),
            accepted_at: Set(None),
            outbox_id: Set(Some(outbox_id)),
        }
        .insert(&txn)
        .await?;
        txn.commit().await?;
        created += 1;
    }
    Ok(created)
}

pub async fn list(
    store: &Store,
    tenant: &TenantId,
    now: DateTime<Utc>,
) -> ApiResult<Vec<InvitationView>> {
    let rows = invitation::Entity::find()
        .filter(invitation::Column::TenantId.eq(tenant.as_str()))
        .order_by_asc(invitation::Column::CreatedAt)
        .order_by_asc(invitation::Column::Email)
        .all(&store.db)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let ob = match &r.outbox_id {
            Some(id) => {
                outbox_e::Entity::find_by_id(id.clone())
                    .one(&store.db)
                    .await?
            }
            None => None,
        };
        let status = if r.accepted_at.is_some() {
            InvitationStatus::Accepted
        } else if r.expires_at <= now {
            InvitationStatus::Expired
        } else {
            match ob.as_ref().map(|o| o.status.as_str()) {
                Some("sent") => InvitationStatus::Sent,
                Some("failed") => InvitationStatus::Failed,
                _ => InvitationStatus::Queued,
            }
        };
        out.push(InvitationView {
            id: r.id,
            email: r.email,
            status,
            reason: ob.as_ref().and_then(|o| {
                (o.status == "queued" || o.status == "sending")
                    .then(|| o.reason.clone().or_else(|| o.last_error.clone()))
                    .flatten()
            }),
            last_error: ob.as_ref().and_then(|o| {
                (o.status == "failed")
                    .then(|| o.last_error.clone())
                    .flatten()
            }),
            smtp_reply: ob.as_ref().and_then(|o| o.smtp_reply.clone()),
            attempts: ob.as_ref().map(|o| o.attempts).unwrap_or(0),
            created_at: r.created_at,
            expires_at: r.expires_at,
            sent_at: ob.as_ref().and_then(|o| o.sent_at),
            accepted_at: r.accepted_at,
        });
    }
    Ok(out)
}

/// A new token, a new expiry and a new email; the old link stops working.
pub async fn resend(
    store: &Store,
    tenant: &TenantId,
    tenant_name: &str,
    id: &str,
    template: &str,
    now: DateTime<Utc>,
) -> ApiResult<()> {
    let inv = invitation::Entity::find_by_id(id.to_owned())
        .filter(invitation::Column::TenantId.eq(tenant.as_str()))
        .one(&store.db)
        .await?
        .ok_or_else(|| ApiError::NotFound("no such invitation".into()))?;
    if inv.accepted_at.is_some() {
        return Err(ApiError::Conflict(
            "the invitation was already accepted".into(),
        ));
    }
    let email =
        EmailAddress::parse(&inv.email).map_err(|e| ApiError::Internal(anyhow::anyhow!(e)))?;
    let txn = store.db.begin().await?;
    let token = URL_SAFE_NO_PAD.encode(random_bytes::<32>());
    let expires = now + VALIDITY;
    let msg = message(tenant_name, &email, &link(template, &token), expires);
    let outbox_id = outbox::enqueue(
        &txn,
        store,
        KIND_INVITATION,
        Some(tenant.as_str()),
        &msg,
        now,
    )
    .await?;
    let mut am: invitation::ActiveModel = inv.into();
    am.token_hash = Set(hex(&sha256(token.as_bytes())));
    am.expires_at = Set(expires);
    am.outbox_id = Set(Some(outbox_id));
    am.update(&txn).await?;
    txn.commit().await?;
    Ok(())
}

/// Accepted invitation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AcceptedInvitation {
    pub tenant_id: String,
    pub email: String,
    pub accepted_at: DateTime<Utc>,
}

pub enum AcceptError {
    Unknown,
    AlreadyAccepted,
    Expired,
}

/// Marks the invitation of `token` accepted; the token works once.
pub async fn accept(
    store: &Store,
    token: &str,
    now: DateTime<Utc>,
) -> ApiResult<Result<AcceptedInvitation, AcceptError>> {
    let hash = hex(&sha256(token.as_bytes()));
    let Some(inv) = invitation::Entity::find()
        .filter(invitation::Column::TokenHash.eq(hash.clone()))
        .one(&store.db)
        .await?
    else {
        return Ok(Err(AcceptError::Unknown));
    };
    if inv.accepted_at.is_some() {
        return Ok(Err(AcceptError::AlreadyAccepted));
    }
    if inv.expires_at <= now {
        return Ok(Err(AcceptError::Expired));
    }
    // One conditional UPDATE decides: two concurrent accepts cannot both win.
    let r = invitation::Entity::update_many()
        .col_expr(invitation::Column::AcceptedAt, Expr::value(Some(now)))
        .filter(invitation::Column::TokenHash.eq(hash))
        .filter(invitation::Column::AcceptedAt.is_null())
        .exec(&store.db)
        .await?;
    if r.rows_affected != 1 {
        return Ok(Err(AcceptError::AlreadyAccepted));
    }
    Ok(Ok(AcceptedInvitation {
        tenant_id: inv.tenant_id,
        email: inv.email,
        accepted_at: now,
    }))
}
