//! `POST /v1/messages` (accept into the outbox: JSON, or multipart with streamed file parts)
//! and `GET /v1/messages/{id}`.

use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;

use crate::clock::rfc3339;
use crate::domain::{MessageRequest, NewMessage};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiKey, JsonBody};
use crate::routes::method_not_allowed;
use crate::startup::AppState;
use crate::store::{InsertOutcome, NewRow, Status};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/messages")
            .route(
                web::post()
                    .guard(actix_web::guard::fn_guard(super::multipart::is_multipart))
                    .to(super::multipart::create),
            )
            .route(web::post().to(create))
            .default_service(web::to(method_not_allowed("POST"))),
    )
    .service(
        web::resource("/v1/messages/{id}")
            .route(web::get().to(get))
            .default_service(web::to(method_not_allowed("GET"))),
    );
}

/// `202 Accepted`: the message is durably stored.
#[derive(Serialize)]
struct Accepted {
    id: String,
    status: &'static str,
}

pub(super) fn accepted(id: String, status: Status) -> HttpResponse {
    HttpResponse::Accepted()
        .insert_header(("Location", format!("/v1/messages/{id}")))
        .json(Accepted {
            id,
            status: status.as_str(),
        })
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `Idempotency-Key`: 1–255 visible ASCII characters.
pub(super) fn idempotency_key(req: &HttpRequest) -> ApiResult<Option<String>> {
    let Some(v) = req.headers().get("Idempotency-Key") else {
        return Ok(None);
    };
    let refused = || {
        ApiError::field(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters",
        )
    };
    let s = v.to_str().map_err(|_| refused())?.trim();
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(refused());
    }
    Ok(Some(s.to_owned()))
}

pub(super) fn key_conflict() -> ApiError {
    ApiError::Conflict(
        "this Idempotency-Key was used for a different request; use a new key for a new message"
            .into(),
    )
}

/// Accept a message into the outbox: answered only once it is durably stored.
#[tracing::instrument(skip_all, fields(kind))]
async fn create(
    _: ApiKey,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: JsonBody<MessageRequest>,
) -> ApiResult<HttpResponse> {
    let key = idempotency_key(&req)?;
    let request_hash = hex(&body.sha256);
    tracing::Span::current().record("kind", body.value.kind.as_str());
    if let Some(k) = &key
        && let Some((id, status, hash)) = state.store.by_idempotency_key(k).await?
    {
        return if hash.as_deref() == Some(request_hash.as_str()) {
            Ok(accepted(id, status))
        } else {
            Err(key_conflict())
        };
    }
    let current = current_config(&state)?;
    let request = body.value;
    let message = web::block(move || request.validate(&current.config))
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("blocking pool: {e}")))?
        .map_err(ApiError::Validation)?;
    let id = uuid::Uuid::new_v4().to_string();
    store(&state, id, key, request_hash, message).await
}

/// The configuration the addressing rules need; 503 before the first one is known.
pub(super) fn current_config(
    state: &AppState,
) -> ApiResult<std::sync::Arc<crate::config_source::Current>> {
    state.config.current().ok_or_else(|| {
        ApiError::Unavailable(
            "no email configuration yet: the Management Service has not answered; retry later"
                .into(),
        )
    })
}

/// Writes the inline attachments of a validated message under `id` (streamed ones are there
/// already) and commits it; answers 202 once it is durable. On any refusal the attachment
/// files of `id` are removed.
pub(super) async fn store(
    state: &AppState,
    id: String,
    key: Option<String>,
    request_hash: String,
    message: NewMessage,
) -> ApiResult<HttpResponse> {
    let content = serde_json::to_string(&message.content)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("serializing the message: {e}")))?;
    if let Err(e) = state
        .store
        .write_attachments(&id, message.attachments)
        .await
    {
        state.store.remove_attachments(&id).await;
        return Err(ApiError::Unavailable(format!(
            "cannot store the attachments: {e}"
        )));
    }
    let outcome = state
        .writer
        .insert(NewRow {
            id: id.clone(),
            idempotency_key: key,
            request_hash: Some(request_hash),
            kind: message.kind,
            message_id: message.message_id,
            content,
            now_ms: state.clock.now_ms(),
        })
        .await;
    match outcome {
        Ok(InsertOutcome::Inserted) => {
            state.wake.notify_one();
            Ok(accepted(id, Status::Queued))
        }
        Ok(InsertOutcome::Existing {
            id: existing,
            status,
        }) => {
            state.store.remove_attachments(&id).await;
            Ok(accepted(existing, status))
        }
        Ok(InsertOutcome::KeyConflict) => {
            state.store.remove_attachments(&id).await;
            Err(key_conflict())
        }
        Err(e) => {
            state.store.remove_attachments(&id).await;
            Err(ApiError::Internal(anyhow::Error::new(e)))
        }
    }
}

/// A message's state.
#[derive(Serialize)]
struct MessageView {
    id: String,
    kind: &'static str,
    status: &'static str,
    /// Why a queued message waits.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Deliveries tried so far (including the successful one).
    attempts: i64,
    last_error: Option<String>,
    /// The Message-ID header, the same on every attempt.
    message_id: String,
    /// The SMTP server's reply: to the message when sent, the refusal when failed.
    smtp_reply: Option<String>,
    created_at: Option<String>,
    updated_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sent_at: Option<String>,
}

async fn get(
    _: ApiKey,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = path.into_inner();
    let not_found = || ApiError::NotFound(format!("no message {id}"));
    if uuid::Uuid::parse_str(&id).is_err() {
        return Err(not_found());
    }
    let row = state.store.message(&id).await?.ok_or_else(not_found)?;
    let queued = row.status == Status::Queued;
    let held = state.source.held();
    let reason = if let (true, Some(h)) = (queued, &held) {
        Some(h.reason())
    } else if queued && state.config.current().is_none() {
        Some("waiting for the email configuration from the Management Service".to_owned())
    } else if queued {
        row.reason.clone()
    } else {
        None
    };
    Ok(HttpResponse::Ok().json(MessageView {
        id: row.id,
        kind: row.kind.as_str(),
        status: row.status.as_str(),
        reason,
        attempts: row.attempts,
        last_error: row.last_error,
        message_id: row.message_id,
        smtp_reply: row.smtp_reply,
        created_at: rfc3339(row.created_ms),
        updated_at: rfc3339(row.updated_ms),
        next_attempt_at: if queued {
            rfc3339(row.next_attempt_ms)
        } else {
            None
        },
        sent_at: row.sent_ms.and_then(rfc3339),
    }))
}
