//! OAuth 2.0 for SMTP: the authorization-code flow, the grant vault and access tokens.

pub mod grants;
pub mod provider;
