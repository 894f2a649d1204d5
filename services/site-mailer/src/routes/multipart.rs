//! `POST /v1/messages` as `multipart/form-data`, for large scans: a `message` part (the JSON
//! body of the JSON form, first) and one part per attachment file, each streamed straight to
//! the message's attachment directory (never held in memory as a whole). The file parts follow
//! the message's inline `attachments`, in order; their name is free (`file` is usual), their
//! `filename` and `Content-Type` (default `application/octet-stream`) are the attachment's.

use actix_multipart::Multipart;
use actix_web::guard::GuardContext;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use aws_lc_rs::digest;
use futures_util::StreamExt as _;
use tokio::io::AsyncWriteExt as _;

use super::messages::{accepted, current_config, hex, idempotency_key, key_conflict, store};
use crate::domain::{AttachmentMeta, MAX_ATTACHMENTS, MessageRequest};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiKey, parse_json};
use crate::startup::AppState;

/// Largest `message` part (the JSON; attachments travel as file parts).
pub const MAX_MESSAGE_PART: usize = 1024 * 1024;
/// Largest total of the file parts of one message.
pub const MAX_FILE_BYTES: u64 = 40 * 1024 * 1024;

/// The request is `multipart/form-data` (routed here; everything else is the JSON form).
pub fn is_multipart(ctx: &GuardContext<'_>) -> bool {
    ctx.head()
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("multipart/form-data"))
        })
}

/// What the parts said: the request, the streamed files (already on disk) and the hash of
/// everything (for `Idempotency-Key`).
struct Received {
    request: MessageRequest,
    hash: [u8; 32],
}

/// Accept a multipart message: the files are streamed to disk and fsynced, then the message
/// is validated and committed like a JSON one.
#[tracing::instrument(skip_all, fields(kind))]
pub async fn create(
    _: ApiKey,
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> ApiResult<HttpResponse> {
    let key = idempotency_key(&req)?;
    let current = current_config(&state)?;
    let id = uuid::Uuid::new_v4().to_string();
    let received = match receive(&state, &req, payload, &id).await {
        Ok(r) => r,
        Err(e) => {
            state.store.remove_attachments(&id).await;
            return Err(e);
        }
    };
    tracing::Span::current().record("kind", received.request.kind.as_str());
    let request_hash = hex(&received.hash);
    if let Some(k) = &key
        && let Some((existing, status, hash)) = state.store.by_idempotency_key(k).await?
    {
        state.store.remove_attachments(&id).await;
        return if hash.as_deref() == Some(request_hash.as_str()) {
            Ok(accepted(existing, status))
        } else {
            Err(key_conflict())
        };
    }
    let request = received.request;
    let validated = web::block(move || request.validate(&current.config))
        .await
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("blocking pool: {e}")));
    let message = match validated {
        Ok(Ok(m)) => m,
        Ok(Err(errors)) => {
            state.store.remove_attachments(&id).await;
            return Err(ApiError::Validation(errors));
        }
        Err(e) => {
            state.store.remove_attachments(&id).await;
            return Err(e);
        }
    };
    store(&state, id, key, request_hash, message).await
}

fn bad_part(e: impl std::fmt::Display) -> ApiError {
    ApiError::field("body", format!("is not valid multipart/form-data: {e}"))
}

async fn receive(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
    id: &str,
) -> ApiResult<Received> {
    let mut parts = Multipart::new(req.headers(), payload);
    let mut hash = digest::Context::new(&digest::SHA256);
    let mut request: Option<MessageRequest> = None;
    let mut files: Vec<AttachmentMeta> = Vec::new();
    let mut total: u64 = 0;
    while let Some(part) = parts.next().await {
        let mut part = part.map_err(bad_part)?;
        let name = part.name().unwrap_or_default().to_owned();
        if name == "message" {
            if request.is_some() || !files.is_empty() {
                return Err(ApiError::field(
                    "message",
                    "must be the first part, and only one",
                ));
            }
            let bytes = match part.bytes(MAX_MESSAGE_PART).await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => return Err(bad_part(e)),
                Err(_) => return Err(ApiError::PayloadTooLarge(MAX_MESSAGE_PART)),
            };
            hash.update(b"message\0");
            hash.update(&bytes);
            request = Some(parse_json(&bytes)?);
            continue;
        }
        let Some(r) = &request else {
            return Err(ApiError::field(
                "message",
                "is required, as the first part (the message as JSON)",
            ));
        };
        let index = r.attachments.len() + files.len();
        let field = format!("attachments[{index}]");
        if index >= MAX_ATTACHMENTS {
            return Err(ApiError::field(
                "attachments",
                format!("at most {MAX_ATTACHMENTS} attachments"),
            ));
        }
        let filename = part
            .content_disposition()
            .and_then(|d| d.get_filename())
            .map(str::to_owned)
            .filter(|f| !f.is_empty())
            .ok_or_else(|| {
                ApiError::field(
                    format!("{field}.filename"),
                    format!("part `{name}` is not a file: it needs a filename"),
                )
            })?;
        let content_type = part
            .content_type()
            .map(|m| m.to_string())
            .unwrap_or_else(|| "application/octet-stream".to_owned());

        let dir = state.store.attachment_dir(id);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| ApiError::Unavailable(format!("cannot store the attachments: {e}")))?;
        let path = state.store.attachment_file(id, index);
        let io =
            |e: std::io::Error| ApiError::Unavailable(format!("cannot store the attachments: {e}"));
        let file = tokio::fs::File::create(&path).await.map_err(io)?;
        let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, file);
        let mut size: u64 = 0;
        hash.update(format!("\0file\0{filename}\0{content_type}\0").as_bytes());
        while let Some(chunk) = part.next().await {
            let chunk = chunk.map_err(bad_part)?;
            size += chunk.len() as u64;
            total += chunk.len() as u64;
            if total > MAX_FILE_BYTES {
                return Err(ApiError::PayloadTooLarge(
                    usize::try_from(MAX_FILE_BYTES).unwrap_or(usize::MAX),
                ));
            }
            hash.update(&chunk);
            out.write_all(&chunk).await.map_err(io)?;
        }
        out.flush().await.map_err(io)?;
        out.into_inner().sync_all().await.map_err(io)?;
        files.push(AttachmentMeta {
            filename,
            content_type,
            size,
        });
    }
    let Some(mut request) = request else {
        return Err(ApiError::field(
            "message",
            "is required, as the first part (the message as JSON)",
        ));
    };
    if !files.is_empty() {
        state
            .store
            .sync_attachment_dir(id)
            .await
            .map_err(|e| ApiError::Unavailable(format!("cannot store the attachments: {e}")))?;
    }
    request.files = files;
    let mut out = [0u8; 32];
    out.copy_from_slice(hash.finish().as_ref());
    Ok(Received { request, hash: out })
}
