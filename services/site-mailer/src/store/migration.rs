//! The site mailer's own schema (`site-mailer.db`), run at start-up.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(Outbox), Box::new(ContentApart)]
    }
}

/// The outbox (one row per accepted message; attachments live in files) and a small
/// key-value table for local state (the last effective configuration, cached tokens).
/// Times are milliseconds since the Unix epoch.
struct Outbox;

impl MigrationName for Outbox {
    /// Recorded in `seaql_migrations`: never change it.
    fn name(&self) -> &str {
        "m20261129_000001_outbox"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Outbox {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table("messages")
                .col(string("id").primary_key())
                .col(string_null("idempotency_key").unique_key())
                .col(string_null("request_hash"))
                .col(string("kind"))
                .col(string("status"))
                .col(string("message_id"))
                .col(text("content"))
                .col(integer("attempts").default(0))
                .col(text_null("reason"))
                .col(text_null("last_error"))
                .col(text_null("smtp_reply"))
                .col(big_integer("next_attempt_ms"))
                .col(big_integer("created_ms"))
                .col(big_integer("updated_ms"))
                .col(big_integer_null("sent_ms"))
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_messages_due")
                .table("messages")
                .col("status")
                .col("next_attempt_ms")
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table("local_state")
                .col(string("key").primary_key())
                .col(text("value"))
                .col(big_integer("updated_ms"))
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in ["local_state", "messages"] {
            m.drop_table(Table::drop().table(t).to_owned()).await?;
        }
        Ok(())
    }
}

/// The message content moves to a table of its own. It never changes after the accept, but
/// SQLite rewrites a whole row (a 5 KB content spans overflow pages) on every update: the
/// status changes (claimed, sent, retried) now rewrite a row of a few dozen bytes.
struct ContentApart;

impl MigrationName for ContentApart {
    /// Recorded in `seaql_migrations`: never change it.
    fn name(&self) -> &str {
        "m20261129_000002_message_content"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for ContentApart {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        db.execute_unprepared(
            "CREATE TABLE message_content (id TEXT NOT NULL PRIMARY KEY, content TEXT NOT NULL)",
        )
        .await?;
        db.execute_unprepared(
            "INSERT INTO message_content (id, content) SELECT id, content FROM messages",
        )
        .await?;
        db.execute_unprepared("ALTER TABLE messages DROP COLUMN content")
            .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        let db = m.get_connection();
        db.execute_unprepared("ALTER TABLE messages ADD COLUMN content TEXT NOT NULL DEFAULT ''")
            .await?;
        db.execute_unprepared(
            "UPDATE messages SET content = \
             (SELECT content FROM message_content c WHERE c.id = messages.id)",
        )
        .await?;
        db.execute_unprepared("DROP TABLE message_content").await?;
        Ok(())
    }
}
