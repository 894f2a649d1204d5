//! Value types that cannot hold a bad value. Request DTOs are converted into these once;
//! code past that point never re-checks them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An RFC 5322 address (`local@domain`), as lettre parses it. No display name, no CR/LF.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EmailAddress(lettre::Address);

impl EmailAddress {
    pub fn parse(s: &str) -> Result<Self, String> {
        if has_line_break_or_control(s) {
            return Err("must not contain control characters (CR/LF)".into());
        }
        let s = trim_blanks(s);
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        lettre::Address::from_str(s)
            .map(Self)
            .map_err(|e| format!("is not a valid email address ({e})"))
    }
    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }
    pub fn address(&self) -> &lettre::Address {
        &self.0
    }
    /// Case-insensitive comparison of the whole address (domains are case-insensitive, and
    /// providers treat local parts so as well).
    pub fn same_mailbox(&self, other: &Self) -> bool {
        self.as_str().eq_ignore_ascii_case(other.as_str())
    }
}

impl TryFrom<String> for EmailAddress {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}
impl From<EmailAddress> for String {
    fn from(a: EmailAddress) -> String {
        a.as_str().to_owned()
    }
}
impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
impl fmt::Debug for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EmailAddress({})", self.as_str())
    }
}

/// An SMTP server host: a DNS name or an IP address literal.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
#[serde(try_from = "String", into = "String")]
pub struct SmtpHost(String);

impl SmtpHost {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = trim_blanks(s);
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        let bare = s.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<IpAddr>().is_ok() {
            return Ok(Self(bare.to_owned()));
        }
        let name = s.strip_suffix('.').unwrap_or(s);
        if name.len() > 253 {
            return Err("must be at most 253 characters".into());
        }
        for label in name.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err("is not a valid host name (empty or over-long label)".into());
            }
            if !label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(
                    "is not a valid host name (letters, digits, '-' and '.' only; no scheme or port)"
                        .into(),
                );
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err("is not a valid host name (a label starts or ends with '-')".into());
            }
        }
        Ok(Self(name.to_ascii_lowercase()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for SmtpHost {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}
impl From<SmtpHost> for String {
    fn from(h: SmtpHost) -> String {
        h.0
    }
}

/// A TCP port, 1–65535.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug)]
#[serde(try_from = "i64", into = "u16")]
pub struct Port(u16);

impl Port {
    pub fn parse(n: i64) -> Result<Self, String> {
        match u16::try_from(n) {
            Ok(p) if p != 0 => Ok(Self(p)),
            _ => Err(format!("must be between 1 and 65535, got {n}")),
        }
    }
    pub fn get(self) -> u16 {
        self.0
    }
}
impl TryFrom<i64> for Port {
    type Error = String;
    fn try_from(n: i64) -> Result<Self, String> {
        Self::parse(n)
    }
}
impl From<Port> for u16 {
    fn from(p: Port) -> u16 {
        p.0
    }
}

/// An OAuth endpoint URL: `https`, or plain `http` only for loopback hosts (local peers).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
#[serde(try_from = "String", into = "String")]
pub struct OAuthUrl(url::Url);

impl OAuthUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = trim_blanks(s);
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if has_line_break_or_control(s) {
            return Err("must not contain control characters (CR/LF)".into());
        }
        if s.len() > MAX_URL_LEN {
            return Err(format!("must be at most {MAX_URL_LEN} characters"));
        }
        let u = url::Url::parse(s).map_err(|e| format!("is not a valid URL ({e})"))?;
        if u.cannot_be_a_base() || u.host().is_none() {
            return Err("must be an absolute URL with a host".into());
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err("must not contain credentials".into());
        }
        if u.fragment().is_some() {
            return Err("must not contain a fragment".into());
        }
        match u.scheme() {
            "https" => Ok(Self(u)),
            "http" if is_loopback_host(&u) => Ok(Self(u)),
            "http" => Err("must use https (plain http is allowed only for loopback hosts)".into()),
            other => Err(format!("must use https, not {other}")),
        }
    }
    /// An authorization endpoint: an OAuth URL whose query does not set a parameter of the
    /// flow itself (Postwire sets those; a stored `redirect_uri=` or `response_type=` would
    /// let the settings choose where the provider sends the code).
    pub fn parse_authorization(s: &str) -> Result<Self, String> {
        let u = Self::parse(s)?;
        u.check_no_flow_params()?;
        Ok(u)
    }
    /// Refuses a query that sets one of [`AUTHORIZATION_FLOW_PARAMS`] (names compared
    /// case-insensitively, after percent-decoding).
    pub fn check_no_flow_params(&self) -> Result<(), String> {
        for (k, _) in self.0.query_pairs() {
            if let Some(p) = AUTHORIZATION_FLOW_PARAMS
                .iter()
                .find(|p| p.eq_ignore_ascii_case(&k))
            {
                return Err(format!(
                    "must not set `{p}` in its query: Postwire sets it (the redirect URI is fixed by POSTWIRE_PUBLIC_URL)"
                ));
            }
        }
        Ok(())
    }
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
    pub fn url(&self) -> &url::Url {
        &self.0
    }
}

/// The longest OAuth endpoint URL accepted (browsers and providers handle 2 kB URLs; the
/// authorization URL grows by Postwire's own parameters on top).
pub const MAX_URL_LEN: usize = 2048;

/// The parameters of an authorization request that Postwire sets itself.
pub const AUTHORIZATION_FLOW_PARAMS: &[&str] = &[
    "response_type",
    "response_mode",
    "client_id",
    "redirect_uri",
    "state",
    "scope",
    "code_challenge",
    "code_challenge_method",
    "nonce",
    "request",
    "request_uri",
];

fn is_loopback_host(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

impl TryFrom<String> for OAuthUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}
impl From<OAuthUrl> for String {
    fn from(u: OAuthUrl) -> String {
        u.0.into()
    }
}

/// A tenant id: 1–63 characters, lower-case letters, digits and '-', starting with a letter or
/// digit (it appears in URLs, cache keys and AADs).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Debug, PartialOrd, Ord)]
#[serde(try_from = "String", into = "String")]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(s: &str) -> Result<Self, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(
                "must be 1 to 63 characters of a-z, 0-9 and '-', starting with a letter or digit"
                    .into(),
            )
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl TryFrom<String> for TenantId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}
impl From<TenantId> for String {
    fn from(t: TenantId) -> String {
        t.0
    }
}
impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Trims spaces and tabs only. `str::trim` would also drop a CR, LF, NEL or Unicode line
/// separator at either end, silently accepting a value that carries one; with this, the
/// control-character checks refuse it instead.
pub fn trim_blanks(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// A control character (C0 incl. CR, LF, NUL; DEL; C1 incl. NEL) or a Unicode line or
/// paragraph separator: none of these may reach a header or an SMTP command.
pub fn has_line_break_or_control(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}')
}

/// Free text that ends up in a header (display names, subjects): no control characters.
pub fn header_text(s: &str, max: usize) -> Result<String, String> {
    if has_line_break_or_control(s) {
        return Err("must not contain control characters (CR/LF)".into());
    }
    if s.chars().count() > max {
        return Err(format!("must be at most {max} characters"));
    }
    Ok(trim_blanks(s).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_at_either_end_are_refused_not_trimmed() {
        for bad in [
            "a@b.example\r\n",
            "\na@b.example",
            "a@b.example\u{2028}",
            "a@b.example\u{85}",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad:?}");
            assert!(header_text(bad, 100).is_err(), "{bad:?}");
        }
        assert_eq!(
            EmailAddress::parse("  a@b.example ").unwrap().as_str(),
            "a@b.example"
        );
        assert_eq!(header_text(" Acme ", 100).unwrap(), "Acme");
    }

    #[test]
    fn email_addresses() {
        assert!(EmailAddress::parse("alice@example.com").is_ok());
        assert!(EmailAddress::parse("alice").is_err());
        assert!(EmailAddress::parse("alice@example.com\r\nBcc: x@y.z").is_err());
        assert!(EmailAddress::parse("Alice <alice@example.com>").is_err());
        assert!(EmailAddress::parse("").is_err());
    }

    #[test]
    fn hosts() {
        assert_eq!(
            SmtpHost::parse("SMTP.Office365.com").unwrap().as_str(),
            "smtp.office365.com"
        );
        assert_eq!(SmtpHost::parse("[::1]").unwrap().as_str(), "::1");
        assert!(SmtpHost::parse("127.0.0.1").is_ok());
        assert!(SmtpHost::parse("smtp://x").is_err());
        assert!(SmtpHost::parse("x:25").is_err());
        assert!(SmtpHost::parse("a..b").is_err());
        assert!(SmtpHost::parse("-a.b").is_err());
        assert!(SmtpHost::parse(&"a".repeat(64)).is_err());
    }

    #[test]
    fn ports() {
        assert!(Port::parse(0).is_err());
        assert!(Port::parse(65536).is_err());
        assert!(Port::parse(-1).is_err());
        assert_eq!(Port::parse(587).unwrap().get(), 587);
    }

    #[test]
    fn oauth_urls() {
        assert!(OAuthUrl::parse("https://login.microsoftonline.com/x/oauth2/v2.0/token").is_ok());
        assert!(OAuthUrl::parse("http://127.0.0.1:8080/token").is_ok());
        assert!(OAuthUrl::parse("http://localhost/token").is_ok());
        assert!(OAuthUrl::parse("http://example.com/token").is_err());
        assert!(OAuthUrl::parse("ftp://example.com/token").is_err());
        assert!(OAuthUrl::parse("https://user:pw@example.com/").is_err());
        assert!(OAuthUrl::parse("/relative").is_err());
    }

    #[test]
    fn tenant_ids() {
        assert!(TenantId::parse("acme").is_ok());
        assert!(TenantId::parse("acme-2").is_ok());
        assert!(TenantId::parse("Acme").is_err());
        assert!(TenantId::parse("-acme").is_err());
        assert!(TenantId::parse("").is_err());
        assert!(TenantId::parse("a/b").is_err());
    }
}
