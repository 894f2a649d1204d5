//! Configuration: `POSTWIRE_*` environment variables over an optional TOML file, `*_FILE`
//! variants for secrets. A bad value stops start-up with a message naming the setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use mail_core::config::{ConfigError, LogFormat};
use mail_core::config::{DurationUnits, RawValues, Setting, err};
use secrecy::SecretString;

const SETTINGS: &[Setting] = &[
    s("listen", "POSTWIRE_LISTEN", false),
    s("data_dir", "POSTWIRE_DATA_DIR", false),
    s("database_url", "DATABASE_URL", true),
    s("redis_url", "REDIS_URL", true),
    s("master_key", "POSTWIRE_MASTER_KEY", true),
    s("cache_key", "POSTWIRE_CACHE_KEY", true),
    s("jwt_secret", "POSTWIRE_JWT_SECRET", true),
    s("public_url", "POSTWIRE_PUBLIC_URL", false),
    s("extra_ca_file", "POSTWIRE_EXTRA_CA_FILE", false),
    s("egress_allow", "POSTWIRE_EGRESS_ALLOW", false),
    s(
        "invitation_url_template",
        "POSTWIRE_INVITATION_URL_TEMPLATE",
        false,
    ),
    s("grant_keepalive", "POSTWIRE_GRANT_KEEPALIVE", false),
    s("outbox_claim_ttl", "POSTWIRE_OUTBOX_CLAIM_TTL", false),
    s("log_format", "POSTWIRE_LOG_FORMAT", false),
    s("connect_timeout", "POSTWIRE_CONNECT_TIMEOUT", false),
    s("jwt_issuer", "POSTWIRE_JWT_ISSUER", false),
    s("jwt_audience", "POSTWIRE_JWT_AUDIENCE", false),
    s("jwt_public_key_file", "POSTWIRE_JWT_PUBLIC_KEY_FILE", false),
    s("jwt_algorithms", "POSTWIRE_JWT_ALGORITHMS", false),
    s("jwt_jwks_url", "POSTWIRE_JWT_JWKS_URL", false),
];

const fn s(key: &'static str, env: &'static str, secret: bool) -> Setting {
    Setting::new(key, env, secret)
}

/// `POSTWIRE_*` variables that belong to other Postwire parts (the site mailer, the CLI) and
/// are therefore not warned about.
const OTHER_KNOWN: &[&str] = &[
    "POSTWIRE_CONFIG",
    "POSTWIRE_MANAGEMENT_URL",
    "POSTWIRE_SITE_ID",
    "POSTWIRE_SITE_SECRET",
    "POSTWIRE_SITE_SECRET_FILE",
    "POSTWIRE_API_KEY",
    "POSTWIRE_API_KEY_FILE",
    "POSTWIRE_CONFIG_REFRESH",
    "POSTWIRE_TOKEN_REFRESH",
    "POSTWIRE_RETRY_INITIAL",
    "POSTWIRE_RETRY_MAX_DELAY",
    "POSTWIRE_RETRY_MAX_AGE",
    "POSTWIRE_SEND_CONCURRENCY",
    "POSTWIRE_OUTBOX_RETENTION",
    "POSTWIRE_SEND_TIMEOUT",
    "POSTWIRE_HELLO_NAME",
];

/// Where an external issuer's public keys come from.
#[derive(Debug, Clone)]
pub enum ExternalKeys {
    /// A PEM public key (`POSTWIRE_JWT_PUBLIC_KEY_FILE`).
    Pem(Vec<u8>),
    /// A JWKS document, fetched at start and refreshed (`POSTWIRE_JWT_JWKS_URL`).
    JwksUrl(String),
}

/// An external identity provider whose tokens are accepted beside the instance key.
#[derive(Debug, Clone)]
pub struct ExternalIssuer {
    pub issuer: String,
    pub audience: String,
    pub keys: ExternalKeys,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
}

#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `None`: the embedded SQLite default in `data_dir`.
    pub database_url: Option<SecretString>,
    pub redis_url: Option<SecretString>,
    pub master_key: Option<SecretString>,
    pub cache_key: Option<SecretString>,
    pub jwt_secret: Option<SecretString>,
    pub public_url: url::Url,
    pub extra_ca_file: Option<PathBuf>,
    pub egress_allow: String,
    pub invitation_url_template: String,
    pub grant_keepalive: Duration,
    /// How long a replica's claim on an outbox message lasts: a replica that dies while
    /// sending leaves it to another one after this long.
    pub outbox_claim_ttl: Duration,
    pub log_format: LogFormat,
    /// Connect timeout of outbound connections (OAuth providers, SMTP).
    pub connect_timeout: Duration,
    pub external_issuer: Option<ExternalIssuer>,
    /// How outbound host names are resolved before the egress check; `None`: the system
    /// resolver. Not a setting: tests put a resolver they control here (DNS rebinding).
    pub egress_resolver: Option<std::sync::Arc<dyn mail_core::egress::HostResolver>>,
    /// Unknown `POSTWIRE_*` environment variables seen (logged as warnings at start-up).
    pub unknown_env: Vec<String>,
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
        let listen: SocketAddr = get("listen")
            .unwrap_or("127.0.0.1:8080")
            .parse()
            .map_err(|_| err("POSTWIRE_LISTEN", "must be address:port, e.g. 0.0.0.0:8080"))?;
        let data_dir = PathBuf::from(get("data_dir").unwrap_or("./data"));
        let database_url = values.secret("database_url");
        if let Some(u) = get("database_url")
            && !(u.starts_with("sqlite:")
                || u.starts_with("postgres://")
                || u.starts_with("postgresql://"))
        {
            return Err(err(
                "DATABASE_URL",
                "must start with sqlite:, postgres:// or postgresql://",
            ));
        }
        let public_url = match get("public_url") {
            Some(u) => {
                let parsed = url::Url::parse(u)
                    .map_err(|e| err("POSTWIRE_PUBLIC_URL", format!("is not a valid URL ({e})")))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
                    return Err(err(
                        "POSTWIRE_PUBLIC_URL",
                        "must be an http(s) URL with a host, e.g. https://postwire.example.com",
                    ));
                }
                parsed
            }
            None => url::Url::parse(&format!("http://{listen}"))
                .map_err(|e| err("POSTWIRE_LISTEN", e.to_string()))?,
        };
        let egress_allow = get("egress_allow").unwrap_or("public,loopback").to_owned();
        // The policy's own message, with an example CIDR.
        mail_core::egress::EgressPolicy::parse(&egress_allow)
            .map_err(|m| err("POSTWIRE_EGRESS_ALLOW", format!("{m} such as 10.0.0.0/8")))?;
        let invitation_url_template = get("invitation_url_template")
            .map(str::to_owned)
            .unwrap_or_else(|| {
                format!(
                    "{}/invitations/accept?token={{token}}",
                    public_url.as_str().trim_end_matches('/')
                )
            });
        if !invitation_url_template.contains("{token}") {
            return Err(err(
                "POSTWIRE_INVITATION_URL_TEMPLATE",
                "must contain {token}",
            ));
        }
        let grant_keepalive = parse_duration(get("grant_keepalive").unwrap_or("24h"))
            .map_err(|m| err("POSTWIRE_GRANT_KEEPALIVE", m))?;
        let outbox_claim_ttl = parse_duration(get("outbox_claim_ttl").unwrap_or("120s"))
            .map_err(|m| err("POSTWIRE_OUTBOX_CLAIM_TTL", m))?;
        if outbox_claim_ttl.is_zero() {
            return Err(err("POSTWIRE_OUTBOX_CLAIM_TTL", "must be at least 1s"));
        }
        let connect_timeout = parse_duration(get("connect_timeout").unwrap_or("10s"))
            .map_err(|m| err("POSTWIRE_CONNECT_TIMEOUT", m))?;
        let log_format = LogFormat::parse(get("log_format"))?;
        let external_issuer = match get("jwt_issuer") {
            None => {
                for k in ["jwt_public_key_file", "jwt_jwks_url"] {
                    if get(k).is_some() {
                        return Err(err(
                            "POSTWIRE_JWT_ISSUER",
                            format!(
                                "is required when POSTWIRE_{} is set",
                                k.to_ascii_uppercase()
                            ),
                        ));
                    }
                }
                None
            }
            Some(issuer) => {
                let keys = match (get("jwt_public_key_file"), get("jwt_jwks_url")) {
                    (Some(path), None) => ExternalKeys::Pem(std::fs::read(path).map_err(|e| {
                        err(
                            "POSTWIRE_JWT_PUBLIC_KEY_FILE",
                            format!("cannot read {path}: {e}"),
                        )
                    })?),
                    (None, Some(u)) => {
                        let parsed = url::Url::parse(u).map_err(|e| {
                            err("POSTWIRE_JWT_JWKS_URL", format!("is not a valid URL ({e})"))
                        })?;
                        if !matches!(parsed.scheme(), "https" | "http") {
                            return Err(err("POSTWIRE_JWT_JWKS_URL", "must be an https URL"));
                        }
                        ExternalKeys::JwksUrl(u.to_owned())
                    }
                    (Some(_), Some(_)) => {
                        return Err(err(
                            "POSTWIRE_JWT_JWKS_URL",
                            "set either POSTWIRE_JWT_PUBLIC_KEY_FILE or POSTWIRE_JWT_JWKS_URL, not both",
                        ));
                    }
                    (None, None) => {
                        return Err(err(
                            "POSTWIRE_JWT_PUBLIC_KEY_FILE",
                            "POSTWIRE_JWT_PUBLIC_KEY_FILE or POSTWIRE_JWT_JWKS_URL is required when POSTWIRE_JWT_ISSUER is set",
                        ));
                    }
                };
                let algorithms = get("jwt_algorithms")
                    .unwrap_or("RS256")
                    .split(',')
                    .map(|a| match a.trim() {
                        "RS256" => Ok(jsonwebtoken::Algorithm::RS256),
                        "RS384" => Ok(jsonwebtoken::Algorithm::RS384),
                        "RS512" => Ok(jsonwebtoken::Algorithm::RS512),
                        "PS256" => Ok(jsonwebtoken::Algorithm::PS256),
                        "ES256" => Ok(jsonwebtoken::Algorithm::ES256),
                        "ES384" => Ok(jsonwebtoken::Algorithm::ES384),
                        "EdDSA" => Ok(jsonwebtoken::Algorithm::EdDSA),
                        other => Err(err(
                            "POSTWIRE_JWT_ALGORITHMS",
                            format!("`{other}` is not an accepted asymmetric algorithm (RS256, RS384, RS512, PS256, ES256, ES384, EdDSA)"),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some(ExternalIssuer {
                    issuer: issuer.to_owned(),
                    audience: get("jwt_audience").unwrap_or("postwire").to_owned(),
                    keys,
                    algorithms,
                })
            }
        };

        Ok(Config {
            listen,
            data_dir,
            database_url,
            redis_url: values.secret("redis_url"),
            master_key: values.secret("master_key"),
            cache_key: values.secret("cache_key"),
            jwt_secret: values.secret("jwt_secret"),
            public_url,
            extra_ca_file: get("extra_ca_file").map(PathBuf::from),
            egress_allow,
            invitation_url_template,
            grant_keepalive,
            outbox_claim_ttl,
            log_format,
            connect_timeout,
            external_issuer,
            egress_resolver: None,
            unknown_env: values.unknown_env,
        })
    }

    /// True when running on the embedded SQLite default (or any SQLite URL).
    pub fn is_sqlite(&self) -> bool {
        use secrecy::ExposeSecret;
        match &self.database_url {
            None => true,
            Some(u) => u.expose_secret().starts_with("sqlite:"),
        }
    }
}

/// `90s`, `15m`, `24h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    mail_core::config::parse_duration(s, DurationUnits::Seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults() {
        let c = Config::from_sources(None, &env(&[])).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.public_url.as_str(), "http://127.0.0.1:8080/");
        assert!(c.is_sqlite());
        assert_eq!(c.grant_keepalive, Duration::from_secs(86400));
        assert_eq!(c.outbox_claim_ttl, Duration::from_secs(120));
    }

    #[test]
    fn bad_values_name_the_setting() {
        for (k, v) in [
            ("POSTWIRE_LISTEN", "nope"),
            ("POSTWIRE_LOG_FORMAT", "xml"),
            ("POSTWIRE_EGRESS_ALLOW", "public,internet"),
            ("POSTWIRE_GRANT_KEEPALIVE", "soon"),
            ("POSTWIRE_OUTBOX_CLAIM_TTL", "later"),
            ("POSTWIRE_OUTBOX_CLAIM_TTL", "0s"),
            ("DATABASE_URL", "mysql://x"),
            ("POSTWIRE_PUBLIC_URL", "ftp://x"),
        ] {
            let e = Config::from_sources(None, &env(&[(k, v)])).unwrap_err();
            assert_eq!(e.setting, k, "{e}");
        }
    }

    #[test]
    fn unknown_env_is_only_reported() {
        let c = Config::from_sources(None, &env(&[("POSTWIRE_SERVICE_PORT", "tcp://1.2.3.4:80")]))
            .unwrap();
        assert_eq!(c.unknown_env, vec!["POSTWIRE_SERVICE_PORT"]);
    }

    #[test]
    fn toml_unknown_keys_refused_and_env_wins() {
        let dir = std::env::temp_dir().join(format!("pw-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "listen = \"0.0.0.0:9000\"\nlog_format = \"json\"\n").unwrap();
        let c = Config::from_sources(Some(&f), &env(&[("POSTWIRE_LOG_FORMAT", "text")])).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.log_format, LogFormat::Text);
        std::fs::write(&f, "lisen = \"0.0.0.0:9000\"\n").unwrap();
        let e = Config::from_sources(Some(&f), &env(&[])).unwrap_err();
        assert!(e.setting.contains("lisen"), "{e}");
    }

    #[test]
    fn secrets_from_files() {
        let dir = std::env::temp_dir().join(format!("pw-cfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("mk");
        std::fs::write(&f, "abc\n").unwrap();
        let c = Config::from_sources(
            None,
            &env(&[("POSTWIRE_MASTER_KEY_FILE", f.to_str().unwrap())]),
        )
        .unwrap();
        use secrecy::ExposeSecret;
        assert_eq!(c.master_key.unwrap().expose_secret(), "abc");
        let e = Config::from_sources(
            None,
            &env(&[
                ("POSTWIRE_MASTER_KEY_FILE", f.to_str().unwrap()),
                ("POSTWIRE_MASTER_KEY", "x"),
            ]),
        )
        .unwrap_err();
        assert_eq!(e.setting, "POSTWIRE_MASTER_KEY");
    }
}
