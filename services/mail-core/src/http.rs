//! The actix-web pieces both Postwire APIs share: problem+json error responses (each service
//! keeps its own error enum and maps it to an [`ApiProblem`]), the JSON body reader with its
//! size limit and content-type check, JSON parsing that names the refused field, and the
//! 404/405 and path/query error handlers.

use std::fmt::Display;
use std::future::Future;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::error::InternalError;
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpRequest, HttpResponse, dev::Payload, web};
use futures_util::StreamExt as _;
use serde::de::DeserializeOwned;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};

use crate::problem::{FieldError, Problem};

/// One API error as the client sees it: the problem type, its status and its detail.
pub enum ApiProblem<'a> {
    /// Missing or invalid credentials (401 with `WWW-Authenticate`).
    Unauthorized(&'a str),
    Forbidden(&'a str),
    NotFound(&'a str),
    Validation(&'a [FieldError]),
    Conflict(&'a str),
    /// 409: the tenant has not authorized OAuth 2.0 yet (`oauth-not-authorized`).
    OauthNotAuthorized(&'a str),
    /// 409: the tenant's OAuth 2.0 grant was revoked or expired; a tenant admin must
    /// authorize again (`reauthorization-required`).
    ReauthorizationRequired(&'a str),
    /// The limit in bytes.
    PayloadTooLarge(usize),
    UnsupportedMediaType,
    /// A dependency cannot serve now; retry later (503 with `Retry-After`).
    Unavailable(&'a str),
    /// An upstream server (SMTP) refused; the detail carries its reply.
    BadGateway(&'a str),
    /// The resource existed but is gone for good.
    Gone(&'a str),
    /// An unexpected failure: the cause is logged, never sent.
    Internal(&'a (dyn Display + 'a)),
}

impl ApiProblem<'_> {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiProblem::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiProblem::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiProblem::NotFound(_) => StatusCode::NOT_FOUND,
            ApiProblem::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiProblem::Conflict(_)
            | ApiProblem::OauthNotAuthorized(_)
            | ApiProblem::ReauthorizationRequired(_) => StatusCode::CONFLICT,
            ApiProblem::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiProblem::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiProblem::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiProblem::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiProblem::Gone(_) => StatusCode::GONE,
            ApiProblem::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiProblem::Unauthorized(_) => "unauthorized",
            ApiProblem::Forbidden(_) => "forbidden",
            ApiProblem::NotFound(_) => "not-found",
            ApiProblem::Validation(_) => "validation",
            ApiProblem::Conflict(_) => "conflict",
            ApiProblem::OauthNotAuthorized(_) => "oauth-not-authorized",
            ApiProblem::ReauthorizationRequired(_) => "reauthorization-required",
            ApiProblem::PayloadTooLarge(_) => "payload-too-large",
            ApiProblem::UnsupportedMediaType => "unsupported-media-type",
            ApiProblem::Unavailable(_) => "unavailable",
            ApiProblem::BadGateway(_) => "smtp-refused",
            ApiProblem::Gone(_) => "gone",
            ApiProblem::Internal(_) => "internal",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            ApiProblem::Unauthorized(_) => "Authentication required",
            ApiProblem::Forbidden(_) => "Forbidden",
            ApiProblem::NotFound(_) => "Not found",
            ApiProblem::Validation(_) => "Validation failed",
            ApiProblem::Conflict(_) => "Conflict",
            ApiProblem::OauthNotAuthorized(_) => "OAuth 2.0 not authorized",
            ApiProblem::ReauthorizationRequired(_) => "Reauthorization required",
            ApiProblem::PayloadTooLarge(_) => "Request body too large",
            ApiProblem::UnsupportedMediaType => "Unsupported media type",
            ApiProblem::Unavailable(_) => "Temporarily unavailable",
            ApiProblem::BadGateway(_) => "The mail server refused",
            ApiProblem::Gone(_) => "Gone",
            ApiProblem::Internal(_) => "Internal server error",
        }
    }

    fn detail(&self) -> Option<String> {
        match self {
            ApiProblem::Unauthorized(d)
            | ApiProblem::Forbidden(d)
            | ApiProblem::NotFound(d)
            | ApiProblem::Conflict(d)
            | ApiProblem::OauthNotAuthorized(d)
            | ApiProblem::ReauthorizationRequired(d)
            | ApiProblem::Unavailable(d)
            | ApiProblem::BadGateway(d)
            | ApiProblem::Gone(d) => Some((*d).to_owned()),
            ApiProblem::Validation(errors) => Some(
                errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            ApiProblem::PayloadTooLarge(limit) => {
                Some(format!("the request body exceeds {limit} bytes"))
            }
            ApiProblem::UnsupportedMediaType => {
                Some("the request body must be application/json".to_owned())
            }
            ApiProblem::Internal(_) => None,
        }
    }

    /// The RFC 9457 body the client receives (also the source of the OpenAPI examples).
    pub fn to_problem(&self) -> Problem {
        Problem {
            type_: format!("urn:postwire:problem:{}", self.code()),
            title: self.title().to_owned(),
            status: self.status().as_u16(),
            detail: self.detail(),
            errors: match self {
                ApiProblem::Validation(e) => e.to_vec(),
                _ => Vec::new(),
            },
        }
    }

    /// The RFC 9457 response; `realm` names the API in the `WWW-Authenticate` challenge of a
    /// 401. An internal error's cause is logged here.
    pub fn response(&self, realm: &str) -> HttpResponse {
        if let ApiProblem::Internal(e) = self {
            tracing::error!(error = format!("{e:#}"), "request failed");
        }
        let status = self.status();
        let mut resp = problem_response(status, &self.to_problem());
        match self {
            ApiProblem::Unavailable(_) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            ApiProblem::Unauthorized(_) => {
                let challenge = format!("Bearer realm=\"{realm}\", error=\"invalid_token\"");
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
            }
            _ => {}
        }
        resp
    }
}

/// An `application/problem+json` response.
pub fn problem_response(status: StatusCode, problem: &Problem) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/problem+json")
        .json(problem)
}

/// Why a JSON request body was refused.
#[derive(Debug)]
pub enum BodyError {
    /// Not `application/json` nor `application/*+json`.
    UnsupportedMediaType,
    /// Larger than the limit (in bytes).
    PayloadTooLarge(usize),
    /// Unreadable or not the expected JSON: the refused field.
    Invalid(FieldError),
}

impl From<FieldError> for BodyError {
    fn from(e: FieldError) -> Self {
        BodyError::Invalid(e)
    }
}

/// Reads a JSON request body of at most `max` bytes (413 beyond, checked against the declared
/// length first), refusing other content types (415). `capacity`: the buffer to start with
/// when no length is declared.
pub fn read_json_body(
    req: &HttpRequest,
    payload: &mut Payload,
    max: usize,
    capacity: usize,
) -> impl Future<Output = Result<Vec<u8>, BodyError>> + 'static {
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
    async move {
        match content_type.as_deref() {
            Some("application/json") => {}
            Some(ct) if ct.starts_with("application/") && ct.ends_with("+json") => {}
            _ => return Err(BodyError::UnsupportedMediaType),
        }
        if declared_len.is_some_and(|n| n > max) {
            return Err(BodyError::PayloadTooLarge(max));
        }
        let mut body = Vec::with_capacity(declared_len.unwrap_or(capacity).min(max));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| FieldError {
                field: "body".to_owned(),
                message: format!("could not read the request body: {e}"),
            })?;
            if body.len() + chunk.len() > max {
                return Err(BodyError::PayloadTooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// Deserializes JSON, naming the refused field (a dotted path such as `senders[0].address`,
/// or `body` for malformed JSON) on error.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, FieldError> {
    // Every request body of these APIs is an object; serde would also read a struct from an
    // array (field by position), which no client means.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(FieldError {
            field: "body".into(),
            message: "must be a JSON object".into(),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
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
        } else if let Some((head, _)) = message.split_once(", expected struct ") {
            // Never name internal types: "invalid type: sequence, expected struct X".
            format!("{head}, expected a JSON object")
        } else {
            message
        };
        FieldError { field, message }
    })?;
    // One JSON document, nothing after it.
    de.end().map_err(|_| FieldError {
        field: "body".into(),
        message: "unexpected data after the JSON document".into(),
    })?;
    Ok(value)
}

/// A path segment that does not parse: 404, as for an unknown resource.
pub fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|e, _| {
        let msg = e.to_string();
        let resp = ApiProblem::NotFound(&msg).response("");
        InternalError::from_response(e, resp).into()
    })
}

/// A query string that does not parse: 422 naming the field `query`.
pub fn query_config() -> web::QueryConfig {
    web::QueryConfig::default().error_handler(|e, _| {
        let errors = [FieldError {
            field: "query".to_owned(),
            message: e.to_string(),
        }];
        let resp = ApiProblem::Validation(&errors).response("");
        InternalError::from_response(e, resp).into()
    })
}

/// The default service: 404 naming the method and path.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    let detail = format!("no route for {} {}", req.method(), req.path());
    ApiProblem::NotFound(&detail).response("")
}

/// 405 with a problem body and an `Allow` header, for resources' unsupported methods.
pub fn method_not_allowed(
    allow: &'static str,
) -> impl Fn() -> std::future::Ready<HttpResponse> + Clone {
    move || {
        std::future::ready(
            HttpResponse::MethodNotAllowed()
                .insert_header(("Allow", allow))
                .content_type("application/problem+json")
                .json(Problem {
                    type_: "urn:postwire:problem:method-not-allowed".into(),
                    title: "Method not allowed".into(),
                    status: 405,
                    detail: Some(format!("allowed: {allow}")),
                    errors: Vec::new(),
                }),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Request tracing

/// Root span of every request of both services: carries the request id and, once
/// authorized, the tenant id, site id and role (the Management Service records them);
/// continues the caller's trace when it sends a W3C `traceparent`.
pub struct RootSpan;

impl RootSpanBuilder for RootSpan {
    fn on_request_start(request: &ServiceRequest) -> tracing::Span {
        use actix_web::HttpMessage as _;
        use tracing::field::Empty;
        let request_id = request
            .extensions()
            .get::<tracing_actix_web::RequestId>()
            .map(|id| id.to_string())
            .unwrap_or_default();
        let method = request.method().as_str();
        let route = request
            .match_pattern()
            .unwrap_or_else(|| "unmatched".to_owned());
        // tracing-actix-web's `root_span!` without `http.target`'s query string: the OAuth
        // callback's query carries the authorization code and state.
        let span = tracing::info_span!(
            "HTTP request",
            http.method = %method,
            http.route = %route,
            http.target = %request.path(),
            http.status_code = Empty,
            otel.name = %format!("{method} {route}"),
            otel.kind = "server",
            otel.status_code = Empty,
            request_id = %request_id,
            exception.message = Empty,
            exception.details = Empty,
            tenant_id = Empty,
            site_id = Empty,
            role = Empty,
        );
        // A caller's W3C `traceparent` (a site mailer's, a local feature's) makes this span
        // part of its trace.
        crate::service::set_remote_parent(&span, request.headers());
        span
    }

    /// Records the status on the span and writes one access-log line inside it (so it
    /// carries the request id): `info`, or `debug` for probes and scrapes.
    fn on_request_end<B: MessageBody>(
        span: tracing::Span,
        outcome: &Result<ServiceResponse<B>, actix_web::Error>,
    ) {
        DefaultRootSpanBuilder::on_request_end(span.clone(), outcome);
        let (status, probe) = match outcome {
            Ok(r) => (
                r.response().status().as_u16(),
                matches!(r.request().path(), "/healthz" | "/readyz" | "/metrics"),
            ),
            Err(e) => (e.as_response_error().status_code().as_u16(), false),
        };
        span.in_scope(|| {
            if probe {
                tracing::debug!(status, "request finished");
            } else {
                tracing::info!(status, "request finished");
            }
        });
    }
}

/// Answers every request with its request id in `X-Request-Id` (the id the request's log lines
/// and span carry). Wrapped inside [`tracing_actix_web::TracingLogger`], which puts the id in
/// the request's extensions.
pub async fn request_id_header(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    use actix_web::HttpMessage as _;
    let id = req
        .extensions()
        .get::<tracing_actix_web::RequestId>()
        .map(|id| id.to_string());
    let mut res = next.call(req).await?;
    if let Some(id) = id
        && let Ok(v) = HeaderValue::from_str(&id)
    {
        res.headers_mut()
            .insert(header::HeaderName::from_static("x-request-id"), v);
    }
    Ok(res)
}
