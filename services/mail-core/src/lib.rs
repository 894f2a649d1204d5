//! The domain both Postwire services share: settings model and validation, provider presets,
//! Data Protection and problem+json.

pub mod crypto;
pub mod domain;
pub mod egress;
pub mod hints;
pub mod presets;
pub mod problem;
pub mod secret;
pub mod settings;
pub mod smtp;
pub mod token_cache;
