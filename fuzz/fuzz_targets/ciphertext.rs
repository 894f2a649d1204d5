//! The ciphertext decoder (`KeyRing::decrypt`, format version ‖ key-id ‖ nonce ‖
//! ciphertext+tag): arbitrary bytes never panic and never decrypt; a real ciphertext of the
//! fuzzer's plaintext decrypts back to it only under its own binding, and any single changed
//! byte of it is refused.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mail_core::crypto::{Binding, KeyRing};
use secrecy::ExposeSecret;

fn ring() -> &'static KeyRing {
    static RING: OnceLock<KeyRing> = OnceLock::new();
    RING.get_or_init(|| {
        // Two keys: the first encrypts, both decrypt (as during a key rotation).
        KeyRing::parse(
            "new:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=,old:Hx4dHBsaGRgXFhUUExIREA8ODQwLCgkIBwYFBAMCAQA=",
        )
        .expect("test keys")
    })
}

const BINDING: Binding<'static> = Binding {
    owner: "acme",
    column: "email_settings.password",
};

fuzz_target!(|data: &[u8]| {
    let ring = ring();
    // 1. arbitrary input as a ciphertext
    assert!(
        ring.decrypt(BINDING, data).is_err(),
        "random bytes decrypted: a forgery"
    );
    let _ = ring.decrypt_string(BINDING, data);
    let _ = ring.needs_rotation(data);

    // 2. the input as a plaintext: round trip, binding, tampering
    let ct = ring.encrypt(BINDING, data);
    let plain = ring.decrypt(BINDING, &ct).expect("own ciphertext decrypts");
    assert_eq!(plain.expose_secret(), data);
    assert!(!ring.needs_rotation(&ct));
    let other = Binding {
        owner: "globex",
        column: "email_settings.password",
    };
    assert!(
        ring.decrypt(other, &ct).is_err(),
        "a ciphertext moved to another tenant decrypted"
    );
    if !data.is_empty() {
        let i = usize::from(data[0]) * 7919 % ct.len();
        let mut tampered = ct.clone();
        tampered[i] ^= 1 << (data[data.len() - 1] % 8);
        assert!(
            ring.decrypt(BINDING, &tampered).is_err(),
            "a ciphertext with byte {i} changed decrypted"
        );
    }
});
