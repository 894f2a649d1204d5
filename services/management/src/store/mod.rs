//! Persistence (sea-orm). Knows nothing of HTTP. Every function that touches one tenant's
//! data takes a [`TenantScope`], which only the authorization extractor (or the system)
//! can build.

pub mod entities;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use mail_core::crypto::{Binding, KeyRing};
use mail_core::domain::{EmailAddress, TenantId};
use mail_core::settings::{
    Auth, EmailSettings, EmailSettingsRequest, SecretAction, Server, StoredState,
};
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection,
    DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::auth::{Principal, TenantScope, tenant_not_found};
use crate::error::{ApiError, ApiResult};
use entities::{audit, email_settings, meta, site, tenant};

/// Owner used in AADs and the audit log for cluster-level records.
pub const CLUSTER_OWNER: &str = "_cluster";

pub const COL_PASSWORD: &str = "email_settings.password";
pub const COL_CLIENT_SECRET: &str = "email_settings.client_secret";
pub const COL_SITE_PASSWORD: &str = "sites.override_password";
const MASTER_KEY_CHECK: &str = "master_key_check";
const CHECK_PLAINTEXT: &[u8] = b"postwire master key check v1";

#[derive(Clone)]
pub struct Store {
    pub db: DatabaseConnection,
    pub keys: Arc<KeyRing>,
}

/// Tenant lifecycle status: a suspended tenant's sites are refused tokens and configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    Active,
    Suspended,
}

impl TenantStatus {
    fn as_str(self) -> &'static str {
        match self {
            TenantStatus::Active => "active",
            TenantStatus::Suspended => "suspended",
        }
    }
    fn parse(s: &str) -> Self {
        if s == "suspended" {
            TenantStatus::Suspended
        } else {
            TenantStatus::Active
        }
    }
}

/// A tenant as stored.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub admin_emails: Vec<EmailAddress>,
    pub status: TenantStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl TryFrom<tenant::Model> for Tenant {
    type Error = ApiError;
    fn try_from(m: tenant::Model) -> Result<Self, ApiError> {
        Ok(Tenant {
            id: TenantId::parse(&m.id).map_err(|e| anyhow::anyhow!("stored tenant id: {e}"))?,
            name: m.name,
            admin_emails: serde_json::from_str(&m.admin_emails)
                .map_err(|e| anyhow::anyhow!("stored admin_emails: {e}"))?,
            status: TenantStatus::parse(&m.status),
            created_at: m.created_at,
            updated_at: m.updated_at,
        })
    }
}

/// Validated input of `PUT /tenants/{id}`.
pub struct TenantInput {
    pub name: String,
    pub admin_emails: Vec<EmailAddress>,
    pub status: Option<TenantStatus>,
}

/// The stored email settings of a tenant.
pub struct StoredSettings {
    pub settings: EmailSettings,
    pub password_set: bool,
    pub client_secret_set: bool,
    pub updated_at: DateTime<Utc>,
}

/// A site's override: server and password auth only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteOverride {
    pub server: Server,
    pub auth: Auth,
}

/// The password of a site override, as a create or update leaves it.
pub enum SitePassword {
    /// No password (no auth).
    None,
    /// Keep the stored one (an update that did not send it).
    Keep,
    Set(SecretString),
}

pub struct Site {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub override_: Option<SiteOverride>,
    pub override_password_set: bool,
    pub created_at: DateTime<Utc>,
}

fn internal(context: &'static str) -> impl FnOnce(serde_json::Error) -> ApiError {
    move |e| ApiError::Internal(anyhow::Error::new(e).context(context))
}

impl Store {
    pub fn new(db: DatabaseConnection, keys: Arc<KeyRing>) -> Self {
        Self { db, keys }
    }

    // ------------------------------------------------------------ instance

    /// Refuses a master key that cannot decrypt the check value stored by an earlier start;
    /// stores the check value on the first start.
    pub async fn verify_master_key(&self) -> anyhow::Result<()> {
        let binding = Binding {
            owner: CLUSTER_OWNER,
            column: "instance_meta.master_key_check",
        };
        match meta::Entity::find_by_id(MASTER_KEY_CHECK.to_owned())
            .one(&self.db)
            .await?
        {
            Some(row) => match self.keys.decrypt(binding, &row.value) {
                Ok(v) if v.expose_secret() == CHECK_PLAINTEXT => Ok(()),
                Ok(_) => anyhow::bail!("POSTWIRE_MASTER_KEY: the stored check value is corrupt"),
                Err(e) => anyhow::bail!(
                    "POSTWIRE_MASTER_KEY: the configured key(s) cannot decrypt this database's check value ({e}); refusing to start so that no unreadable secrets are written"
                ),
            },
            None => {
                let value = self.keys.encrypt(binding, CHECK_PLAINTEXT);
                meta::Entity::insert(meta::ActiveModel {
                    key: Set(MASTER_KEY_CHECK.to_owned()),
                    value: Set(value),
                })
                .on_conflict_do_nothing_on([meta::Column::Key])
                .exec(&self.db)
                .await?;
                Ok(())
            }
        }
    }

    /// Re-encrypts every stored secret under the primary key. Returns how many were rewritten.
    pub async fn rotate_keys(&self) -> anyhow::Result<usize> {
        let txn = self.db.begin().await?;
        let mut n = 0;
        for row in email_settings::Entity::find().all(&txn).await? {
            let mut am: email_settings::ActiveModel = row.clone().into();
            let mut changed = false;
            if let Some(ct) = &row.password_ct
                && self.keys.needs_rotation(ct)
            {
                am.password_ct = Set(Some(self.reencrypt(&row.tenant_id, COL_PASSWORD, ct)?));
                changed = true;
                n += 1;
            }
            if let Some(ct) = &row.client_secret_ct
                && self.keys.needs_rotation(ct)
            {
                am.client_secret_ct = Set(Some(self.reencrypt(
                    &row.tenant_id,
                    COL_CLIENT_SECRET,
                    ct,
                )?));
                changed = true;
                n += 1;
            }
            if changed {
                am.update(&txn).await?;
            }
        }
        for row in site::Entity::find().all(&txn).await? {
            if let Some(ct) = &row.override_password_ct
                && self.keys.needs_rotation(ct)
            {
                let new = self.reencrypt(&row.tenant_id, COL_SITE_PASSWORD, ct)?;
                let mut am: site::ActiveModel = row.into();
                am.override_password_ct = Set(Some(new));
                am.update(&txn).await?;
                n += 1;
            }
        }
        let binding = Binding {
            owner: CLUSTER_OWNER,
            column: "instance_meta.master_key_check",
        };
        if let Some(row) = meta::Entity::find_by_id(MASTER_KEY_CHECK.to_owned())
            .one(&txn)
            .await?
            && self.keys.needs_rotation(&row.value)
        {
            let mut am: meta::ActiveModel = row.into();
            am.value = Set(self.keys.encrypt(binding, CHECK_PLAINTEXT));
            am.update(&txn).await?;
        }
        txn.commit().await?;
        Ok(n)
    }

    fn reencrypt(&self, owner: &str, column: &str, ct: &[u8]) -> anyhow::Result<Vec<u8>> {
        let b = Binding { owner, column };
        let plain = self
            .keys
            .decrypt(b, ct)
            .map_err(|e| anyhow::anyhow!("{column} of {owner}: {e}"))?;
        Ok(self.keys.encrypt(b, plain.expose_secret()))
    }

    pub async fn ping(&self) -> Result<(), sea_orm::DbErr> {
        self.db.execute_unprepared("SELECT 1").await.map(|_| ())
    }

    // ------------------------------------------------------------ tenants

    #[tracing::instrument(name = "db.tenant", skip_all, fields(otel.kind = "client", tenant_id = %id.as_str()))]
    pub async fn tenant(&self, id: &TenantId) -> ApiResult<Option<Tenant>> {
        tenant::Entity::find_by_id(id.as_str().to_owned())
            .one(&self.db)
            .await?
            .map(Tenant::try_from)
            .transpose()
    }

    /// Creates or updates a tenant; returns it and whether it was created.
    #[tracing::instrument(name = "db.put_tenant", skip_all, fields(otel.kind = "client", tenant_id = %id.as_str()))]
    pub async fn put_tenant(
        &self,
        actor: &Principal,
        id: &TenantId,
        input: TenantInput,
        now: DateTime<Utc>,
    ) -> ApiResult<(Tenant, bool)> {
        let txn = self.db.begin().await?;
        let existing = tenant::Entity::find_by_id(id.as_str().to_owned())
            .one(&txn)
            .await?;
        let emails =
            serde_json::to_string(&input.admin_emails).map_err(internal("admin_emails"))?;
        let (model, created, fields) = match existing {
            None => {
                let m = tenant::ActiveModel {
                    id: Set(id.as_str().to_owned()),
                    name: Set(input.name),
                    admin_emails: Set(emails),
                    status: Set(input
                        .status
                        .unwrap_or(TenantStatus::Active)
                        .as_str()
                        .to_owned()),
                    created_at: Set(now),
                    updated_at: Set(now),
                }
                .insert(&txn)
                .await?;
                (m, true, vec!["*".to_owned()])
            }
            Some(old) => {
                let mut fields = Vec::new();
                if old.name != input.name {
                    fields.push("name".to_owned());
                }
                if old.admin_emails != emails {
                    fields.push("admin_emails".to_owned());
                }
                let status = input
                    .status
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_else(|| old.status.clone());
                if old.status != status {
                    fields.push("status".to_owned());
                }
                if fields.is_empty() {
                    txn.commit().await?;
                    return Ok((Tenant::try_from(old)?, false));
                }
                let mut am: tenant::ActiveModel = old.into();
                am.name = Set(input.name);
                am.admin_emails = Set(emails);
                am.status = Set(status);
                am.updated_at = Set(now);
                (am.update(&txn).await?, false, fields)
            }
        };
        let action = if created {
            "tenant.created"
        } else {
            "tenant.updated"
        };
        audit_insert(&txn, Some(id.as_str()), actor, action, &fields, now).await?;
        txn.commit().await?;
        Ok((Tenant::try_from(model)?, created))
    }

    #[tracing::instrument(name = "db.list_tenants", skip_all, fields(otel.kind = "client"))]
    pub async fn list_tenants(&self, after: Option<&str>, limit: u64) -> ApiResult<Vec<Tenant>> {
        let mut q = tenant::Entity::find().order_by_asc(tenant::Column::Id);
        if let Some(after) = after {
            q = q.filter(tenant::Column::Id.gt(after));
        }
        q.limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(Tenant::try_from)
            .collect()
    }

    /// Deletes a tenant with its settings, secrets and sites. Returns false when it did not
    /// exist.
    #[tracing::instrument(name = "db.delete_tenant", skip_all, fields(otel.kind = "client", tenant_id = %id.as_str()))]
    pub async fn delete_tenant(
        &self,
        actor: &Principal,
        id: &TenantId,
        now: DateTime<Utc>,
    ) -> ApiResult<bool> {
        let txn = self.db.begin().await?;
        let t = id.as_str().to_owned();
        site::Entity::delete_many()
            .filter(site::Column::TenantId.eq(t.clone()))
            .exec(&txn)
            .await?;
        email_settings::Entity::delete_by_id(t.clone())
            .exec(&txn)
            .await?;
        let gone = tenant::Entity::delete_by_id(t)
            .exec(&txn)
            .await?
            .rows_affected
            > 0;
        if gone {
            audit_insert(&txn, Some(id.as_str()), actor, "tenant.deleted", &[], now).await?;
        }
        txn.commit().await?;
        Ok(gone)
    }

    // ------------------------------------------------------------ email settings

    async fn require_tenant<C: ConnectionTrait>(
        &self,
        c: &C,
        scope: &TenantScope,
    ) -> ApiResult<()> {
        tenant::Entity::find_by_id(scope.tenant().as_str().to_owned())
            .one(c)
            .await?
            .map(|_| ())
            .ok_or_else(tenant_not_found)
    }

    #[tracing::instrument(name = "db.settings", skip_all, fields(otel.kind = "client", tenant_id = %scope.tenant().as_str()))]
    pub async fn settings(&self, scope: &TenantScope) -> ApiResult<Option<StoredSettings>> {
        self.require_tenant(&self.db, scope).await?;
        settings_row(&self.db, scope.tenant()).await
    }

    /// Validates and stores new settings; the audit log records which fields changed.
    #[tracing::instrument(name = "db.put_settings", skip_all, fields(otel.kind = "client", tenant_id = %scope.tenant().as_str()))]
    pub async fn put_settings(
        &self,
        scope: &TenantScope,
        req: EmailSettingsRequest,
        now: DateTime<Utc>,
    ) -> ApiResult<StoredSettings> {
        let txn = self.db.begin().await?;
        self.require_tenant(&txn, scope).await?;
        let tenant = scope.tenant().as_str();
        let current = settings_row(&txn, scope.tenant()).await?;
        let change = req
            .validate(&StoredState {
                settings: current.as_ref().map(|c| &c.settings),
                password_set: current.as_ref().is_some_and(|c| c.password_set),
                client_secret_set: current.as_ref().is_some_and(|c| c.client_secret_set),
            })
            .map_err(ApiError::Validation)?;
        let old_row = email_settings::Entity::find_by_id(tenant.to_owned())
            .one(&txn)
            .await?;
        let mut fields =
            EmailSettings::changed_fields(current.as_ref().map(|c| &c.settings), &change.settings);
        let mut apply = |action: SecretAction,
                         old: Option<Vec<u8>>,
                         column: &'static str,
                         field: &str|
         -> Option<Vec<u8>> {
            match action {
                SecretAction::Keep => old,
                SecretAction::Clear => {
                    if old.is_some() {
                        fields.push(field.to_owned());
                    }
                    None
                }
                SecretAction::Set(s) => {
                    fields.push(field.to_owned());
                    Some(self.encrypt_secret(tenant, column, &s))
                }
            }
        };
        let password_ct = apply(
            change.password,
            old_row.as_ref().and_then(|r| r.password_ct.clone()),
            COL_PASSWORD,
            "auth.password",
        );
        let client_secret_ct = apply(
            change.client_secret,
            old_row.as_ref().and_then(|r| r.client_secret_ct.clone()),
            COL_CLIENT_SECRET,
            "auth.client_secret",
        );
        let document = serde_json::to_string(&change.settings).map_err(internal("settings"))?;
        let am = email_settings::ActiveModel {
            tenant_id: Set(tenant.to_owned()),
            document: Set(document),
            password_ct: Set(password_ct.clone()),
            client_secret_ct: Set(client_secret_ct.clone()),
            updated_at: Set(now),
        };
        email_settings::Entity::insert(am)
            .on_conflict(
                OnConflict::column(email_settings::Column::TenantId)
                    .update_columns([
                        email_settings::Column::Document,
                        email_settings::Column::PasswordCt,
                        email_settings::Column::ClientSecretCt,
                        email_settings::Column::UpdatedAt,
                    ])
                    .to_owned(),
            )
            .exec(&txn)
            .await?;
        if !fields.is_empty() {
            audit_insert(
                &txn,
                Some(tenant),
                scope.principal(),
                "email_settings.updated",
                &fields,
                now,
            )
            .await?;
        }
        txn.commit().await?;
        Ok(StoredSettings {
            settings: change.settings,
            password_set: password_ct.is_some(),
            client_secret_set: client_secret_ct.is_some(),
            updated_at: now,
        })
    }

    fn encrypt_secret(&self, owner: &str, column: &str, s: &SecretString) -> Vec<u8> {
        self.keys
            .encrypt(Binding { owner, column }, s.expose_secret().as_bytes())
    }

    /// The stored password of a tenant's settings, decrypted.
    #[tracing::instrument(name = "db.settings_password", skip_all, fields(otel.kind = "client", tenant_id = %tenant.as_str()))]
    pub async fn settings_password(&self, tenant: &TenantId) -> ApiResult<Option<SecretString>> {
        let row = email_settings::Entity::find_by_id(tenant.as_str().to_owned())
            .one(&self.db)
            .await?;
        row.and_then(|r| r.password_ct)
            .map(|ct| {
                self.keys
                    .decrypt_string(
                        Binding {
                            owner: tenant.as_str(),
                            column: COL_PASSWORD,
                        },
                        &ct,
                    )
                    .map_err(|e| ApiError::Internal(anyhow::anyhow!("tenant password: {e}")))
            })
            .transpose()
    }

    // ------------------------------------------------------------ sites

    #[tracing::instrument(name = "db.create_site", skip_all, fields(otel.kind = "client", tenant_id = %scope.tenant().as_str()))]
    pub async fn create_site(
        &self,
        scope: &TenantScope,
        name: String,
        override_: Option<(SiteOverride, SitePassword)>,
        secret_hash: String,
        now: DateTime<Utc>,
    ) -> ApiResult<Site> {
        let txn = self.db.begin().await?;
        self.require_tenant(&txn, scope).await?;
        let tenant = scope.tenant().as_str();
        let id = format!("site_{}", uuid::Uuid::new_v4().simple());
        let (doc, pw) = self.site_override_columns(tenant, override_.as_ref(), None)?;
        let m = site::ActiveModel {
            id: Set(id.clone()),
            tenant_id: Set(tenant.to_owned()),
            name: Set(name),
            secret_hash: Set(secret_hash),
            override_document: Set(doc),
            override_password_ct: Set(pw),
            created_at: Set(now),
        }
        .insert(&txn)
        .await?;
        let mut fields = vec!["name".to_owned()];
        if override_.is_some() {
            fields.push("override".to_owned());
        }
        audit_insert(
            &txn,
            Some(tenant),
            scope.principal(),
            &format!("site.created:{id}"),
            &fields,
            now,
        )
        .await?;
        txn.commit().await?;
        site_from(m)
    }

    /// The stored form of a site override: its document and its password's ciphertext
    /// (`stored`: the ciphertext a `SitePassword::Keep` keeps).
    fn site_override_columns(
        &self,
        tenant: &str,
        override_: Option<&(SiteOverride, SitePassword)>,
        stored: Option<Vec<u8>>,
    ) -> ApiResult<(Option<String>, Option<Vec<u8>>)> {
        let Some((o, pw)) = override_ else {
            return Ok((None, None));
        };
        let doc = serde_json::to_string(o).map_err(internal("site override"))?;
        let ct = match pw {
            SitePassword::Set(p) => Some(self.encrypt_secret(tenant, COL_SITE_PASSWORD, p)),
            SitePassword::Keep => stored,
            SitePassword::None => None,
        };
        Ok((Some(doc), ct))
    }

    /// Replaces a site's name and override (`SitePassword::Keep` keeps the stored password);
    /// `None` when the tenant has no such site.
    #[tracing::instrument(name = "db.update_site", skip_all, fields(otel.kind = "client", tenant_id = %scope.tenant().as_str(), site_id))]
    pub async fn update_site(
        &self,
        scope: &TenantScope,
        site_id: &str,
        name: String,
        override_: Option<(SiteOverride, SitePassword)>,
        now: DateTime<Utc>,
    ) -> ApiResult<Option<Site>> {
        let txn = self.db.begin().await?;
        self.require_tenant(&txn, scope).await?;
        let tenant = scope.tenant().as_str();
        let Some(old) = site::Entity::find_by_id(site_id.to_owned())
            .filter(site::Column::TenantId.eq(tenant))
            .one(&txn)
            .await?
        else {
            return Ok(None);
        };
        let (doc, pw) = self.site_override_columns(
            tenant,
            override_.as_ref(),
            old.override_password_ct.clone(),
        )?;
        let mut fields = Vec::new();
        if old.name != name {
            fields.push("name".to_owned());
        }
        if old.override_document != doc {
            fields.push("override".to_owned());
        }
        if matches!(&override_, Some((_, SitePassword::Set(_))))
            || (old.override_password_ct.is_some() && pw.is_none())
        {
            fields.push("override.auth.password".to_owned());
        }
        let mut m: site::ActiveModel = old.into();
        m.name = Set(name);
        m.override_document = Set(doc);
        m.override_password_ct = Set(pw);
        let m = m.update(&txn).await?;
        audit_insert(
            &txn,
            Some(tenant),
            scope.principal(),
            &format!("site.updated:{site_id}"),
            &fields,
            now,
        )
        .await?;
        txn.commit().await?;
        site_from(m).map(Some)
    }

    #[tracing::instrument(name = "db.sites", skip_all, fields(otel.kind = "client", tenant_id = %scope.tenant().as_str()))]
    pub async fn sites(&self, scope: &TenantScope) -> ApiResult<Vec<Site>> {
        self.require_tenant(&self.db, scope).await?;
        site::Entity::find()
            .filter(site::Column::TenantId.eq(scope.tenant().as_str()))
            .order_by_asc(site::Column::CreatedAt)
            .order_by_asc(site::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .map(site_from)
            .collect()
    }

    #[tracing::instrument(name = "db.delete_site", skip_all, fields(otel.kind = "client", tenant_id = %scope.tenant().as_str(), site_id))]
    pub async fn delete_site(
        &self,
        scope: &TenantScope,
        site_id: &str,
        now: DateTime<Utc>,
    ) -> ApiResult<bool> {
        let txn = self.db.begin().await?;
        self.require_tenant(&txn, scope).await?;
        let gone = site::Entity::delete_many()
            .filter(site::Column::TenantId.eq(scope.tenant().as_str()))
            .filter(site::Column::Id.eq(site_id))
            .exec(&txn)
            .await?
            .rows_affected
            > 0;
        if gone {
            audit_insert(
                &txn,
                Some(scope.tenant().as_str()),
                scope.principal(),
                &format!("site.deleted:{site_id}"),
                &[],
                now,
            )
            .await?;
        }
        txn.commit().await?;
        Ok(gone)
    }

    /// Looks a site up by id for authentication (no tenant scope yet: the secret proves it).
    #[tracing::instrument(name = "db.site_for_auth", skip_all, fields(otel.kind = "client", site_id))]
    pub async fn site_for_auth(&self, site_id: &str) -> ApiResult<Option<(site::Model, Tenant)>> {
        let Some(s) = site::Entity::find_by_id(site_id.to_owned())
            .one(&self.db)
            .await?
        else {
            return Ok(None);
        };
        let tenant = match TenantId::parse(&s.tenant_id) {
            Ok(t) => self.tenant(&t).await?,
            Err(_) => None,
        };
        Ok(tenant.map(|t| (s, t)))
    }

    #[tracing::instrument(name = "db.site_exists", skip_all, fields(otel.kind = "client", tenant_id = %tenant.as_str(), site_id))]
    pub async fn site_exists(&self, tenant: &TenantId, site_id: &str) -> ApiResult<bool> {
        Ok(site::Entity::find_by_id(site_id.to_owned())
            .filter(site::Column::TenantId.eq(tenant.as_str()))
            .one(&self.db)
            .await?
            .is_some())
    }

    /// A site's row and its decrypted override password (for its effective configuration).
    #[tracing::instrument(name = "db.site_of_tenant", skip_all, fields(otel.kind = "client", tenant_id = %tenant.as_str(), site_id))]
    pub async fn site_of_tenant(
        &self,
        tenant: &TenantId,
        site_id: &str,
    ) -> ApiResult<Option<(Site, Option<SecretString>)>> {
        let Some(m) = site::Entity::find_by_id(site_id.to_owned())
            .filter(site::Column::TenantId.eq(tenant.as_str()))
            .one(&self.db)
            .await?
        else {
            return Ok(None);
        };
        let pw = m
            .override_password_ct
            .as_ref()
            .map(|ct| {
                self.keys
                    .decrypt_string(
                        Binding {
                            owner: tenant.as_str(),
                            column: COL_SITE_PASSWORD,
                        },
                        ct,
                    )
                    .map_err(|e| ApiError::Internal(anyhow::anyhow!("site password: {e}")))
            })
            .transpose()?;
        Ok(Some((site_from(m)?, pw)))
    }

    /// A tenant's stored settings without a scope: for a site of that tenant, whose identity
    /// the site token already proves.
    #[tracing::instrument(name = "db.settings_for_site", skip_all, fields(otel.kind = "client", tenant_id = %tenant.as_str()))]
    pub async fn settings_for_site(&self, tenant: &TenantId) -> ApiResult<Option<StoredSettings>> {
        settings_row(&self.db, tenant).await
    }

    // ------------------------------------------------------------ audit

    /// Records an event of a tenant in the audit log.
    #[tracing::instrument(name = "db.audit_event", skip_all, fields(otel.kind = "client", tenant_id = %scope.tenant().as_str(), action))]
    pub async fn audit_event(
        &self,
        scope: &TenantScope,
        action: &str,
        fields: &[String],
        now: DateTime<Utc>,
    ) -> ApiResult<()> {
        let txn = self.db.begin().await?;
        audit_insert(
            &txn,
            Some(scope.tenant().as_str()),
            scope.principal(),
            action,
            fields,
            now,
        )
        .await?;
        txn.commit().await?;
        Ok(())
    }

    #[tracing::instrument(name = "db.audit", skip_all, fields(otel.kind = "client", tenant_id = %scope.tenant().as_str()))]
    pub async fn audit(&self, scope: &TenantScope, limit: u64) -> ApiResult<Vec<audit::Model>> {
        self.require_tenant(&self.db, scope).await?;
        Ok(audit::Entity::find()
            .filter(audit::Column::TenantId.eq(scope.tenant().as_str()))
            .order_by_desc(audit::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }
}

fn site_from(m: site::Model) -> ApiResult<Site> {
    Ok(Site {
        override_: m
            .override_document
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(internal("site override"))?,
        override_password_set: m.override_password_ct.is_some(),
        id: m.id,
        tenant_id: m.tenant_id,
        name: m.name,
        created_at: m.created_at,
    })
}

async fn settings_row<C: ConnectionTrait>(
    c: &C,
    tenant: &TenantId,
) -> ApiResult<Option<StoredSettings>> {
    let Some(row) = email_settings::Entity::find_by_id(tenant.as_str().to_owned())
        .one(c)
        .await?
    else {
        return Ok(None);
    };
    let settings: EmailSettings =
        serde_json::from_str(&row.document).map_err(internal("stored settings"))?;
    Ok(Some(StoredSettings {
        settings,
        password_set: row.password_ct.is_some(),
        client_secret_set: row.client_secret_ct.is_some(),
        updated_at: row.updated_at,
    }))
}

async fn audit_insert(
    txn: &DatabaseTransaction,
    tenant: Option<&str>,
    actor: &Principal,
    action: &str,
    fields: &[String],
    now: DateTime<Utc>,
) -> ApiResult<()> {
    audit::ActiveModel {
        tenant_id: Set(tenant.map(str::to_owned)),
        actor: Set(actor.actor()),
        role: Set(actor.role().as_str().to_owned()),
        action: Set(action.to_owned()),
        fields: Set(serde_json::to_string(fields).map_err(internal("audit"))?),
        at: Set(now),
        ..Default::default()
    }
    .insert(txn)
    .await?;
    Ok(())
}
