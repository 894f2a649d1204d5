//! The cluster-admin context's email settings: server, encryption, no auth or username and
//! password, and senders. OAuth 2.0 is not supported here (the seed's last limitation).

use chrono::{DateTime, Utc};
use mail_core::crypto::Binding;
use mail_core::problem::FieldError;
use mail_core::settings::{
    Auth, AuthMethod, AuthRequest, EmailSettings, EmailSettingsRequest, FeatureSendersRequest,
    ProviderId, SecretAction, SecretPatch, SenderRequest, SenderView, ServerRequest, ServerView,
    StoredState,
};
use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue::Set, EntityTrait};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::store::entities::cluster_settings;
use crate::store::{CLUSTER_OWNER, Store};

const ROW: &str = "cluster";
pub const COL_CLUSTER_PASSWORD: &str = "cluster_settings.password";

/// `PUT /api/v1/cluster/email-settings` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettingsRequest {
    pub server: ServerRequest,
    pub auth: ClusterAuthRequest,
    /// Senders of invitation emails; exactly one is the default.
    pub senders: Vec<SenderRequest>,
    #[serde(default)]
    #[schema(ignore)]
    pub updated_at: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterAuthRequest {
    /// `none` or `password`. `oauth2` is refused: OAuth 2.0 is not supported in the
    /// cluster-admin context.
    pub method: AuthMethod,
    pub username: Option<String>,
    /// Write-only. Omit to keep the stored password, `null` to clear it.
    #[serde(default)]
    #[schema(value_type = Option<String>, format = Password, write_only)]
    pub password: SecretPatch,
    #[serde(default)]
    #[schema(ignore)]
    pub password_set: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClusterAuthView {
    pub method: AuthMethod,
    pub username: Option<String>,
    /// True when a password is stored (it is never shown).
    pub password_set: bool,
}

/// The cluster email settings (secrets never shown).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ClusterSettingsView {
    pub server: ServerView,
    pub auth: ClusterAuthView,
    pub senders: Vec<SenderView>,
    pub updated_at: DateTime<Utc>,
}

pub struct StoredCluster {
    pub settings: EmailSettings,
    pub password_set: bool,
    pub updated_at: DateTime<Utc>,
}

impl StoredCluster {
    pub fn view(&self) -> ClusterSettingsView {
        let v = self.settings.view(self.password_set, false);
        ClusterSettingsView {
            server: v.server,
            auth: ClusterAuthView {
                method: v.auth.method,
                username: v.auth.username,
                password_set: self.password_set,
            },
            senders: v.senders,
            updated_at: self.updated_at,
        }
    }
}

impl ClusterSettingsRequest {
    /// Validated through the same rules as a tenant's settings, plus the cluster's own: no
    /// OAuth 2.0, at least one sender.
    fn validate(
        self,
        stored: Option<&StoredCluster>,
    ) -> Result<(EmailSettings, SecretAction), Vec<FieldError>> {
        let mut extra = Vec::new();
        if self.auth.method == AuthMethod::Oauth2 {
            return Err(vec![FieldError {
                field: "auth.method".into(),
                message: "OAuth 2.0 is not supported in the cluster-admin context: invitation emails can use no authentication or username and password only".into(),
            }]);
        }
        if self.senders.is_empty() {
            extra.push(FieldError {
                field: "senders".into(),
                message: "at least one sender is required to send invitations".into(),
            });
        }
        let req = EmailSettingsRequest {
            provider: ProviderId::Custom,
            server: self.server,
            auth: AuthRequest {
                method: self.auth.method,
                username: self.auth.username,
                password: self.auth.password,
                client_id: None,
                client_secret: SecretPatch::Keep,
                client_secret_expires_at: None,
                authorization_url: None,
                token_url: None,
                issuer: None,
                microsoft_directory: None,
                scopes: None,
                authorization_username: None,
                password_set: None,
                client_secret_set: None,
            },
            senders: self.senders,
            receivers: Vec::new(),
            feature_senders: FeatureSendersRequest::default(),
            oauth: None,
            updated_at: None,
        };
        let result = req.validate(&StoredState {
            settings: stored.map(|s| &s.settings),
            password_set: stored.is_some_and(|s| s.password_set),
            client_secret_set: false,
        });
        match result {
            Ok(change) if extra.is_empty() => Ok((change.settings, change.password)),
            Ok(_) => Err(extra),
            Err(mut e) => {
                e.append(&mut extra);
                Err(e)
            }
        }
    }
}

impl Store {
    pub async fn cluster_settings(&self) -> ApiResult<Option<StoredCluster>> {
        let Some(row) = cluster_settings::Entity::find_by_id(ROW.to_owned())
            .one(&self.db)
            .await?
        else {
            return Ok(None);
        };
        let settings: EmailSettings = serde_json::from_str(&row.document)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored cluster settings: {e}")))?;
        Ok(Some(StoredCluster {
            settings,
            password_set: row.password_ct.is_some(),
            updated_at: row.updated_at,
        }))
    }

    pub async fn cluster_password(&self) -> ApiResult<Option<SecretString>> {
        let row = cluster_settings::Entity::find_by_id(ROW.to_owned())
            .one(&self.db)
            .await?;
        row.and_then(|r| r.password_ct)
            .map(|ct| {
                self.keys
                    .decrypt_string(
                        Binding {
                            owner: CLUSTER_OWNER,
                            column: COL_CLUSTER_PASSWORD,
                        },
                        &ct,
                    )
                    .map_err(|e| ApiError::Internal(anyhow::anyhow!("cluster password: {e}")))
            })
            .transpose()
    }

    pub async fn put_cluster_settings(
        &self,
        req: ClusterSettingsRequest,
        now: DateTime<Utc>,
    ) -> ApiResult<StoredCluster> {
        let current = self.cluster_settings().await?;
        let (settings, password) = req
            .validate(current.as_ref())
            .map_err(ApiError::Validation)?;
        let old_ct = cluster_settings::Entity::find_by_id(ROW.to_owned())
            .one(&self.db)
            .await?
            .and_then(|r| r.password_ct);
        let password_ct = match password {
            SecretAction::Keep => old_ct,
            SecretAction::Clear => None,
            SecretAction::Set(p) => Some(self.keys.encrypt(
                Binding {
                    owner: CLUSTER_OWNER,
                    column: COL_CLUSTER_PASSWORD,
                },
                p.expose_secret().as_bytes(),
            )),
        };
        let document = serde_json::to_string(&settings)
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("cluster settings: {e}")))?;
        cluster_settings::Entity::insert(cluster_settings::ActiveModel {
            id: Set(ROW.to_owned()),
            document: Set(document),
            password_ct: Set(password_ct.clone()),
            updated_at: Set(now),
        })
        .on_conflict(
            OnConflict::column(cluster_settings::Column::Id)
                .update_columns([
                    cluster_settings::Column::Document,
                    cluster_settings::Column::PasswordCt,
                    cluster_settings::Column::UpdatedAt,
                ])
                .to_owned(),
        )
        .exec(&self.db)
        .await?;
        Ok(StoredCluster {
            settings,
            password_set: password_ct.is_some(),
            updated_at: now,
        })
    }
}

/// The SMTP target and default sender of the cluster settings.
pub async fn cluster_target(
    store: &Store,
) -> ApiResult<Option<(mail_core::smtp::SmtpTarget, mail_core::domain::EmailAddress)>> {
    let Some(c) = store.cluster_settings().await? else {
        return Ok(None);
    };
    let auth = match &c.settings.auth {
        Auth::Password { username } => match store.cluster_password().await? {
            Some(password) => mail_core::smtp::SmtpAuth::Password {
                username: username.clone(),
                password,
            },
            None => return Ok(None),
        },
        _ => mail_core::smtp::SmtpAuth::None,
    };
    let Some(from) = c
        .settings
        .senders
        .iter()
        .find(|s| s.default)
        .map(|s| s.address.clone())
    else {
        return Ok(None);
    };
    Ok(Some((
        mail_core::smtp::SmtpTarget::new(&c.settings.server, auth),
        from,
    )))
}
