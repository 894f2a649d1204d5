use actix_web::{HttpResponse, web};
use serde::Serialize;

use crate::startup::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

/// Liveness: the process answers.
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

#[derive(Serialize)]
struct Ready {
    status: &'static str,
    /// When the configuration in use was fetched from the Management Service.
    configuration_fetched_at: String,
    /// The last fetch failed (the stored configuration is used meanwhile).
    #[serde(skip_serializing_if = "Option::is_none")]
    management_error: Option<String>,
    /// Why sending is held (the Management Service refused this site), if it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    sending_held: Option<String>,
    queued: i64,
}

/// Readiness: the outbox database answers and an email configuration is known (fetched now
/// or stored from an earlier fetch).
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let not_ready = |detail: String| {
        tracing::warn!(%detail, "readiness check failed");
        mail_core::http::problem_response(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            &mail_core::problem::Problem {
                type_: "urn:postwire:problem:not-ready".into(),
                title: "Not ready".into(),
                status: 503,
                detail: Some(detail),
                errors: Vec::new(),
            },
        )
    };
    if let Err(e) = state.store.ping().await {
        return not_ready(format!("the outbox database does not answer: {e}"));
    }
    let fetch = state.source.fetch_state();
    let Some(current) = state.config.current() else {
        return not_ready(format!(
            "no email configuration yet: {}",
            fetch
                .last_error
                .unwrap_or_else(|| "the Management Service has not answered yet".into())
        ));
    };
    let queued = state
        .store
        .count(crate::store::Status::Queued)
        .await
        .unwrap_or_default();
    HttpResponse::Ok().json(Ready {
        status: "ready",
        configuration_fetched_at: current
            .fetched_at
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        management_error: fetch.last_error,
        sending_held: state.source.held().map(|h| h.reason()),
        queued,
    })
}

/// Prometheus metrics (text format 0.0.4), no key needed (as `/healthz`): counts only, no
/// addresses or secrets.
async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let body = state
        .metrics
        .render(
            &state.store,
            state.clock.now_ms(),
            state.source.held().is_some(),
        )
        .await;
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}
