//! `idem.toml`: the sidecar's configuration. Parsed, then checked by
//! [`Config::validate`]; every error names the field. CLI flags override the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use idem_core::crypto::EncryptionKey;
use idem_core::policy::serde_http;
use idem_core::{Policy, Routes};
use serde::Deserialize;

/// A refused configuration: names the field and says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The field, as written in the file (`routes[1].ttl`, `proxy.connect_timeout`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// The environment variable read for the tenant secret unless `tenant.secret_env`
/// names another.
pub const TENANT_SECRET_ENV: &str = "IDEM_TENANT_SECRET";
/// The environment variable read for the admin token unless `admin.token_env` names
/// another.
pub const ADMIN_TOKEN_ENV: &str = "IDEM_ADMIN_TOKEN";
/// The environment variable read for the encryption key unless `encryption.key_env`
/// names another.
pub const ENCRYPTION_KEY_ENV: &str = "IDEM_ENCRYPTION_KEY";

pub(crate) fn refuse(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the proxy listens on. Default `127.0.0.1:8080`.
    pub listen: String,
    /// The protected API, e.g. `http://127.0.0.1:3000` or `https://api.internal`.
    /// Required.
    pub upstream: Option<String>,
    /// How an `https://` upstream is checked (trust, client certificate).
    pub upstream_tls: crate::tls::UpstreamTlsConfig,
    /// TLS on the proxy listener (off unless `cert` and `key` are given).
    pub listen_tls: crate::tls::ListenerTlsConfig,
    /// Store URL: `memory`, `sqlite:PATH`, `redis://…`, `postgres://…`. Default
    /// `sqlite:idem.db`.
    pub store: String,
    /// `text` (default) or `json` logs.
    pub log_format: LogFormat,
    /// Tenant identification.
    pub tenant: TenantConfig,
    /// Proxying settings.
    pub proxy: ProxyConfig,
    /// Admin listener.
    pub admin: AdminConfig,
    /// Encryption at rest of stored responses.
    pub encryption: EncryptionConfig,
    /// OpenTelemetry traces (off by default).
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// The policy of every route that sets nothing else (all of SPEC's settings).
    pub defaults: toml::Table,
    /// Per-route policies, tried in order; the first match wins.
    pub routes: Vec<toml::Table>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            upstream: None,
            upstream_tls: crate::tls::UpstreamTlsConfig::default(),
            listen_tls: crate::tls::ListenerTlsConfig::default(),
            store: "sqlite:idem.db".into(),
            log_format: LogFormat::Text,
            tenant: TenantConfig::default(),
            proxy: ProxyConfig::default(),
            admin: AdminConfig::default(),
            encryption: EncryptionConfig::default(),
            telemetry: Default::default(),
            defaults: toml::Table::new(),
            routes: Vec::new(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[tenant]`: whose key is it (SPEC §2).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    /// The secret that keys the tenant hash (16 bytes or more). Must be the same on
    /// every instance sharing a store. Prefer `secret_env`.
    pub secret: Option<String>,
    /// Name of an environment variable holding the secret. Default `IDEM_TENANT_SECRET`.
    pub secret_env: String,
    /// Headers holding the caller's credential, first present wins. Default
    /// `authorization`, `x-api-key`.
    #[serde(with = "serde_http::header_names")]
    pub credential_headers: Vec<HeaderName>,
    /// Most requests with keys one tenant may have executing at once; past it a new
    /// key gets `429 tenant-limit-reached`. Default: no cap.
    pub max_in_flight: Option<u64>,
    /// Most live records (in flight or stored, not expired) one tenant may hold; past
    /// it a new key gets `429 tenant-limit-reached`. Default: no cap.
    pub max_records: Option<u64>,
}

impl Default for TenantConfig {
    fn default() -> Self {
        TenantConfig {
            secret: None,
            secret_env: TENANT_SECRET_ENV.into(),
            credential_headers: vec![
                http::header::AUTHORIZATION,
                HeaderName::from_static("x-api-key"),
            ],
            max_in_flight: None,
            max_records: None,
        }
    }
}

/// `[proxy]`: how the upstream is called.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Longest wait for a connection to the upstream. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for the upstream's response headers once the request is sent.
    /// Default 60 s. Past it the outcome is unknown: the key stays in flight until its
    /// lease expires, and the client gets 504.
    #[serde(with = "humantime_serde")]
    pub response_timeout: Duration,
    /// How long idle upstream connections are kept. Default 90 s.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Longest time a client may take to send its request headers. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Response header by which the upstream says "do not store this outcome"; idem
    /// honours and strips it. Default `idem-no-store`.
    #[serde(with = "header_name")]
    pub no_store_header: HeaderName,
    /// On SIGTERM/SIGINT, how long in-flight requests, and executions whose callers
    /// left, may take to finish and store their outcomes. Default 65 s: longer than
    /// `response_timeout`, so an upstream call that is answered in time is stored.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// Threads serving the proxy listener, each with its own runtime, listener
    /// (`SO_REUSEPORT`) and upstream pool. Default: one per core.
    pub workers: Option<usize>,
}

impl ProxyConfig {
    /// `[proxy]`: at least one worker, and every timeout positive.
    fn check(&self) -> Result<(), ConfigError> {
        if self.workers == Some(0) {
            return Err(refuse(
                "proxy.workers",
                "must be at least 1 (leave it out for one per core)",
            ));
        }
        for (field, d) in [
            ("proxy.connect_timeout", self.connect_timeout),
            ("proxy.response_timeout", self.response_timeout),
            ("proxy.header_read_timeout", self.header_read_timeout),
        ] {
            if d.is_zero() {
                return Err(refuse(field, "must be positive"));
            }
        }
        Ok(())
    }

    /// The number of worker threads: as configured, else one per core.
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(90),
            header_read_timeout: Duration::from_secs(10),
            no_store_header: HeaderName::from_static("idem-no-store"),
            grace_period: Duration::from_secs(65),
            workers: None,
        }
    }
}

mod header_name {
    use http::HeaderName;
    use serde::{Deserialize, Deserializer, de::Error};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HeaderName, D::Error> {
        let s = String::deserialize(d)?;
        HeaderName::try_from(s.as_str())
            .map_err(|_| D::Error::custom(format!("{s:?} is not a valid header name")))
    }
}

/// `[admin]`: the admin listener (off unless `listen` is set).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener, e.g. `127.0.0.1:9090`. Off by default.
    pub listen: Option<String>,
    /// Bearer token required on every admin request. Prefer `token_env`.
    pub token: Option<String>,
    /// Environment variable holding the token. Default `IDEM_ADMIN_TOKEN`.
    pub token_env: Option<String>,
    /// TLS on the admin listener (off unless `cert` and `key` are given).
    pub tls: crate::tls::ListenerTlsConfig,
    /// How many failed logins a client address may make before it must wait.
    pub login_limit: LoginLimitConfig,
}

/// `[admin.login_limit]`: once a client address has failed `failures` logins within
/// `window`, its logins are refused with `429` until the window ends, the token
/// unchecked. Default: 10 failures per 5 minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoginLimitConfig {
    /// Failed logins allowed per client address within one window (at least 1).
    pub failures: u32,
    /// How long a window lasts from an address's first failure (at least 1 s:
    /// `Retry-After` counts whole seconds).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
}

impl Default for LoginLimitConfig {
    fn default() -> Self {
        LoginLimitConfig {
            failures: 10,
            window: Duration::from_secs(300),
        }
    }
}

impl LoginLimitConfig {
    /// Refuses a limit that would lock out every login or count nothing.
    fn check(self) -> Result<Self, ConfigError> {
        if self.failures == 0 {
            return Err(refuse(
                "admin.login_limit.failures",
                "must be at least 1 (0 would refuse every login)",
            ));
        }
        if self.window < Duration::from_secs(1) {
            return Err(refuse(
                "admin.login_limit.window",
                "must be at least 1s (Retry-After counts whole seconds)",
            ));
        }
        Ok(self)
    }
}

/// `[encryption]`: stored responses sealed with XChaCha20-Poly1305 (off unless a key
/// is given).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncryptionConfig {
    /// The key, 64 hex digits (32 bytes). Prefer `key_env`.
    pub key: Option<String>,
    /// Environment variable holding the key. Default `IDEM_ENCRYPTION_KEY`.
    pub key_env: Option<String>,
}

/// A checked configuration, ready to serve.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Proxy listener.
    pub listen: SocketAddr,
    /// Upstream base URI (`http://host:port` or `https://…`, optional path prefix).
    pub upstream: Uri,
    /// TLS to an `https://` upstream.
    pub upstream_tls: Option<idem_tls::ClientTls>,
    /// TLS on the proxy listener.
    pub listen_tls: Option<crate::tls::ListenerTls>,
    /// TLS on the admin listener.
    pub admin_tls: Option<crate::tls::ListenerTls>,
    /// The store, its URL parsed once here.
    pub store: crate::store::StoreUrl,
    /// Log format.
    pub log_format: LogFormat,
    /// Tenant secret, if configured (else the store decides, see `tenant_secret`).
    pub tenant_secret: Option<Vec<u8>>,
    /// Credential headers.
    pub credential_headers: Vec<HeaderName>,
    /// Per-tenant caps.
    pub tenant_limits: idem_core::TenantLimits,
    /// Proxy settings.
    pub proxy: ProxyConfig,
    /// The admin listener, if configured.
    pub admin: Option<AdminListener>,
    /// Route table.
    pub routes: Routes,
    /// Encryption at rest, if configured.
    pub encryption: Option<EncryptionKey>,
    /// Trace export.
    pub telemetry: crate::telemetry::TelemetryConfig,
}

/// The admin listener's address and the token it asks for.
#[derive(Debug, Clone)]
pub struct AdminListener {
    /// Where it listens.
    pub listen: SocketAddr,
    /// The bearer token every admin request must carry (16 characters or more).
    pub token: String,
    /// Failed logins allowed per client address, and over what window.
    pub login_limit: LoginLimitConfig,
}

/// Overrides from the command line (flags win over the file).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--store`.
    pub store: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
}

impl Config {
    /// Reads and parses a file; syntax errors and unknown fields name the field.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| refuse(path.display().to_string(), format!("cannot read: {e}")))?;
        Self::parse(&text)
    }

    /// Parses TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let field = e
                .span()
                .map_or_else(|| "config".to_owned(), |span| field_at(text, span.start));
            refuse(field, e.message().to_owned())
        })
    }

    /// Applies the command-line overrides.
    #[must_use]
    pub fn with_overrides(mut self, o: Overrides) -> Self {
        if let Some(v) = o.listen {
            self.listen = v;
        }
        if let Some(v) = o.upstream {
            self.upstream = Some(v);
        }
        if let Some(v) = o.store {
            self.store = v;
        }
        if let Some(v) = o.admin_listen {
            self.admin.listen = Some(v);
        }
        if let Some(v) = o.log_format {
            self.log_format = v;
        }
        self
    }

    /// Checks every value; the error names the field.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let listen = parse_addr("listen", &self.listen)?;
        let upstream = self.upstream()?;
        let upstream_tls = self
            .upstream_tls
            .validate(upstream.scheme_str() == Some("https"))?;
        let listen_tls = self.listen_tls.validate("listen_tls")?;
        let admin_tls = self.admin.tls.validate("admin.tls")?;
        let store =
            crate::store::parse_url(&self.store).map_err(|e| refuse("store", e.to_string()))?;
        let tenant_secret = self.tenant.checked_secret()?;
        self.proxy.check()?;
        Ok(Settings {
            listen,
            upstream,
            upstream_tls,
            listen_tls,
            admin_tls,
            store,
            log_format: self.log_format,
            tenant_secret,
            tenant_limits: idem_core::TenantLimits::new(
                self.tenant.max_in_flight,
                self.tenant.max_records,
            ),
            admin: self.admin.listener()?,
            encryption: self.encryption.key()?,
            routes: self.routes()?,
            credential_headers: self.tenant.credential_headers,
            proxy: self.proxy,
            telemetry: self.telemetry.validate()?,
        })
    }

    /// `upstream`: required, an `http://` or `https://` URL with a host.
    fn upstream(&self) -> Result<Uri, ConfigError> {
        let text = self
            .upstream
            .as_deref()
            .ok_or_else(|| refuse("upstream", "is required (e.g. http://127.0.0.1:3000)"))?;
        let upstream: Uri = text
            .parse()
            .map_err(|e| refuse("upstream", format!("{text:?} is not a URL: {e}")))?;
        if !matches!(upstream.scheme_str(), Some("http" | "https"))
            || upstream.authority().is_none()
        {
            return Err(refuse(
                "upstream",
                format!("{text:?} must be an http:// or https:// URL with a host"),
            ));
        }
        Ok(upstream)
    }

    /// `[defaults]` and `[[routes]]`: the route table, in order.
    fn routes(&self) -> Result<Routes, ConfigError> {
        let defaults = policy_from(&self.defaults, "defaults")?;
        let mut routes = Routes::new(defaults);
        for (i, raw) in self.routes.iter().enumerate() {
            let prefix = format!("routes[{i}]");
            let mut table = raw.clone();
            let path = route_path(&mut table, &prefix)?;
            let method = route_method(&mut table, &prefix)?;
            // A route's settings override the defaults, field by field.
            let mut merged = self.defaults.clone();
            merged.extend(table);
            let policy = policy_from(&merged, &prefix)?;
            routes = routes
                .route(method, &path, policy)
                .map_err(|e| refuse(format!("{prefix}.{}", e.field), e.message))?;
        }
        Ok(routes)
    }
}

/// A route's `path`, taken out of its table: required, a string.
fn route_path(table: &mut toml::Table, prefix: &str) -> Result<String, ConfigError> {
    match table.remove("path") {
        Some(toml::Value::String(p)) => Ok(p),
        Some(_) => Err(refuse(format!("{prefix}.path"), "must be a string")),
        None => Err(refuse(
            format!("{prefix}.path"),
            "is required (e.g. \"/v1/charges/{id}/capture\")",
        )),
    }
}

/// A route's `method`, taken out of its table: `None` (any) when absent, `*` or `any`.
fn route_method(table: &mut toml::Table, prefix: &str) -> Result<Option<Method>, ConfigError> {
    match table.remove("method") {
        None => Ok(None),
        Some(toml::Value::String(m)) if m == "*" || m.eq_ignore_ascii_case("any") => Ok(None),
        Some(toml::Value::String(m)) => Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map(Some)
            .map_err(|_| refuse(format!("{prefix}.method"), format!("{m:?} is not a method"))),
        Some(_) => Err(refuse(format!("{prefix}.method"), "must be a string")),
    }
}

impl TenantConfig {
    /// The configured secret and the field it came from: `tenant.secret`, else the
    /// variable `secret_env` names (`tenant.secret_env`). Unchecked: see
    /// [`idem_core::TenantSecret::new`].
    pub fn configured_secret(&self) -> Option<(&'static str, String)> {
        match (&self.secret, std::env::var(&self.secret_env).ok()) {
            (Some(s), _) => Some(("tenant.secret", s.clone())),
            (None, Some(s)) => Some(("tenant.secret_env", s)),
            (None, None) => None,
        }
    }

    /// `[tenant]`: the configured secret if long enough, the caps, the headers.
    fn checked_secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let secret = self.configured_secret();
        if let Some((field, s)) = &secret
            && s.len() < idem_core::TenantSecret::MIN_LEN
        {
            return Err(refuse(
                *field,
                format!(
                    "must be at least {} bytes",
                    idem_core::TenantSecret::MIN_LEN
                ),
            ));
        }
        for (field, cap) in [
            ("tenant.max_in_flight", self.max_in_flight),
            ("tenant.max_records", self.max_records),
        ] {
            if cap == Some(0) {
                return Err(refuse(
                    field,
                    "must be at least 1 (leave it out for no cap)",
                ));
            }
        }
        if self.credential_headers.is_empty() {
            return Err(refuse(
                "tenant.credential_headers",
                "must name at least one header",
            ));
        }
        Ok(secret.map(|(_, s)| s.into_bytes()))
    }
}

impl AdminConfig {
    /// `[admin]`: the listener, when `listen` is set, with its token (from `token`,
    /// else the variable `token_env` names), 16 characters or more.
    fn listener(&self) -> Result<Option<AdminListener>, ConfigError> {
        let login_limit = self.login_limit.check()?;
        let Some(addr) = &self.listen else {
            return Ok(None);
        };
        let listen = parse_addr("admin.listen", addr)?;
        let env = self.token_env.as_deref().unwrap_or(ADMIN_TOKEN_ENV);
        let token = self
            .token
            .clone()
            .or_else(|| std::env::var(env).ok())
            .ok_or_else(|| {
                refuse(
                    "admin.token",
                    format!("the admin listener needs a token (admin.token or ${env})"),
                )
            })?;
        if token.len() < 16 {
            return Err(refuse("admin.token", "must be at least 16 characters"));
        }
        Ok(Some(AdminListener {
            listen,
            token,
            login_limit,
        }))
    }
}

impl EncryptionConfig {
    /// `[encryption]`: the key, from `key`, else the variable `key_env` names; `None`
    /// when neither is set. The error names the field it came from.
    pub fn key(&self) -> Result<Option<EncryptionKey>, ConfigError> {
        let env = self.key_env.as_deref().unwrap_or(ENCRYPTION_KEY_ENV);
        match (&self.key, std::env::var(env).ok()) {
            (Some(k), _) => EncryptionKey::from_hex(k)
                .map(Some)
                .map_err(|e| refuse("encryption.key", e.to_string())),
            (None, Some(k)) => EncryptionKey::from_hex(&k)
                .map(Some)
                .map_err(|e| refuse("encryption.key_env", format!("${env}: {e}"))),
            (None, None) => Ok(None),
        }
    }
}

/// Names the field at a byte offset: `section.key (line N)`, from the nearest
/// `key =` on that line and the table header above it.
fn field_at(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line_no = before.lines().count().max(1);
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'));
    let section = text
        .lines()
        .take(line_no)
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("[[")
                .and_then(|r| r.strip_suffix("]]"))
                .or_else(|| l.strip_prefix('[').and_then(|r| r.strip_suffix(']')))
        })
        .last();
    match (section, key) {
        (Some(s), Some(k)) => format!("{s}.{k} (line {line_no})"),
        (None, Some(k)) => format!("{k} (line {line_no})"),
        (Some(s), None) => format!("{s} (line {line_no})"),
        (None, None) => format!("line {line_no}"),
    }
}

fn parse_addr(field: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        refuse(
            field,
            format!("{text:?} is not an address like 127.0.0.1:8080"),
        )
    })
}

/// A policy table (`[defaults]`, a route): a value of the wrong type or out of range
/// names its field (`defaults.lease`), not only the table.
fn policy_from(table: &toml::Table, prefix: &str) -> Result<Policy, ConfigError> {
    let policy: Policy = serde_path_to_error::deserialize(toml::Value::Table(table.clone()))
        .map_err(|e: serde_path_to_error::Error<toml::de::Error>| {
            let field = match e.path().to_string() {
                path if path == "." => prefix.to_owned(),
                path => format!("{prefix}.{path}"),
            };
            refuse(field, e.into_inner().message().to_owned())
        })?;
    policy
        .validate()
        .map_err(|e| refuse(format!("{prefix}.{}", e.field), e.message))
}

/// The default database path of the embedded store.
pub fn default_sqlite_path() -> PathBuf {
    PathBuf::from("idem.db")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(text: &str) -> Result<Settings, ConfigError> {
        Config::parse(text)?.validate()
    }

    #[test]
    fn defaults_need_only_an_upstream() {
        let s = validate("upstream = \"http://127.0.0.1:3000\"").unwrap();
        assert_eq!(s.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.store.to_string(), "sqlite:idem.db");
        assert_eq!(s.proxy.connect_timeout, Duration::from_secs(2));
        assert_eq!(s.proxy.no_store_header, "idem-no-store");
        assert!(s.admin.is_none());
        assert_eq!(s.routes.default_policy().ttl, Duration::from_secs(86400));
    }

    #[test]
    fn admin_logins_are_limited_by_default_and_the_limit_can_be_set() {
        let admin = "upstream = \"http://127.0.0.1:3000\"\n[admin]\nlisten = \"127.0.0.1:9090\"\ntoken = \"0123456789abcdef\"\n";
        let s = validate(admin).unwrap();
        let limit = s.admin.unwrap().login_limit;
        assert_eq!(limit.failures, 10);
        assert_eq!(limit.window, Duration::from_secs(300));
        let s = validate(&format!(
            "{admin}[admin.login_limit]\nfailures = 3\nwindow = \"1h\""
        ))
        .unwrap();
        let limit = s.admin.unwrap().login_limit;
        assert_eq!(limit.failures, 3);
        assert_eq!(limit.window, Duration::from_secs(3600));
    }

    #[test]
    fn routes_override_defaults_field_by_field() {
        let s = validate(
            r#"
            upstream = "http://127.0.0.1:3000"
            [defaults]
            ttl = "72h"
            header_names = ["X-Idempotency-Key"]
            [[routes]]
            method = "post"
            path = "/v1/charges/{id}/capture"
            key = "required"
            [[routes]]
            path = "/v1/slow"
            on_concurrent = "wait"
            wait_timeout = "5s"
            "#,
        )
        .unwrap();
        let (id, p) = s.routes.resolve(&Method::POST, "/v1/charges/ch_1/capture");
        assert_eq!(id, "POST /v1/charges/{id}/capture");
        assert_eq!(p.key, idem_core::policy::KeyRequirement::Required);
        assert_eq!(
            p.ttl,
            Duration::from_secs(72 * 3600),
            "inherited from defaults"
        );
        assert_eq!(p.header_names[0], "x-idempotency-key");
        let (_, p) = s.routes.resolve(&Method::PATCH, "/v1/slow");
        assert_eq!(p.on_concurrent, idem_core::policy::OnConcurrent::Wait);
    }

    #[test]
    fn every_refused_value_names_its_field() {
        let up = "upstream = \"http://127.0.0.1:3000\"\n";
        let cases: &[(&str, &str)] = &[
            ("", "upstream"),
            ("upstream = \"ftp://x\"", "upstream"),
            (
                &format!("{up}[upstream_tls]\nca = \"/nonexistent/ca.pem\""),
                "upstream_tls",
            ),
            (
                "upstream = \"https://x\"\n[upstream_tls]\nca = \"/nonexistent/ca.pem\"",
                "upstream_tls.ca",
            ),
            (
                "upstream = \"https://x\"\n[upstream_tls]\ncert = \"/nonexistent/c.pem\"",
                "upstream_tls.key",
            ),
            (
                &format!(
                    "{up}[listen_tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\""
                ),
                "listen_tls.cert",
            ),
            (
                &format!("{up}[admin.tls]\nkey = \"/nonexistent/k.pem\""),
                "admin.tls.cert",
            ),
            (
                &format!("{up}store = \"postgres://h/db?sslmode=verify\""),
                "store",
            ),
            (
                &format!("{up}store = \"postgres://h/db?pool_size=0\""),
                "store",
            ),
            (
                &format!(
                    "{up}store = \"postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem\""
                ),
                "store",
            ),
            (
                &format!("{up}store = \"rediss://h:6380?sslrootcert=/nonexistent/ca.pem\""),
                "store",
            ),
            ("upstream = \"not a url\"", "upstream"),
            (&format!("{up}listen = \"nowhere\""), "listen"),
            (&format!("{up}store = \"mongodb://x\""), "store"),
            (&format!("{up}store = \"sqlite:\""), "store"),
            (
                &format!("{up}[tenant]\nsecret = \"short\""),
                "tenant.secret",
            ),
            (
                &format!("{up}[tenant]\ncredential_headers = []"),
                "tenant.credential_headers",
            ),
            (
                &format!("{up}[tenant]\nmax_in_flight = 0"),
                "tenant.max_in_flight",
            ),
            (
                &format!("{up}[tenant]\nmax_records = -1"),
                "tenant.max_records (line 3)",
            ),
            (
                &format!("{up}[defaults]\nbody_read_timeout = \"0s\""),
                "defaults.body_read_timeout",
            ),
            (
                &format!("{up}[proxy]\nconnect_timeout = \"0s\""),
                "proxy.connect_timeout",
            ),
            (
                &format!(
                    "{up}[admin]\nlisten = \"127.0.0.1:9090\"\ntoken_env = \"IDEM_TEST_UNSET_TOKEN\""
                ),
                "admin.token",
            ),
            (
                &format!("{up}[admin]\nlisten = \"127.0.0.1:9090\"\ntoken = \"short\""),
                "admin.token",
            ),
            (
                &format!("{up}[admin]\nlisten = \"x\"\ntoken = \"0123456789abcdef\""),
                "admin.listen",
            ),
            (
                &format!("{up}[admin.login_limit]\nfailures = 0"),
                "admin.login_limit.failures",
            ),
            (
                &format!("{up}[admin.login_limit]\nwindow = \"500ms\""),
                "admin.login_limit.window",
            ),
            (
                &format!("{up}[defaults]\nmismatch_status = 200"),
                "defaults.mismatch_status",
            ),
            (
                &format!("{up}[defaults]\nkey_rules = {{ min_len = 10, max_len = 5 }}"),
                "defaults.key_rules.max_len",
            ),
            (
                &format!("{up}[[routes]]\nmethod = \"POST\""),
                "routes[0].path",
            ),
            (&format!("{up}[[routes]]\npath = \"v1\""), "routes[0].path"),
            (
                &format!("{up}[[routes]]\npath = \"/v1\"\nmethod = \"P OST\""),
                "routes[0].method",
            ),
            (
                &format!("{up}[[routes]]\npath = \"/v1\"\nlease = \"1ms\""),
                "routes[0].lease",
            ),
        ];
        for (text, field) in cases {
            let err = validate(text).unwrap_err();
            assert_eq!(&err.field, field, "{text}: {err}");
        }
    }

    #[cfg(not(feature = "postgres"))]
    #[test]
    fn a_store_left_out_of_the_build_is_refused_by_name() {
        let err = validate("upstream = \"http://127.0.0.1:3000\"\nstore = \"postgres://h/db\"")
            .unwrap_err();
        assert_eq!(err.field, "store");
        assert!(err.message.contains("cargo feature `postgres`"), "{err}");
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused_with_their_name() {
        let err =
            validate("upstream = \"http://127.0.0.1:3000\"\nlisten_addr = \"x\"").unwrap_err();
        assert!(err.message.contains("listen_addr"), "{err}");
        let err = validate(
            "upstream = \"http://127.0.0.1:3000\"\n[[routes]]\npath = \"/x\"\ntll = \"1h\"",
        )
        .unwrap_err();
        assert_eq!(err.field, "routes[0].tll", "{err}");
        assert!(err.message.contains("tll"), "{err}");
        let err = validate("upstream = \"http://127.0.0.1:3000\"\n[defaults]\nttl = \"forever\"")
            .unwrap_err();
        assert_eq!(err.field, "defaults.ttl", "{err}");
        let err =
            validate("upstream = \"http://127.0.0.1:3000\"\n[defaults]\nmismatch_status = 99")
                .unwrap_err();
        assert_eq!(err.field, "defaults.mismatch_status", "{err}");
        let err =
            validate("upstream = \"http://127.0.0.1:3000\"\n[[routes]]\npath = \"/x\"\nlease = 5")
                .unwrap_err();
        assert_eq!(err.field, "routes[0].lease", "{err}");
        let err =
            validate("upstream = \"http://127.0.0.1:3000\"\n[proxy]\nresponse_timeout = \"soon\"")
                .unwrap_err();
        assert_eq!(err.field, "proxy.response_timeout (line 3)", "{err}");
    }
}
