//! The floor of idem's benchmark: a reverse proxy made of the crates idem is made of
//! (a hyper HTTP/1.1 server, hyper-util's keep-alive client) and nothing else — no
//! routing, no headers rewritten, no metrics, no logs. Measured in the same run as
//! nginx and idem, it shows what the stack itself costs, so that what idem adds on top
//! is its own cost.
//!
//! ```text
//! idem-floor LISTEN UPSTREAM [proxy|answer] [shared|per-core] [http1|auto]
//! ```
//! - `proxy` forwards every request to UPSTREAM (an `http://host:port` base);
//!   `answer` answers every request itself with the upstream's fixed 201 (the floor
//!   of a replay, which never reaches the upstream).
//! - `shared`: one multi-thread runtime, one listener, one upstream pool;
//!   `per-core`: one current-thread runtime per core, each with its own
//!   `SO_REUSEPORT` listener and its own upstream pool.
//! - `http1` serves HTTP/1.1 only (hyper's `http1::Builder`); `auto` detects h2c
//!   on each connection first, as hyper-util's `auto::Builder` (idem's) does.
//! - The allocator is idem's (mimalloc).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket};

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

const CHARGE: &str = r#"{"id":"ch_3PbXbench","object":"charge","amount":1500,"currency":"brl","status":"succeeded"}"#;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Proxy,
    Answer,
}

#[derive(Clone)]
struct Floor {
    mode: Mode,
    upstream: Uri,
    client: Client<HttpConnector, Incoming>,
}

impl Floor {
    fn new(mode: Mode, upstream: Uri) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        Floor {
            mode,
            upstream,
            client,
        }
    }

    async fn handle(self, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        if self.mode == Mode::Answer {
            let res = Response::builder()
                .status(StatusCode::CREATED)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from_static(CHARGE.as_bytes())))
                .expect("a fixed response");
            return Ok(res.map(|b| b.map_err(|never| match never {}).boxed_unsync()));
        }
        let (mut parts, body) = req.into_parts();
        let mut uri = self.upstream.clone().into_parts();
        uri.path_and_query = parts.uri.path_and_query().cloned();
        parts.uri = Uri::from_parts(uri).expect("the upstream base with the request's path");
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(res) => Ok(res.map(BodyExt::boxed_unsync)),
            Err(_) => {
                let res = Response::builder()
                    .status(StatusCode::BAD_GATEWAY)
                    .body(Full::new(Bytes::new()))
                    .expect("a fixed response");
                Ok(res.map(|b| b.map_err(|never| match never {}).boxed_unsync()))
            }
        }
    }
}

async fn serve(listener: TcpListener, floor: Floor, auto: bool) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let floor = floor.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| floor.clone().handle(req));
            let io = TokioIo::new(stream);
            if auto {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(io, svc)
                    .await;
            } else {
                let _ = http1::Builder::new().serve_connection(io, svc).await;
            }
        });
    }
}

fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// The value of an optional argument among its choices; the first is the default.
fn choose<T: Copy>(arg: Option<&String>, what: &str, choices: &[(&str, T)]) -> Result<T, String> {
    let Some(arg) = arg else {
        return Ok(choices[0].1);
    };
    choices
        .iter()
        .find(|(name, _)| name == arg)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            format!("{what} must be one of {}, not {arg}", names.join(", "))
        })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: idem-floor LISTEN UPSTREAM [proxy|answer] [shared|per-core] [http1|auto]";
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let Ok(listen) = listen.parse::<SocketAddr>() else {
        eprintln!("idem-floor: LISTEN: not an address: {listen}");
        return ExitCode::from(2);
    };
    let Ok(upstream) = upstream.parse::<Uri>() else {
        eprintln!("idem-floor: UPSTREAM: not a URI: {upstream}");
        return ExitCode::from(2);
    };
    let choices = (
        choose(
            args.get(2),
            "mode",
            &[("proxy", Mode::Proxy), ("answer", Mode::Answer)],
        ),
        choose(
            args.get(3),
            "model",
            &[("shared", false), ("per-core", true)],
        ),
        choose(args.get(4), "protocol", &[("http1", false), ("auto", true)]),
    );
    let (mode, per_core, auto) = match choices {
        (Ok(mode), Ok(per_core), Ok(auto)) => (mode, per_core, auto),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            eprintln!("idem-floor: {e}");
            return ExitCode::from(2);
        }
    };
    if per_core {
        run_per_core(listen, mode, upstream, auto);
    } else {
        run_shared(listen, mode, upstream, auto);
    }
    ExitCode::SUCCESS
}

/// One current-thread runtime per core, each with its own `SO_REUSEPORT` listener and
/// upstream pool.
fn run_per_core(listen: SocketAddr, mode: Mode, upstream: Uri, auto: bool) {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let workers: Vec<_> = (0..cores)
        .map(|_| {
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                rt.block_on(async {
                    let listener = reuseport_listener(listen).expect("listen");
                    serve(listener, Floor::new(mode, upstream), auto).await;
                });
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
}

/// One multi-thread runtime sharing one listener and one upstream pool.
fn run_shared(listen: SocketAddr, mode: Mode, upstream: Uri, auto: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let listener = TcpListener::bind(listen).await.expect("listen");
        serve(listener, Floor::new(mode, upstream), auto).await;
    });
}
