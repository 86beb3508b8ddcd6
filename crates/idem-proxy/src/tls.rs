//! TLS of the sidecar itself: its clients (`[upstream_tls]`, and `[telemetry]` for an
//! `https://` collector) and the proxy and admin listeners (`[listen_tls]`,
//! `[admin.tls]`), whose certificates are reloaded on SIGHUP and when their files
//! change, without dropping a connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use idem_tls::rustls::server::{ClientHello, ResolvesServerCert};
use idem_tls::rustls::sign::CertifiedKey;
use idem_tls::rustls::{self, ServerConfig};
use idem_tls::{ClientTls, Identity, Verify};
use serde::Deserialize;

use crate::config::{ConfigError, refuse};

/// `[upstream_tls]`: how an `https://` upstream is checked. The defaults suit a public
/// certificate: the platform's trust store, the host name verified.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// A CA bundle (PEM) trusted in addition to the platform's store, e.g. a private CA.
    pub ca: Option<PathBuf>,
    /// Whether the platform's trust store is trusted (`SSL_CERT_FILE` and
    /// `SSL_CERT_DIR` honoured, as OpenSSL-based tools do). Default true.
    pub platform_roots: bool,
    /// Client certificate chain (PEM) shown to an upstream that asks for one (mTLS).
    /// Goes with `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// Skips every check of the upstream's certificate: the connection is encrypted but
    /// anyone on the path can read and change it. Logged as a warning at start. Default
    /// false.
    pub insecure_skip_verify: bool,
}

impl Default for UpstreamTlsConfig {
    fn default() -> Self {
        UpstreamTlsConfig {
            ca: None,
            platform_roots: true,
            cert: None,
            key: None,
            insecure_skip_verify: false,
        }
    }
}

impl UpstreamTlsConfig {
    fn is_default(&self) -> bool {
        self.ca.is_none()
            && self.platform_roots
            && self.cert.is_none()
            && self.key.is_none()
            && !self.insecure_skip_verify
    }

    /// Checks the files and builds the client settings; `https`: whether the upstream
    /// is an `https://` URL (settings for an `http://` one are refused, as a mistake).
    pub fn validate(&self, https: bool) -> Result<Option<ClientTls>, ConfigError> {
        if !https {
            return if self.is_default() {
                Ok(None)
            } else {
                Err(refuse("upstream_tls", "is set but the upstream is http://"))
            };
        }
        let verify = if self.insecure_skip_verify {
            Verify::Nothing
        } else {
            Verify::Full
        };
        let files = ClientTlsFiles {
            ca: self.ca.as_deref(),
            platform_roots: self.platform_roots,
            cert: self.cert.as_deref(),
            key: self.key.as_deref(),
        };
        files.check("upstream_tls", verify).map(Some)
    }
}

/// The TLS settings of a client of idem's (`[upstream_tls]`, `[telemetry]`), named
/// alike wherever they are given.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientTlsFiles<'a> {
    /// `ca`: a CA bundle trusted in addition to the platform's store.
    pub(crate) ca: Option<&'a Path>,
    /// `platform_roots`: whether the platform's store is trusted.
    pub(crate) platform_roots: bool,
    /// `cert`: the client certificate chain (mTLS).
    pub(crate) cert: Option<&'a Path>,
    /// `key`: its private key.
    pub(crate) key: Option<&'a Path>,
}

impl ClientTlsFiles<'_> {
    /// Reads every file now, so that start-up stops on them; errors name
    /// `section.field`. Refuses to trust nothing when the peer is to be verified.
    pub(crate) fn check(&self, section: &str, verify: Verify) -> Result<ClientTls, ConfigError> {
        let tls = ClientTls {
            ca_files: self.ca.iter().map(|p| p.to_path_buf()).collect(),
            platform_roots: self.platform_roots,
            verify,
            identity: identity(section, self.cert, self.key)?,
            alpn: Vec::new(),
        };
        let ca = format!("{section}.ca");
        let roots = tls.roots().map_err(|e| refuse(&ca, e.to_string()))?;
        if tls.verify == Verify::Full && roots.is_empty() {
            return Err(refuse(
                ca,
                "nothing is trusted: give a CA bundle or leave platform_roots on",
            ));
        }
        Ok(tls)
    }
}

/// Reads and checks a certificate and key given together under `section`.
fn identity(
    section: &str,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<Identity>, ConfigError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(refuse(format!("{section}.key"), "is required with cert")),
        (None, Some(_)) => Err(refuse(format!("{section}.cert"), "is required with key")),
        (Some(cert), Some(key)) => {
            idem_tls::read_certs(cert)
                .map_err(|e| refuse(format!("{section}.cert"), e.to_string()))?;
            idem_tls::read_key(key).map_err(|e| refuse(format!("{section}.key"), e.to_string()))?;
            Identity::load(cert, key).map(Some).map_err(|e| {
                refuse(
                    format!("{section}.key"),
                    format!("is not the key of {}: {e}", cert.display()),
                )
            })
        }
    }
}

/// `[listen_tls]` and `[admin.tls]`: serve HTTPS with this certificate (off unless
/// both files are given).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// Certificate chain (PEM), leaf first. Reloaded on SIGHUP and when the file changes.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

/// A checked listener certificate.
#[derive(Debug, Clone)]
pub struct ListenerTls {
    /// Where it is configured (`listen_tls`, `admin.tls`), for error messages.
    pub section: &'static str,
    /// Certificate file.
    pub cert: PathBuf,
    /// Key file.
    pub key: PathBuf,
}

impl ListenerTlsConfig {
    /// Checks the files now (missing, unreadable, not matching), so that start-up stops
    /// on them rather than the first handshake.
    pub fn validate(&self, section: &'static str) -> Result<Option<ListenerTls>, ConfigError> {
        Ok(
            identity(section, self.cert.as_deref(), self.key.as_deref())?.map(|_| ListenerTls {
                section,
                cert: self.cert.clone().unwrap_or_default(),
                key: self.key.clone().unwrap_or_default(),
            }),
        )
    }
}

/// A listener's certificate that cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The certificate or key file cannot be read, or they do not go together.
    #[error("{section}: {source}")]
    Files {
        /// The listener's section (`listen_tls`, `admin.tls`).
        section: &'static str,
        /// What is wrong with the files.
        #[source]
        source: idem_tls::TlsError,
    },
    /// rustls refused the server configuration.
    #[error(transparent)]
    Config(#[from] rustls::Error),
}

/// The certificate a listener serves, swapped in place on reload: handshakes in
/// progress and connections already open keep what they had.
#[derive(Debug)]
pub struct CertResolver {
    files: ListenerTls,
    current: RwLock<(Arc<CertifiedKey>, Option<FileStamp>)>,
}

/// What a file looked like when it was loaded, to notice a change cheaply.
type FileStamp = (SystemTime, SystemTime, u64, u64);

fn stamp(files: &ListenerTls) -> Option<FileStamp> {
    let c = std::fs::metadata(&files.cert).ok()?;
    let k = std::fs::metadata(&files.key).ok()?;
    Some((c.modified().ok()?, k.modified().ok()?, c.len(), k.len()))
}

impl CertResolver {
    /// Loads the files.
    pub fn load(files: ListenerTls) -> Result<Self, CertError> {
        let (key, stamp) = Self::read(&files)?;
        Ok(CertResolver {
            files,
            current: RwLock::new((key, stamp)),
        })
    }

    fn read(files: &ListenerTls) -> Result<(Arc<CertifiedKey>, Option<FileStamp>), CertError> {
        let before = stamp(files);
        let key = Identity::load(&files.cert, &files.key)
            .and_then(|id| id.certified_key())
            .map_err(|source| CertError::Files {
                section: files.section,
                source,
            })?;
        Ok((Arc::new(key), before))
    }

    /// Reads the files again. On failure the current certificate stays, and the error
    /// names the section.
    pub fn reload(&self) -> Result<(), CertError> {
        let fresh = Self::read(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        tracing::info!(section = self.files.section, cert = %self.files.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// Whether the files changed since they were loaded.
    pub fn changed(&self) -> bool {
        let now = stamp(&self.files);
        now.is_some() && now != self.current.read().unwrap_or_else(|p| p.into_inner()).1
    }

    /// The server configuration: this certificate, ALPN `h2` then `http/1.1`.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, CertError> {
        let mut config = ServerConfig::builder_with_provider(idem_tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .clone(),
        )
    }
}

/// Reloads the listeners' certificates on SIGHUP, and when their files change (checked
/// every `poll`). Runs until aborted.
pub async fn reload_loop(resolvers: Vec<Arc<CertResolver>>, poll: Duration) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: certificates reload on file change only");
            None
        }
    };
    loop {
        let forced = tokio::select! {
            Some(()) = async { hup.as_mut()?.recv().await } => true,
            () = tokio::time::sleep(poll) => false,
        };
        for r in &resolvers {
            if (forced || r.changed())
                && let Err(e) = r.reload()
            {
                tracing::error!(error = %e, "TLS certificate not reloaded; the previous one is still served");
            }
        }
    }
}

/// Whom idem connects to over TLS, as a hint about a failed handshake names it: the
/// peer, the setting holding its CA, and the setting holding its host.
pub struct Peer {
    /// What the peer is called, e.g. `upstream`.
    pub name: &'static str,
    /// The setting that adds a CA to trust, e.g. `upstream_tls.ca`.
    pub ca: &'static str,
    /// The setting whose host the certificate must name, e.g. `upstream`.
    pub host: &'static str,
}

/// The upstream, as [`certificate_hint`] names it.
pub const UPSTREAM: Peer = Peer {
    name: "upstream",
    ca: "upstream_tls.ca",
    host: "upstream",
};

/// Says whether a connection error to `peer` is a refused certificate (or another
/// TLS failure), and names the setting to look at.
pub fn certificate_hint(e: &(dyn std::error::Error + 'static), peer: &Peer) -> Option<String> {
    let Peer { name, ca, host } = peer;
    match idem_tls::find_rustls_error(e)? {
        rustls::Error::InvalidCertificate(why) => Some(format!(
            "the {name}'s certificate was refused ({why:?}); check {ca}, and that the \
             certificate names the host in {host}"
        )),
        other => Some(format!("TLS handshake with the {name} failed: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_conformance::pki::{TestCa, Validity};

    #[test]
    fn listener_files_are_checked_at_start() {
        let ca = TestCa::new("listen");
        let a = ca.server("a", &["localhost"], Validity::Current);
        let b = ca.server("b", &["localhost"], Validity::Current);
        let cfg = |cert: &Path, key: &Path| ListenerTlsConfig {
            cert: Some(cert.to_owned()),
            key: Some(key.to_owned()),
        };
        assert!(
            cfg(&a.cert, &a.key)
                .validate("listen_tls")
                .unwrap()
                .is_some()
        );
        assert!(
            ListenerTlsConfig::default()
                .validate("listen_tls")
                .unwrap()
                .is_none()
        );
        let missing = ca.dir().join("missing.pem");
        let cases = [
            (cfg(&missing, &a.key), "listen_tls.cert"),
            (cfg(&a.cert, &missing), "listen_tls.key"),
            (cfg(&a.cert, &a.cert), "listen_tls.key"),
            (cfg(&a.cert, &b.key), "listen_tls.key"),
            (cfg(&a.key, &a.key), "listen_tls.cert"),
            (
                ListenerTlsConfig {
                    cert: Some(a.cert.clone()),
                    key: None,
                },
                "listen_tls.key",
            ),
        ];
        for (c, field) in cases {
            assert_eq!(c.validate("listen_tls").unwrap_err().field, field, "{c:?}");
        }
    }

    #[test]
    fn upstream_settings_are_checked_at_start() {
        let ca = TestCa::new("up");
        let ok = UpstreamTlsConfig {
            ca: Some(ca.ca_file()),
            ..UpstreamTlsConfig::default()
        };
        assert!(ok.validate(true).unwrap().is_some());
        assert_eq!(ok.validate(false).unwrap_err().field, "upstream_tls");
        assert!(
            UpstreamTlsConfig::default()
                .validate(false)
                .unwrap()
                .is_none()
        );
        let missing = UpstreamTlsConfig {
            ca: Some(ca.dir().join("missing.pem")),
            ..UpstreamTlsConfig::default()
        };
        assert_eq!(missing.validate(true).unwrap_err().field, "upstream_tls.ca");
        let nothing = UpstreamTlsConfig {
            platform_roots: false,
            ..UpstreamTlsConfig::default()
        };
        assert_eq!(nothing.validate(true).unwrap_err().field, "upstream_tls.ca");
    }

    #[test]
    fn a_certificate_is_swapped_on_reload_and_a_bad_one_is_not() {
        let ca = TestCa::new("reload");
        let a = ca.server("srv", &["localhost"], Validity::Current);
        let files = ListenerTlsConfig {
            cert: Some(a.cert.clone()),
            key: Some(a.key.clone()),
        }
        .validate("listen_tls")
        .unwrap()
        .unwrap();
        let r = CertResolver::load(files).unwrap();
        assert!(!r.changed());
        let first = r.current.read().unwrap().0.cert[0].clone();
        // A new pair of another size: noticed without relying on mtime granularity.
        let next = ca.server("next", &["localhost", "other.localhost"], Validity::Current);
        std::fs::rename(&next.key, &a.key).unwrap();
        std::fs::rename(&next.cert, &a.cert).unwrap();
        assert!(r.changed(), "the poll notices new files");
        r.reload().unwrap();
        assert!(!r.changed());
        let second = r.current.read().unwrap().0.cert[0].clone();
        assert_ne!(first, second);
        std::fs::write(&a.key, "garbage").unwrap();
        let err = r.reload().unwrap_err().to_string();
        assert!(err.starts_with("listen_tls"), "{err}");
        assert_eq!(
            r.current.read().unwrap().0.cert[0],
            second,
            "the old one stays"
        );
    }
}
