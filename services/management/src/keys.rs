//! Key material: the Data Protection master key(s), the cache root key and the JWT secret.
//! Only the embedded SQLite default generates missing keys (into the data directory, with a
//! warning); on PostgreSQL start-up refuses without them.

use std::path::Path;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use mail_core::crypto::{self, KeyRing};
use secrecy::{ExposeSecret, SecretSlice, SecretString};

use crate::config::Config;

pub struct Keys {
    pub master: KeyRing,
    pub cache_root: SecretSlice<u8>,
    pub jwt_secret: SecretSlice<u8>,
}

impl Keys {
    pub fn load(config: &Config) -> anyhow::Result<Self> {
        let generate = config.is_sqlite();
        let master = resolve(
            config,
            generate,
            &config.master_key,
            "POSTWIRE_MASTER_KEY",
            "master.key",
        )?;
        let master = KeyRing::parse(master.expose_secret())
            .map_err(|e| anyhow::anyhow!("POSTWIRE_MASTER_KEY: {e}"))?;
        let cache = resolve(
            config,
            generate,
            &config.cache_key,
            "POSTWIRE_CACHE_KEY",
            "cache.key",
        )?;
        let cache_root = crypto::decode_key(cache.expose_secret()).map_err(|len| {
            anyhow::anyhow!(
                "POSTWIRE_CACHE_KEY: must be 32 bytes of standard padded base64 (got {len} bytes)"
            )
        })?;
        let jwt = resolve(
            config,
            generate,
            &config.jwt_secret,
            "POSTWIRE_JWT_SECRET",
            "jwt.secret",
        )?;
        let jwt_bytes = B64
            .decode(jwt.expose_secret().trim())
            .map_err(|_| anyhow::anyhow!("POSTWIRE_JWT_SECRET: must be standard padded base64"))?;
        if jwt_bytes.len() < 32 {
            anyhow::bail!(
                "POSTWIRE_JWT_SECRET: must decode to at least 32 bytes, got {}",
                jwt_bytes.len()
            );
        }
        Ok(Self {
            master,
            cache_root,
            jwt_secret: SecretSlice::from(jwt_bytes),
        })
    }
}

fn resolve(
    config: &Config,
    generate: bool,
    given: &Option<SecretString>,
    setting: &str,
    file: &str,
) -> anyhow::Result<SecretString> {
    if let Some(v) = given {
        return Ok(v.clone());
    }
    if !generate {
        anyhow::bail!(
            "{setting} (or {setting}_FILE) must be set when DATABASE_URL is PostgreSQL: keys are generated only for the embedded SQLite default, and replicas must share them"
        );
    }
    let path = config.data_dir.join(file);
    read_or_create(&path, setting)
}

fn read_or_create(path: &Path, setting: &str) -> anyhow::Result<SecretString> {
    if path.exists() {
        let v = std::fs::read_to_string(path)
            .with_context(|| format!("{setting}: cannot read {}", path.display()))?;
        return Ok(SecretString::from(v.trim().to_owned()));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("POSTWIRE_DATA_DIR: cannot create {}", dir.display()))?;
    }
    let key = crypto::generate_key_b64();
    write_private(path, &key)
        .with_context(|| format!("{setting}: cannot write {}", path.display()))?;
    tracing::warn!(
        setting,
        path = %path.display(),
        "generated a new key for the embedded default; back it up, and set {setting} explicitly in production"
    );
    Ok(SecretString::from(key))
}

#[cfg(unix)]
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    std::fs::write(path, content)
}
