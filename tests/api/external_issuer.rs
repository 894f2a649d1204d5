//! Tokens of an external identity provider (public key as PEM, algorithms pinned, `iss` and
//! `aud` checked) are accepted beside the instance key, and cannot be confused with it.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use postwire_tests::{Backend, Setup};
use serde_json::{Value, json};

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn claims(iss: &str, aud: &str, role: &str, tenant: Option<&str>) -> Value {
    let now = chrono::Utc::now().timestamp();
    let mut c = json!({"sub": "alice@idp", "role": role, "iss": iss, "aud": aud, "iat": now, "exp": now + 600});
    if let Some(t) = tenant {
        c["tenant"] = json!(t);
    }
    c
}

#[tokio::test]
async fn external_es256_issuer() {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let spki = pair.public_key().as_der().unwrap();
    let mut setup = Setup::new(Backend::Sqlite).await;
    let key_file = setup.data_dir.join("idp.pem");
    std::fs::write(&key_file, pem("PUBLIC KEY", spki.as_ref())).unwrap();
    setup
        .env
        .insert("POSTWIRE_JWT_ISSUER".into(), "https://idp.example".into());
    setup
        .env
        .insert("POSTWIRE_JWT_AUDIENCE".into(), "postwire-api".into());
    setup.env.insert(
        "POSTWIRE_JWT_PUBLIC_KEY_FILE".into(),
        key_file.to_string_lossy().into_owned(),
    );
    setup
        .env
        .insert("POSTWIRE_JWT_ALGORITHMS".into(), "ES256".into());
    let app = setup.spawn().await;
    app.create_tenant("acme").await;

    let key = EncodingKey::from_ec_der(pkcs8.as_ref());
    let sign = |c: &Value| jsonwebtoken::encode(&Header::new(Algorithm::ES256), c, &key).unwrap();

    let ok = sign(&claims(
        "https://idp.example",
        "postwire-api",
        "tenant_admin",
        Some("acme"),
    ));
    assert_eq!(app.get("/api/v1/tenants/acme/sites", &ok).await.status, 200);
    let other = sign(&claims(
        "https://idp.example",
        "postwire-api",
        "tenant_admin",
        Some("other"),
    ));
    assert_eq!(
        app.get("/api/v1/tenants/acme/sites", &other).await.status,
        404
    );
    for (what, bad) in [
        (
            "wrong iss",
            sign(&claims(
                "https://evil.example",
                "postwire-api",
                "cluster_admin",
                None,
            )),
        ),
        (
            "wrong aud",
            sign(&claims(
                "https://idp.example",
                "postwire",
                "cluster_admin",
                None,
            )),
        ),
        // the instance's own audience is not enough for an external token, and an HS256 token
        // claiming the external issuer is checked against the instance key only
        (
            "HS256 claiming the external issuer",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims("https://idp.example", "postwire-api", "cluster_admin", None),
                &EncodingKey::from_secret(b"guessed-secret-guessed-secret-guessed").unwrap(),
            )
            .unwrap(),
        ),
    ] {
        let r = app.get("/api/v1/tenants", &bad).await;
        assert_eq!(r.status, 401, "{what}: {}", r.text);
    }
    // instance tokens keep working beside the external issuer
    assert_eq!(
        app.get("/api/v1/tenants", &app.cluster_token())
            .await
            .status,
        200
    );
}
