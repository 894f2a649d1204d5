//! Data Protection: AES-256-GCM encryption of stored secrets (aws-lc-rs).
//!
//! Ciphertext layout: `version (1) ‖ key-id length (1) ‖ key-id ‖ nonce (12) ‖ ciphertext+tag`.
//! The AAD binds a ciphertext to where it lives (tenant and column), so a value copied into
//! another row does not decrypt. Several keys may be configured: the first encrypts, all
//! decrypt, and [`KeyRing::needs_rotation`] tells which values a `rotate-keys` run rewrites.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use secrecy::{ExposeSecret, SecretBox, SecretSlice};

const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("no key given")]
    Empty,
    #[error("key {index}: not standard padded base64")]
    Base64 { index: usize },
    #[error("key {index}: must be 32 bytes after base64 decoding, got {len}")]
    Length { index: usize, len: usize },
    #[error("key {index}: the key id must be 1 to 32 characters of [A-Za-z0-9_.-]")]
    BadId { index: usize },
    #[error("key id {0:?} is given twice")]
    DuplicateId(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecryptError {
    #[error("ciphertext is malformed")]
    Malformed,
    #[error("ciphertext was made with key {0:?}, which is not configured")]
    UnknownKey(String),
    #[error("ciphertext does not decrypt: wrong key or it belongs to another row")]
    Forged,
}

struct Key {
    id: String,
    key: LessSafeKey,
}

/// The configured Data Protection keys. The first one encrypts; every one decrypts.
pub struct KeyRing {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("KeyRing").field("key_ids", &ids).finish()
    }
}

/// Where a ciphertext lives; becomes the AAD.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// Row owner, e.g. the tenant id (or `_cluster`).
    pub owner: &'a str,
    /// Column, e.g. `email_settings.password`.
    pub column: &'a str,
}

impl Binding<'_> {
    fn aad(&self) -> Vec<u8> {
        // Length-prefixed so that ("a|b", "c") and ("a", "b|c") never collide.
        let mut out = Vec::with_capacity(16 + self.owner.len() + self.column.len());
        out.extend_from_slice(b"postwire-dp-v1");
        for part in [self.owner, self.column] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out
    }
}

/// A 32-byte secret key, decoded from standard padded base64.
pub fn decode_key(b64: &str) -> Result<SecretSlice<u8>, usize> {
    let bytes = B64.decode(b64.trim()).map_err(|_| 0usize)?;
    if bytes.len() != 32 {
        return Err(bytes.len());
    }
    Ok(SecretSlice::from(bytes))
}

/// 32 random bytes, as standard padded base64: a fresh key.
pub fn generate_key_b64() -> String {
    B64.encode(random_bytes::<32>())
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    // The system RNG failing is not something a caller can recover from.
    #[allow(clippy::expect_used)]
    aws_lc_rs::rand::fill(&mut out).expect("system random number generator failed");
    out
}

/// SHA-256 of the input.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl KeyRing {
    /// Parses `base64` or `id:base64,id:base64,...` (the first encrypts).
    pub fn parse(spec: &str) -> Result<Self, KeyError> {
        let mut keys: Vec<Key> = Vec::new();
        for (index, part) in spec.split(',').map(str::trim).enumerate() {
            if part.is_empty() {
                continue;
            }
            let (id, b64) = match part.split_once(':') {
                Some((id, b64)) => {
                    let ok = !id.is_empty()
                        && id.len() <= 32
                        && id
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
                    if !ok {
                        return Err(KeyError::BadId { index });
                    }
                    (Some(id.to_owned()), b64)
                }
                None => (None, part),
            };
            let raw = match decode_key(b64) {
                Ok(raw) => raw,
                Err(0) => return Err(KeyError::Base64 { index }),
                Err(len) => return Err(KeyError::Length { index, len }),
            };
            // Without an explicit id, the id is derived from the key itself, so that
            // the same key always carries the same id.
            let id = id.unwrap_or_else(|| {
                let h = sha256(raw.expose_secret());
                format!("k{:02x}{:02x}{:02x}{:02x}", h[0], h[1], h[2], h[3])
            });
            if keys.iter().any(|k| k.id == id) {
                return Err(KeyError::DuplicateId(id));
            }
            let unbound = UnboundKey::new(&AES_256_GCM, raw.expose_secret())
                .map_err(|_| KeyError::Length { index, len: 0 })?;
            keys.push(Key {
                id,
                key: LessSafeKey::new(unbound),
            });
        }
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self { keys })
    }

    pub fn primary_id(&self) -> &str {
        &self.keys[0].id
    }

    pub fn encrypt(&self, binding: Binding<'_>, plaintext: &[u8]) -> Vec<u8> {
        let key = &self.keys[0];
        let nonce_bytes = random_bytes::<NONCE_LEN>();
        let nonce = Nonce::assume_unique_for_key(nonce_bytes);
        let mut body = plaintext.to_vec();
        // Sealing only fails for inputs larger than GCM allows (64 GiB).
        #[allow(clippy::expect_used)]
        key.key
            .seal_in_place_append_tag(nonce, Aad::from(binding.aad()), &mut body)
            .expect("AES-GCM seal failed");
        let mut out = Vec::with_capacity(2 + key.id.len() + NONCE_LEN + body.len());
        out.push(VERSION);
        out.push(key.id.len() as u8);
        out.extend_from_slice(key.id.as_bytes());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&body);
        out
    }

    pub fn decrypt(
        &self,
        binding: Binding<'_>,
        ciphertext: &[u8],
    ) -> Result<SecretSlice<u8>, DecryptError> {
        let parsed = Parsed::from(ciphertext)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id.as_bytes() == parsed.key_id)
            .ok_or_else(|| {
                DecryptError::UnknownKey(String::from_utf8_lossy(parsed.key_id).into_owned())
            })?;
        let nonce =
            Nonce::try_assume_unique_for_key(parsed.nonce).map_err(|_| DecryptError::Malformed)?;
        let mut body = parsed.body.to_vec();
        let plain_len = key
            .key
            .open_in_place(nonce, Aad::from(binding.aad()), &mut body)
            .map_err(|_| DecryptError::Forged)?
            .len();
        body.truncate(plain_len);
        Ok(SecretSlice::from(body))
    }

    /// Decrypts a UTF-8 secret.
    pub fn decrypt_string(
        &self,
        binding: Binding<'_>,
        ciphertext: &[u8],
    ) -> Result<secrecy::SecretString, DecryptError> {
        let bytes = self.decrypt(binding, ciphertext)?;
        let s = std::str::from_utf8(bytes.expose_secret()).map_err(|_| DecryptError::Malformed)?;
        Ok(secrecy::SecretString::from(s.to_owned()))
    }

    /// True when the ciphertext was not made with the primary key.
    pub fn needs_rotation(&self, ciphertext: &[u8]) -> bool {
        match Parsed::from(ciphertext) {
            Ok(p) => p.key_id != self.keys[0].id.as_bytes(),
            Err(_) => false,
        }
    }
}

struct Parsed<'a> {
    key_id: &'a [u8],
    nonce: &'a [u8],
    body: &'a [u8],
}

impl<'a> Parsed<'a> {
    fn from(ct: &'a [u8]) -> Result<Self, DecryptError> {
        let (&version, rest) = ct.split_first().ok_or(DecryptError::Malformed)?;
        if version != VERSION {
            return Err(DecryptError::Malformed);
        }
        let (&id_len, rest) = rest.split_first().ok_or(DecryptError::Malformed)?;
        let id_len = id_len as usize;
        if id_len == 0 || rest.len() < id_len + NONCE_LEN + 16 {
            return Err(DecryptError::Malformed);
        }
        let (key_id, rest) = rest.split_at(id_len);
        let (nonce, body) = rest.split_at(NONCE_LEN);
        Ok(Self {
            key_id,
            nonce,
            body,
        })
    }
}

/// A secret that is kept out of `Debug` output; alias for readability at use sites.
pub type SecretBytes = SecretBox<[u8]>;

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec: &str) -> KeyRing {
        KeyRing::parse(spec).unwrap()
    }

    const A: Binding<'static> = Binding {
        owner: "acme",
        column: "email_settings.password",
    };

    #[test]
    fn round_trip_and_binding() {
        let k = generate_key_b64();
        let r = ring(&k);
        let ct = r.encrypt(A, b"hunter2");
        assert!(!ct.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(r.decrypt(A, &ct).unwrap().expose_secret(), b"hunter2");
        let other_tenant = Binding {
            owner: "other",
            ..A
        };
        assert_eq!(
            r.decrypt(other_tenant, &ct).unwrap_err(),
            DecryptError::Forged
        );
        let other_column = Binding {
            column: "email_settings.client_secret",
            ..A
        };
        assert_eq!(
            r.decrypt(other_column, &ct).unwrap_err(),
            DecryptError::Forged
        );
    }

    #[test]
    fn tampering_is_detected() {
        let r = ring(&generate_key_b64());
        let mut ct = r.encrypt(A, b"secret");
        let last = ct.len() - 1;
        ct[last] ^= 1;
        assert_eq!(r.decrypt(A, &ct).unwrap_err(), DecryptError::Forged);
        assert_eq!(r.decrypt(A, &ct[..5]).unwrap_err(), DecryptError::Malformed);
        assert_eq!(r.decrypt(A, &[]).unwrap_err(), DecryptError::Malformed);
    }

    #[test]
    fn rotation_first_key_encrypts_all_decrypt() {
        let (old, new) = (generate_key_b64(), generate_key_b64());
        let before = ring(&format!("old:{old}"));
        let ct = before.encrypt(A, b"x");
        let after = ring(&format!("new:{new},old:{old}"));
        assert!(after.needs_rotation(&ct));
        assert_eq!(after.decrypt(A, &ct).unwrap().expose_secret(), b"x");
        let ct2 = after.encrypt(A, b"x");
        assert!(!after.needs_rotation(&ct2));
        let only_new = ring(&format!("new:{new}"));
        assert_eq!(
            only_new.decrypt(A, &ct).unwrap_err(),
            DecryptError::UnknownKey("old".into())
        );
    }

    #[test]
    fn bad_key_specs_are_refused() {
        assert_eq!(KeyRing::parse("").unwrap_err(), KeyError::Empty);
        assert_eq!(
            KeyRing::parse("not base64!").unwrap_err(),
            KeyError::Base64 { index: 0 }
        );
        assert_eq!(
            KeyRing::parse("c2hvcnQ=").unwrap_err(),
            KeyError::Length { index: 0, len: 5 }
        );
        let k = generate_key_b64();
        assert_eq!(
            KeyRing::parse(&format!("a:{k},a:{k}")).unwrap_err(),
            KeyError::DuplicateId("a".into())
        );
        assert_eq!(
            KeyRing::parse(&format!("bad id:{k}")).unwrap_err(),
            KeyError::BadId { index: 0 }
        );
    }

    #[test]
    fn implicit_key_id_is_stable() {
        let k = generate_key_b64();
        assert_eq!(ring(&k).primary_id(), ring(&k).primary_id());
    }
}
