//! The upstream, observed: its latency by route, and a span per call whose trace
//! context the upstream receives in `traceparent` when traces are on.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use idem_tower::RequestBody;
use tracing::Instrument;

use crate::metrics::{Metrics, RouteLabels};
use crate::proxy::{Upstream, UpstreamBody};
use crate::telemetry::{RequestSpan, inject};

/// [`Upstream`] behind a latency histogram and an `upstream` span.
#[derive(Clone, Debug)]
pub struct ObservedUpstream {
    inner: Upstream,
    metrics: Arc<Metrics>,
    labels: RouteLabels,
    traces: bool,
}

impl ObservedUpstream {
    /// Wraps the upstream; `traces`: whether spans are exported (and so propagated).
    pub fn new(inner: Upstream, metrics: Arc<Metrics>, labels: RouteLabels, traces: bool) -> Self {
        ObservedUpstream {
            inner,
            metrics,
            labels,
            traces,
        }
    }
}

impl tower::Service<Request<RequestBody<Incoming>>> for ObservedUpstream {
    type Response = Response<UpstreamBody>;
    type Error = Infallible;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<RequestBody<Incoming>>) -> Self::Future {
        let route = self.labels.index(req.method(), req.uri().path());
        // The layer runs the upstream call in a task of its own, where the request's
        // span is not current: it comes along in the extensions.
        let parent = req
            .extensions()
            .get::<RequestSpan>()
            .map_or_else(tracing::Span::current, |s| s.0.clone());
        let span = if self.traces {
            let span = tracing::info_span!(
                parent: &parent,
                "upstream",
                otel.kind = "client",
                http.route = self.labels.get(route).as_str(),
                http.response.status_code = tracing::field::Empty,
            );
            inject(&span, req.headers_mut());
            span
        } else {
            tracing::Span::none()
        };
        let (metrics, labels) = (self.metrics.clone(), self.labels.clone());
        // Drive the ready service: poll_ready was called on `self.inner`.
        let mut inner = self.inner.clone();
        let fut = tower::Service::call(&mut inner, req);
        Box::pin(
            async move {
                let start = Instant::now();
                let res = fut.await;
                metrics.upstream(labels.get(route), start.elapsed());
                if let Ok(r) = &res {
                    tracing::Span::current()
                        .record("http.response.status_code", r.status().as_u16());
                }
                res
            }
            .instrument(span),
        )
    }
}
