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

fn jwk(pair: &EcdsaKeyPair, kid: &str) -> Value {
    let point = pair.public_key().as_ref(); // 0x04 ‖ X ‖ Y
    let b = |s: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
           "x": b(&point[1..33]), "y": b(&point[33..65])})
}

/// An external issuer whose keys come from a JWKS URL: tokens signed by a listed key (by
/// `kid`) are accepted, an unknown `kid` is refused, and a rotated key set is picked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_issuer_from_a_jwks_url() {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let new_key = || {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        (pkcs8.as_ref().to_vec(), pair)
    };
    let (k1_der, k1) = new_key();
    let (k2_der, k2) = new_key();
    let jwks = std::sync::Arc::new(std::sync::Mutex::new(json!({"keys": [jwk(&k1, "k1")]})));
    let served = jwks.clone();
    let server = actix_web::HttpServer::new(move || {
        let served = served.clone();
        actix_web::App::new().route(
            "/jwks",
            actix_web::web::get().to(move || {
                let body = served.lock().unwrap().clone();
                async move { actix_web::HttpResponse::Ok().json(body) }
            }),
        )
    })
    .workers(1)
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = server.addrs()[0];
    tokio::spawn(server.run());

    let mut setup = Setup::new(Backend::Sqlite).await;
    setup
        .env
        .insert("POSTWIRE_JWT_ISSUER".into(), "https://idp.example".into());
    setup.env.insert(
        "POSTWIRE_JWT_JWKS_URL".into(),
        format!("http://{addr}/jwks"),
    );
    setup
        .env
        .insert("POSTWIRE_JWT_ALGORITHMS".into(), "ES256".into());
    let app = setup.spawn().await;
    let sign = |der: &[u8], kid: &str| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(
            &h,
            &claims("https://idp.example", "postwire", "cluster_admin", None),
            &EncodingKey::from_ec_der(der),
        )
        .unwrap()
    };
    assert_eq!(
        app.get("/api/v1/tenants", &sign(&k1_der, "k1"))
            .await
            .status,
        200
    );
    assert_eq!(
        app.get("/api/v1/tenants", &sign(&k2_der, "k2"))
            .await
            .status,
        401,
        "unknown kid"
    );
    assert_eq!(
        app.get("/api/v1/tenants", &sign(&k2_der, "k1"))
            .await
            .status,
        401,
        "wrong key for the kid"
    );
    // the identity provider rotates its keys; a refresh picks the new set up
    *jwks.lock().unwrap() = json!({"keys": [jwk(&k2, "k2")]});
    let set: jsonwebtoken::jwk::JwkSet = app
        .state
        .grants
        .http()
        .get_json(&format!("http://{addr}/jwks"))
        .await
        .unwrap();
    assert_eq!(app.state.jwt.set_jwks(set), 1);
    assert_eq!(
        app.get("/api/v1/tenants", &sign(&k2_der, "k2"))
            .await
            .status,
        200
    );
    assert_eq!(
        app.get("/api/v1/tenants", &sign(&k1_der, "k1"))
            .await
            .status,
        401,
        "retired key"
    );
}
