//! `ApiJson<T>`: a JSON body extractor with a 1 MiB limit (413), a content-type check (415),
//! and deserialization errors reported as 422 with the dotted path of the refused field.

use std::future::Future;
use std::pin::Pin;

use actix_web::{FromRequest, HttpRequest, dev::Payload};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest accepted request body.
pub const MAX_BODY: usize = 1024 * 1024;

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for ApiJson<T> {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let body = mail_core::http::read_json_body(req, payload, MAX_BODY, 1024);
        Box::pin(async move { parse_json(&body.await?).map(ApiJson) })
    }
}

/// Deserializes JSON, naming the refused field on error.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    mail_core::http::parse_json(body).map_err(|e| ApiError::Validation(vec![e]))
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
