//! The gRPC adapter: a thin tonic service around [`RoundCore`].
//!
//! It translates only: protobuf messages become domain types at the edge
//! (`TryFrom`), the current time is read here (`tokio::time::Instant`) and
//! passed into the core, and [`CoordinatorError`] becomes a `tonic::Status`
//! through its one `From` impl.
//!
//! Concurrency: the core sits in a `std::sync::Mutex`, locked briefly for each
//! call and never across an `.await`. Whenever a round starts or ends, a
//! [`Progress`] value is published on a `tokio::sync::watch` channel; waiting
//! check-ins (long polls) and the driver task wake on it. The driver calls
//! [`RoundCore::poll`] at [`RoundCore::poll_timeout`], so a round reaches its
//! deadline even when every device has fallen silent. Under secure
//! aggregation the driver also runs each round's unmasking (CPU-heavy) on a
//! blocking thread, outside the lock, and hands the result back to the core.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tonic::{Request, Response, Status, Streaming};

use fedrec_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};
use fedrec_proto::pb::{self, update_chunk::Part};
use fedrec_proto::{DEFAULT_CHUNK_BYTES, PROTOCOL_VERSION, codec};

mod admission;
mod convert;
mod driver;
mod secagg;

use admission::{Busy, JoinLimiter, Pace, PacedUpload, Reservation, slot};
pub use convert::{summary_to_pb, task_kind_to_pb, task_to_pb};
use driver::drive;

use crate::CoordinatorError;
use crate::aggregate::EvalCounts;
use crate::auth::{self, TokenSet};
use crate::listener::{self, ConnectionInfo, ConnectionLimits, TrackRequestsLayer};
use crate::round::{
    CheckIn, CoordinatorStatus, ModelSnapshot, Pseudonym, RoundCore, RoundSummary, UpdateAccepted,
    UpdateHeader,
};

/// Extra room in the server's receive limit beyond one chunk of values, for
/// the protobuf framing of an upload chunk.
pub const DECODING_SLACK_BYTES: usize = 64 * 1024;

/// Bytes of values per model chunk a download streams (256 KiB, one
/// HTTP/2 frame of [`fedrec_proto::MAX_FRAME_BYTES`]). A download's slot
/// (`server.max_concurrent_downloads`) is given back when its last chunk is
/// handed to HTTP/2, which may still hold that chunk until the device reads
/// it, so the chunk size bounds what a finished download keeps: with 1 MiB
/// chunks, a q8 model of 1,000,000 values went out as one chunk, the slot
/// bounded nothing, and 1,000 devices drove the coordinator to 315 MB; with
/// 256 KiB chunks it peaked at 114 MB, and f32 at 111 MB instead of 172 MB,
/// with rounds as fast (`BENCHMARKS.md`).
pub const DOWNLOAD_CHUNK_BYTES: usize = fedrec_proto::MAX_FRAME_BYTES as usize;

/// Options of the gRPC adapter that are not part of the coordinator's
/// configuration file.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ServeOptions {
    /// Bytes of values per streamed model chunk. Default
    /// [`DOWNLOAD_CHUNK_BYTES`].
    pub chunk_bytes: usize,
    /// Save the state here after every ended round (see
    /// [`checkpoint`](crate::checkpoint)), and once when serving starts, so
    /// that a path that cannot be written fails at once. Default: nowhere.
    pub checkpoint: Option<PathBuf>,
    /// Serve over TLS (mutual TLS if it names a client CA); see
    /// [`crate::tls::server_tls_config`]. Default: plain text.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// The enrollment tokens that may join (see [`crate::auth`]); needed
    /// when the configuration sets `auth.enrollment_tokens`. Default: none
    /// (any device may join).
    pub tokens: Option<TokenSet>,
    /// The catalogue announced to every device that joins, so that it maps
    /// its purchases' item ids into the model's rows. Default: none
    /// announced (devices must know the catalogue already).
    pub catalogue: Option<pb::Catalogue>,
    /// Where sessions live beyond this process (a replica's store), so
    /// that a device that joined at another replica is served here.
    /// Default: none (this process's sessions only).
    pub sessions: Option<Arc<dyn SessionStore>>,
}

/// A future a [`SessionStore`] returns.
pub type StoreFuture<'a, T> =
    std::pin::Pin<Box<dyn Future<Output = Result<T, CoordinatorError>> + Send + 'a>>;

/// A session that joined here, for a [`SessionStore`].
#[derive(Clone, Debug)]
pub struct NewSession {
    /// The device's pseudonym.
    pub pseudonym: Pseudonym,
    /// How long the session lasts.
    pub ttl: Duration,
    /// The digest of the enrollment token the device joined with, and the
    /// token's limit of live sessions (`auth.max_sessions_per_token`).
    pub token: Option<(String, u32)>,
}

/// Sessions shared by the replicas of a replicated coordinator.
pub trait SessionStore: Send + Sync + std::fmt::Debug {
    /// Records a session that joined here; the device learns its pseudonym
    /// only once it is recorded. Returns the sessions the join ended: its
    /// token's oldest beyond the token's limit, at whichever replica.
    fn record(&self, session: NewSession) -> StoreFuture<'_, Vec<Pseudonym>>;
    /// The time left of a session this process does not know, if any
    /// replica admitted it and it has not expired.
    fn find(&self, pseudonym: Pseudonym) -> StoreFuture<'_, Option<Duration>>;
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            chunk_bytes: DOWNLOAD_CHUNK_BYTES,
            checkpoint: None,
            tls: None,
            tokens: None,
            catalogue: None,
            sessions: None,
        }
    }
}

impl ServeOptions {
    /// Sets the model chunk size in bytes (at least 4). Default [`DOWNLOAD_CHUNK_BYTES`].
    pub fn with_chunk_bytes(mut self, chunk_bytes: usize) -> Self {
        self.chunk_bytes = chunk_bytes.max(4);
        self
    }

    /// Admits only devices that join with one of `tokens` (read with
    /// [`TokenSet::load`] from `auth.enrollment_tokens`).
    pub fn with_enrollment_tokens(mut self, tokens: TokenSet) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// Announces `catalogue` to every device that joins.
    pub fn with_catalogue(mut self, catalogue: &fedrec_proto::catalogue::Catalogue) -> Self {
        self.catalogue = Some(catalogue.to_pb());
        self
    }

    /// Serves over TLS with `tls` (from [`crate::tls::server_tls_config`]).
    pub fn with_tls(mut self, tls: tonic::transport::ServerTlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Keeps sessions in `sessions` too (a replica's store).
    pub fn with_sessions(mut self, sessions: Arc<dyn SessionStore>) -> Self {
        self.sessions = Some(sessions);
        self
    }

    /// Saves the state to `path` after every ended round.
    pub fn with_checkpoint(mut self, path: impl Into<PathBuf>) -> Self {
        self.checkpoint = Some(path.into());
        self
    }
}

/// What an in-process observer sees of the coordinator, published whenever a
/// round starts or ends and when it finishes.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// The state at the time of publication.
    pub status: CoordinatorStatus,
    /// Every ended round, oldest first.
    pub history: Arc<Vec<RoundSummary>>,
    /// Why the coordinator finished, once it has.
    pub finished: Option<String>,
    /// The core's [`RoundCore::generation`] at publication.
    pub generation: u64,
}

impl Progress {
    fn of(core: &RoundCore) -> Self {
        Self {
            status: core.status(),
            history: Arc::new(core.history().to_vec()),
            finished: core.finished().map(str::to_owned),
            generation: core.generation(),
        }
    }
}

/// A model download in progress: its chunks, and the download slot it
/// holds until it ends (or the device goes away).
pub struct Download {
    chunks: std::vec::IntoIter<Result<pb::ModelChunk, Status>>,
    _slot: OwnedSemaphorePermit,
}

impl tokio_stream::Stream for Download {
    type Item = Result<pb::ModelChunk, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Ready(self.chunks.next())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.chunks.size_hint()
    }
}

struct Shared {
    core: Mutex<RoundCore>,
    progress: watch::Sender<Progress>,
    /// Bounds the uploads buffered at once (each holds 4 bytes per model value).
    uploads: Arc<Semaphore>,
    long_poll: Duration,
    chunk_bytes: usize,
    stop_driver: Notify,
    /// Where the state is saved after every ended round, if anywhere.
    checkpoint: Option<PathBuf>,
    /// The listener's TLS configuration, if it speaks TLS.
    tls: Option<tonic::transport::ServerTlsConfig>,
    /// Rounds in the history when the state was last saved.
    saved_rounds: AtomicUsize,
    /// Update bytes received and model bytes sent (for metrics).
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Joins per source address: a token bucket each, unless unlimited
    /// (`server.joins_per_minute_per_source = 0`).
    joins: Option<JoinLimiter>,
    /// The enrollment tokens that may join, when devices must present one.
    tokens: Option<TokenSet>,
    /// The catalogue announced at join, if any.
    catalogue: Option<pb::Catalogue>,
    /// Sessions beyond this process, if any.
    sessions: Option<Arc<dyn SessionStore>>,
    /// Bounds the downloads streaming out at once.
    downloads: Arc<Semaphore>,
    /// Upload slots reserved by devices that have not started uploading.
    reservations: Mutex<HashMap<Pseudonym, Reservation>>,
    /// Devices reserving or uploading now (see [`Busy`]).
    busy: Mutex<HashSet<Pseudonym>>,
    /// The pace an upload must keep to hold its slot.
    pace: Pace,
    /// `server.max_streams_per_connection`.
    max_streams: u32,
}

impl Shared {
    fn lock(&self) -> Result<MutexGuard<'_, RoundCore>, CoordinatorError> {
        self.core.lock().map_err(|_| poisoned())
    }

    /// Runs `f` on the core, then publishes progress if a round started or ended.
    fn with_core<R>(&self, f: impl FnOnce(&mut RoundCore) -> R) -> Result<R, CoordinatorError> {
        let mut core = self.lock()?;
        let result = f(&mut core);
        self.save_if_a_round_ended(&core);
        self.progress.send_if_modified(|p| {
            if p.generation == core.generation() {
                return false;
            }
            *p = Progress::of(&core);
            true
        });
        Ok(result)
    }

    /// Saves a checkpoint when a round ended since the last one, under the
    /// core's lock, before anyone learns of the round's end. A failed save
    /// is logged as an error and tried again after the next call.
    fn save_if_a_round_ended(&self, core: &RoundCore) {
        let Some(path) = &self.checkpoint else {
            return;
        };
        let ended = core.history().len();
        // A settings search's trials are not saved: a restart runs the
        // search again (its result is saved by its driver).
        if core.in_search() || self.saved_rounds.load(Ordering::Relaxed) == ended {
            return;
        }
        match core.checkpoint().write(path) {
            Ok(()) => {
                self.saved_rounds.store(ended, Ordering::Relaxed);
                tracing::debug!(rounds = ended, path = %path.display(), "checkpoint saved");
            }
            Err(e) => tracing::error!(error = %e, "checkpoint not saved"),
        }
    }

    /// Counts and logs a request rejected at the edge, before the core saw it.
    /// The upload slot `pseudonym` reserved, if its lease still runs.
    fn take_reservation(&self, pseudonym: &Pseudonym) -> Option<Reservation> {
        let reservation = self.reservations.lock().ok()?.remove(pseudonym)?;
        (tokio::time::Instant::now() < reservation.until).then_some(reservation)
    }

    /// When the lease of the slot `pseudonym` reserved ends, if it runs.
    fn reserved_until(&self, pseudonym: &Pseudonym) -> Option<tokio::time::Instant> {
        let until = self.reservations.lock().ok()?.get(pseudonym)?.until;
        (tokio::time::Instant::now() < until).then_some(until)
    }

    /// Marks `pseudonym` as reserving or uploading; refused while it already is.
    fn busy(&self, pseudonym: Pseudonym) -> Result<Busy<'_>, Status> {
        let fresh = self
            .busy
            .lock()
            .map_err(|_| rejected(poisoned()))?
            .insert(pseudonym);
        if !fresh {
            return Err(self.reject_at_edge(CoordinatorError::UploadInProgress));
        }
        Ok(Busy {
            shared: self,
            pseudonym,
        })
    }

    /// Takes an upload slot for `pseudonym`: its reservation, or the next
    /// free slot (in the order asked) if it comes before the round's
    /// `deadline`.
    async fn upload_slot(
        &self,
        pseudonym: &Pseudonym,
        round: u32,
        deadline: std::time::Instant,
    ) -> Result<PacedUpload<'_>, Status> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let (slot, granted) = match self.take_reservation(pseudonym) {
            Some(r) => (r.permit, r.granted),
            None => {
                let permit = tokio::time::timeout_at(deadline, slot(&self.uploads))
                    .await
                    .map_err(|_| {
                        self.reject_at_edge(CoordinatorError::UploadTimeout { round })
                    })??;
                (permit, tokio::time::Instant::now())
            }
        };
        Ok(PacedUpload {
            shared: self,
            round,
            granted,
            deadline,
            received: 0,
            _slot: slot,
        })
    }

    /// Frees the slots whose lease ran out (devices that reserved and then
    /// never uploaded).
    fn expire_reservations(&self) {
        let now = tokio::time::Instant::now();
        if let Ok(mut reservations) = self.reservations.lock() {
            reservations.retain(|_, r| now < r.until);
        }
    }

    fn reject_at_edge(&self, err: CoordinatorError) -> Status {
        if let Ok(mut core) = self.lock() {
            core.record_rejection(&err);
        }
        rejected(err)
    }
}

fn poisoned() -> CoordinatorError {
    CoordinatorError::Internal("coordinator state poisoned by an earlier panic".to_owned())
}

/// Logs a rejection and turns it into a gRPC status.
fn rejected(err: CoordinatorError) -> Status {
    tracing::debug!(reason = err.reason(), error = %err, "request rejected");
    err.into()
}

/// The server's receive limit per message: one chunk plus
/// [`DECODING_SLACK_BYTES`].
fn decoding_limit(chunk_bytes: usize) -> usize {
    chunk_bytes.max(DEFAULT_CHUNK_BYTES) + DECODING_SLACK_BYTES
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// The tonic service: implements the generated `Coordinator` trait.
#[derive(Clone)]
pub struct CoordinatorService {
    shared: Arc<Shared>,
}

/// A handle for in-process users (a simulation, the CLI): watch progress,
/// wait for the end, read the model.
#[derive(Clone)]
pub struct ServiceHandle {
    shared: Arc<Shared>,
}

impl ServiceHandle {
    /// A receiver of [`Progress`], updated whenever a round starts or ends.
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.shared.progress.subscribe()
    }

    /// The latest published progress.
    pub fn progress(&self) -> Progress {
        self.shared.progress.borrow().clone()
    }

    /// The coordinator's metrics in the Prometheus text format (see
    /// [`crate::metrics`]).
    pub fn metrics(&self) -> Result<String, CoordinatorError> {
        let bytes = (
            self.shared.bytes_in.load(Ordering::Relaxed),
            self.shared.bytes_out.load(Ordering::Relaxed),
        );
        self.shared
            .with_core(|core| crate::metrics::render(core, bytes.0, bytes.1))
    }

    /// Waits until the coordinator has finished all its rounds; returns why.
    pub async fn finished(&self) -> String {
        let mut rx = self.subscribe();
        match rx.wait_for(|p| p.finished.is_some()).await {
            Ok(p) => p.finished.clone().unwrap_or_default(),
            // The sender lives as long as `self`, so the channel cannot close here.
            Err(_) => std::future::pending().await,
        }
    }

    /// The current global model.
    pub fn model(&self) -> Result<Arc<ModelSnapshot>, CoordinatorError> {
        self.with_core(|core| core.model())
    }

    /// Runs `f` on the core under its lock (keep it short), then publishes
    /// progress if a round started or ended.
    pub fn with_core<R>(&self, f: impl FnOnce(&mut RoundCore) -> R) -> Result<R, CoordinatorError> {
        self.shared.with_core(f)
    }
}

impl CoordinatorService {
    /// Wraps `core`. Nothing runs until [`serve`](Self::serve) (or
    /// [`spawn_driver`](Self::spawn_driver) with [`into_server`](Self::into_server)).
    pub fn new(core: RoundCore, opts: ServeOptions) -> Self {
        let server = core.config().server.clone();
        let long_poll = Duration::try_from_secs_f64(server.long_poll_secs).unwrap_or(Duration::MAX);
        let uploads = Arc::new(Semaphore::new(server.max_concurrent_uploads));
        let (progress, _) = watch::channel(Progress::of(&core));
        let saved_rounds = AtomicUsize::new(core.history().len());
        Self {
            shared: Arc::new(Shared {
                core: Mutex::new(core),
                progress,
                uploads,
                long_poll,
                chunk_bytes: opts.chunk_bytes.max(4),
                stop_driver: Notify::new(),
                saved_rounds,
                bytes_in: AtomicU64::new(0),
                bytes_out: AtomicU64::new(0),
                max_streams: server.max_streams_per_connection,
                joins: JoinLimiter::new(&server),
                checkpoint: opts.checkpoint,
                tls: opts.tls,
                tokens: opts.tokens,
                catalogue: opts.catalogue,
                sessions: opts.sessions,
                reservations: Mutex::new(HashMap::new()),
                busy: Mutex::new(HashSet::new()),
                pace: Pace {
                    grace: server.upload_grace(),
                    min_rate: server.upload_min_bytes_per_sec,
                    max_message: decoding_limit(opts.chunk_bytes),
                },
                downloads: Arc::new(Semaphore::new(server.max_concurrent_downloads)),
            }),
        }
    }

    /// The configured token file, when the service was given no tokens.
    fn config_path_needing_tokens(&self) -> Option<PathBuf> {
        if self.shared.tokens.is_some() {
            return None;
        }
        let core = self.shared.lock().ok()?;
        core.config().auth.enrollment_tokens.clone()
    }

    /// A handle for watching progress from the same process.
    pub fn handle(&self) -> ServiceHandle {
        ServiceHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Spawns the driver task, which polls the core at its timeouts and when
    /// its state changes, and logs round events. It ends when the coordinator
    /// finishes or [`serve`](Self::serve) returns. Call it only when not
    /// using `serve` (which spawns its own).
    pub fn spawn_driver(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(drive(Arc::clone(&self.shared)))
    }

    /// The tonic server for this service, with the receive limit raised to
    /// one chunk plus [`DECODING_SLACK_BYTES`].
    pub fn into_server(self) -> CoordinatorServer<Self> {
        let limit = decoding_limit(self.shared.chunk_bytes);
        CoordinatorServer::new(self).max_decoding_message_size(limit)
    }

    /// Serves on `listener` until `shutdown` completes, with the driver task
    /// running alongside.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), CoordinatorError> {
        if let Some(path) = &self.config_path_needing_tokens() {
            return Err(CoordinatorError::InvalidConfig(format!(
                "auth.enrollment_tokens names {} but the service was given no tokens \
                 (ServeOptions::with_enrollment_tokens)",
                path.display()
            )));
        }
        if let Some(path) = &self.shared.checkpoint {
            // Fail now, not after the first round: the state as it is (a
            // resumed core writes back what it read).
            let checkpoint = self.shared.lock()?.checkpoint();
            checkpoint.write(path)?;
        }
        let server = self.shared.lock()?.config().server.clone();
        let mut builder = fedrec_proto::server_builder()
            .max_concurrent_streams(Some(self.shared.max_streams))
            .http2_keepalive_interval(Some(server.keepalive()))
            .http2_keepalive_timeout(Some(server.keepalive_timeout()));
        if let Some(tls) = self.shared.tls.clone() {
            builder = builder.tls_config(tls.timeout(server.tls_handshake()))?;
        }
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, tls = self.shared.tls.is_some(), "coordinator listening");
        }
        let shared = Arc::clone(&self.shared);
        let driver = self.spawn_driver();
        let limits = ConnectionLimits {
            max_connections: server.max_connections,
            idle_timeout: server.idle_timeout(),
        };
        let counter = Arc::clone(&self.shared);
        let incoming = listener::incoming(listener, limits, move || {
            let _ = counter.reject_at_edge(CoordinatorError::TooManyConnections {
                limit: limits.max_connections,
            });
        });
        // The standard gRPC health service: SERVING while the coordinator
        // runs, for load balancers and orchestrators.
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<CoordinatorServer<CoordinatorService>>()
            .await;
        let result = builder
            .layer(TrackRequestsLayer)
            .add_service(health_service)
            .add_service(self.into_server())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        shared.stop_driver.notify_one();
        let _ = driver.await;
        tracing::info!("coordinator stopped");
        result.map_err(CoordinatorError::from)
    }

    /// Holds `permit` for `pseudonym` for `server.upload_grace_secs`: the
    /// slot goes back to the pool when the lease ends unused. Returns when
    /// it ends.
    fn reserve(&self, pseudonym: Pseudonym, permit: OwnedSemaphorePermit) -> tokio::time::Instant {
        let granted = tokio::time::Instant::now();
        let until = granted + self.shared.pace.grace;
        if let Ok(mut reservations) = self.shared.reservations.lock() {
            reservations.insert(
                pseudonym,
                Reservation {
                    permit,
                    granted,
                    until,
                },
            );
        }
        // Free the slot at the lease's end even if no other device asks.
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            shared.expire_reservations();
        });
        until
    }

    /// Receives an upload: header first (checked before any value is read),
    /// then the values into one buffer of at most 4 bytes per model value:
    /// f32 bytes as they come, encoded runs (compressed uploads) decoded
    /// into f32 as each arrives, off the coordinator's lock.
    async fn receive_update(
        &self,
        stream: &mut Streaming<pb::UpdateChunk>,
    ) -> Result<UpdateAccepted, Status> {
        let shared = &self.shared;
        let header = match stream.message().await? {
            Some(pb::UpdateChunk {
                part: Some(Part::Header(header)),
            }) => UpdateHeader::try_from(header).map_err(|e| shared.reject_at_edge(e))?,
            _ => {
                return Err(shared.reject_at_edge(CoordinatorError::Malformed(
                    "the first message of an upload must be its header".to_owned(),
                )));
            }
        };
        let deadline = shared
            .with_core(|core| core.check_update_header(now(), &header))?
            .map_err(rejected)?;
        // The header matched the model's size, so this is the model's byte length.
        let limit = usize::try_from(header.num_values)
            .unwrap_or(usize::MAX)
            .saturating_mul(4);
        let _busy = shared.busy(header.pseudonym)?;
        let mut upload = shared
            .upload_slot(&header.pseudonym, header.round, deadline)
            .await?;
        let mut values = Vec::with_capacity(limit);
        // Bytes of values as sent (less than `values` when encoded).
        let mut wire = 0;
        while let Some(chunk) = upload.next(stream).await? {
            match chunk.part {
                Some(Part::Values(bytes)) => {
                    let got = values.len() + bytes.len();
                    if got > limit {
                        return Err(
                            shared.reject_at_edge(CoordinatorError::TooLarge { limit, got })
                        );
                    }
                    values.extend_from_slice(&bytes);
                    wire += bytes.len();
                    upload.received(bytes.len());
                }
                Some(Part::Encoded(run)) => {
                    wire += run.values.len();
                    upload.received(run.values.len());
                    codec::append_update_run(&run, &mut values, limit / 4).map_err(|e| {
                        shared.reject_at_edge(CoordinatorError::Malformed(format!(
                            "upload of {} values: {e}",
                            limit / 4
                        )))
                    })?;
                }
                Some(Part::Header(_)) => {
                    return Err(shared.reject_at_edge(CoordinatorError::Malformed(
                        "an upload must have exactly one header".to_owned(),
                    )));
                }
                None => {
                    return Err(shared.reject_at_edge(CoordinatorError::Malformed(
                        "upload chunk without header or values".to_owned(),
                    )));
                }
            }
        }
        shared.bytes_in.fetch_add(wire as u64, Ordering::Relaxed);
        shared
            .with_core(|core| core.submit_update(now(), header, &values))?
            .map_err(rejected)
    }
}

/// Starts the coordinator on `listener` with `core` and serves until
/// `shutdown` completes. For progress callbacks, use [`CoordinatorService`]
/// and its [`handle`](CoordinatorService::handle) instead.
pub async fn serve(
    listener: TcpListener,
    core: RoundCore,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    CoordinatorService::new(core, opts)
        .serve(listener, shutdown)
        .await
}

fn parse_pseudonym(shared: &Shared, text: &str) -> Result<Pseudonym, Status> {
    text.parse().map_err(|e| shared.reject_at_edge(e))
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let source = ConnectionInfo::of(request.extensions()).map(|c| c.remote);
        if let (Some(limiter), Some(source)) = (&self.shared.joins, source)
            && !limiter.allow(source.ip(), now())
        {
            return Err(self
                .shared
                .reject_at_edge(CoordinatorError::JoinRateLimited {
                    limit: limiter.limit,
                }));
        }
        let request = request.into_inner();
        let token = match &self.shared.tokens {
            Some(tokens) => Some(
                tokens
                    .check(&request.enrollment_token)
                    .map_err(|e| self.shared.reject_at_edge(e))?,
            ),
            None => None,
        };
        let got = request.protocol_version;
        if got != PROTOCOL_VERSION {
            return Err(self
                .shared
                .reject_at_edge(CoordinatorError::ProtocolVersion {
                    got,
                    expected: PROTOCOL_VERSION,
                }));
        }
        let (pseudonym, ttl, max, layout) = self.shared.with_core(|core| {
            (
                core.join(now(), token),
                core.config().auth.session_ttl(),
                core.config().auth.max_sessions_per_token,
                core.layout().to_pb(),
            )
        })?;
        if let Some(sessions) = &self.shared.sessions {
            let session = NewSession {
                pseudonym,
                ttl,
                token: token.map(|_| (auth::digest(&request.enrollment_token), max)),
            };
            let replaced = sessions
                .record(session)
                .await
                .map_err(|e| self.shared.reject_at_edge(e))?;
            if !replaced.is_empty() {
                self.shared.with_core(|core| core.end_replaced(&replaced))?;
            }
        }
        tracing::debug!(%pseudonym, "device joined");
        Ok(Response::new(pb::JoinResponse {
            pseudonym: pseudonym.to_string(),
            protocol_version: PROTOCOL_VERSION,
            session_ttl_secs: ttl.as_secs().max(1),
            catalogue: self.shared.catalogue.clone(),
            layout,
        }))
    }

    async fn check_in(
        &self,
        request: Request<pb::CheckInRequest>,
    ) -> Result<Response<pb::CheckInResponse>, Status> {
        let shared = &self.shared;
        let pseudonym = parse_pseudonym(shared, &request.into_inner().pseudonym)?;
        let until = tokio::time::Instant::now() + shared.long_poll;
        let mut changes = shared.progress.subscribe();
        let mut looked_up = false;
        loop {
            changes.borrow_and_update();
            let now = now();
            let outcome = match shared.with_core(|core| core.check_in(now, &pseudonym))? {
                // A device that joined at another replica: its session is
                // in the store.
                Err(CoordinatorError::UnknownPseudonym) if !looked_up => {
                    looked_up = true;
                    match &shared.sessions {
                        Some(sessions) => match sessions.find(pseudonym).await {
                            Ok(Some(left)) => {
                                shared.with_core(|core| core.admit(now, pseudonym, left))?;
                                continue;
                            }
                            Ok(None) => Err(CoordinatorError::UnknownPseudonym),
                            Err(e) => Err(e),
                        },
                        None => Err(CoordinatorError::UnknownPseudonym),
                    }
                }
                outcome => outcome,
            }
            .map_err(rejected)?;
            if let CheckIn::Wait { .. } = outcome {
                tokio::select! {
                    changed = changes.changed() => {
                        if changed.is_ok() {
                            continue;
                        }
                    }
                    () = tokio::time::sleep_until(until) => {}
                }
                return Ok(Response::new(convert::check_in_response(
                    CheckIn::Wait {
                        retry_after: Duration::ZERO,
                    },
                    now,
                )));
            }
            if let CheckIn::Task(task) = &outcome {
                tracing::debug!(%pseudonym, round = task.round, kind = %task.kind, "task assigned");
            }
            return Ok(Response::new(convert::check_in_response(outcome, now)));
        }
    }

    type DownloadModelStream = Download;

    async fn download_model(
        &self,
        request: Request<pb::ModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        let shared = &self.shared;
        let request = request.into_inner();
        let pseudonym = parse_pseudonym(shared, &request.pseudonym)?;
        let snapshot = shared
            .with_core(|core| core.download(&pseudonym, request.model_version))?
            .map_err(rejected)?;
        let slot = slot(&shared.downloads).await?;
        // The chunks share the snapshot's encoded bytes: encoded once per
        // model version, sent to the whole cohort.
        let mut layout = Some(snapshot.layout.to_pb());
        let mut chunks: Vec<Result<pb::ModelChunk, Status>> = snapshot
            .download
            .chunks(shared.chunk_bytes)
            .map(|chunk| {
                Ok(pb::ModelChunk {
                    model_version: snapshot.version,
                    layout: layout.take().unwrap_or_default(),
                    ..chunk
                })
            })
            .collect();
        if let Some(layout) = layout {
            // An empty model still sends its layout.
            chunks.push(Ok(pb::ModelChunk {
                model_version: snapshot.version,
                layout,
                ..Default::default()
            }));
        }
        shared
            .bytes_out
            .fetch_add(snapshot.download.wire_bytes() as u64, Ordering::Relaxed);
        tracing::debug!(%pseudonym, model_version = snapshot.version, chunks = chunks.len(), "model download");
        Ok(Response::new(Download {
            chunks: chunks.into_iter(),
            _slot: slot,
        }))
    }

    async fn reserve_upload(
        &self,
        request: Request<pb::UpdateHeader>,
    ) -> Result<Response<pb::UploadReservation>, Status> {
        let shared = &self.shared;
        let header =
            UpdateHeader::try_from(request.into_inner()).map_err(|e| shared.reject_at_edge(e))?;
        shared
            .with_core(|core| core.check_update_header(now(), &header))?
            .map_err(rejected)?;
        let _busy = shared.busy(header.pseudonym)?;
        let until = match shared.reserved_until(&header.pseudonym) {
            // Asked again: the same slot, not a second one.
            Some(until) => Some(until),
            None => {
                shared.expire_reservations();
                match tokio::time::timeout(shared.long_poll, slot(&shared.uploads)).await {
                    Ok(permit) => Some(self.reserve(header.pseudonym, permit?)),
                    Err(_) => None,
                }
            }
        };
        let lease = until.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(tokio::time::Instant::now())
        });
        Ok(Response::new(pb::UploadReservation {
            granted: until.is_some(),
            lease_ms: u32::try_from(lease.as_millis()).unwrap_or(u32::MAX),
        }))
    }

    async fn submit_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::UpdateAck>, Status> {
        let mut stream = request.into_inner();
        let accepted = self.receive_update(&mut stream).await?;
        tracing::debug!(
            round = accepted.round,
            accepted = accepted.accepted,
            "update accepted"
        );
        Ok(Response::new(pb::UpdateAck {
            round: accepted.round,
            accepted: u32::try_from(accepted.accepted).unwrap_or(u32::MAX),
        }))
    }

    async fn submit_evaluation(
        &self,
        request: Request<pb::EvaluationReport>,
    ) -> Result<Response<pb::EvaluationAck>, Status> {
        let shared = &self.shared;
        let report = request.into_inner();
        let pseudonym = parse_pseudonym(shared, &report.pseudonym)?;
        let counts = report.counts.map(EvalCounts::from).ok_or_else(|| {
            shared.reject_at_edge(CoordinatorError::Malformed(
                "evaluation report without counts".to_owned(),
            ))
        })?;
        let accepted = shared
            .with_core(|core| {
                core.submit_evaluation(
                    now(),
                    &pseudonym,
                    report.round,
                    report.model_version,
                    counts,
                )
            })?
            .map_err(rejected)?;
        tracing::debug!(%pseudonym, round = accepted.round, accepted = accepted.accepted, "evaluation accepted");
        Ok(Response::new(pb::EvaluationAck {
            round: accepted.round,
        }))
    }

    async fn sec_agg_advertise(
        &self,
        request: Request<pb::SecAggAdvertiseRequest>,
    ) -> Result<Response<pb::SecAggAck>, Status> {
        Ok(Response::new(
            self.secagg_advertise(request.into_inner()).await?,
        ))
    }

    async fn sec_agg_poll(
        &self,
        request: Request<pb::SecAggPollRequest>,
    ) -> Result<Response<pb::SecAggPollResponse>, Status> {
        Ok(Response::new(self.secagg_poll(request.into_inner()).await?))
    }

    async fn sec_agg_share_keys(
        &self,
        request: Request<pb::SecAggShareKeysRequest>,
    ) -> Result<Response<pb::SecAggAck>, Status> {
        Ok(Response::new(
            self.secagg_share_keys(request.into_inner()).await?,
        ))
    }

    async fn sec_agg_masked_input(
        &self,
        request: Request<Streaming<pb::SecAggMaskedChunk>>,
    ) -> Result<Response<pb::SecAggAck>, Status> {
        let mut stream = request.into_inner();
        Ok(Response::new(self.secagg_masked_input(&mut stream).await?))
    }

    async fn sec_agg_unmask(
        &self,
        request: Request<pb::SecAggUnmaskSubmission>,
    ) -> Result<Response<pb::SecAggAck>, Status> {
        Ok(Response::new(
            self.secagg_unmask(request.into_inner()).await?,
        ))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let response = self.shared.with_core(|core| {
            let status = core.status();
            pb::StatusResponse {
                round: status.round,
                model_version: status.model_version,
                finished: status.finished,
                rounds: core.history().iter().map(summary_to_pb).collect(),
                devices: status.joined as u64,
                privacy: core.privacy().map(|m| pb::PrivacyBudget {
                    epsilon: m.epsilon(),
                    delta: m.delta(),
                }),
            }
        })?;
        Ok(Response::new(response))
    }
}
