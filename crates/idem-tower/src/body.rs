//! Request and response bodies of the layer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use idem_core::Recorded;
use pin_project_lite::pin_project;

/// Boxed error of the bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project! {
    /// The request body the inner service sees: the original stream when idem did not
    /// need to read it, or the buffered bytes when it did.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        // Passed through untouched.
        Stream { #[pin] body: B },
        // Buffered by idem (to fingerprint it); `None` once sent.
        Full { data: Option<Bytes> },
    }
}

impl<B> RequestBody<B> {
    pub(crate) fn stream(body: B) -> Self {
        RequestBody {
            kind: RequestKind::Stream { body },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        RequestBody {
            kind: RequestKind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            RequestKindProj::Stream { body } => body.poll_frame(cx).map_err(Into::into),
            RequestKindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Stream { body } => body.is_end_stream(),
            RequestKind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Stream { body } => body.size_hint(),
            RequestKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// Called once with the recorded body; the returned future stores the outcome, and
/// says whether the caller may have the end of the response: false when the outcome
/// should have been stored and was not (store down, lease lost), since a retry would
/// then not replay what the caller saw.
pub(crate) type Finisher =
    Box<dyn FnOnce(Recorded) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send>;

type ErasedBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pin_project! {
    /// The response body of the layer: the inner body (passed through or recorded for
    /// replay) or a body idem produced (replay, problem).
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        // The inner service's body, untouched.
        Inner { #[pin] body: B },
        // A body produced by idem; `None` once sent.
        Full { data: Option<Bytes> },
        // The inner body, recorded while it streams to the caller.
        Recording { recorder: Recorder },
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        ResponseBody {
            kind: ResponseKind::Inner { body },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        ResponseBody {
            kind: ResponseKind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    pub(crate) fn recording(body: B, cap: usize, finish: Finisher) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt;
        ResponseBody {
            kind: ResponseKind::Recording {
                recorder: Recorder {
                    body: Some(body.map_err(Into::into).boxed_unsync()),
                    buf: Buffer::new(cap),
                    held: None,
                    state: State::Streaming(Some(finish)),
                },
            },
        }
    }
}

enum State {
    Streaming(Option<Finisher>),
    Storing(Pin<Box<dyn Future<Output = bool> + Send>>),
    Done,
}

/// The recorded bytes, up to a cap.
struct Buffer {
    data: BytesMut,
    cap: usize,
    overflow: bool,
}

impl Buffer {
    fn new(cap: usize) -> Self {
        Buffer {
            data: BytesMut::new(),
            cap,
            overflow: false,
        }
    }

    fn record(&mut self, frame: &Frame<Bytes>) {
        let Some(data) = frame.data_ref() else { return };
        if self.overflow {
            return;
        }
        if self.data.len() + data.len() > self.cap {
            // Over the cap: delivered but not replayable (SPEC §6); stop keeping it.
            self.overflow = true;
            self.data = BytesMut::new();
        } else {
            self.data.extend_from_slice(data);
        }
    }

    /// The body to store; `complete` is whether it ended cleanly.
    fn finish(&mut self, complete: bool) -> Recorded {
        if !complete {
            Recorded::BrokenOff
        } else if self.overflow {
            Recorded::TooLarge
        } else {
            Recorded::Whole(std::mem::take(&mut self.data).freeze())
        }
    }
}

/// Records a response body while it streams. The last frame is held back until the
/// outcome is stored, so a client that has the whole response finds it replayable.
/// If the caller goes away first, the rest of the body is drained and stored in the
/// background, and an outcome already being stored goes on being stored: the handler
/// ran, so its outcome must be kept whoever is still listening.
pub(crate) struct Recorder {
    body: Option<ErasedBody>,
    buf: Buffer,
    held: Option<Frame<Bytes>>,
    state: State,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("recorded", &self.buf.data.len())
            .field("overflow", &self.buf.overflow)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            match &mut self.state {
                State::Done => return Poll::Ready(self.held.take().map(Ok)),
                State::Storing(fut) => {
                    let kept = ready!(fut.as_mut().poll(cx));
                    self.state = State::Done;
                    if !kept {
                        // The held-back end is never delivered: a caller with the
                        // whole response must find it replayable, so this one gets a
                        // broken response and retries (the key stays in flight until
                        // its lease expires).
                        self.held = None;
                        return Poll::Ready(Some(Err(
                            "the outcome could not be stored; the response is withheld".into(),
                        )));
                    }
                }
                State::Streaming(finish) => {
                    let body = self.body.as_mut().expect("body present while streaming");
                    match ready!(Pin::new(body).poll_frame(cx)) {
                        Some(Ok(frame)) => {
                            self.buf.record(&frame);
                            if let Some(prev) = self.held.replace(frame) {
                                return Poll::Ready(Some(Ok(prev)));
                            }
                        }
                        Some(Err(e)) => {
                            // The response broke off: the handler ran, the body is incomplete.
                            let finish = finish.take().expect("finisher present while streaming");
                            let body = self.buf.finish(false);
                            self.state = State::Done;
                            self.held = None;
                            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                                handle.spawn(finish(body));
                            }
                            return Poll::Ready(Some(Err(e)));
                        }
                        None => {
                            let finish = finish.take().expect("finisher present while streaming");
                            let body = self.buf.finish(true);
                            self.state = State::Storing(finish(body));
                        }
                    }
                }
            }
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Without a runtime the execution is dropped: its lease expires (SPEC §5).
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let finish = match std::mem::replace(&mut self.state, State::Done) {
            State::Storing(storing) => {
                handle.spawn(storing);
                return;
            }
            State::Streaming(Some(finish)) => finish,
            State::Streaming(None) | State::Done => return,
        };
        let Some(mut body) = self.body.take() else {
            return;
        };
        let mut buf = std::mem::replace(&mut self.buf, Buffer::new(0));
        handle.spawn(async move {
            use http_body_util::BodyExt;
            let complete = loop {
                match body.frame().await {
                    Some(Ok(frame)) => buf.record(&frame),
                    Some(Err(_)) => break false,
                    None => break true,
                }
            };
            finish(buf.finish(complete)).await;
        });
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => body.poll_frame(cx).map_err(Into::into),
            ResponseKindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseKindProj::Recording { recorder } => recorder.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Full { data } => data.is_none(),
            ResponseKind::Recording { recorder } => {
                matches!(recorder.state, State::Done) && recorder.held.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseKind::Recording { recorder } => recorder
                .body
                .as_ref()
                .map_or_else(SizeHint::default, Body::size_hint),
        }
    }
}
