//! ID-token username extraction: the ID token's claims read as the Management Service reads
//! them when no signing keys are known (`unverified_id_claims`), then the username it copies
//! to `auth.authorization_username` (`IdClaims::username`).
//!
//! The input is used twice: as the whole token text, and as the JSON payload of a token
//! (`header.base64url(input).signature`), so the fuzzer reaches the claim parsing directly.
//! Whatever the claims, the username is an address that parses again to itself, carries no
//! control characters (it ends up in SMTP AUTH and From: headers), and is one of the claims.

#![no_main]

use libfuzzer_sys::fuzz_target;
use management::oauth::provider::{IdClaims, unverified_id_claims};

fn check(claims: &IdClaims) {
    let Some(user) = claims.username() else {
        return;
    };
    let u = user.as_str();
    assert!(
        !u.chars().any(char::is_control),
        "control characters in {u:?}"
    );
    let again = mail_core::domain::EmailAddress::parse(u).expect("the username parses again");
    assert_eq!(again.as_str(), u);
    assert!(
        [&claims.preferred_username, &claims.email, &claims.upn]
            .into_iter()
            .flatten()
            .any(|c| c.trim() == u || c == u),
        "{u:?} is none of the claims"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(claims) = unverified_id_claims(text)
    {
        check(&claims);
    }
    let token = format!("eyJhbGciOiJSUzI1NiJ9.{}.c2ln", b64url(data));
    if let Ok(claims) = unverified_id_claims(&token) {
        check(&claims);
    }
});

fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len() * 4 / 3 + 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
