//! Prometheus metrics of the site mailer (`GET /metrics`, text format 0.0.4): the outbox by
//! state, deliveries by result, where access tokens came from and how old the last
//! successful token refresh is.

use std::sync::atomic::{AtomicI64, Ordering};

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::store::{Status, Store};

/// Where an access token for a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Memory,
    Redis,
    Local,
    Management,
}

impl TokenSource {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Memory => "memory",
            TokenSource::Redis => "redis",
            TokenSource::Local => "local",
            TokenSource::Management => "management",
        }
    }
}

/// The outcome of one delivery attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendResult {
    /// The server accepted the message.
    Sent,
    /// A temporary failure: the message is retried.
    Retry,
    /// Not offered to any server (no access token, say): the message waits.
    Postponed,
    /// Failed for good (5xx, or retried past the maximum age).
    Failed,
}

impl SendResult {
    pub fn as_str(self) -> &'static str {
        match self {
            SendResult::Sent => "sent",
            SendResult::Retry => "retry",
            SendResult::Postponed => "postponed",
            SendResult::Failed => "failed",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// Messages in the outbox by state, computed at scrape time.
    queue: IntGaugeVec,
    sends: IntCounterVec,
    token_source: IntCounterVec,
    /// Age of the last successful token fetch from the Management Service; -1 before the
    /// first one.
    refresh_age: prometheus::Gauge,
    /// 1 while sending is held (the Management Service refused the site), else 0.
    held: prometheus::IntGauge,
    /// Sent and failed messages removed after `POSTWIRE_OUTBOX_RETENTION`.
    purged: prometheus::IntCounter,
    /// Unix milliseconds of the last successful token fetch, 0 before the first.
    last_refresh_ms: AtomicI64,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let queue = IntGaugeVec::new(
            Opts::new(
                "postwire_site_outbox_messages",
                "Messages in the outbox by state (queued, sending, sent, failed)",
            ),
            &["state"],
        )?;
        let sends = IntCounterVec::new(
            Opts::new(
                "postwire_site_sends_total",
                "Delivery attempts by result (sent, retry, postponed, failed)",
            ),
            &["result"],
        )?;
        let token_source = IntCounterVec::new(
            Opts::new(
                "postwire_site_token_source_total",
                "Access tokens used for deliveries, by where they came from \
                 (memory, redis, local, management)",
            ),
            &["source"],
        )?;
        let refresh_age = prometheus::Gauge::new(
            "postwire_site_token_refresh_age_seconds",
            "Seconds since the last access token was fetched from the Management Service \
             (-1: none yet)",
        )?;
        let held = prometheus::IntGauge::new(
            "postwire_site_sending_held",
            "1 while sending is held because the Management Service refuses the site \
             (401, 403 suspended tenant, 404 deleted site)",
        )?;
        let purged = prometheus::IntCounter::new(
            "postwire_site_outbox_purged_total",
            "Sent and failed messages removed from the outbox after POSTWIRE_OUTBOX_RETENTION",
        )?;
        registry.register(Box::new(held.clone()))?;
        registry.register(Box::new(purged.clone()))?;
        registry.register(Box::new(queue.clone()))?;
        registry.register(Box::new(sends.clone()))?;
        registry.register(Box::new(token_source.clone()))?;
        registry.register(Box::new(refresh_age.clone()))?;
        // Series that exist from the start, so dashboards and alerts see zeros, not gaps.
        for s in [
            Status::Queued,
            Status::Sending,
            Status::Sent,
            Status::Failed,
        ] {
            queue.with_label_values(&[s.as_str()]);
        }
        for r in [
            SendResult::Sent,
            SendResult::Retry,
            SendResult::Postponed,
            SendResult::Failed,
        ] {
            sends.with_label_values(&[r.as_str()]);
        }
        for t in [
            TokenSource::Memory,
            TokenSource::Redis,
            TokenSource::Local,
            TokenSource::Management,
        ] {
            token_source.with_label_values(&[t.as_str()]);
        }
        refresh_age.set(-1.0);
        Ok(Metrics {
            registry,
            queue,
            sends,
            token_source,
            refresh_age,
            held,
            purged,
            last_refresh_ms: AtomicI64::new(0),
        })
    }

    pub fn send(&self, result: SendResult) {
        self.sends.with_label_values(&[result.as_str()]).inc();
    }

    /// `n` sent or failed messages were removed (retention).
    pub fn purged(&self, n: usize) {
        self.purged.inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    pub fn token(&self, source: TokenSource) {
        self.token_source
            .with_label_values(&[source.as_str()])
            .inc();
    }

    /// A token was fetched from the Management Service at `now_ms`.
    pub fn token_refreshed(&self, now_ms: i64) {
        self.last_refresh_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Updates the gauges computed at scrape time and renders every series.
    pub async fn render(&self, store: &Store, now_ms: i64, held: bool) -> String {
        self.held.set(i64::from(held));
        for s in [
            Status::Queued,
            Status::Sending,
            Status::Sent,
            Status::Failed,
        ] {
            match store.count(s).await {
                Ok(n) => self.queue.with_label_values(&[s.as_str()]).set(n),
                Err(e) => tracing::warn!(error = %e, "cannot count the outbox for metrics"),
            }
        }
        let last = self.last_refresh_ms.load(Ordering::Relaxed);
        self.refresh_age.set(if last == 0 {
            -1.0
        } else {
            (now_ms - last).max(0) as f64 / 1000.0
        });
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
