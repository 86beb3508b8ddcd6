//! TLS for idem's connections, on rustls with the `ring` provider (no OpenSSL, no
//! cmake): reading PEM files with errors that name the file, the trust roots (the
//! platform store, which honours `SSL_CERT_FILE` / `SSL_CERT_DIR`, and configured CA
//! bundles), and client configurations for the three ways a peer can be checked:
//! fully, chain only (libpq's `verify-ca`), or not at all.
//!
//! ```no_run
//! use idem_tls::{ClientTls, Verify};
//! // What an https client of idem's uses: the platform's trust store, full checks.
//! let tls = ClientTls {
//!     platform_roots: true,
//!     verify: Verify::Full,
//!     alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
//!     ..ClientTls::default()
//! };
//! let config = tls.config().expect("the platform's trust store has roots");
//! assert_eq!(config.alpn_protocols.len(), 2);
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

pub use rustls;

/// A TLS file or setting that cannot be used. Says which file and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file that could not be read.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no usable PEM item of the kind expected.
    #[error("{}: {what}", path.display())]
    Pem {
        /// The file whose contents are refused.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The certificate and the key do not belong together, or rustls refused them.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider every idem TLS configuration uses: `ring`.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes `ring` the process-wide default provider, for libraries that build their
/// rustls configurations with `ClientConfig::builder()` (the `redis` crate). Idempotent.
pub fn install_default_provider() {
    // Err means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads the certificates of a PEM file; refuses a file that holds none.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            what: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            what: "holds no PEM certificate".into(),
        });
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        what: format!("holds no usable PEM private key: {e}"),
    })
}

/// A certificate chain and its key, checked to belong together.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The chain, leaf first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: Arc<PrivateKeyDer<'static>>,
}

impl Identity {
    /// Reads both files and checks that the key is the certificate's.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let identity = Identity {
            certs: read_certs(cert)?,
            key: Arc::new(read_key(key)?),
        };
        identity.certified_key()?;
        Ok(identity)
    }

    /// The signing form rustls serves; fails when the key is not the certificate's.
    pub fn certified_key(&self) -> Result<CertifiedKey, TlsError> {
        let ck = CertifiedKey::from_der(self.certs.clone(), self.key.clone_key(), &provider())?;
        ck.keys_match()?;
        Ok(ck)
    }
}

/// The platform's trust store (rustls-native-certs: `SSL_CERT_FILE` and `SSL_CERT_DIR`
/// when set, else the system's bundle). Unreadable entries are logged and skipped.
pub fn platform_roots() -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "platform trust store: an entry could not be loaded");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        tracing::debug!(
            added,
            ignored,
            "platform trust store: unusable certificates skipped"
        );
    }
    roots
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Chain to a trusted root and the name of the host connected to (libpq's
    /// `verify-full`, and what browsers do).
    #[default]
    Full,
    /// Chain to a trusted root, any name (libpq's `verify-ca`).
    ChainOnly,
    /// Nothing: encrypted, not authenticated (libpq's `require` without a root
    /// certificate, or an explicit "skip verification" setting).
    Nothing,
}

/// What a client configuration is made of.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA bundle files (PEM) to trust.
    pub ca_files: Vec<PathBuf>,
    /// Whether the platform's trust store is trusted too.
    pub platform_roots: bool,
    /// How the server is checked.
    pub verify: Verify,
    /// Client certificate chain and key, for servers that ask for one (mTLS).
    pub identity: Option<Identity>,
    /// ALPN protocols offered, most preferred first.
    pub alpn: Vec<Vec<u8>>,
}

impl ClientTls {
    /// The trust roots: the CA files, plus the platform store when asked.
    pub fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = if self.platform_roots {
            platform_roots()
        } else {
            RootCertStore::empty()
        };
        for path in &self.ca_files {
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    path: path.clone(),
                    what: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        Ok(roots)
    }

    /// Builds the rustls configuration.
    pub fn config(&self) -> Result<ClientConfig, TlsError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let chain = match self.verify {
            Verify::Nothing => None,
            Verify::Full | Verify::ChainOnly => Some(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(self.roots()?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?,
            ),
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (self.verify, chain) {
            (Verify::Full, Some(webpki)) => webpki,
            (_, chain) => Arc::new(Relaxed { chain, provider }),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.identity {
            Some(id) => builder.with_client_auth_cert(id.certs.clone(), id.key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        Ok(config)
    }
}

/// The two relaxed checks: the chain only, any name (libpq's `verify-ca`), or nothing
/// at all. Either way the handshake signatures are verified, so the peer holds the key
/// of the certificate it showed.
#[derive(Debug)]
struct Relaxed {
    /// `Some`: the chain must lead to a trusted root; `None`: nothing is checked.
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        // webpki checks the chain (validity dates included) before the name, so a name
        // error means the chain itself was good.
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Finds a rustls error among an error's sources (a TLS handshake failure buried in a
/// connection error), to say that a certificate was refused. `io::Error::source` skips
/// the error it wraps, so wrapped errors are looked into explicitly.
pub fn find_rustls_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    if let Some(r) = e.downcast_ref::<rustls::Error>() {
        return Some(r);
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
        && let Some(r) = find_rustls_error(inner)
    {
        return Some(r);
    }
    find_rustls_error(e.source()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn bad_files_are_refused_with_their_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = read_certs(&missing).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let empty = write(dir.path(), "empty.pem", "");
        assert!(
            read_certs(&empty)
                .unwrap_err()
                .to_string()
                .contains("no PEM certificate")
        );
        assert!(read_key(&empty).is_err());
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".into()]).unwrap();
        let cert = write(dir.path(), "a.crt", &a.cert.pem());
        let key_a = write(dir.path(), "a.key", &a.signing_key.serialize_pem());
        let key_b = write(dir.path(), "b.key", &b.signing_key.serialize_pem());
        Identity::load(&cert, &key_a).unwrap();
        let err = Identity::load(&cert, &key_b).unwrap_err();
        assert!(matches!(err, TlsError::Rustls(_)), "{err}");
        let err = read_key(&cert).unwrap_err();
        assert!(err.to_string().contains("a.crt"), "{err}");
    }

    #[test]
    fn a_rustls_error_is_found_however_deep() {
        let tls = rustls::Error::InvalidCertificate(rustls::CertificateError::Expired);
        let io = std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, tls));
        let found = find_rustls_error(&io).expect("found");
        assert!(matches!(found, rustls::Error::InvalidCertificate(_)));
        assert!(find_rustls_error(&std::io::Error::other("plain")).is_none());
    }

    #[test]
    fn every_mode_builds() {
        for verify in [Verify::Full, Verify::ChainOnly, Verify::Nothing] {
            let c = ClientTls {
                verify,
                platform_roots: true,
                alpn: vec![b"h2".to_vec()],
                ..ClientTls::default()
            };
            assert_eq!(c.config().unwrap().alpn_protocols, vec![b"h2".to_vec()]);
        }
    }
}
