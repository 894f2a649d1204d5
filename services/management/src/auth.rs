//! Identity: bearer JWTs (jsonwebtoken) and the extractors that enforce roles. The tenant
//! check lives in [`TenantScope`], which every tenant store function requires, so a handler
//! cannot reach tenant data without it.

use std::future::{Ready, ready};

use actix_web::{FromRequest, HttpRequest, dev::Payload, http::header, web};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use mail_core::domain::TenantId;
use secrecy::{ExposeSecret, SecretSlice};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::{ExternalIssuer, ExternalKeys};
use crate::error::ApiError;
use crate::startup::AppState;

/// Issuer and audience of tokens signed with the instance key.
pub const INSTANCE_ISSUER: &str = "postwire";
pub const INSTANCE_AUDIENCE: &str = "postwire";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    ClusterAdmin,
    TenantAdmin,
    Site,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ClusterAdmin => "cluster_admin",
            Role::TenantAdmin => "tenant_admin",
            Role::Site => "site",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    pub iss: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
}

/// Signs and verifies tokens. HS256 tokens are checked only against the instance key; an
/// external issuer's tokens only against its public key and pinned algorithms, so neither
/// key can be confused for the other.
pub struct Jwt {
    encoding: EncodingKey,
    decoding: DecodingKey,
    external: Option<(ExternalKeySet, Validation)>,
}

/// An external issuer's verification keys.
enum ExternalKeySet {
    Pem(DecodingKey),
    /// Keys from a JWKS URL, replaced by [`Jwt::set_jwks`] as they are (re)fetched.
    Jwks(std::sync::RwLock<jsonwebtoken::jwk::JwkSet>),
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("external", &self.external.is_some())
            .finish()
    }
}

impl Jwt {
    pub fn new(
        secret: &SecretSlice<u8>,
        external: Option<&ExternalIssuer>,
    ) -> anyhow::Result<Self> {
        let encoding = EncodingKey::from_secret(secret.expose_secret())?;
        let decoding = DecodingKey::from_secret(secret.expose_secret())?;
        let external = match external {
            None => None,
            Some(ext) => {
                let first = ext.algorithms.first().copied().unwrap_or(Algorithm::RS256);
                let key = match &ext.keys {
                    ExternalKeys::Pem(pem) => ExternalKeySet::Pem(
                        match first {
                            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(pem),
                            Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
                            _ => DecodingKey::from_rsa_pem(pem),
                        }
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "POSTWIRE_JWT_PUBLIC_KEY_FILE: not a usable public key: {e}"
                            )
                        })?,
                    ),
                    ExternalKeys::JwksUrl(_) => {
                        ExternalKeySet::Jwks(std::sync::RwLock::new(jsonwebtoken::jwk::JwkSet {
                            keys: Vec::new(),
                        }))
                    }
                };
                let mut v = Validation::new(first);
                v.algorithms = ext.algorithms.clone();
                v.set_issuer(&[&ext.issuer]);
                v.set_audience(&[&ext.audience]);
                v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
                Some((key, v))
            }
        };
        Ok(Self {
            encoding,
            decoding,
            external,
        })
    }

    /// Replaces the external issuer's keys (JWKS URL mode); returns how many keys it holds.
    pub fn set_jwks(&self, jwks: jsonwebtoken::jwk::JwkSet) -> usize {
        if let Some((ExternalKeySet::Jwks(set), _)) = &self.external
            && let Ok(mut w) = set.write()
        {
            *w = jwks;
            return w.keys.len();
        }
        0
    }

    /// Signs a token with the instance key.
    pub fn issue(
        &self,
        role: Role,
        tenant: Option<&str>,
        site: Option<&str>,
        sub: &str,
        now: i64,
        ttl_secs: i64,
    ) -> anyhow::Result<String> {
        let claims = Claims {
            sub: sub.to_owned(),
            role,
            tenant: tenant.map(str::to_owned),
            site: site.map(str::to_owned),
            iss: INSTANCE_ISSUER.to_owned(),
            aud: INSTANCE_AUDIENCE.to_owned(),
            exp: now + ttl_secs,
            iat: now,
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let bad = ApiError::Unauthorized("the bearer token is invalid or expired");
        let header = jsonwebtoken::decode_header(token).map_err(|_| bad_token())?;
        let data = if header.alg == Algorithm::HS256 {
            let mut v = Validation::new(Algorithm::HS256);
            v.set_issuer(&[INSTANCE_ISSUER]);
            v.set_audience(&[INSTANCE_AUDIENCE]);
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            v.leeway = 5;
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
        } else if let Some((keys, v)) = &self.external {
            if !v.algorithms.contains(&header.alg) {
                return Err(bad);
            }
            let key = match keys {
                ExternalKeySet::Pem(k) => k.clone(),
                ExternalKeySet::Jwks(set) => {
                    let set = set.read().map_err(|_| bad_token())?;
                    let jwk = match &header.kid {
                        Some(kid) => set.find(kid),
                        None if set.keys.len() == 1 => set.keys.first(),
                        None => None,
                    }
                    .ok_or_else(bad_token)?;
                    DecodingKey::from_jwk(jwk).map_err(|_| bad_token())?
                }
            };
            jsonwebtoken::decode::<Claims>(token, &key, v)
        } else {
            return Err(bad);
        };
        let claims = data.map_err(|_| bad_token())?.claims;
        // A tenant-bound role without a valid tenant claim is not a token we issued.
        match claims.role {
            Role::ClusterAdmin => {}
            Role::TenantAdmin => {
                if claims
                    .tenant
                    .as_deref()
                    .map(TenantId::parse)
                    .is_none_or(|r| r.is_err())
                {
                    return Err(bad_token());
                }
            }
            Role::Site => {
                if claims
                    .tenant
                    .as_deref()
                    .map(TenantId::parse)
                    .is_none_or(|r| r.is_err())
                    || claims.site.is_none()
                {
                    return Err(bad_token());
                }
            }
        }
        Ok(claims)
    }
}

fn bad_token() -> ApiError {
    ApiError::Unauthorized("the bearer token is invalid or expired")
}

fn state(req: &HttpRequest) -> Result<&web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("application state missing")))
}

fn bearer(req: &HttpRequest) -> Result<&str, ApiError> {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(ApiError::Unauthorized("a bearer token is required"))?
        .to_str()
        .map_err(|_| bad_token())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(bad_token)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::Unauthorized("a bearer token is required"));
    }
    Ok(token.trim())
}

/// Any authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal(pub Claims);

impl Principal {
    /// `role:sub`, what the audit log records as the actor.
    pub fn actor(&self) -> String {
        self.0.sub.clone()
    }
    pub fn role(&self) -> Role {
        self.0.role
    }
}

impl FromRequest for Principal {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready((|| {
            let token = bearer(req)?;
            let claims = state(req)?.jwt.verify(token)?;
            let span = tracing::Span::current();
            span.record("role", claims.role.as_str());
            Ok(Principal(claims))
        })())
    }
}

/// A tenant admin or a cluster admin, for operations that touch no tenant's data.
#[derive(Debug, Clone)]
pub struct AnyAdmin(pub Principal);

impl FromRequest for AnyAdmin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, p: &mut Payload) -> Self::Future {
        ready(Principal::from_request(req, p).into_inner().and_then(|p| {
            if p.role() == Role::Site {
                Err(ApiError::Forbidden(
                    "site tokens cannot call admin operations".into(),
                ))
            } else {
                Ok(AnyAdmin(p))
            }
        }))
    }
}

/// A cluster admin (Cloud Central).
#[derive(Debug, Clone)]
pub struct ClusterAdmin(pub Principal);

impl FromRequest for ClusterAdmin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, p: &mut Payload) -> Self::Future {
        ready(Principal::from_request(req, p).into_inner().and_then(|p| {
            if p.role() == Role::ClusterAdmin {
                Ok(ClusterAdmin(p))
            } else {
                Err(ApiError::Forbidden(
                    "this operation needs the cluster_admin role".into(),
                ))
            }
        }))
    }
}

/// An admin acting on the tenant named by the `{tenant_id}` path segment: a cluster admin,
/// or that tenant's own admin. Another tenant's admin gets 404, exactly as for a missing
/// tenant, so tenant ids cannot be probed.
#[derive(Debug, Clone)]
pub struct TenantScope {
    tenant: TenantId,
    principal: Principal,
}

impl TenantScope {
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }
    pub fn principal(&self) -> &Principal {
        &self.principal
    }
    /// For internal callers that act with the authority of the system (CLI, workers).
    pub fn system(tenant: TenantId) -> Self {
        Self {
            tenant,
            principal: Principal(Claims {
                sub: "system".into(),
                role: Role::ClusterAdmin,
                tenant: None,
                site: None,
                iss: INSTANCE_ISSUER.into(),
                aud: INSTANCE_AUDIENCE.into(),
                exp: 0,
                iat: 0,
            }),
        }
    }
}

pub fn tenant_not_found() -> ApiError {
    ApiError::NotFound("no such tenant".into())
}

impl FromRequest for TenantScope {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, p: &mut Payload) -> Self::Future {
        ready(Principal::from_request(req, p).into_inner().and_then(|p| {
            let tenant = req
                .match_info()
                .get("tenant_id")
                .and_then(|t| TenantId::parse(t).ok())
                .ok_or_else(tenant_not_found)?;
            match p.role() {
                Role::ClusterAdmin => {}
                Role::TenantAdmin if p.0.tenant.as_deref() == Some(tenant.as_str()) => {}
                Role::TenantAdmin => return Err(tenant_not_found()),
                Role::Site => {
                    return Err(ApiError::Forbidden(
                        "site tokens cannot call admin operations".into(),
                    ));
                }
            }
            tracing::Span::current().record("tenant_id", tenant.as_str());
            Ok(TenantScope {
                tenant,
                principal: p,
            })
        }))
    }
}

/// A site, authenticated by its site JWT.
#[derive(Debug, Clone)]
pub struct SiteIdentity {
    pub tenant: TenantId,
    pub site_id: String,
}

impl FromRequest for SiteIdentity {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;
    fn from_request(req: &HttpRequest, p: &mut Payload) -> Self::Future {
        ready(Principal::from_request(req, p).into_inner().and_then(|p| {
            if p.role() != Role::Site {
                return Err(ApiError::Forbidden(
                    "this operation needs a site token".into(),
                ));
            }
            let tenant =
                p.0.tenant
                    .as_deref()
                    .and_then(|t| TenantId::parse(t).ok())
                    .ok_or_else(bad_token)?;
            let site_id = p.0.site.clone().ok_or_else(bad_token)?;
            tracing::Span::current().record("tenant_id", tenant.as_str());
            tracing::Span::current().record("site_id", site_id.as_str());
            Ok(SiteIdentity { tenant, site_id })
        }))
    }
}
