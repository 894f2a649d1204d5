//! Configuration: `POSTWIRE_*` environment variables over an optional TOML file (the same
//! names in lower case without the prefix), `*_FILE` variants for secrets. A bad value stops
//! start-up with a message naming the setting; unknown TOML keys are refused; an unknown
//! `POSTWIRE_*` environment variable is only reported (logged as a warning at start-up).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use mail_core::config::{ConfigError, LogFormat};
use mail_core::config::{DurationUnits, RawValues, Setting, err};
use secrecy::{ExposeSecret as _, SecretString};

const fn s(key: &'static str, env: &'static str, secret: bool) -> Setting {
    Setting::new(key, env, secret)
}

const SETTINGS: &[Setting] = &[
    s("listen", "POSTWIRE_LISTEN", false),
    s("data_dir", "POSTWIRE_DATA_DIR", false),
    s("management_url", "POSTWIRE_MANAGEMENT_URL", false),
    s("site_id", "POSTWIRE_SITE_ID", false),
    s("site_secret", "POSTWIRE_SITE_SECRET", true),
    s("api_key", "POSTWIRE_API_KEY", true),
    s("egress_allow", "POSTWIRE_EGRESS_ALLOW", false),
    s("extra_ca_file", "POSTWIRE_EXTRA_CA_FILE", false),
    s("redis_url", "REDIS_URL", true),
    s("cache_key", "POSTWIRE_CACHE_KEY", true),
    s("log_format", "POSTWIRE_LOG_FORMAT", false),
    s("connect_timeout", "POSTWIRE_CONNECT_TIMEOUT", false),
    s("send_timeout", "POSTWIRE_SEND_TIMEOUT", false),
    s("config_refresh", "POSTWIRE_CONFIG_REFRESH", false),
    s("token_refresh", "POSTWIRE_TOKEN_REFRESH", false),
    s("send_concurrency", "POSTWIRE_SEND_CONCURRENCY", false),
    s("retry_initial", "POSTWIRE_RETRY_INITIAL", false),
    s("retry_max_delay", "POSTWIRE_RETRY_MAX_DELAY", false),
    s("retry_max_age", "POSTWIRE_RETRY_MAX_AGE", false),
    s("outbox_retention", "POSTWIRE_OUTBOX_RETENTION", false),
    s("hello_name", "POSTWIRE_HELLO_NAME", false),
];

/// `POSTWIRE_*` variables of other Postwire parts (the Management Service, the CLI), which a
/// shared environment may carry: not warned about.
const OTHER_KNOWN: &[&str] = &[
    "POSTWIRE_CONFIG",
    "POSTWIRE_PUBLIC_URL",
    "POSTWIRE_MASTER_KEY",
    "POSTWIRE_MASTER_KEY_FILE",
    "POSTWIRE_JWT_SECRET",
    "POSTWIRE_JWT_SECRET_FILE",
    "POSTWIRE_GRANT_KEEPALIVE",
    "POSTWIRE_INVITATION_URL_TEMPLATE",
];

/// How the outbox retries temporary failures: exponential backoff with jitter, starting at
/// `initial`, capped at `max_delay`; a message still undelivered `max_age` after it was
/// accepted fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max_delay: Duration,
    pub max_age: Duration,
}

#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    /// Holds `site-mailer.db`, the attachment files and the generated API key.
    pub data_dir: PathBuf,
    pub management_url: url::Url,
    pub site_id: String,
    pub site_secret: SecretString,
    /// `None`: read from (or generated into) `api.key` in the data dir.
    pub api_key: Option<SecretString>,
    pub egress_allow: String,
    pub extra_ca_file: Option<PathBuf>,
    pub redis_url: Option<SecretString>,
    pub cache_key: Option<SecretString>,
    pub log_format: LogFormat,
    /// Connect timeout of outbound connections (SMTP, Management Service).
    pub connect_timeout: Duration,
    /// How long one SMTP delivery (connect, TLS, AUTH, transaction) may take.
    pub send_timeout: Duration,
    /// How often the effective configuration is fetched again.
    pub config_refresh: Duration,
    /// How often a cached OAuth access token is refreshed preemptively.
    pub token_refresh: Duration,
    /// Deliveries in flight at most.
    pub send_concurrency: usize,
    pub retry: RetryPolicy,
    /// How long sent and failed messages stay in the outbox (readable by
    /// `GET /v1/messages/{id}`, their idempotency keys honoured) before they are removed.
    pub outbox_retention: Duration,
    /// EHLO name; default: this machine's host name.
    pub hello_name: Option<String>,
    /// Unknown `POSTWIRE_*` environment variables seen (logged as warnings at start-up).
    pub unknown_env: Vec<String>,
    /// How SMTP host names are resolved before the egress check; `None`: the system
    /// resolver. Not a setting: tests put a resolver they control here (DNS rebinding).
    pub egress_resolver: Option<std::sync::Arc<dyn mail_core::egress::HostResolver>>,
}

impl Config {
    /// Reads the process environment and the TOML file named by `--config` or
    /// `POSTWIRE_CONFIG`.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        mail_core::config::load(file, Self::from_sources)
    }

    /// Builds the configuration from a file and an explicit environment (tests use this).
    pub fn from_sources(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let values = RawValues::collect(SETTINGS, OTHER_KNOWN, file, env)?;
        let get = |key: &str| values.get(key);
        let listen: SocketAddr =
            get("listen")
                .unwrap_or("127.0.0.1:8025")
                .parse()
                .map_err(|_| {
                    err(
                        "POSTWIRE_LISTEN",
                        "must be address:port, e.g. 127.0.0.1:8025",
                    )
                })?;
        let data_dir = PathBuf::from(get("data_dir").unwrap_or("./data"));
        let management_url = {
            let raw = get("management_url").unwrap_or("http://127.0.0.1:8080");
            let u = url::Url::parse(raw).map_err(|e| {
                err(
                    "POSTWIRE_MANAGEMENT_URL",
                    format!("is not a valid URL ({e})"),
                )
            })?;
            if !matches!(u.scheme(), "http" | "https")
                || u.host().is_none()
                || !u.username().is_empty()
                || u.password().is_some()
            {
                return Err(err(
                    "POSTWIRE_MANAGEMENT_URL",
                    "must be an http(s) URL with a host and no credentials, e.g. https://postwire.example.com",
                ));
            }
            u
        };
        let site_id = match get("site_id").map(str::trim) {
            None | Some("") => {
                return Err(err(
                    "POSTWIRE_SITE_ID",
                    "is required (the site id shown when the site was created)",
                ));
            }
            Some(id) if id.len() > 200 || id.chars().any(|c| c.is_control() || c == ' ') => {
                return Err(err(
                    "POSTWIRE_SITE_ID",
                    "must be a site id without spaces or control characters",
                ));
            }
            Some(id) => id.to_owned(),
        };
        let site_secret = match get("site_secret") {
            None | Some("") => {
                return Err(err(
                    "POSTWIRE_SITE_SECRET",
                    "is required (or POSTWIRE_SITE_SECRET_FILE): the secret shown when the site was created",
                ));
            }
            Some(s) => SecretString::from(s.to_owned()),
        };
        let api_key = match get("api_key") {
            None => None,
            Some(k) if k.len() < 16 || k.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                return Err(err(
                    "POSTWIRE_API_KEY",
                    "must be at least 16 characters without spaces (leave it unset to generate one)",
                ));
            }
            Some(k) => Some(SecretString::from(k.to_owned())),
        };
        let egress_allow = get("egress_allow")
            .unwrap_or("public,private,loopback")
            .to_owned();
        mail_core::egress::EgressPolicy::parse(&egress_allow)
            .map_err(|m| err("POSTWIRE_EGRESS_ALLOW", m))?;
        let extra_ca_file = get("extra_ca_file").map(PathBuf::from);
        if let Some(p) = &extra_ca_file
            && !p.is_file()
        {
            return Err(err(
                "POSTWIRE_EXTRA_CA_FILE",
                format!("{} is not a readable file", p.display()),
            ));
        }
        let redis_url = values.secret("redis_url");
        let cache_key = match get("cache_key") {
            None => None,
            Some(k) => {
                mail_core::crypto::decode_key(k).map_err(|n| {
                    err(
                        "POSTWIRE_CACHE_KEY",
                        format!("must be 32 bytes in standard padded base64 (got {n} bytes)"),
                    )
                })?;
                Some(SecretString::from(k.to_owned()))
            }
        };
        if let Some(u) = &redis_url
            && !(u.expose_secret().starts_with("redis://")
                || u.expose_secret().starts_with("rediss://")
                || u.expose_secret().starts_with("redis+unix://")
                || u.expose_secret().starts_with("unix://"))
        {
            return Err(err(
                "REDIS_URL",
                "must start with redis://, rediss:// or redis+unix://",
            ));
        }
        let log_format = LogFormat::parse(get("log_format"))?;
        let duration = |key: &str, env: &str, default: &str| {
            parse_duration(get(key).unwrap_or(default)).map_err(|m| err(env, m))
        };
        let connect_timeout = duration("connect_timeout", "POSTWIRE_CONNECT_TIMEOUT", "10s")?;
        let send_timeout = duration("send_timeout", "POSTWIRE_SEND_TIMEOUT", "5m")?;
        let config_refresh = duration("config_refresh", "POSTWIRE_CONFIG_REFRESH", "60s")?;
        let token_refresh = duration("token_refresh", "POSTWIRE_TOKEN_REFRESH", "1h")?;
        let retry = RetryPolicy {
            initial: duration("retry_initial", "POSTWIRE_RETRY_INITIAL", "30s")?,
            max_delay: duration("retry_max_delay", "POSTWIRE_RETRY_MAX_DELAY", "1h")?,
            max_age: duration("retry_max_age", "POSTWIRE_RETRY_MAX_AGE", "24h")?,
        };
        if retry.max_delay < retry.initial {
            return Err(err(
                "POSTWIRE_RETRY_MAX_DELAY",
                "must not be shorter than POSTWIRE_RETRY_INITIAL",
            ));
        }
        let outbox_retention = duration("outbox_retention", "POSTWIRE_OUTBOX_RETENTION", "7d")?;
        if outbox_retention < Duration::from_secs(1) {
            return Err(err(
                "POSTWIRE_OUTBOX_RETENTION",
                "must be at least 1s (sent and failed messages are kept that long)",
            ));
        }
        let send_concurrency = match get("send_concurrency").unwrap_or("4").parse::<usize>() {
            Ok(n) if (1..=256).contains(&n) => n,
            _ => {
                return Err(err(
                    "POSTWIRE_SEND_CONCURRENCY",
                    "must be a number from 1 to 256",
                ));
            }
        };
        let hello_name = get("hello_name").map(str::to_owned);
        if let Some(h) = &hello_name
            && (h.is_empty()
                || h.len() > 255
                || !h.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':')
                }))
        {
            return Err(err(
                "POSTWIRE_HELLO_NAME",
                "must be a host name or an address literal such as [192.0.2.1]",
            ));
        }

        Ok(Config {
            listen,
            data_dir,
            management_url,
            site_id,
            site_secret,
            api_key,
            egress_allow,
            extra_ca_file,
            redis_url,
            cache_key,
            log_format,
            connect_timeout,
            send_timeout,
            config_refresh,
            token_refresh,
            send_concurrency,
            retry,
            outbox_retention,
            hello_name,
            unknown_env: values.unknown_env,
            egress_resolver: None,
        })
    }
}

/// `250ms`, `90s`, `15m`, `24h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    mail_core::config::parse_duration(s, DurationUnits::Millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = [
            ("POSTWIRE_SITE_ID", "site_1"),
            ("POSTWIRE_SITE_SECRET", "s3cret"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in pairs {
            m.insert(k.to_string(), v.to_string());
        }
        m
    }

    #[test]
    fn defaults() {
        let c = Config::from_sources(None, &env(&[])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8025");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.management_url.as_str(), "http://127.0.0.1:8080/");
        assert_eq!(c.egress_allow, "public,private,loopback");
        assert_eq!(c.config_refresh, Duration::from_secs(60));
        assert_eq!(c.token_refresh, Duration::from_secs(3600));
        assert_eq!(c.retry.max_age, Duration::from_secs(86400));
        assert_eq!(c.outbox_retention, Duration::from_secs(7 * 86400));
        assert!(c.api_key.is_none());
    }

    #[test]
    fn site_credentials_are_required() {
        let mut e = env(&[]);
        e.remove("POSTWIRE_SITE_SECRET");
        assert_eq!(
            Config::from_sources(None, &e).unwrap_err().setting,
            "POSTWIRE_SITE_SECRET"
        );
        e.remove("POSTWIRE_SITE_ID");
        assert_eq!(
            Config::from_sources(None, &e).unwrap_err().setting,
            "POSTWIRE_SITE_ID"
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (k, v) in [
            ("POSTWIRE_LISTEN", "nope"),
            ("POSTWIRE_MANAGEMENT_URL", "ftp://x"),
            ("POSTWIRE_EGRESS_ALLOW", "public,intranet"),
            ("POSTWIRE_API_KEY", "short"),
            ("POSTWIRE_CACHE_KEY", "AAAA"),
            ("POSTWIRE_RETRY_MAX_AGE", "forever"),
            ("POSTWIRE_SEND_CONCURRENCY", "0"),
            ("POSTWIRE_OUTBOX_RETENTION", "500ms"),
            ("POSTWIRE_OUTBOX_RETENTION", "a week"),
            ("POSTWIRE_LOG_FORMAT", "xml"),
            ("POSTWIRE_EXTRA_CA_FILE", "/nonexistent/ca.pem"),
            ("REDIS_URL", "http://x"),
            ("POSTWIRE_HELLO_NAME", "a b"),
        ] {
            let e = Config::from_sources(None, &env(&[(k, v)])).unwrap_err();
            assert_eq!(e.setting, k, "{e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1w").is_err());
    }

    #[test]
    fn unknown_env_is_only_reported() {
        let c =
            Config::from_sources(None, &env(&[("POSTWIRE_SITE_MAILER_PORT", "tcp://x")])).unwrap();
        assert_eq!(c.unknown_env, vec!["POSTWIRE_SITE_MAILER_PORT"]);
    }

    #[test]
    fn toml_unknown_keys_refused_and_secret_files_read() {
        let dir = std::env::temp_dir().join(format!("sm-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "from-file\n").unwrap();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            format!(
                "listen = \"0.0.0.0:9025\"\nsite_secret_file = \"{}\"\n",
                secret.display()
            ),
        )
        .unwrap();
        let c = Config::from_sources(Some(&f), &env(&[])).unwrap();
        assert_eq!(c.listen.port(), 9025);
        // the environment wins over the file
        assert_eq!(c.site_secret.expose_secret(), "s3cret");
        std::fs::write(&f, "lisen = \"0.0.0.0:9000\"\n").unwrap();
        let e = Config::from_sources(Some(&f), &env(&[])).unwrap_err();
        assert!(e.setting.contains("lisen"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
