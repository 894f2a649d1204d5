//! Persistence of the outbox (sea-orm on SQLite, `site-mailer.db` in the data dir) and of the
//! attachment files. Knows nothing of HTTP.
//!
//! Durability: WAL. Accepted messages are committed with `synchronous=FULL`, so an accepted
//! message survives a power loss; attachment files are written and fsynced (with their
//! directory) before the row that refers to them is committed. Every other write (outcomes,
//! retries, local state) runs with `synchronous=NORMAL`: it survives a crash of the
//! process, and only a power loss (or an OS crash) may undo the last ones, never an accept
//! (the next FULL commit syncs the whole log). Undoing one means at worst a message sent
//! twice (`sent` back to `queued`, same Message-ID), never a message lost. A claim writes
//! nothing (see [`Store::claim`]). All
//! writes go through one connection (SQLite has one writer anyway); reads use a small pool
//! of their own.

pub mod migration;
pub mod writer;

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, QueryResult,
    Statement, TransactionTrait, Value,
};
use sea_orm_migration::MigratorTrait as _;

use crate::domain::MessageKind;
use crate::state_crypto::StateCipher;

/// Where a message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    Sending,
    Sent,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Sending => "sending",
            Status::Sent => "sent",
            Status::Failed => "failed",
        }
    }
    fn parse(s: &str) -> Result<Self, DbErr> {
        Ok(match s {
            "queued" => Status::Queued,
            "sending" => Status::Sending,
            "sent" => Status::Sent,
            "failed" => Status::Failed,
            other => return Err(DbErr::Type(format!("unknown message status `{other}`"))),
        })
    }
}

/// A stored message.
#[derive(Debug, Clone)]
pub struct MessageRow {
    pub id: String,
    pub kind: MessageKind,
    pub status: Status,
    pub message_id: String,
    pub attempts: i64,
    pub reason: Option<String>,
    pub last_error: Option<String>,
    pub smtp_reply: Option<String>,
    pub next_attempt_ms: i64,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub sent_ms: Option<i64>,
}

const COLUMNS: &str = "id, kind, status, message_id, attempts, reason, last_error, \
                       smtp_reply, next_attempt_ms, created_ms, updated_ms, sent_ms";

impl MessageRow {
    fn from_query(r: &QueryResult) -> Result<Self, DbErr> {
        let kind: String = r.try_get("", "kind")?;
        let status: String = r.try_get("", "status")?;
        Ok(MessageRow {
            id: r.try_get("", "id")?,
            kind: MessageKind::parse(&kind)
                .ok_or_else(|| DbErr::Type(format!("unknown message kind `{kind}`")))?,
            status: Status::parse(&status)?,
            message_id: r.try_get("", "message_id")?,
            attempts: r.try_get("", "attempts")?,
            reason: r.try_get("", "reason")?,
            last_error: r.try_get("", "last_error")?,
            smtp_reply: r.try_get("", "smtp_reply")?,
            next_attempt_ms: r.try_get("", "next_attempt_ms")?,
            created_ms: r.try_get("", "created_ms")?,
            updated_ms: r.try_get("", "updated_ms")?,
            sent_ms: r.try_get("", "sent_ms")?,
        })
    }
}

/// What a delivery needs of a claimed message (see [`Store::claim`]).
#[derive(Debug, Clone)]
pub struct ClaimedRow {
    pub id: String,
    pub message_id: String,
    /// Attempts made before this one.
    pub attempts: i64,
    pub created_ms: i64,
}

/// A claimed message with its content, to deliver.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub row: ClaimedRow,
    /// [`crate::domain::Content`] as JSON.
    pub content: String,
}

/// A message to insert (see [`writer`]).
#[derive(Debug, Clone)]
pub struct NewRow {
    pub id: String,
    pub idempotency_key: Option<String>,
    /// SHA-256 (hex) of the request body, to tell a retried request from a different one
    /// that reuses the key.
    pub request_hash: Option<String>,
    pub kind: MessageKind,
    pub message_id: String,
    pub content: String,
    pub now_ms: i64,
}

/// A delivered message, to record.
#[derive(Debug, Clone)]
pub struct SentRow {
    pub id: String,
    pub attempts: i64,
    pub reply: String,
    pub now_ms: i64,
}

/// What an insert did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// The idempotency key was used before by the same request: that message.
    Existing {
        id: String,
        status: Status,
    },
    /// The idempotency key was used before by a different request.
    KeyConflict,
}

#[derive(Clone)]
pub struct Store {
    write: DatabaseConnection,
    read: DatabaseConnection,
    outbox_dir: PathBuf,
    /// Seals the local state values (credentials) at rest.
    cipher: Option<std::sync::Arc<StateCipher>>,
    /// The messages being delivered (see [`Store::claim`]): `queued` in the database,
    /// `sending` to everyone who asks.
    in_flight: std::sync::Arc<std::sync::Mutex<HashSet<String>>>,
}

fn stmt(sql: &str, values: impl IntoIterator<Item = Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Sqlite, sql, values)
}

/// `value` as JSON text, bound to a statement that reads it with `json_each`.
fn json_param(value: &impl serde::Serialize) -> Result<String, DbErr> {
    serde_json::to_string(value).map_err(|e| DbErr::Custom(e.to_string()))
}

impl Store {
    /// Opens (creating) `site-mailer.db` in `data_dir`, runs the migrations and puts back to
    /// `queued` every message an earlier version left `sending`.
    pub async fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let outbox_dir = data_dir.join("outbox");
        std::fs::create_dir_all(&outbox_dir).with_context(|| {
            format!("POSTWIRE_DATA_DIR: cannot create {}", outbox_dir.display())
        })?;
        let db_path = data_dir.join("site-mailer.db");
        let write = connect(
            &format!("sqlite://{}?mode=rwc", db_path.display()),
            1,
            false,
        )
        .await?;
        crate::store::migration::Migrator::up(&write, None)
            .await
            .context("running the site mailer's database migrations")?;
        let read = connect(&format!("sqlite://{}?mode=ro", db_path.display()), 4, true).await?;
        let store = Store {
            write,
            read,
            outbox_dir,
            cipher: None,
            in_flight: Default::default(),
        };
        let n = store.requeue_sending().await?;
        if n > 0 {
            tracing::warn!(
                messages = n,
                "messages that were being sent when the site mailer stopped are queued again"
            );
        }
        store.sweep_attachments().await?;
        Ok(store)
    }

    /// Removes attachment directories that no pending message refers to: left behind when
    /// the process died between writing the files and committing the message (the client
    /// got no 202 then), or after delivery but before the files were removed.
    async fn sweep_attachments(&self) -> anyhow::Result<()> {
        let mut entries = tokio::fs::read_dir(&self.outbox_dir)
            .await
            .with_context(|| format!("reading {}", self.outbox_dir.display()))?;
        while let Some(entry) = entries.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pending = match self.message(&name).await? {
                Some(m) => matches!(m.status, Status::Queued | Status::Sending),
                None => false,
            };
            if !pending {
                tracing::info!(dir = %entry.path().display(), "removing orphaned attachment files");
                self.remove_attachments(&name).await;
            }
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), DbErr> {
        self.read.execute_unprepared("SELECT 1").await.map(|_| ())
    }

    // ------------------------------------------------------------------ attachments

    /// The directory of a message's attachment files (`0`, `1`, ... in order).
    pub fn attachment_dir(&self, id: &str) -> PathBuf {
        self.outbox_dir.join(id)
    }

    pub fn attachment_file(&self, id: &str, index: usize) -> PathBuf {
        self.attachment_dir(id).join(index.to_string())
    }

    /// Writes and fsyncs the attachment files of a message that is about to be stored
    /// (`0`, `1`, ...; the directory may exist already, holding streamed files after them).
    pub async fn write_attachments(&self, id: &str, files: Vec<Vec<u8>>) -> std::io::Result<()> {
        if files.is_empty() {
            return Ok(());
        }
        let dir = self.attachment_dir(id);
        let parent = self.outbox_dir.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            for (i, bytes) in files.iter().enumerate() {
                let mut f = std::fs::File::create(dir.join(i.to_string()))?;
                f.write_all(bytes)?;
                f.sync_all()?;
            }
            std::fs::File::open(&dir)?.sync_all()?;
            std::fs::File::open(&parent)?.sync_all()
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Fsyncs a message's attachment directory and the outbox directory (after streamed
    /// files were written and fsynced one by one), so the entries survive a power loss.
    pub async fn sync_attachment_dir(&self, id: &str) -> std::io::Result<()> {
        let dir = self.attachment_dir(id);
        let parent = self.outbox_dir.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(&dir)?.sync_all()?;
            std::fs::File::open(&parent)?.sync_all()
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Removes a message's attachment files (after delivery, or when it was not stored).
    pub async fn remove_attachments(&self, id: &str) {
        let dir = self.attachment_dir(id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove attachment files")
            }
        }
    }

    // ------------------------------------------------------------------ messages

    /// Inserts messages in one transaction (the group commit of [`writer`]). An idempotency
    /// key seen before (also earlier in the same batch) yields the earlier message.
    ///
    /// The only writes with `synchronous=FULL` (see the module doc): an accepted message is
    /// on disk before the client hears 202.
    pub async fn insert_batch(&self, rows: &[NewRow]) -> Result<Vec<InsertOutcome>, DbErr> {
        // Not allowed inside a transaction. Only this writer (one task) switches it, so the
        // whole transaction below runs with FULL.
        self.write
            .execute_unprepared("PRAGMA synchronous = FULL")
            .await?;
        let result = self.insert_batch_txn(rows).await;
        let back = self
            .write
            .execute_unprepared("PRAGMA synchronous = NORMAL")
            .await;
        let out = result?;
        back?;
        Ok(out)
    }

    async fn insert_batch_txn(&self, rows: &[NewRow]) -> Result<Vec<InsertOutcome>, DbErr> {
        let txn = self.write.begin().await?;
        #[cfg(debug_assertions)]
        {
            let sync = txn
                .query_one_raw(stmt("PRAGMA synchronous", []))
                .await?
                .map(|r| r.try_get_by_index::<i64>(0))
                .transpose()?;
            debug_assert_eq!(sync, Some(2), "accepted messages are committed with FULL");
        }
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            if let Some(key) = &r.idempotency_key {
                let existing = txn
                    .query_one_raw(stmt(
                        "SELECT id, status, request_hash FROM messages WHERE idempotency_key = ?",
                        [key.clone().into()],
                    ))
                    .await?;
                if let Some(e) = existing {
                    let hash: Option<String> = e.try_get("", "request_hash")?;
                    if hash == r.request_hash {
                        let status: String = e.try_get("", "status")?;
                        out.push(InsertOutcome::Existing {
                            id: e.try_get("", "id")?,
                            status: Status::parse(&status)?,
                        });
                    } else {
                        out.push(InsertOutcome::KeyConflict);
                    }
                    continue;
                }
            }
            txn.execute_raw(stmt(
                "INSERT INTO message_content (id, content) VALUES (?, ?)",
                [r.id.clone().into(), r.content.clone().into()],
            ))
            .await?;
            txn.execute_raw(stmt(
                "INSERT INTO messages (id, idempotency_key, request_hash, kind, status, message_id, \
                 attempts, next_attempt_ms, created_ms, updated_ms) \
                 VALUES (?, ?, ?, ?, 'queued', ?, 0, ?, ?, ?)",
                [
                    r.id.clone().into(),
                    r.idempotency_key.clone().into(),
                    r.request_hash.clone().into(),
                    r.kind.as_str().into(),
                    r.message_id.clone().into(),
                    r.now_ms.into(),
                    r.now_ms.into(),
                    r.now_ms.into(),
                ],
            ))
            .await?;
            out.push(InsertOutcome::Inserted);
        }
        txn.commit().await?;
        Ok(out)
    }

    pub async fn message(&self, id: &str) -> Result<Option<MessageRow>, DbErr> {
        let mut row = self
            .read
            .query_one_raw(stmt(
                &format!("SELECT {COLUMNS} FROM messages WHERE id = ?"),
                [id.into()],
            ))
            .await?
            .map(|r| MessageRow::from_query(&r))
            .transpose()?;
        if let Some(m) = &mut row
            && m.status == Status::Queued
            && self.lock_in_flight().contains(id)
        {
            m.status = Status::Sending;
            m.reason = None;
        }
        Ok(row)
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // A panic while holding it leaves the set as it was: still usable.
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The ids of the messages in flight, as a JSON array (for `json_each`).
    fn in_flight_json(&self) -> Result<String, DbErr> {
        json_param(&*self.lock_in_flight())
    }

    /// The messages are no longer being delivered (their outcome is recorded, or they were
    /// claimed but not started).
    fn landed<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut set = self.lock_in_flight();
        for id in ids {
            set.remove(id);
        }
    }

    /// The message stored under an idempotency key, with its request hash.
    pub async fn by_idempotency_key(
        &self,
        key: &str,
    ) -> Result<Option<(String, Status, Option<String>)>, DbErr> {
        let Some(r) = self
            .read
            .query_one_raw(stmt(
                "SELECT id, status, request_hash FROM messages WHERE idempotency_key = ?",
                [key.into()],
            ))
            .await?
        else {
            return Ok(None);
        };
        let status: String = r.try_get("", "status")?;
        Ok(Some((
            r.try_get("", "id")?,
            Status::parse(&status)?,
            r.try_get("", "request_hash")?,
        )))
    }

    /// Claims up to `limit` due messages (oldest due first) with their content: from now on
    /// they are `sending` to readers ([`Store::message`], [`Store::count`]) until their
    /// outcome is recorded or they are released.
    ///
    /// A claim writes nothing: the claimed messages stay `queued` in the database and are
    /// kept in memory, left out of later claims. A crash meanwhile leaves them queued, so the
    /// next start sends them again (at-least-once, same Message-ID), as a `sending` row did
    /// before. One read on the writing connection (whose page cache every write keeps
    /// current), the contents included.
    pub async fn claim(&self, limit: usize, now_ms: i64) -> Result<Vec<Claimed>, DbErr> {
        // Only the worker claims, one claim at a time; the outcomes of messages in this list
        // may land meanwhile: they are no longer due then, or still excluded.
        let in_flight = self.in_flight_json()?;
        // The limit is `? + 0`: with a plain `LIMIT ?` SQLite compiles the statement again
        // whenever a new limit is bound (its planner uses the value), and the worker asks for
        // a different number nearly every time. The contents are read for the chosen rows
        // only (in the inner query they would be read, and sorted, for every candidate row).
        let rows = self
            .write
            .query_all_raw(stmt(
                "SELECT id, message_id, attempts, created_ms, \
                 (SELECT content FROM message_content c WHERE c.id = m.id) AS content \
                 FROM (SELECT id, message_id, attempts, created_ms FROM messages \
                 WHERE status = 'queued' AND next_attempt_ms <= ? \
                 AND id NOT IN (SELECT value FROM json_each(?)) \
                 ORDER BY next_attempt_ms, created_ms LIMIT ? + 0) m",
                [
                    now_ms.into(),
                    in_flight.into(),
                    i64::try_from(limit).unwrap_or(i64::MAX).into(),
                ],
            ))
            .await?;
        // In the statement's order (oldest due first).
        let claimed = rows
            .iter()
            .map(|r| {
                // By position, in the order selected.
                Ok(Claimed {
                    row: ClaimedRow {
                        id: r.try_get_by_index(0)?,
                        message_id: r.try_get_by_index(1)?,
                        attempts: r.try_get_by_index(2)?,
                        created_ms: r.try_get_by_index(3)?,
                    },
                    // Inserted with its row, in one transaction: never missing. Should it
                    // be, the worker fails the message as unreadable (an empty content).
                    content: r.try_get_by_index::<Option<String>>(4)?.unwrap_or_default(),
                })
            })
            .collect::<Result<Vec<_>, DbErr>>()?;
        self.lock_in_flight()
            .extend(claimed.iter().map(|c| c.row.id.clone()));
        Ok(claimed)
    }

    /// When the next queued message is due, if any is queued. The messages in flight are
    /// left out: they are `queued` in the database, and counting them made the worker look
    /// again at once, over and over, while they were being delivered.
    pub async fn next_due_ms(&self) -> Result<Option<i64>, DbErr> {
        let in_flight = self.in_flight_json()?;
        let r = self
            .read
            .query_one_raw(stmt(
                "SELECT MIN(next_attempt_ms) AS due FROM messages WHERE status = 'queued' \
                 AND id NOT IN (SELECT value FROM json_each(?))",
                [in_flight.into()],
            ))
            .await?;
        Ok(match r {
            Some(r) => r.try_get::<Option<i64>>("", "due")?,
            None => None,
        })
    }

    /// Marks several messages sent with one statement (one transaction: see
    /// [`writer::SentWriter`]).
    pub async fn mark_sent_batch(&self, rows: &[SentRow]) -> Result<(), DbErr> {
        for chunk in rows.chunks(writer::MAX_BATCH) {
            // The rows as one JSON array of [id, attempts, reply, time] bound to one statement
            // text. A VALUES list as long as the batch was another statement text for nearly
            // every batch, parsed and planned again whenever sqlx's statement cache no longer
            // held it.
            let batch: Vec<(&str, i64, &str, i64)> = chunk
                .iter()
                .map(|r| (r.id.as_str(), r.attempts, r.reply.as_str(), r.now_ms))
                .collect();
            let batch = json_param(&batch)?;
            self.write
                .execute_raw(stmt(
                    "UPDATE messages SET status = 'sent', attempts = v.value ->> 1, \
                     smtp_reply = v.value ->> 2, reason = NULL, sent_ms = v.value ->> 3, \
                     updated_ms = v.value ->> 3 FROM json_each(?) v \
                     WHERE messages.id = v.value ->> 0",
                    [batch.into()],
                ))
                .await?;
            self.landed(chunk.iter().map(|r| r.id.as_str()));
        }
        Ok(())
    }

    pub async fn mark_failed(
        &self,
        id: &str,
        attempts: i64,
        error: &str,
        reply: Option<&str>,
        now_ms: i64,
    ) -> Result<(), DbErr> {
        self.write
            .execute_raw(stmt(
                "UPDATE messages SET status = 'failed', attempts = ?, last_error = ?, \
                 smtp_reply = ?, reason = NULL, updated_ms = ? WHERE id = ?",
                [
                    attempts.into(),
                    error.into(),
                    reply.map(str::to_owned).into(),
                    now_ms.into(),
                    id.into(),
                ],
            ))
            .await?;
        self.landed([id]);
        Ok(())
    }

    /// Back to `queued`, due at `next_ms`. `attempts` counts this attempt (or not, when the
    /// message was never offered to a server, e.g. while waiting for a token).
    pub async fn mark_retry(
        &self,
        id: &str,
        attempts: i64,
        error: Option<&str>,
        reason: &str,
        next_ms: i64,
        now_ms: i64,
    ) -> Result<(), DbErr> {
        self.write
            .execute_raw(stmt(
                "UPDATE messages SET status = 'queued', attempts = ?, \
                 last_error = COALESCE(?, last_error), reason = ?, next_attempt_ms = ?, \
                 updated_ms = ? WHERE id = ?",
                [
                    attempts.into(),
                    error.map(str::to_owned).into(),
                    reason.into(),
                    next_ms.into(),
                    now_ms.into(),
                    id.into(),
                ],
            ))
            .await?;
        self.landed([id]);
        Ok(())
    }

    /// Removes up to `limit` messages that were sent or failed before `before_ms` (their last
    /// update), with their contents and any attachment files left (see
    /// [`crate::retention`]); returns how many. Queued messages are never removed.
    pub async fn purge_finished(&self, before_ms: i64, limit: usize) -> Result<usize, DbErr> {
        let txn = self.write.begin().await?;
        let rows = txn
            .query_all_raw(stmt(
                "DELETE FROM messages WHERE id IN (SELECT id FROM messages \
                 WHERE status IN ('sent', 'failed') AND updated_ms < ? LIMIT ? + 0) \
                 RETURNING id",
                [
                    before_ms.into(),
                    i64::try_from(limit).unwrap_or(i64::MAX).into(),
                ],
            ))
            .await?;
        let ids = rows
            .iter()
            .map(|r| r.try_get_by_index::<String>(0))
            .collect::<Result<Vec<_>, DbErr>>()?;
        if !ids.is_empty() {
            txn.execute_raw(stmt(
                "DELETE FROM message_content WHERE id IN (SELECT value FROM json_each(?))",
                [json_param(&ids)?.into()],
            ))
            .await?;
        }
        txn.commit().await?;
        // Removed when the message was sent or failed; a directory left by a failed removal
        // goes now (or at the next start's sweep).
        for id in &ids {
            self.remove_attachments(id).await;
        }
        Ok(ids.len())
    }

    /// Puts claimed messages that were not started back to the queue (nothing to write: a
    /// claim writes nothing).
    pub fn release(&self, ids: &[String]) {
        self.landed(ids.iter().map(String::as_str));
    }

    /// Puts every `sending` message back to `queued`, at start-up: an outbox written by an
    /// earlier version, which marked claimed messages `sending` in the database, may hold
    /// some (at-least-once delivery with a stable Message-ID).
    pub async fn requeue_sending(&self) -> Result<u64, DbErr> {
        self.write
            .execute_unprepared(
                "UPDATE messages SET status = 'queued', \
                 reason = 'interrupted while sending: the site mailer restarted' \
                 WHERE status = 'sending'",
            )
            .await
            .map(|r| r.rows_affected())
    }

    /// How many messages are in each status (for readiness and logs).
    pub async fn count(&self, status: Status) -> Result<i64, DbErr> {
        let r = self
            .read
            .query_one_raw(stmt(
                "SELECT COUNT(*) AS n FROM messages WHERE status = ?",
                [status.as_str().into()],
            ))
            .await?;
        let stored = match r {
            Some(r) => r.try_get::<i64>("", "n")?,
            None => 0,
        };
        // The messages in flight are `queued` in the database. The moment between an
        // outcome's commit and its removal from the set may count one twice, never lose one.
        let in_flight = i64::try_from(self.lock_in_flight().len()).unwrap_or(i64::MAX);
        Ok(match status {
            Status::Queued => (stored - in_flight).max(0),
            Status::Sending => stored + in_flight,
            Status::Sent | Status::Failed => stored,
        })
    }

    // ------------------------------------------------------------------ local state

    /// Seals the local state with `cipher` from now on, and seals the values an older version
    /// stored in plain text (then vacuums, so no plain copy stays in free pages).
    pub async fn seal_state(mut self, cipher: StateCipher) -> Result<Self, DbErr> {
        let rows = self
            .write
            .query_all_raw(stmt("SELECT key, value FROM local_state", []))
            .await?;
        let mut sealed = 0;
        for r in rows {
            let key: String = r.try_get("", "key")?;
            let value: String = r.try_get("", "value")?;
            if !StateCipher::is_sealed(&value) {
                self.write
                    .execute_raw(stmt(
                        "UPDATE local_state SET value = ? WHERE key = ?",
                        [cipher.seal(&key, &value).into(), key.into()],
                    ))
                    .await?;
                sealed += 1;
            }
        }
        if sealed > 0 {
            self.write.execute_unprepared("VACUUM").await?;
            self.write
                .execute_unprepared("PRAGMA wal_checkpoint(TRUNCATE)")
                .await?;
            tracing::info!(values = sealed, "local state values encrypted at rest");
        }
        self.cipher = Some(std::sync::Arc::new(cipher));
        Ok(self)
    }

    /// The value of state `key`. A sealed value that cannot be opened (the site secret
    /// changed) counts as absent.
    pub async fn state(&self, key: &str) -> Result<Option<String>, DbErr> {
        let Some(r) = self
            .read
            .query_one_raw(stmt(
                "SELECT value FROM local_state WHERE key = ?",
                [key.into()],
            ))
            .await?
        else {
            return Ok(None);
        };
        let value: String = r.try_get("", "value")?;
        if !StateCipher::is_sealed(&value) {
            return Ok(Some(value));
        }
        let Some(cipher) = &self.cipher else {
            tracing::warn!(key, "a sealed state value, but no key to open it");
            return Ok(None);
        };
        match cipher.open(key, &value) {
            Ok(plain) => Ok(Some(plain)),
            Err(e) => {
                tracing::warn!(key, error = %e, "ignoring a local state value");
                Ok(None)
            }
        }
    }

    pub async fn put_state(&self, key: &str, value: &str, now_ms: i64) -> Result<(), DbErr> {
        let sealed;
        let value = match &self.cipher {
            Some(c) => {
                sealed = c.seal(key, value);
                sealed.as_str()
            }
            None => value,
        };
        self.write
            .execute_raw(stmt(
                "INSERT INTO local_state (key, value, updated_ms) VALUES (?, ?, ?) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_ms = excluded.updated_ms",
                [key.into(), value.into(), now_ms.into()],
            ))
            .await
            .map(|_| ())
    }

    pub async fn delete_state(&self, key: &str) -> Result<(), DbErr> {
        self.write
            .execute_raw(stmt("DELETE FROM local_state WHERE key = ?", [key.into()]))
            .await
            .map(|_| ())
    }
}

async fn connect(url: &str, max: u32, read_only: bool) -> anyhow::Result<DatabaseConnection> {
    let mut opt = ConnectOptions::new(url.to_owned());
    opt.sqlx_logging(false)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(30))
        .max_connections(max)
        .min_connections(1);
    opt.map_sqlx_sqlite_opts(move |o| {
        // FULL only for the accepts (`insert_batch`), see the module doc.
        let o = o
            .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        if read_only {
            // The writer set WAL mode (it is persistent): readers never block it.
            o.read_only(true)
        } else {
            o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .create_if_missing(true)
        }
    });
    Database::connect(opt)
        .await
        .context("POSTWIRE_DATA_DIR: cannot open site-mailer.db")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, key: Option<&str>, hash: &str, now_ms: i64) -> NewRow {
        NewRow {
            id: id.into(),
            idempotency_key: key.map(str::to_owned),
            request_hash: Some(hash.into()),
            kind: MessageKind::Test,
            message_id: format!("<{id}@example.com>"),
            content: "{}".into(),
            now_ms,
        }
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sm-store-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    async fn store() -> (Store, PathBuf) {
        let dir = temp_dir();
        (Store::open(&dir).await.unwrap(), dir)
    }

    #[tokio::test]
    async fn durable_settings() {
        let (s, dir) = store().await;
        let r = s
            .write
            .query_one_raw(stmt("PRAGMA synchronous", []))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.try_get_by_index::<i64>(0).unwrap(), 1, "NORMAL at rest");
        // the accept switches to FULL for its transaction (asserted inside in debug builds)
        // and back
        s.insert_batch(&[row("a", None, "h", 1)]).await.unwrap();
        let r = s
            .write
            .query_one_raw(stmt("PRAGMA synchronous", []))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.try_get_by_index::<i64>(0).unwrap(), 1, "NORMAL again");
        let r = s
            .write
            .query_one_raw(stmt("PRAGMA journal_mode", []))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.try_get_by_index::<String>(0).unwrap(), "wal");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// An outbox of the first schema (content in the messages row) keeps every content.
    #[tokio::test]
    async fn content_moves_to_its_own_table() {
        let dir = temp_dir();
        let url = format!("sqlite://{}?mode=rwc", dir.join("site-mailer.db").display());
        let old = connect(&url, 1, false).await.unwrap();
        migration::Migrator::up(&old, Some(1)).await.unwrap();
        old.execute_raw(stmt(
            "INSERT INTO messages (id, kind, status, message_id, content, attempts, \
             next_attempt_ms, created_ms, updated_ms) \
             VALUES ('old', 'test', 'queued', '<old@example.com>', '{\"subject\":\"kept\"}', \
             0, 1, 1, 1)",
            [],
        ))
        .await
        .unwrap();
        old.close().await.unwrap();
        let s = Store::open(&dir).await.unwrap();
        let claimed = s.claim(5, 10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].row.message_id, "<old@example.com>");
        assert_eq!(claimed[0].content, r#"{"subject":"kept"}"#);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn batch_with_idempotency_keys() {
        let (s, dir) = store().await;
        let out = s
            .insert_batch(&[
                row("a", Some("k1"), "h1", 1),
                row("b", Some("k1"), "h1", 1),
                row("c", Some("k1"), "other", 1),
                row("d", None, "h2", 1),
            ])
            .await
            .unwrap();
        assert_eq!(
            out,
            [
                InsertOutcome::Inserted,
                InsertOutcome::Existing {
                    id: "a".into(),
                    status: Status::Queued
                },
                InsertOutcome::KeyConflict,
                InsertOutcome::Inserted,
            ]
        );
        assert!(s.message("b").await.unwrap().is_none());
        assert_eq!(s.count(Status::Queued).await.unwrap(), 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A first attempt's `sent` outcome, "250 ok", at `now_ms`.
    fn sent(id: &str, now_ms: i64) -> SentRow {
        SentRow {
            id: id.into(),
            attempts: 1,
            reply: "250 ok".into(),
            now_ms,
        }
    }

    /// The status as stored, without the in-flight overlay.
    async fn stored_status(s: &Store, id: &str) -> String {
        s.read
            .query_one_raw(stmt(
                "SELECT status FROM messages WHERE id = ?",
                [id.into()],
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get("", "status")
            .unwrap()
    }

    /// A claim writes nothing: claimed messages stay `queued` in the database, read as
    /// `sending`, are left out of later claims until their outcome or release, and are
    /// queued again after a crash.
    #[tokio::test]
    async fn claims_are_kept_in_memory() {
        let (s, dir) = store().await;
        s.insert_batch(&[
            row("a", None, "h", 10),
            row("b", None, "h", 20),
            row("c", None, "h", 30),
        ])
        .await
        .unwrap();
        let first = s.claim(2, 100).await.unwrap();
        let ids: Vec<&str> = first.iter().map(|c| c.row.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"], "oldest due first");
        assert_eq!(stored_status(&s, "a").await, "queued", "nothing written");
        let a = s.message("a").await.unwrap().unwrap();
        assert_eq!((a.status, a.reason), (Status::Sending, None));
        assert_eq!(s.count(Status::Queued).await.unwrap(), 1);
        assert_eq!(s.count(Status::Sending).await.unwrap(), 2);

        assert_eq!(
            s.next_due_ms().await.unwrap(),
            Some(30),
            "a and b are in flight"
        );
        let second = s.claim(5, 100).await.unwrap();
        assert_eq!(second.len(), 1, "the claimed ones are left out");
        assert_eq!(second[0].row.id, "c");
        assert_eq!(
            s.next_due_ms().await.unwrap(),
            None,
            "everything queued is in flight: nothing to wait for"
        );
        assert_eq!(s.count(Status::Queued).await.unwrap(), 0);
        assert_eq!(s.count(Status::Sending).await.unwrap(), 3);

        // outcomes and a release end the claims
        s.mark_sent_batch(&[sent("a", 110)]).await.unwrap();
        s.mark_retry("c", 1, Some("451 later"), "retrying", 5000, 110)
            .await
            .unwrap();
        s.release(&["b".to_owned()]);
        assert_eq!(s.message("a").await.unwrap().unwrap().status, Status::Sent);
        assert_eq!(
            s.message("b").await.unwrap().unwrap().status,
            Status::Queued
        );
        assert_eq!(
            s.message("c").await.unwrap().unwrap().status,
            Status::Queued
        );
        assert_eq!(s.count(Status::Sending).await.unwrap(), 0);
        assert_eq!(s.count(Status::Queued).await.unwrap(), 2);
        let again = s.claim(5, 200).await.unwrap();
        assert_eq!(again.len(), 1, "b again; c is not due before 5000");
        assert_eq!(again[0].row.id, "b");
        assert_eq!(again[0].content, "{}", "with its content");

        // the process dies while delivering b: b is queued at the next start
        drop(s);
        let s = Store::open(&dir).await.unwrap();
        assert_eq!(
            s.message("b").await.unwrap().unwrap().status,
            Status::Queued
        );
        let after = s.claim(5, 200).await.unwrap();
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].row.id, "b");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Retention removes sent and failed messages older than the cut, with their contents,
    /// idempotency keys and attachment files, in batches; queued and newer ones stay.
    #[tokio::test]
    async fn purge_removes_finished_messages_only() {
        let (s, _dir) = store().await;
        let rows: Vec<NewRow> = ["old_sent1", "old_sent2", "old_failed", "new_sent", "queued"]
            .iter()
            .map(|id| row(id, Some(&format!("key-{id}")), "h", 10))
            .collect();
        s.insert_batch(&rows).await.unwrap();
        assert_eq!(s.claim(10, 100).await.unwrap().len(), 5);
        s.mark_sent_batch(&[
            sent("old_sent1", 100),
            sent("old_sent2", 200),
            sent("new_sent", 5000),
        ])
        .await
        .unwrap();
        s.mark_failed("old_failed", 3, "550 no such user", Some("550 no"), 300)
            .await
            .unwrap();
        s.release(&["queued".to_owned()]);
        s.write_attachments("old_failed", vec![b"x".to_vec()])
            .await
            .unwrap();
        let content_rows = |s: Store| async move {
            s.read
                .query_one_raw(stmt("SELECT COUNT(*) FROM message_content", []))
                .await
                .unwrap()
                .unwrap()
                .try_get_by_index::<i64>(0)
                .unwrap()
        };
        // batches of 2: 2, then 1, then none
        assert_eq!(s.purge_finished(1000, 2).await.unwrap(), 2);
        assert_eq!(s.purge_finished(1000, 2).await.unwrap(), 1);
        assert_eq!(s.purge_finished(1000, 2).await.unwrap(), 0);
        for id in ["old_sent1", "old_sent2", "old_failed"] {
            assert!(s.message(id).await.unwrap().is_none(), "{id} removed");
            assert!(
                s.by_idempotency_key(&format!("key-{id}"))
                    .await
                    .unwrap()
                    .is_none(),
                "{id}'s key released"
            );
        }
        assert!(!s.attachment_dir("old_failed").exists(), "files removed");
        assert_eq!(
            s.message("new_sent").await.unwrap().unwrap().status,
            Status::Sent
        );
        assert_eq!(
            s.message("queued").await.unwrap().unwrap().status,
            Status::Queued
        );
        assert_eq!(
            content_rows(s.clone()).await,
            2,
            "contents of the kept messages only"
        );
        // a queued message is never removed, however old
        assert_eq!(s.purge_finished(i64::MAX, 10).await.unwrap(), 1);
        assert_eq!(
            s.message("queued").await.unwrap().unwrap().status,
            Status::Queued
        );
        assert_eq!(content_rows(s.clone()).await, 1);
    }

    #[tokio::test]
    async fn claim_retry_and_recovery() {
        let (s, dir) = store().await;
        s.insert_batch(&[row("a", None, "h", 10), row("b", None, "h", 20)])
            .await
            .unwrap();
        assert_eq!(s.next_due_ms().await.unwrap(), Some(10));
        assert!(s.claim(5, 5).await.unwrap().is_empty(), "not due yet");
        let claimed = s.claim(1, 100).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].row.id, "a");
        assert_eq!(claimed[0].content, "{}", "with its content");
        assert_eq!(
            s.message("a").await.unwrap().unwrap().status,
            Status::Sending
        );
        s.mark_retry("a", 1, Some("451 later"), "retrying", 500, 100)
            .await
            .unwrap();
        let a = s.message("a").await.unwrap().unwrap();
        assert_eq!(
            (a.status, a.attempts, a.next_attempt_ms),
            (Status::Queued, 1, 500)
        );
        assert_eq!(a.last_error.as_deref(), Some("451 later"));
        // a claimed message of a process that died is queued again at the next open
        let claimed = s.claim(5, 1000).await.unwrap();
        assert_eq!(claimed.len(), 2);
        s.write_attachments("b", vec![b"x".to_vec()]).await.unwrap();
        std::fs::create_dir(s.attachment_dir("orphan")).unwrap();
        drop(s);
        let s = Store::open(&dir).await.unwrap();
        assert_eq!(s.count(Status::Queued).await.unwrap(), 2);
        assert!(s.attachment_file("b", 0).exists(), "pending: kept");
        assert!(!s.attachment_dir("orphan").exists(), "orphan: removed");
        s.mark_sent_batch(&[sent("b", 2000)]).await.unwrap();
        let b = s.message("b").await.unwrap().unwrap();
        assert_eq!(b.smtp_reply.as_deref(), Some("250 ok"));
        assert_eq!(b.sent_ms, Some(2000));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
