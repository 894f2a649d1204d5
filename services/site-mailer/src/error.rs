//! The error catalogue is shared with the Management Service: see [`mail_core::error`].

pub use mail_core::error::{ApiError, ApiResult};
