//! The test peers (tests/peers) really behave as the end-to-end tests assume: a strict
//! OAuth server (PKCE, single-use codes, refresh-token rotation, revocation, injected
//! failures) and an SMTP server that greets, advertises AUTH, verifies XOAUTH2 tokens against
//! the OAuth server's JWKS and records what it accepts.

use postwire_tests::peers::{
    OAuthPeer, SmtpPeer, SmtpPeerOptions, SmtpStage, SmtpTls, Xoauth2Failure, peer_http_client,
    pkce_pair,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

const CLIENT_ID: &str = "postwire-selftest";
const REDIRECT_URI: &str = "http://127.0.0.1:9/oauth/callback";

/// The query parameters of a redirect's `Location`.
fn redirect_params(r: &reqwest::Response) -> Vec<(String, String)> {
    assert_eq!(r.status(), 302, "expected a redirect");
    let location = r
        .headers()
        .get(reqwest::header::LOCATION)
        .expect("Location")
        .to_str()
        .unwrap();
    assert!(location.starts_with(REDIRECT_URI), "{location}");
    url::Url::parse(location)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn authorize(
    client: &reqwest::Client,
    peer: &OAuthPeer,
    challenge: Option<&str>,
    nonce: &str,
) -> reqwest::Response {
    let mut q = vec![
        ("response_type", "code"),
        ("client_id", CLIENT_ID),
        ("redirect_uri", REDIRECT_URI),
        (
            "scope",
            "openid offline_access https://outlook.office.com/SMTP.Send",
        ),
        ("state", "st-42"),
        ("nonce", nonce),
    ];
    if let Some(c) = challenge {
        q.extend([("code_challenge", c), ("code_challenge_method", "S256")]);
    }
    client
        .get(peer.authorize_url())
        .query(&q)
        .send()
        .await
        .unwrap()
}

async fn token(client: &reqwest::Client, peer: &OAuthPeer, form: &[(&str, &str)]) -> (u16, Value) {
    let r = client
        .post(peer.token_url())
        .form(form)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body = r.json().await.unwrap();
    (status, body)
}

async fn refresh(client: &reqwest::Client, peer: &OAuthPeer, rt: &str) -> (u16, Value) {
    token(
        client,
        peer,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", rt),
            ("client_id", CLIENT_ID),
        ],
    )
    .await
}

/// Verifies an RS256 JWT against the peer's JWKS; returns its claims.
async fn verify_jwt(client: &reqwest::Client, peer: &OAuthPeer, jwt: &str, aud: &str) -> Value {
    let jwks: jsonwebtoken::jwk::JwkSet = client
        .get(peer.jwks_url())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    let jwk = jwks
        .find(header.kid.as_deref().expect("kid"))
        .expect("the signing key is in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_audience(&[aud]);
    validation.set_issuer(&[peer.issuer()]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .unwrap()
        .claims
}

#[tokio::test]
async fn oauth_peer_code_flow_with_pkce_and_refresh_rotation() {
    let peer = OAuthPeer::start().await;
    assert!(peer.issuer().starts_with("http://127.0.0.1:"));
    let client = peer_http_client();

    // Authorization request with PKCE S256: redirected at once with code + state.
    let (verifier, challenge) = pkce_pair();
    let r = authorize(&client, &peer, Some(&challenge), "n-0S6_WzA2Mj").await;
    let params = redirect_params(&r);
    assert_eq!(param(&params, "state"), Some("st-42"));
    let code = param(&params, "code").expect("code").to_owned();

    // A wrong verifier is refused (and spends the code); the right one gets tokens.
    let (status, body) = token(
        &client,
        &peer,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("client_id", CLIENT_ID),
            ("redirect_uri", REDIRECT_URI),
            ("code_verifier", &pkce_pair().0),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );

    // (the code above was spent by the failed attempt: get a new one)
    let r = authorize(&client, &peer, Some(&challenge), "n-0S6_WzA2Mj").await;
    let code = param(&redirect_params(&r), "code").unwrap().to_owned();
    let exchange = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("client_id", CLIENT_ID),
        ("redirect_uri", REDIRECT_URI),
        ("code_verifier", verifier.as_str()),
    ];
    let (status, tokens) = token(&client, &peer, &exchange).await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 3600);
    let access = verify_jwt(
        &client,
        &peer,
        tokens["access_token"].as_str().unwrap(),
        "https://smtp.postwire.test",
    )
    .await;
    assert_eq!(access["preferred_username"], "sender@tenant.example");
    assert_eq!(access["email"], "sender@tenant.example");
    let id = verify_jwt(
        &client,
        &peer,
        tokens["id_token"].as_str().unwrap(),
        CLIENT_ID,
    )
    .await;
    assert_eq!(id["nonce"], "n-0S6_WzA2Mj");
    assert_eq!(id["preferred_username"], "sender@tenant.example");

    // Codes are single use.
    let (status, body) = token(&client, &peer, &exchange).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );

    // Refresh rotates: a new refresh token, the old one is spent.
    let rt1 = tokens["refresh_token"].as_str().unwrap().to_owned();
    let (status, refreshed) = refresh(&client, &peer, &rt1).await;
    assert_eq!(status, 200, "{refreshed}");
    let rt2 = refreshed["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rt1, rt2);
    assert_ne!(refreshed["access_token"], tokens["access_token"]);
    let (status, body) = refresh(&client, &peer, &rt1).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );
    let (status, body) = refresh(&client, &peer, "never-issued").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );

    // Revocation: the live refresh token is dead too.
    assert_eq!(peer.revoke_all().await, 1);
    let (status, body) = refresh(&client, &peer, &rt2).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );

    let calls = peer.token_calls().await;
    assert_eq!(
        (calls.authorization_code, calls.refresh_token, calls.total),
        (3, 4, 7)
    );
}

#[tokio::test]
async fn oauth_peer_controls() {
    let peer = OAuthPeer::start().await;
    let client = peer_http_client();

    // No PKCE, no code.
    let r = authorize(&client, &peer, None, "n").await;
    assert_eq!(
        param(&redirect_params(&r), "error"),
        Some("invalid_request")
    );

    // Denied consent.
    peer.deny_next_authorize().await;
    let (_, challenge) = pkce_pair();
    let r = authorize(&client, &peer, Some(&challenge), "n").await;
    let params = redirect_params(&r);
    assert_eq!(param(&params, "error"), Some("access_denied"));
    assert_eq!(param(&params, "state"), Some("st-42"));
    assert_eq!(param(&params, "code"), None);

    // Lifetime as a string (Microsoft style), and the JWT's exp follows it.
    peer.set_expires_in(5, true).await;
    let tokens = peer.issue_tokens(CLIENT_ID, "openid offline_access").await;
    assert_eq!(tokens["expires_in"], "5");
    let access = verify_jwt(
        &client,
        &peer,
        tokens["access_token"].as_str().unwrap(),
        "https://smtp.postwire.test",
    )
    .await;
    assert_eq!(
        access["exp"].as_i64().unwrap() - access["iat"].as_i64().unwrap(),
        5
    );

    // Injected 503s for the next call only; the refresh token survives them.
    peer.fail_token_endpoint(1).await;
    let rt = tokens["refresh_token"].as_str().unwrap();
    let (status, body) = refresh(&client, &peer, rt).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("temporarily_unavailable"))
    );
    let (status, body) = refresh(&client, &peer, rt).await;
    assert_eq!(status, 200, "{body}");
    let calls = peer.token_calls().await;
    assert_eq!((calls.refresh_token, calls.failures_injected), (2, 1));
}

/// Reads one SMTP reply (all its lines).
async fn reply(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), r.read_line(&mut line))
            .await
            .expect("SMTP reply in time")
            .unwrap();
        assert!(n > 0, "connection closed; so far {lines:?}");
        let line = line.trim_end().to_owned();
        let last = line.as_bytes().get(3) != Some(&b'-');
        lines.push(line);
        if last {
            return lines;
        }
    }
}

async fn command(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    line: &str,
) -> Vec<String> {
    w.write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
    reply(r).await
}

#[tokio::test]
async fn smtp_peer_greets_and_advertises_auth() {
    let peer = SmtpPeer::start(SmtpPeerOptions::default().with_user("alice", "pw")).await;
    assert!(
        std::fs::read_to_string(peer.cert_pem_path())
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let (r, mut w) = TcpStream::connect(("127.0.0.1", peer.port()))
        .await
        .unwrap()
        .into_split();
    let mut r = BufReader::new(r);
    let greeting = reply(&mut r).await;
    assert!(greeting[0].starts_with("220 "), "{greeting:?}");
    let ehlo = command(&mut r, &mut w, "EHLO client.example").await;
    assert!(ehlo.iter().all(|l| l.starts_with("250")), "{ehlo:?}");
    assert!(
        ehlo.iter().any(|l| l.get(4..) == Some("STARTTLS")),
        "{ehlo:?}"
    );
    let auth = ehlo
        .iter()
        .find(|l| l.get(4..).is_some_and(|c| c.starts_with("AUTH ")))
        .expect("AUTH");
    for m in ["PLAIN", "LOGIN", "XOAUTH2"] {
        assert!(auth.split(' ').any(|w| w == m), "{auth}");
    }
    // STARTTLS first: no AUTH in plain text (538, RFC 4954 "encryption required").
    let refused = command(&mut r, &mut w, "AUTH PLAIN AGFsaWNlAHB3").await;
    assert!(refused[0].starts_with("538"), "{refused:?}");
    let bye = command(&mut r, &mut w, "QUIT").await;
    assert!(bye[0].starts_with("221"), "{bye:?}");
    assert!(peer.messages().await.is_empty());
}

#[tokio::test]
async fn smtp_peer_verifies_xoauth2_and_records_messages() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let oauth = OAuthPeer::start().await;
    let peer = SmtpPeer::start(SmtpPeerOptions {
        tls: SmtpTls::None,
        ..SmtpPeerOptions::default().trusting(&oauth)
    })
    .await;
    let tokens = oauth.issue_tokens(CLIENT_ID, "openid offline_access").await;
    let xoauth2 =
        |user: &str, token: &str| b64.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"));
    let (r, mut w) = TcpStream::connect(("127.0.0.1", peer.port()))
        .await
        .unwrap()
        .into_split();
    let mut r = BufReader::new(r);
    reply(&mut r).await;
    command(&mut r, &mut w, "EHLO client.example").await;

    // A token that is not the OAuth peer's, and a good token for another user: 535.
    let forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.";
    let no = command(
        &mut r,
        &mut w,
        &format!("AUTH XOAUTH2 {}", xoauth2("sender@tenant.example", forged)),
    )
    .await;
    assert!(no[0].starts_with("535"), "{no:?}");
    let access = tokens["access_token"].as_str().unwrap();
    let no = command(
        &mut r,
        &mut w,
        &format!("AUTH XOAUTH2 {}", xoauth2("other@tenant.example", access)),
    )
    .await;
    assert!(no[0].starts_with("535"), "{no:?}");
    // Gmail style: a 334 challenge carrying a base64 JSON error, then 535 after the client's
    // empty line.
    peer.set_xoauth2_failure(Xoauth2Failure::Gmail).await;
    let challenge = command(
        &mut r,
        &mut w,
        &format!("AUTH XOAUTH2 {}", xoauth2("other@tenant.example", access)),
    )
    .await;
    let json = challenge[0].strip_prefix("334 ").expect("334 challenge");
    let error: Value = serde_json::from_slice(&b64.decode(json).unwrap()).unwrap();
    assert_eq!(error["status"], "400", "{error}");
    let no = command(&mut r, &mut w, "").await;
    assert!(no[0].starts_with("535"), "{no:?}");
    // The right user with the real token: in.
    let yes = command(
        &mut r,
        &mut w,
        &format!("AUTH XOAUTH2 {}", xoauth2("sender@tenant.example", access)),
    )
    .await;
    assert!(yes[0].starts_with("235"), "{yes:?}");

    // An injected transient failure after DATA, then a message that goes through.
    peer.fail_next(451, "Try again later", 1).await;
    for expect in ["451", "250"] {
        assert!(
            command(&mut r, &mut w, "MAIL FROM:<sender@tenant.example>").await[0]
                .starts_with("250")
        );
        assert!(command(&mut r, &mut w, "RCPT TO:<it@acme.example>").await[0].starts_with("250"));
        assert!(command(&mut r, &mut w, "DATA").await[0].starts_with("354"));
        let done = command(&mut r, &mut w, "Subject: selftest\r\n\r\nHello.\r\n.").await;
        assert!(done[0].starts_with(expect), "{done:?}");
    }
    // RCPT failures refuse the transaction's recipients.
    peer.fail_next_at(SmtpStage::Rcpt, 550, "No such user", 1)
        .await;
    assert!(
        command(&mut r, &mut w, "MAIL FROM:<sender@tenant.example>").await[0].starts_with("250")
    );
    assert!(command(&mut r, &mut w, "RCPT TO:<nobody@acme.example>").await[0].starts_with("550"));
    command(&mut r, &mut w, "QUIT").await;

    let messages = peer.messages().await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    let m = &messages[0];
    assert_eq!(m.from.as_deref(), Some("sender@tenant.example"));
    assert_eq!(m.to, ["it@acme.example"]);
    assert_eq!(m.auth_user.as_deref(), Some("sender@tenant.example"));
    assert_eq!(m.auth_method.as_deref(), Some("XOAUTH2"));
    assert_eq!(m.raw(), b"Subject: selftest\r\n\r\nHello.\r\n");
    let attempts = peer.auth_attempts().await;
    assert_eq!(
        attempts.iter().map(|a| a.ok).collect::<Vec<_>>(),
        [false, false, false, true]
    );
    peer.clear().await;
    assert!(peer.messages().await.is_empty());
}

#[tokio::test]
async fn smtp_peer_certificate_is_trusted_by_rustls() {
    let peer = SmtpPeer::start(SmtpPeerOptions {
        tls: SmtpTls::Implicit,
        no_auth: true,
        ..SmtpPeerOptions::default()
    })
    .await;
    let url = format!("https://127.0.0.1:{}/", peer.port());
    // Without the peer's CA: the TLS handshake fails.
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    let err = plain.get(&url).send().await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    // With it, added to the platform's roots or alone: the handshake succeeds (then the
    // SMTP greeting is no HTTP response).
    let ca = || reqwest::Certificate::from_pem(peer.cert_pem().as_bytes()).unwrap();
    for trusting in [
        reqwest::Client::builder().tls_certs_merge([ca()]),
        reqwest::Client::builder().tls_certs_only([ca()]),
    ] {
        let client = trusting.no_proxy().build().unwrap();
        let err = client.get(&url).send().await.unwrap_err();
        assert!(!err.is_connect(), "{err:?}");
    }
}
