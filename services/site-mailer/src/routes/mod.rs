//! HTTP only: extract, authorize, call the domain and the store, map errors. Each module
//! exposes one `configure`.

pub mod health;
pub mod messages;

use actix_web::{HttpRequest, HttpResponse, error::InternalError, web};

use crate::error::ApiError;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PathConfig::default().error_handler(|e, _| {
        let msg = e.to_string();
        InternalError::from_response(
            e,
            actix_web::ResponseError::error_response(&ApiError::NotFound(msg)),
        )
        .into()
    }))
    .configure(health::configure)
    .configure(messages::configure)
    .default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
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
                .json(mail_core::problem::Problem {
                    type_: "urn:postwire:problem:method-not-allowed".into(),
                    title: "Method not allowed".into(),
                    status: 405,
                    detail: Some(format!("allowed: {allow}")),
                    errors: Vec::new(),
                }),
        )
    }
}
