//! Message JSON → MIME: the body of the site mailer's `POST /v1/messages` parsed as the API
//! parses it, validated against a tenant's effective configuration
//! (`MessageRequest::validate`), then built by mail-core's MIME builder
//! (`OutgoingMessage::into_message`) exactly as the worker sends it.
//!
//! Beyond "never panics": whatever the strings (subjects, names, file names, content types,
//! addresses), the built message's header section holds only the header fields the builder
//! writes, each of From, To, Subject and Message-ID once: no header injection.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mail_core::smtp::AttachmentSource;
use site_mailer::domain::MessageRequest;
use site_mailer::effective::{EffectiveConfig, SiteEmailConfig};

fn config() -> &'static EffectiveConfig {
    static CONFIG: OnceLock<EffectiveConfig> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let c: SiteEmailConfig = serde_json::from_str(
            r#"{
              "tenant_id": "acme", "site_id": "site_1", "provider": "custom",
              "server": {"host": "smtp.acme.example", "port": 587, "encryption": "starttls"},
              "auth": {"method": "password", "username": "scanner@acme.example", "password": "pw"},
              "senders": [
                {"address": "scanner@acme.example", "name": "Acme \"Scanner\", HQ", "default": true},
                {"address": "reports@acme.example", "name": null, "default": false}
              ],
              "receivers": [
                {"address": "it@acme.example", "purpose": "report"},
                {"address": "ops@acme.example", "purpose": null}
              ],
              "feature_senders": {"report": "reports@acme.example"}
            }"#,
        )
        .expect("site config");
        EffectiveConfig::try_from(&c).expect("effective config")
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

const HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "subject",
    "message-id",
    "date",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

fuzz_target!(|data: &[u8]| {
    let Ok(request) = mail_core::http::parse_json::<MessageRequest>(data) else {
        return;
    };
    let Ok(message) = request.validate(config()) else {
        return;
    };
    let files = message
        .attachments
        .iter()
        .map(|b| AttachmentSource::Bytes(b.clone()))
        .collect();
    let outgoing = message
        .content
        .outgoing(&message.message_id, files)
        .expect("one file per attachment");
    // validate() accepted it, so the builder must build it.
    let built = runtime()
        .block_on(outgoing.into_message())
        .unwrap_or_else(|e| panic!("a validated message does not build: {e}"));
    let raw = built.formatted();
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header section");
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut seen: Vec<String> = Vec::new();
    for line in head.split("\r\n") {
        assert!(
            !line.contains('\r') && !line.contains('\n'),
            "bare CR/LF in {line:?}"
        );
        if line.starts_with(' ') || line.starts_with('\t') {
            continue; // folded continuation
        }
        let name = line
            .split_once(':')
            .map(|(n, _)| n.to_ascii_lowercase())
            .unwrap_or_else(|| panic!("not a header field: {line:?}"));
        assert!(
            HEADERS.contains(&name.as_str()),
            "unexpected header field {name:?}"
        );
        seen.push(name);
    }
    for once in ["from", "subject", "message-id"] {
        assert_eq!(
            seen.iter().filter(|n| *n == once).count(),
            1,
            "{once}: {seen:?}"
        );
    }
    assert!(seen.iter().filter(|n| *n == "to").count() <= 1, "{seen:?}");
});
