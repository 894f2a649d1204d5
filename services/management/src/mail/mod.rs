//! Mail the Management Service sends itself: invitations from the cluster-admin context and
//! tenant test emails, through a durable outbox.

pub mod cluster;
pub mod invitations;
pub mod outbox;

use mail_core::domain::{EmailAddress, TenantId};
use mail_core::settings::Auth;
use mail_core::smtp::{SendError, SmtpAuth, SmtpReply, SmtpTarget};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use crate::error::{ApiError, ApiResult};
use crate::startup::AppState;
use crate::store::entities::outbox as outbox_e;
use outbox::{KIND_INVITATION, KIND_TEST, Outcome, StoredMessage};

/// Give up on an invitation after this long.
const MAX_AGE: chrono::Duration = chrono::Duration::hours(24);

/// Claims and sends due invitation emails; returns how many were handled.
pub async fn run_invitations_once(state: &AppState) -> ApiResult<usize> {
    let store = &state.store;
    let now = state.clock.now();
    let rows = outbox::claim(
        store,
        KIND_INVITATION,
        &state.instance,
        10,
        state.config.outbox_claim_ttl,
        now,
    )
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let target = cluster::cluster_target(store).await?;
    for row in &rows {
        let outcome = match (&target, outbox::open_message(store, row)) {
            (_, Err(e)) => Outcome::Failed(format!("unreadable message: {e}")),
            (None, Ok(_)) => Outcome::Retry {
                error: None,
                reason: Some(outbox::REASON_NO_CLUSTER_SETTINGS.into()),
            },
            (Some((t, from)), Ok(msg)) => match outbox::send(&state.mailer, t, from, &msg).await {
                Ok(reply) => Outcome::Sent(reply),
                Err(e) if e.is_retryable() => Outcome::Retry {
                    error: Some(e.to_string()),
                    reason: None,
                },
                Err(e) => Outcome::Failed(e.to_string()),
            },
        };
        outbox::finish(
            store,
            &state.metrics,
            row,
            outcome,
            MAX_AGE,
            state.clock.now(),
        )
        .await?;
    }
    Ok(rows.len())
}

/// After the cluster settings change: queued invitations are tried at once.
pub async fn nudge_invitations(state: &AppState) -> ApiResult<()> {
    outbox_e::Entity::update_many()
        .col_expr(
            outbox_e::Column::NextAttemptAt,
            Expr::value(state.clock.now()),
        )
        .filter(outbox_e::Column::Kind.eq(KIND_INVITATION))
        .filter(outbox_e::Column::Status.eq("queued"))
        .exec(&state.store.db)
        .await?;
    state.outbox_wakeup.notify_one();
    Ok(())
}

/// The result of a test email.
pub enum TestResult {
    Sent {
        reply: SmtpReply,
        message_id: String,
    },
    Failed(SendError),
}

/// Sends a test email now with the tenant's settings (OAuth: the grant's access token). The
/// attempt is recorded in the outbox.
pub async fn send_test(
    state: &AppState,
    tenant: &TenantId,
    to: &EmailAddress,
) -> ApiResult<TestResult> {
    let store = &state.store;
    let s = store.settings_for_site(tenant).await?.ok_or_else(|| {
        ApiError::NotFound("no email settings are stored for this tenant yet".into())
    })?;
    let from = s
        .settings
        .senders
        .iter()
        .find(|x| x.default)
        .map(|x| x.address.clone())
        .ok_or_else(|| ApiError::field("senders", "add a sender before sending a test email"))?;
    let auth = match &s.settings.auth {
        Auth::None => SmtpAuth::None,
        Auth::Password { username } => SmtpAuth::Password {
            username: username.clone(),
            password: store
                .settings_password(tenant)
                .await?
                .ok_or_else(|| ApiError::field("auth.password", "no password is stored"))?,
        },
        Auth::Oauth2(o) => {
            let token = state.grants.access_token(tenant, None).await?;
            let username = o
                .authorization_username
                .as_ref()
                .map(|u| u.as_str().to_owned())
                .or(token.username.clone())
                .ok_or_else(|| {
                    ApiError::field(
                        "auth.authorization_username",
                        "is required to send with OAuth 2.0",
                    )
                })?;
            SmtpAuth::Xoauth2 {
                username,
                access_token: secrecy::SecretString::from(token.access_token.expose().to_owned()),
            }
        }
    };
    let target = SmtpTarget::new(&s.settings.server, auth);
    let now = state.clock.now();
    let msg = StoredMessage {
        message_id: outbox::new_message_id(),
        from: Some(from.as_str().to_owned()),
        to: vec![to.as_str().to_owned()],
        subject: "Postwire test email".into(),
        text: format!(
            "This is a test email from Postwire for tenant {tenant}.\r\n\r\nIt was sent through {}:{} ({:?}) as {}.\r\n",
            s.settings.server.host.as_str(),
            s.settings.server.port.get(),
            s.settings.server.encryption,
            from.as_str()
        ),
    };
    let id = outbox::enqueue(
        &store.db,
        store,
        KIND_TEST,
        Some(tenant.as_str()),
        &msg,
        now,
    )
    .await?;
    let row = outbox_e::Entity::find_by_id(id)
        .one(&store.db)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("test message vanished")))?;
    let result = outbox::send(&state.mailer, &target, &from, &msg).await;
    let outcome = match &result {
        Ok(reply) => Outcome::Sent(reply.clone()),
        Err(e) => Outcome::Failed(e.to_string()),
    };
    outbox::finish(
        store,
        &state.metrics,
        &row,
        outcome,
        MAX_AGE,
        state.clock.now(),
    )
    .await?;
    Ok(match result {
        Ok(reply) => TestResult::Sent {
            reply,
            message_id: msg.message_id,
        },
        Err(e) => TestResult::Failed(e),
    })
}

/// Keeps the invitation outbox moving: woken by new messages, otherwise every second.
pub fn spawn_worker(state: actix_web::web::Data<AppState>) {
    tokio::spawn(async move {
        loop {
            match run_invitations_once(&state).await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "invitation outbox"),
            }
            let _ = tokio::time::timeout(outbox::POLL, state.outbox_wakeup.notified()).await;
        }
    });
}
