//! SMTP delivery (`mail_core::smtp`) against the real SMTP peer (nodemailer's `smtp-server`)
//! and, for XOAUTH2, real access tokens from the OAuth peer that the SMTP peer verifies
//! against its JWKS. Each test starts its own peers.

use std::sync::Arc;

use mail_core::domain::{EmailAddress, Port, SmtpHost};
use mail_core::egress::EgressPolicy;
use mail_core::settings::Encryption;
use mail_core::smtp::{
    Attachment, AttachmentSource, BuildError, Mailer, MailerConfig, OutgoingMessage, SendError,
    SmtpAuth, SmtpReply, SmtpTarget,
};
use postwire_tests::inspect::{attachment_bytes, header};
use postwire_tests::peers::{
    OAuthPeer, SmtpMessage, SmtpPeer, SmtpPeerOptions, SmtpStage, SmtpTls, Xoauth2Failure,
    peer_http_client,
};
use secrecy::SecretString;

const USER: &str = "scanner@acme.example";
const PASSWORD: &str = "Sup3r-Secret-PW";
/// The OAuth peer's default user (`preferred_username` of its tokens).
const OAUTH_USER: &str = "sender@tenant.example";
const CLIENT_ID: &str = "postwire-smtp-test";

fn addr(s: &str) -> EmailAddress {
    EmailAddress::parse(s).unwrap()
}

/// A mailer that may reach loopback and trusts the peer's CA (when it has TLS).
fn mailer_for(peer: &SmtpPeer) -> Mailer {
    let ca = (peer.tls() != SmtpTls::None).then(|| peer.cert_pem_path());
    mailer("loopback", ca)
}

fn mailer(egress: &str, extra_ca: Option<&std::path::Path>) -> Mailer {
    let policy = Arc::new(EgressPolicy::parse(egress).unwrap());
    Mailer::new(MailerConfig::new(policy).extra_ca_file(extra_ca)).unwrap()
}

fn target(peer: &SmtpPeer, host: &str, encryption: Encryption, auth: SmtpAuth) -> SmtpTarget {
    SmtpTarget {
        host: SmtpHost::parse(host).unwrap(),
        port: Port::parse(peer.port().into()).unwrap(),
        encryption,
        auth,
        hello_name: Some("client.postwire.test".into()),
    }
}

fn password(user: &str, password: &str) -> SmtpAuth {
    SmtpAuth::Password {
        username: user.into(),
        password: SecretString::from(password.to_owned()),
    }
}

fn xoauth2(token: &str) -> SmtpAuth {
    SmtpAuth::Xoauth2 {
        username: OAUTH_USER.into(),
        access_token: SecretString::from(token.to_owned()),
    }
}

async fn access_token(oauth: &OAuthPeer) -> String {
    let tokens = oauth.issue_tokens(CLIENT_ID, "openid offline_access").await;
    tokens["access_token"].as_str().unwrap().to_owned()
}

fn message_id() -> String {
    format!("<{}@postwire.test>", uuid::Uuid::new_v4())
}

/// A plain message from `from` to one recipient.
fn simple(from: &str, subject: &str) -> OutgoingMessage {
    OutgoingMessage {
        message_id: message_id(),
        from: addr(from),
        from_name: None,
        to: vec![addr("it@acme.example")],
        cc: vec![],
        bcc: vec![],
        reply_to: None,
        subject: subject.into(),
        text: Some("Hello from Postwire.\n".into()),
        html: None,
        attachments: vec![],
    }
}

async fn send(mailer: &Mailer, target: &SmtpTarget, m: OutgoingMessage) -> SmtpReply {
    let message = m.into_message().await.unwrap();
    match mailer.send(target, message).await {
        Ok(reply) => reply,
        Err(e) => panic!("send failed: {e:?}"),
    }
}

async fn send_err(mailer: &Mailer, target: &SmtpTarget, m: OutgoingMessage) -> SendError {
    let message = m.into_message().await.unwrap();
    match mailer.send(target, message).await {
        Ok(reply) => panic!("expected a failure, got {reply:?}"),
        Err(e) => e,
    }
}

async fn connections(peer: &SmtpPeer) -> u64 {
    peer.state().await["counters"]["connections"]
        .as_u64()
        .unwrap()
}

/// Checks a delivery: the transport's view (TLS, AUTH) and the recorded message.
fn assert_delivered(m: &SmtpMessage, tls: bool, auth: Option<(&str, &str)>, subject: &str) {
    assert_eq!(m.tls, tls, "TLS used");
    assert_eq!(
        m.auth_method.as_deref().zip(m.auth_user.as_deref()),
        auth,
        "AUTH method and user"
    );
    assert_eq!(m.helo.as_deref(), Some("client.postwire.test"));
    assert_eq!(header(&m.data, "Subject").as_deref(), Some(subject));
}

// ------------------------------------------------------------------------------------------
// Deliveries: encryption × authentication

/// STARTTLS + PLAIN with a complete message: alternative text/HTML, attachments from memory
/// and from a file (binary bytes intact), Cc/Bcc/Reply-To, the caller's Message-ID; the host
/// is a name (`localhost`) verified by the certificate while the connection goes to the
/// address the egress policy allowed; a second message reuses the pooled connection.
#[tokio::test]
async fn starttls_password_full_message() {
    let peer = SmtpPeer::start(SmtpPeerOptions::default().with_user(USER, PASSWORD)).await;
    let mailer = mailer_for(&peer);
    let target = target(
        &peer,
        "localhost",
        Encryption::Starttls,
        password(USER, PASSWORD),
    );

    // Bytes that exercise the encoding: NUL, 0xFF, CRLF, a lone LF, an SMTP end-of-data.
    let mut scan: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    scan.extend_from_slice(b"\r\n.\r\n\n.\0\xff");
    let dir = std::env::temp_dir().join(format!("pw-smtp-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("report.csv");
    let report = b"id,value\n1,\xe2\x82\xac\n2,\"x\r\ny\"\n".to_vec();
    std::fs::write(&file, &report).unwrap();

    let id = message_id();
    let message = OutgoingMessage {
        message_id: id.clone(),
        from: addr(USER),
        from_name: Some("Acme Scanner".into()),
        to: vec![addr("it@acme.example"), addr("boss@acme.example")],
        cc: vec![addr("cc@acme.example")],
        bcc: vec![addr("audit@acme.example")],
        reply_to: Some(addr("helpdesk@acme.example")),
        subject: "Scan 42".into(),
        text: Some("Your scan is attached.\n".into()),
        html: Some("<p>Your <b>scan</b> is attached.</p>".into()),
        attachments: vec![
            Attachment {
                filename: "scan.pdf".into(),
                content_type: "application/pdf".into(),
                source: AttachmentSource::Bytes(scan.clone()),
            },
            Attachment {
                filename: "report.csv".into(),
                content_type: "text/csv".into(),
                source: AttachmentSource::File(file.clone()),
            },
        ],
    };
    let reply = send(&mailer, &target, message).await;
    assert_eq!(reply.code, 250, "{reply}");
    assert!(reply.message.contains("Queued as peer-"), "{reply}");

    let messages = peer.messages().await;
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_delivered(m, true, Some(("PLAIN", USER)), "Scan 42");
    assert_eq!(m.from.as_deref(), Some(USER));
    let mut rcpt = m.to.clone();
    rcpt.sort();
    assert_eq!(
        rcpt,
        [
            "audit@acme.example",
            "boss@acme.example",
            "cc@acme.example",
            "it@acme.example"
        ]
    );
    let raw = &m.data;
    assert_eq!(
        header(raw, "From").as_deref(),
        Some("\"Acme Scanner\" <scanner@acme.example>")
    );
    assert_eq!(
        header(raw, "To").as_deref(),
        Some("it@acme.example, boss@acme.example")
    );
    assert_eq!(header(raw, "Cc").as_deref(), Some("cc@acme.example"));
    assert_eq!(header(raw, "Bcc"), None, "Bcc is envelope-only");
    assert_eq!(
        header(raw, "Reply-To").as_deref(),
        Some("helpdesk@acme.example")
    );
    assert_eq!(header(raw, "Message-ID"), Some(id));
    assert!(header(raw, "Date").is_some());
    assert!(
        header(raw, "Content-Type")
            .unwrap()
            .starts_with("multipart/mixed"),
        "{raw}"
    );
    assert!(raw.contains("Content-Type: multipart/alternative"), "{raw}");
    assert!(raw.contains("Content-Type: text/plain; charset=utf-8"));
    assert!(raw.contains("Your scan is attached.\r\n"));
    assert!(raw.contains("Content-Type: text/html; charset=utf-8"));
    assert!(raw.contains("<p>Your <b>scan</b> is attached.</p>"));
    assert!(raw.contains("Content-Type: application/pdf"));
    assert!(raw.contains("Content-Type: text/csv"));
    assert_eq!(attachment_bytes(raw, "scan.pdf"), scan);
    assert_eq!(attachment_bytes(raw, "report.csv"), report);
    let _ = std::fs::remove_dir_all(&dir);

    // Same target and credential: the pooled connection is reused.
    let reply = send(&mailer, &target, simple(USER, "Second")).await;
    assert_eq!(reply.code, 250);
    assert_eq!(peer.messages().await.len(), 2);
    assert_eq!(connections(&peer).await, 1, "one connection for both");
    assert_eq!(mailer.cached_transports(), 1);
}

#[tokio::test]
async fn tls_password() {
    let peer = SmtpPeer::start(SmtpPeerOptions {
        tls: SmtpTls::Implicit,
        ..SmtpPeerOptions::default().with_user(USER, PASSWORD)
    })
    .await;
    let mailer = mailer_for(&peer);
    let target = target(
        &peer,
        "127.0.0.1",
        Encryption::Tls,
        password(USER, PASSWORD),
    );
    let m = simple(USER, "Implicit TLS");
    let id = m.message_id.clone();
    assert_eq!(send(&mailer, &target, m).await.code, 250);
    let messages = peer.messages().await;
    assert_eq!(messages.len(), 1);
    assert_delivered(&messages[0], true, Some(("PLAIN", USER)), "Implicit TLS");
    assert_eq!(header(&messages[0].data, "Message-ID"), Some(id));
    assert_eq!(
        header(&messages[0].data, "Content-Type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    assert!(messages[0].data.contains("Hello from Postwire.\r\n"));
    // The implicit-TLS connection is pooled too.
    assert_eq!(
        send(&mailer, &target, simple(USER, "again")).await.code,
        250
    );
    assert_eq!(connections(&peer).await, 1);
}

#[tokio::test]
async fn none_without_auth() {
    let peer = SmtpPeer::start(SmtpPeerOptions {
        tls: SmtpTls::None,
        no_auth: true,
        ..SmtpPeerOptions::default()
    })
    .await;
    let mailer = mailer_for(&peer);
    let target = target(&peer, "127.0.0.1", Encryption::None, SmtpAuth::None);
    let mut m = simple("relay@acme.example", "Plain relay");
    m.text = None;
    m.html = Some("<h1>Only HTML</h1>".into());
    assert_eq!(send(&mailer, &target, m).await.code, 250);
    let messages = peer.messages().await;
    assert_eq!(messages.len(), 1);
    assert_delivered(&messages[0], false, None, "Plain relay");
    assert_eq!(
        header(&messages[0].data, "Content-Type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert!(peer.auth_attempts().await.is_empty());
}

#[tokio::test]
async fn none_with_password() {
    let peer = SmtpPeer::start(SmtpPeerOptions {
        tls: SmtpTls::None,
        ..SmtpPeerOptions::default().with_user(USER, PASSWORD)
    })
    .await;
    let mailer = mailer_for(&peer);
    let target = target(
        &peer,
        "127.0.0.1",
        Encryption::None,
        password(USER, PASSWORD),
    );
    assert_eq!(
        send(&mailer, &target, simple(USER, "LAN relay")).await.code,
        250
    );
    let messages = peer.messages().await;
    assert_delivered(&messages[0], false, Some(("PLAIN", USER)), "LAN relay");
}

#[tokio::test]
async fn starttls_without_auth() {
    let peer = SmtpPeer::start(SmtpPeerOptions {
        no_auth: true,
        ..SmtpPeerOptions::default()
    })
    .await;
    let mailer = mailer_for(&peer);
    let target = target(&peer, "localhost", Encryption::Starttls, SmtpAuth::None);
    assert_eq!(
        send(&mailer, &target, simple("relay@acme.example", "No auth"))
            .await
            .code,
        250
    );
    // `SmtpPeer::messages` cannot read this recording: after STARTTLS without AUTH the peer
    // reports `"auth_user": false` (smtp-server's `session.user`), not null. Read the JSON.
    let messages: Vec<serde_json::Value> = peer_http_client()
        .get(format!("{}/messages", peer.control_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m["tls"], true);
    assert!(m["auth_method"].is_null(), "{m}");
    assert!(matches!(
        m["auth_user"],
        serde_json::Value::Null | serde_json::Value::Bool(false)
    ));
    assert_eq!(m["helo"], "client.postwire.test");
    assert_eq!(
        header(m["data"].as_str().unwrap(), "Subject").as_deref(),
        Some("No auth")
    );
    assert!(peer.auth_attempts().await.is_empty());
}

/// STARTTLS + XOAUTH2 with a real token; a new token makes a new transport (credentials are
/// fixed per transport), which replaces the old one in the cache.
#[tokio::test]
async fn starttls_xoauth2() {
    let oauth = OAuthPeer::start().await;
    let peer = SmtpPeer::start(SmtpPeerOptions::default().trusting(&oauth)).await;
    let mailer = mailer_for(&peer);
    let token = access_token(&oauth).await;
    let t = target(&peer, "localhost", Encryption::Starttls, xoauth2(&token));
    assert_eq!(
        send(&mailer, &t, simple(OAUTH_USER, "OAuth 1")).await.code,
        250
    );
    assert_eq!(peer.messages().await.len(), 1);
    assert_eq!(
        send(&mailer, &t, simple(OAUTH_USER, "OAuth 2")).await.code,
        250
    );
    assert_eq!(
        connections(&peer).await,
        1,
        "the pooled connection is reused"
    );

    let fresh = access_token(&oauth).await;
    assert_ne!(fresh, token);
    let t = target(&peer, "localhost", Encryption::Starttls, xoauth2(&fresh));
    assert_eq!(
        send(&mailer, &t, simple(OAUTH_USER, "OAuth 3")).await.code,
        250
    );
    assert_eq!(connections(&peer).await, 2, "a new token: a new connection");
    assert_eq!(mailer.cached_transports(), 1, "the old transport is gone");

    let messages = peer.messages().await;
    assert_eq!(messages.len(), 3);
    for (m, subject) in messages.iter().zip(["OAuth 1", "OAuth 2", "OAuth 3"]) {
        assert_delivered(m, true, Some(("XOAUTH2", OAUTH_USER)), subject);
    }
    let attempts = peer.auth_attempts().await;
    assert_eq!(attempts.len(), 2);
    assert!(attempts.iter().all(|a| a.ok && a.method == "XOAUTH2"));
}

#[tokio::test]
async fn tls_xoauth2() {
    let oauth = OAuthPeer::start().await;
    let peer = SmtpPeer::start(SmtpPeerOptions {
        tls: SmtpTls::Implicit,
        ..SmtpPeerOptions::default().trusting(&oauth)
    })
    .await;
    let mailer = mailer_for(&peer);
    let token = access_token(&oauth).await;
    let t = target(&peer, "127.0.0.1", Encryption::Tls, xoauth2(&token));
    assert_eq!(
        send(&mailer, &t, simple(OAUTH_USER, "OAuth TLS"))
            .await
            .code,
        250
    );
    let messages = peer.messages().await;
    assert_delivered(
        &messages[0],
        true,
        Some(("XOAUTH2", OAUTH_USER)),
        "OAuth TLS",
    );
}

// ------------------------------------------------------------------------------------------
// Failures, classified

/// A wrong password: AuthRejected with the 535 reply, not retryable; the right password on
/// the same mailer then works (new credential, new transport).
#[tokio::test]
async fn wrong_password_is_auth_rejected() {
    let peer = SmtpPeer::start(SmtpPeerOptions::default().with_user(USER, PASSWORD)).await;
    let mailer = mailer_for(&peer);
    let bad = target(
        &peer,
        "127.0.0.1",
        Encryption::Starttls,
        password(USER, "nope"),
    );
    let err = send_err(&mailer, &bad, simple(USER, "x")).await;
    match &err {
        SendError::AuthRejected { code, message } => {
            assert_eq!(*code, 535);
            assert!(
                message.contains("Authentication credentials invalid"),
                "{message}"
            );
        }
        other => panic!("expected AuthRejected, got {other:?}"),
    }
    assert!(err.is_auth_rejected() && !err.is_retryable());
    assert_eq!(
        err.reply(),
        Some((535, "5.7.8 Authentication credentials invalid"))
    );
    assert!(peer.messages().await.is_empty());

    let good = target(
        &peer,
        "127.0.0.1",
        Encryption::Starttls,
        password(USER, PASSWORD),
    );
    assert_eq!(send(&mailer, &good, simple(USER, "y")).await.code, 250);
    let ok: Vec<bool> = peer.auth_attempts().await.iter().map(|a| a.ok).collect();
    assert_eq!(ok, [false, true]);
}

/// Forged and expired XOAUTH2 tokens are AuthRejected, in both ways servers refuse them:
/// a 535 at once (Microsoft 365) and a 334 JSON challenge (Gmail), which lettre reports as a
/// client error.
#[tokio::test]
async fn rejected_xoauth2_tokens() {
    let oauth = OAuthPeer::start().await;
    oauth.set_expires_in(-60, false).await;
    let expired = access_token(&oauth).await;
    let forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzZW5kZXJAdGVuYW50LmV4YW1wbGUifQ.";
    let peer = SmtpPeer::start(SmtpPeerOptions::default().trusting(&oauth)).await;
    let mailer = mailer_for(&peer);

    for mode in [Xoauth2Failure::Reply535, Xoauth2Failure::Gmail] {
        peer.set_xoauth2_failure(mode).await;
        for token in [forged, expired.as_str()] {
            let t = target(&peer, "127.0.0.1", Encryption::Starttls, xoauth2(token));
            let err = send_err(&mailer, &t, simple(OAUTH_USER, "x")).await;
            assert!(err.is_auth_rejected() && !err.is_retryable(), "{err:?}");
            match (mode, &err) {
                (Xoauth2Failure::Reply535, SendError::AuthRejected { code, message }) => {
                    assert_eq!(*code, 535);
                    assert!(message.contains("token rejected"), "{message}");
                }
                (Xoauth2Failure::Gmail, SendError::AuthRejected { code, message }) => {
                    assert_eq!(*code, 334);
                    assert!(message.contains("challenge"), "{message}");
                }
                _ => panic!("{mode:?}: {err:?}"),
            }
        }
    }
    let attempts = peer.auth_attempts().await;
    assert_eq!(attempts.len(), 4);
    assert!(attempts.iter().all(|a| !a.ok && a.method == "XOAUTH2"));
    assert!(
        attempts[1]
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("exp"),
        "{attempts:?}"
    );
    assert!(peer.messages().await.is_empty());
}

/// 421/451 replies, a refused connection: Transient (retryable) with the reply; the next
/// message goes through (the pool drops the connection the 421 closed).
#[tokio::test]
async fn transient_failures() {
    let peer = SmtpPeer::start(SmtpPeerOptions::default().with_user(USER, PASSWORD)).await;
    let mailer = mailer_for(&peer);
    let t = target(
        &peer,
        "127.0.0.1",
        Encryption::Starttls,
        password(USER, PASSWORD),
    );
    for (code, text) in [
        (421, "Service shutting down"),
        (451, "Local error in processing"),
    ] {
        peer.fail_next(code, text, 1).await;
        let err = send_err(&mailer, &t, simple(USER, "x")).await;
        assert!(err.is_retryable(), "{err:?}");
        // The reply text, with the enhanced status code the peer puts first.
        assert!(
            matches!(&err, SendError::Transient { code: Some(c), message }
                if *c == code && message.ends_with(text) && message.starts_with("4.")),
            "{err:?}"
        );
        assert_eq!(send(&mailer, &t, simple(USER, "after")).await.code, 250);
    }
    assert_eq!(peer.messages().await.len(), 2);

    // Nothing listens: connection refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let mut t = t;
    t.port = Port::parse(port.into()).unwrap();
    let err = send_err(&mailer, &t, simple(USER, "x")).await;
    assert!(
        matches!(&err, SendError::Transient { code: None, message } if message.contains("refused")),
        "{err:?}"
    );
}

// ------------------------------------------------------------------------------------------
// The connection pool

/// A pooled connection that the server closed while it was idle (its idle timeout: "421
/// Timeout", then the socket closes) is not probed before reuse: MAIL fails on it before any
/// of the message was sent, and the message goes over a new connection, exactly once.
#[tokio::test]
async fn connection_closed_while_idle_is_replaced() {
    let peer = SmtpPeer::start(SmtpPeerOptions {
        idle_timeout: Some(std::time::Duration::from_millis(300)),
        ..SmtpPeerOptions::default().with_user(USER, PASSWORD)
    })
    .await;
    let mailer = mailer_for(&peer);
    let t = target(
        &peer,
        "localhost",
        Encryption::Starttls,
        password(USER, PASSWORD),
    );
    assert_eq!(send(&mailer, &t, simple(USER, "first")).await.code, 250);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(mailer.idle_connections(), 1, "still parked on our side");
    assert_eq!(send(&mailer, &t, simple(USER, "second")).await.code, 250);
    assert_eq!(
        connections(&peer).await,
        2,
        "the second went over a new one"
    );
    let subjects: Vec<String> = peer
        .messages()
        .await
        .iter()
        .map(|m| header(&m.data, "Subject").unwrap())
        .collect();
    assert_eq!(subjects, ["first", "second"], "each message exactly once");
    assert_eq!(mailer.idle_connections(), 1);
}

/// On a reused connection: a 421 to MAIL (the server closing it) sends the message once over
/// a new connection; a failure after the message data is not resent (the server may have
/// the message), and another refusal of MAIL is the caller's answer, not a retry.
#[tokio::test]
async fn failures_on_a_reused_connection() {
    let peer = SmtpPeer::start(SmtpPeerOptions::default().with_user(USER, PASSWORD)).await;
    let mailer = mailer_for(&peer);
    let t = target(
        &peer,
        "127.0.0.1",
        Encryption::Starttls,
        password(USER, PASSWORD),
    );
    assert_eq!(send(&mailer, &t, simple(USER, "first")).await.code, 250);

    peer.fail_next_at(SmtpStage::Mail, 421, "Closing connection", 1)
        .await;
    assert_eq!(send(&mailer, &t, simple(USER, "second")).await.code, 250);
    assert_eq!(connections(&peer).await, 2);
    assert_eq!(peer.messages().await.len(), 2);

    peer.fail_next(421, "Service shutting down", 1).await;
    let err = send_err(&mailer, &t, simple(USER, "third")).await;
    assert!(
        matches!(
            &err,
            SendError::Transient {
                code: Some(421),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        connections(&peer).await,
        2,
        "not resent over a new connection"
    );
    assert_eq!(peer.messages().await.len(), 2);

    assert_eq!(send(&mailer, &t, simple(USER, "fourth")).await.code, 250);
    assert_eq!(connections(&peer).await, 3);
    peer.fail_next_at(SmtpStage::Mail, 451, "Try again later", 1)
        .await;
    let err = send_err(&mailer, &t, simple(USER, "fifth")).await;
    assert!(
        matches!(
            &err,
            SendError::Transient {
                code: Some(451),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(connections(&peer).await, 3, "no retry after a reply");
    let subjects: Vec<String> = peer
        .messages()
        .await
        .iter()
        .map(|m| header(&m.data, "Subject").unwrap())
        .collect();
    assert_eq!(subjects, ["first", "second", "fourth"]);
}

/// At most `pool_max_size` connections stay idle after concurrent sends, and only for
/// `pool_idle_timeout`: then they are closed and the next message opens a new one.
#[tokio::test]
async fn idle_connections_are_bounded_and_expire() {
    let peer = SmtpPeer::start(SmtpPeerOptions {
        tls: SmtpTls::None,
        no_auth: true,
        ..SmtpPeerOptions::default()
    })
    .await;
    let policy = Arc::new(EgressPolicy::parse("loopback").unwrap());
    let mut config = MailerConfig::new(policy);
    config.pool_max_size = 2;
    config.pool_idle_timeout = std::time::Duration::from_millis(400);
    let mailer = Mailer::new(config).unwrap();
    let t = target(&peer, "127.0.0.1", Encryption::None, SmtpAuth::None);
    let sends = (0..4).map(|i| {
        let (mailer, t) = (mailer.clone(), t.clone());
        tokio::spawn(async move { send(&mailer, &t, simple(USER, &format!("m{i}"))).await })
    });
    for s in sends.collect::<Vec<_>>() {
        assert_eq!(s.await.unwrap().code, 250);
    }
    assert_eq!(peer.messages().await.len(), 4);
    let opened = connections(&peer).await;
    assert!((2..=4).contains(&opened), "{opened}");
    assert_eq!(mailer.idle_connections(), 2);

    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(
        mailer.idle_connections(),
        0,
        "closed after the idle timeout"
    );
    assert_eq!(send(&mailer, &t, simple(USER, "later")).await.code, 250);
    assert_eq!(connections(&peer).await, opened + 1);
}

/// 550 at RCPT or after DATA: Permanent with the reply text, not retryable.
/// Refusals at MAIL, RCPT and DATA, with PIPELINING (MAIL, RCPT and DATA in one write, the
/// replies read in order) and without it (one command at a time): the first refusal is the
/// error, nothing is delivered, and the next message goes through.
#[tokio::test]
async fn permanent_failures() {
    for no_pipelining in [false, true] {
        let peer = SmtpPeer::start(SmtpPeerOptions {
            no_pipelining,
            ..SmtpPeerOptions::default().with_user(USER, PASSWORD)
        })
        .await;
        let mailer = mailer_for(&peer);
        let t = target(
            &peer,
            "127.0.0.1",
            Encryption::Starttls,
            password(USER, PASSWORD),
        );
        for (stage, text) in [
            (SmtpStage::Mail, "Sender address rejected"),
            (SmtpStage::Rcpt, "No such user here"),
            (SmtpStage::Data, "Message rejected as spam"),
        ] {
            peer.fail_next_at(stage, 550, text, 1).await;
            let mut m = simple(USER, "x");
            m.to.push(addr("second@example.com"));
            let err = send_err(&mailer, &t, m).await;
            assert!(!err.is_retryable() && !err.is_auth_rejected(), "{err:?}");
            assert!(
                matches!(&err, SendError::Permanent { code: 550, message }
                    if message.ends_with(text) && message.starts_with("5.")),
                "pipelining {}: {stage:?}: {err:?}",
                !no_pipelining
            );
            assert_eq!(err.reply().map(|(c, _)| c), Some(550));
        }
        assert!(peer.messages().await.is_empty());
        let mut m = simple(USER, "after the refusals");
        m.to.push(addr("second@example.com"));
        assert_eq!(send(&mailer, &t, m).await.code, 250);
        let messages = peer.messages().await;
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].to, ["it@acme.example", "second@example.com"]);
    }
}

/// Without the peer's CA the certificate is untrusted: a Tls error, and neither credentials
/// nor the message reach the server.
#[tokio::test]
async fn untrusted_certificate_is_a_tls_error() {
    for (tls, encryption) in [
        (SmtpTls::StartTls, Encryption::Starttls),
        (SmtpTls::Implicit, Encryption::Tls),
    ] {
        let peer = SmtpPeer::start(SmtpPeerOptions {
            tls,
            ..SmtpPeerOptions::default().with_user(USER, PASSWORD)
        })
        .await;
        let mailer = mailer("loopback", None);
        let t = target(&peer, "localhost", encryption, password(USER, PASSWORD));
        let err = send_err(&mailer, &t, simple(USER, "x")).await;
        match &err {
            SendError::Tls { description } => {
                assert!(description.contains("certificate"), "{description}")
            }
            other => panic!("{tls:?}: expected Tls, got {other:?}"),
        }
        assert!(!err.is_retryable());
        assert!(peer.auth_attempts().await.is_empty());
        assert!(peer.messages().await.is_empty());
    }
}

/// `starttls` never falls back to plain text: a server without STARTTLS is a Tls error, and
/// the password is not sent.
#[tokio::test]
async fn starttls_is_required() {
    let peer = SmtpPeer::start(SmtpPeerOptions {
        tls: SmtpTls::None,
        ..SmtpPeerOptions::default().with_user(USER, PASSWORD)
    })
    .await;
    let mailer = mailer("loopback", None);
    let t = target(
        &peer,
        "127.0.0.1",
        Encryption::Starttls,
        password(USER, PASSWORD),
    );
    let err = send_err(&mailer, &t, simple(USER, "x")).await;
    assert!(
        matches!(&err, SendError::Tls { description } if description.contains("STARTTLS")),
        "{err:?}"
    );
    assert!(peer.auth_attempts().await.is_empty());
    assert!(peer.messages().await.is_empty());
}

/// A policy without `loopback` refuses `localhost` and 127.0.0.1 after resolution, before
/// any connection: the peer sees nothing.
#[tokio::test]
async fn egress_is_checked_before_connecting() {
    let peer = SmtpPeer::start(SmtpPeerOptions {
        no_auth: true,
        ..SmtpPeerOptions::default()
    })
    .await;
    let mailer = mailer("public,private", Some(peer.cert_pem_path()));
    for host in ["localhost", "127.0.0.1"] {
        let t = target(&peer, host, Encryption::Starttls, SmtpAuth::None);
        let err = send_err(&mailer, &t, simple(USER, "x")).await;
        match &err {
            SendError::Egress { description } => {
                assert!(
                    description.contains("not allowed") && description.contains("127.0.0.1"),
                    "{description}"
                )
            }
            other => panic!("{host}: expected Egress, got {other:?}"),
        }
        assert!(!err.is_retryable());
    }
    assert_eq!(connections(&peer).await, 0);
    assert_eq!(mailer.cached_transports(), 0);
}

// ------------------------------------------------------------------------------------------
// The MIME builder refuses bad input, naming the field

#[tokio::test]
async fn header_injection_and_bad_input_are_refused() {
    async fn field(m: OutgoingMessage) -> String {
        let err: BuildError = m.into_message().await.unwrap_err();
        assert!(err.to_string().starts_with(err.field()), "{err}");
        err.field().to_owned()
    }
    let pdf = |name: &str, ct: &str| Attachment {
        filename: name.into(),
        content_type: ct.into(),
        source: AttachmentSource::Bytes(b"%PDF-1.7".to_vec()),
    };

    let mut m = simple(USER, "Hello\r\nBcc: victim@example.com");
    assert_eq!(field(m.clone()).await, "subject");
    m.subject = "Hello\nX-Injected: 1".into();
    assert_eq!(field(m).await, "subject");

    let mut m = simple(USER, "ok");
    m.from_name = Some("Acme\r\nBcc: victim@example.com".into());
    assert_eq!(field(m).await, "from_name");

    let mut m = simple(USER, "ok");
    m.attachments = vec![
        pdf("fine.pdf", "application/pdf"),
        pdf("scan.pdf\r\nContent-Type: text/html", "application/pdf"),
    ];
    assert_eq!(field(m).await, "attachments[1].filename");

    let mut m = simple(USER, "ok");
    m.attachments = vec![pdf("scan.pdf", "application/pdf\r\nX-Injected: 1")];
    assert_eq!(field(m).await, "attachments[0].content_type");
    let mut m = simple(USER, "ok");
    m.attachments = vec![pdf("scan.pdf", "pdf")];
    assert_eq!(field(m).await, "attachments[0].content_type");

    let mut m = simple(USER, "ok");
    m.message_id = "<id@host>\r\nBcc: victim@example.com".into();
    assert_eq!(field(m).await, "message_id");

    let mut m = simple(USER, "ok");
    m.attachments = vec![Attachment {
        filename: "missing.pdf".into(),
        content_type: "application/pdf".into(),
        source: AttachmentSource::File("/nonexistent/postwire/missing.pdf".into()),
    }];
    assert_eq!(field(m).await, "attachments[0]");

    let mut m = simple(USER, "ok");
    m.to.clear();
    assert_eq!(field(m).await, "to");

    // Valid non-ASCII text is encoded, not refused.
    let mut m = simple(USER, "Grüße – Scan");
    m.from_name = Some("Müller, Jürgen".into());
    assert!(m.into_message().await.is_ok());
}

#[test]
fn targets_do_not_show_secrets() {
    let t = SmtpTarget {
        host: SmtpHost::parse("smtp.example.com").unwrap(),
        port: Port::parse(587).unwrap(),
        encryption: Encryption::Starttls,
        auth: password(USER, "hunter2-secret"),
        hello_name: None,
    };
    let debug = format!("{t:?}");
    assert!(
        !debug.contains("hunter2-secret") && debug.contains(USER),
        "{debug}"
    );
    let t = SmtpTarget {
        auth: xoauth2("eyJ-secret-token"),
        ..t
    };
    assert!(!format!("{t:?}").contains("eyJ-secret-token"));
}
