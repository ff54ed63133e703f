//! The coordinator's configuration, loaded from a TOML file.
//!
//! Every option has a default (a named constant below), so an empty file is a
//! valid configuration. Unknown keys are rejected, so that a typo does not
//! silently fall back to a default.
//!
//! ```
//! use fedrec_coordinator::config::{CoordinatorConfig, StrategyName};
//! let config = CoordinatorConfig::from_toml_str(
//!     r#"
//!     [rounds]
//!     rounds = 20
//!     clients_per_round = 50
//!     over_selection = 1.3
//!     seed = 7
//!
//!     [strategy]
//!     name = "fedadam"
//!     server_lr = 0.01
//!     "#,
//! )
//! .unwrap();
//! assert_eq!(config.rounds.clients_per_round, 50);
//! assert_eq!(config.strategy.name, StrategyName::FedAdam);
//! assert_eq!(config.training.local_epochs, 5); // a default
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fedrec_proto::codec::Encoding;
use fedrec_proto::limits::Number;
use serde::{Deserialize, Serialize};

use crate::CoordinatorError;

/// Default `server.listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default `server.long_poll_secs`.
pub const DEFAULT_LONG_POLL_SECS: f64 = 10.0;
/// Default `server.max_concurrent_uploads`: 4. Over loopback, where the
/// coordinator's CPU is the limit, rounds took as long with 4 upload and
/// 8 download slots as with 8 and 16 (100 × 118,592 and 10 × 1,000,000
/// values), and 1,000 devices × 1,000,000 values peaked at 72–88 MB
/// instead of 110–122 MB (BENCHMARKS.md). Where devices upload over slow
/// links, a slot is held for the whole upload: raise it there.
pub const DEFAULT_MAX_CONCURRENT_UPLOADS: usize = 4;
/// Default `server.max_concurrent_downloads` (see
/// [`DEFAULT_MAX_CONCURRENT_UPLOADS`]).
pub const DEFAULT_MAX_CONCURRENT_DOWNLOADS: usize = 8;

/// Default `rounds.rounds` (0 = run forever).
pub const DEFAULT_ROUNDS: u32 = 0;
/// Default `rounds.clients_per_round`.
pub const DEFAULT_CLIENTS_PER_ROUND: usize = 10;
/// Default `rounds.over_selection`.
pub const DEFAULT_OVER_SELECTION: f64 = 1.0;
/// Default `rounds.min_updates`.
pub const DEFAULT_MIN_UPDATES: usize = 1;
/// Default `rounds.deadline_secs`.
pub const DEFAULT_DEADLINE_SECS: f64 = 60.0;
/// Default `rounds.checkin_window_secs`.
pub const DEFAULT_CHECKIN_WINDOW_SECS: f64 = 30.0;
/// Default `rounds.evaluate`.
pub const DEFAULT_EVALUATE: bool = true;
/// Default `rounds.final_evaluation`.
pub const DEFAULT_FINAL_EVALUATION: bool = true;

/// Default `training.local_epochs`.
pub const DEFAULT_LOCAL_EPOCHS: u32 = 5;
/// Default `training.learning_rate`.
pub const DEFAULT_LEARNING_RATE: f32 = 0.05;
/// Default `training.regularization`.
pub const DEFAULT_REGULARIZATION: f32 = 0.01;
/// Default `training.negatives`.
pub const DEFAULT_NEGATIVES: u32 = 1;
/// Default `training.proximal_mu`: no proximal term (FedAvg's local SGD).
pub const DEFAULT_PROXIMAL_MU: f32 = 0.0;
/// Default `training.confidence`: a purchase weighs 5 times an item not bought.
pub const DEFAULT_CONFIDENCE: f32 = 5.0;

/// Default `strategy.server_lr`.
pub const DEFAULT_SERVER_LR: f32 = 1.0;
/// Default `strategy.momentum`.
pub const DEFAULT_MOMENTUM: f32 = 0.9;
/// Default `strategy.beta1`.
pub const DEFAULT_BETA1: f32 = 0.9;
/// Default `strategy.beta2`.
pub const DEFAULT_BETA2: f32 = 0.99;
/// Default `strategy.tau`.
pub const DEFAULT_TAU: f32 = 1e-3;

/// Default `model.factors`.
pub const DEFAULT_FACTORS: usize = 32;
/// Default `model.init_std`.
pub const DEFAULT_INIT_STD: f32 = 0.1;
/// Default `model.seed`.
pub const DEFAULT_MODEL_SEED: u64 = 42;

/// The whole configuration: one struct per TOML section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// `[server]`: network and resource limits.
    pub server: ServerConfig,
    /// `[rounds]`: how rounds are formed and ended.
    pub rounds: RoundsConfig,
    /// `[training]`: hyperparameters sent to devices with each task.
    pub training: TrainingConfig,
    /// `[strategy]`: the server optimizer.
    pub strategy: StrategyConfig,
    /// `[model]`: how the CLI builds the initial model (not used by the core).
    pub model: ModelConfig,
    /// `[secure_aggregation]`: whether training rounds hide each device's
    /// update from the coordinator, and how.
    pub secure_aggregation: SecureAggregationConfig,
    /// `[privacy]`: user-level differential privacy (DP-FedAvg) and its
    /// budget.
    pub privacy: PrivacyConfig,
    /// `[tls]`: transport security of the listener (TLS, and mutual TLS
    /// with `client_ca`). Default: off (plain text).
    pub tls: TlsConfig,
    /// `[auth]`: enrollment tokens that devices exchange for short-lived
    /// sessions. Default: off (any device may join).
    pub auth: AuthConfig,
    /// `[download]`: how the model travels to devices.
    pub download: DownloadConfig,
    /// `[upload]`: how devices send their updates in plain rounds.
    pub upload: UploadConfig,
}

/// `[auth]`: sessions, and device authentication by enrollment token.
///
/// A device that joins receives a pseudonym that acts as its session
/// credential for `session_ttl_secs`, with or without tokens; after that its
/// check-ins are refused (`UNAUTHENTICATED`, counted as `session_expired`)
/// and it joins again (the SDK does so by itself), so that devices that
/// never come back do not stay in the device table.
///
/// Each device may be given a secret token when it is enrolled (`fedrec
/// tokens` makes them); the coordinator holds only the tokens' SHA-256
/// digests, so its disk never holds a credential. A device then presents
/// its token when it joins. A join without a token, or with a token not in
/// the file, gets `UNAUTHENTICATED` and is counted (`missing_token`,
/// `unknown_token`). A token holds at most `max_sessions_per_token` live
/// sessions: a further join ends the oldest (its next check-in is refused
/// `UNAUTHENTICATED`, counted as `session_replaced`). Revoking a device is
/// deleting its digest and restarting the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A file of token digests: one SHA-256 (64 hex digits) per line, `#`
    /// comments and blank lines ignored. Default: unset (no tokens needed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_tokens: Option<PathBuf>,
    /// How long a session lets a device start new work, in seconds, with or
    /// without `enrollment_tokens`. A task already handed out can be
    /// finished after expiry. At least `server.long_poll_secs + 30`.
    /// Default [`DEFAULT_SESSION_TTL_SECS`].
    pub session_ttl_secs: f64,
    /// Most live sessions one enrollment token holds (with
    /// `enrollment_tokens`): a join beyond it ends the token's oldest
    /// session, so a leaked or shared token cannot fill the device table.
    /// The link between a token and its sessions is not checkpointed: after
    /// a restart, sessions resumed from the checkpoint count for no token
    /// and end by `session_ttl_secs`. Default
    /// [`DEFAULT_MAX_SESSIONS_PER_TOKEN`].
    pub max_sessions_per_token: u32,
}

/// How much longer than `server.long_poll_secs` a session must last at
/// least (`auth.session_ttl_secs`): a device checks in, waits out the long
/// poll, and checks in again within this margin.
pub const SESSION_MARGIN_SECS: f64 = 30.0;

/// Default `auth.session_ttl_secs`: one hour.
pub const DEFAULT_SESSION_TTL_SECS: f64 = 3600.0;

/// Default `auth.max_sessions_per_token`: one device, one session.
pub const DEFAULT_MAX_SESSIONS_PER_TOKEN: u32 = 1;

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enrollment_tokens: None,
            session_ttl_secs: DEFAULT_SESSION_TTL_SECS,
            max_sessions_per_token: DEFAULT_MAX_SESSIONS_PER_TOKEN,
        }
    }
}

impl AuthConfig {
    /// How long a session lasts (valid after [`CoordinatorConfig::validate`]).
    pub fn session_ttl(&self) -> Duration {
        secs(self.session_ttl_secs)
    }
}

/// `[download]`: the wire format of model downloads. Each model version is
/// encoded once in it and the same bytes go to every device. See
/// [`fedrec_proto::codec`] for each encoding's error bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadConfig {
    /// `"f32"` (exact, 4 bytes a value), `"f16"` (IEEE half, 2 bytes) or
    /// `"q8"` (8-bit linear quantization per block of 256 values, about
    /// 1.03 bytes). Default `"f32"`.
    pub encoding: Encoding,
}

/// `[upload]`: the wire format of updates in plain training rounds. The
/// task tells each device; the coordinator decodes every encoding (and f32
/// from devices that do not know the one asked for). The encoding's error
/// enters the cohort's mean update (see [`fedrec_proto::codec`]). Secure
/// aggregation quantizes masked inputs itself (`secure_aggregation.bits`),
/// so it needs `"f32"` here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadConfig {
    /// `"f32"` (exact), `"f16"` or `"q8"`, as for `[download]`. Default
    /// `"f32"`.
    pub encoding: Encoding,
}

/// `[tls]`: the coordinator's certificate and key (PEM files), and the CA
/// whose certificates devices must present (mutual TLS). Relative paths are
/// relative to the working directory. The files are read when the server
/// starts ([`crate::tls::server_tls_config`]); here only their combination
/// is checked.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM (leaf first). Default: unset (no TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1). Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// CA certificate(s), PEM: when set, every device must present a
    /// certificate signed by one of them and valid now (mutual TLS), and a
    /// device without one is refused on its first request. It authenticates
    /// that a device holds a key the CA certified, not who the shopper is.
    /// Default: unset (devices are not authenticated by TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether the listener speaks TLS (a certificate is configured).
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

/// `[server]`: network and resource limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on, `IP:port`. Default [`DEFAULT_LISTEN`].
    pub listen: String,
    /// How long a CheckIn may wait for a task before answering Wait, in
    /// seconds. Default [`DEFAULT_LONG_POLL_SECS`].
    pub long_poll_secs: f64,
    /// How many uploads may stream in at once. Uploads are buffered whole
    /// before validation (4 bytes per model value each), so this bounds the
    /// coordinator's memory. Default [`DEFAULT_MAX_CONCURRENT_UPLOADS`].
    pub max_concurrent_uploads: usize,
    /// How many model downloads may stream out at once; more wait for a
    /// free slot. Each holds up to a chunk of encoded values and the
    /// transport's send buffer, so this bounds the coordinator's memory
    /// when a large cohort downloads together. Default
    /// [`DEFAULT_MAX_CONCURRENT_DOWNLOADS`].
    pub max_concurrent_downloads: usize,
    /// Most concurrent requests (HTTP/2 streams) on one connection; more
    /// are refused by the transport. Default
    /// [`DEFAULT_MAX_STREAMS_PER_CONNECTION`].
    pub max_streams_per_connection: u32,
    /// Most joins per minute from one IP address (a token bucket: bursts up
    /// to the limit); more get RESOURCE_EXHAUSTED, counted as
    /// `join_rate_limited`. 0 = no limit. Behind a load balancer every join
    /// comes from the balancer's address: set 0 and limit at the balancer,
    /// or raise it. Default [`DEFAULT_JOINS_PER_MINUTE_PER_SOURCE`].
    pub joins_per_minute_per_source: u32,
    /// Whether joins from loopback (127.0.0.0/8, ::1) count against
    /// `joins_per_minute_per_source`. Off, they are exempt: simulations join
    /// every device from 127.0.0.1, and a local proxy's or health checker's
    /// requests come from there too. Default: false.
    pub join_limit_loopback: bool,
    /// How many times one session may download the same model version
    /// (counted afresh whenever the device is selected for a round); more
    /// get RESOURCE_EXHAUSTED, counted as `download_limit`. Default
    /// [`DEFAULT_MAX_DOWNLOADS_PER_VERSION`].
    pub max_downloads_per_version: u32,
    /// Head start of a granted upload slot, in seconds: a reserved slot
    /// whose upload has not started within it is given to the next device
    /// (the reservation's lease), and an upload gets it on top of the time
    /// its bytes need at `upload_min_bytes_per_sec`. Default
    /// [`DEFAULT_UPLOAD_GRACE_SECS`].
    pub upload_grace_secs: f64,
    /// Slowest upload that keeps its slot, in bytes per second: an upload
    /// that has received `b` bytes must receive its next message within
    /// `upload_grace_secs + (b + one message) / upload_min_bytes_per_sec`
    /// of the slot's grant, or it loses the slot (`DEADLINE_EXCEEDED`,
    /// counted as `upload_stalled`), so that stalled devices cannot hold
    /// every slot until the round's deadline. Default
    /// [`DEFAULT_UPLOAD_MIN_BYTES_PER_SEC`].
    pub upload_min_bytes_per_sec: u64,
    /// Most connections open at once; one more is accepted and closed at
    /// once, and counted (`connection_limit`). Each idle connection holds
    /// about 27 KB (BENCHMARKS.md), and one file descriptor: the process's limit (`ulimit
    /// -n`) must allow this many. Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// A connection with no request in flight and none started or ended
    /// for this long is closed, in seconds (devices reconnect on their
    /// next request; a long poll keeps its connection busy). Default
    /// [`DEFAULT_IDLE_TIMEOUT_SECS`].
    pub idle_timeout_secs: f64,
    /// Interval of HTTP/2 keepalive pings on each connection, in seconds: a
    /// peer that does not answer within `keepalive_timeout_secs` is
    /// dropped, so connections to vanished devices do not linger. Default
    /// [`DEFAULT_KEEPALIVE_SECS`].
    pub keepalive_secs: f64,
    /// How long a keepalive ping may go unanswered, in seconds. Default
    /// [`DEFAULT_KEEPALIVE_TIMEOUT_SECS`].
    pub keepalive_timeout_secs: f64,
    /// How long a TLS handshake may take, in seconds; a client that opens a
    /// connection and says nothing is dropped after it. Default
    /// [`DEFAULT_TLS_HANDSHAKE_SECS`].
    pub tls_handshake_secs: f64,
}

/// Default `server.max_connections`: 50,000 (about 1 GB of idle connections).
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;
/// Default `server.idle_timeout_secs`: five minutes.
pub const DEFAULT_IDLE_TIMEOUT_SECS: f64 = 300.0;
/// Default `server.keepalive_secs`: one minute.
pub const DEFAULT_KEEPALIVE_SECS: f64 = 60.0;
/// Default `server.keepalive_timeout_secs`: 20 seconds.
pub const DEFAULT_KEEPALIVE_TIMEOUT_SECS: f64 = 20.0;
/// Default `server.tls_handshake_secs`: 10 seconds.
pub const DEFAULT_TLS_HANDSHAKE_SECS: f64 = 10.0;

/// Default `server.upload_grace_secs`: 10 seconds.
pub const DEFAULT_UPLOAD_GRACE_SECS: f64 = 10.0;
/// Default `server.upload_min_bytes_per_sec`: 64 KiB/s (512 kbit/s), what
/// a slow phone on a poor mobile network still uploads. A device that
/// stalls right after its header loses its slot after 10 s + 1 MiB at that
/// rate, about 27 s, well before the default 60 s deadline.
pub const DEFAULT_UPLOAD_MIN_BYTES_PER_SEC: u64 = 64 * 1024;

/// Default `server.joins_per_minute_per_source`: 60, one a second on
/// average. A device joins once per session (an hour by default), so even a
/// household or office of devices behind one NAT address stays far below
/// it, while one address cannot mint pseudonyms faster than 3,600 an hour.
pub const DEFAULT_JOINS_PER_MINUTE_PER_SOURCE: u32 = 60;

/// Default `server.max_downloads_per_version`: 4, the download a task
/// needs plus retries after dropped connections.
pub const DEFAULT_MAX_DOWNLOADS_PER_VERSION: u32 = 4;

/// Default `server.max_streams_per_connection`.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 1024;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            long_poll_secs: DEFAULT_LONG_POLL_SECS,
            max_concurrent_uploads: DEFAULT_MAX_CONCURRENT_UPLOADS,
            max_concurrent_downloads: DEFAULT_MAX_CONCURRENT_DOWNLOADS,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            joins_per_minute_per_source: DEFAULT_JOINS_PER_MINUTE_PER_SOURCE,
            join_limit_loopback: false,
            max_downloads_per_version: DEFAULT_MAX_DOWNLOADS_PER_VERSION,
            upload_grace_secs: DEFAULT_UPLOAD_GRACE_SECS,
            upload_min_bytes_per_sec: DEFAULT_UPLOAD_MIN_BYTES_PER_SEC,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            keepalive_secs: DEFAULT_KEEPALIVE_SECS,
            keepalive_timeout_secs: DEFAULT_KEEPALIVE_TIMEOUT_SECS,
            tls_handshake_secs: DEFAULT_TLS_HANDSHAKE_SECS,
        }
    }
}

impl ServerConfig {
    /// `upload_grace_secs` as a duration (valid after [`CoordinatorConfig::validate`]).
    pub fn upload_grace(&self) -> Duration {
        secs(self.upload_grace_secs)
    }

    /// `long_poll_secs` as a duration (valid after [`CoordinatorConfig::validate`]).
    pub fn long_poll(&self) -> Duration {
        secs(self.long_poll_secs)
    }

    /// `idle_timeout_secs` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        secs(self.idle_timeout_secs)
    }

    /// `keepalive_secs` as a duration.
    pub fn keepalive(&self) -> Duration {
        secs(self.keepalive_secs)
    }

    /// `keepalive_timeout_secs` as a duration.
    pub fn keepalive_timeout(&self) -> Duration {
        secs(self.keepalive_timeout_secs)
    }

    /// `tls_handshake_secs` as a duration.
    pub fn tls_handshake(&self) -> Duration {
        secs(self.tls_handshake_secs)
    }
}

/// `[rounds]`: how rounds are formed and ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundsConfig {
    /// Number of training rounds (completed or abandoned) before finishing;
    /// 0 runs forever. Default [`DEFAULT_ROUNDS`].
    pub rounds: u32,
    /// Updates wanted per training round. Default [`DEFAULT_CLIENTS_PER_ROUND`].
    pub clients_per_round: usize,
    /// Instead of a count, the fraction (0, 1] of the waiting devices to
    /// select; the round then starts when the check-in window passes (or every
    /// joined device is waiting). Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// Over-selection factor (>= 1): select `ceil(wanted * over_selection)`
    /// devices and complete the round as soon as `wanted` updates arrived, to
    /// absorb drop-outs. Default [`DEFAULT_OVER_SELECTION`].
    pub over_selection: f64,
    /// Fewest updates a round needs: a round still short of it at its deadline
    /// is abandoned (nothing applied), and a round starts after the check-in
    /// window only when at least this many devices wait. Default
    /// [`DEFAULT_MIN_UPDATES`].
    pub min_updates: usize,
    /// Seconds from a round's start to its deadline. Default [`DEFAULT_DEADLINE_SECS`].
    pub deadline_secs: f64,
    /// Seconds to wait for a full cohort, counted from when the first device
    /// started waiting (or the previous round ended); past it a round starts
    /// with the devices waiting, if at least `min_updates`. The window ends
    /// early when every joined device is waiting (and they are at least
    /// `min_updates`) and no device has joined for
    /// [`JOIN_SETTLE`](crate::round::JOIN_SETTLE): waiting longer could only
    /// bring new devices. Default
    /// [`DEFAULT_CHECKIN_WINDOW_SECS`].
    pub checkin_window_secs: f64,
    /// Ask training cohorts to evaluate the received model before training and
    /// report the counts with their update. Default [`DEFAULT_EVALUATE`].
    pub evaluate: bool,
    /// After the last training round, run one evaluation round with every
    /// joined device. Default [`DEFAULT_FINAL_EVALUATION`].
    pub final_evaluation: bool,
    /// Seed of the pseudonym and cohort-sampling RNG; unset = OS entropy.
    /// Set it for reproducible simulations only: with a known seed, pseudonyms
    /// (which act as the devices' credentials) are predictable. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Default for RoundsConfig {
    fn default() -> Self {
        Self {
            rounds: DEFAULT_ROUNDS,
            clients_per_round: DEFAULT_CLIENTS_PER_ROUND,
            fraction: None,
            over_selection: DEFAULT_OVER_SELECTION,
            min_updates: DEFAULT_MIN_UPDATES,
            deadline_secs: DEFAULT_DEADLINE_SECS,
            checkin_window_secs: DEFAULT_CHECKIN_WINDOW_SECS,
            evaluate: DEFAULT_EVALUATE,
            final_evaluation: DEFAULT_FINAL_EVALUATION,
            seed: None,
        }
    }
}

impl RoundsConfig {
    /// `deadline_secs` as a duration (valid after [`CoordinatorConfig::validate`]).
    pub fn deadline(&self) -> Duration {
        secs(self.deadline_secs)
    }

    /// `checkin_window_secs` as a duration (valid after [`CoordinatorConfig::validate`]).
    pub fn checkin_window(&self) -> Duration {
        secs(self.checkin_window_secs)
    }
}

/// `[training]`: local-training hyperparameters sent to devices with each task.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Local epochs over the device's purchases. Default [`DEFAULT_LOCAL_EPOCHS`].
    pub local_epochs: u32,
    /// Local SGD learning rate. Default [`DEFAULT_LEARNING_RATE`].
    pub learning_rate: f32,
    /// L2 regularization. Default [`DEFAULT_REGULARIZATION`].
    pub regularization: f32,
    /// Sampled negatives per positive. Default [`DEFAULT_NEGATIVES`].
    pub negatives: u32,
    /// FedProx proximal weight mu on the devices: the local objective gains
    /// `mu/2 ||w - w_global||^2`, which keeps local training near the global
    /// model. 0 = plain local SGD. Default [`DEFAULT_PROXIMAL_MU`].
    pub proximal_mu: f32,
    /// The devices' training objective: "bpr" (sampled negatives, local SGD)
    /// or "als" (weighted least squares over all items, exact private
    /// vector, one exact gradient per round). Default "bpr".
    pub loss: LossName,
    /// Confidence of a purchase under "als". Default [`DEFAULT_CONFIDENCE`].
    pub confidence: f32,
}

/// The devices' training objective (see the client's `model::Loss`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossName {
    /// BPR over sampled negatives.
    #[default]
    Bpr,
    /// Weighted least squares over all items.
    Als,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            local_epochs: DEFAULT_LOCAL_EPOCHS,
            learning_rate: DEFAULT_LEARNING_RATE,
            regularization: DEFAULT_REGULARIZATION,
            negatives: DEFAULT_NEGATIVES,
            proximal_mu: DEFAULT_PROXIMAL_MU,
            loss: LossName::Bpr,
            confidence: DEFAULT_CONFIDENCE,
        }
    }
}

/// Which server optimizer combines the round's mean update into the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StrategyName {
    /// `x += server_lr * mean_update` (McMahan et al. 2017).
    #[default]
    FedAvg,
    /// FedAvg with server momentum.
    FedAvgM,
    /// Adaptive: Adam on the server (Reddi et al. 2021).
    FedAdam,
    /// Adaptive: Yogi on the server (Reddi et al. 2021).
    FedYogi,
    /// Adaptive: Adagrad on the server (Reddi et al. 2021).
    FedAdagrad,
    /// Under `training.loss = "als"` only: each item embedding moves by
    /// `server_lr (2M + 2λ/N I)⁻¹ Δ_i`, the mean gradient preconditioned by
    /// the loss's curvature, where `M` is the cohort's mean of `x xᵀ` over
    /// the devices' solved private vectors (each device appends its `x xᵀ`
    /// to its update; only the cohort's mean is used), `λ` the
    /// regularization and `N` the number of joined devices. For an item
    /// nobody in the cohort bought this is the exact item step of
    /// centralized ALS; so federated training converges in about as many
    /// visits per shopper as ALS needs iterations. Not with differential
    /// privacy: clipping the update would clip `x xᵀ` with it.
    Als,
    /// EASE (Steck 2019), for the client's `Ease` model: each device's
    /// update is the upper triangle of its own co-purchase matrix `x xᵀ`;
    /// the step sums the cohort's (mean × devices), adds `ease_lambda` to
    /// the diagonal and publishes the inverse's upper triangle as the new
    /// model, replacing the old one. One round with every device is EASE
    /// on all their data. Needs uniform weighting and the plain mean.
    Ease,
}

/// `[strategy]`: the server optimizer and its hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StrategyConfig {
    /// The optimizer. Default `fedavg`.
    pub name: StrategyName,
    /// Server learning rate η. Default [`DEFAULT_SERVER_LR`].
    pub server_lr: f32,
    /// Momentum μ of `fedavgm`. Default [`DEFAULT_MOMENTUM`].
    pub momentum: f32,
    /// First-moment decay β1 of the adaptive optimizers. Default [`DEFAULT_BETA1`].
    pub beta1: f32,
    /// Second-moment decay β2 of `fedadam` and `fedyogi`. Default [`DEFAULT_BETA2`].
    pub beta2: f32,
    /// Adaptivity τ of the adaptive optimizers (also `sqrt` of the initial
    /// second moment). Default [`DEFAULT_TAU`].
    pub tau: f32,
    /// How updates are weighted in the round's mean. Default `examples`.
    pub weighting: Weighting,
    /// Under `weighting = "examples"` in plain rounds: the most examples an
    /// update's weight counts (a device claiming more weighs this much), so
    /// that no device sets the round's mean by claiming a huge
    /// `num_examples`; the count is self-reported and unverifiable. Secure
    /// rounds cap at `secure_aggregation.max_examples` instead. Default
    /// [`DEFAULT_MAX_EXAMPLES`].
    pub max_examples: u64,
    /// How the server learning rate changes over the rounds. Default `constant`.
    pub schedule: Schedule,
    /// How a round's updates are combined: "mean", or, against broken or
    /// hostile devices, "trimmed_mean" or "median" (coordinate-wise; they
    /// keep every update of the round in memory and need individual updates,
    /// so not with secure aggregation or differential privacy). Default "mean".
    pub aggregation: Aggregation,
    /// Under "trimmed_mean": the fraction of values dropped at each end of
    /// every coordinate, in `[0, 0.5)`. Default [`DEFAULT_TRIM_FRACTION`].
    pub trim_fraction: f64,
    /// Scale every plain update down to at most this L2 norm before
    /// aggregating it (norm bounding). With secure aggregation the
    /// coordinator cannot see norms; devices clip then under `[privacy]`.
    /// Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm_bound: Option<f32>,
    /// Under `ease`: the L2 weight λ added to the co-purchase matrix's
    /// diagonal. Default [`DEFAULT_EASE_LAMBDA`].
    pub ease_lambda: f32,
}

/// Default `strategy.ease_lambda` (the middle of the EASE grid the
/// baselines search; `--preset auto` chooses it on validation).
pub const DEFAULT_EASE_LAMBDA: f32 = 200.0;

/// Default `strategy.max_examples` (and `secure_aggregation.max_examples`):
/// 1,000 purchases, more than nearly every shopper's history, so honest
/// devices keep their FedAvg weights while one device weighs at most 1,000
/// times the smallest.
pub const DEFAULT_MAX_EXAMPLES: u64 = 1000;

/// Default `strategy.trim_fraction`.
pub const DEFAULT_TRIM_FRACTION: f64 = 0.1;

/// How a round's updates are combined into one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// The weighted mean (FedAvg), folded as updates arrive.
    #[default]
    Mean,
    /// Per coordinate, the mean of the values left after dropping
    /// `trim_fraction` of them at each end (Yin et al. 2018); unweighted.
    TrimmedMean,
    /// Per coordinate, the median; unweighted.
    Median,
}

/// The server learning rate of each round, as a multiple of `server_lr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// `server_lr` in every round.
    #[default]
    Constant,
    /// Cosine decay from `server_lr` in the first round towards 0 after the
    /// last (`rounds.rounds` must be finite): late rounds take small steps,
    /// so the final model is an average over many cohorts rather than the
    /// last cohort's noisy step (Loshchilov & Hutter 2017).
    Cosine,
}

impl Schedule {
    /// The multiplier of `server_lr` in round `round` (1-based) of `total`.
    pub fn factor(self, round: u64, total: u64) -> f32 {
        match self {
            Self::Constant => 1.0,
            Self::Cosine => {
                let progress = round.saturating_sub(1) as f64 / total.max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())) as f32
            }
        }
    }
}

/// The weight of each device's update in the round's mean.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weighting {
    /// By the device's number of examples (FedAvg, McMahan et al. 2017).
    #[default]
    Examples,
    /// Every device equally: the mean of per-device gradients, which is the
    /// gradient of the sum of the users' losses (right for the "als" loss).
    Uniform,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        Self {
            name: StrategyName::FedAvg,
            server_lr: DEFAULT_SERVER_LR,
            momentum: DEFAULT_MOMENTUM,
            beta1: DEFAULT_BETA1,
            beta2: DEFAULT_BETA2,
            tau: DEFAULT_TAU,
            weighting: Weighting::Examples,
            max_examples: DEFAULT_MAX_EXAMPLES,
            schedule: Schedule::Constant,
            aggregation: Aggregation::Mean,
            trim_fraction: DEFAULT_TRIM_FRACTION,
            norm_bound: None,
            ease_lambda: DEFAULT_EASE_LAMBDA,
        }
    }
}

/// `[model]`: how the CLI builds the initial model. The coordinator core never
/// reads it: it receives a layout and parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Embedding size k. Default [`DEFAULT_FACTORS`].
    pub factors: usize,
    /// Standard deviation of the initial item embeddings. Default [`DEFAULT_INIT_STD`].
    pub init_std: f32,
    /// Seed of the initial parameters. Default [`DEFAULT_MODEL_SEED`].
    pub seed: u64,
    /// Catalog size; unset = taken from the data set. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub items: Option<usize>,
    /// The largest model the coordinator accepts, in bytes as f32 (4 per
    /// value; `items × factors` for the CLI's matrix factorization). The
    /// coordinator holds several copies of the model (parameters, the
    /// encoded download, the round's sum, optimizer moments, each upload
    /// in flight), so its memory is several times this. Checked at
    /// start-up, before anything is allocated. Default
    /// [`DEFAULT_MODEL_MAX_BYTES`].
    pub max_bytes: u64,
}

/// Default `model.max_bytes`: 1 GiB, 268 million values (4 million items
/// × 64 factors).
pub const DEFAULT_MODEL_MAX_BYTES: u64 = 1 << 30;

impl ModelConfig {
    /// Checks that a model of `values` values (described by `what`, such as
    /// "model.items × model.factors = 100 × 32") fits `max_bytes`.
    /// The error names both numbers.
    pub fn check_size(&self, values: u64, what: &str) -> Result<(), String> {
        let bytes = values.saturating_mul(4);
        if bytes <= self.max_bytes {
            return Ok(());
        }
        Err(format!(
            "{what} = {values} values ({bytes} bytes as f32) is more than model.max_bytes = {}; \
             the coordinator holds several copies of the model, so raise model.max_bytes only \
             where the memory is there",
            self.max_bytes
        ))
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            factors: DEFAULT_FACTORS,
            init_std: DEFAULT_INIT_STD,
            seed: DEFAULT_MODEL_SEED,
            items: None,
            max_bytes: DEFAULT_MODEL_MAX_BYTES,
        }
    }
}

/// Default `secure_aggregation.range`: every update value is clipped to
/// `[-range, range]`. Measured (see [`SecureAggregationConfig::range`]): the
/// largest value of any update of the default (BPR) recipe on generated data
/// and MovieLens-100K is about 0.35, and of the ALS recipe about 0.15.
pub const DEFAULT_SECAGG_RANGE: f32 = 1.0;
/// Default `secure_aggregation.bits`.
pub const DEFAULT_SECAGG_BITS: u32 = fedrec_proto::secagg::config::DEFAULT_BITS;
/// Default `secure_aggregation.threshold`: two thirds of the neighbours.
pub const DEFAULT_SECAGG_THRESHOLD: f64 = fedrec_proto::secagg::config::DEFAULT_THRESHOLD;
/// Default `secure_aggregation.max_examples`.
pub const DEFAULT_SECAGG_MAX_EXAMPLES: u64 = DEFAULT_MAX_EXAMPLES;
/// Default `secure_aggregation.step_secs`.
pub const DEFAULT_SECAGG_STEP_SECS: f64 = 30.0;

/// `[secure_aggregation]`: SecAgg+ (Bonawitz et al. 2017, Bell et al. 2020)
/// over each training round, so that the coordinator learns the sum of the
/// cohort's updates and never one device's update. Evaluation rounds stay
/// plain (they carry counts, not updates).
///
/// Updates are clipped to `[-range, range]` per value and quantized with
/// `bits` bits into integers modulo 2³²; the cohort (`clients_per_round ×
/// over_selection` devices) must stay within `⌊(2³² − 1) / (2^bits − 2)⌋`
/// (4,096 at 20 bits) so that the sum cannot overflow. A round needs at
/// least 2 devices, and is abandoned (nothing applied) when too few devices
/// remain at some step to remove the masks.
///
/// Weighting under secure aggregation: `strategy.weighting = "examples"`
/// makes each device scale its clipped update by `min(examples,
/// max_examples) / max_examples` and add that weight as one more masked
/// value; the coordinator divides the summed updates by the summed weight
/// (FedAvg's weighted mean, with each device's count hidden). `"uniform"`
/// weighs every update 1. See `fedrec_proto::secagg::payload`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecureAggregationConfig {
    /// Run training rounds through secure aggregation. Default false.
    pub enabled: bool,
    /// Neighbours per device, `k`; unset: `2 · ⌈log2 n⌉` for a cohort of `n`
    /// (14 for 100 devices, 18 for 500). At most 255. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neighbours: Option<usize>,
    /// Shares needed to reconstruct a device's secret, as a fraction of its
    /// neighbours, in `(0.5, 1]`. Each device tolerates `1 − threshold` of
    /// its neighbours dropping out; its update stays hidden unless about
    /// `(2 · threshold − 1) · k` of its neighbours collude with the
    /// coordinator. Default [`DEFAULT_SECAGG_THRESHOLD`].
    pub threshold: f64,
    /// Clipping bound of every update value (and so the quantization range).
    /// Values beyond it are cut, so it must cover the updates the recipe
    /// produces; the quantization step grows with it. Default
    /// [`DEFAULT_SECAGG_RANGE`], about 3 times the largest update value
    /// measured with the default and preset recipes, so that nothing is
    /// clipped in practice.
    pub range: f32,
    /// Bits per quantized value, in `2..=31`: a worst-case error of `range /
    /// (2^bits − 2)` per value (1e-6 · range at 20 bits), and cohorts of at
    /// most `⌊(2³² − 1) / (2^bits − 2)⌋` devices. Default [`DEFAULT_SECAGG_BITS`].
    pub bits: u32,
    /// Under `strategy.weighting = "examples"`: the example count at which a
    /// device's weight reaches 1 (devices with more count as this many).
    /// Default [`DEFAULT_SECAGG_MAX_EXAMPLES`].
    pub max_examples: u64,
    /// Deadline of the key advertisement, key sharing and unmasking steps,
    /// each counted from its start, in seconds. The masked-input step (during
    /// which devices train) ends at the round's `rounds.deadline_secs`, and
    /// never less than `step_secs` after it began. Default
    /// [`DEFAULT_SECAGG_STEP_SECS`].
    pub step_secs: f64,
}

impl Default for SecureAggregationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            neighbours: None,
            threshold: DEFAULT_SECAGG_THRESHOLD,
            range: DEFAULT_SECAGG_RANGE,
            bits: DEFAULT_SECAGG_BITS,
            max_examples: DEFAULT_SECAGG_MAX_EXAMPLES,
            step_secs: DEFAULT_SECAGG_STEP_SECS,
        }
    }
}

impl SecureAggregationConfig {
    /// The protocol's configuration, as devices receive it.
    pub fn protocol(&self) -> fedrec_proto::secagg::SecAggConfig {
        fedrec_proto::secagg::SecAggConfig {
            neighbours: self.neighbours,
            threshold: self.threshold,
            range: self.range,
            bits: self.bits,
        }
    }

    /// `step_secs` as a duration (valid after [`CoordinatorConfig::validate`]).
    pub fn step(&self) -> Duration {
        secs(self.step_secs)
    }

    /// How devices weigh their updates under `weighting`.
    pub fn weighting(&self, weighting: Weighting) -> fedrec_proto::secagg::payload::Weighting {
        match weighting {
            Weighting::Uniform => fedrec_proto::secagg::payload::Weighting::Uniform,
            Weighting::Examples => fedrec_proto::secagg::payload::Weighting::Examples {
                max_examples: self.max_examples,
            },
        }
    }
}

/// Default `privacy.noise_multiplier`.
pub const DEFAULT_NOISE_MULTIPLIER: f64 = 1.0;
/// Default `privacy.clip`.
pub const DEFAULT_CLIP: f32 = 1.0;
/// Default `privacy.delta`.
pub const DEFAULT_DELTA: f64 = 1e-5;
/// Default `privacy.target_quantile`.
pub const DEFAULT_TARGET_QUANTILE: f64 = 0.5;
/// Default `privacy.clip_learning_rate`.
pub const DEFAULT_CLIP_LEARNING_RATE: f64 = 0.2;

/// Where the Gaussian noise of DP-FedAvg is added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpMode {
    /// No differential privacy.
    #[default]
    Off,
    /// The coordinator clips each plain update (devices clip too) and adds
    /// the noise to the sum: the coordinator is trusted with the noise.
    Central,
    /// Each device clips its update and adds its share of the noise before
    /// secure aggregation, so the coordinator never sees a sum with less
    /// noise than promised. Needs `secure_aggregation.enabled`.
    Distributed,
}

impl fmt::Display for DpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Central => "central",
            Self::Distributed => "distributed",
        })
    }
}

/// `[privacy]`: user-level DP-FedAvg (McMahan et al. 2018).
///
/// Every training round Poisson-samples its cohort (each waiting device
/// with probability `sampling_rate`), bounds each device's update to L2
/// norm `clip`, adds Gaussian noise of standard deviation
/// `noise_multiplier × clip` to the sum, and divides by the expected cohort
/// (`sampling_rate ×` the devices waiting), never by the count received. A
/// Rényi-DP accountant states the (ε, δ) spent; a round that would exceed
/// `epsilon_budget` is refused and training ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// "off", "central" or "distributed". Default "off".
    pub mode: DpMode,
    /// z: the noise's standard deviation over the clipping bound. Default
    /// [`DEFAULT_NOISE_MULTIPLIER`].
    pub noise_multiplier: f64,
    /// C: the L2 bound of each device's whole update (the starting bound
    /// under `adaptive_clip`). Default [`DEFAULT_CLIP`].
    pub clip: f32,
    /// q: the probability that a waiting device is sampled into a training
    /// round. Required when `mode` is not "off".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling_rate: Option<f64>,
    /// The largest ε the training may spend at `delta`; unset = no limit
    /// (ε is still reported). Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_budget: Option<f64>,
    /// δ of the stated (ε, δ); keep it below 1 / population. Default
    /// [`DEFAULT_DELTA`].
    pub delta: f64,
    /// Adapt the clipping bound to a quantile of the update norms (Andrew
    /// et al. 2021), with part of the noise budget spent on a noisy count of
    /// the updates within the bound. Default false.
    pub adaptive_clip: bool,
    /// Under `adaptive_clip`: the fraction of updates the bound aims to
    /// leave unclipped. Default [`DEFAULT_TARGET_QUANTILE`].
    pub target_quantile: f64,
    /// Under `adaptive_clip`: the bound's geometric learning rate. Default
    /// [`DEFAULT_CLIP_LEARNING_RATE`].
    pub clip_learning_rate: f64,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            mode: DpMode::Off,
            noise_multiplier: DEFAULT_NOISE_MULTIPLIER,
            clip: DEFAULT_CLIP,
            sampling_rate: None,
            epsilon_budget: None,
            delta: DEFAULT_DELTA,
            adaptive_clip: false,
            target_quantile: DEFAULT_TARGET_QUANTILE,
            clip_learning_rate: DEFAULT_CLIP_LEARNING_RATE,
        }
    }
}

impl PrivacyConfig {
    /// Differential privacy is on.
    pub fn enabled(&self) -> bool {
        self.mode != DpMode::Off
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

fn invalid(message: String) -> CoordinatorError {
    CoordinatorError::InvalidConfig(message)
}

/// Checks that `value` is finite and within `[lo, hi]` (or `(lo, hi]` when `open_lo`).
fn check_range(
    name: &str,
    value: f64,
    lo: f64,
    open_lo: bool,
    hi: f64,
) -> Result<(), CoordinatorError> {
    let ok_lo = if open_lo { value > lo } else { value >= lo };
    if value.is_finite() && ok_lo && value <= hi {
        return Ok(());
    }
    let (lo, hi, value) = (Number(lo), Number(hi), Number(value));
    let lo_text = if open_lo {
        format!("> {lo}")
    } else {
        format!(">= {lo}")
    };
    let text = if hi.0.is_finite() {
        format!("{name} must be {lo_text} and <= {hi}, got {value}")
    } else {
        format!("{name} must be finite and {lo_text}, got {value}")
    };
    Err(invalid(text))
}

/// Longest time accepted for the `*_secs` options (one year), so that
/// deadlines never overflow an `Instant`.
const MAX_SECS: f64 = 365.0 * 24.0 * 3600.0;

impl CoordinatorConfig {
    /// Parses and validates a configuration from TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, CoordinatorError> {
        let config: Self = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, CoordinatorError> {
        let path = path.as_ref();
        let file_error = |message: String| CoordinatorError::ConfigFile {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        let config: Self = toml::from_str(&text).map_err(|e| file_error(e.to_string()))?;
        config.validate().map_err(|e| match e {
            CoordinatorError::InvalidConfig(message) => file_error(message),
            other => other,
        })?;
        Ok(config)
    }

    /// The configuration as TOML text (every option, defaults included).
    pub fn to_toml_string(&self) -> Result<String, CoordinatorError> {
        toml::to_string(self).map_err(|e| invalid(e.to_string()))
    }

    /// Checks every option's range; the first problem found is reported.
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        self.validate_tls()?;
        check_range(
            "auth.session_ttl_secs",
            self.auth.session_ttl_secs,
            0.0,
            true,
            MAX_SECS,
        )?;
        let s = &self.server;
        s.listen.parse::<SocketAddr>().map_err(|_| {
            invalid(format!(
                "server.listen must be an IP:port address such as {DEFAULT_LISTEN:?}, got {:?}",
                s.listen
            ))
        })?;
        check_range(
            "server.long_poll_secs",
            s.long_poll_secs,
            0.0,
            true,
            MAX_SECS,
        )?;
        if s.max_streams_per_connection < 1 {
            return Err(invalid(
                "server.max_streams_per_connection must be >= 1, got 0".to_owned(),
            ));
        }
        if s.max_downloads_per_version < 1 || self.auth.max_sessions_per_token < 1 {
            return Err(invalid(format!(
                "server.max_downloads_per_version and auth.max_sessions_per_token must be >= 1, \
                 got {} and {}",
                s.max_downloads_per_version, self.auth.max_sessions_per_token
            )));
        }
        check_range(
            "server.upload_grace_secs",
            s.upload_grace_secs,
            0.0,
            true,
            MAX_SECS,
        )?;
        for (name, value) in [
            ("server.idle_timeout_secs", s.idle_timeout_secs),
            ("server.keepalive_secs", s.keepalive_secs),
            ("server.keepalive_timeout_secs", s.keepalive_timeout_secs),
            ("server.tls_handshake_secs", s.tls_handshake_secs),
        ] {
            check_range(name, value, 0.0, true, MAX_SECS)?;
        }
        if s.max_connections < 1 {
            return Err(invalid(
                "server.max_connections must be >= 1, got 0".to_owned(),
            ));
        }
        if s.upload_min_bytes_per_sec < 1 {
            return Err(invalid(
                "server.upload_min_bytes_per_sec must be >= 1, got 0".to_owned(),
            ));
        }
        if s.max_concurrent_uploads < 1 || s.max_concurrent_downloads < 1 {
            return Err(invalid(format!(
                "server.max_concurrent_uploads and server.max_concurrent_downloads must be >= 1, \
                 got {} and {}",
                s.max_concurrent_uploads, s.max_concurrent_downloads
            )));
        }

        let shortest = s.long_poll_secs + SESSION_MARGIN_SECS;
        if self.auth.session_ttl_secs < shortest {
            return Err(invalid(format!(
                "auth.session_ttl_secs must be at least server.long_poll_secs + {} = {}, got {}: \
                 a shorter session can end in the middle of a check-in",
                Number(SESSION_MARGIN_SECS),
                Number(shortest),
                Number(self.auth.session_ttl_secs)
            )));
        }

        let r = &self.rounds;
        if r.clients_per_round < 1 {
            return Err(invalid(format!(
                "rounds.clients_per_round must be >= 1, got {}",
                r.clients_per_round
            )));
        }
        if let Some(f) = r.fraction {
            check_range("rounds.fraction", f, 0.0, true, 1.0)?;
        }
        check_range(
            "rounds.over_selection",
            r.over_selection,
            1.0,
            false,
            1000.0,
        )?;
        if r.min_updates < 1 {
            return Err(invalid(format!(
                "rounds.min_updates must be >= 1, got {}",
                r.min_updates
            )));
        }
        if r.fraction.is_none() && r.min_updates > r.clients_per_round {
            return Err(invalid(format!(
                "rounds.min_updates ({}) must be <= rounds.clients_per_round ({})",
                r.min_updates, r.clients_per_round
            )));
        }
        check_range("rounds.deadline_secs", r.deadline_secs, 0.0, true, MAX_SECS)?;
        check_range(
            "rounds.checkin_window_secs",
            r.checkin_window_secs,
            0.0,
            false,
            MAX_SECS,
        )?;

        let t = &self.training;
        fedrec_proto::limits::Training {
            local_epochs: t.local_epochs.into(),
            learning_rate: t.learning_rate.into(),
            regularization: t.regularization.into(),
            proximal_mu: t.proximal_mu.into(),
            confidence: t.confidence.into(),
            negatives: t.negatives.into(),
        }
        .check()
        .map_err(|e| {
            invalid(format!(
                "training.{e}: devices refuse a task outside this range"
            ))
        })?;

        let st = &self.strategy;
        check_range(
            "strategy.server_lr",
            st.server_lr.into(),
            0.0,
            true,
            f64::INFINITY,
        )?;
        check_range(
            "strategy.momentum",
            st.momentum.into(),
            0.0,
            false,
            0.999_999,
        )?;
        check_range("strategy.beta1", st.beta1.into(), 0.0, false, 0.999_999)?;
        check_range("strategy.beta2", st.beta2.into(), 0.0, false, 0.999_999)?;
        check_range("strategy.tau", st.tau.into(), 0.0, true, f64::INFINITY)?;
        if st.max_examples < 1 {
            return Err(invalid(
                "strategy.max_examples must be >= 1, got 0".to_owned(),
            ));
        }
        check_range(
            "strategy.trim_fraction",
            st.trim_fraction,
            0.0,
            false,
            0.499_999,
        )?;
        if let Some(bound) = st.norm_bound {
            check_range("strategy.norm_bound", bound.into(), 0.0, true, 1e30)?;
        }
        if st.aggregation != Aggregation::Mean
            && (self.secure_aggregation.enabled || self.privacy.enabled())
        {
            return Err(invalid(format!(
                "strategy.aggregation = {:?} needs every update on its own, so it works \
                 neither with secure aggregation nor with differential privacy; use \
                 \"mean\" there (devices bound their norms under [privacy])",
                st.aggregation
            )));
        }
        if st.name == StrategyName::Als {
            if t.loss != LossName::Als {
                return Err(invalid(
                    "strategy.name = \"als\" preconditions by the ALS loss's curvature, so it needs \
                     training.loss = \"als\""
                        .to_owned(),
                ));
            }
            if self.privacy.enabled() {
                return Err(invalid(
                    "strategy.name = \"als\" does not work with differential privacy: each device \
                     appends its x xᵀ to its update, and clipping the update for privacy would \
                     distort it; use \"fedadam\" under [privacy]"
                        .to_owned(),
                ));
            }
            if st.aggregation != Aggregation::Mean {
                return Err(invalid(format!(
                    "strategy.name = \"als\" needs the mean of the devices' x xᵀ, which \
                     strategy.aggregation = {:?} does not give (a coordinate-wise rule can make \
                     it indefinite); use \"mean\" with strategy.norm_bound against outliers",
                    st.aggregation
                )));
            }
        }
        if st.name == StrategyName::Ease {
            let conflict = if st.weighting != Weighting::Uniform {
                Some(
                    "strategy.weighting = \"uniform\" (a weighted mean is not the sum of the co-purchases)",
                )
            } else if st.aggregation != Aggregation::Mean || st.norm_bound.is_some() {
                Some(
                    "strategy.aggregation = \"mean\" without strategy.norm_bound (either would change the counts)",
                )
            } else if self.privacy.enabled() {
                Some("[privacy] off (clipping a device's co-purchases is not implemented for it)")
            } else {
                None
            };
            if let Some(need) = conflict {
                return Err(invalid(format!(
                    "strategy.name = \"ease\" sums the devices' co-purchase counts, so it needs {need}"
                )));
            }
            if !(st.ease_lambda > 0.0 && st.ease_lambda.is_finite()) {
                return Err(invalid(format!(
                    "strategy.ease_lambda must be a positive number, got {}",
                    st.ease_lambda
                )));
            }
        }
        if st.schedule == Schedule::Cosine && self.rounds.rounds == 0 {
            return Err(invalid(
                "strategy.schedule = \"cosine\" decays over rounds.rounds, which must then be finite (not 0)"
                    .to_owned(),
            ));
        }

        let m = &self.model;
        if m.factors < 1 {
            return Err(invalid(format!(
                "model.factors must be >= 1, got {}",
                m.factors
            )));
        }
        check_range(
            "model.init_std",
            m.init_std.into(),
            0.0,
            false,
            f64::INFINITY,
        )?;
        if m.items == Some(0) {
            return Err(invalid(
                "model.items must be >= 1 when set, got 0".to_owned(),
            ));
        }
        if let Some(items) = m.items {
            m.check_size(
                (items as u64).saturating_mul(m.factors as u64),
                &format!("model.items × model.factors = {items} × {}", m.factors),
            )
            .map_err(invalid)?;
        }
        self.validate_secure_aggregation()?;
        self.validate_privacy()
    }

    fn validate_tls(&self) -> Result<(), CoordinatorError> {
        let t = &self.tls;
        match (&t.cert, &t.key) {
            (Some(_), None) => Err(invalid(
                "tls.cert is set but tls.key is not: TLS needs both the certificate and its private key"
                    .to_owned(),
            )),
            (None, Some(_)) => Err(invalid(
                "tls.key is set but tls.cert is not: TLS needs both the certificate and its private key"
                    .to_owned(),
            )),
            (None, None) if t.client_ca.is_some() => Err(invalid(
                "tls.client_ca (mutual TLS) needs tls.cert and tls.key: devices can only present \
                 certificates over TLS"
                    .to_owned(),
            )),
            _ => Ok(()),
        }
    }

    fn validate_privacy(&self) -> Result<(), CoordinatorError> {
        let p = &self.privacy;
        check_range(
            "privacy.noise_multiplier",
            p.noise_multiplier,
            0.0,
            false,
            1e4,
        )?;
        check_range("privacy.clip", p.clip.into(), 0.0, true, 1e30)?;
        check_range("privacy.delta", p.delta, 0.0, true, 0.1)?;
        if let Some(eps) = p.epsilon_budget {
            check_range("privacy.epsilon_budget", eps, 0.0, true, 1e6)?;
        }
        check_range(
            "privacy.target_quantile",
            p.target_quantile,
            0.0,
            false,
            1.0,
        )?;
        check_range(
            "privacy.clip_learning_rate",
            p.clip_learning_rate,
            0.0,
            false,
            10.0,
        )?;
        if !p.enabled() {
            return Ok(());
        }
        let Some(q) = p.sampling_rate else {
            return Err(invalid(format!(
                "privacy.mode = \"{}\" needs privacy.sampling_rate, the probability that a \
                 device is sampled into a round (the accountant's q)",
                p.mode
            )));
        };
        check_range("privacy.sampling_rate", q, 0.0, true, 1.0)?;
        if self.strategy.weighting != Weighting::Uniform {
            return Err(invalid(
                "privacy.mode bounds every device's contribution, so it needs \
                 strategy.weighting = \"uniform\""
                    .to_owned(),
            ));
        }
        if p.mode == DpMode::Distributed && !self.secure_aggregation.enabled {
            return Err(invalid(
                "privacy.mode = \"distributed\" needs secure_aggregation.enabled = true: \
                 without it the coordinator sees each device's noisy update"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    fn validate_secure_aggregation(&self) -> Result<(), CoordinatorError> {
        let sa = &self.secure_aggregation;
        // The protocol's messages name the field without the section.
        sa.protocol().validate().map_err(|e| {
            let text = match e {
                fedrec_proto::secagg::SecAggError::InvalidConfig(text) => text,
                other => other.to_string(),
            };
            invalid(format!("secure_aggregation.{text}"))
        })?;
        if sa.max_examples < 1 {
            return Err(invalid(
                "secure_aggregation.max_examples must be >= 1, got 0".to_owned(),
            ));
        }
        check_range(
            "secure_aggregation.step_secs",
            sa.step_secs,
            0.0,
            true,
            MAX_SECS,
        )?;
        if !sa.enabled {
            return Ok(());
        }
        if self.upload.encoding != Encoding::F32 {
            return Err(invalid(format!(
                "upload.encoding = \"{}\" cannot be used with secure_aggregation.enabled: \
                 secure aggregation quantizes masked inputs itself (secure_aggregation.bits); \
                 set upload.encoding = \"f32\"",
                self.upload.encoding
            )));
        }
        let max = fedrec_proto::secagg::Quantizer::new(sa.range, sa.bits)
            .map_err(|e| invalid(format!("secure_aggregation: {e}")))?
            .max_summands();
        let r = &self.rounds;
        let selected = ((r.clients_per_round as f64) * r.over_selection).ceil();
        if r.fraction.is_none() && selected > max as f64 {
            return Err(invalid(format!(
                "secure_aggregation: a cohort of {selected} devices (rounds.clients_per_round × \
                 rounds.over_selection) could overflow the sum of {}-bit values, which holds at \
                 most {max}; lower secure_aggregation.bits or the cohort",
                sa.bits
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn privacy_needs_a_sampling_rate_uniform_weighting_and_secagg_when_distributed() {
        let err = |text: &str| {
            CoordinatorConfig::from_toml_str(text)
                .unwrap_err()
                .to_string()
        };
        let e = err("[privacy]\nmode = \"central\"\n");
        assert!(e.contains("privacy.sampling_rate"), "{e}");
        let e = err("[privacy]\nmode = \"central\"\nsampling_rate = 0.1\n");
        assert!(e.contains("strategy.weighting"), "{e}");
        let uniform = "[strategy]\nweighting = \"uniform\"\n";
        let e = err(&format!(
            "{uniform}[privacy]\nmode = \"distributed\"\nsampling_rate = 0.1\n"
        ));
        assert!(e.contains("secure_aggregation.enabled"), "{e}");
        let e = err(&format!(
            "{uniform}[privacy]\nmode = \"central\"\nsampling_rate = 1.5\n"
        ));
        assert!(e.contains("privacy.sampling_rate"), "{e}");
        let ok = CoordinatorConfig::from_toml_str(&format!(
            "{uniform}[secure_aggregation]\nenabled = true\n[privacy]\nmode = \"distributed\"\n\
             sampling_rate = 0.1\nepsilon_budget = 8.0\nadaptive_clip = true\n"
        ))
        .unwrap();
        assert_eq!(ok.privacy.mode, DpMode::Distributed);
        assert_eq!(ok.privacy.epsilon_budget, Some(8.0));
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = CoordinatorConfig::from_toml_str("").unwrap();
        assert_eq!(config, CoordinatorConfig::default());
        assert_eq!(config.server.listen, DEFAULT_LISTEN);
        assert_eq!(config.rounds.deadline(), Duration::from_secs(60));
        assert_eq!(config.strategy.name, StrategyName::FedAvg);
    }

    #[test]
    fn round_trips_through_toml() {
        let mut config = CoordinatorConfig::default();
        config.rounds.seed = Some(3);
        config.rounds.fraction = Some(0.5);
        config.strategy.name = StrategyName::FedYogi;
        config.model.items = Some(100);
        config.download.encoding = Encoding::Q8;
        config.upload.encoding = Encoding::F16;
        let text = config.to_toml_string().unwrap();
        assert!(text.contains("name = \"fedyogi\""), "{text}");
        assert!(text.contains("[download]\nencoding = \"q8\""), "{text}");
        assert!(text.contains("[upload]\nencoding = \"f16\""), "{text}");
        assert_eq!(CoordinatorConfig::from_toml_str(&text).unwrap(), config);
    }

    #[test]
    fn integers_are_accepted_for_seconds() {
        let config = CoordinatorConfig::from_toml_str(
            "[rounds]\ndeadline_secs = 5\ncheckin_window_secs = 0.25\n",
        )
        .unwrap();
        assert_eq!(config.rounds.deadline(), Duration::from_secs(5));
        assert_eq!(config.rounds.checkin_window(), Duration::from_millis(250));
    }

    #[test]
    fn errors_name_the_problem() {
        let err =
            CoordinatorConfig::from_toml_str("[rounds]\nclients_per_round = 0\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: rounds.clients_per_round must be >= 1, got 0"
        );
        let err = CoordinatorConfig::from_toml_str("[rounds]\nclient_per_round = 3\n").unwrap_err();
        assert!(err.to_string().contains("client_per_round"), "{err}");
        let err = CoordinatorConfig::from_toml_str("[strategy]\nname = \"sgd\"\n").unwrap_err();
        assert!(err.to_string().contains("sgd"), "{err}");
        let err = CoordinatorConfig::from_toml_str("[rounds]\nover_selection = 0.5\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("rounds.over_selection must be >= 1"),
            "{err}"
        );
        let err = CoordinatorConfig::from_toml_str("[download]\nencoding = \"q4\"\n").unwrap_err();
        assert!(
            err.to_string().contains("q4") && err.to_string().contains("f16"),
            "{err}"
        );
        let err = CoordinatorConfig::from_toml_str(
            "[upload]\nencoding = \"q8\"\n[secure_aggregation]\nenabled = true\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("upload.encoding = \"q8\"")
                && err.to_string().contains("secure_aggregation.bits"),
            "{err}"
        );
        let err = CoordinatorConfig::from_toml_str("[strategy]\nbeta2 = 1.0\n").unwrap_err();
        assert!(err.to_string().contains("strategy.beta2"), "{err}");
        let err = CoordinatorConfig::from_toml_str("[server]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(err.to_string().contains("server.listen"), "{err}");
        let err =
            CoordinatorConfig::from_toml_str("[rounds]\nclients_per_round = 2\nmin_updates = 3\n")
                .unwrap_err();
        assert!(err.to_string().contains("min_updates (3)"), "{err}");
        let err = CoordinatorConfig::from_toml_str("[strategy]\nname = \"als\"\n").unwrap_err();
        assert!(err.to_string().contains("training.loss = \"als\""), "{err}");
        // Issue 19, item 3: a session must outlast a long poll.
        let err = CoordinatorConfig::from_toml_str("[auth]\nsession_ttl_secs = 2\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: auth.session_ttl_secs must be at least \
             server.long_poll_secs + 30 = 40, got 2: a shorter session can end in the middle \
             of a check-in"
        );
        // Issue 19, item 10: a huge number is written short.
        let err =
            CoordinatorConfig::from_toml_str("[rounds]\ndeadline_secs = 1e300\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: rounds.deadline_secs must be > 0 and <= 31536000, got 1e300"
        );
        let als = "[training]\nloss = \"als\"\n[strategy]\nname = \"als\"\n";
        assert!(CoordinatorConfig::from_toml_str(als).is_ok());
        let err = CoordinatorConfig::from_toml_str(&format!(
            "{als}[privacy]\nmode = \"central\"\nsampling_rate = 0.1\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("differential privacy"), "{err}");
        let err = CoordinatorConfig::from_toml_str(&format!("{als}aggregation = \"median\"\n"))
            .unwrap_err();
        assert!(err.to_string().contains("x xᵀ"), "{err}");
    }

    /// Issue 19, items 6 and 7: the coordinator refuses training settings
    /// every device would refuse (one definition, `fedrec_proto::limits`),
    /// and a model larger than its memory budget, naming both numbers.
    #[test]
    fn settings_devices_refuse_and_oversized_models_are_refused() {
        for (line, message) in [
            (
                "learning_rate = 20",
                "training.learning_rate must be in (0, 10], got 20",
            ),
            (
                "local_epochs = 3000",
                "training.local_epochs must be in [1, 1000], got 3000",
            ),
            (
                "regularization = 11",
                "training.regularization must be in [0, 10]",
            ),
            (
                "proximal_mu = 101",
                "training.proximal_mu must be in [0, 100]",
            ),
            (
                "negatives = 1001",
                "training.negatives must be in [1, 1000]",
            ),
        ] {
            let err = CoordinatorConfig::from_toml_str(&format!("[training]\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(message), "{line}: {err}");
            assert!(err.contains("devices refuse"), "{err}");
        }
        let limits = fedrec_proto::limits::LEARNING_RATE;
        let edge = format!("[training]\nlearning_rate = {}\n", limits.hi);
        assert!(CoordinatorConfig::from_toml_str(&edge).is_ok());

        let err = CoordinatorConfig::from_toml_str("[model]\nitems = 100000000\nfactors = 64\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("100000000 × 64 = 6400000000 values (25600000000 bytes as f32)")
                && err.contains("model.max_bytes = 1073741824"),
            "{err}"
        );
        let fits = "[model]\nitems = 100000000\nfactors = 64\nmax_bytes = 30000000000\n";
        assert!(CoordinatorConfig::from_toml_str(fits).is_ok());
    }

    #[test]
    fn secure_aggregation_section_is_validated() {
        let c = CoordinatorConfig::from_toml_str(
            "[secure_aggregation]\nenabled = true\nthreshold = 0.75\nrange = 0.5\nbits = 16\nneighbours = 8\n",
        )
        .unwrap();
        let sa = &c.secure_aggregation;
        assert!(sa.enabled);
        assert_eq!(sa.protocol().params(100).unwrap().neighbours, 8);
        assert_eq!(sa.protocol().params(100).unwrap().threshold, 6);
        assert_eq!(
            CoordinatorConfig::default().secure_aggregation.range,
            DEFAULT_SECAGG_RANGE
        );
        for (body, needle) in [
            ("threshold = 0.5", "secure_aggregation.threshold must be"),
            (
                "bits = 0",
                "secure_aggregation.bits must be in 2..=31, got 0",
            ),
            (
                "range = -1",
                "secure_aggregation.range must be finite and > 0, got -1",
            ),
            (
                "neighbours = 0",
                "secure_aggregation.neighbours must be in 1..=255",
            ),
            (
                "max_examples = 0",
                "secure_aggregation.max_examples must be >= 1",
            ),
            ("step_secs = 0", "secure_aggregation.step_secs must be"),
            ("thresold = 0.7", "thresold"),
            // 30-bit values: a sum of at most 4 cannot hold a cohort of 10.
            ("enabled = true\nbits = 30", "could overflow"),
        ] {
            let err = CoordinatorConfig::from_toml_str(&format!("[secure_aggregation]\n{body}\n"))
                .unwrap_err();
            assert!(err.to_string().contains(needle), "{body}: {err}");
        }
        // The same bits are fine while the section is disabled.
        CoordinatorConfig::from_toml_str("[secure_aggregation]\nbits = 30\n").unwrap();
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.toml");
        let err = CoordinatorConfig::from_file(&path).unwrap_err();
        assert!(err.to_string().contains("coordinator.toml"), "{err}");

        std::fs::write(&path, "[rounds]\nmin_updates = 0\n").unwrap();
        let err = CoordinatorConfig::from_file(&path).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("coordinator.toml")
                && text.contains("rounds.min_updates must be >= 1, got 0"),
            "{text}"
        );

        std::fs::write(&path, "[rounds\n").unwrap();
        let err = CoordinatorConfig::from_file(&path).unwrap_err();
        assert!(err.to_string().contains("coordinator.toml"), "{err}");

        std::fs::write(&path, "[rounds]\nrounds = 3\n").unwrap();
        assert_eq!(
            CoordinatorConfig::from_file(&path).unwrap().rounds.rounds,
            3
        );
    }
}
