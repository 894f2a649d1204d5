//! The Postwire site mailer: a local send API (`POST /v1/messages`), a durable outbox
//! (SQLite, group commit, attachments in files) and a worker that delivers over SMTP with the
//! site's effective configuration from the Management Service.

pub mod api_key;
pub mod clock;
pub mod config;
pub mod config_source;
pub mod domain;
pub mod effective;
pub mod error;
pub mod extract;
pub mod management_api;
pub mod metrics;
pub mod retention;
pub mod routes;
pub mod startup;
pub mod state_crypto;
pub mod store;
pub mod tokens;
pub mod worker;
