use actix_web::{HttpResponse, web};

use crate::routes::method_not_allowed;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_scalar::Servable as _;

use crate::startup::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    for (path, allow) in [
        ("/healthz", "GET"),
        ("/readyz", "GET"),
        ("/openapi.json", "GET"),
        ("/metrics", "GET"),
    ] {
        let r = web::resource(path).default_service(web::to(method_not_allowed(allow)));
        cfg.service(match path {
            "/healthz" => r.route(web::get().to(healthz)),
            "/readyz" => r.route(web::get().to(readyz)),
            "/openapi.json" => r.route(web::get().to(openapi_json)),
            _ => r.route(web::get().to(metrics)),
        });
    }
    cfg.service(utoipa_scalar::Scalar::with_url(
        "/docs",
        crate::openapi::spec(),
    ));
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    pub status: &'static str,
}

/// Liveness: the process answers.
///
/// Always 200 while the process serves requests; use it for the liveness probe.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive", body = Health,
            example = json!({"status": "ok"}))))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// Readiness: the database answers.
///
/// 200 when the database answers, 503 otherwise; use it for the readiness probe.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = Health,
            example = json!({"status": "ready"})),
        (status = 503, description = "The database does not answer", body = mail_core::problem::Problem, content_type = "application/problem+json",
            example = json!({"type": "urn:postwire:problem:not-ready", "title": "Not ready", "status": 503, "detail": "the database does not answer"}))))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.store.ping().await {
        Ok(()) => HttpResponse::Ok().json(Health { status: "ready" }),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            HttpResponse::ServiceUnavailable()
                .content_type("application/problem+json")
                .json(mail_core::problem::Problem {
                    type_: "urn:postwire:problem:not-ready".into(),
                    title: "Not ready".into(),
                    status: 503,
                    detail: Some("the database does not answer".into()),
                    errors: Vec::new(),
                })
        }
    }
}

/// Prometheus metrics (text format 0.0.4).
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state.grants.update_gauges().await;
    crate::mail::outbox::update_gauges(&state.store, &state.metrics, state.clock.now()).await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

/// The OpenAPI document of this API.
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(crate::openapi::json())
}
