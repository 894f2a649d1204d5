//! Extractors of the local API: [`ApiKey`] (authorization by the local API key, checked
//! before the body is read) and [`JsonBody`] (JSON with a size limit, a content-type check
//! and the refused field named on error).

use std::future::{Future, Ready, ready};
use std::pin::Pin;

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header, web};
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::startup::AppState;

/// Largest accepted JSON body: 25 MiB of attachments take about 34 MiB in base64.
pub const MAX_BODY: usize = 35 * 1024 * 1024;

/// The request carries `Authorization: Bearer <local API key>`. Without it the site mailer
/// would be an open relay.
pub struct ApiKey;

impl FromRequest for ApiKey {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let Some(state) = req.app_data::<web::Data<AppState>>() else {
            return ready(Err(ApiError::Internal(anyhow::anyhow!(
                "application state missing"
            ))));
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        ready(match given {
            None => Err(ApiError::Unauthorized(
                "send the local API key as Authorization: Bearer <key>",
            )),
            Some(token) if state.api_key.matches(token) => Ok(ApiKey),
            Some(_) => Err(ApiError::Unauthorized("wrong API key")),
        })
    }
}

/// A JSON body, parsed, with the SHA-256 of its bytes (for idempotency checks).
pub struct JsonBody<T> {
    pub value: T,
    pub sha256: [u8; 32],
}

impl<T: DeserializeOwned + Send + 'static> FromRequest for JsonBody<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        let declared_len = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let mut payload = payload.take();
        Box::pin(async move {
            match content_type.as_deref() {
                Some("application/json") => {}
                Some(ct) if ct.starts_with("application/") && ct.ends_with("+json") => {}
                _ => return Err(ApiError::UnsupportedMediaType),
            }
            if declared_len.is_some_and(|n| n > MAX_BODY) {
                return Err(ApiError::PayloadTooLarge(MAX_BODY));
            }
            let mut body = Vec::with_capacity(declared_len.unwrap_or(4096).min(MAX_BODY));
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| {
                    ApiError::field("body", format!("could not read the request body: {e}"))
                })?;
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(ApiError::PayloadTooLarge(MAX_BODY));
                }
                body.extend_from_slice(&chunk);
            }
            // Parsing tens of MiB takes a while: off the I/O threads.
            web::block(move || {
                let sha256 = mail_core::crypto::sha256(&body);
                parse_json(&body).map(|value| JsonBody { value, sha256 })
            })
            .await
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("blocking pool: {e}")))?
        })
    }
}

/// Deserializes JSON, naming the refused field on error.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = e.inner();
        let mut message = inner.to_string();
        if let Some(i) = message.find(" at line ") {
            message.truncate(i);
        }
        let named = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|p| message.strip_prefix(p))
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned);
        let field = match (named, inner.classify()) {
            (Some(name), _) if path.is_empty() => name,
            (Some(name), _) if path == name || path.ends_with(&format!(".{name}")) => path,
            (Some(name), _) => format!("{path}.{name}"),
            (None, serde_json::error::Category::Syntax | serde_json::error::Category::Eof) => {
                "body".to_owned()
            }
            (None, _) if path.is_empty() => "body".to_owned(),
            (None, _) => path,
        };
        let message = if message.starts_with("unknown field") {
            message
                .split_once(", expected")
                .map(|(head, _)| format!("{head}: not a field of this object"))
                .unwrap_or(message)
        } else {
            message
        };
        ApiError::field(field, message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MessageRequest;

    fn field_of(body: &str) -> String {
        match parse_json::<MessageRequest>(body.as_bytes()) {
            Err(ApiError::Validation(e)) => e[0].field.clone(),
            other => panic!("expected a validation error, got {:?}", other.err()),
        }
    }

    #[test]
    fn paths_name_the_field() {
        assert_eq!(field_of("{"), "body");
        assert_eq!(field_of(r#"{"kind":"fax","subject":"s"}"#), "kind");
        assert_eq!(
            field_of(r#"{"kind":"test","subject":"s","bogus":1}"#),
            "bogus"
        );
        assert_eq!(field_of(r#"{"kind":"test"}"#), "subject");
        assert_eq!(
            field_of(
                r#"{"kind":"test","subject":"s","attachments":[{"filename":"a","content_type":"b"}]}"#
            ),
            "attachments[0].content_base64"
        );
    }
}
