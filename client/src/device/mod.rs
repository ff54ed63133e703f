//! A device: its purchases, its private state, and what it does with a task.
//!
//! [`Device`] is the sans-IO heart of the SDK. Given the global parameters it
//! trains locally and returns a [`LocalUpdate`] (the dense change to the
//! global parameters and nothing else), evaluates, or recommends; a
//! coordinator's [`Task`](crate::task::Task) is worked on in one step,
//! [`Device::run_task`]. Moving bytes to and from a coordinator is the
//! [`crate::participant`]'s job.
//!
//! What the shopper allows is checked here, where the data is: with
//! [`Consent::None`] nothing is recorded, and without [`Consent::Federated`]
//! the device neither trains nor evaluates for a coordinator. What the shopper
//! excluded ([`Exclusion`]) is left out of everything modelling reads: that
//! is [`Device::history`], the one place the purchases reach a model. A device
//! opened on a [`Vault`] keeps everything in one encrypted file, written
//! after every change; the [`RetentionPolicy`] is enforced on every write
//! and every load.

pub use crate::task::LocalUpdate;

mod recommend;
mod report;
mod run;

use std::sync::Arc;

use fedrec_proto::Layout;
use fedrec_proto::catalogue::Catalogue;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::clock::{self, Clock};
use crate::consent::{Consent, ConsentCell, ConsentChange, ConsentRecord};
use crate::eligibility::ParticipationPolicy;
use crate::error::ClientError;
use crate::exclusion::{Exclusion, ExclusionCell, Exclusions};
use crate::model::{self, LocalTraining, Loss, MatrixFactorization, Model};
use crate::ranking::{self, EvalCounts, HeldOut};
use crate::retention::RetentionPolicy;
use crate::store::{MAX_FUTURE_SECS, Purchase, PurchaseKey, PurchaseStore};
use crate::transparency::{Ledger, TrainingReport};
use crate::vault::Vault;

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
    /// What the shopper left out; shared with every copy, like the consent.
    pub(crate) exclusions: ExclusionCell,
    /// Whether the private embedding may have been fitted to purchases (it
    /// is not a fresh one): an exclusion then replaces it, so nothing fitted
    /// to an excluded purchase stays.
    pub(crate) fitted: bool,
    pub(crate) retention: RetentionPolicy,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) participation: ParticipationPolicy,
    /// Rounds taken part in and messages sent (for the transparency report).
    pub(crate) ledger: Ledger,
    /// Where the device keeps its state; `None`: in memory only.
    pub(crate) vault: Option<Vault>,
    /// Replaced by a fresh value ([`fresh_generation`], unique in the
    /// process) whenever the private embedding must not be taken back
    /// from a copy made before (`forget_me`, an exclusion, a new model
    /// shape), so results computed on such a copy are not merged back. A
    /// copy that adopts another shape gets a fresh one too, so it never
    /// matches its original's again.
    pub(crate) generation: u64,
    /// Whether `model` is the coordinator's (given by the app, or learned
    /// from the coordinator and stored); `false`: a placeholder until the
    /// device first joins (see [`Device::builder_from_coordinator`]).
    pub(crate) shaped: bool,
    /// The coordinator's catalogue, as announced at join and stored; `None`
    /// before (or when the coordinator announces none).
    pub(crate) catalogue: Option<Catalogue>,
}

/// Builds a [`Device`]: in memory, or opened on an encrypted store file.
#[derive(Debug)]
pub struct DeviceBuilder {
    /// `None`: from the store file, else learned at the first join.
    model: Option<Arc<dyn Model>>,
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
        self.make(None, None)
    }

    /// Opens the device stored in `vault`, or starts an empty one there if
    /// the file does not exist yet. A file that cannot be read (truncated,
    /// tampered with, another key) is an error and is left untouched. The
    /// retention policy is applied to what was loaded, and the result saved.
    pub fn open(self, vault: Vault) -> Result<Device, ClientError> {
        self.retention.validate()?;
        let loaded = vault.load()?;
        let mut state = match loaded {
            Some(plain) => Some(serde_json::from_slice::<StoredState>(&plain).map_err(|e| {
                ClientError::StoreFormat {
                    path: vault.path().to_owned(),
                    detail: format!("unreadable contents: {e}"),
                }
            })?),
            None => None,
        };
        let shape = state.as_mut().and_then(|s| s.shape.take());
        let mut device = self.make(Some(vault), shape.as_ref())?;
        if let Some(state) = state {
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

    /// The device, its model given by the app, else `stored`'s (a store
    /// file's), else a placeholder until the first join.
    fn make(
        self,
        vault: Option<Vault>,
        stored: Option<&StoredShape>,
    ) -> Result<Device, ClientError> {
        let mut rng = match self.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        let (model, shaped) = match (self.model, stored) {
            (Some(model), _) => (model, true),
            (None, Some(shape)) => (model::for_layout(&Layout::new(shape.layout.clone()))?, true),
            (None, None) => (placeholder_model(), false),
        };
        let catalogue = match stored.and_then(|s| s.catalogue.clone()) {
            None => None,
            Some(ids) if ids.is_empty() => Some(Catalogue::numbered(model.items())),
            Some(ids) => Some(Catalogue::from_ids(ids).map_err(|e| {
                ClientError::StoreFormat {
                    path: vault
                        .as_ref()
                        .map(|v| v.path().to_owned())
                        .unwrap_or_default(),
                    detail: format!("stored {e}"),
                }
            })?),
        };
        let private = model.init_private(&mut rng);
        Ok(Device {
            store: PurchaseStore::new(model.items()),
            model,
            private,
            rng,
            held_out: None,
            consent: ConsentCell::default(),
            exclusions: ExclusionCell::default(),
            fitted: false,
            retention: self.retention,
            clock: self.clock,
            participation: self.participation,
            ledger: Ledger::default(),
            vault,
            generation: 0,
            shaped,
            catalogue,
        })
    }
}

/// Seed of the sampled competitors of a validation purchase, combined with
/// its item (see [`Device::examples`]).
const VALIDATION_SEED: u64 = 0x7a11_da7e_5eed_0001;

/// A generation no device has had yet (see [`Device::generation`]): unique
/// in the process, so that a copy that moved on (adopting another model
/// shape) can never come back with the generation its original reached by
/// other changes.
fn fresh_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The model of a device that has not learned the coordinator's yet: one
/// item, one factor. It is never trained or sent: recording and ranking
/// wait for the real one ([`Device::adopt_shape`]).
fn placeholder_model() -> Arc<dyn Model> {
    // One item and one factor are within MatrixFactorization's bounds.
    Arc::new(
        MatrixFactorization::new(1, 1, model::DEFAULT_INIT_STD)
            .expect("1 item x 1 factor is a valid shape"),
    )
}

/// The coordinator's model shape and catalogue as stored on the device, so
/// that a device reopened offline knows them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredShape {
    /// The model's tensors: names and shapes, in wire order.
    layout: Vec<(String, Vec<u64>)>,
    /// The catalogue's item ids in model order (empty: numbered "1" to
    /// `items`); `None`: the coordinator announced no catalogue.
    catalogue: Option<Vec<String>>,
}

/// Everything a device keeps in its store file. Nothing else can be stored:
/// unknown fields are refused when loading.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredState {
    consent: ConsentRecord,
    purchases: Vec<Purchase>,
    /// Absent from stores written before the shopper's controls existed.
    #[serde(default)]
    exclusions: Exclusions,
    private: Vec<f32>,
    ledger: Ledger,
    /// The model's shape and the catalogue, learned from the coordinator
    /// (absent before the first join, and from older stores).
    #[serde(default)]
    shape: Option<StoredShape>,
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
            .make(None, None)
            .expect("a device with a given model needs no stored shape")
    }

    /// A builder with the app defaults, for `model` (which must match the
    /// coordinator's).
    pub fn builder(model: Arc<dyn Model>) -> DeviceBuilder {
        DeviceBuilder {
            model: Some(model),
            ..Self::builder_from_coordinator()
        }
    }

    /// A builder with the app defaults whose model is the coordinator's:
    /// read from the store file, where [`adopt_shape`](Self::adopt_shape)
    /// keeps it once learned at a join. Until then the device records no
    /// purchase ([`ClientError::NoCatalogue`]) and ranks nothing.
    pub fn builder_from_coordinator() -> DeviceBuilder {
        DeviceBuilder {
            model: None,
            seed: None,
            retention: RetentionPolicy::default(),
            clock: clock::system(),
            participation: ParticipationPolicy::default(),
        }
    }

    /// Records a purchase, if the shopper's consent allows storing it;
    /// rejects items outside the catalogue, non-positive or non-finite
    /// quantities and times more than a day ahead of the device's clock.
    /// Applies the retention policy and saves the store. A purchase of an
    /// excluded item or with an excluded tag is stored but not used.
    pub fn record(&mut self, purchase: Purchase) -> Result<Recorded, ClientError> {
        if !self.consent.level().stores_history() {
            return Ok(Recorded::NotStored);
        }
        if !self.shaped {
            return Err(ClientError::NoCatalogue);
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

    /// Leaves `exclusion` out of personalization, training, evaluation,
    /// recommendations and explanations from now on, also for a round
    /// running on a copy of this device; saves. Returns whether it was new.
    ///
    /// Excluded purchases are as if never made: their items may be
    /// recommended like any item not bought. They stay stored (and counted
    /// in the transparency report) until retention or `forget_me` removes
    /// them. If the private embedding was fitted to purchases now left out,
    /// it is replaced by a fresh one (refitted on what is left at the next
    /// use), so nothing learned from them stays.
    ///
    /// Errors: [`ClientError::UnknownPurchase`] for a purchase not stored,
    /// [`ClientError::UnknownItem`] for an item outside the catalogue. An
    /// item or tag without purchases yet is accepted: it applies to future
    /// purchases.
    pub fn exclude(&mut self, exclusion: Exclusion) -> Result<bool, ClientError> {
        self.check_exclusion(&exclusion)?;
        let before = self.history();
        if !self.exclusions.insert(exclusion) {
            return Ok(false);
        }
        if self.history() != before {
            // Copies made before must not hand back what they fitted.
            self.generation = fresh_generation();
            if self.fitted {
                self.private = self.model.init_private(&mut self.rng);
                self.fitted = false;
            }
        }
        tracing::debug!(exclusions = self.exclusions.get().len(), "exclusion added");
        self.persist()?;
        Ok(true)
    }

    /// Uses again what `exclusion` left out, from now on; saves. Returns
    /// whether it was in force. Errors as [`exclude`](Self::exclude).
    pub fn include(&mut self, exclusion: Exclusion) -> Result<bool, ClientError> {
        self.check_exclusion(&exclusion)?;
        if !self.exclusions.remove(&exclusion) {
            return Ok(false);
        }
        tracing::debug!(
            exclusions = self.exclusions.get().len(),
            "exclusion removed"
        );
        self.persist()?;
        Ok(true)
    }

    /// What the shopper excluded.
    pub fn exclusions(&self) -> Exclusions {
        self.exclusions.get()
    }

    fn check_exclusion(&self, exclusion: &Exclusion) -> Result<(), ClientError> {
        match exclusion {
            Exclusion::Purchase(key) if !self.store.contains(*key) => {
                Err(ClientError::UnknownPurchase {
                    item: key.item,
                    time: key.time,
                })
            }
            Exclusion::Item(item) => self.check_item(*item),
            _ => Ok(()),
        }
    }

    /// The purchase history every model computation uses: the distinct
    /// items of the stored purchases that are not excluded, sorted. Nothing
    /// else of the store reaches a model.
    pub fn history(&self) -> Vec<u32> {
        self.exclusions.with(|x| self.store.history(x)).0
    }

    /// The stored purchases every model computation may read (with their
    /// times and quantities): those not excluded, in recording order.
    pub fn used_purchases(&self) -> Vec<Purchase> {
        self.exclusions.with(|x| self.store.used(x)).0
    }

    /// Runs `f` on [`history`](Self::history). If the exclusions change
    /// while it runs (the shopper, while a round runs on a copy), restores
    /// the private embedding and the randomness and runs it again on the new
    /// history: the result is exactly what that history gives.
    fn on_history<T>(&mut self, mut f: impl FnMut(&mut Self, &[u32]) -> T) -> T {
        self.on_examples(false, |device, history, _| f(device, history))
    }

    /// [`on_history`](Self::on_history) for a task: runs `f` on the history
    /// it trains on and the purchase it evaluates on (see
    /// [`examples`](Self::examples)), both read under the same exclusions.
    fn on_examples<T>(
        &mut self,
        validation: bool,
        mut f: impl FnMut(&mut Self, &[u32], Option<&HeldOut>) -> T,
    ) -> T {
        let private = self.private.clone();
        let rng = self.rng.clone();
        loop {
            let ((history, held_out), version) =
                self.exclusions.with(|x| self.examples(x, validation));
            let out = f(self, &history, held_out.as_ref());
            if self.exclusions.version() == version {
                self.fitted |= !history.is_empty();
                return out;
            }
            tracing::debug!("exclusions changed during a local computation; computing again");
            self.private.clone_from(&private);
            self.rng = rng.clone();
        }
    }

    /// What a task works on under `exclusions`: the history it trains on,
    /// and the purchase it evaluates on. Without `validation`, the history
    /// ([`PurchaseStore::history`]) and the held-out purchase set with
    /// [`hold_out`](Self::hold_out). With it (a trial of the coordinator's
    /// settings search, [`Task::validation`](crate::task::Task::validation)),
    /// the device's own validation purchase
    /// ([`PurchaseStore::validation_purchase`]) is taken out of the history,
    /// every purchase of its item, and is what the task evaluates on, ranked
    /// against the items not trained on; without one, the whole history and
    /// nothing to evaluate on.
    fn examples(&self, exclusions: &Exclusions, validation: bool) -> (Vec<u32>, Option<HeldOut>) {
        let mut history = self.store.history(exclusions);
        if !validation {
            return (history, self.held_out);
        }
        let Some(key) = self.store.validation_purchase(exclusions) else {
            return (history, None);
        };
        history.retain(|&item| item != key.item);
        let held_out = HeldOut {
            item: key.item,
            exclude_history: true,
            // The same competitors in every trial, so that trials compare.
            candidate_seed: Some(VALIDATION_SEED ^ u64::from(key.item)),
        };
        (history, Some(held_out))
    }

    /// The device's own validation purchase under the exclusions in force
    /// (see [`PurchaseStore::validation_purchase`]): what a task of the
    /// coordinator's settings search holds out and evaluates on. `None`
    /// with fewer than two distinct items in use.
    pub fn validation_purchase(&self) -> Option<PurchaseKey> {
        self.exclusions
            .with(|x| self.store.validation_purchase(x))
            .0
    }

    /// Drops the exclusions of single purchases no longer stored.
    fn prune_exclusions(&self) {
        self.exclusions
            .prune_purchases(|key| self.store.contains(key));
    }

    /// Erases the purchase history, the private embedding (replaced by a
    /// fresh random one), and the training state (held-out purchase and the
    /// ledger of rounds), and saves the empty state over the store file.
    /// The consent level is a setting and is kept; so are the exclusions of
    /// items and tags, settings about future purchases too (the transparency
    /// report lists them; [`include`](Self::include) removes them). The
    /// exclusions of single purchases go with the purchases.
    pub fn forget_me(&mut self) -> Result<(), ClientError> {
        self.store.clear();
        self.prune_exclusions();
        self.private = self.model.init_private(&mut self.rng);
        self.fitted = false;
        self.held_out = None;
        self.ledger = Ledger {
            erased_at: Some(self.clock.unix_now()),
            ..Ledger::default()
        };
        self.generation = fresh_generation();
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

    /// Whether the device knows the coordinator's model (given, or learned
    /// at a join and stored): see [`builder_from_coordinator`](Self::builder_from_coordinator).
    pub fn is_shaped(&self) -> bool {
        self.shaped
    }

    /// The coordinator's catalogue as last announced (and stored), if any.
    pub fn catalogue(&self) -> Option<&Catalogue> {
        self.catalogue.as_ref()
    }

    /// Takes the coordinator's model `layout` and `catalogue`, as announced
    /// when the device joined, and saves them. A layout other than the
    /// device's replaces its model (a fresh private embedding); stored
    /// purchases are kept, and must fit the new catalogue. Returns whether
    /// the model changed.
    ///
    /// # Errors
    /// [`ClientError::ModelMismatch`] for a layout this SDK cannot train or
    /// a catalogue too small for the stored purchases (nothing changes).
    pub fn adopt_shape(
        &mut self,
        layout: &Layout,
        catalogue: Option<Catalogue>,
    ) -> Result<bool, ClientError> {
        let changed = !self.shaped || self.model.layout() != *layout;
        if changed {
            let model = model::for_layout(layout)?;
            if let Some(c) = &catalogue
                && c.len() != model.items()
            {
                return Err(ClientError::ModelMismatch(format!(
                    "the coordinator's catalogue lists {} items, its model {}",
                    c.len(),
                    model.items()
                )));
            }
            let store =
                PurchaseStore::from_purchases(model.items(), self.store.purchases().to_vec())
                    .map_err(|e| {
                        ClientError::ModelMismatch(format!(
                            "the coordinator's model does not fit the stored purchases: {e}"
                        ))
                    })?;
            tracing::info!(
                items = model.items(),
                "model shape learned from the coordinator"
            );
            self.private = model.init_private(&mut self.rng);
            self.model = model;
            self.store = store;
            self.fitted = false;
            self.shaped = true;
            self.generation = fresh_generation();
        } else if self.catalogue == catalogue {
            return Ok(false);
        }
        self.catalogue = catalogue;
        self.persist()?;
        Ok(changed)
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
        cfg: &LocalTraining,
        evaluate: bool,
    ) -> Result<LocalUpdate, ClientError> {
        self.ready_for_task(global)?;
        cfg.validate()?;
        Ok(self.train_ready(global, cfg, evaluate, false))
    }

    /// Whether the device may work for a coordinator now (federated
    /// consent) on `global` (parameters of its model).
    pub(crate) fn ready_for_task(&self, global: &[f32]) -> Result<(), ClientError> {
        self.consent.require_training()?;
        self.check_global(global)
    }

    /// [`train`](Self::train) once the device is
    /// [ready](Self::ready_for_task) and `cfg` is valid.
    ///
    /// With `validation`, on the history without the device's validation
    /// purchase, which is what it evaluates (see [`examples`](Self::examples)).
    pub(crate) fn train_ready(
        &mut self,
        global: &[f32],
        cfg: &LocalTraining,
        evaluate: bool,
        validation: bool,
    ) -> LocalUpdate {
        let start = self.clock.monotonic();
        self.on_examples(validation, |device, history, held_out| {
            let held_out = if evaluate { held_out } else { None };
            device.train_on(global, cfg, held_out, history, start)
        })
    }

    /// [`train`](Self::train) on `history`, checked, started at `start`,
    /// evaluating on `held_out` first if given.
    fn train_on(
        &mut self,
        global: &[f32],
        cfg: &LocalTraining,
        held_out: Option<&HeldOut>,
        history: &[u32],
        start: std::time::Duration,
    ) -> LocalUpdate {
        let budget = self.participation.time_budget;
        let over = |clock: &Arc<dyn Clock>| budget.is_some_and(|b| clock.monotonic() - start >= b);
        let mut report = TrainingReport {
            requested_epochs: cfg.local_epochs,
            ..TrainingReport::default()
        };
        let by_epoch = budget.is_some() && cfg.loss == Loss::Bpr;
        let one_epoch = LocalTraining {
            local_epochs: 1,
            ..*cfg
        };
        if by_epoch {
            // Epoch by epoch: the same computation as all epochs at once.
            while report.personalize_epochs < cfg.local_epochs
                && (report.personalize_epochs == 0 || !over(&self.clock))
            {
                self.personalize_with(global, &one_epoch, history);
                report.personalize_epochs += 1;
            }
        } else {
            self.personalize_with(global, cfg, history);
            report.personalize_epochs = if cfg.loss == Loss::Bpr {
                cfg.local_epochs
            } else {
                1
            };
        }
        let evaluation = self.score_held_out(global, history, held_out);
        let mut delta = if by_epoch {
            crate::model::change(global, |local| {
                while report.train_epochs < cfg.local_epochs
                    && (report.train_epochs == 0 || !over(&self.clock))
                {
                    self.model.train_in_place(
                        local,
                        Some(global),
                        &mut self.private,
                        history,
                        &one_epoch,
                        &mut self.rng,
                    );
                    report.train_epochs += 1;
                }
            })
        } else {
            // `private` was just fitted to `global` above.
            let delta =
                self.model
                    .train_fitted(global, &mut self.private, history, cfg, &mut self.rng);
            report.train_epochs = report.personalize_epochs;
            delta
        };
        let model_values = delta.len();
        if cfg.user_moment {
            // Validated: only under the ALS loss, whose private vector was
            // just solved against `global`.
            fedrec_proto::symmetric::push_outer_upper(&self.private, &mut delta);
        }
        let extras = delta.len() - model_values;
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
        LocalUpdate {
            delta,
            extras,
            num_examples: history.len() as u64,
            evaluation,
            training: report,
            within_clip: 0.0,
        }
    }

    /// Fits the private embedding to `global` and evaluates it on the held-out
    /// purchase; `None` when there is none. Needs [`Consent::Federated`]
    /// (the counts are sent to the coordinator).
    pub fn evaluate(
        &mut self,
        global: &[f32],
        cfg: &LocalTraining,
    ) -> Result<Option<EvalCounts>, ClientError> {
        self.ready_for_task(global)?;
        cfg.validate()?;
        Ok(self.evaluate_ready(global, cfg, false))
    }

    /// [`evaluate`](Self::evaluate) once the device is
    /// [ready](Self::ready_for_task) and `cfg` is valid.
    ///
    /// With `validation`, on the device's validation purchase, fitted
    /// without it (see [`examples`](Self::examples)).
    pub(crate) fn evaluate_ready(
        &mut self,
        global: &[f32],
        cfg: &LocalTraining,
        validation: bool,
    ) -> Option<EvalCounts> {
        self.on_examples(validation, |device, history, held_out| {
            device.personalize_with(global, cfg, history);
            device.score_held_out(global, history, held_out)
        })
    }

    /// Fits the private embedding to `global` and the purchases in use, for
    /// on-device recommendations (any consent that stores history; with
    /// [`Consent::None`] nothing happens). With [`Loss::Als`] this is the
    /// exact least-squares fit, which makes [`Device::explain`] exact.
    pub fn personalize(&mut self, global: &[f32], cfg: &LocalTraining) -> Result<(), ClientError> {
        self.check_global(global)?;
        cfg.validate()?;
        if self.consent.level().stores_history() {
            self.on_history(|device, history| device.personalize_with(global, cfg, history));
        }
        Ok(())
    }

    fn personalize_with(&mut self, global: &[f32], cfg: &LocalTraining, history: &[u32]) {
        self.model
            .personalize(global, &mut self.private, history, cfg, &mut self.rng);
    }

    /// Scores of every item. Not kept: an idle device holds no per-item buffer.
    pub(crate) fn scores(&self, global: &[f32]) -> Vec<f32> {
        self.scores_on(global, &self.history())
    }

    /// Scores of every item for a shopper with `history`.
    fn scores_on(&self, global: &[f32], history: &[u32]) -> Vec<f32> {
        let mut scores = Vec::with_capacity(self.model.items());
        self.model
            .score_all(global, &self.private, history, &mut scores);
        scores
    }

    /// The counts of `held_out` ranked by a shopper with `history` (the
    /// items trained on); `None` without a held-out purchase.
    fn score_held_out(
        &self,
        global: &[f32],
        history: &[u32],
        held_out: Option<&HeldOut>,
    ) -> Option<EvalCounts> {
        let held_out = held_out?;
        Some(rank_held_out(
            &self.scores_on(global, history),
            held_out,
            history,
        ))
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
        let history = self.history();
        let exclude: &[u32] = if held_out.exclude_history {
            &history
        } else {
            &[]
        };
        Ok((
            rank_held_out(&scores, held_out, &history),
            ranking::top_k(&scores, exclude, ranking::K),
        ))
    }

    /// The `k` best items for this shopper under `global`, leaving out what
    /// was already bought (and not excluded), best first. Uses the private
    /// embedding as it is.
    pub fn recommend(&mut self, global: &[f32], k: usize) -> Result<Vec<u32>, ClientError> {
        self.check_global(global)?;
        Ok(ranking::top_k(&self.scores(global), &self.history(), k))
    }

    /// Drops what the retention policy does not allow now, and the
    /// exclusions of the purchases dropped; returns how many purchases.
    pub(crate) fn enforce_retention(&mut self) -> usize {
        let dropped = self.store.enforce(&self.retention, self.clock.unix_now());
        if dropped > 0 {
            tracing::debug!(dropped, "retention policy dropped purchases");
        }
        self.prune_exclusions();
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
            exclusions: self.exclusions.get(),
            private: self.private.clone(),
            ledger: self.ledger.clone(),
            shape: self.shaped.then(|| StoredShape {
                layout: self.model.layout().tensors().to_vec(),
                catalogue: self
                    .catalogue
                    .as_ref()
                    .map(|c| if c.is_numbered() { Vec::new() } else { c.ids() }),
            }),
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
            // It may have been fitted: an exclusion replaces it.
            self.fitted = true;
        } else {
            // A model of another shape: the private embedding starts afresh.
            tracing::info!("stored private embedding does not fit the model; starting afresh");
        }
        self.consent.set(state.consent);
        self.exclusions.set(state.exclusions);
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
    /// history, private state, consent and exclusions (shared); no store
    /// file, so the copy never writes. Merge results back with
    /// [`absorb`](Self::absorb).
    pub(crate) fn working_copy(&self) -> Device {
        Device {
            model: Arc::clone(&self.model),
            store: self.store.clone(),
            private: self.private.clone(),
            rng: ChaCha8Rng::seed_from_u64(rand::RngExt::random(&mut rand::rng())),
            held_out: self.held_out,
            consent: self.consent.clone(),
            exclusions: self.exclusions.clone(),
            fitted: self.fitted,
            retention: self.retention,
            clock: Arc::clone(&self.clock),
            participation: self.participation.clone(),
            ledger: Ledger::default(),
            vault: None,
            generation: self.generation,
            shaped: self.shaped,
            catalogue: self.catalogue.clone(),
        }
    }

    /// Takes back what a [`working_copy`](Self::working_copy) learned: its
    /// private embedding and its round records, unless the shopper erased
    /// their data or excluded purchases meanwhile (then only the round
    /// records, which say what left the device). Saves.
    ///
    /// A copy that adopted another model shape (a task's download of
    /// another layout) hands back only its round records: its generation is
    /// fresh, and its model is not the device's, which keeps its own until
    /// it adopts another itself (the next join, [`adopt_shape`](Self::adopt_shape)).
    pub(crate) fn absorb(&mut self, copy: Device) -> Result<(), ClientError> {
        if copy.generation == self.generation && copy.model.layout() == self.model.layout() {
            self.private = copy.private;
            self.fitted |= copy.fitted;
        }
        self.ledger.rounds.extend(copy.ledger.rounds);
        for (k, m) in copy.ledger.outside_rounds {
            let slot = self.ledger.outside_rounds.entry(k).or_default();
            slot.count += m.count;
            slot.bytes += m.bytes;
        }
        // The copy no longer shares the exclusions: what it had to keep
        // leaving out can go now.
        drop(copy.exclusions);
        self.prune_exclusions();
        self.persist()
    }
}

/// The held-out purchase's rank among the scores, with `history` the
/// shopper's history.
fn rank_held_out(scores: &[f32], held_out: &HeldOut, history: &[u32]) -> EvalCounts {
    let exclude = if held_out.exclude_history {
        history
    } else {
        &[]
    };
    let mut rng = held_out.candidate_seed.map(ChaCha8Rng::seed_from_u64);
    ranking::evaluate_user(
        scores,
        exclude,
        history,
        held_out.item,
        rng.as_mut().map(|r| r as &mut dyn rand::Rng),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;
    use crate::eligibility::ParticipationPolicy;
    use crate::exclusion::Exclusion;
    use crate::model::{MatrixFactorization, same_bits};
    use crate::store::{PurchaseKey, Tag};
    use crate::vault::StoreKey;

    const DAY: i64 = 86_400;
    const T0: i64 = 1_700_000_000;

    fn mf(items: usize) -> Arc<dyn Model> {
        Arc::new(MatrixFactorization::new(items, 4, 0.1).unwrap())
    }

    fn at(item: u32, time: i64) -> Purchase {
        Purchase::new(item, time, 1.0)
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
        let cfg = LocalTraining::default();
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
    fn only_item_time_quantity_and_the_apps_tag_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let key = StoreKey::from_bytes([8; 32]);
        let clock = ManualClock::new(T0);
        let mut d = open(&path, &key, &clock).unwrap();
        d.set_consent(Consent::OnDevice).unwrap();
        d.record(at(9, T0)).unwrap();
        d.record(at(10, T0).with_tag(Tag::new("gift").unwrap()))
            .unwrap();
        drop(d);
        let vault = Vault::new(&path, &key);
        let plain = vault.load().unwrap().unwrap();
        let mut state: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        let fields: Vec<&String> = state["purchases"][0].as_object().unwrap().keys().collect();
        assert_eq!(fields, ["item", "quantity", "time"]);
        assert_eq!(state["purchases"][1]["tag"], "gift");
        // A tag is checked on load like any other field.
        let mut bad = state.clone();
        bad["purchases"][1]["tag"] = "gift for Alice".into();
        vault.save(&serde_json::to_vec(&bad).unwrap()).unwrap();
        let err = open(&path, &key, &clock).unwrap_err();
        assert!(
            matches!(&err, ClientError::StoreFormat { detail, .. } if detail.contains("gift for Alice")),
            "{err}"
        );
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
        d.train(&global, &LocalTraining::default(), false).unwrap();
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

    /// A model that lets a test watch its passes over the data: each
    /// pass takes one second of `clock` per epoch (when given), and `hook`
    /// runs once after the first training pass (when set).
    struct Instrumented {
        inner: MatrixFactorization,
        clock: Option<ManualClock>,
        hook: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl Instrumented {
        fn new(clock: Option<ManualClock>) -> Self {
            Self {
                inner: MatrixFactorization::new(30, 4, 0.1).unwrap(),
                clock,
                hook: std::sync::Mutex::new(None),
            }
        }

        fn pass(&self, cfg: &LocalTraining) {
            if let Some(clock) = &self.clock {
                clock.advance(Duration::from_secs(cfg.local_epochs.into()));
            }
        }
    }

    impl std::fmt::Debug for Instrumented {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Instrumented")
        }
    }

    impl Model for Instrumented {
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
            cfg: &LocalTraining,
            rng: &mut dyn rand::Rng,
        ) {
            self.pass(cfg);
            self.inner.personalize(global, private, history, cfg, rng);
        }
        fn train_in_place(
            &self,
            params: &mut [f32],
            anchor: Option<&[f32]>,
            private: &mut [f32],
            history: &[u32],
            cfg: &LocalTraining,
            rng: &mut dyn rand::Rng,
        ) {
            self.pass(cfg);
            self.inner
                .train_in_place(params, anchor, private, history, cfg, rng);
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
        }
        fn score_all(&self, global: &[f32], private: &[f32], history: &[u32], out: &mut Vec<f32>) {
            self.inner.score_all(global, private, history, out);
        }
    }

    fn budgeted(budget: Option<Duration>) -> (Device, Vec<f32>) {
        let clock = ManualClock::new(T0);
        let model: Arc<dyn Model> = Arc::new(Instrumented::new(Some(clock.clone())));
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
        let cfg = LocalTraining {
            local_epochs: 10,
            ..LocalTraining::default()
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

    /// A device's ALS update is the model's `train` on its history, bit
    /// for bit: the device fits its private vector before it trains (and
    /// trains without fitting it again).
    #[test]
    fn a_devices_als_update_is_the_models_training_on_its_history() {
        let model = Arc::new(MatrixFactorization::new(12, 4, 0.1).unwrap());
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(3));
        let mut d = Device::builder(Arc::clone(&model) as Arc<dyn Model>)
            .seed(5)
            .clock(Arc::new(ManualClock::new(T0)))
            .in_memory()
            .unwrap();
        d.set_consent(Consent::Federated).unwrap();
        for i in [1, 2, 3, 4] {
            d.record(at(i, T0)).unwrap();
        }
        let als = LocalTraining {
            loss: Loss::Als,
            ..LocalTraining::default()
        };
        assert_eq!(d.history(), vec![1, 2, 3, 4]);
        let update = d.train(&global, &als, false).unwrap();
        let mut private = vec![0.0; 4];
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let expected = model.train(&global, &mut private, &d.history(), &als, &mut rng);
        assert!(same_bits(&update.delta, &expected), "the update");
        assert!(
            same_bits(d.private_embedding(), &private),
            "the private vector"
        );
    }

    #[test]
    fn asked_for_it_an_als_update_ends_with_the_private_vectors_outer_product() {
        let als = LocalTraining {
            loss: Loss::Als,
            ..LocalTraining::default()
        };
        let (mut a, global) = budgeted(None);
        let plain = a.train(&global, &als, false).unwrap().delta;
        assert_eq!(plain.len(), global.len());
        let (mut b, _) = budgeted(None);
        let cfg = LocalTraining {
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
        let bpr = LocalTraining {
            user_moment: true,
            ..LocalTraining::default()
        };
        let err = b.train(&global, &bpr, false).unwrap_err().to_string();
        assert!(err.contains("user_moment"), "{err}");
    }

    fn tagged(item: u32, time: i64, tag: &str) -> Purchase {
        at(item, time).with_tag(Tag::new(tag).unwrap())
    }

    /// A shopper's purchases: every kind of exclusion below leaves out some
    /// of them, and something else stays.
    fn purchases() -> Vec<Purchase> {
        vec![
            at(1, T0),
            at(2, T0 + 1),
            at(5, T0 + 2),
            at(7, T0 + 3),
            at(7, T0 + 4),
            tagged(8, T0 + 5, "medical"),
            tagged(9, T0 + 6, "medical"),
            at(9, T0 + 7),
            tagged(3, T0 + 8, "gift"),
        ]
    }

    fn kinds() -> [Exclusion; 3] {
        [
            Exclusion::Purchase(PurchaseKey {
                item: 5,
                time: T0 + 2,
            }),
            Exclusion::Item(7),
            Exclusion::tag("medical").unwrap(),
        ]
    }

    /// A federated device with `purchases`, in memory, seeded.
    fn device_with(model: &Arc<dyn Model>, purchases: &[Purchase]) -> Device {
        let mut d = Device::builder(Arc::clone(model))
            .seed(11)
            .clock(Arc::new(ManualClock::new(T0 + DAY)))
            .in_memory()
            .unwrap();
        d.set_consent(Consent::Federated).unwrap();
        for p in purchases {
            d.record(p.clone()).unwrap();
        }
        d
    }

    /// What a device computes from its purchases: the update, the private
    /// embedding after it, the evaluation, the recommendations.
    fn outcome(d: &mut Device, global: &[f32]) -> (Vec<f32>, u64, Vec<f32>, Vec<u32>) {
        let update = d.train(global, &LocalTraining::default(), false).unwrap();
        let recs = d.recommend(global, 10).unwrap();
        (
            update.delta,
            update.num_examples,
            d.private_embedding().to_vec(),
            recs,
        )
    }

    #[test]
    fn an_excluded_purchase_is_as_if_never_made_and_including_it_restores_it() {
        let model = mf(30);
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(4));
        let all = purchases();
        let original = outcome(&mut device_with(&model, &all), &global);
        for x in kinds() {
            let kept: Vec<Purchase> = all.iter().filter(|p| !x.covers(p)).cloned().collect();
            assert!(kept.len() < all.len() && !kept.is_empty(), "{x:?}");
            let never_had = outcome(&mut device_with(&model, &kept), &global);
            assert_ne!(never_had, original, "{x:?} changes something");

            let mut d = device_with(&model, &all);
            assert!(d.exclude(x.clone()).unwrap());
            assert!(!d.exclude(x.clone()).unwrap(), "already excluded");
            assert_eq!(d.store().len(), all.len(), "still stored");
            assert_eq!(outcome(&mut d, &global), never_had, "{x:?}");

            let mut d = device_with(&model, &all);
            d.exclude(x.clone()).unwrap();
            assert!(d.include(x.clone()).unwrap());
            assert!(!d.include(x.clone()).unwrap(), "no longer excluded");
            assert_eq!(outcome(&mut d, &global), original, "{x:?} re-included");
        }
        // The evaluation too: the held-out purchase competes with the item
        // excluded, as with an item never bought.
        let held = HeldOut {
            item: 20,
            exclude_history: true,
            candidate_seed: Some(3),
        };
        let cfg = LocalTraining::default();
        let mut d = device_with(&model, &all);
        d.exclude(Exclusion::Item(7)).unwrap();
        d.hold_out(held).unwrap();
        let kept: Vec<Purchase> = all.iter().filter(|p| p.item != 7).cloned().collect();
        let mut r = device_with(&model, &kept);
        r.hold_out(held).unwrap();
        assert_eq!(
            d.evaluate(&global, &cfg).unwrap(),
            r.evaluate(&global, &cfg).unwrap()
        );
    }

    #[test]
    fn an_exclusion_after_fitting_replaces_the_private_embedding() {
        let model = mf(30);
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(4));
        let mut d = device_with(&model, &purchases());
        d.train(&global, &LocalTraining::default(), false).unwrap();
        let fitted = d.private_embedding().to_vec();
        // Excluding an item not bought changes no history: nothing to replace.
        d.exclude(Exclusion::Item(29)).unwrap();
        assert_eq!(d.private_embedding(), fitted.as_slice());
        d.exclude(Exclusion::Item(7)).unwrap();
        assert_ne!(d.private_embedding(), fitted.as_slice());
        // Refitted exactly (ALS) on what is left: as if item 7 was never bought.
        let als = crate::app::default_personalization();
        let kept: Vec<Purchase> = purchases().into_iter().filter(|p| p.item != 7).collect();
        let mut r = device_with(&model, &kept);
        d.personalize(&global, &als).unwrap();
        r.personalize(&global, &als).unwrap();
        assert_eq!(d.private_embedding(), r.private_embedding());
        assert_eq!(
            d.explain(&global, 4, &als).unwrap(),
            r.explain(&global, 4, &als).unwrap()
        );
    }

    #[test]
    fn everything_excluded_is_a_cold_start() {
        let model = mf(30);
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(4));
        let mut d = device_with(&model, &[at(1, T0), at(2, T0)]);
        d.exclude(Exclusion::Item(1)).unwrap();
        d.exclude(Exclusion::Item(2)).unwrap();
        assert!(d.history().is_empty());
        let recs = d.recommendations(&global, 5, 0.0).unwrap();
        assert_eq!(recs.basis, crate::recommend::Basis::PopularColdStart);
        assert!(
            !d.transparency_report(false)
                .to_text()
                .contains("no purchases")
        );
    }

    #[test]
    fn an_exclusion_made_during_a_round_applies_to_that_round() {
        let hooked = Arc::new(Instrumented::new(None));
        let model: Arc<dyn Model> = hooked.clone();
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(4));
        let all = purchases();
        let x = Exclusion::tag("medical").unwrap();
        let kept: Vec<Purchase> = all.iter().filter(|p| !x.covers(p)).cloned().collect();
        // The round runs on a copy with randomness of its own; the reference
        // gets the same.
        let reference = |copy_rng: u64| {
            let mut r = device_with(&model, &kept);
            r.rng = ChaCha8Rng::seed_from_u64(copy_rng);
            outcome(&mut r, &global)
        };

        // Made after the copy was taken, before it computes.
        let mut app = device_with(&model, &all);
        let mut copy = app.working_copy();
        copy.rng = ChaCha8Rng::seed_from_u64(5);
        app.exclude(x.clone()).unwrap();
        assert_eq!(outcome(&mut copy, &global), reference(5));

        // Made while the copy computes its update (the app holds the device
        // and changes it from another thread): computed again without it.
        let app = Arc::new(std::sync::Mutex::new(device_with(&model, &all)));
        let mut copy = app.lock().unwrap().working_copy();
        copy.rng = ChaCha8Rng::seed_from_u64(6);
        let (shared, excluded) = (Arc::clone(&app), x.clone());
        *hooked.hook.lock().unwrap() = Some(Box::new(move || {
            let handle = std::thread::spawn(move || shared.lock().unwrap().exclude(excluded));
            handle.join().unwrap().unwrap();
        }));
        let during = outcome(&mut copy, &global);
        assert!(hooked.hook.lock().unwrap().is_none(), "the hook ran");
        assert_eq!(during, reference(6));
        // What the copy fitted before the exclusion is not taken back.
        let mut app = Arc::into_inner(app).unwrap().into_inner().unwrap();
        let before = app.private_embedding().to_vec();
        app.absorb(copy).unwrap();
        assert_eq!(app.private_embedding(), before.as_slice());
    }

    #[test]
    fn unknown_purchases_items_and_malformed_tags_are_named() {
        let model = mf(30);
        let mut d = device_with(&model, &purchases());
        let err = d
            .exclude(Exclusion::Purchase(PurchaseKey {
                item: 5,
                time: T0 + 99,
            }))
            .unwrap_err();
        assert!(
            matches!(err, ClientError::UnknownPurchase { item: 5, time } if time == T0 + 99),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains(&format!("item 5 at time {}", T0 + 99)),
            "{err}"
        );
        let err = d.include(Exclusion::Item(30)).unwrap_err();
        assert!(
            matches!(err, ClientError::UnknownItem { item: 30, .. }),
            "{err}"
        );
        for bad in ["", "gift for Alice", "médical", &"x".repeat(33)] {
            let err = Exclusion::tag(bad).unwrap_err();
            assert!(
                matches!(&err, ClientError::InvalidTag { tag } if tag == bad),
                "{err}"
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(Tag::new("x".repeat(32)).is_ok());
        assert!(Tag::new("Gift-for_2").is_ok());
        // A tag or an item without purchases yet: for future purchases.
        assert!(d.exclude(Exclusion::tag("pharmacy").unwrap()).unwrap());
        assert!(d.exclude(Exclusion::Item(29)).unwrap());
        assert!(d.exclusions().len() == 2 && d.history() == d.store().items());
        d.record(tagged(4, T0 + 9, "pharmacy")).unwrap();
        assert!(!d.history().contains(&4));
    }

    #[test]
    fn exclusions_are_saved_and_retention_and_forget_me_apply_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let key = StoreKey::from_bytes([12; 32]);
        let clock = ManualClock::new(T0);
        let open = || {
            Device::builder(mf(30))
                .seed(1)
                .clock(Arc::new(clock.clone()))
                .retention(RetentionPolicy {
                    max_age: Some(Duration::from_secs(30 * DAY as u64)),
                    max_events: None,
                })
                .open(Vault::new(&path, &key))
                .unwrap()
        };
        let mut d = open();
        d.set_consent(Consent::OnDevice).unwrap();
        let old = at(5, T0 - 20 * DAY);
        for p in [old.clone(), at(6, T0), tagged(7, T0, "gift"), at(8, T0)] {
            d.record(p).unwrap();
        }
        for x in [
            Exclusion::Purchase(old.key()),
            Exclusion::Item(8),
            Exclusion::tag("gift").unwrap(),
        ] {
            d.exclude(x).unwrap();
        }
        let excluded = d.exclusions();
        assert_eq!(d.history(), [6]);
        drop(d);
        let d = open();
        assert_eq!(d.exclusions(), excluded, "saved");
        assert_eq!(d.history(), [6]);

        // Eleven days later the old purchase is past 30 days: it goes, and
        // its exclusion with it; the item and tag exclusions are settings.
        clock.advance(Duration::from_secs(11 * DAY as u64));
        let mut d = open();
        assert_eq!(d.store().len(), 3);
        let left: Vec<Exclusion> = d.exclusions().iter().cloned().collect();
        assert_eq!(left, [Exclusion::Item(8), Exclusion::tag("gift").unwrap()]);
        let plain = Vault::new(&path, &key).load().unwrap().unwrap();
        let text = String::from_utf8(plain.to_vec()).unwrap();
        assert!(!text.contains(&(T0 - 20 * DAY).to_string()), "{text}");

        d.exclude(Exclusion::Purchase(PurchaseKey { item: 6, time: T0 }))
            .unwrap();
        d.forget_me().unwrap();
        drop(d);
        let d = open();
        let left: Vec<Exclusion> = d.exclusions().iter().cloned().collect();
        assert_eq!(left, [Exclusion::Item(8), Exclusion::tag("gift").unwrap()]);
    }

    #[test]
    fn a_store_written_before_tags_and_exclusions_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let key = StoreKey::from_bytes([13; 32]);
        let fixture = include_str!("../../testdata/store-before-tags.json");
        Vault::new(&path, &key).save(fixture.as_bytes()).unwrap();
        let clock = ManualClock::new(T0);
        let d = open(&path, &key, &clock).unwrap();
        assert_eq!(d.consent().level, Consent::Federated);
        assert_eq!(
            d.store().purchases(),
            [at(3, T0 - DAY), Purchase::new(4, T0, 2.0)]
        );
        assert!(d.exclusions().is_empty());
        assert_eq!(d.private_embedding(), [0.25, -0.5, 0.125, 1.0]);
        assert_eq!(d.ledger().rounds.len(), 1);
    }

    #[test]
    fn the_transparency_report_shows_what_is_excluded() {
        let model = mf(30);
        let mut d = device_with(&model, &purchases());
        let text = d.transparency_report(false).to_text();
        assert!(text.contains("Excluded by you: nothing"), "{text}");
        for x in kinds() {
            d.exclude(x).unwrap();
        }
        let report = d.transparency_report(false);
        assert_eq!(report.stored.purchases, 9, "excluded purchases are stored");
        // Item 5's purchase, both of item 7, both tagged medical.
        assert_eq!(report.stored.not_used, 5);
        let x = &report.exclusions;
        assert_eq!((x.purchases, x.items, x.tags), (1, 1, 1));
        assert_eq!(x.list, None);
        let text = report.to_text();
        assert!(
            text.contains(
                "of which 5 purchases not used for recommendations or training: you excluded them"
            ),
            "{text}"
        );
        assert!(
            text.contains("Excluded by you from recommendations and training: 1 single purchase, 1 item, 1 tag"),
            "{text}"
        );
        assert!(
            !text.contains("medical"),
            "tags listed without being asked for"
        );

        let report = d.transparency_report(true);
        assert_eq!(report.exclusions.list, Some(d.exclusions()));
        let text = report.to_text();
        for line in [
            "the purchase of item 5 on 2023-11-14",
            "every purchase of item 7",
            "every purchase tagged medical",
            "item 9  quantity 1  tag medical  (excluded: not used)",
            "item 3  quantity 1  tag gift\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["exclusions"]["list"][2]["tag"], "medical");
    }

    /// A task of `kind` from the wire, evaluating first if `evaluate`, in
    /// a trial of the settings search if `validation`.
    fn wire_task(
        kind: fedrec_proto::pb::TaskKind,
        evaluate: bool,
        validation: bool,
    ) -> crate::task::Task {
        use fedrec_proto::pb;
        crate::task::Task::try_from(&pb::Task {
            kind: kind.into(),
            round: 1,
            training: Some(pb::TrainingConfig {
                local_epochs: 2,
                learning_rate: 0.05,
                negatives: 1,
                confidence: 1.0,
                evaluate,
                ..Default::default()
            }),
            validation,
            ..Default::default()
        })
        .unwrap()
    }

    fn update_of(out: crate::task::TaskOutput) -> LocalUpdate {
        match out {
            crate::task::TaskOutput::Update(update) => update,
            other => panic!("a training task gives an update, got {other:?}"),
        }
    }

    fn counts_of(out: crate::task::TaskOutput) -> Option<EvalCounts> {
        match out {
            crate::task::TaskOutput::Evaluation(counts) => counts,
            other => panic!("an evaluation task gives counts, got {other:?}"),
        }
    }

    /// A shopper whose latest purchase repeats item 1, and whose latest
    /// first-time purchase is item 6 (bought again after).
    fn trial_purchases() -> Vec<Purchase> {
        vec![
            at(1, T0),
            at(2, T0 + 1),
            at(3, T0 + 2),
            at(6, T0 + 5),
            at(6, T0 + 6),
            at(1, T0 + 9),
        ]
    }

    /// `global` with item `item`'s bias set to `bias`.
    fn with_bias(global: &[f32], items: usize, item: u32, bias: f32) -> Vec<f32> {
        let mut g = global.to_vec();
        let at = g.len() - items + item as usize;
        g[at] = bias;
        g
    }

    #[test]
    fn a_validation_task_trains_without_its_purchase_and_evaluates_it() {
        use fedrec_proto::pb::TaskKind::{Evaluate, Train};
        let model = mf(30);
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(4));
        let app_held = HeldOut {
            item: 20,
            exclude_history: true,
            candidate_seed: Some(1),
        };
        let mut a = device_with(&model, &trial_purchases());
        a.hold_out(app_held).unwrap();
        assert_eq!(
            a.validation_purchase(),
            Some(PurchaseKey {
                item: 6,
                time: T0 + 5
            })
        );
        // The same shopper had it never bought item 6, evaluated on item 6
        // with the validation purchase's competitors.
        let never: Vec<Purchase> = trial_purchases()
            .into_iter()
            .filter(|p| p.item != 6)
            .collect();
        let mut b = device_with(&model, &never);
        b.hold_out(HeldOut {
            item: 6,
            exclude_history: true,
            candidate_seed: Some(VALIDATION_SEED ^ 6),
        })
        .unwrap();

        let ua = update_of(a.run_task(&wire_task(Train, true, true), &global).unwrap());
        let ub = update_of(b.run_task(&wire_task(Train, true, false), &global).unwrap());
        // Item 6's row (and every other value) is what it is for a shopper
        // who never bought it; nothing else was trained on.
        assert_eq!(ua.delta, ub.delta);
        assert_eq!((ua.num_examples, ub.num_examples), (3, 3));
        assert_eq!(a.private_embedding(), b.private_embedding());
        assert!(ua.evaluation.is_some());
        assert_eq!(ua.evaluation, ub.evaluation);
        // Without validation, item 6 is trained on: another update.
        let plain = update_of(
            device_with(&model, &trial_purchases())
                .run_task(&wire_task(Train, false, false), &global)
                .unwrap(),
        );
        assert_eq!(plain.num_examples, 4);
        assert_ne!(plain.delta, ub.delta);

        // The counts are item 6's: first when its bias is high, out of the
        // top 10 when it is low (whatever item 20 does).
        let high = with_bias(&global, 30, 6, 50.0);
        let counts = counts_of(
            a.run_task(&wire_task(Evaluate, false, true), &high)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            (counts.users, counts.hits_full, counts.ndcg_full),
            (1, 1.0, 1.0)
        );
        assert_eq!((counts.hits_sampled, counts.ndcg_sampled), (1.0, 1.0));
        let low = with_bias(&global, 30, 6, -50.0);
        let counts =
            counts_of(a.run_task(&wire_task(Evaluate, false, true), &low).unwrap()).unwrap();
        assert_eq!((counts.hits_full, counts.ndcg_full), (0.0, 0.0));
        // An evaluation task gives what evaluating item 6 gives.
        assert_eq!(
            Some(counts),
            counts_of(
                b.run_task(&wire_task(Evaluate, false, false), &low)
                    .unwrap()
            )
        );

        // The app's held-out purchase (item 20) is untouched, and used
        // without validation: with item 20 first and item 6 last, a trial
        // misses, a plain evaluation hits at rank 0.
        assert_eq!(a.held_out, Some(app_held));
        let twenty_first = with_bias(&low, 30, 20, 50.0);
        let trial = counts_of(
            a.run_task(&wire_task(Evaluate, false, true), &twenty_first)
                .unwrap(),
        )
        .unwrap();
        assert_eq!((trial.hits_full, trial.ndcg_full), (0.0, 0.0));
        let plain = counts_of(
            a.run_task(&wire_task(Evaluate, false, false), &twenty_first)
                .unwrap(),
        )
        .unwrap();
        assert_eq!((plain.hits_full, plain.ndcg_full), (1.0, 1.0));
    }

    #[test]
    fn excluded_purchases_are_never_the_validation_purchase() {
        use fedrec_proto::pb::TaskKind::Train;
        let model = mf(30);
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(4));
        let key = |item, time| Some(PurchaseKey { item, time });
        let mut d = device_with(&model, &trial_purchases());
        d.record(tagged(9, T0 + 8, "gift")).unwrap();
        assert_eq!(d.validation_purchase(), key(9, T0 + 8));
        d.exclude(Exclusion::tag("gift").unwrap()).unwrap();
        assert_eq!(d.validation_purchase(), key(6, T0 + 5));
        // An excluded purchase is as if never made: the next purchase of
        // its item is then the first.
        let first = Exclusion::Purchase(PurchaseKey {
            item: 6,
            time: T0 + 5,
        });
        d.exclude(first.clone()).unwrap();
        assert_eq!(d.validation_purchase(), key(6, T0 + 6));
        d.include(first).unwrap();
        d.exclude(Exclusion::Item(6)).unwrap();
        assert_eq!(d.validation_purchase(), key(3, T0 + 2));

        // A trial then trains on items 1 and 2 only (6 excluded, 3 held out).
        let update = update_of(d.run_task(&wire_task(Train, false, true), &global).unwrap());
        let mut r = device_with(&model, &[at(1, T0), at(2, T0 + 1), at(1, T0 + 9)]);
        let reference = update_of(
            r.run_task(&wire_task(Train, false, false), &global)
                .unwrap(),
        );
        assert_eq!(update.num_examples, 2);
        assert_eq!(update.delta, reference.delta);

        // One item left in use: no validation purchase.
        d.exclude(Exclusion::Item(1)).unwrap();
        d.exclude(Exclusion::Item(2)).unwrap();
        assert_eq!(d.history(), [3]);
        assert_eq!(d.validation_purchase(), None);
    }

    #[test]
    fn without_a_validation_purchase_a_trial_trains_as_usual_and_reports_no_counts() {
        use fedrec_proto::pb::TaskKind::{Evaluate, Train};
        let model = mf(30);
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(4));
        let one_item = [at(3, T0), at(3, T0 + 4)];
        let held = HeldOut {
            item: 20,
            exclude_history: true,
            candidate_seed: Some(1),
        };
        let mut a = device_with(&model, &one_item);
        a.hold_out(held).unwrap();
        assert_eq!(a.validation_purchase(), None);
        let trial = update_of(a.run_task(&wire_task(Train, true, true), &global).unwrap());
        let mut b = device_with(&model, &one_item);
        b.hold_out(held).unwrap();
        let usual = update_of(b.run_task(&wire_task(Train, true, false), &global).unwrap());
        assert_eq!(trial.delta, usual.delta);
        assert_eq!(trial.num_examples, 1);
        // Not the app's held-out purchase either: no counts at all.
        assert!(usual.evaluation.is_some());
        assert_eq!(trial.evaluation, None);
        assert_eq!(
            counts_of(
                a.run_task(&wire_task(Evaluate, false, true), &global)
                    .unwrap()
            ),
            None
        );
    }

    #[test]
    fn a_copy_of_another_shape_hands_back_no_private_embedding() {
        let model = mf(30);
        let mut app = device_with(&model, &trial_purchases());
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(4));
        app.train(&global, &LocalTraining::default(), false)
            .unwrap();

        // The copy adopts a model of 8 factors (a trial) and trains on it;
        // meanwhile the app's device changes once (an exclusion of an item
        // bought), as the copy's did (the new shape).
        let mut copy = app.working_copy();
        let wide = MatrixFactorization::new(30, 8, 0.1).unwrap();
        assert!(copy.adopt_shape(&wide.layout(), None).unwrap());
        let wide_global = wide.init_global(&mut ChaCha8Rng::seed_from_u64(5));
        copy.train(&wide_global, &LocalTraining::default(), false)
            .unwrap();
        assert_eq!(copy.private_embedding().len(), 8);
        app.exclude(Exclusion::Item(2)).unwrap();
        let before = app.private_embedding().to_vec();
        app.absorb(copy).unwrap();
        assert_eq!(app.private_embedding(), before.as_slice());
        assert_eq!(app.model().layout(), model.layout());

        // Unchanged on both sides, a copy's embedding is taken back.
        let mut copy = app.working_copy();
        copy.train(&global, &LocalTraining::default(), false)
            .unwrap();
        let trained = copy.private_embedding().to_vec();
        assert_ne!(trained, before);
        app.absorb(copy).unwrap();
        assert_eq!(app.private_embedding(), trained.as_slice());
    }
}
