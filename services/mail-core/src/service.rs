//! Process start-up shared by the Postwire services: load the configuration, start logging
//! and tracing, start the async runtime, run, flush the traces and map the outcome to the exit
//! code. Also the W3C trace-context helpers both services use on their HTTP edges.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{ConfigError, LogFormat};

/// The running trace exporter, if any. Dropping it (or [`Telemetry::shutdown`]) flushes the
/// spans still queued and stops the exporter.
#[must_use = "dropping the guard stops the trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes the queued spans and stops the exporter (waiting at most 5 s for an
    /// unreachable collector).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown_with_timeout(std::time::Duration::from_secs(5))
        {
            eprintln!("warning: OpenTelemetry: flushing the last spans failed: {e}");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Logging and tracing for the whole process:
/// - logs: text or JSON (`POSTWIRE_LOG_FORMAT`) to stderr, filtered by `RUST_LOG` (default
///   `info`); a JSON line carries the list of its spans (`spans`), so every line written
///   inside a request carries that request's `request_id`;
/// - traces: exported over OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` or
///   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, honouring the standard `OTEL_*` variables
///   (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`,
///   `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`/`TIMEOUT`, `OTEL_BSP_*`, `OTEL_SDK_DISABLED`,
///   `OTEL_TRACES_EXPORTER=none`). Unset: no exporter, no OpenTelemetry layer, no cost.
///
/// `service` names the service (`service.name`) unless `OTEL_SERVICE_NAME` or
/// `OTEL_RESOURCE_ATTRIBUTES` does. Must be called outside the async runtime (the exporter
/// owns a blocking HTTP client). A second call in one process only returns an idle guard.
pub fn init_tracing(format: LogFormat, service: &str) -> Telemetry {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    // A plain list of `target=level` directives (the usual case, and the default `info`)
    // is decided once per callsite by `Targets`. `EnvFilter`, needed for span and field
    // directives, also looks each span up in a locked map whenever it is entered or left:
    // about 5 µs of CPU per message the site mailer delivers (its `deliver` span is entered
    // at every poll), measured with the `site_mailer_send` bench.
    let spec = env("RUST_LOG").unwrap_or_else(|| "info".to_owned());
    let filter = match spec.parse::<Targets>() {
        Ok(targets) => targets.boxed(),
        Err(_) => EnvFilter::try_new(&spec)
            .unwrap_or_else(|_| EnvFilter::new("info"))
            .boxed(),
    };
    // Colours only on a terminal: a log file or a collector gets plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let provider = match otlp_provider(&env, service) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("warning: OpenTelemetry: traces are not exported: {e}");
            None
        }
    };
    let otel = provider.as_ref().map(|p| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("postwire"))
            .with_threads(false)
            // The exporter's own HTTP client must not trace itself into a feedback loop.
            .with_filter(
                Targets::new()
                    .with_default(LevelFilter::TRACE)
                    .with_target("hyper", LevelFilter::OFF)
                    .with_target("hyper_util", LevelFilter::OFF)
                    .with_target("h2", LevelFilter::OFF)
                    .with_target("reqwest", LevelFilter::OFF)
                    .with_target("opentelemetry", LevelFilter::OFF)
                    .with_target("opentelemetry_sdk", LevelFilter::OFF)
                    .with_target("opentelemetry_otlp", LevelFilter::OFF)
                    .with_target("opentelemetry_http", LevelFilter::OFF),
            )
    });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    Telemetry {
        // Another subscriber was installed first (a test process): nothing of ours exports.
        provider: if installed { provider } else { None },
    }
}

/// The tracer provider from the standard `OTEL_*` variables; `None` when no endpoint is set
/// or tracing is switched off.
fn otlp_provider(
    env: &dyn Fn(&str) -> Option<String>,
    service: &str,
) -> Result<Option<SdkTracerProvider>, String> {
    if env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        && env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
    {
        return Ok(None);
    }
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return Ok(None);
    }
    if let Some(p) = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .filter(|p| p != "http/protobuf")
    {
        return Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL `{p}` is not supported: only `http/protobuf`"
        ));
    }
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource(service))
            .build(),
    ))
}

/// `service.name` (ours unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` names one),
/// `service.version`, the SDK's attributes and `OTEL_RESOURCE_ATTRIBUTES`.
fn resource(service: &str) -> opentelemetry_sdk::Resource {
    let detected = opentelemetry_sdk::Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    let builder = opentelemetry_sdk::Resource::builder().with_attribute(
        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    );
    if named {
        builder.build()
    } else {
        builder.with_service_name(service.to_owned()).build()
    }
}

/// Makes `span` a child of the W3C `traceparent` (and `tracestate`) of an incoming request, so
/// a caller's trace continues here. No effect without a valid header or when not exporting.
pub fn set_remote_parent(span: &tracing::Span, headers: &actix_web::http::header::HeaderMap) {
    struct Carrier<'a>(&'a actix_web::http::header::HeaderMap);
    impl Extractor for Carrier<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(|k| k.as_str()).collect()
        }
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Carrier(headers)));
    use opentelemetry::trace::TraceContextExt as _;
    if cx.span().span_context().is_remote() {
        let _ = span.set_parent(cx);
    }
}

/// The W3C `traceparent` (and `tracestate`) headers of the current span, for an outgoing
/// request; empty when not exporting.
pub fn trace_headers() -> reqwest::header::HeaderMap {
    struct Carrier(reqwest::header::HeaderMap);
    impl Injector for Carrier {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(k), Ok(v)) = (
                reqwest::header::HeaderName::from_bytes(key.as_bytes()),
                reqwest::header::HeaderValue::from_str(&value),
            ) {
                self.0.insert(k, v);
            }
        }
    }
    let cx = tracing::Span::current().context();
    let mut carrier = Carrier(reqwest::header::HeaderMap::new());
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.0
}

/// The service name for `service.name`: the executable's file name (`management-service`,
/// `site-mailer`).
fn executable_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "postwire".to_owned())
}

/// Installs the TLS crypto provider, loads the configuration (a bad one: exit code 2), starts
/// logging in its format (and trace export when configured) and runs `run` on a new Tokio
/// runtime (an error: exit code 1). The spans still queued are flushed before exiting.
pub fn run<C, F, E>(
    load: impl FnOnce() -> Result<C, ConfigError>,
    log_format: impl FnOnce(&C) -> LogFormat,
    run: impl FnOnce(C) -> F,
) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: Display,
{
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = match load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry = init_tracing(log_format(&config), &executable_name());
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(config));
    drop(runtime);
    telemetry.shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| {
            vars.iter()
                .find(|(name, _)| name == k)
                .map(|(_, v)| v.clone())
        }
    }

    const ENDPOINT: &str = "http://127.0.0.1:4318";

    #[test]
    fn no_endpoint_no_exporter() {
        assert!(otlp_provider(&env(&[]), "svc").unwrap().is_none());
        // Other OTEL_* variables alone do not switch export on.
        let only_name = env(&[
            ("OTEL_SERVICE_NAME", "x"),
            ("OTEL_TRACES_SAMPLER", "always_on"),
        ]);
        assert!(otlp_provider(&only_name, "svc").unwrap().is_none());
    }

    #[test]
    fn either_endpoint_switches_export_on_unless_disabled() {
        for var in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ] {
            let p = otlp_provider(&env(&[(var, ENDPOINT)]), "svc").unwrap();
            assert!(p.is_some(), "{var}");
            if let Some(p) = p {
                let _ = p.shutdown();
            }
        }
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let vars = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", ENDPOINT), off]);
            assert!(otlp_provider(&vars, "svc").unwrap().is_none(), "{off:?}");
        }
    }

    #[test]
    fn only_http_protobuf_is_offered() {
        let grpc = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ]);
        let err = otlp_provider(&grpc, "svc").err().unwrap();
        assert!(err.contains("http/protobuf"), "{err}");
        let explicit = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", ENDPOINT),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ]);
        assert!(otlp_provider(&explicit, "svc").unwrap().is_some());
    }
}
