//! Extractors of the local API: [`ApiKey`] (authorization by the local API key, checked
//! before the body is read) and [`JsonBody`] (JSON with a size limit, a content-type check
//! and the refused field named on error).

use std::future::{Future, Ready, ready};
use std::pin::Pin;

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header, web};
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
        let body = mail_core::http::read_json_body(req, payload, MAX_BODY, 4096);
        Box::pin(async move {
            let body = body.await?;
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
    mail_core::http::parse_json(body).map_err(|e| ApiError::Validation(vec![e]))
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
