//! `ApiJson<T>`: a JSON body extractor with a 1 MiB limit (413), a content-type check (415),
//! and deserialization errors reported as 422 with the dotted path of the refused field.

use std::future::Future;
use std::pin::Pin;

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header};
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest accepted request body.
pub const MAX_BODY: usize = 1024 * 1024;

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for ApiJson<T> {
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
            let mut body = Vec::with_capacity(declared_len.unwrap_or(1024).min(MAX_BODY));
            while let Some(chunk) = payload.next().await {
                let chunk = chunk.map_err(|e| {
                    ApiError::field("body", format!("could not read the request body: {e}"))
                })?;
                if body.len() + chunk.len() > MAX_BODY {
                    return Err(ApiError::PayloadTooLarge(MAX_BODY));
                }
                body.extend_from_slice(&chunk);
            }
            parse_json(&body).map(ApiJson)
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
        // Name the offending key itself for unknown and missing fields.
        let named = ["unknown field `", "missing field `"]
            .iter()
            .find_map(|p| message.strip_prefix(p))
            .and_then(|rest| rest.split('`').next())
            .map(str::to_owned);
        let field = match (named, inner.classify()) {
            (Some(name), _) if path.is_empty() => name,
            // serde_path_to_error already ends the path with an unknown key.
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
    use mail_core::settings::EmailSettingsRequest;

    fn field_of(body: &str) -> String {
        match parse_json::<EmailSettingsRequest>(body.as_bytes()) {
            Err(ApiError::Validation(e)) => e[0].field.clone(),
            other => panic!("expected a validation error, got {:?}", other.err()),
        }
    }

    #[test]
    fn paths_name_the_field() {
        assert_eq!(field_of("{"), "body");
        assert_eq!(
            field_of(r#"{"provider":"custom","server":{"host":"x"},"auth":{"method":"magic"}}"#),
            "auth.method"
        );
        assert_eq!(
            field_of(
                r#"{"provider":"custom","server":{"host":"x","bogus":1},"auth":{"method":"none"}}"#
            ),
            "server.bogus"
        );
        assert_eq!(
            field_of(r#"{"provider":"custom","server":{},"auth":{"method":"none"}}"#),
            "server.host"
        );
        assert_eq!(
            field_of(
                r#"{"provider":"custom","server":{"host":"x"},"auth":{"method":"none"},"senders":[{"address":1}]}"#
            ),
            "senders[0].address"
        );
    }
}
