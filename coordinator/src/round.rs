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
use crate::config::{CoordinatorConfig, TrainingConfig};
pub use crate::history::{RoundSummary, TaskKind};
use crate::privacy::{Mechanism, NoisySum, RoundPrivacy, TaskPrivacy};
use crate::strategy::Strategy;

pub mod secagg;

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

/// A device's session: what its pseudonym may do, and until when.
#[derive(Clone, Copy, Debug)]
struct Session {
    /// When it stops letting the device start new work.
    expires: Instant,
    /// Ended by a newer join with the same token (refused as
    /// `session_replaced` rather than `session_expired`).
    replaced: bool,
    /// The model version last downloaded, and how many times.
    downloads: (u64, u32),
}

impl Session {
    fn new(expires: Instant) -> Self {
        Self {
            expires,
            replaced: false,
            downloads: (0, 0),
        }
    }
}

/// The coordinator's sans-IO core. See the [module docs](self).
#[derive(Debug)]
pub struct RoundCore {
    config: CoordinatorConfig,
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
    last_secure_sum: Option<SecureSum>,
    /// DP-FedAvg's accountant, clipping bound and noise, when enabled.
    privacy: Option<Mechanism>,
    /// Why training stopped before `rounds.rounds` (the privacy budget).
    training_stopped: Option<String>,
}

impl RoundCore {
    /// A core for the model `params` (laid out as `layout`), which becomes
    /// model version 1. Fails on an invalid configuration, a parameter count
    /// that does not match the layout, or a non-finite parameter.
    pub fn new(
        config: CoordinatorConfig,
        layout: Layout,
        params: Vec<f32>,
    ) -> Result<Self, CoordinatorError> {
        config.validate()?;
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
            last_secure_sum: None,
            privacy,
            training_stopped: None,
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
        config: CoordinatorConfig,
        layout: Layout,
        checkpoint: Checkpoint,
        now: Instant,
    ) -> Result<Self, CoordinatorError> {
        let Checkpoint {
            model_version,
            last_round,
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
        match (core.privacy.as_mut(), privacy) {
            (Some(mechanism), Some(state)) => mechanism.restore(state.ledger, state.clip),
            (None, None) => {}
            (Some(_), None) => {
                return Err(invalid(
                    "the checkpoint was made without differential privacy; a privacy \
                     guarantee cannot start in the middle of training"
                        .to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "the checkpoint was made under differential privacy; resuming without \
                     it would void the stated guarantee (set privacy.mode as before)"
                        .to_owned(),
                ));
            }
        }
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

    /// The durable state as of the last ended round (see
    /// [`crate::checkpoint`]); an open round is left out, as if it had not
    /// started. Its privacy cost stays counted, which can only overstate ε.
    /// It holds the devices whose sessions were live when that round ended
    /// (every round's end sweeps the ended sessions out).
    pub fn checkpoint(&self) -> Checkpoint {
        let (m, v) = self.strategy.moments();
        let open = self.open.as_ref();
        Checkpoint {
            model_version: self.model.version,
            last_round: self.last_round - u32::from(open.is_some()),
            training_rounds: self.training_rounds
                - u32::from(open.is_some_and(|o| o.kind == TaskKind::Train)),
            final_evaluation_done: self.final_evaluation_done,
            training_stopped: self.training_stopped.clone(),
            history: self.history.clone(),
            joined: self.joined.iter().map(ToString::to_string).collect(),
            privacy: self.privacy.as_ref().map(|mechanism| PrivacyState {
                ledger: mechanism.accountant().ledger().clone(),
                clip: mechanism.clip(),
            }),
            params: self.model.params.clone(),
            m: m.to_vec(),
            v: v.to_vec(),
        }
    }

    /// Admits a new device and returns its fresh random pseudonym, whose
    /// session lasts `auth.session_ttl_secs`. A device that joined with an
    /// enrollment token (`token`, from [`crate::auth::TokenSet::check`])
    /// ends the token's oldest live session when the token already holds
    /// `auth.max_sessions_per_token`.
    pub fn join(&mut self, now: Instant, token: Option<TokenId>) -> Pseudonym {
        self.advance(now);
        let pseudonym = loop {
            let mut bytes = [0u8; 16];
            self.rng.fill_bytes(&mut bytes);
            let pseudonym = Pseudonym(bytes);
            // A collision (with a live or a remembered session) is
            // astronomically unlikely, but cheap to rule out.
            if !self.sessions.contains_key(&pseudonym) && self.joined.insert(pseudonym) {
                break pseudonym;
            }
        };
        self.last_join = Some(now);
        let ttl = self.config.auth.session_ttl();
        self.sessions.insert(pseudonym, Session::new(now + ttl));
        if let Some(token) = token {
            let max = self.config.auth.max_sessions_per_token as usize;
            let mut held = self.token_sessions.remove(&token).unwrap_or_default();
            // Live: joined, and not expired (those are swept soon).
            held.retain(|p| {
                self.joined.contains(p) && self.sessions.get(p).is_some_and(|s| now < s.expires)
            });
            while held.len() >= max {
                if let Some(oldest) = held.pop_front() {
                    self.end_session(&oldest);
                    if let Some(session) = self.sessions.get_mut(&oldest) {
                        session.replaced = true;
                    }
                }
            }
            held.push_back(pseudonym);
            self.token_sessions.insert(token, held);
        }
        pseudonym
    }

    /// Takes a device out of the joined devices and the pool; its session
    /// is remembered until the sweep forgets it.
    fn end_session(&mut self, pseudonym: &Pseudonym) {
        self.joined.remove(pseudonym);
        self.pool.remove(pseudonym);
    }

    /// Every sixteenth of a session's lifetime, [`sweep`](Self::sweep)s.
    fn sweep_sessions(&mut self, now: Instant) {
        if self.next_session_sweep.is_none_or(|t| now >= t) {
            self.sweep(now);
        }
    }

    /// Forgets the devices whose sessions ended by `now`, so that they are
    /// not selected, do not count as joined and are not checkpointed;
    /// members of the open round's cohort may still finish its task. An
    /// ended session is remembered for one more lifetime, so that the
    /// device's next check-in is told (and counted) `session_expired` or
    /// `session_replaced` rather than `unknown_pseudonym`; then it is
    /// forgotten entirely. Runs every sixteenth of a lifetime, and when a
    /// round ends (before its checkpoint).
    fn sweep(&mut self, now: Instant) {
        let ttl = self.config.auth.session_ttl();
        self.next_session_sweep = Some(now + ttl / 16);
        let open = self.open.as_ref();
        let ended: Vec<Pseudonym> = self
            .sessions
            .iter()
            .filter(|&(p, s)| now >= s.expires && !open.is_some_and(|o| o.cohort.contains_key(p)))
            .map(|(p, _)| *p)
            .collect();
        for pseudonym in &ended {
            self.end_session(pseudonym);
        }
        self.sessions
            .retain(|_, s| now < s.expires.checked_add(ttl).unwrap_or(s.expires));
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
        if self
            .sessions
            .get(pseudonym)
            .is_none_or(|s| now >= s.expires)
        {
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
            Ok(()) => Ok(self.open.as_ref().map_or(now, |o| o.deadline)),
            Err(e) => Err(self.reject(e)),
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
        let result = self.check_header(&header).and_then(|()| {
            let weight = match self.config.strategy.weighting {
                crate::config::Weighting::Examples => {
                    header.num_examples.min(self.config.strategy.max_examples)
                }
                crate::config::Weighting::Uniform => 1,
            };
            // Central DP bounds every update (weight 1: validated uniform);
            // otherwise the optional norm bound does.
            match clip.or(self.config.strategy.norm_bound) {
                Some(bound) => self.aggregator.add_clipped(values, bound, weight)?,
                None => self.aggregator.add(values, weight)?,
            }
            Ok(self.record_submission(&header.pseudonym, header.evaluation.as_ref()))
        });
        let result = result.map_err(|e| self.reject(e));
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
    /// joined, names the current version and has not downloaded it
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
        if model_version != self.model.version {
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
        if let Some(open) = &self.open {
            return match &open.secure {
                Some(secure) => secure.poll_timeout(),
                None => Some(open.deadline),
            };
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
            selected: self.open.as_ref().map_or(0, |o| o.cohort.len()),
            accepted: self.open.as_ref().map_or(0, |o| {
                o.secure.as_ref().map_or(o.accepted, |s| s.received())
            }),
        }
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

    fn reject(&mut self, err: CoordinatorError) -> CoordinatorError {
        self.record_rejection(&err);
        err
    }

    fn pending_task(&self, pseudonym: &Pseudonym) -> Option<Task> {
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
        })
    }

    fn check_header(&self, header: &UpdateHeader) -> Result<(), CoordinatorError> {
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
        Ok(())
    }

    fn check_submission(
        &self,
        pseudonym: &Pseudonym,
        round: u32,
        model_version: u64,
        kind: TaskKind,
    ) -> Result<(), CoordinatorError> {
        if !self.joined.contains(pseudonym) {
            return Err(CoordinatorError::UnknownPseudonym);
        }
        let open = match &self.open {
            Some(open) if open.number == round => open,
            Some(open) => {
                return Err(CoordinatorError::WrongRound {
                    got: round,
                    open: open.number,
                });
            }
            None if round >= 1 && round <= self.last_round => {
                return Err(CoordinatorError::RoundClosed { round });
            }
            None => return Err(CoordinatorError::NoRoundOpen { round }),
        };
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

    /// Runs the state machine until nothing more is due at `now`.
    fn advance(&mut self, now: Instant) {
        loop {
            match &self.open {
                Some(open) if open.secure.is_some() => {
                    if !self.advance_secure(now) {
                        return;
                    }
                }
                Some(open) if open.accepted >= open.needed => self.close(now, None),
                Some(open) if now >= open.deadline => {
                    let min = self.config.rounds.min_updates;
                    if open.accepted >= min {
                        self.close(now, None);
                    } else {
                        let reason = format!(
                            "only {} of {} selected devices submitted by the deadline; {} required (rounds.min_updates)",
                            open.accepted,
                            open.cohort.len(),
                            min
                        );
                        self.close(now, Some(reason));
                    }
                }
                Some(_) => return,
                None => {
                    if !self.try_start(now) {
                        return;
                    }
                }
            }
        }
    }

    /// The kind of the next round, or `None` when all rounds are done.
    fn next_kind(&self) -> Option<TaskKind> {
        let rounds = self.config.rounds.rounds;
        if self.training_stopped.is_none() && (rounds == 0 || self.training_rounds < rounds) {
            Some(TaskKind::Train)
        } else if self.config.rounds.final_evaluation && !self.final_evaluation_done {
            Some(TaskKind::Evaluate)
        } else {
            None
        }
    }

    /// Opens the next round if its start condition holds.
    fn try_start(&mut self, now: Instant) -> bool {
        self.sweep_sessions(now);
        if self.finished.is_some() || self.pool.is_empty() {
            return false;
        }
        let Some(kind) = self.next_kind() else {
            return false;
        };
        let r = &self.config.rounds;
        let waiting = self.pool.len();
        let window_passed = self
            .window_start
            .is_some_and(|t| now >= t + r.checkin_window());
        let enough_after_window = window_passed && waiting >= r.min_updates;
        let everyone_waits = waiting == self.joined.len();
        let over = |n: usize| ((n as f64) * r.over_selection).ceil() as usize;
        let dp = kind == TaskKind::Train && self.privacy.is_some();
        let (selected, needed) = match (kind, r.fraction) {
            (TaskKind::Train, _) if dp => {
                // Poisson sampling, once every device waits (or the window
                // passed): the accountant's q holds for each of them.
                if !((everyone_waits && waiting >= r.min_updates) || enough_after_window) {
                    return false;
                }
                (0, 0)
            }
            (TaskKind::Evaluate, _) => {
                if !(everyone_waits || enough_after_window) {
                    return false;
                }
                (waiting, waiting)
            }
            (TaskKind::Train, Some(fraction)) => {
                if !((everyone_waits && waiting >= r.min_updates) || enough_after_window) {
                    return false;
                }
                let wanted = ((waiting as f64 * fraction).ceil() as usize)
                    .max(r.min_updates)
                    .min(waiting);
                let selected = over(wanted).min(waiting);
                (selected, wanted.min(selected))
            }
            (TaskKind::Train, None) => {
                let target = over(r.clients_per_round);
                // Every joined device waiting: waiting longer could only
                // bring devices that have not joined yet, so the window
                // ends now (a single-device deployment does not wait).
                let settled = self.last_join.is_none_or(|t| now >= t + JOIN_SETTLE);
                if !(waiting >= target
                    || enough_after_window
                    || (everyone_waits && settled && waiting >= r.min_updates))
                {
                    return false;
                }
                let selected = target.min(waiting);
                (selected, r.clients_per_round.min(selected))
            }
        };
        let mut privacy = None;
        if dp && let Some(mechanism) = self.privacy.as_mut() {
            match mechanism.start_round(waiting) {
                Ok(round) => privacy = Some(round),
                Err(refused) => {
                    tracing::warn!(reason = %refused.0, "training stopped");
                    self.training_stopped = Some(refused.0);
                    self.finish_if_done();
                    return true;
                }
            }
        }
        let cohort: BTreeMap<Pseudonym, bool> = if dp {
            let mechanism = self.privacy.as_ref().expect("dp implies a mechanism");
            let rng = &mut self.rng;
            self.pool
                .iter()
                .filter(|_| mechanism.sample(rng))
                .map(|p| (*p, false))
                .collect()
        } else if selected == waiting {
            std::mem::take(&mut self.pool)
                .into_iter()
                .map(|p| (p, false))
                .collect()
        } else {
            let candidates: Vec<Pseudonym> = self.pool.iter().copied().collect();
            rand::seq::index::sample(&mut self.rng, waiting, selected)
                .into_iter()
                .map(|i| (candidates[i], false))
                .collect()
        };
        for p in cohort.keys() {
            self.pool.remove(p);
            if let Some(session) = self.sessions.get_mut(p) {
                session.downloads = (0, 0);
            }
        }
        let (selected, needed) = if dp {
            (cohort.len(), cohort.len())
        } else {
            (selected, needed)
        };
        self.last_round += 1;
        if kind == TaskKind::Train {
            self.training_rounds += 1;
        }
        self.window_start = None;
        self.aggregator.reset();
        let number = self.last_round;
        let r_min = self.config.rounds.min_updates;
        let secure = secagg::is_secure(kind, self.config.secure_aggregation.enabled)
            .then(|| secagg::SecureRound::new(self, number, cohort.keys().copied(), now));
        self.open = Some(OpenRound {
            number: self.last_round,
            kind,
            model_version: self.model.version,
            started: now,
            deadline: now + self.config.rounds.deadline(),
            cohort,
            needed,
            accepted: 0,
            evaluation: EvalCounts::default(),
            secure,
            privacy,
        });
        self.generation += 1;
        self.events.push_back(Event::RoundStarted {
            round: self.last_round,
            kind,
            model_version: self.model.version,
            selected,
        });
        if dp && selected < r_min {
            let reason = format!(
                "Poisson sampling drew {selected} devices, fewer than rounds.min_updates = {r_min}; \
                 the round still counts against the privacy budget"
            );
            self.close(now, Some(reason));
        }
        true
    }

    /// Values in one device's update: the model's, then what the strategy
    /// asks for after them (`als`: the upper triangle of `x xᵀ`).
    pub(crate) fn update_len(&self) -> usize {
        self.model.params.len() + self.strategy.extra_values()
    }

    /// Ends the open round: completes it (applying the strategy for a
    /// training round) unless `abandon` gives a reason.
    fn close(&mut self, now: Instant, mut abandon: Option<String>) {
        let Some(mut open) = self.open.take() else {
            return;
        };
        if abandon.is_none() && open.kind == TaskKind::Train {
            // The round completed, so at least min_updates >= 1 updates were
            // added (or, under secure aggregation, the sum was unmasked).
            let totals = match open.secure.as_mut() {
                Some(secure) => secure.totals.take(),
                None => self.aggregator.totals(),
            };
            let mean = match (self.privacy.as_mut(), open.privacy.as_mut(), totals) {
                (Some(mechanism), Some(round), Some(totals)) => Some(mechanism.finish_round(
                    round,
                    NoisySum {
                        sum: &totals.weighted_sum,
                        within_clip: totals.within_clip,
                    },
                )),
                (_, _, totals) => totals.map(|t| t.mean()),
            };
            let round = crate::strategy::Round {
                lr_factor: self
                    .config
                    .strategy
                    .schedule
                    .factor(open.number.into(), self.config.rounds.rounds.into()),
                devices: open.accepted,
                joined: self.joined.len(),
                training: &self.config.training,
            };
            match mean {
                Some(mean) => match self.strategy.step(&self.model.params, mean, &round) {
                    Ok(params) => {
                        let layout = self.model.layout.clone();
                        self.model = Arc::new(ModelSnapshot::new(
                            self.model.version + 1,
                            layout,
                            params,
                            self.config.download.encoding,
                        ));
                    }
                    Err(e) => {
                        abandon = Some(format!("{e}; the model was not changed"));
                    }
                },
                None => abandon = Some("no update to apply".to_owned()),
            }
        }
        self.aggregator.reset();
        if open.kind == TaskKind::Evaluate {
            self.final_evaluation_done = true;
        }
        let summary = RoundSummary {
            round: open.number,
            kind: open.kind,
            completed: abandon.is_none(),
            abandon_reason: abandon,
            model_version: self.model.version,
            selected: open.cohort.len(),
            participants: open.accepted,
            seconds: now.saturating_duration_since(open.started).as_secs_f64(),
            evaluation: open.evaluation,
            secure_aggregation: open.secure.as_ref().map(secagg::SecureRound::summary),
            privacy: open.privacy.map(|p| Box::new(p.summary)),
        };
        self.history.push(summary.clone());
        self.events.push_back(Event::RoundEnded(summary));
        self.sweep(now);
        self.window_start = (!self.pool.is_empty()).then_some(now);
        self.generation += 1;
        self.finish_if_done();
    }

    /// Finishes when no round is left to run.
    fn finish_if_done(&mut self) {
        if self.next_kind().is_some() {
            return;
        }
        let rounds = self.training_rounds;
        let mut reason = match &self.training_stopped {
            Some(stopped) => format!("stopped after {rounds} training rounds: {stopped}"),
            None => format!("completed {rounds} training rounds"),
        };
        if self.final_evaluation_done {
            reason.push_str(" and the final evaluation");
        }
        self.finished = Some(reason.clone());
        self.pool.clear();
        self.window_start = None;
        self.generation += 1;
        self.events.push_back(Event::Finished { reason });
    }
}

#[cfg(test)]
mod tests;
