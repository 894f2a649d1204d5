//! The domain both Postwire services share: settings model and validation, provider presets,
//! Data Protection and problem+json, and the configuration, HTTP and start-up pieces of both
//! services.

pub mod config;
pub mod crypto;
pub mod domain;
pub mod egress;
pub mod error;
pub mod hints;
pub mod http;
pub mod presets;
pub mod problem;
pub mod secret;
pub mod service;
pub mod settings;
pub mod smtp;
pub mod token_cache;
