//! Postwire Management Service: tenant-scoped email settings, sites and identity.

pub mod auth;
pub mod clock;
pub mod config;
pub mod error;
pub mod extract;
pub mod keys;
pub mod mail;
pub mod metrics;
pub mod oauth;
pub mod openapi;
pub mod routes;
pub mod startup;
pub mod store;

pub use startup::Application;
