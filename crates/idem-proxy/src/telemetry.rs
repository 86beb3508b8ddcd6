//! Optional OpenTelemetry traces: `[telemetry] otlp_endpoint = "http://…/v1/traces"`
//! (or `https://`).
//!
//! Spans are ordinary `tracing` spans (the request, each store call, the upstream
//! call), bridged to OpenTelemetry by `tracing-opentelemetry` and exported over
//! OTLP/HTTP (protobuf) in batches. An `https://` collector is verified with rustls
//! against the platform's trust store and an optional CA bundle, with an optional
//! client certificate, set as `[upstream_tls]` sets them (`ca`, `platform_roots`,
//! `cert`, `key`). A W3C `traceparent` on the incoming request makes the request span
//! its child, and the upstream receives the `traceparent` of the upstream span. Off by
//! default: then no exporter exists, the propagator is the no-op one, and
//! `traceparent` passes through untouched like any other header.

use std::path::PathBuf;
use std::time::Duration;

use http::HeaderMap;
use idem_tls::{ClientTls, Verify};
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::Deserialize;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{ConfigError, refuse};
use crate::tls::{ClientTlsFiles, Peer, certificate_hint};

/// `[telemetry]`: OpenTelemetry trace export (off unless `otlp_endpoint` is set).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/HTTP traces endpoint, `http://` or `https://`, e.g.
    /// `http://127.0.0.1:4318/v1/traces`. Off when unset (the default).
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the exported spans. Default `idem`.
    pub service_name: String,
    /// Fraction of new traces recorded, 0.0 to 1.0. A request whose `traceparent` says
    /// "sampled" is always recorded, one that says "not sampled" never. Default 1.0.
    pub sample_ratio: f64,
    /// Longest one export may take. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
    /// For an `https://` endpoint: a CA bundle (PEM) trusted in addition to the
    /// platform's store, e.g. a private CA.
    pub ca: Option<PathBuf>,
    /// For an `https://` endpoint: whether the platform's trust store is trusted
    /// (`SSL_CERT_FILE` and `SSL_CERT_DIR` honoured). Default true.
    pub platform_roots: bool,
    /// For an `https://` endpoint: client certificate chain (PEM) shown to a
    /// collector that asks for one (mTLS). Goes with `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// The checked TLS settings of an `https://` endpoint, made by `validate`.
    #[serde(skip)]
    tls: Option<ClientTls>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "idem".into(),
            sample_ratio: 1.0,
            export_timeout: Duration::from_secs(10),
            ca: None,
            platform_roots: true,
            cert: None,
            key: None,
            tls: None,
        }
    }
}

impl TelemetryConfig {
    /// Checks every field, and reads the TLS files of an `https://` endpoint; errors
    /// name the field.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        if let Some(https) = self.endpoint_is_https()? {
            self.tls = self.check_tls(https)?;
        }
        if self.service_name.trim().is_empty() {
            return Err(refuse("telemetry.service_name", "must not be empty"));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(refuse(
                "telemetry.sample_ratio",
                format!("{} is not between 0.0 and 1.0", self.sample_ratio),
            ));
        }
        if self.export_timeout.is_zero() {
            return Err(refuse("telemetry.export_timeout", "must be positive"));
        }
        Ok(self)
    }

    /// `Some(true)` for an `https://` endpoint, `Some(false)` for `http://`, `None`
    /// when there is none.
    fn endpoint_is_https(&self) -> Result<Option<bool>, ConfigError> {
        let Some(url) = &self.otlp_endpoint else {
            return Ok(None);
        };
        let field = "telemetry.otlp_endpoint";
        let uri: http::Uri = url
            .parse()
            .map_err(|e| refuse(field, format!("{url:?} is not a URL: {e}")))?;
        match (uri.scheme_str(), uri.authority()) {
            (Some("https"), Some(_)) => Ok(Some(true)),
            (Some("http"), Some(_)) => Ok(Some(false)),
            _ => Err(refuse(
                field,
                format!("{url:?} must be an http:// or https:// URL with a host"),
            )),
        }
    }

    /// The TLS settings of an `https://` endpoint, read and checked now. Setting them
    /// for an `http://` endpoint is refused as a mistake, as for `[upstream_tls]`.
    fn check_tls(&self, https: bool) -> Result<Option<ClientTls>, ConfigError> {
        let files = ClientTlsFiles {
            ca: self.ca.as_deref(),
            platform_roots: self.platform_roots,
            cert: self.cert.as_deref(),
            key: self.key.as_deref(),
        };
        if https {
            return files.check("telemetry", Verify::Full).map(Some);
        }
        let set = [
            ("ca", self.ca.is_some()),
            ("platform_roots", !self.platform_roots),
            ("cert", self.cert.is_some()),
            ("key", self.key.is_some()),
        ];
        match set.iter().find(|(_, set)| *set) {
            Some((name, _)) => Err(refuse(
                format!("telemetry.{name}"),
                "is set but otlp_endpoint is http://",
            )),
            None => Ok(None),
        }
    }

    /// Whether traces are exported.
    pub fn enabled(&self) -> bool {
        self.otlp_endpoint.is_some()
    }
}

/// The running exporter; [`Telemetry::shutdown`] flushes the spans not yet sent.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// A `tracing` layer that turns spans into OpenTelemetry spans.
pub type OtelLayer<S> =
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>;

impl Telemetry {
    /// Starts the exporter and installs the W3C trace-context propagator; `None` when
    /// telemetry is off.
    pub fn start<S>(config: &TelemetryConfig) -> Result<Option<(Self, OtelLayer<S>)>, String>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let Some(endpoint) = config.otlp_endpoint.clone() else {
            return Ok(None);
        };
        let (timeout, tls) = (config.export_timeout, config.tls.clone());
        // The blocking HTTP client must not be built on a runtime thread.
        let exporter = std::thread::spawn(move || exporter(endpoint, timeout, tls))
            .join()
            .map_err(|_| "telemetry: the exporter could not be built".to_owned())??;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("idem"));
        Ok(Some((Telemetry { provider }, layer)))
    }

    /// Sends the spans still buffered and stops the exporter.
    pub async fn shutdown(self) {
        let provider = self.provider;
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "telemetry: spans may have been lost at shutdown");
        }
    }
}

/// The OTLP/HTTP exporter, over a blocking reqwest client built here: for an
/// `https://` endpoint on idem-tls's rustls configuration (ring, the roots and client
/// certificate of `[telemetry]`).
fn exporter(
    endpoint: String,
    timeout: Duration,
    tls: Option<ClientTls>,
) -> Result<SpanExporter, String> {
    // reqwest is built without a crypto provider of its own (`rustls-no-provider`): its
    // default TLS setup, which a plain-http client still builds, takes the process's.
    idem_tls::install_default_provider();
    let mut client = otlp_reqwest::blocking::Client::builder().timeout(timeout);
    if let Some(tls) = tls {
        // This reqwest speaks HTTP/1.1 only (no `http2` feature).
        let tls = ClientTls {
            alpn: vec![b"http/1.1".to_vec()],
            ..tls
        };
        let rustls = tls.config().map_err(|e| format!("telemetry.ca: {e}"))?;
        client = client.tls_backend_preconfigured(rustls);
    }
    let client = client
        .build()
        .map_err(|e| format!("telemetry: the HTTP client could not be built: {e}"))?;
    SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(timeout)
        .with_http_client(SaysWhy(client))
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))
}

/// The exporter's HTTP client, which logs why a request could not be sent: the
/// exporter itself reports only "network error", which hides a refused certificate.
#[derive(Debug)]
struct SaysWhy(otlp_reqwest::blocking::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for SaysWhy {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let sent = self.0.send_bytes(request).await;
        if let Err(e) = &sent {
            log_failure(e.as_ref());
        }
        sent
    }
}

/// The collector, as a failed handshake's hint names it.
const COLLECTOR: Peer = Peer {
    name: "collector",
    ca: "telemetry.ca",
    host: "otlp_endpoint",
};

/// Logs a failed export: a TLS failure names the setting to look at, as a refused
/// upstream certificate does.
fn log_failure(e: &(dyn std::error::Error + 'static)) {
    match certificate_hint(e, &COLLECTOR) {
        Some(hint) => tracing::error!("telemetry: {hint}; spans are dropped"),
        None => tracing::warn!(error = %chain(e), "telemetry: spans could not be sent"),
    }
}

/// An error and its sources, `: `-separated (reqwest's own message omits the cause).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::try_from(key),
            http::HeaderValue::try_from(value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` a child of the caller's trace, when the request carries one.
pub fn adopt_parent(span: &tracing::Span, headers: &HeaderMap) {
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    let _ = span.set_parent(parent);
}

/// Writes `span`'s trace context into `headers` (`traceparent`, `tracestate`).
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers));
    });
}

/// The request's span, carried in request extensions to the work that runs in tasks
/// of its own (the upstream call), so that their spans are its children.
#[derive(Debug, Clone)]
pub struct RequestSpan(pub tracing::Span);

#[cfg(test)]
mod tests {
    use super::*;
    use idem_conformance::pki::TestCa;

    fn parse(text: &str) -> Result<TelemetryConfig, ConfigError> {
        #[derive(Deserialize)]
        struct Doc {
            telemetry: TelemetryConfig,
        }
        toml::from_str::<Doc>(text)
            .map_err(|e| refuse("telemetry", e.to_string()))?
            .telemetry
            .validate()
    }

    #[test]
    fn off_by_default() {
        let c = TelemetryConfig::default().validate().unwrap();
        assert!(!c.enabled());
        assert_eq!(c.service_name, "idem");
    }

    #[test]
    fn accepts_an_http_endpoint() {
        let c = parse("[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318/v1/traces\"\nsample_ratio = 0.25\nexport_timeout = \"2s\"").unwrap();
        assert!(c.enabled());
        assert_eq!(c.export_timeout, Duration::from_secs(2));
    }

    #[test]
    fn refused_values_name_their_field() {
        for (text, field) in [
            ("otlp_endpoint = \"not a url\"", "telemetry.otlp_endpoint"),
            (
                "otlp_endpoint = \"ftp://collector:4318/v1/traces\"",
                "telemetry.otlp_endpoint",
            ),
            ("otlp_endpoint = \"/v1/traces\"", "telemetry.otlp_endpoint"),
            ("service_name = \" \"", "telemetry.service_name"),
            ("sample_ratio = 1.5", "telemetry.sample_ratio"),
            ("sample_ratio = -0.1", "telemetry.sample_ratio"),
            ("export_timeout = \"0s\"", "telemetry.export_timeout"),
        ] {
            let err = parse(&format!("[telemetry]\n{text}")).unwrap_err();
            assert_eq!(err.field, field, "{text}: {err}");
        }
        assert!(
            parse("[telemetry]\nendpoint = \"x\"").is_err(),
            "unknown fields are refused"
        );
    }

    fn toml_path(p: &std::path::Path) -> String {
        format!("{:?}", p.display().to_string())
    }

    #[test]
    fn accepts_an_https_endpoint_with_a_ca_bundle_and_a_client_certificate() {
        let ca = TestCa::new("otlp");
        let me = ca.client("idem", "idem");
        let https = "otlp_endpoint = \"https://collector.example:4318/v1/traces\"";
        let c = parse(&format!(
            "[telemetry]\n{https}\nca = {}\nplatform_roots = false\ncert = {}\nkey = {}",
            toml_path(&ca.ca_file()),
            toml_path(&me.cert),
            toml_path(&me.key),
        ))
        .unwrap();
        let tls = c.tls.expect("checked TLS settings");
        assert_eq!(tls.ca_files, vec![ca.ca_file()]);
        assert!(!tls.platform_roots && tls.identity.is_some());
    }

    #[test]
    fn refused_tls_settings_name_their_field() {
        let ca = TestCa::new("otlp-bad");
        let me = ca.client("idem", "idem");
        let missing = toml_path(&ca.dir().join("missing.pem"));
        let (cert, key) = (toml_path(&me.cert), toml_path(&me.key));
        let https = "otlp_endpoint = \"https://collector:4318/v1/traces\"";
        let http = "otlp_endpoint = \"http://collector:4318/v1/traces\"";
        for (text, field) in [
            (format!("{https}\nca = {missing}"), "telemetry.ca"),
            (format!("{https}\nca = {key}"), "telemetry.ca"),
            (format!("{https}\nplatform_roots = false"), "telemetry.ca"),
            (format!("{https}\ncert = {cert}"), "telemetry.key"),
            (
                format!("{https}\ncert = {cert}\nkey = {missing}"),
                "telemetry.key",
            ),
            (
                format!("{https}\ncert = {missing}\nkey = {key}"),
                "telemetry.cert",
            ),
            (
                format!("{http}\nca = {}", toml_path(&ca.ca_file())),
                "telemetry.ca",
            ),
            (
                format!("{http}\ncert = {cert}\nkey = {key}"),
                "telemetry.cert",
            ),
        ] {
            let err = parse(&format!("[telemetry]\n{text}")).unwrap_err();
            assert_eq!(err.field, field, "{text}: {err}");
        }
    }
}
