//! Serving an app on loopback and sending the tests' usual request.

use std::net::SocketAddr;

use axum::Router;

/// Serves `app` on 127.0.0.1 at a free port, in the background; returns the address.
pub async fn serve_app(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A TLS server's acceptor for a test server with `pair`'s certificate (HTTP/1.1 or
/// h2 by ALPN), requiring a client certificate issued by `client_ca` when one is given.
pub fn tls_acceptor(
    pair: &idem_conformance::pki::PemPair,
    client_ca: Option<&std::path::Path>,
) -> tokio_rustls::TlsAcceptor {
    use idem_tls::rustls::ServerConfig;
    use idem_tls::rustls::server::WebPkiClientVerifier;
    let id = idem_tls::Identity::load(&pair.cert, &pair.key).unwrap();
    let builder = ServerConfig::builder_with_provider(idem_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let roots = idem_tls::ClientTls {
                ca_files: vec![ca.to_owned()],
                ..idem_tls::ClientTls::default()
            }
            .roots()
            .unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                idem_tls::provider(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(id.certs, id.key.clone_key())
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

/// Serves `app` over TLS (HTTP/1.1 or h2, as the client's ALPN picks) on a free
/// loopback port; returns its address. A failed handshake closes that connection only.
pub async fn serve_tls_app(app: Router, acceptor: tokio_rustls::TlsAcceptor) -> SocketAddr {
    use tower::ServiceExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| app.clone().oneshot(req));
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    addr
}

/// A client that opens a new connection per request, so that a test sees each
/// request's own connection (no reuse across a restart or a kill).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// A JSON POST of `body` to `url` as tenant `sk_alice`, with `key` as its
/// `Idempotency-Key` when given.
pub fn post(
    client: &reqwest::Client,
    url: String,
    key: Option<&str>,
    body: &str,
) -> reqwest::RequestBuilder {
    let mut req = client
        .post(url)
        .header("authorization", "Bearer sk_alice")
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    req
}

/// Sends a request and expects an answer: a transport error fails the test there.
pub trait Sent {
    /// The response, or a panic naming the transport error.
    fn sent(self) -> impl Future<Output = reqwest::Response> + Send;
}

impl Sent for reqwest::RequestBuilder {
    async fn sent(self) -> reqwest::Response {
        self.send().await.unwrap()
    }
}
