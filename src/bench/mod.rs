//! `fedrec bench`: speed and memory, each measured next to its limit in the
//! same run (these machines are noisy, so only ratios within one run count).
//!
//! - [`aggregate`]: updates folded into the coordinator's running sum per
//!   second, against a plain read-and-add pass over the same bytes.
//! - [`round`]: whole rounds over loopback gRPC with a real coordinator
//!   process (`fedrec serve`, so its memory is its own) and devices whose
//!   local training takes no time, against a plain tonic stream of the
//!   same bytes ([`loopback`]); the download in any [`Encoding`] (devices
//!   decode it), the upload in f32.
//! - [`device`]: one device's local training time and the process's peak
//!   memory.
//! - [`secagg`]: rounds with and without secure aggregation.
//! - [`idle`]: the coordinator's memory per joined device and per open
//!   connection holding a check-in, and its CPU while they wait.

pub mod idle;
pub mod rates;
pub mod secagg;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use fedrec_coordinator::DOWNLOAD_CHUNK_BYTES;
use fedrec_coordinator::aggregate::Aggregator;
use fedrec_coordinator::config::CoordinatorConfig;
use fedrec_proto::codec::{EncodedModel, Encoding, ModelAssembler};
use fedrec_proto::pb::coordinator_client::CoordinatorClient;
use fedrec_proto::pb::coordinator_server::{Coordinator, CoordinatorServer};
use fedrec_proto::pb::{self, check_in_response::Outcome};
use fedrec_proto::{DEFAULT_CHUNK_BYTES, Layout, PROTOCOL_VERSION, tensor};
use serde::Serialize;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// Throughput of folding updates into the running sum.
#[derive(Clone, Debug, Serialize)]
pub struct AggregateRow {
    /// Updates folded.
    pub updates: usize,
    /// Values per update.
    pub values: usize,
    /// Bytes of updates folded per second by the coordinator's [`Aggregator`].
    pub aggregate_bytes_per_sec: f64,
    /// Bytes per second of a plain loop adding the same bytes into a sum.
    pub plain_bytes_per_sec: f64,
}

impl AggregateRow {
    /// Aggregation speed as a fraction of the plain pass.
    pub fn ratio(&self) -> f64 {
        self.aggregate_bytes_per_sec / self.plain_bytes_per_sec
    }
}

/// Bytes of distinct encoded updates cycled through: more than the caches
/// hold, so every pass reads from memory, as updates arriving from the
/// network would.
const DISTINCT_BYTES: usize = 64 << 20;

/// Folds `updates` updates of `values` values into an [`Aggregator`], and
/// the same bytes into a sum with a plain read-and-add loop.
pub fn aggregate(updates: usize, values: usize) -> anyhow::Result<AggregateRow> {
    let distinct = (DISTINCT_BYTES / (values * 4)).clamp(2, updates);
    let encoded: Vec<Bytes> = (0..distinct)
        .map(|u| {
            let v: Vec<f32> = (0..values).map(|i| ((i + u) % 97) as f32 * 1e-3).collect();
            tensor::encode(&v)
        })
        .collect();
    let bytes = (updates * values * 4) as f64;

    let mut agg = Aggregator::new(values);
    let start = Instant::now();
    for u in 0..updates {
        agg.add(&encoded[u % distinct], 1)?;
    }
    let mean = agg.mean().context("no update aggregated")?;
    let aggregate_secs = start.elapsed().as_secs_f64();

    let mut sum = vec![0.0_f32; values];
    let start = Instant::now();
    for u in 0..updates {
        let b = &encoded[u % distinct];
        for (s, c) in sum.iter_mut().zip(b.chunks_exact(4)) {
            *s += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
    }
    let plain_secs = start.elapsed().as_secs_f64();
    // Both results are used, so neither loop can be optimized away.
    anyhow::ensure!(
        mean.len() == sum.len() && sum.iter().all(|v| v.is_finite()),
        "aggregation produced a wrong result"
    );
    Ok(AggregateRow {
        updates,
        values,
        aggregate_bytes_per_sec: bytes / aggregate_secs,
        plain_bytes_per_sec: bytes / plain_secs,
    })
}

/// One round-benchmark result: the JSON line `fedrec bench round` prints.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRow {
    /// Devices per round.
    pub clients: usize,
    /// Values in the model and in each update.
    pub dim: usize,
    /// Timed rounds.
    pub rounds: u32,
    /// The wire format of the model download.
    pub download_encoding: Encoding,
    /// Bytes of one device's download (values and q8 block parameters).
    pub download_bytes_per_device: usize,
    /// The wire format of the updates.
    pub upload_encoding: Encoding,
    /// Model and update bytes of one round, all devices.
    pub bytes_per_round: usize,
    /// Wall-clock seconds per round, from the first task to the last device's `Finished`.
    pub sec_per_round: f64,
    /// Each round's seconds, from its first task to the next round's first
    /// task (the last round: to the last device's `Finished`). The first
    /// includes warming up (fresh buffers, connection windows growing).
    pub sec_per_round_each: Vec<f64>,
    /// The mean of the rounds after the first (the first if there is only
    /// one): the steady pace.
    pub sec_per_round_after_first: f64,
    /// The coordinator process's peak resident memory (VmHWM).
    pub coordinator_peak_rss_mb: f64,
    /// Model and update bytes moved per second during the timed rounds.
    pub bytes_per_sec: f64,
    /// Seconds the same bytes take through a plain tonic stream ([`loopback`]).
    pub loopback_sec_per_round: Option<f64>,
    /// Latency of the devices' Join requests, all sent at once: p50, p99 (ms).
    pub join_ms: [f64; 2],
    /// How long after a round's first task each of its devices got its
    /// own (the fan-out of a round's start through the held check-ins):
    /// p50, p99 over every device and round (ms).
    pub task_fanout_ms: [f64; 2],
}

/// The p50 and p99 of `samples`, in milliseconds.
fn percentiles_ms(mut samples: Vec<Duration>) -> [f64; 2] {
    if samples.is_empty() {
        return [0.0; 2];
    }
    samples.sort_unstable();
    let at = |p: f64| {
        let i = ((samples.len() - 1) as f64 * p).round() as usize;
        samples[i].as_secs_f64() * 1e3
    };
    [at(0.5), at(0.99)]
}

/// Picks `factors` with `items × (factors + 1) = dim`, preferring 32 values
/// per item (ML-1M × 32 factors is 3,706 × 32 = 118,592).
fn shape(dim: usize) -> anyhow::Result<(usize, usize)> {
    (2..=64)
        .rev()
        .find(|per_item| dim.is_multiple_of(*per_item))
        .map(|per_item| (dim / per_item, per_item - 1))
        .with_context(|| format!("--dim {dim} must be a multiple of some number from 2 to 64"))
}

/// A coordinator process, killed when dropped.
struct ServeProcess {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    fn start(
        base: CoordinatorConfig,
        clients: usize,
        dim: usize,
        rounds: u32,
        wire: Wire,
        args: &[String],
    ) -> anyhow::Result<Self> {
        let (items, factors) = shape(dim)?;
        let mut cfg = base;
        cfg.server.listen = "127.0.0.1:0".into();
        cfg.rounds.rounds = rounds;
        cfg.rounds.clients_per_round = clients;
        cfg.rounds.over_selection = 1.0;
        cfg.rounds.min_updates = clients;
        cfg.rounds.deadline_secs = 3600.0;
        cfg.rounds.checkin_window_secs = 3600.0;
        cfg.rounds.evaluate = false;
        cfg.rounds.final_evaluation = false;
        cfg.model.items = Some(items);
        cfg.model.factors = factors;
        cfg.download.encoding = wire.download;
        cfg.upload.encoding = wire.upload;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bench.toml");
        std::fs::write(&path, toml::to_string(&cfg)?)?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start the coordinator process")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line = lines
                .next()
                .context("the coordinator exited before listening")??;
            if let Some(rest) = line.strip_prefix("coordinator listening on ") {
                break rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
        };
        // Keep draining its stderr so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Self {
            child,
            addr,
            _dir: dir,
        })
    }

    /// The process's peak resident memory (VmHWM), in MB.
    fn peak_rss_mb(&self) -> anyhow::Result<f64> {
        peak_rss_mb(&format!("/proc/{}/status", self.child.id()))
    }

    /// The process's resident memory now (VmRSS), in MB.
    fn rss_mb(&self) -> anyhow::Result<f64> {
        status_mb(&format!("/proc/{}/status", self.child.id()), "VmRSS:")
    }

    /// CPU seconds the process has used (user and system), from
    /// `/proc/PID/stat` in clock ticks of 1/100 s.
    fn cpu_secs(&self) -> anyhow::Result<f64> {
        let path = format!("/proc/{}/stat", self.child.id());
        let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        // Fields after the command name (which is in parentheses).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("no command name in /proc/PID/stat")?
            .1
            .split_whitespace()
            .collect();
        let ticks = |i: usize| -> anyhow::Result<f64> {
            Ok(fields
                .get(i)
                .context("short /proc/PID/stat")?
                .parse::<f64>()?)
        };
        // utime and stime are fields 14 and 15, 12 and 13 after the name.
        Ok((ticks(11)? + ticks(12)?) / 100.0)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Peak resident memory (VmHWM) from a `/proc/*/status` file, in MB.
pub fn peak_rss_mb(status_path: &str) -> anyhow::Result<f64> {
    status_mb(status_path, "VmHWM:")
}

/// A memory line (`VmHWM:`, `VmRSS:`) of a `/proc/*/status` file, in MB.
fn status_mb(status_path: &str, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(status_path)
        .with_context(|| format!("cannot read {status_path} (Linux only)"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} line in {status_path}"))?;
    Ok(kb / 1024.0)
}

/// When one device saw each of its tasks and its `Finished`.
struct DeviceTimes {
    /// Per task: its round and when it arrived.
    tasks: Vec<(u32, Instant)>,
    finished: Instant,
    join: Duration,
}

/// The wire formats of a round benchmark.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wire {
    /// Of the model download.
    pub download: Encoding,
    /// Of the updates.
    pub upload: Encoding,
}

/// The update every benchmark device sends, encoded once (like training,
/// encoding is device work the benchmark leaves out): small values of
/// varied sign and size, so that q8 blocks have real ranges.
fn bench_update(dim: usize, encoding: Encoding) -> EncodedModel {
    let values: Vec<f32> = (0..dim)
        .map(|i| 0.01 * (i as f32 * 0.618).sin() * (1.0 + (i % 7) as f32))
        .collect();
    EncodedModel::for_upload(&values, encoding)
}

/// A device whose local training takes no time: it downloads and decodes
/// the model, uploads `update` and checks in again.
async fn zero_training_device(
    mut client: CoordinatorClient<Channel>,
    update: Arc<EncodedModel>,
) -> anyhow::Result<DeviceTimes> {
    let asked = Instant::now();
    let joined = client
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        })
        .await?
        .into_inner();
    let join = asked.elapsed();
    let pseudonym = joined.pseudonym;
    let mut tasks = Vec::new();
    loop {
        let reply = client
            .check_in(pb::CheckInRequest {
                pseudonym: pseudonym.clone(),
            })
            .await?
            .into_inner();
        match reply.outcome {
            Some(Outcome::Task(task)) => {
                tasks.push((task.round, Instant::now()));
                let mut stream = client
                    .download_model(pb::ModelRequest {
                        pseudonym: pseudonym.clone(),
                        round: task.round,
                        model_version: task.model_version,
                    })
                    .await?
                    .into_inner();
                let mut model: Option<ModelAssembler> = None;
                while let Some(chunk) = stream.message().await? {
                    // The device takes the layout the first chunk announces.
                    model
                        .get_or_insert_with(|| ModelAssembler::new(Layout::from_pb(&chunk.layout)))
                        .add(&chunk)?;
                }
                let model = model.context("an empty download")?.finish()?;
                anyhow::ensure!(
                    model.len() == update.num_values(),
                    "model of {} values",
                    model.len()
                );
                let header = pb::UpdateHeader {
                    pseudonym: pseudonym.clone(),
                    round: task.round,
                    model_version: task.model_version,
                    num_examples: 1,
                    num_values: update.num_values() as u64,
                    evaluation: None,
                };
                let chunks = update.update_chunks(header, DEFAULT_CHUNK_BYTES);
                fedrec_proto::reserve_and_upload(&mut client, chunks, |_| {}).await?;
            }
            Some(Outcome::Wait(w)) => {
                tokio::time::sleep(Duration::from_millis(w.retry_after_ms.into())).await;
            }
            Some(Outcome::Finished(_)) | None => break,
        }
    }
    anyhow::ensure!(!tasks.is_empty(), "the device never got a task");
    Ok(DeviceTimes {
        tasks,
        finished: Instant::now(),
        join,
    })
}

/// How the benchmarked coordinator keeps its state.
#[derive(Clone, Debug, Default)]
pub struct Deployment {
    /// One process writing its checkpoint file after every round.
    pub checkpoint: bool,
    /// Replicas on this PostgreSQL store (a fresh task for each run)
    /// instead of one process.
    pub store: Option<String>,
    /// Replicas to start with `store` (at least 1).
    pub replicas: usize,
}

impl Deployment {
    /// The `fedrec serve` arguments of each process: one list per process.
    fn processes(&self, dir: &std::path::Path) -> Vec<Vec<String>> {
        match &self.store {
            Some(store) => {
                let task = format!(
                    "bench-{}-{}",
                    std::process::id(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_micros())
                );
                (1..=self.replicas.max(1))
                    .map(|i| {
                        let args = ["--store", store, "--replica", &format!("r{i}")];
                        let mut args: Vec<String> = args.map(str::to_owned).to_vec();
                        args.extend(["--task".to_owned(), task.clone()]);
                        args
                    })
                    .collect()
            }
            None if self.checkpoint => vec![vec![
                "--checkpoint".to_owned(),
                dir.join("bench.ckpt").display().to_string(),
            ]],
            None => vec![Vec::new()],
        }
    }
}

/// Runs `rounds` rounds of FedAvg with `clients` zero-training devices and a
/// model of `dim` values against a coordinator in its own process (or
/// replicas on a store, each serving an equal share of the devices, as
/// `deployment` says), configured as `base` (its `[server]` limits, say)
/// apart from what the benchmark sets: the listener, rounds, cohort, model
/// size and wire formats. The peak memory reported is the largest
/// process's.
pub fn round(
    base: CoordinatorConfig,
    clients: usize,
    dim: usize,
    rounds: u32,
    with_loopback: bool,
    wire: Wire,
    deployment: &Deployment,
) -> anyhow::Result<RoundRow> {
    if clients == 0 || rounds == 0 {
        bail!("--clients and --rounds must be >= 1");
    }
    let dir = tempfile::tempdir()?;
    let servers = deployment
        .processes(dir.path())
        .iter()
        .map(|args| ServeProcess::start(base.clone(), clients, dim, rounds, wire, args))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let update = Arc::new(bench_update(dim, wire.upload));
    let times = runtime.block_on(async {
        let mut channels = Vec::new();
        for server in &servers {
            channels.push(crate::sim::connect(&server.addr, crate::sim::SIM_CONNECTIONS).await?);
        }
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let mine = &channels[i % channels.len()];
                let channel = mine[(i / channels.len()) % mine.len()].clone();
                let client = CoordinatorClient::new(channel);
                tokio::spawn(zero_training_device(client, Arc::clone(&update)))
            })
            .collect();
        let mut times = Vec::with_capacity(clients);
        for t in tasks {
            times.push(t.await??);
        }
        anyhow::Ok(times)
    })?;
    let end = times
        .iter()
        .map(|t| t.finished)
        .max()
        .context("no device")?;
    // When each round's first task arrived, by round.
    let mut first_tasks = std::collections::BTreeMap::new();
    for (round, at) in times.iter().flat_map(|t| &t.tasks) {
        first_tasks
            .entry(*round)
            .and_modify(|s: &mut Instant| *s = (*s).min(*at))
            .or_insert(*at);
    }
    let starts: Vec<Instant> = first_tasks.values().copied().collect();
    anyhow::ensure!(
        starts.len() == rounds as usize,
        "the devices saw tasks of {} rounds, not {rounds}",
        starts.len()
    );
    let start = *starts.first().context("no device")?;
    let sec_per_round = (end - start).as_secs_f64() / f64::from(rounds);
    let sec_per_round_each: Vec<f64> = starts
        .iter()
        .zip(starts.iter().skip(1).chain([&end]))
        .map(|(a, b)| (*b - *a).as_secs_f64())
        .collect();
    let steady = &sec_per_round_each[usize::from(sec_per_round_each.len() > 1)..];
    let sec_per_round_after_first = steady.iter().sum::<f64>() / steady.len() as f64;
    let coordinator_peak_rss_mb = servers
        .iter()
        .map(ServeProcess::peak_rss_mb)
        .collect::<anyhow::Result<Vec<f64>>>()?
        .into_iter()
        .fold(0.0, f64::max);
    drop(servers);
    let download_bytes_per_device = wire.download.wire_bytes(dim);
    let bytes_per_round =
        clients * (download_bytes_per_device + wire.upload.upload_wire_bytes(dim));
    let loopback_sec_per_round = if with_loopback {
        Some(runtime.block_on(loopback(clients, dim, wire))?)
    } else {
        None
    };
    Ok(RoundRow {
        clients,
        dim,
        rounds,
        download_encoding: wire.download,
        download_bytes_per_device,
        upload_encoding: wire.upload,
        bytes_per_round,
        sec_per_round,
        sec_per_round_each,
        sec_per_round_after_first,
        coordinator_peak_rss_mb,
        bytes_per_sec: bytes_per_round as f64 / sec_per_round,
        loopback_sec_per_round,
        join_ms: percentiles_ms(times.iter().map(|t| t.join).collect()),
        task_fanout_ms: percentiles_ms(
            times
                .iter()
                .flat_map(|t| &t.tasks)
                .map(|(round, at)| *at - first_tasks[round])
                .collect(),
        ),
    })
}

/// A tonic service that only streams bytes: `DownloadModel` sends the same
/// chunks to everyone, `SubmitUpdate` reads and drops what it gets.
struct Sink {
    model: EncodedModel,
}

#[tonic::async_trait]
impl Coordinator for Sink {
    async fn join(
        &self,
        _: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        Err(Status::unimplemented("loopback sink"))
    }
    async fn check_in(
        &self,
        _: Request<pb::CheckInRequest>,
    ) -> Result<Response<pb::CheckInResponse>, Status> {
        Err(Status::unimplemented("loopback sink"))
    }
    type DownloadModelStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;
    async fn download_model(
        &self,
        _: Request<pb::ModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        let chunks: Vec<Result<pb::ModelChunk, Status>> =
            self.model.chunks(DOWNLOAD_CHUNK_BYTES).map(Ok).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
    async fn reserve_upload(
        &self,
        _: Request<pb::UpdateHeader>,
    ) -> Result<Response<pb::UploadReservation>, Status> {
        Err(Status::unimplemented("loopback sink"))
    }
    async fn submit_update(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::UpdateAck>, Status> {
        let mut stream = request.into_inner();
        while let Some(chunk) = stream.next().await {
            chunk?;
        }
        Ok(Response::new(pb::UpdateAck::default()))
    }
    async fn submit_evaluation(
        &self,
        _: Request<pb::EvaluationReport>,
    ) -> Result<Response<pb::EvaluationAck>, Status> {
        Err(Status::unimplemented("loopback sink"))
    }
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Err(Status::unimplemented("loopback sink"))
    }
    async fn sec_agg_advertise(
        &self,
        _: Request<pb::SecAggAdvertiseRequest>,
    ) -> Result<Response<pb::SecAggAck>, Status> {
        Err(Status::unimplemented("loopback sink"))
    }
    async fn sec_agg_poll(
        &self,
        _: Request<pb::SecAggPollRequest>,
    ) -> Result<Response<pb::SecAggPollResponse>, Status> {
        Err(Status::unimplemented("loopback sink"))
    }
    async fn sec_agg_share_keys(
        &self,
        _: Request<pb::SecAggShareKeysRequest>,
    ) -> Result<Response<pb::SecAggAck>, Status> {
        Err(Status::unimplemented("loopback sink"))
    }
    async fn sec_agg_masked_input(
        &self,
        _: Request<Streaming<pb::SecAggMaskedChunk>>,
    ) -> Result<Response<pb::SecAggAck>, Status> {
        Err(Status::unimplemented("loopback sink"))
    }
    async fn sec_agg_unmask(
        &self,
        _: Request<pb::SecAggUnmaskSubmission>,
    ) -> Result<Response<pb::SecAggAck>, Status> {
        Err(Status::unimplemented("loopback sink"))
    }
}

/// Seconds for `clients` devices to download `dim` values each and upload
/// as many, in the `wire` encodings, through a plain tonic stream (the same
/// messages and chunking as a round, with no coordinator logic and no
/// decoding): the network limit of a round.
pub async fn loopback(clients: usize, dim: usize, wire: Wire) -> anyhow::Result<f64> {
    let zeros = vec![0.0_f32; dim];
    let download_bytes = wire.download.wire_bytes(dim);
    let update = Arc::new(bench_update(dim, wire.upload));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let server = CoordinatorServer::new(Sink {
        model: EncodedModel::new(&zeros, wire.download),
    })
    .max_decoding_message_size(DEFAULT_CHUNK_BYTES + 64 * 1024);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(
        fedrec_proto::server_builder()
            .add_service(server)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let channels = crate::sim::connect(&addr, crate::sim::SIM_CONNECTIONS).await?;
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let mut client = CoordinatorClient::new(channels[i % channels.len()].clone());
            let update = Arc::clone(&update);
            tokio::spawn(async move {
                let mut stream = client
                    .download_model(pb::ModelRequest::default())
                    .await?
                    .into_inner();
                let mut received = 0;
                while let Some(chunk) = stream.message().await? {
                    received += chunk.values.len()
                        + chunk.q8.map_or(0, |q| 4 * (q.min.len() + q.scale.len()));
                }
                anyhow::ensure!(received == download_bytes, "short download");
                let chunks = update.update_chunks(pb::UpdateHeader::default(), DEFAULT_CHUNK_BYTES);
                client.submit_update(tokio_stream::iter(chunks)).await?;
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = stop.send(());
    serving.await??;
    Ok(secs)
}

/// Local training time of one device per round.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceRow {
    /// Users of the generated data set.
    pub users: usize,
    /// Items of the generated data set.
    pub items: usize,
    /// Devices timed.
    pub devices: usize,
    /// Values of the global model.
    pub model_values: usize,
    /// Mean milliseconds of one local training.
    pub mean_ms: f64,
    /// Median milliseconds.
    pub p50_ms: f64,
    /// 99th-percentile milliseconds.
    pub p99_ms: f64,
    /// Threads of the parallel pass (rayon's pool: one per core unless
    /// `RAYON_NUM_THREADS` says otherwise).
    pub threads: usize,
    /// Trainings of the parallel pass: the timed devices trained again,
    /// on every thread at once, several times over.
    pub parallel_trainings: usize,
    /// Trainings per second of the parallel pass: the device-compute bound
    /// of a simulation on this machine. Cores share caches, memory
    /// bandwidth and clock, so it is usually below `threads × 1000 /
    /// mean_ms`; each pass also waits for its slowest device.
    pub parallel_per_second: f64,
    /// Peak memory of this whole process (generated data set, every timed
    /// device and the model): an upper bound for one device's.
    pub process_peak_rss_mb: f64,
}

/// Times one round of local training (the movielens preset: ALS loss, 32
/// factors) on `devices` devices of a generated data set of the given size.
pub fn device(
    users: usize,
    items: usize,
    history: f64,
    devices: usize,
) -> anyhow::Result<DeviceRow> {
    use fedrec_client::model::{MatrixFactorization, Model};
    use rand::SeedableRng;
    let ds = crate::data::synthetic(&crate::data::SyntheticConfig {
        users,
        items,
        mean_history: history,
        ..crate::data::SyntheticConfig::default()
    })?;
    let protocol = crate::data::Protocol::new(&ds);
    let ev = protocol
        .evaluations
        .first()
        .context("the generated data set has no evaluation event")?;
    let cut = &protocol.cuts[ev.cut];
    let (cfg, _) = crate::sim::Preset::Movielens.config();
    let mf = MatrixFactorization::new(ds.n_items(), cfg.model.factors, cfg.model.init_std)?;
    let global = mf.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.model.seed));
    let model: Arc<dyn Model> = Arc::new(mf);
    // What a training task of the preset asks of a device.
    let training = fedrec_client::model::LocalTraining {
        user_moment: cfg.strategy.name == fedrec_coordinator::config::StrategyName::Als,
        ..crate::sim::device_training(&cfg.training)
    };
    let moment = if training.user_moment {
        fedrec_proto::symmetric::upper_len(cfg.model.factors)
    } else {
        0
    };
    let step = (cut.n_users() / devices.max(1)).max(1);
    let mut ms = Vec::with_capacity(devices);
    let mut timed = Vec::with_capacity(devices);
    for user in (0..cut.n_users()).step_by(step).take(devices) {
        let mut device = crate::sim::make_device(&model, &protocol, ev, user, 7)?;
        let start = Instant::now();
        let update = device.train(&global, &training, false)?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            update.delta.len() == global.len() + moment,
            "update of the wrong size"
        );
        timed.push(device);
    }
    // The same trainings on every thread at once, enough passes for about
    // a second of work on one core.
    let passes = (1000.0 / ms.iter().sum::<f64>().max(1e-3))
        .ceil()
        .clamp(1.0, 100.0) as usize;
    let start = Instant::now();
    let mut parallel_trainings = 0;
    for _ in 0..passes {
        use rayon::prelude::*;
        parallel_trainings += timed
            .par_iter_mut()
            .map(|d| d.train(&global, &training, false).map(|_| 1))
            .sum::<Result<usize, _>>()?;
    }
    let parallel_per_second = parallel_trainings as f64 / start.elapsed().as_secs_f64();
    ms.sort_by(f64::total_cmp);
    let pick = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    Ok(DeviceRow {
        users,
        items,
        devices: ms.len(),
        model_values: global.len(),
        mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        threads: rayon::current_num_threads(),
        parallel_trainings,
        parallel_per_second,
        process_peak_rss_mb: peak_rss_mb("/proc/self/status")?,
    })
}

#[cfg(test)]
mod tests {
    /// `fedrec bench device` times every device it asks for, one at a time
    /// and then all at once.
    #[test]
    fn device_bench_times_each_device_and_the_parallel_pass() {
        let row = super::device(300, 200, 20.0, 12).unwrap();
        assert_eq!((row.users, row.items, row.devices), (300, 200, 12));
        assert!(row.p50_ms > 0.0 && row.p50_ms <= row.p99_ms, "{row:?}");
        assert!(
            row.parallel_trainings >= 12 && row.parallel_trainings.is_multiple_of(12),
            "whole passes over the timed devices: {row:?}"
        );
        assert!(row.parallel_per_second.is_finite() && row.parallel_per_second > 0.0);
    }
}
