//! Prometheus metrics (`GET /metrics`, text format 0.0.4). No per-tenant series: 100,000
//! tenants must not become 100,000 series; per-tenant detail lives in the API.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route pattern, method and status.
    pub http_requests: IntCounterVec,
    /// HTTP request latency by route pattern and method.
    pub http_duration: HistogramVec,
    /// Provider token refreshes by result: success, invalid_grant, rejected, transient.
    pub token_refreshes: IntCounterVec,
    /// Access tokens served, by the layer that had them: memory, redis, database, refresh.
    pub token_source: IntCounterVec,
    /// Grants by status, computed at scrape time.
    pub grants: IntGaugeVec,
    /// Age in seconds of the oldest successful refresh across authorized grants.
    pub oldest_refresh_age: prometheus::Gauge,
    /// Outbox messages not yet delivered, by kind and status (queued, sending); computed at
    /// scrape time.
    pub outbox_messages: IntGaugeVec,
    /// Age in seconds of the oldest undelivered outbox message (0 when the outbox is empty).
    pub outbox_oldest_age: prometheus::Gauge,
    /// Delivery attempts of the Management Service's own mail, by kind and result: sent,
    /// retry (transient failure or waiting for settings), failed.
    pub mail_sends: IntCounterVec,
}

/// The kinds of mail the Management Service sends itself (`outbox.kind`).
pub const MAIL_KINDS: [&str; 2] = ["invitation", "test"];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "postwire_http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "postwire_http_request_duration_seconds",
                "HTTP request latency by route and method",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["route", "method"],
        )?;
        let token_refreshes = IntCounterVec::new(
            Opts::new(
                "postwire_token_refreshes_total",
                "OAuth 2.0 token refreshes at the provider, by result",
            ),
            &["result"],
        )?;
        let token_source = IntCounterVec::new(
            Opts::new(
                "postwire_token_cache_lookups_total",
                "Access tokens served to sites, by the cache layer that had them",
            ),
            &["layer"],
        )?;
        let grants = IntGaugeVec::new(
            Opts::new("postwire_oauth_grants", "OAuth 2.0 grants by status"),
            &["status"],
        )?;
        let oldest_refresh_age = prometheus::Gauge::new(
            "postwire_oauth_oldest_refresh_age_seconds",
            "Age of the oldest successful refresh across authorized grants",
        )?;
        let outbox_messages = IntGaugeVec::new(
            Opts::new(
                "postwire_outbox_messages",
                "Outbox messages not yet delivered, by kind and status",
            ),
            &["kind", "status"],
        )?;
        let outbox_oldest_age = prometheus::Gauge::new(
            "postwire_outbox_oldest_message_age_seconds",
            "Age of the oldest undelivered outbox message (0 when none waits)",
        )?;
        let mail_sends = IntCounterVec::new(
            Opts::new(
                "postwire_mail_sends_total",
                "Delivery attempts of the Management Service's own mail, by kind and result",
            ),
            &["kind", "result"],
        )?;
        registry.register(Box::new(outbox_messages.clone()))?;
        registry.register(Box::new(outbox_oldest_age.clone()))?;
        registry.register(Box::new(mail_sends.clone()))?;
        for k in MAIL_KINDS {
            for s in ["queued", "sending"] {
                outbox_messages.with_label_values(&[k, s]);
            }
            for r in ["sent", "retry", "failed"] {
                mail_sends.with_label_values(&[k, r]);
            }
        }
        for c in [&http_requests, &token_refreshes, &token_source] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(grants.clone()))?;
        registry.register(Box::new(oldest_refresh_age.clone()))?;
        // Series that exist from the start, so dashboards and alerts see zeros, not gaps.
        for r in ["success", "invalid_grant", "rejected", "transient"] {
            token_refreshes.with_label_values(&[r]);
        }
        for l in ["memory", "redis", "database", "refresh"] {
            token_source.with_label_values(&[l]);
        }
        for s in ["authorized", "reauthorization_required"] {
            grants.with_label_values(&[s]);
        }
        Ok(Self {
            registry,
            http_requests,
            http_duration,
            token_refreshes,
            token_source,
            grants,
            oldest_refresh_age,
            outbox_messages,
            outbox_oldest_age,
            mail_sends,
        })
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
