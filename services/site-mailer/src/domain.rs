//! A message to send: the request shape of `POST /v1/messages`, converted once (with the
//! addressing rules of the effective configuration) into a [`NewMessage`] whose values cannot
//! be bad. Knows nothing of HTTP or storage.

use base64::Engine as _;
use mail_core::domain::{EmailAddress, header_text};
use mail_core::problem::{FieldError, FieldErrors};
use mail_core::settings::FeatureKind;
use mail_core::smtp::{Attachment, AttachmentSource, MAX_SUBJECT_CHARS, OutgoingMessage};
use serde::{Deserialize, Serialize};

use crate::effective::{EffectiveAuth, EffectiveConfig};

/// Recipients (to + cc + bcc, after receivers are filled in) per message at most.
pub const MAX_RECIPIENTS: usize = 500;
/// Attachments per message at most.
pub const MAX_ATTACHMENTS: usize = 100;

/// The feature that sends: picks the default sender and, for notifications and reports, the
/// predefined receivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    ScanToEmail,
    PaymentQuota,
    Notification,
    Report,
    Test,
}

impl MessageKind {
    pub fn feature(self) -> Option<FeatureKind> {
        match self {
            MessageKind::ScanToEmail => Some(FeatureKind::ScanToEmail),
            MessageKind::PaymentQuota => Some(FeatureKind::PaymentQuota),
            MessageKind::Notification => Some(FeatureKind::Notification),
            MessageKind::Report => Some(FeatureKind::Report),
            MessageKind::Test => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::ScanToEmail => "scan_to_email",
            MessageKind::PaymentQuota => "payment_quota",
            MessageKind::Notification => "notification",
            MessageKind::Report => "report",
            MessageKind::Test => "test",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            MessageKind::ScanToEmail,
            MessageKind::PaymentQuota,
            MessageKind::Notification,
            MessageKind::Report,
            MessageKind::Test,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// `POST /v1/messages` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageRequest {
    pub kind: MessageKind,
    /// Default: the feature's sender, then the default sender.
    pub from: Option<String>,
    /// Optional for `notification` and `report`: then the predefined receivers whose purpose
    /// is that kind or absent.
    #[serde(default)]
    pub to: Vec<String>,
    #[serde(default)]
    pub cc: Vec<String>,
    #[serde(default)]
    pub bcc: Vec<String>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    #[serde(default)]
    pub attachments: Vec<AttachmentRequest>,
    /// Attachments already streamed to files (multipart file parts), after the inline ones.
    #[serde(skip)]
    pub files: Vec<AttachmentMeta>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentRequest {
    pub filename: String,
    pub content_type: String,
    /// Standard base64 (padding optional, line breaks allowed).
    pub content_base64: Base64Content,
}

/// An inline attachment's bytes: standard base64 in the request (padding optional, white
/// space such as line breaks ignored), decoded while the request is parsed. The base64 text
/// is read where it lies in the request body, so a 25 MB scan (33 MB of base64) is no longer
/// copied into a string of its own before it is decoded. Invalid base64 is kept as `Err`, for
/// validation to report with the other refusals.
#[derive(Debug)]
pub struct Base64Content(pub Result<Vec<u8>, InvalidBase64>);

/// The refusal of [`Base64Content`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidBase64;

impl Base64Content {
    /// Decodes `text` (see the type) piece by piece, white space left out on the way: no
    /// copy of the text is made, however it is wrapped (base64 broken into lines, as MIME
    /// writes it, would otherwise need a second, compacted copy of 33 MB for a 25 MB scan).
    /// As one decode of the compacted text: padding only at its very end, and optional.
    pub fn decode(text: &str) -> Self {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
        /// Compacted characters decoded at once: whole groups of 4, so every piece but the
        /// last decodes on its own.
        const PIECE: usize = 64 * 1024;
        let mut out = Vec::with_capacity(text.len() / 4 * 3 + 3);
        let mut piece = Vec::with_capacity(PIECE.min(text.len()));
        for b in text.bytes().filter(|b| !b.is_ascii_whitespace()) {
            if piece.len() == PIECE {
                // More follows: padding here would be inside the text.
                if piece.contains(&b'=') || STANDARD.decode_vec(&piece, &mut out).is_err() {
                    return Base64Content(Err(InvalidBase64));
                }
                piece.clear();
            }
            piece.push(b);
        }
        let last = STANDARD
            .decode(&piece)
            .or_else(|_| STANDARD_NO_PAD.decode(&piece))
            .map_err(|_| InvalidBase64);
        Base64Content(last.map(|last| {
            out.extend_from_slice(&last);
            out
        }))
    }
}

impl<'de> Deserialize<'de> for Base64Content {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Base64Content;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a base64 string")
            }
            // Called with the text in the body when it has no JSON escapes (the usual case),
            // with an unescaped copy otherwise.
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Base64Content, E> {
                Ok(Base64Content::decode(text))
            }
        }
        d.deserialize_str(Text)
    }
}

/// What is stored for a message (without the attachment bytes, which live in files).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Content {
    pub from: EmailAddress,
    pub from_name: Option<String>,
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    pub bcc: Vec<EmailAddress>,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub attachments: Vec<AttachmentMeta>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttachmentMeta {
    pub filename: String,
    pub content_type: String,
    pub size: u64,
}

/// A validated message, ready to store.
#[derive(Debug)]
pub struct NewMessage {
    pub kind: MessageKind,
    /// `<unique@domain>`, kept across retries (and restarts) so receivers can tell duplicates.
    pub message_id: String,
    pub content: Content,
    /// The decoded bytes of the inline attachments, in order (stored as files `0..n`; the
    /// streamed ones follow them and are already on disk).
    pub attachments: Vec<Vec<u8>>,
}

impl Content {
    /// The message as mail-core builds it; attachment `i` is read from `files[i]`.
    pub fn outgoing(
        &self,
        message_id: &str,
        files: Vec<AttachmentSource>,
    ) -> Result<OutgoingMessage, String> {
        if files.len() != self.attachments.len() {
            return Err("attachment files do not match the stored message".into());
        }
        Ok(OutgoingMessage {
            message_id: message_id.to_owned(),
            from: self.from.clone(),
            from_name: self.from_name.clone(),
            to: self.to.clone(),
            cc: self.cc.clone(),
            bcc: self.bcc.clone(),
            reply_to: None,
            subject: self.subject.clone(),
            text: self.text.clone(),
            html: self.html.clone(),
            attachments: self
                .attachments
                .iter()
                .zip(files)
                .map(|(a, source)| Attachment {
                    filename: a.filename.clone(),
                    content_type: a.content_type.clone(),
                    source,
                })
                .collect(),
        })
    }
}

fn addresses(e: &mut FieldErrors, field: &str, list: &[String]) -> Vec<EmailAddress> {
    list.iter()
        .enumerate()
        .filter_map(|(i, a)| e.check(format!("{field}[{i}]"), EmailAddress::parse(a)))
        .collect()
}

impl MessageRequest {
    /// Applies the addressing rules of `cfg` and checks every header value; every refused
    /// field is reported, not only the first.
    pub fn validate(self, cfg: &EffectiveConfig) -> Result<NewMessage, Vec<FieldError>> {
        let mut e = FieldErrors::new();
        let feature = self.kind.feature();

        // from: explicit, else the feature's sender, else the default sender (else, with
        // OAuth 2.0, the authorized user).
        let explicit_from = self
            .from
            .as_deref()
            .and_then(|f| e.check("from", EmailAddress::parse(f)));
        let oauth_user = match &cfg.auth {
            EffectiveAuth::Oauth2 {
                authorization_username,
            } => authorization_username.as_ref(),
            _ => None,
        };
        let from = match (&self.from, explicit_from) {
            (Some(_), Some(f)) => {
                // The configured spelling is the one sent.
                let known = cfg
                    .sender(&f)
                    .map(|s| s.address.clone())
                    .or_else(|| oauth_user.filter(|u| u.same_mailbox(&f)).cloned());
                if known.is_none() {
                    e.push("from", format!("{f} is not one of the tenant's senders"));
                }
                Some(known.unwrap_or(f))
            }
            (Some(_), None) => None,
            (None, _) => {
                let chosen = feature
                    .and_then(|k| cfg.feature_senders.get(k).cloned())
                    .or_else(|| cfg.default_sender().map(|s| s.address.clone()))
                    .or_else(|| oauth_user.cloned());
                if chosen.is_none() {
                    e.push(
                        "from",
                        "is required: the tenant has no default sender for this kind",
                    );
                }
                chosen
            }
        };
        if let (Some(required), Some(f)) = (cfg.required_sender(), &from) {
            match required {
                Some(user) if user.same_mailbox(f) => {}
                Some(user) => e.push(
                    "from",
                    format!(
                        "must be {user}: with Microsoft 365 and OAuth 2.0 only the authorized user can send"
                    ),
                ),
                None => e.push(
                    "from",
                    "cannot be checked: the Microsoft 365 OAuth 2.0 authorization has no username yet",
                ),
            }
        }
        let from_name = from
            .as_ref()
            .and_then(|f| cfg.sender(f))
            .and_then(|s| s.name.clone());

        // recipients
        let mut to = addresses(&mut e, "to", &self.to);
        let cc = addresses(&mut e, "cc", &self.cc);
        let bcc = addresses(&mut e, "bcc", &self.bcc);
        if self.to.is_empty() {
            match feature {
                Some(k @ (FeatureKind::Notification | FeatureKind::Report)) => {
                    to = cfg.receivers_for(k);
                    if to.is_empty() {
                        e.push(
                            "to",
                            format!(
                                "is required: the tenant has no predefined receivers for {}",
                                self.kind.as_str()
                            ),
                        );
                    }
                }
                _ => e.push("to", "at least one recipient is required"),
            }
        }
        if to.len() + cc.len() + bcc.len() > MAX_RECIPIENTS {
            e.push(
                "to",
                format!("at most {MAX_RECIPIENTS} recipients (to, cc and bcc together)"),
            );
        }

        let subject = e
            .check("subject", header_text(&self.subject, MAX_SUBJECT_CHARS))
            .unwrap_or_default();

        // attachments
        if self.attachments.len() + self.files.len() > MAX_ATTACHMENTS {
            e.push(
                "attachments",
                format!("at most {MAX_ATTACHMENTS} attachments"),
            );
        }
        let mut metas = Vec::with_capacity(self.attachments.len());
        let mut bytes = Vec::with_capacity(self.attachments.len());
        for (i, a) in self.attachments.into_iter().enumerate() {
            // Decoded while parsing (see `Base64Content`).
            match a.content_base64.0 {
                Ok(b) => {
                    metas.push(AttachmentMeta {
                        filename: a.filename,
                        content_type: a.content_type,
                        size: b.len() as u64,
                    });
                    bytes.push(b);
                }
                Err(_) => e.push(
                    format!("attachments[{i}].content_base64"),
                    "is not valid base64",
                ),
            }
        }
        metas.extend(self.files);

        let Some(from) = from else {
            return Err(e.into_vec());
        };
        if !e.is_empty() {
            return Err(e.into_vec());
        }
        let domain = from.address().domain().to_owned();
        let message = NewMessage {
            kind: self.kind,
            message_id: format!("<{}@{domain}>", uuid::Uuid::new_v4().simple()),
            content: Content {
                from,
                from_name,
                to,
                cc,
                bcc,
                subject,
                text: self.text,
                html: self.html,
                attachments: metas,
            },
            attachments: bytes,
        };
        // The final word on header values (file names, content types, the Message-ID) is the
        // one of the MIME builder that will send the message.
        let files = (0..message.content.attachments.len())
            .map(|_| AttachmentSource::Bytes(Vec::new()))
            .collect();
        let outgoing = message
            .content
            .outgoing(&message.message_id, files)
            .map_err(|m| {
                vec![FieldError {
                    field: "attachments".into(),
                    message: m,
                }]
            })?;
        if let Err(b) = outgoing.validate() {
            let msg = match &b {
                mail_core::smtp::BuildError::Invalid { message, .. } => message.clone(),
                other => other.to_string(),
            };
            let field = match b.field() {
                "from_name" => "from".to_owned(),
                "message_id" => "from".to_owned(),
                f => f.to_owned(),
            };
            return Err(vec![FieldError {
                field,
                message: msg,
            }]);
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effective::SiteEmailConfig;
    use serde_json::json;

    fn cfg(auth: serde_json::Value, provider: &str) -> EffectiveConfig {
        let c: SiteEmailConfig = serde_json::from_value(json!({
            "tenant_id": "acme", "site_id": "s1", "provider": provider,
            "server": {"host": "smtp.acme.example", "port": 587, "encryption": "starttls"},
            "auth": auth,
            "senders": [
                {"address": "scanner@acme.example", "name": "Acme Scanner", "default": true},
                {"address": "reports@acme.example", "name": null, "default": false}
            ],
            "receivers": [
                {"address": "it@acme.example", "purpose": "report"},
                {"address": "boss@acme.example", "purpose": null},
                {"address": "ops@acme.example", "purpose": "notification"}
            ],
            "feature_senders": {"report": "reports@acme.example"},
            "override_applied": false
        }))
        .unwrap();
        EffectiveConfig::try_from(&c).unwrap()
    }

    fn password_cfg() -> EffectiveConfig {
        cfg(
            json!({"method": "password", "username": "u", "password": "p"}),
            "custom",
        )
    }

    fn req(v: serde_json::Value) -> MessageRequest {
        serde_json::from_value(v).unwrap()
    }

    fn fields(r: Result<NewMessage, Vec<FieldError>>) -> Vec<String> {
        r.unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn default_and_feature_senders() {
        let m = req(json!({"kind": "scan_to_email", "to": ["a@b.example"], "subject": "s"}))
            .validate(&password_cfg())
            .unwrap();
        assert_eq!(m.content.from.as_str(), "scanner@acme.example");
        assert_eq!(m.content.from_name.as_deref(), Some("Acme Scanner"));
        assert!(m.message_id.ends_with("@acme.example>"));
        let m = req(json!({"kind": "report", "to": ["a@b.example"], "subject": "s"}))
            .validate(&password_cfg())
            .unwrap();
        assert_eq!(m.content.from.as_str(), "reports@acme.example");
    }

    #[test]
    fn receivers_by_purpose() {
        let m = req(json!({"kind": "report", "subject": "s"}))
            .validate(&password_cfg())
            .unwrap();
        let to: Vec<&str> = m.content.to.iter().map(|a| a.as_str()).collect();
        assert_eq!(to, ["it@acme.example", "boss@acme.example"]);
        let m = req(json!({"kind": "notification", "subject": "s"}))
            .validate(&password_cfg())
            .unwrap();
        let to: Vec<&str> = m.content.to.iter().map(|a| a.as_str()).collect();
        assert_eq!(to, ["boss@acme.example", "ops@acme.example"]);
        assert_eq!(
            fields(req(json!({"kind": "scan_to_email", "subject": "s"})).validate(&password_cfg())),
            ["to"]
        );
    }

    #[test]
    fn foreign_from_and_header_injection() {
        assert_eq!(
            fields(
                req(json!({"kind": "test", "from": "evil@else.example", "to": ["a@b.example"], "subject": "s"}))
                    .validate(&password_cfg())
            ),
            ["from"]
        );
        assert_eq!(
            fields(
                req(json!({"kind": "test", "to": ["a@b.example\r\nBcc: x@y.example", "ok@b.example", "nope"], "subject": "s\r\nBcc: x@y.example"}))
                    .validate(&password_cfg())
            ),
            ["to[0]", "to[2]", "subject"]
        );
        assert_eq!(
            fields(
                req(json!({"kind": "test", "to": ["a@b.example"], "subject": "s",
                    "attachments": [{"filename": "a\r\n.pdf", "content_type": "application/pdf", "content_base64": "AA=="}]}))
                    .validate(&password_cfg())
            ),
            ["attachments[0].filename"]
        );
        assert_eq!(
            fields(
                req(json!({"kind": "test", "to": ["a@b.example"], "subject": "s",
                    "attachments": [{"filename": "a.pdf", "content_type": "application/pdf", "content_base64": "!!"}]}))
                    .validate(&password_cfg())
            ),
            ["attachments[0].content_base64"]
        );
    }

    #[test]
    fn microsoft_oauth_sender_is_the_authorized_user() {
        let c = cfg(
            json!({"method": "oauth2", "authorization_username": "reports@acme.example"}),
            "microsoft365",
        );
        // the default sender is not the authorized user
        assert_eq!(
            fields(
                req(json!({"kind": "test", "to": ["a@b.example"], "subject": "s"})).validate(&c)
            ),
            ["from"]
        );
        let m = req(json!({"kind": "report", "to": ["a@b.example"], "subject": "s"}))
            .validate(&c)
            .unwrap();
        assert_eq!(m.content.from.as_str(), "reports@acme.example");
        assert!(
            req(json!({"kind": "test", "from": "Reports@Acme.example", "to": ["a@b.example"], "subject": "s"}))
                .validate(&c)
                .is_ok()
        );
    }

    /// Inline attachments are decoded while the request is parsed: padded or not, with line
    /// breaks (escaped in JSON) or without, from the body's bytes; anything else is refused
    /// by validation with the field.
    #[test]
    fn base64_attachments_are_decoded_while_parsing() {
        for text in ["AAEC/w==", "AAEC/w", "AAEC\\r\\n/w==", " AAEC\\n/w== "] {
            let body = format!(
                r#"{{"kind":"test","to":["a@b.example"],"subject":"s","attachments":[{{"filename":"a.bin","content_type":"application/octet-stream","content_base64":"{text}"}}]}}"#
            );
            let r: MessageRequest = serde_json::from_slice(body.as_bytes()).unwrap();
            assert_eq!(
                r.attachments[0].content_base64.0,
                Ok(vec![0, 1, 2, 255]),
                "{text}"
            );
            let m = r.validate(&password_cfg()).unwrap();
            assert_eq!(m.attachments, vec![vec![0u8, 1, 2, 255]]);
            assert_eq!(m.content.attachments[0].size, 4);
        }
        for text in ["!!", "AAEC/w=", "A"] {
            assert_eq!(Base64Content::decode(text).0, Err(InvalidBase64), "{text}");
        }
        // Longer than one piece, in CRLF-separated lines of 76 as MIME writes it, with and
        // without padding; padding inside the text is refused as a whole decode refuses it.
        use base64::engine::general_purpose::STANDARD;
        // 49,152 and 98,304 bytes: exactly one and two pieces of base64.
        for len in [200_000usize, 200_001, 200_002, 49_152, 98_304] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let b64 = STANDARD.encode(&data);
            let wrapped = b64
                .as_bytes()
                .chunks(76)
                .map(|l| std::str::from_utf8(l).unwrap())
                .collect::<Vec<_>>()
                .join("\r\n");
            assert_eq!(Base64Content::decode(&wrapped).0, Ok(data.clone()), "{len}");
            let unpadded = b64.trim_end_matches('=');
            assert_eq!(Base64Content::decode(unpadded).0, Ok(data), "{len}");
        }
        // a first piece that ends in valid padding, and more after it
        let early_padding = format!("{}AA==AAAA", "A".repeat(64 * 1024 - 4));
        assert_eq!(Base64Content::decode(&early_padding).0, Err(InvalidBase64));
    }
}
