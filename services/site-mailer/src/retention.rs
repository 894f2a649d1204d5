//! Retention of the outbox: sent and failed messages are kept `POSTWIRE_OUTBOX_RETENTION`
//! (default 7 days) after their outcome, readable by `GET /v1/messages/{id}` and holding
//! their idempotency key, then removed, so the outbox does not grow without end. Queued
//! messages are never removed (they fail after `POSTWIRE_RETRY_MAX_AGE` and are kept from
//! then on).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::Store;

/// Messages removed per transaction: the single writing connection is held only briefly, so
/// accepts and outcomes go on between batches.
pub const BATCH: usize = 500;

/// How often the outbox is looked at: every hour, or more often for a short retention (half
/// of it, at least every second).
pub fn period(retention: Duration) -> Duration {
    (retention / 2).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// Removes every message that was sent or failed more than `retention` ago; returns how many.
pub async fn purge_once(
    store: &Store,
    clock: &dyn Clock,
    metrics: &Metrics,
    retention: Duration,
) -> Result<usize, sea_orm::DbErr> {
    let before = clock.now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let mut total = 0;
    loop {
        let n = store.purge_finished(before, BATCH).await?;
        metrics.purged(n);
        total += n;
        if n < BATCH {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

/// Runs [`purge_once`] every [`period`] (the first time one period after the start) until
/// shutdown.
pub fn spawn(
    store: Store,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = period(retention);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                break;
            }
            match purge_once(&store, clock.as_ref(), &metrics, retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    messages = n,
                    retention = ?retention,
                    "removed sent and failed messages past POSTWIRE_OUTBOX_RETENTION"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot remove old messages from the outbox; trying again later")
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_follows_a_short_retention() {
        assert_eq!(
            period(Duration::from_secs(7 * 86400)),
            Duration::from_secs(3600)
        );
        assert_eq!(period(Duration::from_secs(60)), Duration::from_secs(30));
        assert_eq!(period(Duration::from_secs(1)), Duration::from_secs(1));
    }
}
