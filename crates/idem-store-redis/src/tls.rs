//! TLS to Redis: `rediss://` URLs, standalone and Cluster (every node, the ones found
//! through `CLUSTER SLOTS` included), over rustls. The server's certificate must chain
//! to a trusted root and name the host connected to. The roots are the platform's
//! trust store (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured), or, when the URL says
//! `sslrootcert=PATH`, that CA bundle instead (as libpq and `redis-cli --cacert` do).
//! `sslcert=PATH&sslkey=PATH` sends a client certificate, for servers started with
//! `--tls-auth-clients yes`. The parameter names are libpq's, as for PostgreSQL.

use std::path::{Path, PathBuf};

use idem_core::StoreError;
use idem_core::store::StoreErrorKind;
use redis::{ClientTlsConfig, TlsCertificates};

/// The TLS files of a `rediss://` URL, read and checked.
#[derive(Clone, Default)]
pub struct RedisTls {
    certificates: Option<TlsCertificates>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("configured", &self.certificates.is_some())
            .finish()
    }
}

fn invalid(message: String) -> StoreError {
    StoreError::msg(StoreErrorKind::Backend, message)
}

fn read_pem(param: &str, path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path)
        .map_err(|e| invalid(format!("{param}: cannot read {}: {e}", path.display())))
}

impl RedisTls {
    /// Takes `sslrootcert`, `sslcert` and `sslkey` out of a URL's query, reads the
    /// files and checks them (a certificate file holds certificates, the key is the
    /// certificate's). Returns the URL without them.
    pub fn split_url(url: &str) -> Result<(String, RedisTls), StoreError> {
        let Some((base, query)) = url.rsplit_once('?') else {
            return Ok((url.to_owned(), RedisTls::default()));
        };
        let (mut root, mut cert, mut key) = (None, None, None);
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=').unwrap_or((pair, "")) {
                ("sslrootcert", v) => root = Some(PathBuf::from(v)),
                ("sslcert", v) => cert = Some(PathBuf::from(v)),
                ("sslkey", v) => key = Some(PathBuf::from(v)),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        if root.is_none() && cert.is_none() && key.is_none() {
            return Ok((rest, RedisTls::default()));
        }
        if !url.starts_with("rediss://") {
            return Err(invalid(
                "sslrootcert, sslcert and sslkey need a rediss:// URL".into(),
            ));
        }
        let root_cert = match root {
            Some(path) => {
                idem_tls::read_certs(&path).map_err(|e| invalid(format!("sslrootcert: {e}")))?;
                Some(read_pem("sslrootcert", &path)?)
            }
            None => None,
        };
        let client_tls = match (cert, key) {
            (Some(cert), Some(key)) => {
                idem_tls::Identity::load(&cert, &key)
                    .map_err(|e| invalid(format!("sslcert/sslkey: {e}")))?;
                Some(ClientTlsConfig {
                    client_cert: read_pem("sslcert", &cert)?,
                    client_key: read_pem("sslkey", &key)?,
                })
            }
            (None, None) => None,
            _ => return Err(invalid("sslcert and sslkey go together".into())),
        };
        let certificates = TlsCertificates {
            client_tls,
            root_cert,
        };
        Ok((
            rest,
            RedisTls {
                certificates: Some(certificates),
            },
        ))
    }

    /// A cluster client builder; every node, those found through `CLUSTER SLOTS`
    /// included, gets these certificates.
    pub(crate) fn cluster_builder(
        &self,
        nodes: Vec<String>,
    ) -> redis::cluster::ClusterClientBuilder {
        // The redis crate builds its rustls configurations on the process default.
        idem_tls::install_default_provider();
        let builder = redis::cluster::ClusterClient::builder(nodes);
        match &self.certificates {
            Some(c) => builder.certs(c.clone()),
            None => builder,
        }
    }

    /// A client for one node.
    pub(crate) fn client(&self, url: &str) -> Result<redis::Client, redis::RedisError> {
        // The redis crate builds its rustls configurations on the process default.
        idem_tls::install_default_provider();
        match &self.certificates {
            Some(c) => redis::Client::build_with_tls(url, c.clone()),
            None => redis::Client::open(url),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_and_checked() {
        let (url, tls) = RedisTls::split_url("rediss://h:6380/0?protocol=resp3").unwrap();
        assert_eq!(url, "rediss://h:6380/0?protocol=resp3");
        assert!(tls.certificates.is_none());
        let err = RedisTls::split_url("redis://h:6379?sslrootcert=/ca.pem").unwrap_err();
        assert!(err.to_string().contains("rediss://"), "{err}");
        let err =
            RedisTls::split_url("rediss://h:6380?sslrootcert=/nonexistent/ca.pem").unwrap_err();
        assert!(err.to_string().contains("sslrootcert"), "{err}");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let err = RedisTls::split_url("rediss://h:6380?sslcert=/c.pem").unwrap_err();
        assert!(err.to_string().contains("go together"), "{err}");
    }
}
