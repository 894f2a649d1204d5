//! Configuration primitives shared by the Postwire services: `POSTWIRE_*` environment variables
//! over an optional TOML file (the same names in lower case without the prefix), `*_FILE`
//! variants for secrets, durations such as `90s`, the log format. Each service keeps its own
//! list of settings and turns the raw values into its typed configuration; a bad value is a
//! [`ConfigError`] naming the setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

/// One setting: its TOML key, its environment variable, and whether it is a secret (and so
/// also accepted from `<VAR>_FILE`, or `<key>_file` in the TOML file).
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub key: &'static str,
    pub env: &'static str,
    pub secret: bool,
}

impl Setting {
    pub const fn new(key: &'static str, env: &'static str, secret: bool) -> Self {
        Setting { key, env, secret }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {setting}: {message}")]
pub struct ConfigError {
    pub setting: String,
    pub message: String,
}

/// A [`ConfigError`] for `setting`.
pub fn err(setting: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// `POSTWIRE_LOG_FORMAT`: `text` (the default) or `json`.
    pub fn parse(value: Option<&str>) -> Result<Self, ConfigError> {
        match value.unwrap_or("text") {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(err(
                "POSTWIRE_LOG_FORMAT",
                format!("must be `text` or `json`, got `{other}`"),
            )),
        }
    }
}

/// Reads the process environment and the TOML file named by `--config` (`file`) or
/// `POSTWIRE_CONFIG`, and hands both to `from_sources`.
pub fn load<C>(
    file: Option<&Path>,
    from_sources: impl FnOnce(Option<&Path>, &BTreeMap<String, String>) -> Result<C, ConfigError>,
) -> Result<C, ConfigError> {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let file = file
        .map(Path::to_path_buf)
        .or_else(|| env.get("POSTWIRE_CONFIG").map(PathBuf::from));
    from_sources(file.as_deref(), &env)
}

/// The raw values of a service's settings, the environment winning over the file.
#[derive(Debug)]
pub struct RawValues {
    values: BTreeMap<&'static str, String>,
    /// Unknown `POSTWIRE_*` environment variables seen (to be logged as warnings).
    pub unknown_env: Vec<String>,
}

impl RawValues {
    /// Reads `file` (unknown keys refused) and then `env` (secrets also from `<VAR>_FILE`).
    /// `POSTWIRE_*` variables neither in `settings` nor in `other_known` (those of other
    /// Postwire parts) nor `POSTWIRE_TEST_*` are only collected in `unknown_env`.
    pub fn collect(
        settings: &'static [Setting],
        other_known: &[&str],
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut values: BTreeMap<&'static str, String> = BTreeMap::new();
        if let Some(path) = file {
            read_toml(settings, path, &mut values)?;
        }
        for setting in settings {
            let direct = env.get(setting.env).filter(|v| !v.is_empty());
            let file_var = format!("{}_FILE", setting.env);
            let from_file = env.get(&file_var).filter(|v| !v.is_empty());
            match (direct, from_file, setting.secret) {
                (Some(_), Some(_), true) => {
                    return Err(err(
                        setting.env,
                        format!("set either {} or {file_var}, not both", setting.env),
                    ));
                }
                (Some(v), _, _) => {
                    values.insert(setting.key, v.clone());
                }
                (None, Some(path), true) => {
                    values.insert(setting.key, read_secret_file(&file_var, path)?);
                }
                _ => {}
            }
        }
        let unknown_env = env
            .keys()
            .filter(|k| k.starts_with("POSTWIRE_"))
            .filter(|k| {
                !settings
                    .iter()
                    .any(|s| s.env == k.as_str() || format!("{}_FILE", s.env) == k.as_str())
                    && !other_known.contains(&k.as_str())
                    && !k.starts_with("POSTWIRE_TEST_")
            })
            .cloned()
            .collect();
        Ok(RawValues {
            values,
            unknown_env,
        })
    }

    /// The value of the setting with TOML key `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The value of `key` as a secret, if set.
    pub fn secret(&self, key: &str) -> Option<SecretString> {
        self.get(key).map(|v| SecretString::from(v.to_owned()))
    }
}

fn read_toml(
    settings: &[Setting],
    path: &Path,
    values: &mut BTreeMap<&'static str, String>,
) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        err(
            "POSTWIRE_CONFIG",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| err(path.display().to_string(), e.to_string()))?;
    for (k, v) in table {
        let (name, wants_file) = match k.strip_suffix("_file") {
            Some(base) if settings.iter().any(|s| s.key == base && s.secret) => {
                (base.to_owned(), true)
            }
            _ => (k.clone(), false),
        };
        let Some(setting) = settings.iter().find(|s| s.key == name) else {
            let known: Vec<&str> = settings.iter().map(|s| s.key).collect();
            return Err(err(
                format!("{} key `{k}`", path.display()),
                format!("unknown key; known keys: {}", known.join(", ")),
            ));
        };
        let value = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(err(
                    format!("{} key `{k}`", path.display()),
                    "must be a string",
                ));
            }
        };
        let value = if wants_file {
            read_secret_file(&k, &value)?
        } else {
            value
        };
        values.insert(setting.key, value);
    }
    Ok(())
}

/// The content of a secret file, trimmed; an error names `setting`.
pub fn read_secret_file(setting: &str, path: &str) -> Result<String, ConfigError> {
    let v = std::fs::read_to_string(path)
        .map_err(|e| err(setting, format!("cannot read {path}: {e}")))?;
    Ok(v.trim().to_owned())
}

/// Whether a duration may be given in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationUnits {
    /// `90s`, `15m`, `24h`, `7d`.
    Seconds,
    /// `250ms`, `90s`, `15m`, `24h`, `7d`.
    Millis,
}

/// A positive duration: a whole number and a unit (see [`DurationUnits`]).
pub fn parse_duration(s: &str, units: DurationUnits) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || match units {
        DurationUnits::Seconds => format!("`{s}` is not a duration such as 90s, 15m, 24h or 7d"),
        DurationUnits::Millis => {
            format!("`{s}` is not a duration such as 500ms, 90s, 15m, 24h or 7d")
        }
    };
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" if units == DurationUnits::Millis => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86400)),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Logs each unknown `POSTWIRE_*` environment variable as a warning.
pub fn warn_unknown_env(unknown_env: &[String]) {
    for name in unknown_env {
        tracing::warn!(variable = %name, "unknown POSTWIRE_* environment variable ignored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        use DurationUnits::{Millis, Seconds};
        assert_eq!(
            parse_duration("250ms", Millis).unwrap(),
            Duration::from_millis(250)
        );
        assert!(parse_duration("250ms", Seconds).is_err());
        assert_eq!(
            parse_duration("24h", Seconds).unwrap(),
            Duration::from_secs(86400)
        );
        assert_eq!(
            parse_duration("soon", Seconds).unwrap_err(),
            "`soon` is not a duration such as 90s, 15m, 24h or 7d"
        );
        assert_eq!(
            parse_duration("soon", Millis).unwrap_err(),
            "`soon` is not a duration such as 500ms, 90s, 15m, 24h or 7d"
        );
        assert!(parse_duration("0s", Millis).is_err());
        assert!(parse_duration("1w", Millis).is_err());
    }
}
