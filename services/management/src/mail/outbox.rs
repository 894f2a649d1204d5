//! The Management Service's durable outbox (invitation and test emails): persisted before the
//! API answers, claimed by one replica at a time (`FOR UPDATE SKIP LOCKED` on PostgreSQL),
//! retried with exponential backoff and jitter for transient SMTP failures, failed with the
//! server's reply for permanent ones. A replica that dies while sending leaves a claim that
//! expires, so nothing is lost across a restart. Payloads are encrypted (they hold one-time
//! invitation links).

use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_core::crypto::{Binding, random_bytes};
use mail_core::domain::EmailAddress;
use mail_core::smtp::{Mailer, OutgoingMessage, SendError, SmtpReply, SmtpTarget};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, FromQueryResult,
    QueryFilter, Statement,
};
use serde::{Deserialize, Serialize};

use crate::error::{ApiError, ApiResult};
use crate::metrics::{MAIL_KINDS, Metrics};
use crate::store::entities::outbox;
use crate::store::{CLUSTER_OWNER, Store};

pub const KIND_INVITATION: &str = "invitation";
pub const KIND_TEST: &str = "test";
pub const REASON_NO_CLUSTER_SETTINGS: &str = "cluster email settings missing";

/// What the outbox stores of a message (encrypted).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredMessage {
    pub message_id: String,
    /// None: the default sender of the settings used to send it.
    pub from: Option<String>,
    pub to: Vec<String>,
    pub subject: String,
    pub text: String,
}

fn binding(id: &str) -> (String, &'static str) {
    (format!("{CLUSTER_OWNER}/outbox/{id}"), "outbox.message")
}

pub fn new_message_id() -> String {
    format!(
        "<{}@postwire>",
        uuid::Uuid::from_bytes(random_bytes::<16>()).simple()
    )
}

/// Persists a message; returns its id. Runs on any connection or transaction.
pub async fn enqueue<C: ConnectionTrait>(
    c: &C,
    store: &Store,
    kind: &str,
    tenant: Option<&str>,
    msg: &StoredMessage,
    now: DateTime<Utc>,
) -> ApiResult<String> {
    let id = uuid::Uuid::new_v4().to_string();
    let (owner, column) = binding(&id);
    let plain = serde_json::to_vec(msg).map_err(|e| ApiError::Internal(e.into()))?;
    let ct = store.keys.encrypt(
        Binding {
            owner: &owner,
            column,
        },
        &plain,
    );
    use base64::Engine as _;
    outbox::ActiveModel {
        id: Set(id.clone()),
        kind: Set(kind.to_owned()),
        tenant_id: Set(tenant.map(str::to_owned)),
        message: Set(base64::engine::general_purpose::STANDARD.encode(ct)),
        status: Set("queued".into()),
        attempts: Set(0),
        next_attempt_at: Set(now),
        reason: Set(None),
        last_error: Set(None),
        smtp_reply: Set(None),
        claimed_by: Set(None),
        claimed_until: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
        sent_at: Set(None),
    }
    .insert(c)
    .await?;
    Ok(id)
}

use sea_orm::ActiveModelTrait as _;

pub fn open_message(store: &Store, row: &outbox::Model) -> ApiResult<StoredMessage> {
    use base64::Engine as _;
    let ct = base64::engine::general_purpose::STANDARD
        .decode(&row.message)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("outbox {}: {e}", row.id)))?;
    let (owner, column) = binding(&row.id);
    let plain = store
        .keys
        .decrypt(
            Binding {
                owner: &owner,
                column,
            },
            &ct,
        )
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("outbox {}: {e}", row.id)))?;
    use secrecy::ExposeSecret;
    serde_json::from_slice(plain.expose_secret())
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("outbox {}: {e}", row.id)))
}

/// Claims up to `limit` due messages of `kind` for `owner`, for `ttl`
/// (`POSTWIRE_OUTBOX_CLAIM_TTL`). On PostgreSQL concurrent replicas skip each other's locked
/// rows; SQLite serializes writers anyway. Claims of a replica that died expire after `ttl`
/// and are taken over.
pub async fn claim(
    store: &Store,
    kind: &str,
    owner: &str,
    limit: u64,
    ttl: std::time::Duration,
    now: DateTime<Utc>,
) -> ApiResult<Vec<outbox::Model>> {
    let until = now
        + chrono::Duration::from_std(ttl).map_err(|e| ApiError::Internal(anyhow::anyhow!(e)))?;
    let db = &store.db;
    let backend = db.get_database_backend();
    let (sql, values): (&str, Vec<sea_orm::Value>) = match backend {
        DbBackend::Postgres => (
            "UPDATE outbox SET status = 'sending', claimed_by = $1, claimed_until = $2, attempts = attempts + 1, updated_at = $3 \
             WHERE id IN (SELECT id FROM outbox WHERE kind = $4 AND ((status = 'queued' AND next_attempt_at <= $3) OR (status = 'sending' AND claimed_until < $3)) \
             ORDER BY next_attempt_at LIMIT $5 FOR UPDATE SKIP LOCKED) RETURNING *",
            vec![
                owner.into(),
                until.into(),
                now.into(),
                kind.into(),
                (limit as i64).into(),
            ],
        ),
        _ => (
            "UPDATE outbox SET status = 'sending', claimed_by = ?, claimed_until = ?, attempts = attempts + 1, updated_at = ? \
             WHERE id IN (SELECT id FROM outbox WHERE kind = ? AND ((status = 'queued' AND next_attempt_at <= ?) OR (status = 'sending' AND claimed_until < ?)) \
             ORDER BY next_attempt_at LIMIT ?) RETURNING *",
            vec![
                owner.into(),
                until.into(),
                now.into(),
                kind.into(),
                now.into(),
                now.into(),
                (limit as i64).into(),
            ],
        ),
    };
    Ok(
        outbox::Model::find_by_statement(Statement::from_sql_and_values(backend, sql, values))
            .all(db)
            .await?,
    )
}

/// What happened to one delivery attempt.
pub enum Outcome {
    Sent(SmtpReply),
    /// Retry later (transient failure, or waiting for something).
    Retry {
        error: Option<String>,
        reason: Option<String>,
    },
    Failed(String),
}

/// Backoff before attempt `n + 1`: 10 s, 20 s, 40 s ... capped at 15 minutes, ±25 % jitter.
pub fn backoff(attempts: i32) -> chrono::Duration {
    let base = 10f64 * 2f64.powi(attempts.clamp(0, 10) - 1).max(1.0);
    let capped = base.min(900.0);
    let jitter = (f64::from(random_bytes::<1>()[0]) / 255.0 - 0.5) * 0.5;
    chrono::Duration::milliseconds((capped * (1.0 + jitter) * 1000.0) as i64)
}

/// Records an attempt's outcome on a claimed message (and in `postwire_mail_sends_total`).
pub async fn finish(
    store: &Store,
    metrics: &Metrics,
    row: &outbox::Model,
    outcome: Outcome,
    max_age: chrono::Duration,
    now: DateTime<Utc>,
) -> ApiResult<()> {
    let result = match &outcome {
        Outcome::Sent(_) => "sent",
        Outcome::Retry { .. } => "retry",
        Outcome::Failed(_) => "failed",
    };
    metrics
        .mail_sends
        .with_label_values(&[row.kind.as_str(), result])
        .inc();
    let mut q = outbox::Entity::update_many()
        .col_expr(
            outbox::Column::ClaimedBy,
            Expr::value(Option::<String>::None),
        )
        .col_expr(
            outbox::Column::ClaimedUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(outbox::Column::UpdatedAt, Expr::value(now))
        .filter(outbox::Column::Id.eq(row.id.clone()));
    // Only while the claim is still ours: a replica whose claim expired and was taken over
    // must not overwrite the new owner's outcome.
    q = match &row.claimed_by {
        Some(owner) => q.filter(outbox::Column::ClaimedBy.eq(owner.clone())),
        None => q.filter(outbox::Column::ClaimedBy.is_null()),
    };
    match outcome {
        Outcome::Sent(reply) => {
            q = q
                .col_expr(outbox::Column::Status, Expr::value("sent"))
                .col_expr(outbox::Column::SentAt, Expr::value(Some(now)))
                .col_expr(
                    outbox::Column::SmtpReply,
                    Expr::value(Some(reply.to_string())),
                )
                .col_expr(outbox::Column::Reason, Expr::value(Option::<String>::None))
                .col_expr(
                    outbox::Column::LastError,
                    Expr::value(Option::<String>::None),
                );
        }
        Outcome::Retry { error, reason } if now - row.created_at < max_age => {
            // Waiting for configuration is not a failed attempt.
            let attempts = if error.is_none() {
                row.attempts - 1
            } else {
                row.attempts
            };
            let wait = if error.is_none() {
                chrono::Duration::seconds(30)
            } else {
                backoff(attempts)
            };
            q = q
                .col_expr(outbox::Column::Status, Expr::value("queued"))
                .col_expr(outbox::Column::Attempts, Expr::value(attempts))
                .col_expr(outbox::Column::NextAttemptAt, Expr::value(now + wait))
                .col_expr(outbox::Column::Reason, Expr::value(reason));
            if let Some(e) = error {
                q = q.col_expr(outbox::Column::LastError, Expr::value(Some(e)));
            }
        }
        Outcome::Retry { error, reason } => {
            let why = error
                .or(reason)
                .unwrap_or_else(|| "gave up retrying".into());
            q = q
                .col_expr(outbox::Column::Status, Expr::value("failed"))
                .col_expr(
                    outbox::Column::LastError,
                    Expr::value(Some(format!("gave up after {}: {why}", human(max_age)))),
                );
        }
        Outcome::Failed(e) => {
            q = q
                .col_expr(outbox::Column::Status, Expr::value("failed"))
                .col_expr(outbox::Column::LastError, Expr::value(Some(e)));
        }
    }
    q.exec(&store.db).await?;
    Ok(())
}

fn human(d: chrono::Duration) -> String {
    if d.num_hours() >= 1 {
        format!("{} h", d.num_hours())
    } else {
        format!("{} min", d.num_minutes())
    }
}

/// Builds and sends one stored message.
pub async fn send(
    mailer: &Mailer,
    target: &SmtpTarget,
    default_from: &EmailAddress,
    msg: &StoredMessage,
) -> Result<SmtpReply, SendError> {
    let bad = |e: String| SendError::Config { description: e };
    let from = match &msg.from {
        Some(f) => EmailAddress::parse(f).map_err(bad)?,
        None => default_from.clone(),
    };
    let to = msg
        .to
        .iter()
        .map(|a| EmailAddress::parse(a))
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    let message = OutgoingMessage {
        message_id: msg.message_id.clone(),
        from,
        from_name: Some("Postwire".into()),
        to,
        cc: Vec::new(),
        bcc: Vec::new(),
        reply_to: None,
        subject: msg.subject.clone(),
        text: Some(msg.text.clone()),
        html: None,
        attachments: Vec::new(),
    }
    .into_message()
    .await
    .map_err(|e| bad(e.to_string()))?;
    mailer.send(target, message).await
}

#[derive(Debug, FromQueryResult)]
struct DepthRow {
    kind: String,
    status: String,
    n: i64,
    oldest: Option<DateTime<Utc>>,
}

/// Sets the outbox gauges (depth by kind and status, oldest message's age) from the database;
/// called at scrape time. A failed query leaves the last values and logs a warning.
pub async fn update_gauges(store: &Store, metrics: &Metrics, now: DateTime<Utc>) {
    let db = &store.db;
    let backend = db.get_database_backend();
    let sql = "SELECT kind, status, COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox \
               WHERE status IN ('queued', 'sending') GROUP BY kind, status";
    let rows = match DepthRow::find_by_statement(Statement::from_string(backend, sql))
        .all(db)
        .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "outbox metrics: cannot count the outbox");
            return;
        }
    };
    for k in MAIL_KINDS {
        for s in ["queued", "sending"] {
            metrics.outbox_messages.with_label_values(&[k, s]).set(0);
        }
    }
    let mut oldest: Option<DateTime<Utc>> = None;
    for r in &rows {
        // Only the known kinds: a bounded set of series.
        if MAIL_KINDS.contains(&r.kind.as_str()) {
            metrics
                .outbox_messages
                .with_label_values(&[r.kind.as_str(), r.status.as_str()])
                .set(r.n);
        }
        oldest = match (oldest, r.oldest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    let age = oldest.map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
    metrics.outbox_oldest_age.set(age);
}

/// Seconds until the worker looks again when idle.
pub const POLL: Duration = Duration::from_secs(1);
