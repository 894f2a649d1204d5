//! The Management Service schema. The same migrations run on SQLite (embedded default) and
//! PostgreSQL (production), at start-up and through `management-service migrate`.

pub use sea_orm_migration::prelude::*;

mod m20261128_000001_foundation;
mod m20261128_000002_oauth;
mod m20261128_000003_provisioning;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_foundation::Migration),
            Box::new(m20261128_000002_oauth::Migration),
            Box::new(m20261128_000003_provisioning::Migration),
        ]
    }
}
