//! Black-box tests of the Management Service over HTTP, each on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin_page;
mod external_issuer;
mod keys;
mod matrix;
mod oauth;
mod observability;
mod openapi;
mod peers_selftest;
mod provisioning;
mod security_headers;
mod security_limits;
mod security_oauth;
mod security_ssrf;
mod settings;
mod site_mailer;
mod sites;
mod smtp;
mod tenants;
