//! TLS to PostgreSQL as libpq spells and does it: `sslmode`, `sslrootcert`, `sslcert`
//! and `sslkey` in the URL's query, over rustls.
//!
//! | `sslmode` | encrypted | server checked |
//! | --- | --- | --- |
//! | `disable` | no | no |
//! | `prefer` (default) | if the server offers it | as `require` |
//! | `require` | yes | no; the chain only (as `verify-ca`) when a root certificate is given |
//! | `verify-ca` | yes | chain to `sslrootcert` |
//! | `verify-full` | yes | chain to `sslrootcert` and the host name |
//!
//! `sslrootcert` defaults to `~/.postgresql/root.crt` when that file exists, and
//! `sslrootcert=system` trusts the platform's store (`SSL_CERT_FILE`/`SSL_CERT_DIR`
//! honoured), as libpq 16 does. A client certificate is sent when `sslcert` and `sslkey`
//! are both given.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use idem_core::StoreError;
use idem_core::store::StoreErrorKind;
use idem_tls::rustls::pki_types::ServerName;
use idem_tls::{ClientTls, Identity, Verify};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, else plain.
    #[default]
    Prefer,
    /// TLS, server not checked (unless a root certificate is given).
    Require,
    /// TLS, the chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

/// The TLS settings of a PostgreSQL URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PgTls {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`: a CA file, or `system`.
    pub rootcert: Option<String>,
    /// `sslcert`: the client certificate.
    pub cert: Option<PathBuf>,
    /// `sslkey`: the client certificate's key.
    pub key: Option<PathBuf>,
}

fn invalid(message: String) -> StoreError {
    StoreError::msg(StoreErrorKind::Backend, message)
}

/// Takes the TLS parameters out of a `postgres://` URL: the URL `tokio-postgres` reads
/// (with `sslmode` as it knows it), and the settings. Other strings pass unchanged.
pub fn split_url(url: &str) -> Result<(String, PgTls), StoreError> {
    let mut tls = PgTls::default();
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let Some((base, query)) = url.split_once('?').filter(|_| is_url) else {
        return Ok((url.to_owned(), tls));
    };
    let mut kept = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "sslmode" => {
                tls.mode = SslMode::parse(&v).ok_or_else(|| {
                    invalid(format!(
                        "sslmode={v:?}: use disable, prefer, require, verify-ca or verify-full"
                    ))
                })?;
            }
            "sslrootcert" => tls.rootcert = Some(v.into_owned()),
            "sslcert" => tls.cert = Some(PathBuf::from(&*v)),
            "sslkey" => tls.key = Some(PathBuf::from(&*v)),
            _ => kept.push((k.into_owned(), v.into_owned())),
        }
    }
    let pg_mode = match tls.mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        _ => "require",
    };
    kept.push(("sslmode".into(), pg_mode.into()));
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .finish();
    Ok((format!("{base}?{query}"), tls))
}

impl PgTls {
    /// The rustls settings these parameters mean; reads and checks every file, so that
    /// a missing or wrong file is refused now, not at the first connection.
    pub fn client_tls(&self) -> Result<ClientTls, StoreError> {
        let mut tls = ClientTls {
            alpn: vec![b"postgresql".to_vec()],
            ..ClientTls::default()
        };
        let default_root = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
            .filter(|p| p.is_file());
        let root = match (&self.rootcert, default_root) {
            (Some(r), _) => Some(r.clone()),
            (None, Some(p)) => Some(p.display().to_string()),
            (None, None) => None,
        };
        match root.as_deref() {
            Some("system") => tls.platform_roots = true,
            Some(file) => tls.ca_files.push(PathBuf::from(file)),
            None => {}
        }
        tls.verify = match (self.mode, &root) {
            (SslMode::VerifyFull, Some(_)) => Verify::Full,
            (SslMode::VerifyCa, Some(_)) => Verify::ChainOnly,
            (SslMode::VerifyFull | SslMode::VerifyCa, None) => {
                return Err(invalid(
                    "sslmode=verify-ca and verify-full need sslrootcert (a CA file, or \
                     `system` for the platform's trust store)"
                        .into(),
                ));
            }
            // libpq: with a root certificate, `require` and `prefer` check the chain.
            (_, Some(_)) => Verify::ChainOnly,
            (_, None) => Verify::Nothing,
        };
        tls.identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(
                Identity::load(cert, key).map_err(|e| invalid(format!("sslcert/sslkey: {e}")))?,
            ),
            (None, None) => None,
            _ => return Err(invalid("sslcert and sslkey go together".into())),
        };
        Ok(tls)
    }

    /// The connector for `tokio-postgres`.
    pub fn connector(&self) -> Result<RustlsConnect, StoreError> {
        let config = self
            .client_tls()?
            .config()
            .map_err(|e| invalid(format!("sslrootcert: {e}")))?;
        Ok(RustlsConnect(Arc::new(config)))
    }
}

/// A `tokio-postgres` TLS connector over rustls.
#[derive(Clone, Debug)]
pub struct RustlsConnect(Arc<idem_tls::rustls::ClientConfig>);

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnectOne;
    type Error = io::Error;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnectOne, io::Error> {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnectOne {
            connector: tokio_rustls::TlsConnector::from(self.0.clone()),
            name,
        })
    }
}

/// One connection's handshake.
pub struct RustlsConnectOne {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnectOne
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(RustlsStream(Box::new(tls)))
        })
    }
}

/// A TLS connection to the server.
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM channel binding is not offered; SCRAM itself still works.
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters_are_taken_out_of_the_url() {
        let (url, tls) = split_url(
            "postgres://u@h:5432/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u@h:5432/db?application_name=x&sslmode=require"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.rootcert.as_deref(), Some("/etc/ca.pem"));
        let (url, tls) = split_url("postgres://u@h/db").unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(tls.mode, SslMode::Prefer, "libpq's default");
        assert!(split_url("postgres://h/db?sslmode=verify").is_err());
    }

    #[test]
    fn verification_follows_libpq() {
        let tls = |q: &str| split_url(&format!("postgres://h/db?{q}")).unwrap().1;
        assert_eq!(
            tls("sslmode=require").client_tls().unwrap().verify,
            Verify::Nothing
        );
        let v = tls("sslmode=verify-full&sslrootcert=system")
            .client_tls()
            .unwrap();
        assert!(v.platform_roots);
        assert_eq!(v.verify, Verify::Full);
        let v = tls("sslmode=require&sslrootcert=/ca.pem")
            .client_tls()
            .unwrap();
        assert_eq!(v.verify, Verify::ChainOnly);
        assert!(tls("sslmode=verify-ca").client_tls().is_err());
        assert!(tls("sslmode=require&sslcert=/c.pem").client_tls().is_err());
        let err = tls("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .connector()
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
