//! Encryption at rest of the local state (`local_state` values: the effective configuration
//! with the SMTP password, cached access tokens): AES-256-GCM (mail-core `crypto`) under a
//! key derived with HKDF-SHA256 from the site secret, bound to the site and the state key.
//! A stolen state directory without the site secret reveals no credential; a changed site
//! secret makes the old values unreadable, and they are fetched again.

use aws_lc_rs::hkdf;
use base64::Engine as _;
use mail_core::crypto::{Binding, KeyRing};
use secrecy::{ExposeSecret as _, SecretString};

const SALT: &[u8] = b"postwire-site-state-v1";
/// Prefix of a sealed value (`enc:v1:` + base64 of the ciphertext).
const PREFIX: &str = "enc:v1:";

pub struct StateCipher {
    ring: KeyRing,
    site_id: String,
}

impl std::fmt::Debug for StateCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCipher")
            .field("site_id", &self.site_id)
            .finish_non_exhaustive()
    }
}

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        32
    }
}

impl StateCipher {
    /// The cipher of `site_id`, keyed by its secret.
    pub fn from_site_secret(site_id: &str, secret: &SecretString) -> Result<Self, String> {
        let prk =
            hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret.expose_secret().as_bytes());
        let info = [site_id.as_bytes()];
        let mut key = [0u8; 32];
        prk.expand(&info, Len32)
            .and_then(|okm| okm.fill(&mut key))
            .map_err(|_| "HKDF expand failed".to_owned())?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        key.fill(0);
        let ring = KeyRing::parse(&format!("site:{b64}")).map_err(|e| e.to_string())?;
        Ok(StateCipher {
            ring,
            site_id: site_id.to_owned(),
        })
    }

    fn binding<'a>(&'a self, key: &'a str) -> Binding<'a> {
        Binding {
            owner: &self.site_id,
            column: key,
        }
    }

    /// Whether a stored value is sealed (older versions stored plain JSON).
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(PREFIX)
    }

    /// Seals the value of state `key`.
    pub fn seal(&self, key: &str, plain: &str) -> String {
        let ct = self.ring.encrypt(self.binding(key), plain.as_bytes());
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(ct)
        )
    }

    /// Opens a sealed value of state `key`.
    pub fn open(&self, key: &str, stored: &str) -> Result<String, String> {
        let b64 = stored
            .strip_prefix(PREFIX)
            .ok_or("the value is not sealed")?;
        let ct = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| "the sealed value is not base64")?;
        let plain = self
            .ring
            .decrypt_string(self.binding(key), &ct)
            .map_err(|e| format!("cannot decrypt (another site secret?): {e}"))?;
        Ok(plain.expose_secret().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_binds_to_the_site_the_key_and_the_secret() {
        let secret = SecretString::from("site-secret-value".to_owned());
        let c = StateCipher::from_site_secret("site-1", &secret).unwrap();
        let sealed = c.seal("effective_config", r#"{"password":"hunter2"}"#);
        assert!(StateCipher::is_sealed(&sealed));
        assert!(!sealed.contains("hunter2"));
        assert_eq!(
            c.open("effective_config", &sealed).unwrap(),
            r#"{"password":"hunter2"}"#
        );
        assert_ne!(
            c.seal("k", "v"),
            c.seal("k", "v"),
            "a fresh nonce each time"
        );
        assert!(
            c.open("smtp_access_token:acme", &sealed).is_err(),
            "bound to the key"
        );
        let other_site = StateCipher::from_site_secret("site-2", &secret).unwrap();
        assert!(other_site.open("effective_config", &sealed).is_err());
        let other_secret =
            StateCipher::from_site_secret("site-1", &SecretString::from("rotated".to_owned()))
                .unwrap();
        assert!(other_secret.open("effective_config", &sealed).is_err());
    }
}
