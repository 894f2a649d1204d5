//! HTTP only: extract, authorize, call the store, map errors. Each module exposes one
//! `configure`.

pub mod admin;
pub mod audit;
pub mod health;
pub mod oauth;
pub mod provisioning;
pub mod settings;
pub mod site_api;
pub mod sites;
pub mod tenants;

use actix_web::web;
pub use mail_core::http::method_not_allowed;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(mail_core::http::path_config())
        .app_data(mail_core::http::query_config())
        .configure(health::configure)
        .configure(tenants::configure)
        .configure(settings::configure)
        .configure(oauth::configure)
        .configure(provisioning::configure)
        .configure(sites::configure)
        .configure(audit::configure)
        .configure(site_api::configure)
        .configure(admin::configure)
        .default_service(web::to(mail_core::http::not_found));
}
