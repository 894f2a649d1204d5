//! The outbox worker: claims due messages, delivers them with the current effective
//! configuration over at most `POSTWIRE_SEND_CONCURRENCY` SMTP connections (building the
//! next messages meanwhile) and records the outcome.
//!
//! - Sent: the server's reply is kept.
//! - A temporary failure (4xx, timeout, broken connection) is retried with exponential
//!   backoff and jitter until the message is `POSTWIRE_RETRY_MAX_AGE` old, then it fails.
//! - A problem of the site's configuration (credentials refused, TLS, egress policy, no
//!   common AUTH mechanism) is retried the same way: a configuration change (picked up
//!   without restart) lets the message through; a refused password also triggers a
//!   configuration fetch.
//! - A permanent refusal (5xx) fails the message with the reply.
//! - With OAuth 2.0, a refused token is dropped and a fresh one is tried once at once. While
//!   no token can be had the message waits (not failed): `reauthorization_required` or
//!   `oauth_not_authorized` when only a tenant admin can end it (looked at again after 10 s
//!   at the earliest), "waiting for access token" otherwise.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use mail_core::smtp::{
    AttachmentSource, Mailer, SendError, SmtpAuth, SmtpReply, SmtpTarget, StreamedMessage,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

use crate::clock::Clock;
use crate::config::RetryPolicy;
use crate::config_source::{ConfigHandle, ConfigSource};
use crate::domain::Content;
use crate::effective::{EffectiveAuth, EffectiveConfig};
use crate::metrics::{Metrics, SendResult};
use crate::store::writer::SentWriter;
use crate::store::{Claimed, ClaimedRow, SentRow, Store};
use crate::tokens::{TokenError, TokenProvider};

/// How long in-flight deliveries may finish after a stop was asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A message waiting for a tenant admin (reauthorization) looks again after this at the
/// earliest.
const ADMIN_WAIT: Duration = Duration::from_secs(10);
/// The worker looks at the outbox at least this often.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Claimed messages (in flight and waiting for a connection) at least, so that one claim
/// statement serves many messages even with few connections.
const MIN_CLAIM_WINDOW: usize = 64;
/// Deliveries under way (built or being built) per SMTP connection.
const PREPARED_PER_CONNECTION: usize = 2;

/// A claim in progress: how many messages it asked for, and what it found.
type ClaimFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(usize, Vec<Claimed>), sea_orm::DbErr>> + Send>,
>;

pub struct Worker {
    pub store: Store,
    pub config: ConfigHandle,
    pub source: Arc<ConfigSource>,
    pub mailer: Mailer,
    pub tokens: Arc<TokenProvider>,
    pub clock: Arc<dyn Clock>,
    pub retry: RetryPolicy,
    pub concurrency: usize,
    pub hello_name: Option<String>,
    /// Notified when a message was accepted.
    pub wake: Arc<Notify>,
    pub metrics: Arc<Metrics>,
    /// Group commit of `sent`.
    pub sent: SentWriter,
}

/// The delay before attempt `attempt + 1`: `initial · 2^(attempt-1)`, capped, with jitter
/// (a random point in the upper half).
pub fn backoff(retry: &RetryPolicy, attempt: i64) -> Duration {
    let exp = u32::try_from(attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let full = retry
        .initial
        .saturating_mul(2u32.saturating_pow(exp))
        .min(retry.max_delay);
    let r = u64::from_le_bytes(mail_core::crypto::random_bytes::<8>());
    let half = full / 2;
    let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
    half + Duration::from_millis(if jitter_ms == 0 {
        0
    } else {
        r % (jitter_ms + 1)
    })
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Worker {
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // A delivery holds a slot from its start (reading and building the message, getting
        // a token) and a connection permit only while it talks to the server. With twice as
        // many slots as connections the next messages are built while the connections are
        // busy, and a connection that comes free is used at once.
        let slots = Arc::new(Semaphore::new(PREPARED_PER_CONNECTION * self.concurrency));
        let connections = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut config = self.config.clone();
        // Claimed but not started yet: claims are refilled when half of the
        // window (2 × concurrency, at least MIN_CLAIM_WINDOW) has drained, so one claim
        // statement serves half a window of messages instead of one.
        let window = (2 * self.concurrency).max(MIN_CLAIM_WINDOW);
        let mut backlog: VecDeque<Claimed> = VecDeque::new();
        // The claim in progress. It runs beside the deliveries: awaited in the loop, it
        // stopped the loop from starting messages on the connections that came free
        // meanwhile (every half window, a pause as long as the claim statement).
        let mut claiming: Option<ClaimFuture> = None;
        // After a failed claim, none before this.
        let mut claim_after: Option<tokio::time::Instant> = None;
        // The last claim found fewer due messages than it asked for: the next one waits for
        // something to change (a message accepted, a delivery finished, the next due time,
        // the configuration), or the loop would claim again at once, over and over.
        let mut exhausted = false;
        loop {
            if *shutdown.borrow() {
                break;
            }
            while let Some(done) = tasks.try_join_next() {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "a delivery task panicked");
                }
            }
            // Held (site refused by the Management Service): nothing is claimed, every
            // message stays queued; the worker looks again every IDLE_POLL.
            let current = self
                .config
                .current()
                .filter(|_| self.source.held().is_none());
            let mut wait = IDLE_POLL;
            if let Some(current) = &current {
                let in_flight =
                    PREPARED_PER_CONNECTION * self.concurrency - slots.available_permits();
                if claiming.is_none()
                    && !exhausted
                    && in_flight + backlog.len() <= window / 2
                    && claim_after.is_none_or(|t| tokio::time::Instant::now() >= t)
                {
                    let want = window - in_flight - backlog.len();
                    let store = self.store.clone();
                    let now = self.clock.now_ms();
                    claiming = Some(Box::pin(async move {
                        store.claim(want, now).await.map(|rows| (want, rows))
                    }));
                }
                while !backlog.is_empty() {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        break;
                    };
                    let Some(row) = backlog.pop_front() else {
                        break;
                    };
                    let this = self.clone();
                    let cfg = current.clone();
                    let connections = connections.clone();
                    // The delivery's state (about 4 KB: message, SMTP exchange) goes to the
                    // heap once; as the task's own future it was copied several times while
                    // spawned.
                    tasks.spawn(async move {
                        Box::pin(this.deliver(row, &cfg.config, slot, connections)).await;
                    });
                }
                if let Some(t) = claim_after {
                    wait = wait.min(t.saturating_duration_since(tokio::time::Instant::now()));
                }
                // With a backlog every slot is taken: the next wake is a finished task;
                // with a claim in progress, its rows.
                if backlog.is_empty() && claiming.is_none() && claim_after.is_none() {
                    match self.store.next_due_ms().await {
                        Ok(Some(due)) => {
                            let left =
                                u64::try_from((due - self.clock.now_ms()).max(0)).unwrap_or(0);
                            wait = wait.min(Duration::from_millis(left));
                        }
                        Ok(None) => {}
                        Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
                    }
                }
            } else {
                self.release(&mut backlog);
                if self.config.current().is_none() && claiming.is_none() {
                    // Without a configuration nothing can be sent: wait for one.
                    wait = Duration::from_secs(3600);
                }
            }
            let no_slots = slots.available_permits() == 0;
            tokio::select! {
                _ = tokio::time::sleep(wait), if !no_slots => exhausted = false,
                _ = self.wake.notified() => exhausted = false,
                _ = config.changed() => exhausted = false,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => exhausted = false,
                claimed = async {
                    match claiming.as_mut() {
                        Some(claim) => claim.await,
                        None => std::future::pending().await,
                    }
                }, if claiming.is_some() => {
                    claiming = None;
                    match claimed {
                        Ok((want, rows)) => {
                            claim_after = None;
                            exhausted = rows.len() < want;
                            backlog.extend(rows);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot claim messages from the outbox");
                            claim_after = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                        }
                    }
                }
                changed = shutdown.changed() => {
                    // The application is gone (its sender dropped): stop as if asked to.
                    if changed.is_err() {
                        break;
                    }
                }
            }
        }
        // A claim still running: its messages are `sending`, they go back with the backlog.
        if let Some(claim) = claiming.take()
            && let Ok((_, rows)) = claim.await
        {
            backlog.extend(rows);
        }
        self.release(&mut backlog);
        // Let the deliveries in flight finish (a message stopped mid-send goes back to the
        // queue at the next start: at-least-once, with the same Message-ID).
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    #[tracing::instrument(skip_all, fields(message = %claimed.row.id, attempt = claimed.row.attempts + 1, tenant_id = %cfg.tenant_id, site_id = %cfg.site_id))]
    async fn deliver(
        &self,
        claimed: Claimed,
        cfg: &EffectiveConfig,
        slot: OwnedSemaphorePermit,
        connections: Arc<Semaphore>,
    ) {
        let Claimed { row, content } = claimed;
        let attempt = row.attempts + 1;
        let content: Content = match serde_json::from_str(&content) {
            Ok(c) => c,
            Err(e) => {
                self.fail(
                    &row,
                    attempt,
                    &format!("stored message is unreadable: {e}"),
                    None,
                )
                .await;
                return;
            }
        };
        let message = match self.build(&row, &content).await {
            Ok(m) => m,
            Err(e) => {
                self.fail(
                    &row,
                    attempt,
                    &format!("cannot build the message: {e}"),
                    None,
                )
                .await;
                return;
            }
        };

        let oauth = matches!(cfg.auth, EffectiveAuth::Oauth2 { .. });
        let auth = match cfg.auth.smtp_auth() {
            Some(a) => a,
            // Boxed (as below): a token fetch (cache, Management Service) is a large future,
            // and inline it would grow every delivery's future, copied once per message.
            None => match Box::pin(self.tokens.smtp_auth(cfg, None)).await {
                Ok(a) => a,
                Err(why) => {
                    // Not offered to any server: the attempt does not count.
                    self.wait_for_token(&row, row.attempts, &why).await;
                    return;
                }
            },
        };
        // Built and authorized: now wait for a connection of the site's SMTP budget
        // (never closed).
        let Ok(connection) = connections.acquire_owned().await else {
            return;
        };
        let mut target = SmtpTarget::new(&cfg.server, auth);
        target.hello_name = self.hello_name.clone();
        // Attachments are encoded while written (held once, as their bytes); the same message
        // serves the retry below.
        let mut result = self.mailer.send_streamed(&target, &message).await;
        if oauth && result.as_ref().is_err_and(SendError::is_auth_rejected) {
            let rejected = match &target.auth {
                SmtpAuth::Xoauth2 { access_token, .. } => Some(access_token.clone()),
                _ => None,
            };
            tracing::info!("the SMTP server rejected the access token: fetching a fresh one");
            self.tokens.forget(&cfg.tenant_id).await;
            match Box::pin(self.tokens.smtp_auth(cfg, rejected.as_ref())).await {
                Ok(a) => {
                    target.auth = a;
                    result = self.mailer.send_streamed(&target, &message).await;
                }
                Err(why) if why.needs_admin() => {
                    // The grant is gone (revoked at the provider, say): the message waits
                    // for a tenant admin to authorize again, it does not fail.
                    self.wait_for_token(&row, attempt, &why).await;
                    return;
                }
                Err(reason) => tracing::warn!(%reason, "no fresh access token"),
            }
        }
        // The SMTP connection is free again (back in the pool): the next message may use it
        // while this outcome waits for its (shared) commit. Until that commit the message
        // stays `sending`, so a crash now sends it again at the next start (at-least-once).
        drop(connection);
        drop(slot);
        self.wake.notify_one();
        self.record(&row, attempt, result, !content.attachments.is_empty())
            .await;
    }

    /// Puts the claimed but unstarted messages back to the queue.
    fn release(&self, backlog: &mut VecDeque<Claimed>) {
        if backlog.is_empty() {
            return;
        }
        let ids: Vec<String> = backlog.drain(..).map(|c| c.row.id).collect();
        self.store.release(&ids);
    }

    /// The message with its attachments read from their files.
    async fn build(&self, row: &ClaimedRow, content: &Content) -> Result<StreamedMessage, String> {
        let files = (0..content.attachments.len())
            .map(|i| AttachmentSource::File(self.store.attachment_file(&row.id, i)))
            .collect();
        content
            .outgoing(&row.message_id, files)?
            .into_streamed()
            .await
            .map_err(|e| e.to_string())
    }

    /// Records the outcome of a delivery; `has_files`: the message has attachment files.
    async fn record(
        &self,
        row: &ClaimedRow,
        attempt: i64,
        result: Result<SmtpReply, SendError>,
        has_files: bool,
    ) {
        let now = self.clock.now_ms();
        match result {
            Ok(reply) => {
                let reply = reply.to_string();
                let sent = SentRow {
                    id: row.id.clone(),
                    attempts: attempt,
                    reply: reply.clone(),
                    now_ms: now,
                };
                match self.sent.mark_sent(sent).await {
                    Ok(()) => {
                        self.metrics.send(SendResult::Sent);
                        tracing::info!(%reply, "message sent");
                        if has_files {
                            self.store.remove_attachments(&row.id).await;
                        }
                    }
                    // Stays `sending`: queued again at the next start (at-least-once).
                    Err(e) => tracing::error!(error = %e, "sent, but cannot record it"),
                }
            }
            Err(e @ SendError::Permanent { .. }) => {
                let reply = e.reply().map(|(c, m)| format!("{c} {m}"));
                self.fail(row, attempt, &e.to_string(), reply.as_deref())
                    .await;
            }
            Err(e) => {
                if matches!(e, SendError::AuthRejected { .. }) {
                    self.source.refresh_soon();
                }
                let delay = backoff(&self.retry, attempt);
                let age = now - row.created_ms;
                if age + ms(delay) > ms(self.retry.max_age) {
                    let reply = e.reply().map(|(c, m)| format!("{c} {m}"));
                    self.fail(
                        row,
                        attempt,
                        &format!(
                            "gave up after {attempt} attempts (POSTWIRE_RETRY_MAX_AGE {:?}): {e}",
                            self.retry.max_age
                        ),
                        reply.as_deref(),
                    )
                    .await;
                    return;
                }
                let reason = match &e {
                    SendError::Transient { .. } => "retrying after a temporary failure",
                    SendError::AuthRejected { .. } => {
                        "the SMTP server rejected the credentials: retrying (a configuration change is picked up)"
                    }
                    _ => {
                        "the SMTP connection failed as configured: retrying (a configuration change is picked up)"
                    }
                };
                tracing::warn!(error = %e, retry_in = ?delay, "delivery failed; will retry");
                match self
                    .store
                    .mark_retry(
                        &row.id,
                        attempt,
                        Some(&e.to_string()),
                        reason,
                        now + ms(delay),
                        now,
                    )
                    .await
                {
                    Ok(()) => self.metrics.send(SendResult::Retry),
                    Err(db) => tracing::error!(error = %db, "cannot record the failed attempt"),
                }
            }
        }
    }

    /// Back to the queue while no access token can be had. When only a tenant admin can end
    /// the wait (reauthorization), the message looks again after 10 s at the earliest (the
    /// token provider remembers the refusal that long anyway), so a long queue does not cycle
    /// through `sending` meanwhile.
    async fn wait_for_token(&self, row: &ClaimedRow, attempts: i64, why: &TokenError) {
        let min = if why.needs_admin() {
            ADMIN_WAIT
        } else {
            Duration::ZERO
        };
        self.wait(row, attempts, Some(&why.to_string()), why.reason(), min)
            .await;
    }

    /// Back to the queue (`attempts` as given: an attempt not offered to any server does not
    /// count), to be looked at again after the backoff, and not before `min`.
    async fn wait(
        &self,
        row: &ClaimedRow,
        attempts: i64,
        error: Option<&str>,
        reason: &str,
        min: Duration,
    ) {
        let now = self.clock.now_ms();
        let delay = backoff(&self.retry, row.attempts.max(1)).max(min);
        if now - row.created_ms + ms(delay) > ms(self.retry.max_age) {
            self.fail(
                row,
                attempts,
                &format!(
                    "gave up (POSTWIRE_RETRY_MAX_AGE {:?}): {reason}",
                    self.retry.max_age
                ),
                None,
            )
            .await;
            return;
        }
        tracing::warn!(%reason, error = error.unwrap_or_default(), "delivery postponed");
        match self
            .store
            .mark_retry(&row.id, attempts, error, reason, now + ms(delay), now)
            .await
        {
            Ok(()) => self.metrics.send(SendResult::Postponed),
            Err(e) => tracing::error!(error = %e, "cannot postpone the message"),
        }
    }

    async fn fail(&self, row: &ClaimedRow, attempts: i64, error: &str, reply: Option<&str>) {
        tracing::warn!(%error, "message failed");
        match self
            .store
            .mark_failed(&row.id, attempts, error, reply, self.clock.now_ms())
            .await
        {
            Ok(()) => {
                self.metrics.send(SendResult::Failed);
                self.store.remove_attachments(&row.id).await;
            }
            Err(e) => tracing::error!(error = %e, "cannot record the failure"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let p = RetryPolicy {
            initial: Duration::from_secs(30),
            max_delay: Duration::from_secs(3600),
            max_age: Duration::from_secs(86400),
        };
        for _ in 0..50 {
            let d1 = backoff(&p, 1);
            assert!(
                d1 >= Duration::from_secs(15) && d1 <= Duration::from_secs(30),
                "{d1:?}"
            );
            let d3 = backoff(&p, 3);
            assert!(
                d3 >= Duration::from_secs(60) && d3 <= Duration::from_secs(120),
                "{d3:?}"
            );
            let d20 = backoff(&p, 20);
            assert!(d20 >= Duration::from_secs(1800) && d20 <= Duration::from_secs(3600));
        }
    }
}
