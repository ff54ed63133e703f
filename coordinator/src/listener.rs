//! The coordinator's connections, below gRPC: an accept loop that caps how
//! many connections are open (`server.max_connections`) and backs off when
//! the process runs out of file descriptors instead of spinning, and
//! connections that close themselves after `server.idle_timeout_secs`
//! without a request.
//!
//! A connection is idle when no request is in flight on it (a long poll, an
//! upload or a download streaming out keep it busy) and none has started or
//! ended for the timeout. [`TrackRequests`] (a tower layer on the gRPC
//! server) tells each connection's [`Activity`] when requests start and end;
//! keepalive pings do not count, so a client that only answers pings is
//! still closed. The TLS handshake has its own timeout (tonic's).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::{Service, http};
use tonic::transport::server::{Connected, TlsConnectInfo};

/// The first pause after an accept error such as `EMFILE`; it doubles on
/// each error in a row up to [`MAX_ACCEPT_BACKOFF`].
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause between accept attempts while they keep failing.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// How the accept loop treats connections.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Most connections open at once; one more is accepted and closed at
    /// once (the client sees the connection reset, not a hang in the
    /// listen backlog).
    pub max_connections: usize,
    /// How long a connection may stay without a request.
    pub idle_timeout: Duration,
}

/// Accepts connections from `listener` on a task of its own until the
/// returned stream is dropped. `refused` is called for each connection
/// closed because `max_connections` were open.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    refused: impl Fn() + Send + 'static,
) -> ReceiverStream<io::Result<Connection>> {
    let (tx, rx) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        let mut backoff: Option<Duration> = None;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => {
                    backoff = None;
                    accepted
                }
                // The peer gave up before we accepted: nothing to wait for.
                Err(e) if peer_gone(&e) => continue,
                Err(e) => {
                    // Out of file descriptors (EMFILE, ENFILE) or memory:
                    // retrying at once would spin. Wait, doubling the pause.
                    let pause =
                        backoff.map_or(MIN_ACCEPT_BACKOFF, |d| (d * 2).min(MAX_ACCEPT_BACKOFF));
                    backoff = Some(pause);
                    tracing::warn!(
                        error = %e,
                        pause_ms = pause.as_millis() as u64,
                        "cannot accept a connection; backing off"
                    );
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                refused();
                tracing::debug!(%remote, "connection refused: server.max_connections reached");
                continue;
            };
            // Small request/response messages: do not wait to coalesce.
            let _ = stream.set_nodelay(true);
            let connection = Connection::new(stream, remote, limits.idle_timeout, slot);
            if tx.send(Ok(connection)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Accept errors that concern one connection only.
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Requests in flight on one connection, and when the last started or ended.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn touch(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = Instant::now();
        }
    }

    /// When the connection becomes idle if nothing happens; `None` while a
    /// request is in flight.
    fn idle_at(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        self.last.lock().ok().map(|last| *last + timeout)
    }
}

/// Marks a request in flight until dropped (with the response's body).
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        Self(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a request knows of its connection (in the request's extensions).
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    activity: Arc<Activity>,
}

impl ConnectionInfo {
    /// The connection's info in a request's extensions, plain or TLS.
    pub fn of(extensions: &http::Extensions) -> Option<&Self> {
        extensions.get::<Self>().or_else(|| {
            extensions
                .get::<TlsConnectInfo<Self>>()
                .map(TlsConnectInfo::get_ref)
        })
    }
}

/// An accepted TCP connection that ends its reads with `TimedOut` once it
/// has been idle for the timeout, and frees its `max_connections` slot when
/// dropped.
pub struct Connection {
    /// Declared first so that it is dropped first: the slot is free again
    /// by the time the peer sees the socket close.
    _slot: OwnedSemaphorePermit,
    stream: TcpStream,
    info: ConnectionInfo,
    idle_timeout: Duration,
    timer: Pin<Box<Sleep>>,
}

impl Connection {
    fn new(
        stream: TcpStream,
        remote: SocketAddr,
        idle_timeout: Duration,
        slot: OwnedSemaphorePermit,
    ) -> Self {
        let now = Instant::now();
        Self {
            stream,
            info: ConnectionInfo {
                remote,
                activity: Arc::new(Activity {
                    in_flight: AtomicUsize::new(0),
                    last: Mutex::new(now),
                }),
            },
            idle_timeout,
            timer: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            _slot: slot,
        }
    }

    /// Ready with an error once the connection is idle; otherwise pending,
    /// with the timer set to wake the task when it might be.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.info.activity.idle_at(self.idle_timeout) {
                Some(at) if at <= now => {
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection idle (server.idle_timeout_secs)",
                    ));
                }
                Some(at) => self.timer.as_mut().reset(at),
                None => self.timer.as_mut().reset(now + self.idle_timeout),
            }
        }
        Poll::Pending
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Pending => self.poll_idle(cx).map(Err),
            ready => ready,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

/// The tower layer that marks each request in flight on its connection
/// until its response has been sent (see the module doc).
#[derive(Clone, Copy, Debug, Default)]
pub struct TrackRequestsLayer;

impl<S> tower_layer::Layer<S> for TrackRequestsLayer {
    type Service = TrackRequests<S>;

    fn layer(&self, inner: S) -> TrackRequests<S> {
        TrackRequests { inner }
    }
}

/// See [`TrackRequestsLayer`].
#[derive(Clone, Debug)]
pub struct TrackRequests<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for TrackRequests<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let busy = ConnectionInfo::of(request.extensions()).map(|info| Busy::start(&info.activity));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match busy {
                Some(busy) => {
                    response.map(|body| tonic::body::Body::new(HeldBody { body, _busy: busy }))
                }
                None => response,
            })
        })
    }
}

/// A response body that keeps its request in flight until it is dropped.
struct HeldBody {
    body: tonic::body::Body,
    _busy: Busy,
}

impl Body for HeldBody {
    type Data = <tonic::body::Body as Body>::Data;
    type Error = <tonic::body::Body as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
