//! The error catalogue is shared with the site mailer: see [`mail_core::error`].

pub use mail_core::error::{ApiError, ApiResult};
