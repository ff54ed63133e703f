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
use crate::metrics::{self, EvalCounts};
use crate::model::{Loss, Model, TrainingConfig};
use crate::retention::RetentionPolicy;
use crate::store::{MAX_FUTURE_SECS, Purchase, PurchaseStore};
use crate::transparency::{Ledger, TrainingReport};
use crate::vault::Vault;

/// What a device sends back after local training.
#[derive(Clone, Debug)]
pub struct LocalUpdate {
    /// Dense change to the global parameters (same length whatever was bought).
    pub delta: Vec<f32>,
    /// FedAvg weight: the number of distinct purchases trained on.
    pub num_examples: u64,
    /// Evaluation of the received model, when it was asked for.
    pub evaluation: Option<EvalCounts>,
    /// How much local training was done (stays on the device).
    pub training: TrainingReport,
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
    /// A purchase kept out of training to evaluate the model on, and the seed
    /// of its sampled candidates (fixed, so every evaluation uses the same ones).
    pub(crate) held_out: Option<(u32, u64)>,
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

    /// Keeps `item` out of training as this device's evaluation target; its
    /// 99 sampled competitors are drawn from `candidate_seed`, so every
    /// evaluation (and a centralized baseline using the same seed) ranks it
    /// against the same items.
    pub fn hold_out(&mut self, item: u32, candidate_seed: u64) -> Result<(), ClientError> {
        if item as usize >= self.model.items() {
            return Err(ClientError::UnknownItem {
                item,
                items: self.model.items(),
            });
        }
        self.held_out = Some((item, candidate_seed));
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
        let delta = if by_epoch {
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
        })
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
        let (target, seed) = self.held_out?;
        Some(metrics::evaluate_user(
            &self.scores(global),
            self.store.items(),
            target,
            &mut ChaCha8Rng::seed_from_u64(seed),
        ))
    }

    /// The `k` best items for this shopper under `global`, excluding what was
    /// already bought, best first. Uses the private embedding as it is.
    pub fn recommend(&mut self, global: &[f32], k: usize) -> Result<Vec<u32>, ClientError> {
        self.check_global(global)?;
        Ok(metrics::top_k(&self.scores(global), self.store.items(), k))
    }

    /// Drops what the retention policy does not allow now; returns how many.
    pub(crate) fn enforce_retention(&mut self) -> usize {
        let dropped = self
            .store
            .enforce(&self.retention, self.clock.unix_now());
        if dropped > 0 {
            tracing::debug!(dropped, "retention policy dropped purchases");
        }
        dropped
    }

    /// Saves the state to the store file (nothing for an in-memory device).
    pub(crate) fn persist(&self) -> Result<(), ClientError> {
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
        self.store = PurchaseStore::from_purchases(self.model.items(), state.purchases).map_err(
            |e| ClientError::StoreFormat {
                path: path.clone(),
                detail: format!("stored purchase does not fit the model: {e}"),
            },
        )?;
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
