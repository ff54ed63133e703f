//! The `fedrec` command line: simulate, serve, client, split, gen-data, bench.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use fedrec::data::{self, Dataset, Format, LoadOptions, SyntheticConfig};
use fedrec::sim::{self, Observer, Report, RoundRow, SimConfig, Transport};
use fedrec_coordinator::config::{
    Aggregation, CoordinatorConfig, DpMode, LossName, Schedule, StrategyName, Weighting,
};
use fedrec_proto::codec::Encoding;
use indicatif::{ProgressBar, ProgressStyle};

/// Federated recommendation: devices train on their own purchases; a
/// coordinator combines only their model updates.
#[derive(Parser, Debug)]
#[command(
    name = "fedrec",
    version,
    about,
    after_help = "Logs go to stderr at the warn level; RUST_LOG=info (or debug) shows more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Simulate federated training: one virtual device per user, a real
    /// coordinator, and a comparison with centralized and popularity baselines.
    Simulate(SimulateArgs),
    /// Run a standalone coordinator until Ctrl-C.
    Serve(ServeArgs),
    /// Run one device: take part in rounds with a coordinator using one
    /// user's history from a data file.
    Client(ClientArgs),
    /// Write the global model of a `serve --checkpoint` file for serving
    /// (safetensors: item ids, embeddings, biases).
    Export(ExportArgs),
    /// Write the leave-one-out split (training pairs, held-out items and the
    /// sampled candidates) for comparing external baselines on it.
    Split(SplitArgs),
    /// Fit the buy-again score's weights on a data set's validation re-buys
    /// and print them (how the SDK's default weights were made).
    FitRepeat(FitRepeatArgs),
    /// Write a synthetic data set in MovieLens u.data layout (user, item, 1, time;
    /// numeric ids from 1).
    GenData(GenDataArgs),
    /// Measure speed and memory next to their limits (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write a development CA, a server certificate and device certificates
    /// (PEM) for trying TLS and mutual TLS, and print the commands to use them.
    Certs(CertsArgs),
    /// Write enrollment tokens for devices (one file each) and the file of
    /// their digests for the coordinator (--enrollment-tokens).
    Tokens(TokensArgs),
    /// Plan a differential-privacy budget: the epsilon of T rounds of
    /// DP-FedAvg (Poisson sampling rate q, noise multiplier z) at delta, or
    /// with --epsilon the noise multiplier that stays within it.
    Privacy(PrivacyArgs),
}

#[derive(Args, Debug)]
struct CertsArgs {
    /// Directory to write ca.pem, server.pem/.key and device-N.pem/.key into
    /// (created if needed; existing files are replaced).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Device certificates to make (device-1 … device-N).
    #[arg(long, value_name = "N", default_value_t = fedrec::certs::DEFAULT_DEVICES)]
    devices: usize,
    /// Days the certificates stay valid.
    #[arg(long, value_name = "D", default_value_t = fedrec::certs::DEFAULT_DAYS)]
    days: u32,
    /// The coordinator's names (DNS names or IP addresses), comma separated:
    /// devices must connect by one of them.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',', default_values_t = fedrec::certs::DEFAULT_SANS.map(String::from))]
    san: Vec<String>,
}

#[derive(Args, Debug)]
struct PrivacyArgs {
    /// Probability that a device is in a round's cohort.
    #[arg(long)]
    sampling_rate: f64,
    /// Rounds of training.
    #[arg(long)]
    rounds: u64,
    /// Target delta (e.g. below 1 / number of users).
    #[arg(long)]
    delta: f64,
    /// Noise standard deviation over the clipping norm; prints epsilon.
    #[arg(long, conflicts_with = "epsilon", required_unless_present = "epsilon")]
    noise_multiplier: Option<f64>,
    /// Privacy budget; prints the noise multiplier needed.
    #[arg(long)]
    epsilon: Option<f64>,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Aggregation throughput for 100 and 1,000 updates of 118,592 and
    /// 1,000,000 values, next to a plain read-and-add pass.
    Aggregate,
    /// Rounds of FedAvg over loopback gRPC with a coordinator process and
    /// devices that train in no time; prints one JSON line last.
    Round(BenchRoundArgs),
    /// Local training time per device per round and peak memory, on
    /// generated data of MovieLens-1M's size under the movielens preset.
    Device(BenchDeviceArgs),
    /// Round time and coordinator memory with and without secure
    /// aggregation, in process (real coordinator core and device state
    /// machines, local training stubbed), for each cohort and update size.
    Secagg(SecaggBenchArgs),
    /// The coordinator's memory per joined device and per open connection
    /// holding a check-in, and its CPU while they wait (a `fedrec serve`
    /// process; this process is the devices). Needs `ulimit -n` above
    /// --connections in both.
    Idle(BenchIdleArgs),
}

#[derive(Args, Debug)]
struct BenchIdleArgs {
    /// Devices that join over a few connections and go quiet.
    #[arg(long, default_value_t = 100_000)]
    joined: usize,
    /// Devices on a connection of their own, each holding a check-in.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Seconds over which the coordinator's CPU is measured while they wait.
    #[arg(long, default_value_t = 10.0)]
    wait_secs: f64,
    /// Coordinator configuration to start from (its [server] limits).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BenchRoundArgs {
    /// Devices per round (all connect before the timing starts).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Values in the model and in each update.
    #[arg(long, default_value_t = 118_592)]
    dim: usize,
    /// Timed rounds.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Also time the same bytes through a plain tonic stream.
    #[arg(long)]
    loopback: bool,
    /// Wire format of the model download: f32, f16 or q8.
    #[arg(long, value_name = "ENCODING", default_value = "f32", value_parser = parse_name::<Encoding>)]
    download_encoding: Encoding,
    /// Wire format of the updates: f32, f16 or q8.
    #[arg(long, value_name = "ENCODING", default_value = "f32", value_parser = parse_name::<Encoding>)]
    upload_encoding: Encoding,
    /// Coordinator configuration to start from, e.g. for its [server] limits
    /// (the benchmark sets the listener, rounds, cohort, model size and wire
    /// formats). Default: the built-in defaults.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct BenchDeviceArgs {
    /// Users of the generated data (MovieLens-1M: 6,040).
    #[arg(long, default_value_t = 6040)]
    users: usize,
    /// Items (MovieLens-1M: 3,706).
    #[arg(long, default_value_t = 3706)]
    items: usize,
    /// Mean interactions per user (MovieLens-1M: 165.6).
    #[arg(long, default_value_t = 165.6)]
    history: f64,
    /// Devices timed.
    #[arg(long, default_value_t = 200)]
    devices: usize,
}

#[derive(Args, Debug)]
struct SecaggBenchArgs {
    /// Cohort sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = fedrec::bench::secagg::DEFAULT_COHORTS)]
    cohorts: Vec<usize>,
    /// Update sizes (values), comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = fedrec::bench::secagg::DEFAULT_SIZES)]
    sizes: Vec<usize>,
    /// Threads simulating the devices (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Seed of the stub updates, cohorts and keys.
    #[arg(long, default_value_t = sim::DEFAULT_SEED)]
    seed: u64,
    /// Rounds per configuration and protocol; the fastest is reported.
    #[arg(long, default_value_t = fedrec::bench::secagg::DEFAULT_REPEATS)]
    repeats: usize,
    /// Also write the rows as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// Where interactions come from.
#[derive(Args, Debug, Clone)]
struct DataArgs {
    /// Interaction file or directory (MovieLens u.data / ratings.dat /
    /// ratings.csv, UCI Online Retail CSV, any CSV/TSV with --user-col and
    /// --item-col, or one line per user "<user> <item> <item> ..."). Without
    /// it: generated data (the embedded default).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Force the format instead of detecting it: movielens, movielens-dat,
    /// movielens-csv, retail, columns, sequences.
    #[arg(long)]
    format: Option<Format>,
    /// Name of the user column (generic CSV/TSV).
    #[arg(long)]
    user_col: Option<String>,
    /// Name of the item column (generic CSV/TSV).
    #[arg(long)]
    item_col: Option<String>,
    /// Name of the time column (generic CSV/TSV; Unix seconds or a date/time).
    /// Without it, interactions are ordered by their position in the files.
    #[arg(long)]
    time_col: Option<String>,
    /// The strftime layout (chrono syntax) every time of --time-col (or
    /// retail's InvoiceDate) must match, e.g. --time-format '%d.%m.%Y %H:%M';
    /// a date-only layout gives midnight UTC. Without it: Unix seconds, ISO
    /// 8601, or day/month/year dates whose order is detected from the data.
    #[arg(long)]
    time_format: Option<String>,
    /// Users of the generated data set (without --data).
    #[arg(long, default_value_t = SyntheticConfig::default().users)]
    synthetic_users: usize,
    /// Items of the generated data set (without --data).
    #[arg(long, default_value_t = SyntheticConfig::default().items)]
    synthetic_items: usize,
    /// Mean purchases per user of the generated data set (without --data).
    #[arg(long, default_value_t = SyntheticConfig::default().mean_history)]
    synthetic_history: f64,
}

impl DataArgs {
    fn load(&self, seed: u64) -> anyhow::Result<Dataset> {
        match &self.data {
            Some(path) => {
                let opts = LoadOptions {
                    format: self.format,
                    user_col: self.user_col.clone(),
                    item_col: self.item_col.clone(),
                    time_col: self.time_col.clone(),
                    time_format: self.time_format.clone(),
                };
                Ok(data::load(path, &opts)?)
            }
            None => Ok(data::synthetic(&SyntheticConfig {
                users: self.synthetic_users,
                items: self.synthetic_items,
                mean_history: self.synthetic_history,
                seed,
                ..SyntheticConfig::default()
            })?),
        }
    }
}

/// Flags that override the coordinator configuration file.
#[derive(Args, Debug)]
struct ConfigOverrides {
    /// Training rounds [simulate's default: 100; serve's: the config's, 0 = forever].
    #[arg(long)]
    rounds: Option<u32>,
    /// Devices selected per round [simulate's default: 100; serve's: 10].
    #[arg(long)]
    clients_per_round: Option<usize>,
    /// Fewest updates a round needs (rounds.min_updates); under distributed
    /// DP, the noise of this many devices makes up the promised noise.
    #[arg(long)]
    min_updates: Option<usize>,
    /// Local epochs per round on each device.
    #[arg(long)]
    local_epochs: Option<u32>,
    /// Latent factors of the model.
    #[arg(long)]
    factors: Option<usize>,
    /// Local learning rate [default: 0.05].
    #[arg(long)]
    lr: Option<f32>,
    /// L2 regularization.
    #[arg(long)]
    reg: Option<f32>,
    /// Server-side strategy: fedavg, fedavgm, fedadam, fedyogi, fedadagrad,
    /// als (the ALS loss's curvature-preconditioned step; needs --loss als).
    #[arg(long, value_parser = parse_name::<StrategyName>)]
    strategy: Option<StrategyName>,
    /// Server learning rate of the strategy.
    #[arg(long)]
    server_lr: Option<f32>,
    /// FedAdam, FedYogi, FedAdagrad: the adaptivity tau (added to the root
    /// of the second moment).
    #[arg(long)]
    tau: Option<f32>,
    /// FedProx proximal weight mu for local training (0 = off).
    #[arg(long)]
    proximal_mu: Option<f32>,
    /// Training objective on the devices: bpr or als.
    #[arg(long, value_parser = parse_name::<LossName>)]
    loss: Option<LossName>,
    /// Confidence of a purchase under the als loss.
    #[arg(long)]
    confidence: Option<f32>,
    /// Weight of each update in the round's mean: examples or uniform.
    #[arg(long, value_parser = parse_name::<Weighting>)]
    weighting: Option<Weighting>,
    /// Server learning-rate schedule over the rounds: constant or cosine.
    #[arg(long, value_parser = parse_name::<Schedule>)]
    schedule: Option<Schedule>,
    /// Run training rounds through secure aggregation (the coordinator
    /// learns only each cohort's sum); sets secure_aggregation.enabled.
    #[arg(long)]
    secure_aggregation: bool,
    /// Secure aggregation: clip update values to [-X, X] before quantizing.
    #[arg(long, value_name = "X")]
    secagg_range: Option<f32>,
    /// Secure aggregation: bits per quantized value.
    #[arg(long, value_name = "BITS")]
    secagg_bits: Option<u32>,
    /// Secure aggregation: neighbours per device (default 2·⌈log2 n⌉).
    #[arg(long, value_name = "K")]
    secagg_neighbours: Option<usize>,
    /// Secure aggregation: shares needed per secret, as a fraction of the
    /// neighbours, in (0.5, 1].
    #[arg(long, value_name = "FRACTION")]
    secagg_threshold: Option<f64>,
    /// User-level differential privacy (DP-FedAvg): central (the
    /// coordinator adds the noise) or distributed (devices add it before
    /// secure aggregation). Sets privacy.mode and, unless --weighting is
    /// given, uniform weighting.
    #[arg(long, value_name = "MODE", value_parser = parse_name::<DpMode>)]
    dp: Option<DpMode>,
    /// DP: noise multiplier z (noise std = z × clip).
    #[arg(long, value_name = "Z")]
    noise_multiplier: Option<f64>,
    /// DP: L2 bound C of each device's update (the start under --adaptive-clip).
    #[arg(long, value_name = "C")]
    clip: Option<f32>,
    /// DP: Poisson sampling rate q (simulate's default: clients per round
    /// over devices).
    #[arg(long, value_name = "Q")]
    sampling_rate: Option<f64>,
    /// DP: the largest epsilon training may spend; rounds past it are refused.
    #[arg(long, value_name = "EPSILON")]
    epsilon_budget: Option<f64>,
    /// DP: delta of the stated (epsilon, delta).
    #[arg(long, value_name = "DELTA")]
    delta: Option<f64>,
    /// DP: adapt the clipping bound to the median update norm (Andrew et al. 2021).
    #[arg(long)]
    adaptive_clip: bool,
    /// How updates are combined: mean, trimmed_mean or median (robust to
    /// broken or hostile devices; plain rounds only).
    #[arg(long, value_parser = parse_name::<Aggregation>)]
    aggregation: Option<Aggregation>,
    /// Under trimmed_mean: the fraction dropped at each end per coordinate.
    #[arg(long, value_name = "FRACTION")]
    trim_fraction: Option<f64>,
    /// Scale every plain update down to at most this L2 norm.
    #[arg(long, value_name = "C")]
    norm_bound: Option<f32>,
    /// Wire format of model downloads: f32 (exact), f16 (IEEE half) or q8
    /// (8-bit, per block of 256 values); sets download.encoding.
    #[arg(long, value_name = "ENCODING", value_parser = parse_name::<Encoding>)]
    download_encoding: Option<Encoding>,
    /// Wire format of updates in plain rounds: f32, f16 or q8 (as for
    /// downloads); sets upload.encoding.
    #[arg(long, value_name = "ENCODING", value_parser = parse_name::<Encoding>)]
    upload_encoding: Option<Encoding>,
}

impl ConfigOverrides {
    fn apply(&self, cfg: &mut CoordinatorConfig) {
        let r = &mut cfg.rounds;
        if let Some(v) = self.rounds {
            r.rounds = v;
        }
        if let Some(v) = self.clients_per_round {
            r.clients_per_round = v;
        }
        if let Some(v) = self.min_updates {
            r.min_updates = v;
        }
        let t = &mut cfg.training;
        if let Some(v) = self.local_epochs {
            t.local_epochs = v;
        }
        if let Some(v) = self.lr {
            t.learning_rate = v;
        }
        if let Some(v) = self.reg {
            t.regularization = v;
        }
        if let Some(v) = self.proximal_mu {
            t.proximal_mu = v;
        }
        if let Some(v) = self.loss {
            t.loss = v;
        }
        if let Some(v) = self.confidence {
            t.confidence = v;
        }
        if let Some(v) = self.weighting {
            cfg.strategy.weighting = v;
        }
        if let Some(v) = self.schedule {
            cfg.strategy.schedule = v;
        }
        if let Some(v) = self.factors {
            cfg.model.factors = v;
        }
        if let Some(v) = self.dp {
            cfg.privacy.mode = v;
            if self.weighting.is_none() && v != DpMode::Off {
                cfg.strategy.weighting = Weighting::Uniform;
            }
            if v != DpMode::Off && cfg.strategy.name == StrategyName::Als && self.strategy.is_none()
            {
                fedrec::sim::als_under_privacy(cfg);
                eprintln!(
                    "note: the als server step does not work under differential privacy; \
                     using fedadam (server_lr {}, tau {}) instead (--strategy to choose another)",
                    cfg.strategy.server_lr, cfg.strategy.tau
                );
            }
        }
        if let Some(v) = self.strategy {
            cfg.strategy.name = v;
        }
        if let Some(v) = self.server_lr {
            cfg.strategy.server_lr = v;
        }
        if let Some(v) = self.tau {
            cfg.strategy.tau = v;
        }
        let sa = &mut cfg.secure_aggregation;
        if self.secure_aggregation {
            sa.enabled = true;
        }
        if let Some(v) = self.secagg_range {
            sa.range = v;
        }
        if let Some(v) = self.secagg_bits {
            sa.bits = v;
        }
        if let Some(v) = self.secagg_neighbours {
            sa.neighbours = Some(v);
        }
        if let Some(v) = self.secagg_threshold {
            sa.threshold = v;
        }
        let p = &mut cfg.privacy;
        if let Some(v) = self.noise_multiplier {
            p.noise_multiplier = v;
        }
        if let Some(v) = self.clip {
            p.clip = v;
        }
        if let Some(v) = self.sampling_rate {
            p.sampling_rate = Some(v);
        }
        if let Some(v) = self.epsilon_budget {
            p.epsilon_budget = Some(v);
        }
        if let Some(v) = self.delta {
            p.delta = v;
        }
        if self.adaptive_clip {
            p.adaptive_clip = true;
        }
        let st = &mut cfg.strategy;
        if let Some(v) = self.aggregation {
            st.aggregation = v;
        }
        if let Some(v) = self.trim_fraction {
            st.trim_fraction = v;
        }
        if let Some(v) = self.norm_bound {
            st.norm_bound = Some(v);
        }
        if let Some(v) = self.download_encoding {
            cfg.download.encoding = v;
        }
        if let Some(v) = self.upload_encoding {
            cfg.upload.encoding = v;
        }
    }
}

#[derive(Args, Debug)]
struct SimulateArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Coordinator configuration file (TOML); the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: ConfigOverrides,
    /// Epochs of the centralized baseline (ALS iterations under the als
    /// loss). Default: 40, or the preset's.
    #[arg(long)]
    centralized_epochs: Option<u32>,
    /// Start from a named configuration that reaches centralized quality on
    /// that kind of data (movielens, retail); --config cannot be combined
    /// with it, the flags above still override it.
    #[arg(long, value_enum, conflicts_with = "config")]
    preset: Option<sim::Preset>,
    /// Seed of everything random.
    #[arg(long, default_value_t = sim::DEFAULT_SEED)]
    seed: u64,
    /// Which baselines run beside fedrec: full (popularity, personal
    /// frequency, recency, and item-KNN and EASE tuned on the validation
    /// event) or quick (the first three). Default: full with a preset or up
    /// to 2,000 items, quick otherwise.
    #[arg(long, value_enum)]
    baselines: Option<sim::Baselines>,
    /// grpc: real gRPC over loopback; inproc: the same core without sockets.
    #[arg(long, value_enum, default_value_t = Transport::Grpc)]
    transport: Transport,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Draw HR@10 and NDCG@10 per round, with the baselines, into this SVG
    /// file (with --sweep-noise: against epsilon).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// With --dp: the privacy-utility trade-off. Runs once without DP, then
    /// once per noise multiplier listed, and prints (--report: JSON, --plot:
    /// SVG) HR@10 and NDCG@10 against the epsilon each spent.
    #[arg(long, value_name = "Z1,Z2,…", value_delimiter = ',', requires = "dp")]
    sweep_noise: Option<Vec<f64>>,
    /// Make some devices misbehave (in-process plain rounds): scale (their
    /// update times 100) or noise (standard normal values).
    #[arg(long, value_enum, requires = "attack_fraction")]
    attack: Option<sim::AttackKind>,
    /// The fraction of devices that misbehave under --attack.
    #[arg(long, value_name = "FRACTION")]
    attack_fraction: Option<f64>,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Coordinator configuration file (TOML). Without it: the defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:50051 (overrides server.listen).
    #[arg(long)]
    listen: Option<String>,
    /// Items in the catalogue, whose ids are 1 to N as `fedrec gen-data` and
    /// MovieLens number them (overrides model.items).
    #[arg(long, value_name = "N")]
    items: Option<usize>,
    /// The catalogue as a file of item ids, one a line, in model order
    /// (for data whose ids are not 1 to N). Devices map their purchases into it.
    #[arg(long, value_name = "FILE", conflicts_with = "items")]
    catalogue: Option<PathBuf>,
    /// Save the coordinator's state to this file after every ended round,
    /// and resume from it when it exists (crash recovery).
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Serve over TLS with this certificate (PEM; overrides tls.cert).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM; overrides tls.key).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only devices presenting a certificate signed by
    /// this CA (PEM; overrides tls.client_ca).
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// Admit only devices that join with an enrollment token whose SHA-256
    /// digest is in FILE (written by `fedrec tokens`; overrides
    /// auth.enrollment_tokens).
    #[arg(long, value_name = "FILE")]
    enrollment_tokens: Option<PathBuf>,
    /// Seconds a session (pseudonym) lasts before the device joins again
    /// (overrides auth.session_ttl_secs).
    #[arg(long, value_name = "SECS")]
    session_ttl: Option<f64>,
    /// Allow listening on a non-loopback address without TLS (pseudonyms and
    /// updates then cross the network in plain text).
    #[arg(long)]
    insecure: bool,
    /// Write the trained global model to FILE (safetensors: item ids,
    /// embeddings, biases) when training finishes and when stopped.
    #[arg(long, value_name = "FILE")]
    model_out: Option<PathBuf>,
    #[command(flatten)]
    overrides: ConfigOverrides,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// The checkpoint `fedrec serve --checkpoint FILE` wrote.
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    /// Where to write the model (safetensors).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The configuration file serve had.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The --items serve had (item ids 1 to N).
    #[arg(long, value_name = "N")]
    items: Option<usize>,
    /// The --catalogue serve had.
    #[arg(long, value_name = "FILE", conflicts_with = "items")]
    catalogue: Option<PathBuf>,
    #[command(flatten)]
    overrides: ConfigOverrides,
}

#[derive(Args, Debug)]
struct ClientArgs {
    #[command(flatten)]
    data: DataArgs,
    /// The coordinator's address: http://HOST:PORT, or https://HOST:PORT
    /// with --ca (HOST must be one of the names in its certificate).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// TLS: the CA certificate (PEM) that signed the coordinator's certificate.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Mutual TLS: this device's certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Mutual TLS: this device's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// A file holding this device's enrollment token (for a coordinator
    /// started with --enrollment-tokens).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The user (external id in the data) whose history this device holds.
    #[arg(long)]
    user: String,
    /// Latent factors to expect (checked against the coordinator's model;
    /// by default the device takes the coordinator's).
    #[arg(long)]
    factors: Option<usize>,
    /// Seed of the device's local randomness.
    #[arg(long, default_value_t = sim::DEFAULT_SEED)]
    seed: u64,
}

#[derive(Args, Debug)]
struct TokensArgs {
    /// Directory to write device-N.token and enrollment-tokens.sha256 into
    /// (created if needed; existing files are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Tokens to make (device-1 … device-N).
    #[arg(long, default_value_t = 3)]
    devices: usize,
}

#[derive(Args, Debug)]
struct FitRepeatArgs {
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args, Debug)]
struct SplitArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Output directory: a folder per evaluation track (see docs/evaluation.md).
    #[arg(long)]
    out: PathBuf,
    /// Evaluation seed (must equal the simulation's --seed to share candidates).
    #[arg(long, default_value_t = sim::DEFAULT_SEED)]
    seed: u64,
}

#[derive(Args, Debug)]
struct GenDataArgs {
    /// Output file.
    #[arg(long)]
    out: PathBuf,
    /// Users.
    #[arg(long, default_value_t = SyntheticConfig::default().users)]
    users: usize,
    /// Items.
    #[arg(long, default_value_t = SyntheticConfig::default().items)]
    items: usize,
    /// Seed.
    #[arg(long, default_value_t = SyntheticConfig::default().seed)]
    seed: u64,
}

/// Runs the command; an error is printed for a person: what went wrong and
/// why, each cause once, without a backtrace.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `err` and its causes joined by ": ", a cause whose text the previous
/// one already holds left out (so that "No such file" appears once).
fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: log files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // One crypto backend for every TLS connection of the process (ring; the
    // build has no other). Fails only if one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate(args) => simulate(args),
        Command::Serve(args) => serve(args),
        Command::Client(args) => client(args),
        Command::Export(args) => export(args),
        Command::Split(args) => split(args),
        Command::FitRepeat(args) => fit_repeat(args),
        Command::GenData(args) => gen_data(args),
        Command::Bench(cmd) => bench(cmd),
        Command::Certs(args) => certs(args),
        Command::Tokens(args) => tokens(args),
        Command::Privacy(args) => privacy(args),
    }
}

fn privacy(a: PrivacyArgs) -> anyhow::Result<()> {
    use fedrec_coordinator::privacy::{RdpAccountant, noise_multiplier_for};
    if !(0.0..=1.0).contains(&a.sampling_rate) {
        bail!("--sampling-rate must be in [0, 1], got {}", a.sampling_rate);
    }
    if !(a.delta > 0.0 && a.delta < 1.0) {
        bail!("--delta must be in (0, 1), got {}", a.delta);
    }
    match (a.noise_multiplier, a.epsilon) {
        (Some(z), _) => {
            if !(z >= 0.0 && z.is_finite()) {
                bail!("--noise-multiplier must be >= 0, got {z}");
            }
            let eps = RdpAccountant::epsilon_for(a.sampling_rate, z, a.rounds, a.delta);
            println!(
                "epsilon = {eps:.4} after {} rounds at sampling rate {}, noise multiplier {z}, delta {}",
                a.rounds, a.sampling_rate, a.delta
            );
        }
        (None, Some(eps)) => {
            if !(eps > 0.0 && eps.is_finite()) {
                bail!("--epsilon must be > 0, got {eps}");
            }
            match noise_multiplier_for(eps, a.delta, a.sampling_rate, a.rounds) {
                Some(z) => println!(
                    "noise multiplier = {z:.4} keeps {} rounds at sampling rate {} within epsilon {eps}, delta {}",
                    a.rounds, a.sampling_rate, a.delta
                ),
                None => bail!(
                    "no noise multiplier up to 10,000 keeps {} rounds at sampling rate {} within epsilon {eps}, delta {}",
                    a.rounds,
                    a.sampling_rate,
                    a.delta
                ),
            }
        }
        (None, None) => bail!("give --noise-multiplier or --epsilon"),
    }
    Ok(())
}

fn bench(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Secagg(args) => bench_secagg(args)?,
        BenchCommand::Aggregate => {
            println!("| updates | values | aggregate GB/s | plain read-and-add GB/s | ratio |");
            println!("|---|---|---|---|---|");
            for values in [118_592, 1_000_000] {
                for updates in [100, 1000] {
                    let r = fedrec::bench::aggregate(updates, values)?;
                    println!(
                        "| {} | {} | {:.2} | {:.2} | {:.0}% |",
                        r.updates,
                        r.values,
                        r.aggregate_bytes_per_sec / 1e9,
                        r.plain_bytes_per_sec / 1e9,
                        100.0 * r.ratio()
                    );
                }
            }
        }
        BenchCommand::Idle(a) => {
            let base = match &a.config {
                Some(path) => CoordinatorConfig::from_file(path)?,
                None => CoordinatorConfig::default(),
            };
            let wait = std::time::Duration::try_from_secs_f64(a.wait_secs)
                .map_err(|_| anyhow::anyhow!("--wait-secs must be a positive number of seconds"))?;
            let row = fedrec::bench::idle::idle(base, a.joined, a.connections, wait)?;
            eprintln!(
                "coordinator: {:.0} MB at start; {} joined devices: +{:.0} MB ({:.0} bytes each, {:.0} joins/s); \
                 {} connections holding a check-in: +{:.0} MB ({:.0} bytes each), {:.3} cores while they waited",
                row.base_rss_mb,
                row.joined,
                row.joined_rss_mb - row.base_rss_mb,
                row.bytes_per_joined_device,
                row.joined as f64 / row.join_secs,
                row.connections,
                row.connected_rss_mb - row.joined_rss_mb,
                row.bytes_per_connection,
                row.idle_cpu_cores,
            );
            println!("{}", serde_json::to_string(&row)?);
        }
        BenchCommand::Round(a) => {
            let base = match &a.config {
                Some(path) => CoordinatorConfig::from_file(path)?,
                None => CoordinatorConfig::default(),
            };
            let row = fedrec::bench::round(
                base,
                a.clients,
                a.dim,
                a.rounds,
                a.loopback,
                fedrec::bench::Wire {
                    download: a.download_encoding,
                    upload: a.upload_encoding,
                },
            )?;
            eprintln!(
                "{} devices x {} values, {} downloads of {} bytes, {} uploads: {:.3} s per round ({:.3} s after the first; {:.1} MB), {:.0} MB/s, coordinator peak {:.0} MB; join p50/p99 {:.1}/{:.1} ms, task after the round's first p50/p99 {:.1}/{:.1} ms{}",
                row.clients,
                row.dim,
                row.download_encoding,
                row.download_bytes_per_device,
                row.upload_encoding,
                row.sec_per_round,
                row.sec_per_round_after_first,
                row.bytes_per_round as f64 / 1e6,
                row.bytes_per_sec / 1e6,
                row.coordinator_peak_rss_mb,
                row.join_ms[0],
                row.join_ms[1],
                row.task_fanout_ms[0],
                row.task_fanout_ms[1],
                row.loopback_sec_per_round
                    .map(|l| format!("; plain tonic stream of the same bytes: {l:.3} s"))
                    .unwrap_or_default()
            );
            println!("{}", serde_json::to_string(&row)?);
        }
        BenchCommand::Device(a) => {
            let row = fedrec::bench::device(a.users, a.items, a.history, a.devices)?;
            eprintln!(
                "{} devices of {} timed: mean {:.1} ms, p50 {:.1} ms, p99 {:.1} ms per local training; model {} values; process peak {:.0} MB",
                row.devices,
                row.users,
                row.mean_ms,
                row.p50_ms,
                row.p99_ms,
                row.model_values,
                row.process_peak_rss_mb
            );
            println!("{}", serde_json::to_string(&row)?);
        }
    }
    Ok(())
}

/// Parses a configuration enum by its name in the TOML file.
fn parse_name<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    use serde::de::value::{Error, StrDeserializer};
    T::deserialize(StrDeserializer::<Error>::new(s)).map_err(|e| e.to_string())
}

fn coordinator_config(path: Option<&Path>) -> anyhow::Result<CoordinatorConfig> {
    Ok(match path {
        Some(p) => CoordinatorConfig::from_file(p)?,
        None => CoordinatorConfig::default(),
    })
}

fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    // Real data without a named configuration: settings chosen on the
    // validation events (the generated default keeps its fast recipe).
    let preset = match (&args.config, args.preset, &args.data.data) {
        (None, None, Some(_)) => Some(sim::Preset::Auto),
        (_, preset, _) => preset,
    };
    let auto = preset == Some(sim::Preset::Auto);
    if auto {
        let o = &args.overrides;
        for (flag, given) in [
            ("--factors", o.factors.is_some()),
            ("--confidence", o.confidence.is_some()),
            ("--reg", o.reg.is_some()),
        ] {
            if given {
                bail!(
                    "{flag} is chosen by --preset auto (the default with --data); \
                     name another preset (--preset movielens or retail) or --config to set it"
                );
            }
        }
    }
    let (mut coord, centralized_epochs) = match (&args.config, preset) {
        (Some(p), _) => (
            CoordinatorConfig::from_file(p)?,
            sim::DEFAULT_CENTRALIZED_EPOCHS,
        ),
        (None, Some(preset)) => preset.config(),
        (None, None) => (
            sim::default_coordinator_config(),
            sim::DEFAULT_CENTRALIZED_EPOCHS,
        ),
    };
    args.overrides.apply(&mut coord);
    if coord.rounds.rounds == 0 {
        bail!("a simulation needs a finite number of rounds (rounds.rounds = 0 means forever)");
    }
    let ds = args.data.load(args.seed)?;
    eprintln!(
        "data: {} — {} users, {} items, {} interactions{}",
        ds.name,
        ds.n_users(),
        ds.n_items(),
        ds.interactions.len(),
        skipped_note(&ds)
    );
    let cfg = SimConfig {
        coordinator: coord,
        transport: args.transport,
        seed: args.seed,
        centralized_epochs: args.centralized_epochs.unwrap_or(centralized_epochs),
        baselines: args
            .baselines
            .unwrap_or_else(|| sim::Baselines::default_for(preset.is_some(), ds.n_items())),
        auto,
        attack: args.attack.map(|kind| sim::Attack {
            kind,
            fraction: args.attack_fraction.unwrap_or(0.1),
        }),
    };
    if cfg.attack.is_some() && cfg.transport != Transport::Inproc {
        bail!("--attack is simulated in process only: add --transport inproc");
    }
    let mut bar = Bar::default();
    if let Some(noise) = &args.sweep_noise {
        let tradeoff = fedrec::tradeoff::sweep(&ds, &cfg, noise, &mut bar)?;
        bar.finish();
        println!("{}", fedrec::tradeoff::table(&tradeoff));
        write_report(args.report.as_deref(), &tradeoff)?;
        if let Some(path) = &args.plot {
            fedrec::tradeoff::write_svg(&tradeoff, path)?;
            eprintln!("plot written to {}", path.display());
        }
        return Ok(());
    }
    let report = sim::run(&ds, &cfg, &mut bar)?;
    bar.finish();
    print_table(&report);
    write_report(args.report.as_deref(), &report)?;
    if let Some(path) = &args.plot {
        fedrec::plot::write_svg(&report, path)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// Writes `report` as JSON to `path`, if given.
fn write_report(path: Option<&Path>, report: &impl serde::Serialize) -> anyhow::Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(path, json)
        .with_context(|| format!("cannot write the report to {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix (what service managers send).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => eprintln!("cannot watch for SIGTERM ({e}); Ctrl-C still stops"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn skipped_note(ds: &Dataset) -> String {
    if ds.skipped.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = ds.skipped.iter().map(|(k, v)| format!("{v} {k}")).collect();
    format!(" (skipped rows: {})", parts.join(", "))
}

/// A progress bar over rounds.
#[derive(Default)]
struct Bar {
    bar: Option<ProgressBar>,
}

impl Observer for Bar {
    fn start(&mut self, rounds: u32) {
        let bar = ProgressBar::new(rounds.into());
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed} {msg}")
                .expect("static template is valid")
                .progress_chars("=> "),
        );
        bar.set_prefix("federated");
        bar.set_message(format!("0/{rounds} rounds"));
        self.bar = Some(bar);
    }

    fn round(&mut self, row: &RoundRow) {
        if let Some(bar) = &self.bar {
            // The count is in the message, so that one redraw shows the
            // round's number and its figures together.
            bar.inc(1);
            bar.set_message(format!(
                "{}/{} rounds; round {}: {} devices, cohort HR@10 {:.3}{}",
                bar.position(),
                bar.length().unwrap_or_default(),
                row.round,
                row.participants,
                row.hr_at_10,
                if row.completed { "" } else { " (abandoned)" }
            ));
        }
    }

    fn phase(&mut self, name: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{name}…"));
        }
    }
}

impl Bar {
    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn print_table(report: &Report) {
    let f = &report.final_;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{}{} — {} users ({} evaluated), {} items, {} rounds, {:.1}s ({:.0} devices per second in the rounds)",
        // A blank line after the progress bar on a terminal; none in a file.
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            "\n"
        } else {
            ""
        },
        report.data.name,
        report.data.users,
        report.data.test_users,
        report.data.items,
        report.rounds.len(),
        report.timing.total_seconds,
        report.timing.devices_per_second
    );
    let _ = sim::tracks::write_tables(&mut out, f);
    if let Some(p) = &report.privacy.last_round {
        let _ = writeln!(
            out,
            "differential privacy ({}): epsilon = {:.3} at delta = {:e} after {} training rounds \
             (noise multiplier {}, clip {:.4}, sampling rate {:.4})",
            p.mode,
            p.epsilon,
            p.delta,
            report.privacy.training_rounds,
            p.noise_multiplier,
            p.clip,
            p.sampling_rate
        );
    }
    let _ = fedrec::diversity::write_table(&mut out, &f.diversity);
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = coordinator_config(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        cfg.server.listen = listen;
    }
    if let Some(items) = args.items {
        cfg.model.items = Some(items);
    }
    args.overrides.apply(&mut cfg);
    if let Some(cert) = &args.tls_cert {
        cfg.tls.cert = Some(cert.clone());
    }
    if let Some(key) = &args.tls_key {
        cfg.tls.key = Some(key.clone());
    }
    if let Some(ca) = &args.client_ca {
        cfg.tls.client_ca = Some(ca.clone());
    }
    if let Some(file) = &args.enrollment_tokens {
        cfg.auth.enrollment_tokens = Some(file.clone());
    }
    if let Some(ttl) = args.session_ttl {
        cfg.auth.session_ttl_secs = ttl;
    }
    cfg.validate()?;
    let tokens = match &cfg.auth.enrollment_tokens {
        Some(path) => {
            let tokens = fedrec_coordinator::auth::TokenSet::load(path)?;
            eprintln!(
                "admitting enrolled devices only: {} enrollment tokens from {}, sessions of {} s",
                tokens.len(),
                path.display(),
                cfg.auth.session_ttl_secs
            );
            Some(tokens)
        }
        None => None,
    };
    let tls = fedrec_coordinator::tls::server_tls_config(&cfg.tls)?;
    let addr: std::net::SocketAddr = cfg
        .server
        .listen
        .parse()
        .with_context(|| format!("bad listen address {:?}", cfg.server.listen))?;
    let security = match (&tls, &cfg.tls.client_ca) {
        (Some(_), Some(_)) => "mutual TLS",
        (Some(_), None) => "TLS",
        (None, _) => "plain text",
    };
    if tls.is_none() && !addr.ip().is_loopback() {
        if !args.insecure {
            bail!(
                "refusing to listen on {addr} without TLS: devices' pseudonyms and model updates \
                 would cross the network in plain text. Give --tls-cert and --tls-key (or [tls] \
                 in the config; `fedrec certs --out DIR` makes development ones), listen on a \
                 loopback address, or pass --insecure to serve plain text anyway"
            );
        }
        eprintln!("warning: --insecure: serving plain text on {addr}");
    }
    let (catalogue, model) = serve_model(&mut cfg, args.catalogue.as_deref())?;
    let params = {
        use rand::SeedableRng;
        model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.model.seed))
    };
    let layout = model.layout();
    let listen = cfg.server.listen.clone();
    let core = match &args.checkpoint {
        Some(path) if path.exists() => {
            let checkpoint = fedrec_coordinator::checkpoint::Checkpoint::read(path)?;
            let core = fedrec_coordinator::round::RoundCore::resume(
                cfg,
                layout,
                checkpoint,
                std::time::Instant::now(),
            )
            .with_context(|| format!("cannot resume from {}", path.display()))?;
            eprintln!(
                "resumed from {}: {} rounds ended, model version {}",
                path.display(),
                core.history().len(),
                core.model().version
            );
            core
        }
        _ => fedrec_coordinator::round::RoundCore::new(cfg, layout, params)?,
    };
    let encoding = core.config().download.encoding;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        eprintln!(
            "coordinator listening on {} over {security}, model downloads in {encoding} (Ctrl-C to stop)",
            listener.local_addr()?
        );
        let mut options =
            fedrec_coordinator::service::ServeOptions::default().with_catalogue(&catalogue);
        if let Some(tls) = tls {
            options = options.with_tls(tls);
        }
        if let Some(path) = &args.checkpoint {
            options = options.with_checkpoint(path);
        }
        if let Some(tokens) = tokens {
            options = options.with_enrollment_tokens(tokens);
        }
        let service = fedrec_coordinator::service::CoordinatorService::new(core, options);
        let handle = service.handle();
        let saver = ModelSaver {
            path: args.model_out.clone(),
            catalogue: catalogue.clone(),
        };
        let reporter = tokio::spawn(report_rounds(
            handle.clone(),
            saver.clone(),
            args.checkpoint.clone(),
        ));
        let metrics = match &args.metrics_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?;
                eprintln!("metrics on http://{}/metrics", listener.local_addr()?);
                let handle = handle.clone();
                Some(tokio::spawn(fedrec_coordinator::metrics::serve_metrics(
                    listener,
                    move || handle.metrics(),
                    std::future::pending(),
                )))
            }
            None => None,
        };
        service
            .serve(listener, async {
                shutdown_signal().await;
                eprintln!("shutting down");
            })
            .await?;
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        reporter.abort();
        let p = handle.progress();
        let training = p
            .history
            .iter()
            .filter(|r| r.kind == fedrec_coordinator::round::TaskKind::Train)
            .count();
        let evaluations = p.history.len() - training;
        eprintln!(
            "stopped after {training} training rounds{}; model version {}",
            match evaluations {
                0 => String::new(),
                1 => " and 1 evaluation round".to_owned(),
                n => format!(" and {n} evaluation rounds"),
            },
            p.status.model_version
        );
        if let Some(path) = saver.save(&handle)? {
            eprintln!("model saved to {}", path.display());
        }
        anyhow::Ok(())
    })
}

fn client(args: ClientArgs) -> anyhow::Result<()> {
    let ds = args.data.load(args.seed)?;
    let user = ds
        .user_ids
        .iter()
        .position(|u| *u == args.user)
        .ok_or_else(|| unknown_user(&args.user, &ds))?;
    // The device holds its first track's (discover's) held-out event, and
    // the purchases before it.
    let protocol = data::Protocol::new(&ds);
    let ev = protocol.evaluations.first().with_context(|| {
        format!(
            "no user of {} has purchases at two different times",
            ds.name
        )
    })?;
    let mut options = fedrec_client::connect::ConnectOptions::from_files(
        args.ca.as_deref(),
        args.cert.as_deref(),
        args.key.as_deref(),
    )?;
    if let Some(file) = &args.token_file {
        options = options.enrollment_token_file(file)?;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut participant =
            fedrec_client::participant::Participant::connect_with(&args.coordinator, &options)
                .await?;
        // The coordinator says which model it trains and over which items:
        // the device maps its purchases into that catalogue.
        let Some(catalogue) = participant.catalogue().cloned() else {
            bail!(
                "the coordinator at {} did not announce its catalogue (it is an older \
                 version of fedrec): run the same version of fedrec on both sides",
                args.coordinator
            );
        };
        let model = fedrec_client::model::for_layout(participant.layout())?;
        if let Some(factors) = args.factors {
            let theirs = participant
                .layout()
                .tensors()
                .first()
                .and_then(|(_, s)| s.get(1));
            if theirs.is_some_and(|&k| k != factors as u64) {
                bail!(
                    "--factors {factors} differs from the coordinator's model ({}): leave \
                     out --factors, the device takes the coordinator's",
                    participant.layout()
                );
            }
        }
        let (device, unmapped) =
            sim::make_catalogue_device(&model, &protocol, ev, user, args.seed, |item| {
                catalogue.index(&ds.item_ids[item as usize])
            })?;
        let mapped = device.store().len();
        if mapped == 0 {
            bail!(
                "none of user {}'s purchases is in the coordinator's catalogue ({}): give the \
                 coordinator the catalogue of these data (serve --items N for ids 1 to N, or \
                 --catalogue FILE)",
                args.user,
                describe_catalogue(&catalogue)
            );
        }
        eprintln!(
            "joined {} as {}: {} purchases of user {} in the coordinator's catalogue ({})",
            args.coordinator,
            participant.pseudonym(),
            mapped,
            args.user,
            describe_catalogue(&catalogue),
        );
        if unmapped.purchases > 0 {
            eprintln!(
                "{} purchases of {} items the catalogue does not list stay on this device, \
                 unused{}",
                unmapped.purchases,
                unmapped.items,
                if unmapped.held_out {
                    " (so does the held-out purchase: this device evaluates nothing)"
                } else {
                    ""
                }
            );
        }
        let (_device, summary) = participant.run(device).await?;
        eprintln!(
            "done: {} training rounds, {} evaluations, {} refused, {} interrupted; {} reconnects, \
             {} joins again; {} bytes sent; coordinator: {}",
            summary.trained,
            summary.evaluated,
            summary.refused,
            summary.interrupted,
            summary.reconnects,
            summary.rejoins,
            participant.sent().total_bytes(),
            summary.finished_reason
        );
        anyhow::Ok(())
    })
}

/// The catalogue and the model `serve` trains, from `--catalogue FILE` or
/// `model.items` (ids 1 to N) and the configuration.
fn serve_model(
    cfg: &mut CoordinatorConfig,
    catalogue_file: Option<&Path>,
) -> anyhow::Result<(
    fedrec_proto::catalogue::Catalogue,
    Arc<dyn fedrec_client::model::Model>,
)> {
    let catalogue = match catalogue_file {
        Some(path) => {
            let catalogue = read_catalogue(path)?;
            cfg.model.items = Some(catalogue.len());
            catalogue
        }
        None => {
            let Some(items) = cfg.model.items else {
                bail!(
                    "the coordinator needs its catalogue: pass --items N (item ids 1 to N, as \
                     `fedrec gen-data` writes them), --catalogue FILE (one item id a line), or \
                     set model.items in the config"
                );
            };
            fedrec_proto::catalogue::Catalogue::numbered(items)
        }
    };
    let model = sim::model_for(cfg, catalogue.len())?;
    Ok((catalogue, model))
}

/// Writes the model of a `serve --checkpoint` file as safetensors.
fn export(args: ExportArgs) -> anyhow::Result<()> {
    let mut cfg = coordinator_config(args.config.as_deref())?;
    if let Some(items) = args.items {
        cfg.model.items = Some(items);
    }
    args.overrides.apply(&mut cfg);
    let (catalogue, model) = serve_model(&mut cfg, args.catalogue.as_deref())?;
    let checkpoint = fedrec_coordinator::checkpoint::Checkpoint::read(&args.checkpoint)?;
    let layout = model.layout();
    if checkpoint.params.len() != layout.num_values() {
        bail!(
            "{} holds a model of {} values, but the flags describe {layout} ({} values): give \
             export the --config, --items (or --catalogue) and --factors that serve had",
            args.checkpoint.display(),
            checkpoint.params.len(),
            layout.num_values()
        );
    }
    fedrec::export::write_model(
        &args.out,
        &layout,
        &checkpoint.params,
        &catalogue,
        checkpoint.model_version,
    )?;
    eprintln!(
        "wrote model version {} ({layout}; {} training rounds) to {}",
        checkpoint.model_version,
        checkpoint.training_rounds,
        args.out.display()
    );
    Ok(())
}

/// Where `serve` writes the trained model, if anywhere.
#[derive(Clone)]
struct ModelSaver {
    path: Option<PathBuf>,
    catalogue: fedrec_proto::catalogue::Catalogue,
}

impl ModelSaver {
    /// Writes the current global model; returns where, if anywhere.
    fn save(
        &self,
        handle: &fedrec_coordinator::service::ServiceHandle,
    ) -> anyhow::Result<Option<&Path>> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let model = handle.model()?;
        fedrec::export::write_model(
            path,
            &model.layout,
            &model.params,
            &self.catalogue,
            model.version,
        )?;
        Ok(Some(path))
    }
}

/// Prints one line per ended round, and what to do once training has
/// finished (saving the model then, if asked to).
async fn report_rounds(
    handle: fedrec_coordinator::service::ServiceHandle,
    saver: ModelSaver,
    checkpoint: Option<PathBuf>,
) {
    use fedrec_coordinator::round::TaskKind;
    let mut rx = handle.subscribe();
    let mut shown = rx.borrow().history.len();
    let mut finished = rx.borrow().finished.is_some();
    loop {
        if rx.changed().await.is_err() {
            return;
        }
        let p = rx.borrow_and_update().clone();
        for r in p.history.iter().skip(shown) {
            let hr = r
                .evaluation
                .hit_rate_full()
                .map_or("no held-out purchases".to_owned(), |h| {
                    format!("HR@10 {h:.3}")
                });
            let what = match r.kind {
                TaskKind::Train => format!("round {}", r.round),
                _ => format!("round {} (evaluation)", r.round),
            };
            if r.completed {
                eprintln!(
                    "{what}: {} of {} devices accepted, {:.1} s, cohort {hr}",
                    r.participants, r.selected, r.seconds
                );
            } else {
                eprintln!(
                    "{what}: abandoned after {:.1} s: {}",
                    r.seconds,
                    r.abandon_reason.as_deref().unwrap_or("no reason given")
                );
            }
        }
        shown = p.history.len();
        if let (Some(reason), false) = (&p.finished, finished) {
            finished = true;
            let saved = match saver.save(&handle) {
                Ok(Some(path)) => format!("the model is saved to {}", path.display()),
                Ok(None) => match &checkpoint {
                    Some(file) => format!(
                        "the model is in {} (`fedrec export --checkpoint {}` writes it for \
                         serving)",
                        file.display(),
                        file.display()
                    ),
                    None => "the model is not saved: pass --model-out FILE next time".to_owned(),
                },
                Err(e) => format!("the model could not be saved: {e:#}"),
            };
            eprintln!(
                "training finished ({reason}), model version {}; {saved}. Devices that check \
                 in are told to stop; press Ctrl-C to stop the coordinator.",
                p.status.model_version
            );
        }
    }
}

/// Reads a catalogue file: one item id a line, in model order; blank lines
/// and lines starting with `#` are skipped.
fn read_catalogue(path: &Path) -> anyhow::Result<fedrec_proto::catalogue::Catalogue> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the catalogue {}", path.display()))?;
    let ids: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    fedrec_proto::catalogue::Catalogue::from_ids(ids)
        .with_context(|| format!("{} is not a usable catalogue", path.display()))
}

/// "100 items, ids 1 to 100", or "3 items, ids 85123A, 71053, …".
fn describe_catalogue(c: &fedrec_proto::catalogue::Catalogue) -> String {
    if c.is_numbered() {
        return format!("{} items, ids 1 to {}", c.len(), c.len());
    }
    let first: Vec<String> = (0..c.len().min(3)).map(|i| c.id(i)).collect();
    let more = if c.len() > 3 { ", …" } else { "" };
    format!("{} items, ids {}{more}", c.len(), first.join(", "))
}

/// The error for a user id the data do not hold, showing what its ids look like.
fn unknown_user(user: &str, ds: &Dataset) -> anyhow::Error {
    let examples: Vec<&str> = ds.user_ids.iter().take(3).map(String::as_str).collect();
    let more = if ds.user_ids.len() > 3 { ", …" } else { "" };
    anyhow::anyhow!(
        "user {user:?} is not in {}: its {} user ids are {}{more}; pass one of them to --user",
        ds.name,
        ds.user_ids.len(),
        examples.join(", ")
    )
}

fn tokens(args: TokensArgs) -> anyhow::Result<()> {
    let written = fedrec::certs::write_tokens(&args.out, args.devices)?;
    println!(
        "wrote {} enrollment tokens to {}:",
        written.tokens.len(),
        args.out.display()
    );
    println!(
        "  {}: their SHA-256 digests, for the coordinator (fedrec serve --enrollment-tokens FILE)",
        written.digests.display()
    );
    if let (Some(first), Some(last)) = (written.tokens.first(), written.tokens.last()) {
        println!(
            "  {} … {}: one secret token per device (fedrec client --token-file FILE); \
             keep each on its device only",
            first.display(),
            last.display()
        );
    }
    Ok(())
}

fn certs(args: CertsArgs) -> anyhow::Result<()> {
    if args.san.is_empty() {
        bail!("--san needs at least one name");
    }
    let pki = fedrec::certs::write_dev_pki(&args.out, &args.san, args.devices, args.days)?;
    let dir = args.out.display();
    println!(
        "wrote development certificates to {dir} (valid {} days; for trying TLS, not for production):",
        args.days
    );
    println!(
        "  {}: the CA; devices trust it (--ca), the coordinator checks devices against it (--client-ca)",
        pki.ca.display()
    );
    println!(
        "  {}, {}: the coordinator's certificate (names: {}) and key",
        pki.server_cert.display(),
        pki.server_key.display(),
        args.san.join(", ")
    );
    for (cert, key) in &pki.devices {
        println!(
            "  {}, {}: a device's certificate and key",
            cert.display(),
            key.display()
        );
    }
    let host = &args.san[0];
    let host = if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]")
    } else {
        host.clone()
    };
    println!(
        "\nMutual TLS (the coordinator accepts only devices with a certificate from this CA):"
    );
    println!(
        "  fedrec serve --config coordinator.toml --items 100 --tls-cert {} --tls-key {} --client-ca {}",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display()
    );
    if let Some((cert, key)) = pki.devices.first() {
        println!(
            "  fedrec client --data /tmp/purchases.tsv --user 1 --coordinator https://{host}:50051 --ca {} --cert {} --key {}",
            pki.ca.display(),
            cert.display(),
            key.display()
        );
    }
    println!("TLS only (devices not authenticated): leave out --client-ca, --cert and --key.");
    Ok(())
}

fn split(args: SplitArgs) -> anyhow::Result<()> {
    let ds = args.data.load(args.seed)?;
    let protocol = data::Protocol::new(&ds);
    fedrec::eval::write_split(&protocol, args.seed, &ds.name, ds.timed, &args.out)
        .with_context(|| format!("cannot write the split to {}", args.out.display()))?;
    let tracks: Vec<String> = protocol
        .tracks()
        .iter()
        .filter_map(|&t| {
            let test = protocol.evaluation(t, data::Stage::Test)?;
            let valid = protocol.evaluation(t, data::Stage::Validation)?;
            Some(format!(
                "{t}: {} test, {} validation users",
                test.n_users(),
                valid.n_users()
            ))
        })
        .collect();
    eprintln!(
        "wrote the split of {} ({} users; {}) to {}",
        ds.name,
        protocol.histories.n_users(),
        tracks.join("; "),
        args.out.display()
    );
    Ok(())
}

fn fit_repeat(args: FitRepeatArgs) -> anyhow::Result<()> {
    let ds = args.data.load(sim::DEFAULT_SEED)?;
    let protocol = data::Protocol::new(&ds);
    let (weights, n) = fedrec::eval::fit_repeat_weights(&protocol)
        .with_context(|| format!("{} has no buy-again validation event to fit on", ds.name))?;
    println!("fitted on {n} validation re-buys of {}:", ds.name);
    for (name, w) in fedrec_client::repeat::FEATURE_NAMES.iter().zip(weights) {
        println!("  {w:>8.3}  {name}");
    }
    println!("{weights:?}");
    let choices = fedrec::eval::repeat_choices(&protocol).unwrap_or_default();
    // The blend's temperatures, with discover scores from centralized ALS
    // (64 factors, confidence 2, regularization 0.01) on the validation cut.
    let model: Arc<dyn fedrec_client::model::Model> = Arc::new(
        fedrec_client::model::MatrixFactorization::new(protocol.n_items(), 64, 0.01)?,
    );
    let als = fedrec_client::model::TrainingConfig {
        loss: fedrec_client::model::Loss::Als,
        confidence: 2.0,
        regularization: 0.01,
        ..fedrec_client::model::TrainingConfig::default()
    };
    println!(
        "blend temperatures on next-purchase validation events (discover, buy-again: NDCG@10, HR@10):"
    );
    for (b, ndcg, hr) in fedrec::eval::fit_blend(&protocol, &model, &als, sim::DEFAULT_SEED) {
        println!(
            "  {:>5} {:>5}: {ndcg:.4} {hr:.4}",
            b.discover_temperature, b.rebuy_temperature
        );
    }
    for (name, w) in [
        ("fitted", weights),
        ("default", fedrec_client::repeat::DEFAULT_WEIGHTS),
    ] {
        println!(
            "{name}: validation NDCG@10 among past items {:.4}",
            fedrec::eval::choice_ndcg(&choices, &w)
        );
    }
    Ok(())
}

fn gen_data(args: GenDataArgs) -> anyhow::Result<()> {
    let ds = data::synthetic(&SyntheticConfig {
        users: args.users,
        items: args.items,
        seed: args.seed,
        ..SyntheticConfig::default()
    })?;
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for it in &ds.interactions {
        // Numeric ids from 1, as in MovieLens, so that the format is detected.
        writeln!(w, "{}\t{}\t1\t{}", it.user + 1, it.item + 1, it.time)?;
    }
    w.flush()?;
    eprintln!(
        "wrote {} interactions of {} users to {}",
        ds.interactions.len(),
        ds.n_users(),
        args.out.display()
    );
    Ok(())
}

fn bench_secagg(args: SecaggBenchArgs) -> anyhow::Result<()> {
    let mut bench = fedrec::bench::secagg::SecAggBench {
        cohorts: args.cohorts,
        sizes: args.sizes,
        seed: args.seed,
        repeats: args.repeats,
        ..Default::default()
    };
    if let Some(threads) = args.threads {
        bench.threads = threads.max(1);
    }
    eprintln!(
        "secure aggregation benchmark: cohorts {:?}, update sizes {:?}, {} device threads",
        bench.cohorts, bench.sizes, bench.threads
    );
    let rows = fedrec::bench::secagg::secagg(&bench, |r| {
        eprintln!(
            "  {} devices x {} values: plain {:.1} ms, secure {:.1} ms ({:.2}x)",
            r.devices,
            r.values,
            r.plain_round_s() * 1e3,
            r.secure_round_s() * 1e3,
            r.ratio()
        );
    })?;
    println!("{}", fedrec::bench::secagg::secagg_table(&rows));
    println!(
        "Round time = the coordinator's time + one device's (devices run in parallel on their \
         own hardware); network transfer and local training are not included."
    );
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("rows written to {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        overrides: ConfigOverrides,
    }

    fn apply(args: &[&str]) -> CoordinatorConfig {
        let flags = Flags::try_parse_from(std::iter::once("fedrec").chain(args.iter().copied()))
            .expect("flags parse");
        let mut cfg = sim::als_recipe();
        flags.overrides.apply(&mut cfg);
        cfg
    }

    #[test]
    fn dp_on_a_preset_takes_fedadam_unless_told_otherwise() {
        let dp = ["--dp", "central", "--sampling-rate", "0.1"];
        let cfg = apply(&dp);
        assert_eq!(cfg.strategy.name, StrategyName::FedAdam);
        assert_eq!(cfg.strategy.server_lr, 0.01);
        cfg.validate().expect("a valid DP configuration");
        // Explicit flags win; `als` under DP is then refused, saying why.
        let cfg = apply(&[&dp[..], &["--server-lr", "0.02"]].concat());
        assert_eq!(cfg.strategy.server_lr, 0.02);
        let cfg = apply(&[&dp[..], &["--strategy", "als"]].concat());
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("differential privacy"), "{err}");
        // Without DP the preset's own step stays.
        assert_eq!(apply(&[]).strategy.name, StrategyName::Als);
    }
}
