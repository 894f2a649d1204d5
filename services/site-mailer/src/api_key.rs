//! The local API key: configured (`POSTWIRE_API_KEY[_FILE]`), or generated once into
//! `api.key` in the data dir and printed to stderr at that moment only.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use base64::Engine as _;
use secrecy::ExposeSecret as _;

use crate::config::Config;

/// Only a digest of the key is kept; requests are compared in constant time.
pub struct LocalApiKey {
    digest: [u8; 32],
}

impl std::fmt::Debug for LocalApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalApiKey([REDACTED])")
    }
}

impl LocalApiKey {
    pub fn new(key: &str) -> Self {
        LocalApiKey {
            digest: mail_core::crypto::sha256(key.as_bytes()),
        }
    }

    pub fn matches(&self, given: &str) -> bool {
        let d = mail_core::crypto::sha256(given.as_bytes());
        aws_lc_rs::constant_time::verify_slices_are_equal(&d, &self.digest).is_ok()
    }

    /// The configured key, else the stored one, else a new one (stored and printed once).
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        if let Some(k) = &config.api_key {
            return Ok(Self::new(k.expose_secret()));
        }
        let path = config.data_dir.join("api.key");
        match std::fs::read_to_string(&path) {
            Ok(k) if !k.trim().is_empty() => return Ok(Self::new(k.trim())),
            Ok(_) => anyhow::bail!("POSTWIRE_API_KEY: {} is empty", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("POSTWIRE_API_KEY: cannot read {}", path.display()));
            }
        }
        let key = format!(
            "pwsm_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(mail_core::crypto::random_bytes::<32>())
        );
        write_new_private(&path, key.as_bytes())
            .with_context(|| format!("POSTWIRE_API_KEY: cannot write {}", path.display()))?;
        eprintln!(
            "site-mailer: generated the local API key (shown only now; stored in {}):\n{key}",
            path.display()
        );
        Ok(Self::new(&key))
    }
}

/// Creates a file readable by the owner only; refuses to overwrite.
fn write_new_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_only_the_key() {
        let k = super::LocalApiKey::new("0123456789abcdef");
        assert!(k.matches("0123456789abcdef"));
        assert!(!k.matches("0123456789abcdeF"));
        assert!(!k.matches(""));
        assert_eq!(format!("{k:?}"), "LocalApiKey([REDACTED])");
    }
}
