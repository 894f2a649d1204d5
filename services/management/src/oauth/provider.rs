//! Talking to an OAuth 2.0 provider: the code exchange and refresh (oauth2 crate over the
//! egress-checked client, no redirects), and ID-token checks (nonce, signature against the
//! provider's JWKS where one is known).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use mail_core::egress::EgressClient;
use mail_core::presets::{self, with_directory};
use mail_core::settings::{OAuthSettings, ProviderId};
use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse,
    BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AccessToken, AuthUrl, AuthorizationCode, ClientId, ClientSecret, EndpointNotSet, EndpointSet,
    HttpRequest, HttpResponse, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError,
    Scope, StandardRevocableToken, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};

/// A token response that accepts `expires_in` as a number or a string (Microsoft sends
/// strings at times) and carries the ID token.
#[derive(Debug, Serialize, Deserialize)]
pub struct ProviderTokenResponse {
    access_token: AccessToken,
    #[serde(deserialize_with = "oauth2::helpers::deserialize_untagged_enum_case_insensitive")]
    token_type: BasicTokenType,
    #[serde(default, deserialize_with = "lenient_u64")]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<RefreshToken>,
    #[serde(rename = "scope", default)]
    #[serde(deserialize_with = "oauth2::helpers::deserialize_space_delimited_vec")]
    scopes: Option<Vec<Scope>>,
    #[serde(default)]
    pub id_token: Option<String>,
}

fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        Num(u64),
        Float(f64),
        Str(String),
    }
    Ok(match Option::<N>::deserialize(d)? {
        None => None,
        Some(N::Num(n)) => Some(n),
        Some(N::Float(f)) if f >= 0.0 => Some(f as u64),
        Some(N::Float(_)) => None,
        Some(N::Str(s)) => Some(s.trim().parse().map_err(serde::de::Error::custom)?),
    })
}

impl TokenResponse for ProviderTokenResponse {
    type TokenType = BasicTokenType;
    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.map(Duration::from_secs)
    }
    fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        self.scopes.as_ref()
    }
}

type Client = oauth2::Client<
    BasicErrorResponse,
    ProviderTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// The outcome of a token request, classified for the grant's state machine.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The grant is dead (revoked, expired, rotated away): reauthorization is required.
    #[error("{code}: {description}")]
    InvalidGrant { code: String, description: String },
    /// The provider refused for another reason that retrying will not fix (bad client...).
    #[error("{code}: {description}")]
    Rejected { code: String, description: String },
    /// Network, 5xx, 429, malformed answer: retry later.
    #[error("{0}")]
    Transient(String),
}

impl ProviderError {
    pub fn summary(&self) -> String {
        self.to_string()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AdapterError(String);

/// oauth2's HTTP client trait over the egress-checked reqwest client.
pub struct Http<'a>(pub &'a EgressClient);

impl<'c> oauth2::AsyncHttpClient<'c> for Http<'_> {
    type Error = AdapterError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, AdapterError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let req =
                reqwest::Request::try_from(request).map_err(|e| AdapterError(e.to_string()))?;
            let resp = self
                .0
                .execute(req)
                .await
                .map_err(|e| AdapterError(e.to_string()))?;
            let mut builder = http::Response::builder().status(resp.status());
            for (k, v) in resp.headers() {
                builder = builder.header(k, v);
            }
            let body = resp
                .bytes()
                .await
                .map_err(|e| AdapterError(e.to_string()))?;
            builder
                .body(body.to_vec())
                .map_err(|e| AdapterError(e.to_string()))
        })
    }
}

fn client(
    s: &OAuthSettings,
    secret: &SecretString,
    redirect_uri: &str,
) -> Result<Client, ProviderError> {
    let bad = |e: String| ProviderError::Rejected {
        code: "configuration".into(),
        description: e,
    };
    Ok(oauth2::Client::new(ClientId::new(s.client_id.clone()))
        .set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()))
        .set_auth_uri(
            AuthUrl::new(s.authorization_url.as_str().to_owned())
                .map_err(|e| bad(e.to_string()))?,
        )
        .set_token_uri(
            TokenUrl::new(s.token_url.as_str().to_owned()).map_err(|e| bad(e.to_string()))?,
        )
        .set_redirect_uri(
            RedirectUrl::new(redirect_uri.to_owned()).map_err(|e| bad(e.to_string()))?,
        ))
}

fn classify<RE: std::error::Error + 'static>(
    e: RequestTokenError<RE, BasicErrorResponse>,
) -> ProviderError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let code = r.error().to_string();
            let description = r.error_description().cloned().unwrap_or_default();
            match r.error() {
                BasicErrorResponseType::InvalidGrant => {
                    ProviderError::InvalidGrant { code, description }
                }
                BasicErrorResponseType::Extension(x)
                    if x == "temporarily_unavailable" || x == "server_error" =>
                {
                    ProviderError::Transient(format!("{code}: {description}"))
                }
                _ => ProviderError::Rejected { code, description },
            }
        }
        RequestTokenError::Request(e) => {
            ProviderError::Transient(format!("token endpoint unreachable: {e}"))
        }
        RequestTokenError::Parse(e, body) => {
            let text = String::from_utf8_lossy(&body);
            let snippet: String = text.chars().take(200).collect();
            ProviderError::Transient(format!("unexpected token endpoint answer ({e}): {snippet}"))
        }
        RequestTokenError::Other(e) => ProviderError::Transient(e),
    }
}

/// The authorization URL the admin's browser is sent to.
pub fn authorization_url(
    provider: ProviderId,
    s: &OAuthSettings,
    redirect_uri: &str,
    state: &str,
    challenge: &oauth2::PkceCodeChallenge,
    nonce: &str,
) -> Result<String, ProviderError> {
    // Settings stored before this check existed are refused here as well.
    s.authorization_url
        .check_no_flow_params()
        .map_err(|description| ProviderError::Rejected {
            code: "invalid_authorization_url".into(),
            description,
        })?;
    let secret = SecretString::from(String::new());
    let c = client(s, &secret, redirect_uri)?;
    let state_owned = state.to_owned();
    let mut req = c
        .authorize_url(move || oauth2::CsrfToken::new(state_owned))
        .set_pkce_challenge(challenge.clone())
        .add_extra_param("nonce", nonce);
    for scope in &s.scopes {
        req = req.add_scope(Scope::new(scope.clone()));
    }
    // Preset extras (Google: access_type=offline&prompt=consent), unless the stored URL has
    // them already.
    for (k, v) in presets::preset(provider).auth.authorization_params {
        if !s
            .authorization_url
            .url()
            .query_pairs()
            .any(|(qk, _)| qk == k.as_str())
        {
            req = req.add_extra_param(k, v);
        }
    }
    let (url, _) = req.url();
    Ok(url.to_string())
}

pub struct Tokens {
    pub access_token: SecretString,
    pub expires_in: Duration,
    pub refresh_token: Option<SecretString>,
    pub id_token: Option<String>,
}

fn tokens(r: ProviderTokenResponse) -> Tokens {
    Tokens {
        access_token: SecretString::from(r.access_token.secret().to_owned()),
        // Without expires_in, assume the common one hour.
        expires_in: r
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(3600)),
        refresh_token: r
            .refresh_token
            .map(|t| SecretString::from(t.secret().to_owned())),
        id_token: r.id_token,
    }
}

pub async fn exchange_code(
    http: &EgressClient,
    s: &OAuthSettings,
    secret: &SecretString,
    redirect_uri: &str,
    code: &str,
    verifier: &str,
) -> Result<Tokens, ProviderError> {
    let c = client(s, secret, redirect_uri)?;
    c.exchange_code(AuthorizationCode::new(code.to_owned()))
        .set_pkce_verifier(PkceCodeVerifier::new(verifier.to_owned()))
        .request_async(&Http(http))
        .await
        .map(tokens)
        .map_err(classify)
}

pub async fn refresh(
    http: &EgressClient,
    s: &OAuthSettings,
    secret: &SecretString,
    redirect_uri: &str,
    refresh_token: &SecretString,
) -> Result<Tokens, ProviderError> {
    let c = client(s, secret, redirect_uri)?;
    let rt = RefreshToken::new(refresh_token.expose_secret().to_owned());
    let mut req = c.exchange_refresh_token(&rt);
    for scope in &s.scopes {
        req = req.add_scope(Scope::new(scope.clone()));
    }
    req.request_async(&Http(http))
        .await
        .map(tokens)
        .map_err(classify)
}

// ------------------------------------------------------------------ ID token

/// Where the ID-token signing keys come from, and which issuer to expect.
pub struct IdTokenKeys {
    pub jwks_uri: Option<String>,
    pub issuer: Option<String>,
}

/// The provider's expected issuer (for RFC 9207 `iss` and the ID token) and JWKS location.
pub async fn id_token_keys(
    http: &EgressClient,
    provider: ProviderId,
    s: &OAuthSettings,
) -> Result<IdTokenKeys, String> {
    let preset = presets::preset(provider);
    let dir = s.microsoft_directory.as_deref();
    if let Some(issuer) = &s.issuer {
        // Discovery for custom providers (and explicit issuers).
        let base = issuer.as_str().trim_end_matches('/');
        #[derive(Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: Option<String>,
        }
        let d: Discovery = http
            .get_json(&format!("{base}/.well-known/openid-configuration"))
            .await
            .map_err(|e| format!("OpenID discovery at {base}: {e}"))?;
        return Ok(IdTokenKeys {
            jwks_uri: d.jwks_uri,
            issuer: Some(d.issuer),
        });
    }
    Ok(IdTokenKeys {
        jwks_uri: preset.auth.jwks_uri.map(|u| with_directory(&u, dir)),
        // Multi-tenant Microsoft directories issue tokens with the user's own tenant as
        // issuer, so only a concrete directory pins it.
        issuer: preset
            .auth
            .issuer
            .map(|u| with_directory(&u, dir))
            .filter(|u| !u.contains("/organizations/") && !u.contains("/common/")),
    })
}

#[derive(Debug, Deserialize)]
pub struct IdClaims {
    pub nonce: Option<String>,
    pub preferred_username: Option<String>,
    pub email: Option<String>,
    pub upn: Option<String>,
}

impl IdClaims {
    /// The username to prefill: `preferred_username`, `email` or `upn`, the first that is an
    /// email address.
    pub fn username(&self) -> Option<mail_core::domain::EmailAddress> {
        [&self.preferred_username, &self.email, &self.upn]
            .into_iter()
            .flatten()
            .find_map(|u| mail_core::domain::EmailAddress::parse(u).ok())
    }
}

/// The claims of an ID token read without checking its signature (the payload, base64url
/// JSON). Public for the fuzz target `id_token_username`.
#[doc(hidden)]
pub fn unverified_id_claims(id_token: &str) -> Result<IdClaims, String> {
    let payload = id_token.split('.').nth(1).ok_or("ID token: malformed")?;
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| "ID token: malformed")?;
    serde_json::from_slice(&bytes).map_err(|e| format!("ID token: {e}"))
}

/// Checks an ID token: the nonce always; the signature, audience and issuer when the
/// provider's keys are known.
pub async fn verify_id_token(
    http: &EgressClient,
    keys: &IdTokenKeys,
    client_id: &str,
    id_token: &str,
    nonce: &str,
) -> Result<IdClaims, String> {
    let header = jsonwebtoken::decode_header(id_token).map_err(|e| format!("ID token: {e}"))?;
    let claims: IdClaims = match &keys.jwks_uri {
        Some(uri) => {
            let jwks: jsonwebtoken::jwk::JwkSet = http
                .get_json(uri)
                .await
                .map_err(|e| format!("JWKS {uri}: {e}"))?;
            let jwk = match &header.kid {
                Some(kid) => jwks.find(kid),
                None => jwks.keys.first(),
            }
            .ok_or("ID token: no JWKS key matches its kid")?;
            let key = jsonwebtoken::DecodingKey::from_jwk(jwk)
                .map_err(|e| format!("ID token key: {e}"))?;
            use jsonwebtoken::Algorithm::*;
            if !matches!(
                header.alg,
                RS256 | RS384 | RS512 | PS256 | PS384 | PS512 | ES256 | ES384 | EdDSA
            ) {
                return Err(format!(
                    "ID token: algorithm {:?} is not accepted",
                    header.alg
                ));
            }
            let mut v = jsonwebtoken::Validation::new(header.alg);
            v.set_audience(&[client_id]);
            match &keys.issuer {
                Some(iss) => v.set_issuer(&[iss]),
                None => v.iss = None,
            }
            v.leeway = 120;
            jsonwebtoken::decode::<IdClaims>(id_token, &key, &v)
                .map_err(|e| format!("ID token signature or claims: {e}"))?
                .claims
        }
        // No keys known: the token came straight from the token endpoint over TLS; use it
        // only to prefill the username.
        None => unverified_id_claims(id_token)?,
    };
    if claims.nonce.as_deref() != Some(nonce) {
        return Err("ID token: the nonce does not match this authorization".into());
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_as_string_or_number() {
        let a: ProviderTokenResponse = serde_json::from_str(
            r#"{"access_token":"a","token_type":"Bearer","expires_in":"3599","refresh_token":"r"}"#,
        )
        .unwrap();
        assert_eq!(a.expires_in, Some(3599));
        let b: ProviderTokenResponse =
            serde_json::from_str(r#"{"access_token":"a","token_type":"bearer","expires_in":3600}"#)
                .unwrap();
        assert_eq!(b.expires_in, Some(3600));
        assert!(b.refresh_token.is_none());
    }

    #[test]
    fn unverified_claims_of_an_id_token() {
        // header.payload.signature; the payload (base64url JSON) is all that is read
        let c = unverified_id_claims(
            "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJub25jZSI6Im4iLCJwcmVmZXJyZWRfdXNlcm5hbWUiOiJub3QgYW4gYWRkcmVzcyIsImVtYWlsIjoiYUBiLmV4YW1wbGUifQ.c2ln",
        )
        .unwrap();
        assert_eq!(c.nonce.as_deref(), Some("n"));
        assert_eq!(c.username().unwrap().as_str(), "a@b.example");
        assert!(unverified_id_claims("no dots").is_err());
        assert!(unverified_id_claims("a.!!!.c").is_err());
        assert!(
            unverified_id_claims("a.bnVsbA.c").is_err(),
            "payload `null`"
        );
    }

    #[test]
    fn username_prefers_preferred_username() {
        let c = IdClaims {
            nonce: None,
            preferred_username: Some("not an address".into()),
            email: Some("a@b.example".into()),
            upn: Some("u@b.example".into()),
        };
        assert_eq!(c.username().unwrap().as_str(), "a@b.example");
    }
}
