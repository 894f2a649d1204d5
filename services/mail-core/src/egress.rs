//! Where outbound connections (OAuth token/discovery/JWKS, SMTP) may go, checked after DNS
//! resolution, at connect time (`POSTWIRE_EGRESS_ALLOW`): keywords `public`, `private`
//! (RFC 1918, CGNAT, ULA), `loopback`, or CIDRs. Link-local (cloud metadata), unspecified,
//! multicast and reserved addresses are reachable only when listed as a CIDR.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

/// Turns a host name into addresses. The system resolver is the default; a test installs one
/// it controls, e.g. to make a name resolve to another address between two connections (DNS
/// rebinding). Whatever it answers is judged by the policy before any connection is made.
pub trait HostResolver: Send + Sync + std::fmt::Debug {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// The operating system's resolver (`getaddrinfo` through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl HostResolver for SystemResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

#[derive(Debug, Clone)]
pub struct EgressPolicy {
    public: bool,
    private: bool,
    loopback: bool,
    cidrs: Vec<IpNet>,
    resolver: Arc<dyn HostResolver>,
}

/// Two policies are equal when they allow the same addresses (the resolver is not compared).
impl PartialEq for EgressPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.public == other.public
            && self.private == other.private
            && self.loopback == other.loopback
            && self.cidrs == other.cidrs
    }
}
impl Eq for EgressPolicy {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    Loopback,
    Private,
    Public,
    /// Link-local (incl. metadata), unspecified, multicast, broadcast, reserved, documentation.
    Special,
}

#[derive(Debug, thiserror::Error)]
#[error("egress to {host} ({addrs}) is not allowed by POSTWIRE_EGRESS_ALLOW ({policy})")]
pub struct EgressDenied {
    pub host: String,
    pub addrs: String,
    pub policy: String,
}

impl EgressPolicy {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut p = EgressPolicy {
            public: false,
            private: false,
            loopback: false,
            cidrs: Vec::new(),
            resolver: Arc::new(SystemResolver),
        };
        for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match part {
                "public" => p.public = true,
                "private" => p.private = true,
                "loopback" => p.loopback = true,
                cidr => p.cidrs.push(cidr.parse::<IpNet>().map_err(|_| {
                    format!("`{cidr}` is neither a keyword (public, private, loopback) nor a CIDR")
                })?),
            }
        }
        Ok(p)
    }

    /// The same policy, resolving names with `resolver` instead of the system resolver.
    pub fn with_resolver(mut self, resolver: Arc<dyn HostResolver>) -> Self {
        self.resolver = resolver;
        self
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.cidrs.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        match classify(ip) {
            AddressClass::Loopback => self.loopback,
            AddressClass::Private => self.private,
            AddressClass::Public => self.public,
            AddressClass::Special => false,
        }
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = Vec::new();
        for (on, name) in [
            (self.public, "public"),
            (self.private, "private"),
            (self.loopback, "loopback"),
        ] {
            if on {
                parts.push(name.into());
            }
        }
        parts.extend(self.cidrs.iter().map(|c| c.to_string()));
        parts.join(",")
    }

    fn denied(&self, host: &str, addrs: &[IpAddr]) -> EgressDenied {
        EgressDenied {
            host: host.to_owned(),
            addrs: addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            policy: self.describe(),
        }
    }

    /// Resolves `host` and keeps the addresses the policy allows; none allowed is an error.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let all: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => self
                .resolver
                .lookup(bare, port)
                .await
                .map_err(|e| ResolveError::Dns(host.to_owned(), e))?,
        };
        let allowed: Vec<SocketAddr> = all
            .iter()
            .copied()
            .filter(|a| self.allows(a.ip()))
            .collect();
        if allowed.is_empty() {
            let ips: Vec<IpAddr> = all.iter().map(|a| a.ip()).collect();
            return Err(ResolveError::Denied(self.denied(host, &ips)));
        }
        Ok(allowed)
    }

    /// Checks a URL whose host is an IP literal (DNS resolution is skipped for those).
    pub fn check_url(&self, url: &url::Url) -> Result<(), EgressDenied> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            _ => return Ok(()),
        };
        if self.allows(ip) {
            Ok(())
        } else {
            Err(self.denied(url.host_str().unwrap_or_default(), &[ip]))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot resolve {0}: {1}")]
    Dns(String, std::io::Error),
    #[error(transparent)]
    Denied(EgressDenied),
}

/// IPv4-mapped and -compatible IPv6 addresses are judged as the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

pub fn classify(ip: IpAddr) -> AddressClass {
    match canonical(ip) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    let o = ip.octets();
    if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_private() || (o[0] == 100 && (64..128).contains(&o[1])) {
        AddressClass::Private
    } else if ip.is_unspecified()
        || o[0] == 0
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || o[0] >= 240
        || ip.is_documentation()
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
    {
        AddressClass::Special
    } else {
        AddressClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let s = ip.segments();
    if ip.is_loopback() {
        AddressClass::Loopback
    } else if ip.is_unspecified()
        || ip.is_multicast()
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] == 0xfd00 && s[1] == 0x0ec2) // AWS IPv6 metadata fd00:ec2::/32
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] == 0x0064 && s[1] == 0xff9b) // NAT64: judge by the embedded IPv4 address
            && classify_v4(Ipv4Addr::new(
                (s[6] >> 8) as u8,
                s[6] as u8,
                (s[7] >> 8) as u8,
                s[7] as u8,
            )) != AddressClass::Public
    {
        AddressClass::Special
    } else if (s[0] & 0xfe00) == 0xfc00 {
        AddressClass::Private
    } else if (s[0] & 0xe000) == 0x2000 || (s[0] == 0x0064 && s[1] == 0xff9b) {
        AddressClass::Public
    } else {
        AddressClass::Special
    }
}

/// A DNS resolver for reqwest that drops addresses the policy refuses, so the check holds at
/// connect time even when a name resolves differently later than when it was saved.
struct PolicyResolver {
    policy: Arc<EgressPolicy>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = policy
                .resolve(&host, 0)
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An HTTP client for calls to OAuth providers: egress policy after DNS, no redirects (a
/// redirect from a token endpoint is an SSRF hole), short connect timeout, and no idle
/// connections kept: every call resolves the name again and is judged by the policy on the
/// current answer (provider calls are rare: a refresh per grant and hour at most).
#[derive(Clone, Debug)]
pub struct EgressClient {
    client: reqwest::Client,
    policy: Arc<EgressPolicy>,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Denied(#[from] EgressDenied),
    #[error("{0}")]
    Request(String),
}

impl EgressClient {
    pub fn new(
        policy: Arc<EgressPolicy>,
        connect_timeout: Duration,
        extra_ca_file: Option<&Path>,
    ) -> Result<Self, String> {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // Never through HTTP(S)_PROXY / ALL_PROXY: a proxy resolves and connects to the
            // host itself, so the policy below would never see the address.
            .no_proxy()
            .pool_max_idle_per_host(0)
            .connect_timeout(connect_timeout)
            .timeout(connect_timeout + Duration::from_secs(20))
            .user_agent(concat!("postwire/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(PolicyResolver {
                policy: policy.clone(),
            }));
        if let Some(path) = extra_ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                format!(
                    "POSTWIRE_EXTRA_CA_FILE: cannot read {}: {e}",
                    path.display()
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("POSTWIRE_EXTRA_CA_FILE: {e}"))?;
            b = b.tls_certs_merge(certs);
        }
        let client = b.build().map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self { client, policy })
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    pub fn inner(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends a request after checking IP-literal hosts against the policy.
    pub async fn execute(&self, req: reqwest::Request) -> Result<reqwest::Response, HttpError> {
        self.policy.check_url(req.url())?;
        self.client.execute(req).await.map_err(|e| {
            // Name the cause chain (egress refusals surface from inside the resolver).
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            HttpError::Request(msg)
        })
    }

    /// GET a JSON document.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
    ) -> Result<T, HttpError> {
        let req = self
            .client
            .get(url)
            .header("accept", "application/json")
            .build()
            .map_err(|e| HttpError::Request(e.to_string()))?;
        let resp = self.execute(req).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(HttpError::Request(format!("GET {url}: HTTP {status}")));
        }
        resp.json::<T>()
            .await
            .map_err(|e| HttpError::Request(format!("GET {url}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classes() {
        for (a, c) in [
            ("127.0.0.1", AddressClass::Loopback),
            ("::1", AddressClass::Loopback),
            ("10.1.2.3", AddressClass::Private),
            ("172.20.0.1", AddressClass::Private),
            ("192.168.1.1", AddressClass::Private),
            ("100.64.0.1", AddressClass::Private),
            ("fd12::1", AddressClass::Private),
            ("169.254.169.254", AddressClass::Special),
            ("fe80::1", AddressClass::Special),
            ("0.0.0.0", AddressClass::Special),
            ("::", AddressClass::Special),
            ("224.0.0.1", AddressClass::Special),
            ("ff02::1", AddressClass::Special),
            ("255.255.255.255", AddressClass::Special),
            ("fd00:ec2::254", AddressClass::Special),
            ("::ffff:169.254.169.254", AddressClass::Special),
            ("::ffff:10.0.0.1", AddressClass::Private),
            ("::ffff:127.0.0.1", AddressClass::Loopback),
            ("64:ff9b::a9fe:a9fe", AddressClass::Special),
            ("8.8.8.8", AddressClass::Public),
            ("2606:4700::1111", AddressClass::Public),
        ] {
            assert_eq!(classify(ip(a)), c, "{a}");
        }
    }

    #[test]
    fn policy() {
        let p = EgressPolicy::parse("public,loopback").unwrap();
        assert!(p.allows(ip("8.8.8.8")));
        assert!(p.allows(ip("127.0.0.1")));
        assert!(!p.allows(ip("10.0.0.1")));
        assert!(!p.allows(ip("169.254.169.254")));
        assert!(!p.allows(ip("::ffff:169.254.169.254")));
        let p = EgressPolicy::parse("public,169.254.169.254/32").unwrap();
        assert!(p.allows(ip("169.254.169.254")));
        assert!(EgressPolicy::parse("public,intranet").is_err());
    }

    /// The site mailer's default reaches LAN mail servers but still never link-local,
    /// metadata, unspecified or multicast addresses, in any IPv6 spelling.
    #[test]
    fn site_mailer_default_still_refuses_special_addresses() {
        let p = EgressPolicy::parse("public,private,loopback").unwrap();
        for ok in [
            "10.0.0.25",
            "192.168.1.10",
            "fd12::25",
            "::ffff:10.0.0.25",
            "127.0.0.1",
        ] {
            assert!(p.allows(ip(ok)), "{ok}");
        }
        for bad in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "::ffff:a9fe:a9fe",
            "fe80::1",
            "fd00:ec2::254",
            "64:ff9b::a9fe:a9fe",
            "0.0.0.0",
            "::",
            "::ffff:0.0.0.0",
            "224.0.0.251",
            "ff02::fb",
            "255.255.255.255",
        ] {
            assert!(!p.allows(ip(bad)), "{bad}");
        }
    }

    /// An injected resolver's answers are judged like the system's.
    #[tokio::test]
    async fn injected_resolver_is_judged() {
        #[derive(Debug)]
        struct Fixed(Vec<IpAddr>);
        impl HostResolver for Fixed {
            fn lookup<'a>(
                &'a self,
                _host: &'a str,
                port: u16,
            ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>
            {
                let v = self.0.iter().map(|i| SocketAddr::new(*i, port)).collect();
                Box::pin(async move { Ok(v) })
            }
        }
        let p = EgressPolicy::parse("public,loopback")
            .unwrap()
            .with_resolver(Arc::new(Fixed(vec![
                ip("169.254.169.254"),
                ip("127.0.0.1"),
            ])));
        let got = p.resolve("mail.example", 25).await.unwrap();
        assert_eq!(got, vec![SocketAddr::new(ip("127.0.0.1"), 25)]);
        let p = p.with_resolver(Arc::new(Fixed(vec![ip("::ffff:169.254.169.254")])));
        assert!(matches!(
            p.resolve("mail.example", 25).await,
            Err(ResolveError::Denied(_))
        ));
    }

    #[tokio::test]
    async fn resolution_is_checked() {
        let p = EgressPolicy::parse("public").unwrap();
        let err = p.resolve("localhost", 80).await.unwrap_err();
        assert!(err.to_string().contains("not allowed"), "{err}");
        let p = EgressPolicy::parse("loopback").unwrap();
        assert!(!p.resolve("localhost", 80).await.unwrap().is_empty());
        let u = url::Url::parse("http://169.254.169.254/latest/meta-data").unwrap();
        assert!(p.check_url(&u).is_err());
    }
}
