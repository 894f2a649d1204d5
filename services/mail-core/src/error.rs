//! The one error catalogue of both Postwire APIs (the Management Service's and the site
//! mailer's local API): each error maps to an HTTP status and an RFC 9457 body once, through
//! [`ApiProblem`]. Causes are logged, never sent; an unknown error is an opaque 500. A 401
//! challenges with `Bearer realm="postwire"`.

use crate::http::{ApiProblem, BodyError};
use crate::problem::FieldError;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Missing or invalid bearer token (or local API key).
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("conflict: {0}")]
    Conflict(String),
    /// The tenant has not authorized OAuth 2.0 yet (409 `oauth-not-authorized`).
    #[error("{0}")]
    OauthNotAuthorized(String),
    /// The grant was revoked or expired: a tenant admin must authorize again (409
    /// `reauthorization-required`; site mailers keep their messages queued with that reason).
    #[error("{0}")]
    ReauthorizationRequired(String),
    #[error("payload too large")]
    PayloadTooLarge(usize),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// A dependency (the OAuth provider, the database, the outbox storage) cannot serve now,
    /// or the site mailer has no configuration yet; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// An upstream server (SMTP) refused; the detail carries its reply.
    #[error("upstream refused: {0}")]
    BadGateway(String),
    /// The resource existed but is gone for good (an expired invitation).
    #[error("gone: {0}")]
    Gone(String),
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
            ApiError::Forbidden(d) => ApiProblem::Forbidden(d),
            ApiError::NotFound(d) => ApiProblem::NotFound(d),
            ApiError::Validation(e) => ApiProblem::Validation(e),
            ApiError::Conflict(d) => ApiProblem::Conflict(d),
            ApiError::OauthNotAuthorized(d) => ApiProblem::OauthNotAuthorized(d),
            ApiError::ReauthorizationRequired(d) => ApiProblem::ReauthorizationRequired(d),
            ApiError::PayloadTooLarge(limit) => ApiProblem::PayloadTooLarge(*limit),
            ApiError::UnsupportedMediaType => ApiProblem::UnsupportedMediaType,
            ApiError::Unavailable(d) => ApiProblem::Unavailable(d),
            ApiError::BadGateway(d) => ApiProblem::BadGateway(d),
            ApiError::Gone(d) => ApiProblem::Gone(d),
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
        self.problem().response("postwire")
    }
}

impl From<sea_orm::DbErr> for ApiError {
    fn from(e: sea_orm::DbErr) -> Self {
        // Every foreign key of the Management Service's schema references the tenant (the
        // site mailer's has none): a write that violates one raced a DELETE of that tenant
        // between its existence check and its insert. The tenant is gone: 404, not 500.
        if let Some(sea_orm::SqlErr::ForeignKeyConstraintViolation(_)) = e.sql_err() {
            return ApiError::NotFound("the tenant no longer exists".into());
        }
        ApiError::Internal(anyhow::Error::new(e).context("database"))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::{ConnectionTrait, Database};

    /// A real foreign-key violation (SQLite, enforced) becomes 404; other database errors
    /// stay opaque 500s.
    #[tokio::test]
    async fn foreign_key_violation_is_a_vanished_tenant() {
        let db = Database::connect("sqlite::memory:").await.unwrap();
        for sql in [
            "PRAGMA foreign_keys = ON",
            "CREATE TABLE tenants (id TEXT PRIMARY KEY)",
            "CREATE TABLE sites (id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(id))",
        ] {
            db.execute_unprepared(sql).await.unwrap();
        }
        let err = db
            .execute_unprepared("INSERT INTO sites (id, tenant_id) VALUES ('s', 'gone')")
            .await
            .unwrap_err();
        let api = ApiError::from(err);
        assert!(matches!(api, ApiError::NotFound(_)), "{api:?}");
        assert_eq!(api.status_code(), StatusCode::NOT_FOUND);

        let err = db
            .execute_unprepared("INSERT INTO nowhere VALUES (1)")
            .await
            .unwrap_err();
        assert!(matches!(ApiError::from(err), ApiError::Internal(_)));
    }
}
