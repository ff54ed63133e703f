//! A device: its purchases, its private state, and what it does with a task.
//!
//! [`Device`] is the sans-IO heart of the SDK. Given the global parameters it
//! trains locally and returns a [`LocalUpdate`] (the dense change to the
//! global parameters and nothing else), evaluates, or recommends. Moving bytes
//! to and from a coordinator is the [`crate::participant`]'s job.
//!
//! What the shopper allows is checked here, where the data is: with
//! [`Consent::None`] nothing is recorded, and without [`Consent::Federated`]
//! the device neither trains nor evaluates for a coordinator. A device opened
//! on a [`Vault`] keeps everything in one encrypted file, written after every
//! change; the [`RetentionPolicy`] is enforced on every write and every load.

use std::sync::Arc;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::clock::{self, Clock};
use crate::consent::{Consent, ConsentCell, ConsentChange, ConsentRecord};
use crate::eligibility::ParticipationPolicy;
use crate::error::ClientError;
use crate::metrics::{self, EvalCounts, HeldOut};
use crate::model::{Loss, Model, TrainingConfig};
use crate::privacy::{self, DpSpec};
use crate::retention::RetentionPolicy;
use crate::store::{MAX_FUTURE_SECS, Purchase, PurchaseStore};
use crate::transparency::{Ledger, TrainingReport};
use crate::vault::Vault;

/// What a device sends back after local training.
#[derive(Clone, Debug)]
pub struct LocalUpdate {
    /// Dense change to the global parameters (same length whatever was
    /// bought), followed by the upper triangle of `x xᵀ` when the task asked
    /// for it ([`TrainingConfig::user_moment`]).
    pub delta: Vec<f32>,
    /// FedAvg weight: the number of distinct purchases trained on.
    pub num_examples: u64,
    /// Evaluation of the received model, when it was asked for.
    pub evaluation: Option<EvalCounts>,
    /// How much local training was done (stays on the device).
    pub training: TrainingReport,
    /// Under adaptive DP clipping, the indicator the device reports (see
    /// [`privacy::privatize`]); 0 otherwise.
    pub within_clip: f32,
}

/// What became of a purchase given to [`Device::record`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Recorded {
    /// Stored.
    Stored,
    /// Not stored: the shopper's consent is [`Consent::None`].
    NotStored,
    /// Not kept: older than the retention policy allows.
    Expired,
}

/// One shopper's device.
#[derive(Debug)]
pub struct Device {
    pub(crate) model: Arc<dyn Model>,
    pub(crate) store: PurchaseStore,
    /// The private user embedding: it never leaves the device.
    pub(crate) private: Vec<f32>,
    pub(crate) rng: ChaCha8Rng,
    /// A purchase kept out of training to evaluate the model on, what it
    /// competes with, and the seed of its sampled candidates (fixed, so
    /// every evaluation uses the same ones).
    pub(crate) held_out: Option<HeldOut>,
    /// Shared with every copy of this device, so a change applies at once.
    pub(crate) consent: ConsentCell,
    pub(crate) retention: RetentionPolicy,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) participation: ParticipationPolicy,
    /// Rounds taken part in and messages sent (for the transparency report).
    pub(crate) ledger: Ledger,
    /// Where the device keeps its state; `None`: in memory only.
    pub(crate) vault: Option<Vault>,
    /// Incremented by `forget_me`, so results computed on a copy made
    /// before it are not merged back.
    pub(crate) generation: u64,
}

/// Builds a [`Device`]: in memory, or opened on an encrypted store file.
#[derive(Debug)]
pub struct DeviceBuilder {
    model: Arc<dyn Model>,
    seed: Option<u64>,
    retention: RetentionPolicy,
    clock: Arc<dyn Clock>,
    participation: ParticipationPolicy,
}

impl DeviceBuilder {
    /// Seeds the device's local randomness (training order, negatives,
    /// initial embedding). Default: from the operating system.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The retention policy. Default [`RetentionPolicy::default`] (365
    /// days, 10,000 purchases).
    pub fn retention(mut self, policy: RetentionPolicy) -> Self {
        self.retention = policy;
        self
    }

    /// The clock. Default [`crate::clock::SystemClock`].
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// When and how much the device takes part in training. Default
    /// [`ParticipationPolicy::default`] (always eligible, no budget).
    pub fn participation(mut self, policy: ParticipationPolicy) -> Self {
        self.participation = policy;
        self
    }

    /// A device whose state lives in memory only.
    pub fn in_memory(self) -> Result<Device, ClientError> {
        self.retention.validate()?;
        Ok(self.make(None))
    }

    /// Opens the device stored in `vault`, or starts an empty one there if
    /// the file does not exist yet. A file that cannot be read (truncated,
    /// tampered with, another key) is an error and is left untouched. The
    /// retention policy is applied to what was loaded, and the result saved.
    pub fn open(self, vault: Vault) -> Result<Device, ClientError> {
        self.retention.validate()?;
        let loaded = vault.load()?;
        let mut device = self.make(Some(vault));
        if let Some(plain) = loaded {
            let state: StoredState =
                serde_json::from_slice(&plain).map_err(|e| ClientError::StoreFormat {
                    path: device.vault_path(),
                    detail: format!("unreadable contents: {e}"),
                })?;
            device.restore(state)?;
        }
        let dropped = device.enforce_retention();
        tracing::debug!(
            purchases = device.store.len(),
            expired = dropped,
            "device store opened"
        );
        device.persist()?;
        Ok(device)
    }

    fn make(self, vault: Option<Vault>) -> Device {
        let mut rng = match self.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        let private = self.model.init_private(&mut rng);
        Device {
            store: PurchaseStore::new(self.model.items()),
            model: self.model,
            private,
            rng,
            held_out: None,
            consent: ConsentCell::default(),
            retention: self.retention,
            clock: self.clock,
            participation: self.participation,
            ledger: Ledger::default(),
            vault,
            generation: 0,
        }
    }
}

/// Everything a device keeps in its store file. Nothing else can be stored:
/// unknown fields are refused when loading.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredState {
    consent: ConsentRecord,
    purchases: Vec<Purchase>,
    private: Vec<f32>,
    ledger: Ledger,
}

impl Device {
    /// An in-memory device with an empty store and consent [`Consent::None`],
    /// seeded for reproducible training, without retention limits (it
    /// replays data sets of any age: simulations, the CLI). Apps use
    /// [`Device::builder`].
    pub fn new(model: Arc<dyn Model>, seed: u64) -> Self {
        Self::builder(model)
            .seed(seed)
            .retention(RetentionPolicy::UNLIMITED)
            .make(None)
    }

    /// A builder with the app defaults.
    pub fn builder(model: Arc<dyn Model>) -> DeviceBuilder {
        DeviceBuilder {
            model,
            seed: None,
            retention: RetentionPolicy::default(),
            clock: clock::system(),
            participation: ParticipationPolicy::default(),
        }
    }

    /// Records a purchase, if the shopper's consent allows storing it;
    /// rejects items outside the catalogue, non-positive or non-finite
    /// quantities and times more than a day ahead of the device's clock.
    /// Applies the retention policy and saves the store.
    pub fn record(&mut self, purchase: Purchase) -> Result<Recorded, ClientError> {
        if !self.consent.level().stores_history() {
            return Ok(Recorded::NotStored);
        }
        let now = self.clock.unix_now();
        if purchase.time > now.saturating_add(MAX_FUTURE_SECS) {
            return Err(ClientError::InvalidConfig(format!(
                "purchase time {} is more than a day ahead of the device's clock ({now})",
                purchase.time
            )));
        }
        self.store.record(purchase)?;
        let len = self.store.len();
        self.enforce_retention();
        self.persist()?;
        Ok(if self.store.len() < len {
            Recorded::Expired
        } else {
            Recorded::Stored
        })
    }

    /// The consent in force and when it was set.
    pub fn consent(&self) -> ConsentRecord {
        self.consent.get()
    }

    /// The cell holding the consent, shared with every copy of this device.
    pub fn consent_cell(&self) -> &ConsentCell {
        &self.consent
    }

    /// Sets the shopper's consent; it takes effect at once (also for a
    /// round running on a copy of this device) and is saved. Lowering it to
    /// [`Consent::None`] keeps what is stored unused; the returned
    /// [`ConsentChange::offer_erase`] tells the app to offer [`forget_me`](Self::forget_me).
    pub fn set_consent(&mut self, level: Consent) -> Result<ConsentChange, ClientError> {
        let previous = self.consent.set(ConsentRecord {
            level,
            set_at: Some(self.clock.unix_now()),
        });
        tracing::debug!(from = %previous.level, to = %level, "consent changed");
        self.persist()?;
        Ok(ConsentChange {
            previous: previous.level,
            current: level,
            offer_erase: level == Consent::None && !self.store.is_empty(),
        })
    }

    /// Erases the purchase history, the private embedding (replaced by a
    /// fresh random one), and the training state (held-out purchase and the
    /// ledger of rounds), and saves the empty state over the store file.
    /// The consent level is a setting and is kept.
    pub fn forget_me(&mut self) -> Result<(), ClientError> {
        self.store.clear();
        self.private = self.model.init_private(&mut self.rng);
        self.held_out = None;
        self.ledger = Ledger {
            erased_at: Some(self.clock.unix_now()),
            ..Ledger::default()
        };
        self.generation += 1;
        tracing::info!("stored data erased");
        self.persist()
    }

    /// Keeps `held_out.item` out of training as this device's evaluation
    /// target (it is not recorded; the stored history is what came before
    /// it). Its sampled competitors are drawn from `candidate_seed`, so
    /// every evaluation (and a centralized baseline using the same seed)
    /// ranks it against the same items.
    pub fn hold_out(&mut self, held_out: HeldOut) -> Result<(), ClientError> {
        self.check_item(held_out.item)?;
        self.held_out = Some(held_out);
        Ok(())
    }

    fn check_item(&self, item: u32) -> Result<(), ClientError> {
        if item as usize >= self.model.items() {
            return Err(ClientError::UnknownItem {
                item,
                items: self.model.items(),
            });
        }
        Ok(())
    }

    /// The local store.
    pub fn store(&self) -> &PurchaseStore {
        &self.store
    }

    /// The model this device trains.
    pub fn model(&self) -> &Arc<dyn Model> {
        &self.model
    }

    /// The private user embedding (for on-device use and tests; never sent).
    pub fn private_embedding(&self) -> &[f32] {
        &self.private
    }

    /// The retention policy in force.
    pub fn retention(&self) -> RetentionPolicy {
        self.retention
    }

    /// When and how much the device takes part in training.
    pub fn participation(&self) -> &ParticipationPolicy {
        &self.participation
    }

    /// Replaces the participation policy.
    pub fn set_participation(&mut self, policy: ParticipationPolicy) {
        self.participation = policy;
    }

    /// The device's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub(crate) fn check_global(&self, global: &[f32]) -> Result<(), ClientError> {
        let want = self.model.layout().num_values();
        if global.len() != want {
            return Err(ClientError::ModelMismatch(format!(
                "expected {want} global values, got {}",
                global.len()
            )));
        }
        Ok(())
    }

    /// Fits the private embedding to `global` and, if asked, evaluates; then
    /// trains locally and returns the update. Needs [`Consent::Federated`].
    /// Honours the participation policy's time budget (see
    /// [`ParticipationPolicy::time_budget`]); the update says what was done.
    pub fn train(
        &mut self,
        global: &[f32],
        cfg: &TrainingConfig,
        evaluate: bool,
    ) -> Result<LocalUpdate, ClientError> {
        self.consent.require_training()?;
        self.check_global(global)?;
        cfg.validate()?;
        let start = self.clock.monotonic();
        let budget = self.participation.time_budget;
        let over = |clock: &Arc<dyn Clock>| budget.is_some_and(|b| clock.monotonic() - start >= b);
        let mut report = TrainingReport {
            requested_epochs: cfg.local_epochs,
            ..TrainingReport::default()
        };
        let by_epoch = budget.is_some() && cfg.loss == Loss::Bpr;
        let one_epoch = TrainingConfig {
            local_epochs: 1,
            ..*cfg
        };
        if by_epoch {
            // Epoch by epoch: the same computation as all epochs at once.
            while report.personalize_epochs < cfg.local_epochs
                && (report.personalize_epochs == 0 || !over(&self.clock))
            {
                self.personalize_with(global, &one_epoch);
                report.personalize_epochs += 1;
            }
        } else {
            self.personalize_with(global, cfg);
            report.personalize_epochs = if cfg.loss == Loss::Bpr {
                cfg.local_epochs
            } else {
                1
            };
        }
        let evaluation = if evaluate {
            self.score_held_out(global)
        } else {
            None
        };
        let history = self.store.items();
        let mut delta = if by_epoch {
            let mut local = global.to_vec();
            while report.train_epochs < cfg.local_epochs
                && (report.train_epochs == 0 || !over(&self.clock))
            {
                self.model.train_in_place(
                    &mut local,
                    Some(global),
                    &mut self.private,
                    history,
                    &one_epoch,
                    &mut self.rng,
                );
                report.train_epochs += 1;
            }
            for (l, g) in local.iter_mut().zip(global) {
                *l -= g;
            }
            local
        } else {
            let delta = self
                .model
                .train(global, &mut self.private, history, cfg, &mut self.rng);
            report.train_epochs = report.personalize_epochs;
            delta
        };
        if cfg.user_moment {
            // Validated: only under the ALS loss, whose private vector was
            // just solved against `global`.
            fedrec_proto::linalg::push_outer_upper(&self.private, &mut delta);
        }
        let elapsed = self.clock.monotonic() - start;
        report.millis = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        report.stopped_by_budget = by_epoch
            && (report.train_epochs < cfg.local_epochs
                || report.personalize_epochs < cfg.local_epochs);
        if budget.is_some_and(|b| elapsed > b) || report.stopped_by_budget {
            tracing::debug!(
                personalize_epochs = report.personalize_epochs,
                train_epochs = report.train_epochs,
                requested = cfg.local_epochs,
                millis = report.millis,
                "local training reached its time budget"
            );
        }
        if let Some(round) = self.ledger.rounds.last_mut() {
            round.training = Some(report);
        }
        Ok(LocalUpdate {
            delta,
            num_examples: history.len() as u64,
            evaluation,
            training: report,
            within_clip: 0.0,
        })
    }

    /// [`train`](Self::train), then what the task's differential privacy
    /// asks of the update (clipping, the device's noise), if anything.
    pub fn train_task(
        &mut self,
        global: &[f32],
        cfg: &TrainingConfig,
        evaluate: bool,
        dp: Option<&DpSpec>,
    ) -> Result<LocalUpdate, ClientError> {
        let mut update = self.train(global, cfg, evaluate)?;
        if let Some(spec) = dp {
            update.within_clip = privacy::privatize(&mut update.delta, spec, &mut self.rng);
        }
        Ok(update)
    }

    /// Fits the private embedding to `global` and evaluates it on the held-out
    /// purchase; `None` when there is none. Needs [`Consent::Federated`]
    /// (the counts are sent to the coordinator).
    pub fn evaluate(
        &mut self,
        global: &[f32],
        cfg: &TrainingConfig,
    ) -> Result<Option<EvalCounts>, ClientError> {
        self.consent.require_training()?;
        self.check_global(global)?;
        cfg.validate()?;
        self.personalize_with(global, cfg);
        Ok(self.score_held_out(global))
    }

    /// Fits the private embedding to `global` and the stored purchases, for
    /// on-device recommendations (any consent that stores history; with
    /// [`Consent::None`] nothing happens). With [`Loss::Als`] this is the
    /// exact least-squares fit, which makes [`Device::explain`] exact.
    pub fn personalize(&mut self, global: &[f32], cfg: &TrainingConfig) -> Result<(), ClientError> {
        self.check_global(global)?;
        cfg.validate()?;
        if self.consent.level().stores_history() {
            self.personalize_with(global, cfg);
        }
        Ok(())
    }

    fn personalize_with(&mut self, global: &[f32], cfg: &TrainingConfig) {
        self.model.personalize(
            global,
            &mut self.private,
            self.store.items(),
            cfg,
            &mut self.rng,
        );
    }

    /// Scores of every item. Not kept: an idle device holds no per-item buffer.
    pub(crate) fn scores(&self, global: &[f32]) -> Vec<f32> {
        let mut scores = Vec::with_capacity(self.model.items());
        self.model.score_all(global, &self.private, &mut scores);
        scores
    }

    pub(crate) fn score_held_out(&self, global: &[f32]) -> Option<EvalCounts> {
        Some(self.rank_held_out(&self.scores(global), &self.held_out?))
    }

    /// Evaluates one of the device's rankings on a held-out purchase (its
    /// own or another: a simulation measuring several tracks on the same
    /// devices), with the private embedding as it is, and returns the counts
    /// with the device's top 10 under that held-out purchase's exclusion
    /// rule (a simulation reads the list for coverage; a deployment reports
    /// counts only).
    pub fn evaluate_held_out(
        &self,
        global: &[f32],
        held_out: &HeldOut,
        row: crate::recommend::Row,
    ) -> Result<(EvalCounts, Vec<u32>), ClientError> {
        use crate::recommend::Row;
        self.check_global(global)?;
        self.check_item(held_out.item)?;
        let scores = match row {
            Row::Discover => self.scores(global),
            Row::BuyAgain => self.row_scores(global)?.buy_again,
            Row::Blended => self.row_scores(global)?.blended,
        };
        let exclude = if held_out.exclude_history {
            self.store.items()
        } else {
            &[]
        };
        Ok((
            self.rank_held_out(&scores, held_out),
            metrics::top_k(&scores, exclude, metrics::K),
        ))
    }

    fn rank_held_out(&self, scores: &[f32], held_out: &HeldOut) -> EvalCounts {
        let history = self.store.items();
        let exclude = if held_out.exclude_history {
            history
        } else {
            &[]
        };
        let mut rng = held_out.candidate_seed.map(ChaCha8Rng::seed_from_u64);
        metrics::evaluate_user(
            scores,
            exclude,
            history,
            held_out.item,
            rng.as_mut().map(|r| r as &mut dyn rand::Rng),
        )
    }

    /// The `k` best items for this shopper under `global`, excluding what was
    /// already bought, best first. Uses the private embedding as it is.
    pub fn recommend(&mut self, global: &[f32], k: usize) -> Result<Vec<u32>, ClientError> {
        self.check_global(global)?;
        Ok(metrics::top_k(&self.scores(global), self.store.items(), k))
    }

    /// Drops what the retention policy does not allow now; returns how many.
    pub(crate) fn enforce_retention(&mut self) -> usize {
        let dropped = self.store.enforce(&self.retention, self.clock.unix_now());
        if dropped > 0 {
            tracing::debug!(dropped, "retention policy dropped purchases");
        }
        dropped
    }

    /// Applies the retention policy, then saves the state to the store
    /// file (nothing for an in-memory device). Every write goes through here.
    pub(crate) fn persist(&mut self) -> Result<(), ClientError> {
        if self.vault.is_none() {
            return Ok(());
        }
        self.enforce_retention();
        let Some(vault) = &self.vault else {
            return Ok(());
        };
        let state = StoredState {
            consent: self.consent.get(),
            purchases: self.store.purchases().to_vec(),
            private: self.private.clone(),
            ledger: self.ledger.clone(),
        };
        let plain = zeroize::Zeroizing::new(serde_json::to_vec(&state).map_err(|e| {
            ClientError::StoreFormat {
                path: vault.path().to_owned(),
                detail: format!("cannot encode the state: {e}"),
            }
        })?);
        vault.save(&plain)
    }

    fn restore(&mut self, state: StoredState) -> Result<(), ClientError> {
        let path = self.vault_path();
        self.store =
            PurchaseStore::from_purchases(self.model.items(), state.purchases).map_err(|e| {
                ClientError::StoreFormat {
                    path: path.clone(),
                    detail: format!("stored purchase does not fit the model: {e}"),
                }
            })?;
        if state.private.len() == self.private.len() && state.private.iter().all(|v| v.is_finite())
        {
            self.private = state.private;
        } else {
            // A model of another shape: the private embedding starts afresh.
            tracing::info!("stored private embedding does not fit the model; starting afresh");
        }
        self.consent.set(state.consent);
        self.ledger = state.ledger;
        Ok(())
    }

    fn vault_path(&self) -> std::path::PathBuf {
        self.vault
            .as_ref()
            .map(|v| v.path().to_owned())
            .unwrap_or_default()
    }

    /// A copy to work on away from the app (a training round): same model,
    /// history, private state and consent cell; no store file, so the copy
    /// never writes. Merge results back with [`absorb`](Self::absorb).
    pub(crate) fn working_copy(&self) -> Device {
        Device {
            model: Arc::clone(&self.model),
            store: self.store.clone(),
            private: self.private.clone(),
            rng: ChaCha8Rng::seed_from_u64(rand::RngExt::random(&mut rand::rng())),
            held_out: self.held_out,
            consent: self.consent.clone(),
            retention: self.retention,
            clock: Arc::clone(&self.clock),
            participation: self.participation.clone(),
            ledger: Ledger::default(),
            vault: None,
            generation: self.generation,
        }
    }

    /// Takes back what a [`working_copy`](Self::working_copy) learned: its
    /// private embedding and its round records, unless the shopper erased
    /// their data meanwhile (then only the round records, which say what
    /// left the device). Saves.
    pub(crate) fn absorb(&mut self, copy: Device) -> Result<(), ClientError> {
        if copy.generation == self.generation {
            self.private = copy.private;
        }
        self.ledger.rounds.extend(copy.ledger.rounds);
        for (k, m) in copy.ledger.outside_rounds {
            let slot = self.ledger.outside_rounds.entry(k).or_default();
            slot.count += m.count;
            slot.bytes += m.bytes;
        }
        self.persist()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;
    use crate::eligibility::ParticipationPolicy;
    use crate::model::MatrixFactorization;
    use crate::vault::StoreKey;

    const DAY: i64 = 86_400;
    const T0: i64 = 1_700_000_000;

    fn mf(items: usize) -> Arc<dyn Model> {
        Arc::new(MatrixFactorization::new(items, 4, 0.1).unwrap())
    }

    fn at(item: u32, time: i64) -> Purchase {
        Purchase {
            item,
            time,
            quantity: 1.0,
        }
    }

    fn open(
        path: &std::path::Path,
        key: &StoreKey,
        clock: &ManualClock,
    ) -> Result<Device, ClientError> {
        Device::builder(mf(50))
            .seed(1)
            .clock(Arc::new(clock.clone()))
            .retention(RetentionPolicy {
                max_age: Some(Duration::from_secs(30 * DAY as u64)),
                max_events: Some(3),
            })
            .open(Vault::new(path, key))
    }

    #[test]
    fn consent_none_stores_nothing_and_on_device_never_trains() {
        let model = mf(20);
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(1));
        let mut d = Device::new(model, 1);
        assert_eq!(d.record(at(1, 0)).unwrap(), Recorded::NotStored);
        assert!(d.store().is_empty());
        d.set_consent(Consent::OnDevice).unwrap();
        assert_eq!(d.record(at(1, 0)).unwrap(), Recorded::Stored);
        let cfg = TrainingConfig::default();
        for err in [
            d.train(&global, &cfg, false).unwrap_err(),
            d.evaluate(&global, &cfg).unwrap_err(),
        ] {
            assert!(
                matches!(
                    err,
                    ClientError::ConsentRequired {
                        needed: Consent::Federated,
                        current: Consent::OnDevice
                    }
                ),
                "{err}"
            );
        }
        d.set_consent(Consent::Federated).unwrap();
        assert!(d.train(&global, &cfg, false).is_ok());
    }

    #[test]
    fn retention_is_enforced_on_every_write_and_every_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let key = StoreKey::from_bytes([7; 32]);
        let clock = ManualClock::new(T0);
        let mut d = open(&path, &key, &clock).unwrap();
        d.set_consent(Consent::OnDevice).unwrap();
        // Too old to keep at all.
        assert_eq!(d.record(at(1, T0 - 31 * DAY)).unwrap(), Recorded::Expired);
        for (i, age) in [(2, 20), (3, 10), (4, 5), (5, 1)] {
            d.record(at(i, T0 - age * DAY)).unwrap();
        }
        // At most 3: the oldest (item 2) went on the fourth write.
        assert_eq!(d.store().items(), &[3, 4, 5]);
        drop(d);
        // 21 days later, item 3 (then 31 days old) is past 30 days: dropped on load.
        clock.advance(Duration::from_secs(21 * DAY as u64));
        let d = open(&path, &key, &clock).unwrap();
        assert_eq!(d.store().items(), &[4, 5]);
        // And the file itself no longer holds it.
        let plain = Vault::new(&path, &key).load().unwrap().unwrap();
        let state: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        assert_eq!(state["purchases"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn only_item_time_and_quantity_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let key = StoreKey::from_bytes([8; 32]);
        let clock = ManualClock::new(T0);
        let mut d = open(&path, &key, &clock).unwrap();
        d.set_consent(Consent::OnDevice).unwrap();
        d.record(at(9, T0)).unwrap();
        drop(d);
        let vault = Vault::new(&path, &key);
        let plain = vault.load().unwrap().unwrap();
        let mut state: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        let fields: Vec<&String> = state["purchases"][0].as_object().unwrap().keys().collect();
        assert_eq!(fields, ["item", "quantity", "time"]);
        // A record with anything else is refused, not silently kept.
        state["purchases"][0]["note"] = "gift for Alice".into();
        vault.save(&serde_json::to_vec(&state).unwrap()).unwrap();
        let err = open(&path, &key, &clock).unwrap_err();
        assert!(
            matches!(&err, ClientError::StoreFormat { detail, .. } if detail.contains("note")),
            "{err}"
        );
    }

    #[test]
    fn forget_me_erases_history_embedding_and_training_state_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let key = StoreKey::from_bytes([9; 32]);
        let clock = ManualClock::new(T0);
        let mut d = open(&path, &key, &clock).unwrap();
        d.set_consent(Consent::Federated).unwrap();
        for i in [11, 12, 13] {
            d.record(at(i, T0)).unwrap();
        }
        let global = d.model().init_global(&mut ChaCha8Rng::seed_from_u64(2));
        d.ledger.rounds.push(crate::transparency::RoundRecord {
            round: 1,
            task: "train".into(),
            at: T0,
            messages: Default::default(),
            privacy: None,
            training: None,
        });
        d.train(&global, &TrainingConfig::default(), false).unwrap();
        d.persist().unwrap();
        let trained = d.private_embedding().to_vec();
        drop(d);
        let mut d = open(&path, &key, &clock).unwrap();
        assert_eq!(
            d.private_embedding(),
            trained.as_slice(),
            "embedding persisted"
        );
        assert_eq!(d.ledger().rounds.len(), 1);
        d.forget_me().unwrap();
        drop(d);
        let d = open(&path, &key, &clock).unwrap();
        assert!(d.store().is_empty());
        assert_ne!(d.private_embedding(), trained.as_slice());
        assert!(d.ledger().rounds.is_empty());
        assert_eq!(d.ledger().erased_at, Some(T0));
        assert_eq!(d.consent().level, Consent::Federated, "a setting, kept");
        let plain = Vault::new(&path, &key).load().unwrap().unwrap();
        let text = String::from_utf8(plain.to_vec()).unwrap();
        for v in &trained {
            assert!(
                !text.contains(&v.to_string()),
                "old embedding value {v} on disk"
            );
        }
        assert!(text.contains("\"purchases\":[]"), "{text}");
    }

    #[test]
    fn a_damaged_store_or_wrong_key_is_reported_and_the_last_good_state_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let key = StoreKey::from_bytes([10; 32]);
        let clock = ManualClock::new(T0);
        let mut d = open(&path, &key, &clock).unwrap();
        d.set_consent(Consent::OnDevice).unwrap();
        d.record(at(21, T0)).unwrap();
        drop(d);
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        bad[HEADER_AT] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        let err = open(&path, &key, &clock).unwrap_err();
        assert!(matches!(err, ClientError::StoreTampered { .. }), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bad,
            "a failed open writes nothing"
        );
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        let err = open(&path, &key, &clock).unwrap_err();
        assert!(matches!(err, ClientError::StoreTruncated { .. }), "{err}");
        assert!(err.to_string().contains("truncated"));
        std::fs::write(&path, &good).unwrap();
        let err = open(&path, &StoreKey::from_bytes([11; 32]), &clock).unwrap_err();
        assert!(matches!(err, ClientError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains("wrong key"));
        let d = open(&path, &key, &clock).unwrap();
        assert_eq!(d.store().items(), &[21], "the last good state");
    }

    /// A byte inside the ciphertext.
    const HEADER_AT: usize = crate::vault::HEADER_LEN + 3;

    /// A model whose every pass over the data takes one second of a manual clock.
    #[derive(Debug)]
    struct Slow {
        inner: MatrixFactorization,
        clock: ManualClock,
    }

    impl Model for Slow {
        fn items(&self) -> usize {
            self.inner.items()
        }
        fn layout(&self) -> fedrec_proto::Layout {
            self.inner.layout()
        }
        fn init_global(&self, rng: &mut dyn rand::Rng) -> Vec<f32> {
            self.inner.init_global(rng)
        }
        fn init_private(&self, rng: &mut dyn rand::Rng) -> Vec<f32> {
            self.inner.init_private(rng)
        }
        fn personalize(
            &self,
            global: &[f32],
            private: &mut [f32],
            history: &[u32],
            cfg: &TrainingConfig,
            rng: &mut dyn rand::Rng,
        ) {
            self.clock
                .advance(Duration::from_secs(cfg.local_epochs.into()));
            self.inner.personalize(global, private, history, cfg, rng);
        }
        fn train_in_place(
            &self,
            params: &mut [f32],
            anchor: Option<&[f32]>,
            private: &mut [f32],
            history: &[u32],
            cfg: &TrainingConfig,
            rng: &mut dyn rand::Rng,
        ) {
            self.clock
                .advance(Duration::from_secs(cfg.local_epochs.into()));
            self.inner
                .train_in_place(params, anchor, private, history, cfg, rng);
        }
        fn score_all(&self, global: &[f32], private: &[f32], out: &mut Vec<f32>) {
            self.inner.score_all(global, private, out);
        }
    }

    fn budgeted(budget: Option<Duration>) -> (Device, Vec<f32>) {
        let clock = ManualClock::new(T0);
        let model: Arc<dyn Model> = Arc::new(Slow {
            inner: MatrixFactorization::new(30, 4, 0.1).unwrap(),
            clock: clock.clone(),
        });
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(3));
        let mut d = Device::builder(model)
            .seed(5)
            .clock(Arc::new(clock))
            .participation(ParticipationPolicy {
                time_budget: budget,
                ..ParticipationPolicy::default()
            })
            .in_memory()
            .unwrap();
        d.set_consent(Consent::Federated).unwrap();
        for i in [1, 2, 3, 4] {
            d.record(at(i, T0)).unwrap();
        }
        (d, global)
    }

    #[test]
    fn the_time_budget_stops_local_training_between_epochs() {
        let cfg = TrainingConfig {
            local_epochs: 10,
            ..TrainingConfig::default()
        };
        let (mut d, global) = budgeted(Some(Duration::from_millis(2500)));
        let update = d.train(&global, &cfg, false).unwrap();
        // Personalization: epochs end at 1, 2, 3 s; 3 s is past the budget.
        // Training: at least one epoch, then the budget is long spent.
        let t = update.training;
        assert_eq!((t.personalize_epochs, t.train_epochs), (3, 1), "{t:?}");
        assert!(t.stopped_by_budget);
        assert_eq!(t.millis, 4000);

        // A budget never reached gives exactly the unbudgeted computation.
        let (mut a, global) = budgeted(Some(Duration::from_secs(1000)));
        let (mut b, _) = budgeted(None);
        let (ua, ub) = (
            a.train(&global, &cfg, false).unwrap(),
            b.train(&global, &cfg, false).unwrap(),
        );
        assert_eq!(ua.delta, ub.delta);
        assert_eq!(a.private_embedding(), b.private_embedding());
        assert!(!ua.training.stopped_by_budget);
        assert_eq!(ua.training.train_epochs, 10);
    }

    #[test]
    fn asked_for_it_an_als_update_ends_with_the_private_vectors_outer_product() {
        let als = TrainingConfig {
            loss: Loss::Als,
            ..TrainingConfig::default()
        };
        let (mut a, global) = budgeted(None);
        let plain = a.train(&global, &als, false).unwrap().delta;
        assert_eq!(plain.len(), global.len());
        let (mut b, _) = budgeted(None);
        let cfg = TrainingConfig {
            user_moment: true,
            ..als
        };
        let update = b.train(&global, &cfg, false).unwrap().delta;
        let (delta, moment) = update.split_at(global.len());
        assert_eq!(delta, &plain[..], "the update itself is unchanged");
        let x = b.private_embedding();
        let k = x.len();
        assert_eq!(moment.len(), k * (k + 1) / 2);
        let mut at = 0;
        for r in 0..k {
            for c in r..k {
                assert_eq!(moment[at], x[r] * x[c]);
                at += 1;
            }
        }
        assert!(moment[0] > 0.0, "x was solved: {x:?}");
        // Only the ALS loss solves x: asked under BPR, the task is refused.
        let bpr = TrainingConfig {
            user_moment: true,
            ..TrainingConfig::default()
        };
        let err = b.train(&global, &bpr, false).unwrap_err().to_string();
        assert!(err.contains("user_moment"), "{err}");
    }
}
