//! The access-token cache shared by the Management Service and the sites.
//!
//! Values are encrypted with AES-256-GCM under a per-tenant key derived (HKDF-SHA256) from the
//! root cache key and the tenant id, with the Redis key as AAD. A site receives only its own
//! tenant's derived key, so it can neither read nor forge another tenant's entry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretSlice};
use serde::{Deserialize, Serialize};

use crate::crypto::random_bytes;
use crate::secret::WireSecret;

const SALT: &[u8] = b"postwire-token-cache-v1";

/// An access token as cached.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CachedToken {
    pub access_token: WireSecret,
    pub expires_at: DateTime<Utc>,
    pub issued_at: DateTime<Utc>,
    /// The user the token belongs to (the XOAUTH2 user).
    pub username: Option<String>,
}

impl CachedToken {
    /// Seconds left at `now`.
    pub fn remaining(&self, now: DateTime<Utc>) -> i64 {
        (self.expires_at - now).num_seconds()
    }
    /// The validity a caller may ask for by default: min(5 min, half the lifetime).
    pub fn default_min_validity(&self) -> i64 {
        let lifetime = (self.expires_at - self.issued_at).num_seconds().max(0);
        (lifetime / 2).min(300)
    }
}

/// The Redis key of a tenant's access token.
pub fn redis_key(tenant: &str) -> String {
    format!("postwire:v1:token:{tenant}")
}

/// The tenant's cache key, derived from the root key.
pub fn derive_tenant_key(root: &SecretSlice<u8>, tenant: &str) -> SecretSlice<u8> {
    struct Len32;
    impl hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT);
    let prk = salt.extract(root.expose_secret());
    let info = [tenant.as_bytes()];
    let mut out = vec![0u8; 32];
    // HKDF-SHA256 can always produce 32 bytes.
    #[allow(clippy::expect_used)]
    prk.expand(&info, Len32)
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF expand of 32 bytes");
    SecretSlice::from(out)
}

fn aead_key(key: &SecretSlice<u8>) -> Option<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, key.expose_secret())
        .ok()
        .map(LessSafeKey::new)
}

/// Encrypts a cache value: nonce ‖ ciphertext+tag, AAD = the Redis key.
pub fn seal(key: &SecretSlice<u8>, redis_key: &str, token: &CachedToken) -> Option<Vec<u8>> {
    let k = aead_key(key)?;
    let mut body = serde_json::to_vec(token).ok()?;
    let nonce_bytes = random_bytes::<NONCE_LEN>();
    k.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce_bytes),
        Aad::from(redis_key.as_bytes()),
        &mut body,
    )
    .ok()?;
    let mut out = nonce_bytes.to_vec();
    out.extend_from_slice(&body);
    Some(out)
}

/// Decrypts a cache value; `None` for anything that does not authenticate.
pub fn open(key: &SecretSlice<u8>, redis_key: &str, value: &[u8]) -> Option<CachedToken> {
    if value.len() < NONCE_LEN + 16 {
        return None;
    }
    let k = aead_key(key)?;
    let (nonce, body) = value.split_at(NONCE_LEN);
    let mut body = body.to_vec();
    let plain = k
        .open_in_place(
            Nonce::try_assume_unique_for_key(nonce).ok()?,
            Aad::from(redis_key.as_bytes()),
            &mut body,
        )
        .ok()?;
    serde_json::from_slice(plain).ok()
}

/// The shared layer: Redis, with short timeouts. Every failure is reported, never fatal:
/// callers fall back to their other sources.
#[derive(Clone)]
pub struct RedisTokenCache {
    conn: redis::aio::ConnectionManager,
}

impl RedisTokenCache {
    /// Connects lazily: a Redis that is down at start-up is retried by the connection manager.
    pub async fn connect(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("REDIS_URL: {e}"))?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, cfg)
            .map_err(|e| format!("REDIS_URL: {e}"))?;
        Ok(Self { conn })
    }

    pub async fn get(
        &self,
        key: &SecretSlice<u8>,
        tenant: &str,
    ) -> Result<Option<CachedToken>, String> {
        let rk = redis_key(tenant);
        let mut c = self.conn.clone();
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&rk)
            .query_async(&mut c)
            .await
            .map_err(|e| e.to_string())?;
        Ok(v.and_then(|v| open(key, &rk, &v)))
    }

    pub async fn put(
        &self,
        key: &SecretSlice<u8>,
        tenant: &str,
        token: &CachedToken,
        now: DateTime<Utc>,
    ) -> Result<(), String> {
        let ttl_ms = (token.expires_at - now).num_milliseconds();
        if ttl_ms <= 0 {
            return Ok(());
        }
        let rk = redis_key(tenant);
        let value = seal(key, &rk, token).ok_or("cannot seal the cache value")?;
        let mut c = self.conn.clone();
        redis::cmd("SET")
            .arg(&rk)
            .arg(value)
            .arg("PX")
            .arg(ttl_ms)
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| e.to_string())
    }

    pub async fn delete(&self, tenant: &str) -> Result<(), String> {
        let mut c = self.conn.clone();
        redis::cmd("DEL")
            .arg(redis_key(tenant))
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| e.to_string())
    }
}

/// The in-process layer: tenant → token, bounded by each token's expiry and, optionally, by
/// how long an entry may be trusted without asking the shared layers again (so a grant
/// forgotten on another replica stops being served within that time).
#[derive(Default)]
pub struct MemoryTokenCache {
    map: Mutex<HashMap<String, (CachedToken, std::time::Instant)>>,
    max_age: Option<Duration>,
}

impl MemoryTokenCache {
    pub fn with_max_age(max_age: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            max_age: Some(max_age),
        }
    }
    pub fn get(&self, tenant: &str, now: DateTime<Utc>) -> Option<CachedToken> {
        let mut m = self.map.lock().ok()?;
        match m.get(tenant) {
            Some((t, at))
                if t.expires_at > now && self.max_age.is_none_or(|max| at.elapsed() < max) =>
            {
                Some(t.clone())
            }
            Some(_) => {
                m.remove(tenant);
                None
            }
            None => None,
        }
    }
    pub fn put(&self, tenant: &str, token: CachedToken) {
        if let Ok(mut m) = self.map.lock() {
            m.insert(tenant.to_owned(), (token, std::time::Instant::now()));
        }
    }
    pub fn delete(&self, tenant: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> CachedToken {
        let now = Utc::now();
        CachedToken {
            access_token: WireSecret::new("at-123"),
            expires_at: now + chrono::Duration::seconds(3600),
            issued_at: now,
            username: Some("a@b.c".into()),
        }
    }

    #[test]
    fn per_tenant_keys_do_not_cross() {
        let root = SecretSlice::from(random_bytes::<32>().to_vec());
        let ka = derive_tenant_key(&root, "a");
        let kb = derive_tenant_key(&root, "b");
        assert_ne!(ka.expose_secret(), kb.expose_secret());
        assert_eq!(
            ka.expose_secret(),
            derive_tenant_key(&root, "a").expose_secret()
        );
        let v = seal(&ka, &redis_key("a"), &token()).unwrap();
        assert!(open(&ka, &redis_key("a"), &v).is_some());
        assert!(
            open(&kb, &redis_key("a"), &v).is_none(),
            "another tenant's key"
        );
        assert!(
            open(&ka, &redis_key("b"), &v).is_none(),
            "moved to another key"
        );
    }

    #[test]
    fn default_min_validity() {
        let t = token();
        assert_eq!(t.default_min_validity(), 300);
        let short = CachedToken {
            expires_at: t.issued_at + chrono::Duration::seconds(60),
            ..t
        };
        assert_eq!(short.default_min_validity(), 30);
    }
}
