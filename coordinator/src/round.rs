//! The round state machine: joins, check-ins, cohort selection, updates,
//! deadlines and the global model, with no I/O.
//!
//! [`RoundCore`] is driven by method calls that take the current time
//! (`now: Instant`) from the caller; it never reads a clock, never sleeps and
//! never touches the network. Its randomness (pseudonyms, cohort sampling)
//! comes from one ChaCha RNG seeded by `rounds.seed` (or OS entropy), so the
//! same seed and the same sequence of calls give the same rounds.
//!
//! The life of a round:
//! 1. devices [`join`](RoundCore::join) and [`check_in`](RoundCore::check_in);
//!    a device without a task waits in the pool;
//! 2. when the pool holds the wanted cohort (or the check-in window has
//!    passed with at least `min_updates` waiting, or every joined device
//!    waits and they are at least `min_updates`), a cohort is sampled from
//!    it and the round opens; the cohort's next check-in returns a [`Task`];
//! 3. the cohort submits updates ([`submit_update`](RoundCore::submit_update))
//!    or, in evaluation rounds, counts ([`submit_evaluation`](RoundCore::submit_evaluation));
//! 4. the round ends when enough updates arrived, or at its deadline
//!    ([`poll`](RoundCore::poll)); a completed training round applies the
//!    strategy to the weighted-mean update and bumps the model version.
//!
//! With `secure_aggregation.enabled`, a training round collects masked
//! inputs through the four steps of SecAgg+ instead of plain updates, and
//! the coordinator learns only their sum: see [`secure`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use fedrec_proto::codec::{EncodedModel, Encoding};
use fedrec_proto::{Layout, tensor};

use crate::CoordinatorError;
use crate::aggregate::{Aggregator, EvalCounts};
use crate::auth::TokenId;
use crate::checkpoint::{Checkpoint, PrivacyState};
use crate::config::{CoordinatorConfig, TrainingConfig, ValidConfig};
pub use crate::history::{RoundSummary, TaskKind};
use crate::privacy::{Mechanism, NoisySum, RoundPrivacy, TaskPrivacy};
use crate::strategy::Strategy;

pub mod buffered;
mod close;
pub mod cluster;
pub mod secagg;
mod selection;
mod sessions;

use sessions::Session;

pub use secagg::{
    SecurePoll, SecureSum, SecureSummary, SecureTask, SecureWant, UnmaskDone, UnmaskJob,
};

/// A device's random 128-bit pseudonym; nothing else identifies a device.
///
/// It acts as the device's credential for every later request, so it is
/// drawn from a cryptographic RNG. Written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pseudonym([u8; 16]);

impl fmt::Display for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Pseudonym {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pseudonym({self})")
    }
}

impl FromStr for Pseudonym {
    type Err = CoordinatorError;

    /// Parses 32 hex digits; anything else is an unknown pseudonym.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CoordinatorError::UnknownPseudonym);
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| CoordinatorError::UnknownPseudonym)?;
        }
        Ok(Self(out))
    }
}

/// Work handed to a selected device.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    /// Train or evaluate.
    pub kind: TaskKind,
    /// The round's number (from 1).
    pub round: u32,
    /// The model version to download and to name in the submission.
    pub model_version: u64,
    /// When the round stops accepting submissions.
    pub deadline: Instant,
    /// Local-training hyperparameters.
    pub training: TrainingConfig,
    /// Evaluate the downloaded model before training (always true for
    /// evaluation tasks) and report the counts.
    pub evaluate: bool,
    /// Set when the update goes through secure aggregation: the device's
    /// party and the protocol's configuration.
    pub secure_aggregation: Option<SecureTask>,
    /// Set when the round runs under differential privacy (training tasks
    /// only): the clipping and noise the device applies, and the (ε, δ).
    pub privacy: Option<TaskPrivacy>,
    /// How the device encodes its update (`[upload] encoding`; f32 in
    /// secure rounds, whose masked inputs are quantized by the protocol).
    pub upload_encoding: Encoding,
    /// Append the upper triangle of `x xᵀ` to the update (training tasks
    /// of the `als` strategy; see the client's `TrainingConfig::user_moment`).
    pub user_moment: bool,
    /// A trial of the settings search (`[model] preset = "auto"`): the
    /// device trains without its own validation purchase and evaluates on
    /// it (see [`RoundCore::start_run`]).
    pub validation: bool,
}

/// The answer to a check-in.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum CheckIn {
    /// The device is in the open round's cohort.
    Task(Task),
    /// Nothing for this device now; it waits in the pool. Checking in again
    /// after `retry_after` (the time to the next deadline or window expiry,
    /// at most `server.long_poll_secs`) is enough not to miss a timed event.
    Wait {
        /// Suggested delay before the next check-in.
        retry_after: Duration,
    },
    /// All rounds are done; the device may stop.
    Finished {
        /// Why.
        reason: String,
    },
}

/// One version of the global model, encoded once and shared by every download.
#[derive(Debug)]
pub struct ModelSnapshot {
    /// Version, from 1; bumped by every completed training round.
    pub version: u64,
    /// Names and shapes of the tensors.
    pub layout: Layout,
    /// The parameters, tensors concatenated in layout order.
    pub params: Vec<f32>,
    /// `params` in the configured download encoding, ready to stream.
    pub download: EncodedModel,
}

impl ModelSnapshot {
    fn new(version: u64, layout: Layout, params: Vec<f32>, encoding: Encoding) -> Self {
        Self {
            version,
            layout,
            download: EncodedModel::new(&params, encoding),
            params,
        }
    }
}

/// The header of an update, parsed from the wire.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateHeader {
    /// The submitting device.
    pub pseudonym: Pseudonym,
    /// The round the update belongs to.
    pub round: u32,
    /// The model version it was computed from.
    pub model_version: u64,
    /// Local examples behind it: its FedAvg weight (>= 1).
    pub num_examples: u64,
    /// Number of values announced (must equal the model's).
    pub num_values: u64,
    /// Counts from evaluating the downloaded model before training, when asked.
    pub evaluation: Option<EvalCounts>,
}

/// A submission was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateAccepted {
    /// The round.
    pub round: u32,
    /// Submissions the round has accepted so far, this one included.
    pub accepted: usize,
}

/// How long joins must have been quiet before a round starts early because
/// every joined device is waiting (devices starting together join within
/// moments of each other; this keeps the first round from starting with the
/// first of them alone).
pub const JOIN_SETTLE: Duration = Duration::from_secs(1);

/// Something that happened, reported by [`RoundCore::poll`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A round opened.
    RoundStarted {
        /// Its number.
        round: u32,
        /// Training or evaluation.
        kind: TaskKind,
        /// The model version its cohort works on.
        model_version: u64,
        /// Devices selected.
        selected: usize,
    },
    /// A round completed or was abandoned.
    RoundEnded(RoundSummary),
    /// All rounds are done.
    Finished {
        /// Why.
        reason: String,
    },
}

/// A snapshot of the core's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CoordinatorStatus {
    /// The open round, or else the last one started (0 before the first).
    pub round: u32,
    /// The open round's kind, if a round is open.
    pub open: Option<TaskKind>,
    /// The current model version.
    pub model_version: u64,
    /// All rounds are done.
    pub finished: bool,
    /// Devices that joined.
    pub joined: usize,
    /// Devices waiting in the pool.
    pub waiting: usize,
    /// Devices selected for the open round.
    pub selected: usize,
    /// Submissions accepted in the open round.
    pub accepted: usize,
    /// The current run is a trial of the settings search.
    pub trial: bool,
    /// A trial's rounds are done and the next run has not started
    /// ([`RoundCore::start_run`]).
    pub between_runs: bool,
}

#[derive(Debug)]
struct OpenRound {
    number: u32,
    kind: TaskKind,
    model_version: u64,
    started: Instant,
    deadline: Instant,
    /// Selected devices, and whether each has submitted.
    cohort: BTreeMap<Pseudonym, bool>,
    /// Accepted submissions that complete the round before its deadline.
    needed: usize,
    accepted: usize,
    evaluation: EvalCounts,
    /// Secure aggregation, in training rounds when it is enabled.
    secure: Option<secagg::SecureRound>,
    /// Differential privacy, in training rounds when it is enabled.
    privacy: Option<RoundPrivacy>,
}

/// The coordinator's sans-IO core. See the [module docs](self).
#[derive(Debug)]
pub struct RoundCore {
    config: ValidConfig,
    rng: ChaCha20Rng,
    /// Secure aggregation's randomness (graph seeds), apart from `rng` so
    /// that turning it on does not change pseudonyms or cohorts.
    secure_rng: ChaCha20Rng,
    joined: BTreeSet<Pseudonym>,
    /// Every joined device's session (`auth.session_ttl_secs`), and the
    /// ended ones not yet forgotten (see [`sweep`](Self::sweep)).
    sessions: BTreeMap<Pseudonym, Session>,
    /// Each enrollment token's sessions, oldest first (at most
    /// `auth.max_sessions_per_token` live; ended ones are dropped at the
    /// token's next join). Not checkpointed.
    token_sessions: BTreeMap<TokenId, VecDeque<Pseudonym>>,
    /// When expired sessions are next swept out of `joined` and the pool.
    next_session_sweep: Option<Instant>,
    /// Devices waiting for a task (always a subset of `joined`).
    pool: BTreeSet<Pseudonym>,
    /// When the check-in window started counting: the first check-in into an
    /// empty pool while no round is open, or the end of the last round.
    window_start: Option<Instant>,
    /// When a device last joined: the check-in window ends early only once
    /// joins have been quiet for [`JOIN_SETTLE`].
    last_join: Option<Instant>,
    model: Arc<ModelSnapshot>,
    strategy: Strategy,
    aggregator: Aggregator,
    open: Option<OpenRound>,
    /// Number of the last round started (0 = none).
    last_round: u32,
    training_rounds: u32,
    final_evaluation_done: bool,
    finished: Option<String>,
    history: Vec<RoundSummary>,
    rejections: BTreeMap<&'static str, u64>,
    events: VecDeque<Event>,
    generation: u64,
    /// The devices handed a task since the last [`take_handed`](Self::take_handed),
    /// once a transport asked for them with [`watch_handed`](Self::watch_handed).
    handed: Option<Vec<Pseudonym>>,
    last_secure_sum: Option<SecureSum>,
    /// DP-FedAvg's accountant, clipping bound and noise, when enabled.
    privacy: Option<Mechanism>,
    /// Why training stopped before `rounds.rounds` (the privacy budget).
    training_stopped: Option<String>,
    /// Async mode's step being filled, while training.
    buffer: Option<buffered::Buffer>,
    /// The current run is a trial of the settings search: its tasks ask
    /// devices to hold out their validation purchase, and when its rounds
    /// are done the core waits for [`start_run`](Self::start_run) instead
    /// of finishing.
    trial: bool,
    /// The last round before the current run (the search's trials run
    /// before the final run): the learning-rate schedule counts from it.
    run_start: u32,
    /// A trial's rounds are done and the next run has not started.
    between_runs: bool,
    /// A replica of a replicated coordinator (see [`cluster`]).
    replica: Option<cluster::Replica>,
}

impl RoundCore {
    /// A core for the model `params` (laid out as `layout`), which becomes
    /// model version 1. Fails on a model larger than `model.max_bytes`, a
    /// parameter count that does not match the layout, or a non-finite
    /// parameter.
    pub fn new(
        config: ValidConfig,
        layout: Layout,
        params: Vec<f32>,
    ) -> Result<Self, CoordinatorError> {
        config
            .model
            .check_size(layout.num_values() as u64, "the model's layout")
            .map_err(CoordinatorError::InvalidModel)?;
        if params.len() != layout.num_values() {
            return Err(CoordinatorError::InvalidModel(format!(
                "the layout has {} values, but {} parameters were given",
                layout.num_values(),
                params.len()
            )));
        }
        tensor::check_finite(&params).map_err(|e| CoordinatorError::InvalidModel(e.to_string()))?;
        let (rng, secure_rng) = match config.rounds.seed {
            Some(seed) => (
                ChaCha20Rng::seed_from_u64(seed),
                ChaCha20Rng::seed_from_u64(seed ^ 0x5ECA_6650_5ECA_6650),
            ),
            None => (rand::make_rng(), rand::make_rng()),
        };
        let strategy =
            Strategy::new(config.strategy, &layout).map_err(CoordinatorError::InvalidModel)?;
        let n = params.len() + strategy.extra_values();
        let privacy = config.privacy.enabled().then(|| {
            Mechanism::new(
                config.privacy.clone(),
                config.rounds.min_updates,
                config.rounds.seed,
            )
        });
        Ok(Self {
            strategy,
            aggregator: Aggregator::with_rule(
                n,
                config.strategy.aggregation,
                config.strategy.trim_fraction,
            ),
            model: Arc::new(ModelSnapshot::new(
                1,
                layout,
                params,
                config.download.encoding,
            )),
            config,
            rng,
            secure_rng,
            joined: BTreeSet::new(),
            sessions: BTreeMap::new(),
            token_sessions: BTreeMap::new(),
            next_session_sweep: None,
            pool: BTreeSet::new(),
            window_start: None,
            last_join: None,
            open: None,
            last_round: 0,
            training_rounds: 0,
            final_evaluation_done: false,
            finished: None,
            history: Vec::new(),
            rejections: BTreeMap::new(),
            events: VecDeque::new(),
            generation: 0,
            handed: None,
            last_secure_sum: None,
            privacy,
            training_stopped: None,
            buffer: None,
            trial: false,
            run_start: 0,
            between_runs: false,
            replica: None,
        })
    }

    /// A core that carries on from `checkpoint` (see [`crate::checkpoint`])
    /// at `now`: its model, optimizer moments, counters, history, joined
    /// devices (each with a fresh session of `auth.session_ttl_secs` from
    /// `now`, so that those that never come back are swept) and privacy
    /// accountant. Refuses a checkpoint that does not fit `config` and
    /// `layout` (another model size or optimizer, or differential privacy
    /// switched on or off since), saying which.
    pub fn resume(
        config: ValidConfig,
        layout: Layout,
        checkpoint: Checkpoint,
        now: Instant,
    ) -> Result<Self, CoordinatorError> {
        let Checkpoint {
            model_version,
            last_round,
            run_start,
            training_rounds,
            final_evaluation_done,
            training_stopped,
            history,
            joined,
            privacy,
            params,
            m,
            v,
        } = checkpoint;
        let mut core = Self::new(config, layout.clone(), params)?;
        let invalid = |message: String| CoordinatorError::InvalidModel(message);
        core.strategy.restore_moments(m, v).map_err(invalid)?;
        let params = std::mem::take(
            &mut Arc::get_mut(&mut core.model)
                .expect("not shared yet")
                .params,
        );
        core.model = Arc::new(ModelSnapshot::new(
            model_version,
            layout,
            params,
            core.config.download.encoding,
        ));
        if let Some(refused) = core.privacy_refusal(privacy.as_ref(), "the checkpoint was", true) {
            return Err(refused);
        }
        core.set_privacy(privacy);
        core.joined = joined
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(format!("a joined pseudonym: {e}")))?;
        let expires = now + core.config.auth.session_ttl();
        core.sessions = core
            .joined
            .iter()
            .map(|p| (*p, Session::new(expires)))
            .collect();
        core.last_round = last_round;
        core.run_start = run_start;
        core.training_rounds = training_rounds;
        core.final_evaluation_done = final_evaluation_done;
        core.training_stopped = training_stopped;
        core.history = history;
        if let Some(seed) = core.config.rounds.seed {
            // Carry on with fresh, still reproducible streams.
            let mix = u64::from(last_round).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            core.rng = ChaCha20Rng::seed_from_u64(seed ^ mix);
            core.secure_rng = ChaCha20Rng::seed_from_u64(seed ^ mix ^ 0x5ECA_6650_5ECA_6650);
        }
        core.finish_if_done();
        core.events.clear();
        Ok(core)
    }

    /// Makes the current run a trial of the settings search (see
    /// [`start_run`](Self::start_run)): its tasks carry `validation`, and
    /// when its rounds are done the core waits for the next run instead of
    /// finishing.
    pub fn into_trial(mut self) -> Self {
        self.trial = true;
        self
    }

    /// Starts the next run once a trial's rounds are done: `config` with
    /// the model `params` laid out as `layout` (a new shape is allowed),
    /// which become the next model version; a trial again if `trial`.
    /// Joined devices, their sessions and the waiting pool carry over;
    /// round numbers go on counting, and the new run's learning-rate
    /// schedule starts afresh. The previous run's optimizer state is
    /// dropped.
    ///
    /// # Errors
    /// Not between runs; a model that does not fit `model.max_bytes` or its
    /// layout, or is not finite; differential privacy (a run cannot start
    /// under a guarantee, nor leave one).
    pub fn start_run(
        &mut self,
        now: Instant,
        config: ValidConfig,
        layout: Layout,
        params: Vec<f32>,
        trial: bool,
    ) -> Result<(), CoordinatorError> {
        if !self.between_runs {
            return Err(CoordinatorError::InvalidConfig(
                "a new run starts only after a trial's rounds are done".to_owned(),
            ));
        }
        if config.privacy.enabled() || self.privacy.is_some() {
            return Err(CoordinatorError::InvalidConfig(
                "a settings search cannot run under differential privacy: every trial would \
                 spend privacy budget"
                    .to_owned(),
            ));
        }
        let seed = config.rounds.seed;
        let mut next = Self::new(config, layout, params)?;
        let version = self.model.version + 1;
        let model = Arc::get_mut(&mut next.model).expect("not shared yet");
        model.version = version;
        self.model = next.model;
        self.strategy = next.strategy;
        self.aggregator = next.aggregator;
        self.config = next.config;
        if seed.is_some() {
            // Same seed, same cohorts: trials differ only in their settings.
            self.rng = next.rng;
            self.secure_rng = next.secure_rng;
        }
        self.run_start = self.last_round;
        self.training_rounds = 0;
        self.final_evaluation_done = false;
        self.training_stopped = None;
        self.buffer = None;
        self.trial = trial;
        self.between_runs = false;
        self.window_start = (!self.pool.is_empty()).then_some(now);
        self.generation += 1;
        self.advance(now);
        Ok(())
    }

    /// The durable state as of the last ended round (see
    /// [`crate::checkpoint`]); an open round (or async step being filled)
    /// is left out, as if it had not started. Its privacy cost stays counted, which can only overstate ε.
    /// It holds the devices whose sessions were live when that round ended
    /// (every round's end sweeps the ended sessions out).
    pub fn checkpoint(&self) -> Checkpoint {
        let (m, v) = self.strategy.moments();
        let (last_round, training_rounds) = self.checkpoint_counters();
        Checkpoint {
            model_version: self.model.version,
            last_round,
            run_start: self.run_start,
            training_rounds,
            final_evaluation_done: self.final_evaluation_done,
            training_stopped: self.training_stopped.clone(),
            history: self.history.clone(),
            joined: self.joined.iter().map(ToString::to_string).collect(),
            privacy: self.privacy_state(),
            params: self.model.params.clone(),
            m: m.to_vec(),
            v: v.to_vec(),
        }
    }

    /// Differential privacy's durable state: the accountant's ledger and
    /// the clipping bound (None without differential privacy).
    pub fn privacy_state(&self) -> Option<PrivacyState> {
        self.privacy.as_ref().map(|mechanism| PrivacyState {
            ledger: mechanism.accountant().ledger().clone(),
            clip: mechanism.clip(),
        })
    }

    /// Why differential privacy's state saved by `source` ("the checkpoint
    /// was") cannot be restored here: it was saved without differential
    /// privacy while this core runs with it and training has `started` (a
    /// guarantee cannot start in the middle of training), or with it while
    /// this core runs without (that would void the stated guarantee).
    fn privacy_refusal(
        &self,
        state: Option<&PrivacyState>,
        source: &str,
        started: bool,
    ) -> Option<CoordinatorError> {
        let refused = match (&self.privacy, state) {
            (Some(_), None) if started => format!(
                "{source} made without differential privacy; a privacy guarantee cannot \
                 start in the middle of training"
            ),
            (None, Some(_)) => format!(
                "{source} made under differential privacy; going on without it would void \
                 the stated guarantee (set privacy.mode as before)"
            ),
            _ => return None,
        };
        Some(CoordinatorError::InvalidModel(refused))
    }

    /// Takes differential privacy's saved state (checked by
    /// [`privacy_refusal`](Self::privacy_refusal) first). No state before
    /// training started means a fresh accountant.
    fn set_privacy(&mut self, state: Option<PrivacyState>) {
        if let Some(mechanism) = self.privacy.as_mut() {
            match state {
                Some(state) => mechanism.restore(state.ledger, state.clip),
                None => mechanism.reset(),
            }
        }
    }

    /// The last round and the training rounds ended: an open round (or an
    /// async step being filled) is left out. A replica counts only what
    /// the leader ended.
    fn checkpoint_counters(&self) -> (u32, u32) {
        if self.replica.is_some() {
            return (self.last_round, self.training_rounds);
        }
        let open = self.open.as_ref();
        let filling = u32::from(self.buffer.is_some());
        (
            self.last_round - u32::from(open.is_some()) - filling,
            self.training_rounds
                - u32::from(open.is_some_and(|o| o.kind == TaskKind::Train))
                - filling,
        )
    }

    /// A device asks for work: its task if it is in the open round's cohort
    /// and has not submitted yet; otherwise it joins the waiting pool (which
    /// may start a round that selects it) and is told to wait, or that all
    /// rounds are done.
    pub fn check_in(
        &mut self,
        now: Instant,
        pseudonym: &Pseudonym,
    ) -> Result<CheckIn, CoordinatorError> {
        self.advance(now);
        if !self.joined.contains(pseudonym) {
            // A session that ended (and maybe was swept out) is still
            // recognised, once.
            let err = match self.sessions.remove(pseudonym) {
                Some(s) if s.replaced => CoordinatorError::SessionReplaced,
                Some(_) => CoordinatorError::SessionExpired,
                None => CoordinatorError::UnknownPseudonym,
            };
            return Err(self.reject(err));
        }
        if self.sessions.get(pseudonym).is_none_or(|s| !s.live(now)) {
            // Told once: the device's next check-in is `unknown_pseudonym`.
            self.end_session(pseudonym);
            self.sessions.remove(pseudonym);
            return Err(self.reject(CoordinatorError::SessionExpired));
        }
        if let Some(reason) = &self.finished {
            return Ok(CheckIn::Finished {
                reason: reason.clone(),
            });
        }
        if let Some(task) = self.pending_task(pseudonym) {
            return Ok(CheckIn::Task(task));
        }
        // A resting device is kept out of training, not out of the final
        // evaluation.
        let training = self.buffered_training() || self.next_kind() == Some(TaskKind::Train);
        if training && let Some(rest) = self.resting(pseudonym, now) {
            // Neither a task nor the pool while it rests.
            return Ok(CheckIn::Wait { retry_after: rest });
        }
        if self.buffered_training()
            && let Some(task) = self.admit_buffered(now, pseudonym)
        {
            return Ok(CheckIn::Task(task));
        }
        if self.pool.insert(*pseudonym) && self.open.is_none() && self.window_start.is_none() {
            self.window_start = Some(now);
        }
        self.advance(now);
        if let Some(task) = self.pending_task(pseudonym) {
            return Ok(CheckIn::Task(task));
        }
        let long_poll =
            Duration::try_from_secs_f64(self.config.server.long_poll_secs).unwrap_or(Duration::MAX);
        let retry_after = self.poll_timeout().map_or(long_poll, |t| {
            t.saturating_duration_since(now).min(long_poll)
        });
        Ok(CheckIn::Wait { retry_after })
    }

    /// Checks an update's header against the open round without its values,
    /// so that a transport can refuse an upload before receiving it. Returns
    /// the round's deadline. Rejections are counted.
    pub fn check_update_header(
        &mut self,
        now: Instant,
        header: &UpdateHeader,
    ) -> Result<Instant, CoordinatorError> {
        self.advance(now);
        match self.check_header(header) {
            Ok(_) => Ok(match self.buffered_task(&header.pseudonym) {
                Some(task) => task.deadline,
                None => self.open.as_ref().map_or(now, |o| o.deadline),
            }),
            Err(e) => {
                let e = self.refuse_update(&header.pseudonym, e);
                // A slot freed by the refusal is drawn for at once.
                self.advance(now);
                Err(e)
            }
        }
    }

    /// A device submits its update: `values` holds `header.num_values`
    /// little-endian `f32` values (the change to the global parameters).
    /// Everything is checked before the update touches the round's sum; a
    /// rejected update changes nothing but the rejection counts.
    pub fn submit_update(
        &mut self,
        now: Instant,
        header: UpdateHeader,
        values: &[u8],
    ) -> Result<UpdateAccepted, CoordinatorError> {
        self.advance(now);
        let clip = self
            .open
            .as_ref()
            .and_then(|o| o.privacy.as_ref())
            .map(|p| p.task.clip);
        let result = self.check_header(&header).and_then(|discount| {
            let weight = match self.config.strategy.weighting {
                crate::config::Weighting::Examples => {
                    header.num_examples.min(self.config.strategy.max_examples)
                }
                crate::config::Weighting::Uniform => 1,
            };
            // Central DP bounds every update (weight 1: validated uniform);
            // otherwise the optional norm bound does.
            let bound = clip.or(self.config.strategy.norm_bound);
            let model_values = self.model.params.len();
            self.aggregator
                .add_discounted(values, bound, weight, discount, model_values)?;
            Ok(self.record_submission(&header.pseudonym, header.evaluation.as_ref()))
        });
        let result = result.map_err(|e| self.refuse_update(&header.pseudonym, e));
        self.advance(now);
        result
    }

    /// A device selected for an evaluation round reports its counts.
    pub fn submit_evaluation(
        &mut self,
        now: Instant,
        pseudonym: &Pseudonym,
        round: u32,
        model_version: u64,
        counts: EvalCounts,
    ) -> Result<UpdateAccepted, CoordinatorError> {
        self.advance(now);
        let result = self
            .check_submission(pseudonym, round, model_version, TaskKind::Evaluate)
            .and_then(|()| crate::aggregate::validate_counts(&counts))
            .map(|()| self.record_submission(pseudonym, Some(&counts)))
            .map_err(|e| self.reject(e));
        self.advance(now);
        result
    }

    /// A device asks for the model: the current snapshot, if the device
    /// joined, names the current version (or, in async mode, the version of
    /// its task) and has not downloaded it
    /// `server.max_downloads_per_version` times already (counted afresh
    /// whenever the device is selected for a round, so that rounds
    /// abandoned without a new version cannot lock it out). Rejections are
    /// counted.
    pub fn download(
        &mut self,
        pseudonym: &Pseudonym,
        model_version: u64,
    ) -> Result<Arc<ModelSnapshot>, CoordinatorError> {
        let limit = self.config.server.max_downloads_per_version;
        if !self.joined.contains(pseudonym) {
            return Err(self.reject(CoordinatorError::UnknownPseudonym));
        }
        // In async mode a task may name a version the model has since moved
        // past: the device gets the current one, and its update is still
        // weighed by its staleness from the version its task named (an
        // over-estimate, so a conservative discount).
        let issued = self
            .buffered_task(pseudonym)
            .is_some_and(|t| t.model_version == model_version);
        if model_version != self.model.version && !issued {
            return Err(self.reject(CoordinatorError::WrongModelVersion {
                got: model_version,
                current: self.model.version,
            }));
        }
        let Some(session) = self.sessions.get_mut(pseudonym) else {
            return Err(self.reject(CoordinatorError::UnknownPseudonym));
        };
        let (version, count) = &mut session.downloads;
        if *version != model_version {
            (*version, *count) = (model_version, 0);
        }
        if *count >= limit {
            return Err(self.reject(CoordinatorError::DownloadLimit {
                version: model_version,
                limit,
            }));
        }
        *count += 1;
        Ok(self.model())
    }

    /// Processes what is due at `now` (round completion, deadlines, window
    /// expiry, the next round's start) and returns every event since the
    /// last call, including those caused by check-ins and submissions.
    pub fn poll(&mut self, now: Instant) -> Vec<Event> {
        self.advance(now);
        self.events.drain(..).collect()
    }

    /// When [`poll`](Self::poll) next has something to do by itself: the open
    /// round's deadline, or the check-in window's expiry. `None` when only a
    /// device's request can change anything.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.finished.is_some() {
            return None;
        }
        if let Some(timeout) = self.buffer_timeout() {
            return timeout;
        }
        if let Some(open) = &self.open {
            return match &open.secure {
                Some(secure) => secure.poll_timeout(),
                None => Some(open.deadline),
            };
        }
        // A replica opens rounds on the leader's orders, not on a window.
        if self.replica.is_some() {
            return None;
        }
        let start = self.window_start?;
        let window_end = start + self.config.rounds.checkin_window();
        if self.pool.len() < self.config.rounds.min_updates {
            return None;
        }
        // Every joined device waiting: the window ends once joins are quiet.
        if self.pool.len() == self.joined.len()
            && let Some(t) = self.last_join
        {
            return Some(window_end.min(t + JOIN_SETTLE));
        }
        Some(window_end)
    }

    /// The current global model.
    pub fn model(&self) -> Arc<ModelSnapshot> {
        Arc::clone(&self.model)
    }

    /// The configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The model's layout.
    pub fn layout(&self) -> &Layout {
        &self.model.layout
    }

    /// Summaries of every ended round, oldest first.
    pub fn history(&self) -> &[RoundSummary] {
        &self.history
    }

    /// A snapshot of the current state.
    pub fn status(&self) -> CoordinatorStatus {
        CoordinatorStatus {
            round: self.last_round,
            open: self.open.as_ref().map(|o| o.kind),
            model_version: self.model.version,
            finished: self.finished.is_some(),
            joined: self.joined.len(),
            waiting: self.pool.len(),
            selected: self.buffer_status().map_or_else(
                || self.open.as_ref().map_or(0, |o| o.cohort.len()),
                |(out, _)| out,
            ),
            accepted: self.buffer_status().map_or_else(
                || {
                    self.open.as_ref().map_or(0, |o| {
                        o.secure.as_ref().map_or(o.accepted, |s| s.received())
                    })
                },
                |(_, accepted)| accepted,
            ),
            trial: self.trial,
            between_runs: self.between_runs,
        }
    }

    /// Whether the current run is a trial of the settings search, or a
    /// trial has ended and the next run has not started.
    pub fn in_search(&self) -> bool {
        self.trial || self.between_runs
    }

    /// Rejected requests so far, counted by [`CoordinatorError::reason`].
    pub fn rejections(&self) -> &BTreeMap<&'static str, u64> {
        &self.rejections
    }

    /// Counts a request that a transport rejected before it reached the core
    /// (malformed, too large, wrong protocol version, ...).
    pub fn record_rejection(&mut self, err: &CoordinatorError) {
        *self.rejections.entry(err.reason()).or_insert(0) += 1;
    }

    /// Number of devices that joined.
    pub fn joined(&self) -> usize {
        self.joined.len()
    }

    /// Why the coordinator finished, once it has.
    pub fn finished(&self) -> Option<&str> {
        self.finished.as_deref()
    }

    /// Differential privacy's mechanism (accountant, clipping bound), when
    /// enabled.
    pub fn privacy(&self) -> Option<&Mechanism> {
        self.privacy.as_ref()
    }

    /// The optimizer and its state.
    pub fn strategy(&self) -> &Strategy {
        &self.strategy
    }

    /// A counter bumped whenever a round starts or ends (and on finishing):
    /// the changes that can turn a device's Wait into a Task or Finished.
    /// Transports compare it to know when to wake waiting check-ins.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// From now on, the core notes each device it hands a task, for
    /// [`take_handed`](Self::take_handed): a transport that holds each
    /// waiting device's check-in open wakes just those devices (the
    /// population simulator does; the gRPC service wakes every held
    /// check-in on a [`generation`](Self::generation) change instead).
    pub fn watch_handed(&mut self) {
        self.handed.get_or_insert_with(Vec::new);
    }

    /// The devices handed a task since the last call, in the order they got
    /// it (empty unless [`watch_handed`](Self::watch_handed) was called).
    pub fn take_handed(&mut self) -> Vec<Pseudonym> {
        self.handed.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn reject(&mut self, err: CoordinatorError) -> CoordinatorError {
        self.record_rejection(&err);
        err
    }

    /// Counts a refused update; one refused as too stale gives back its
    /// async slot (its device may check in for a fresh task).
    fn refuse_update(&mut self, pseudonym: &Pseudonym, err: CoordinatorError) -> CoordinatorError {
        if matches!(err, CoordinatorError::TooStale { .. }) {
            self.drop_buffered(pseudonym);
        }
        self.reject(err)
    }

    fn pending_task(&self, pseudonym: &Pseudonym) -> Option<Task> {
        if let Some(task) = self.buffered_task(pseudonym) {
            return Some(task);
        }
        let open = self.open.as_ref()?;
        if open.cohort.get(pseudonym) != Some(&false) {
            return None;
        }
        let secure_aggregation = match &open.secure {
            Some(secure) => Some(secure.task(pseudonym)?),
            None => None,
        };
        let upload_encoding = match secure_aggregation {
            Some(_) => Encoding::F32,
            None => self.config.upload.encoding,
        };
        Some(Task {
            kind: open.kind,
            round: open.number,
            model_version: open.model_version,
            deadline: open.deadline,
            training: self.config.training,
            evaluate: open.kind == TaskKind::Evaluate || self.config.rounds.evaluate,
            secure_aggregation,
            privacy: open.privacy.as_ref().map(|p| p.task),
            upload_encoding,
            user_moment: open.kind == TaskKind::Train && self.strategy.extra_values() > 0,
            validation: self.trial,
        })
    }

    /// Checks an update's header; returns the weight discount its
    /// staleness earns in async mode (1 in rounds).
    fn check_header(&self, header: &UpdateHeader) -> Result<f32, CoordinatorError> {
        let discount = if self.buffer.is_some() {
            self.check_buffered(header)?
        } else {
            self.check_submission(
                &header.pseudonym,
                header.round,
                header.model_version,
                TaskKind::Train,
            )?;
            if self.open.as_ref().is_some_and(|o| o.secure.is_some()) {
                return Err(CoordinatorError::SecureRound {
                    round: header.round,
                });
            }
            1.0
        };
        let expected = self.update_len();
        if header.num_values != expected as u64 {
            return Err(CoordinatorError::WrongNumValues {
                expected,
                got: header.num_values,
            });
        }
        if header.num_examples == 0 {
            return Err(CoordinatorError::ZeroExamples);
        }
        if let Some(counts) = &header.evaluation {
            crate::aggregate::validate_counts(counts)?;
        }
        Ok(discount)
    }

    /// The open round, if `pseudonym` joined and `round` is it.
    fn open_round_for(
        &self,
        pseudonym: &Pseudonym,
        round: u32,
    ) -> Result<&OpenRound, CoordinatorError> {
        if !self.joined.contains(pseudonym) {
            return Err(CoordinatorError::UnknownPseudonym);
        }
        match &self.open {
            Some(open) if open.number == round => Ok(open),
            Some(open) => Err(CoordinatorError::WrongRound {
                got: round,
                open: open.number,
            }),
            None if round >= 1 && round <= self.last_round => {
                Err(CoordinatorError::RoundClosed { round })
            }
            None => Err(CoordinatorError::NoRoundOpen { round }),
        }
    }

    fn check_submission(
        &self,
        pseudonym: &Pseudonym,
        round: u32,
        model_version: u64,
        kind: TaskKind,
    ) -> Result<(), CoordinatorError> {
        let open = self.open_round_for(pseudonym, round)?;
        if model_version != open.model_version {
            return Err(CoordinatorError::WrongModelVersion {
                got: model_version,
                current: open.model_version,
            });
        }
        match open.cohort.get(pseudonym) {
            None => return Err(CoordinatorError::NotInCohort { round }),
            Some(true) => return Err(CoordinatorError::Duplicate { round }),
            Some(false) => {}
        }
        if open.kind != kind {
            return Err(CoordinatorError::WrongTaskKind {
                round,
                expected: open.kind,
                got: kind,
            });
        }
        Ok(())
    }

    /// Marks a checked submission as accepted.
    fn record_submission(
        &mut self,
        pseudonym: &Pseudonym,
        counts: Option<&EvalCounts>,
    ) -> UpdateAccepted {
        if let Some(accepted) = self.record_buffered(pseudonym, counts) {
            return accepted;
        }
        // Only called after `check_submission` succeeded, so a round is open
        // and the device is in its cohort.
        let open = self
            .open
            .as_mut()
            .expect("a round is open after a successful check");
        open.cohort.insert(*pseudonym, true);
        open.accepted += 1;
        if let Some(counts) = counts {
            open.evaluation.add(counts);
        }
        UpdateAccepted {
            round: open.number,
            accepted: open.accepted,
        }
    }
}

#[cfg(test)]
mod tests;
