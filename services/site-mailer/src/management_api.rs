//! The Management Service as the site sees it: the site credentials are exchanged for a
//! short-lived site token (`POST /api/v1/site-auth/token`), which authorizes
//! `GET /api/v1/site/email-config` and `GET /api/v1/site/smtp-access-token`. A 401 gets a new
//! site token and one more try.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_core::secret::WireSecret;
use secrecy::{ExposeSecret as _, SecretString};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::clock::Clock;
use crate::effective::SiteEmailConfig;

#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    /// No answer (connection refused, timeout, TLS) or a 5xx / 429: try again later.
    #[error("the Management Service cannot be reached: {0}")]
    Unreachable(String),
    /// A definite refusal (401 for bad site credentials, 403 suspended, 404 deleted or not
    /// configured, 409 OAuth not authorized, ...).
    #[error("the Management Service answered {status}: {detail}")]
    Refused {
        status: u16,
        detail: String,
        /// The problem type's last segment (`reauthorization-required` for
        /// `urn:postwire:problem:reauthorization-required`), when the answer had one.
        problem: Option<String>,
    },
    #[error("unexpected answer from the Management Service: {0}")]
    Invalid(String),
}

impl ManagementError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ManagementError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The problem type of a refusal (`reauthorization-required`, `oauth-not-authorized`, ...).
    pub fn problem(&self) -> Option<&str> {
        match self {
            ManagementError::Refused { problem, .. } => problem.as_deref(),
            _ => None,
        }
    }
}

/// `GET /api/v1/site/smtp-access-token`.
#[derive(Debug, Clone, Deserialize)]
pub struct SiteAccessToken {
    pub access_token: WireSecret,
    pub expires_at: DateTime<Utc>,
    pub username: Option<String>,
}

#[derive(Deserialize)]
struct SiteTokenResponse {
    access_token: String,
    expires_in: i64,
}

struct SiteToken {
    value: SecretString,
    expires_at: DateTime<Utc>,
}

pub struct ManagementClient {
    base: String,
    site_id: String,
    secret: SecretString,
    http: reqwest::Client,
    token: tokio::sync::Mutex<Option<SiteToken>>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for ManagementClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementClient")
            .field("base", &self.base)
            .field("site_id", &self.site_id)
            .finish_non_exhaustive()
    }
}

impl ManagementClient {
    pub fn new(
        base: &url::Url,
        site_id: &str,
        secret: SecretString,
        connect_timeout: Duration,
        extra_ca_file: Option<&std::path::Path>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, String> {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(connect_timeout)
            .timeout(connect_timeout + Duration::from_secs(20))
            .user_agent(concat!("postwire-site-mailer/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = extra_ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                format!(
                    "POSTWIRE_EXTRA_CA_FILE: cannot read {}: {e}",
                    path.display()
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("POSTWIRE_EXTRA_CA_FILE: {e}"))?;
            b = b.tls_certs_merge(certs);
        }
        Ok(ManagementClient {
            base: base.as_str().trim_end_matches('/').to_owned(),
            site_id: site_id.to_owned(),
            secret,
            http: b.build().map_err(|e| format!("HTTP client: {e}"))?,
            token: tokio::sync::Mutex::new(None),
            clock,
        })
    }

    /// The effective configuration of this site.
    pub async fn email_config(&self) -> Result<SiteEmailConfig, ManagementError> {
        self.get_json("/api/v1/site/email-config").await
    }

    /// An SMTP access token with at least `min_validity` seconds left (the Management Service
    /// refreshes it otherwise).
    pub async fn smtp_access_token(
        &self,
        min_validity: Option<i64>,
    ) -> Result<SiteAccessToken, ManagementError> {
        let path = match min_validity {
            Some(s) => format!("/api/v1/site/smtp-access-token?min_validity={s}"),
            None => "/api/v1/site/smtp-access-token".to_owned(),
        };
        self.get_json(&path).await
    }

    #[tracing::instrument(
        name = "management_api",
        skip_all,
        fields(otel.kind = "client", http.route = path.split('?').next().unwrap_or(""), site_id = %self.site_id)
    )]
    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ManagementError> {
        let url = format!("{}{path}", self.base);
        for attempt in 0..2 {
            let token = self.site_token(attempt > 0).await?;
            let resp = self
                .http
                .get(&url)
                .bearer_auth(token.expose_secret())
                .header(reqwest::header::ACCEPT, "application/json")
                .headers(mail_core::service::trace_headers())
                .send()
                .await
                .map_err(|e| ManagementError::Unreachable(chain(&e)))?;
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                tracing::info!("site token refused: exchanging the site credentials again");
                *self.token.lock().await = None;
                continue;
            }
            let resp = check(resp).await?;
            return resp
                .json::<T>()
                .await
                .map_err(|e| ManagementError::Invalid(format!("GET {path}: {}", chain(&e))));
        }
        Err(ManagementError::Refused {
            status: 401,
            detail: "the site token was refused twice".into(),
            problem: None,
        })
    }

    /// The cached site token, or a new one when `renew`, none is cached, or it expires within
    /// a minute.
    async fn site_token(&self, renew: bool) -> Result<SecretString, ManagementError> {
        let mut guard = self.token.lock().await;
        let now = self.clock.now();
        if !renew
            && let Some(t) = guard.as_ref()
            && t.expires_at - now > chrono::Duration::seconds(60)
        {
            return Ok(t.value.clone());
        }
        let resp = self
            .http
            .post(format!("{}/api/v1/site-auth/token", self.base))
            .headers(mail_core::service::trace_headers())
            .json(&serde_json::json!({
                "site_id": self.site_id,
                "secret": self.secret.expose_secret(),
            }))
            .send()
            .await
            .map_err(|e| ManagementError::Unreachable(chain(&e)))?;
        let body: SiteTokenResponse = check(resp)
            .await?
            .json()
            .await
            .map_err(|e| ManagementError::Invalid(format!("site token: {}", chain(&e))))?;
        let value = SecretString::from(body.access_token);
        *guard = Some(SiteToken {
            value: value.clone(),
            expires_at: now + chrono::Duration::seconds(body.expires_in.max(0)),
        });
        Ok(value)
    }
}

/// A success passes; anything else becomes an error with the problem's detail.
async fn check(resp: reqwest::Response) -> Result<reqwest::Response, ManagementError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let text = resp.text().await.unwrap_or_default();
    let json = serde_json::from_str::<serde_json::Value>(&text).ok();
    let detail = json
        .as_ref()
        .and_then(|v| {
            v.get("detail")
                .or_else(|| v.get("title"))
                .and_then(|d| d.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| text.chars().take(200).collect());
    let problem = json
        .as_ref()
        .and_then(|v| {
            v.get("type")?
                .as_str()?
                .strip_prefix("urn:postwire:problem:")
        })
        .map(str::to_owned);
    if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        Err(ManagementError::Unreachable(format!(
            "HTTP {status}: {detail}"
        )))
    } else {
        Err(ManagementError::Refused {
            status: status.as_u16(),
            detail,
            problem,
        })
    }
}

/// The error with its cause chain.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}
