//! HTTP only: extract, authorize, call the domain and the store, map errors. Each module
//! exposes one `configure`.

pub mod health;
pub mod messages;
pub mod multipart;

use actix_web::web;
pub use mail_core::http::method_not_allowed;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(mail_core::http::path_config())
        .configure(health::configure)
        .configure(messages::configure)
        .default_service(web::to(mail_core::http::not_found));
}
