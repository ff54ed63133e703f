//! Fixtures of the SDK's end-to-end tests: a real coordinator on 127.0.0.1
//! (port 0) whose every received request is counted, message by message,
//! from the HTTP/2 request bodies as they arrive.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedrec_client::model::{MatrixFactorization, Model};
use fedrec_coordinator::config::CoordinatorConfig;
use fedrec_coordinator::service::{CoordinatorService, ServeOptions, ServiceHandle};
use http_body_util::{BodyExt, Full};
use rand::SeedableRng;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;

/// Upper bound for anything a test awaits.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Awaits `future`, failing the test with `what` if it takes longer than [`TIMEOUT`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A matrix-factorization model.
pub fn model(items: usize, factors: usize) -> Arc<dyn Model> {
    Arc::new(MatrixFactorization::new(items, factors, 0.1).expect("valid model"))
}

/// A coordinator configuration: `rounds` training rounds of `cohort` devices.
pub fn config(rounds: u32, cohort: usize) -> CoordinatorConfig {
    let mut cfg = CoordinatorConfig::default();
    cfg.rounds.rounds = rounds;
    cfg.rounds.clients_per_round = cohort;
    cfg.rounds.min_updates = cohort;
    cfg.rounds.over_selection = 1.0;
    cfg.rounds.deadline_secs = 60.0;
    cfg.rounds.checkin_window_secs = 60.0;
    cfg.rounds.seed = Some(1);
    cfg
}

/// Per gRPC method path: (messages, protobuf bytes) received.
pub type Counts = Arc<Mutex<BTreeMap<String, (u64, u64)>>>;

/// A running coordinator.
pub struct Running {
    pub endpoint: String,
    pub handle: ServiceHandle,
    /// What the server received, by method.
    pub counts: Counts,
    /// Check-ins to refuse as UNAUTHENTICATED (as for an expired session)
    /// before passing them on.
    pub refuse_check_ins: Arc<AtomicU32>,
    /// Model downloads to refuse in the same way.
    pub refuse_downloads: Arc<AtomicU32>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Messages and bytes received for `method` (e.g. "CheckIn").
    pub fn received(&self, method: &str) -> (u64, u64) {
        let path = format!("/fedrec.v1.Coordinator/{method}");
        self.counts
            .lock()
            .unwrap()
            .get(&path)
            .copied()
            .unwrap_or_default()
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        within("shutdown", self.task).await.expect("server task");
    }
}

/// Serves a coordinator for `model` (initialised from `seed`) with `cfg`.
pub async fn start(cfg: CoordinatorConfig, model: &Arc<dyn Model>, seed: u64) -> Running {
    start_with(cfg, model, seed, ServeOptions::default()).await
}

/// [`start`] with the service's `options` (a catalogue, say).
pub async fn start_with(
    cfg: CoordinatorConfig,
    model: &Arc<dyn Model>,
    seed: u64,
    options: ServeOptions,
) -> Running {
    let params = model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let start = fedrec_coordinator::bootstrap::prepare(
        cfg.validated().expect("a valid configuration"),
        model.layout(),
        params,
        None,
        options,
    )
    .expect("valid coordinator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let service = CoordinatorService::new(start.core, start.options);
    let handle = service.handle();
    let driver = service.spawn_driver();
    let counts = Counts::default();
    let refuse_check_ins = Arc::new(AtomicU32::new(0));
    let refuse_downloads = Arc::new(AtomicU32::new(0));
    let counting = Counting {
        inner: service.into_server(),
        counts: Arc::clone(&counts),
        refuse_check_ins: Arc::clone(&refuse_check_ins),
        refuse_downloads: Arc::clone(&refuse_downloads),
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(counting)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await
            .expect("server ran cleanly");
        driver.abort();
    });
    Running {
        endpoint,
        handle,
        counts,
        refuse_check_ins,
        refuse_downloads,
        stop: Some(tx),
        task,
    }
}

/// Wraps the coordinator's gRPC service: reads each request body whole,
/// counts its gRPC messages (a 5-byte prefix, then the protobuf bytes) and
/// their sizes, and passes the same bytes on.
#[derive(Clone)]
struct Counting<S> {
    inner: S,
    counts: Counts,
    refuse_check_ins: Arc<AtomicU32>,
    refuse_downloads: Arc<AtomicU32>,
}

impl<S: NamedService> NamedService for Counting<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<tonic::body::Body>> for Counting<S>
where
    S: Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let counts = Arc::clone(&self.counts);
        let path = req.uri().path();
        let refusals = if path.ends_with("/CheckIn") {
            Some(&self.refuse_check_ins)
        } else if path.ends_with("/DownloadModel") {
            Some(&self.refuse_downloads)
        } else {
            None
        };
        let refuse = refusals.is_some_and(|n| {
            n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        });
        Box::pin(async move {
            if refuse {
                return Ok(
                    tonic::Status::unauthenticated("session expired (refused by the test)")
                        .into_http(),
                );
            }
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let (mut messages, mut size) = (0_u64, 0_u64);
            let mut rest = &bytes[..];
            while rest.len() >= 5 {
                let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
                messages += 1;
                size += len as u64;
                rest = &rest[(5 + len).min(rest.len())..];
            }
            {
                let mut c = counts.lock().unwrap();
                let slot = c.entry(parts.uri.path().to_owned()).or_default();
                slot.0 += messages;
                slot.1 += size;
            }
            let req = http::Request::from_parts(parts, tonic::body::Body::new(Full::new(bytes)));
            inner.call(req).await
        })
    }
}
