//! The one error catalogue of the local API: each error maps to an HTTP status and an
//! RFC 9457 body once. Causes are logged, never sent; an unknown error is an opaque 500.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use mail_core::http::{ApiProblem, BodyError};
use mail_core::problem::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Missing or wrong local API key.
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("payload too large")]
    PayloadTooLarge(usize),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// Cannot accept now (no configuration yet, storage failing); retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Validation(vec![FieldError {
            field: field.into(),
            message: message.into(),
        }])
    }

    /// How the client sees this error.
    fn problem(&self) -> ApiProblem<'_> {
        match self {
            ApiError::Unauthorized(why) => ApiProblem::Unauthorized(why),
            ApiError::NotFound(d) => ApiProblem::NotFound(d),
            ApiError::Validation(e) => ApiProblem::Validation(e),
            ApiError::Conflict(d) => ApiProblem::Conflict(d),
            ApiError::PayloadTooLarge(limit) => ApiProblem::PayloadTooLarge(*limit),
            ApiError::UnsupportedMediaType => ApiProblem::UnsupportedMediaType,
            ApiError::Unavailable(d) => ApiProblem::Unavailable(d),
            ApiError::Internal(e) => ApiProblem::Internal(e),
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::UnsupportedMediaType => ApiError::UnsupportedMediaType,
            BodyError::PayloadTooLarge(limit) => ApiError::PayloadTooLarge(limit),
            BodyError::Invalid(e) => ApiError::Validation(vec![e]),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.problem().status()
    }

    fn error_response(&self) -> HttpResponse {
        self.problem().response("postwire-site-mailer")
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(e: sea_orm::DbErr) -> Self {
        ApiError::Internal(anyhow::Error::new(e).context("database"))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
