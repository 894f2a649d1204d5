//! RFC 9457 problem details, the one error body of every Postwire API.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One refused field: `field` is a dotted JSON path such as `senders[0].address`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FieldError {
    /// Dotted JSON path of the refused field, e.g. `auth.method` or `senders[0].address`.
    #[schema(example = "senders[0].address")]
    pub field: String,
    /// Why it was refused.
    #[schema(example = "is not a valid email address")]
    pub message: String,
}

/// `application/problem+json` (RFC 9457).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// A URI reference identifying the problem type.
    #[serde(rename = "type")]
    #[schema(example = "urn:postwire:problem:validation")]
    pub type_: String,
    /// Short, human-readable summary of the problem type.
    #[schema(example = "Validation failed")]
    pub title: String,
    /// The HTTP status code.
    #[schema(example = 422)]
    pub status: u16,
    /// Explanation specific to this occurrence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// For validation problems: every refused field with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// Collects field errors while a request is converted into domain types.
#[derive(Debug, Default)]
pub struct FieldErrors(Vec<FieldError>);

impl FieldErrors {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
    /// Keeps the value, or records the error under `field` and yields `None`.
    pub fn check<T>(&mut self, field: impl Into<String>, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(m) => {
                self.push(field, m);
                None
            }
        }
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn into_result<T>(self, value: impl FnOnce() -> T) -> Result<T, Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(self.0)
        }
    }
    pub fn into_vec(self) -> Vec<FieldError> {
        self.0
    }
}
