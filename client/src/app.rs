//! The API for apps: one [`Client`] per shopper's device.
//!
//! A `Client` owns the [`Device`] (opened on its encrypted store file), the
//! latest global model, and the connection to a coordinator. Local
//! operations (recording a purchase, consent, recommendations, the
//! transparency report, forget-me) are plain method calls that return at
//! once; talking to the coordinator is `async`. Apps without an async
//! runtime use [`crate::BlockingClient`], which wraps this one.
//!
//! Taking part in training runs on a copy of the device, so the app can keep
//! recording purchases and showing recommendations meanwhile; the copy
//! shares the consent and the exclusions, so a change of either applies to
//! a round in progress at once. What the round learned (the private embedding) and
//! what it sent (the messages, by kind and size) are then merged back and
//! saved.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use fedrec_proto::catalogue::Catalogue;
use fedrec_proto::pb::coordinator_client::CoordinatorClient;
use fedrec_proto::{Layout, pb};
use prost::Message;
use tonic::transport::Channel;

use crate::clock::Clock;
use crate::connect::ConnectOptions;
use crate::consent::{Consent, ConsentChange, ConsentRecord};
use crate::device::{Device, Recorded};
use crate::eligibility::{Conditions, ParticipationPolicy};
use crate::error::ClientError;
use crate::exclusion::{Exclusion, Exclusions};
use crate::model::{LocalTraining, Loss, Model};
use crate::participant::{Participant, ParticipationSummary, SentMessage};
use crate::recommend::{Explanation, Recommendations};
use crate::retention::RetentionPolicy;
use crate::store::Purchase;
use crate::transparency::TransparencyReport;
use crate::vault::{StoreKey, Vault};

/// How the private embedding is fitted on the device for recommendations
/// (after each model download and new purchase): the exact least-squares
/// solve of the ALS loss with these confidence and regularization values,
/// the middle of the usual implicit-ALS ranges. It is deterministic and
/// makes [`Client::explain`] exact.
pub fn default_personalization() -> LocalTraining {
    LocalTraining {
        loss: Loss::Als,
        confidence: 5.0,
        regularization: 0.1,
        ..LocalTraining::default()
    }
}

/// Attempts at downloading the current model when its version changes
/// under the download.
const FETCH_ATTEMPTS: usize = 3;

/// Builds a [`Client`].
#[derive(Debug)]
pub struct ClientBuilder {
    /// `None`: the coordinator's, learned at connect and stored.
    model: Option<Arc<dyn Model>>,
    store: Option<(PathBuf, StoreKey)>,
    retention: RetentionPolicy,
    clock: Option<Arc<dyn Clock>>,
    participation: ParticipationPolicy,
    diversity: f32,
    personalization: LocalTraining,
    seed: Option<u64>,
}

impl ClientBuilder {
    /// Keeps the device's state in the encrypted file `path` under `key`
    /// (created on first use). Default: in memory only, lost when the app exits.
    pub fn store(mut self, path: impl Into<PathBuf>, key: StoreKey) -> Self {
        self.store = Some((path.into(), key));
        self
    }

    /// The retention policy. Default [`RetentionPolicy::default`] (365 days,
    /// 10,000 purchases).
    pub fn retention(mut self, policy: RetentionPolicy) -> Self {
        self.retention = policy;
        self
    }

    /// The clock. Default: the system clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The app's eligibility conditions (idle, charging, unmetered network),
    /// asked before every check-in. Default: always eligible.
    pub fn conditions(mut self, conditions: Arc<dyn Conditions>) -> Self {
        self.participation.conditions = conditions;
        self
    }

    /// The whole participation policy (conditions, back-off, time budget,
    /// task limit). Default: always eligible, no time budget, one task per
    /// call of [`Client::participate`].
    pub fn participation(mut self, policy: ParticipationPolicy) -> Self {
        self.participation = policy;
        self
    }

    /// Local-training time per round. Default: none.
    pub fn time_budget(mut self, budget: Duration) -> Self {
        self.participation.time_budget = Some(budget);
        self
    }

    /// The diversity knob λ in [0, 1] of [`Client::recommend`] (0 = pure
    /// relevance). Default 0.
    pub fn diversity(mut self, diversity: f32) -> Self {
        self.diversity = diversity;
        self
    }

    /// How the private embedding is fitted for on-device recommendations.
    /// Default [`default_personalization`].
    pub fn personalization(mut self, cfg: LocalTraining) -> Self {
        self.personalization = cfg;
        self
    }

    /// Seeds local randomness (tests). Default: from the operating system.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Opens the store (or starts an empty one) and returns the client.
    /// Fails, leaving the file untouched, when the file is truncated,
    /// tampered with or sealed under another key.
    pub fn open(self) -> Result<Client, ClientError> {
        check_diversity(self.diversity)?;
        self.personalization.validate()?;
        let from_coordinator = self.model.is_none();
        let b = match self.model {
            Some(model) => Device::builder(model),
            None => Device::builder_from_coordinator(),
        };
        let mut b = b
            .retention(self.retention)
            .participation(self.participation);
        if let Some(seed) = self.seed {
            b = b.seed(seed);
        }
        if let Some(clock) = self.clock {
            b = b.clock(clock);
        }
        let device = match self.store {
            Some((path, key)) => b.open(Vault::new(path, &key))?,
            None => b.in_memory()?,
        };
        Ok(Client {
            inner: Arc::new(Inner {
                local: Mutex::new(Local {
                    device,
                    stale: true,
                    diversity: self.diversity,
                    personalization: self.personalization,
                }),
                global: RwLock::new(None),
                link: tokio::sync::Mutex::new(None),
                from_coordinator,
            }),
        })
    }
}

fn check_diversity(diversity: f32) -> Result<(), ClientError> {
    if (0.0..=1.0).contains(&diversity) {
        Ok(())
    } else {
        Err(ClientError::InvalidConfig(format!(
            "diversity must be in [0, 1], got {diversity}"
        )))
    }
}

/// A shopper's device, as an app uses it. Cheap to clone (shared state).
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Held briefly, never across an `.await`.
    local: Mutex<Local>,
    /// The latest global model downloaded.
    global: RwLock<Option<Arc<GlobalModel>>>,
    /// The coordinator connection; held across awaits by one network
    /// operation at a time.
    link: tokio::sync::Mutex<Option<Link>>,
    /// The model's shape and the catalogue are the coordinator's, taken at
    /// every join ([`Client::builder_from_coordinator`]).
    from_coordinator: bool,
}

#[derive(Debug)]
struct Local {
    device: Device,
    /// The private embedding must be refitted before the next recommendation.
    stale: bool,
    diversity: f32,
    personalization: LocalTraining,
}

#[derive(Debug)]
struct GlobalModel {
    version: u64,
    params: Vec<f32>,
}

#[derive(Debug)]
struct Link {
    /// The session, the coordinator's endpoints and the one in use.
    participant: Participant,
    /// Messages of `participant.sent()` already added to the device's ledger.
    absorbed: usize,
}

impl Client {
    /// A builder for a client whose model and catalogue are the
    /// coordinator's: learned when it [connects](Self::connect) and kept in
    /// the store file, so a client reopened offline knows them. What apps
    /// use. Before the first connection it records no purchase
    /// ([`ClientError::NoCatalogue`]) and its rows are empty.
    pub fn builder_from_coordinator() -> ClientBuilder {
        ClientBuilder {
            model: None,
            ..Self::builder_for(None)
        }
    }

    /// A builder for a client of `model`, which must match the
    /// coordinator's (simulations and tests, which build both sides).
    pub fn builder(model: Arc<dyn Model>) -> ClientBuilder {
        Self::builder_for(Some(model))
    }

    fn builder_for(model: Option<Arc<dyn Model>>) -> ClientBuilder {
        ClientBuilder {
            model,
            store: None,
            retention: RetentionPolicy::default(),
            clock: None,
            participation: ParticipationPolicy {
                max_tasks: Some(1),
                ..ParticipationPolicy::default()
            },
            diversity: 0.0,
            personalization: default_personalization(),
            seed: None,
        }
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        // Every operation on the device either completes or fails before it
        // saves, so after a panic elsewhere the state is still usable and the
        // file holds the last good state.
        self.inner
            .local
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn global(&self) -> Option<Arc<GlobalModel>> {
        self.inner
            .global
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records a purchase (stored only if the consent allows; see [`Recorded`]).
    pub fn record(&self, purchase: Purchase) -> Result<Recorded, ClientError> {
        let mut local = self.local();
        let recorded = local.device.record(purchase)?;
        local.stale |= recorded == Recorded::Stored;
        Ok(recorded)
    }

    /// The consent in force and when it was set.
    pub fn consent(&self) -> ConsentRecord {
        self.local().device.consent()
    }

    /// Sets the shopper's consent. It takes effect at once, also for a
    /// training round in progress (nothing more is sent for it). When it is
    /// lowered to [`Consent::None`] with purchases stored, the result's
    /// `offer_erase` asks the app to offer [`forget_me`](Self::forget_me).
    pub fn set_consent(&self, level: Consent) -> Result<ConsentChange, ClientError> {
        let mut local = self.local();
        local.stale = true;
        local.device.set_consent(level)
    }

    /// Leaves a purchase, an item or a tag out of personalization and
    /// training from now on (also for a round in progress), and saves;
    /// returns whether it was new. Excluded purchases are as if never made:
    /// their items may be recommended. See [`Device::exclude`].
    pub fn exclude(&self, exclusion: Exclusion) -> Result<bool, ClientError> {
        let mut local = self.local();
        local.stale = true;
        local.device.exclude(exclusion)
    }

    /// Uses again what `exclusion` left out, and saves; returns whether it
    /// was in force. See [`Device::include`].
    pub fn include(&self, exclusion: Exclusion) -> Result<bool, ClientError> {
        let mut local = self.local();
        local.stale = true;
        local.device.include(exclusion)
    }

    /// What the shopper excluded.
    pub fn exclusions(&self) -> Exclusions {
        self.local().device.exclusions()
    }

    /// Erases the purchase history, the private embedding and the training
    /// state, on disk too (exclusions of items and tags are settings and
    /// are kept; see [`Device::forget_me`]).
    pub fn forget_me(&self) -> Result<(), ClientError> {
        let mut local = self.local();
        local.stale = true;
        local.device.forget_me()
    }

    /// Sets the diversity knob λ in [0, 1] (0 = pure relevance).
    pub fn set_diversity(&self, diversity: f32) -> Result<(), ClientError> {
        check_diversity(diversity)?;
        self.local().diversity = diversity;
        Ok(())
    }

    /// The `k` items to show, computed on the device: personal, with items
    /// already bought left out, when consent and history allow; the most
    /// popular items of the global model otherwise (see the result's
    /// `basis`). Before a global model is on the device
    /// ([`refresh_model`](Self::refresh_model)), only the buy-again row (see
    /// [`Device::recommendations_without_model`]).
    pub fn recommend(&self, k: usize) -> Result<Recommendations, ClientError> {
        let Some(global) = self.global() else {
            return Ok(self.local().device.recommendations_without_model(k));
        };
        let mut local = self.local();
        local.refresh(&global.params)?;
        let diversity = local.diversity;
        local.device.recommendations(&global.params, k, diversity)
    }

    /// Which of the shopper's own purchases make `item` relevant.
    pub fn explain(&self, item: u32) -> Result<Explanation, ClientError> {
        let global = self.global().ok_or(ClientError::NoModel)?;
        let mut local = self.local();
        local.refresh(&global.params)?;
        let cfg = local.personalization;
        local.device.explain(&global.params, item, &cfg)
    }

    /// What is stored, what is excluded and what left the device (purchases
    /// and exclusions listed only with `include_items`).
    pub fn transparency_report(&self, include_items: bool) -> TransparencyReport {
        self.local().device.transparency_report(include_items)
    }

    /// The coordinator's catalogue, as announced at the last join (and
    /// stored), if it announced one: maps the app's item ids to the model's
    /// item indices ([`Catalogue::index`]).
    pub fn catalogue(&self) -> Option<Catalogue> {
        self.local().device.catalogue().cloned()
    }

    /// The version of the global model on the device, if any.
    pub fn model_version(&self) -> Option<u64> {
        self.global().map(|g| g.version)
    }

    /// Runs `f` on the device (for what this facade does not cover).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut Device) -> R) -> R {
        let mut local = self.local();
        local.stale = true;
        f(&mut local.device)
    }

    /// Connects to the coordinator at `endpoints` (e.g.
    /// `http://127.0.0.1:50051`, or a comma-separated list of its replicas)
    /// and joins, receiving a pseudonym. Joining sends nothing about the
    /// shopper.
    pub async fn connect(&self, endpoints: &str) -> Result<(), ClientError> {
        self.connect_with(endpoints, &ConnectOptions::default())
            .await
    }

    /// Connects as [`connect`](Self::connect) does, with transport security
    /// (`https://` with the coordinator's CA, and a device certificate for
    /// mutual TLS) and an enrollment token, if given (see
    /// [`ConnectOptions`]).
    pub async fn connect_with(
        &self,
        endpoints: &str,
        options: &ConnectOptions,
    ) -> Result<(), ClientError> {
        self.adopt(Participant::connect_with(endpoints, options).await?)
            .await
    }

    /// Connects to one of the coordinator's `endpoints`, its replicas (which
    /// share the device's session), tried in order, and joins; later
    /// network calls move to the next endpoint whenever the one in use
    /// cannot be reached, keeping the pseudonym. See
    /// [`Participant::connect_any`].
    pub async fn connect_any(
        &self,
        endpoints: &[impl AsRef<str>],
        options: &ConnectOptions,
    ) -> Result<(), ClientError> {
        self.adopt(Participant::connect_any(endpoints, options).await?)
            .await
    }

    /// Takes `participant`, just joined, as the client's connection: notes
    /// what it sent and, for a client of the coordinator's model, adopts
    /// the model's shape and the catalogue it announced.
    async fn adopt(&self, participant: Participant) -> Result<(), ClientError> {
        let sent = participant.sent().messages().to_vec();
        {
            let mut local = self.local();
            local.device.note_sent(&sent)?;
            if self.inner.from_coordinator {
                if participant.layout().tensors().is_empty() {
                    return Err(ClientError::ModelMismatch(format!(
                        "the coordinator at {} announces no model layout \
                         (an older coordinator): build the client with its model",
                        participant.endpoint().unwrap_or_default()
                    )));
                }
                let catalogue = participant.catalogue().cloned();
                if local.device.adopt_shape(participant.layout(), catalogue)? {
                    local.stale = true;
                    *self
                        .inner
                        .global
                        .write()
                        .unwrap_or_else(PoisonError::into_inner) = None;
                }
            }
        }
        *self.inner.link.lock().await = Some(Link {
            participant,
            absorbed: sent.len(),
        });
        Ok(())
    }

    /// Downloads the coordinator's current global model for on-device
    /// recommendations (any consent level: the requests carry only the
    /// pseudonym and the model version), unless the device holds that
    /// version already (the coordinator limits downloads of one version,
    /// `server.max_downloads_per_version`). Returns its version. With
    /// several endpoints, one that cannot be reached is left for the next.
    pub async fn refresh_model(&self) -> Result<u64, ClientError> {
        let layout = self.local().device.model().layout();
        let held = self.model_version();
        let mut guard = self.inner.link.lock().await;
        let link = guard.as_mut().ok_or(ClientError::NotConnected)?;
        let mut sent = Vec::new();
        let mut result = Err(ClientError::Protocol("no download attempted".into()));
        let mut joined_again = false;
        // One more attempt for each other endpoint it may move to.
        let attempts = FETCH_ATTEMPTS + link.participant.endpoint_count() - 1;
        for _ in 0..attempts {
            let pseudonym = link.participant.pseudonym().to_owned();
            let mut raw = link.participant.client();
            result = fetch_model(&mut raw, &pseudonym, &layout, held, &mut sent).await;
            match &result {
                Err(ClientError::Rpc { status, .. })
                    if status.code() == tonic::Code::FailedPrecondition => {}
                // The endpoint in use cannot be reached: the next one, if any.
                Err(ClientError::Rpc { status, .. }) if crate::participant::unreachable(status) => {
                    if !link.participant.fail_over() {
                        break;
                    }
                }
                // The session expired (or was replaced): join again once,
                // as a participating device does, and retry.
                Err(ClientError::Rpc { status, .. })
                    if status.code() == tonic::Code::Unauthenticated && !joined_again =>
                {
                    joined_again = true;
                    let rejoined = link.participant.join_again().await;
                    sent.extend_from_slice(&link.participant.sent().messages()[link.absorbed..]);
                    link.absorbed = link.participant.sent().messages().len();
                    rejoined?;
                }
                _ => break,
            }
        }
        drop(guard);
        let mut local = self.local();
        local.device.note_sent(&sent)?;
        let (version, params) = match result? {
            (version, Some((layout, params))) => {
                // The coordinator's settings search may have changed the
                // model's shape since the device joined.
                crate::participant::adopt_layout(&mut local.device, &layout)?;
                (version, params)
            }
            (version, None) => return Ok(version),
        };
        tracing::debug!(model_version = version, "global model downloaded");
        *self
            .inner
            .global
            .write()
            .unwrap_or_else(PoisonError::into_inner) =
            Some(Arc::new(GlobalModel { version, params }));
        local.stale = true;
        Ok(version)
    }

    /// Takes part in training while the device is eligible, up to the
    /// participation policy's task limit (one task by default) or until the
    /// coordinator finishes. Refuses without [`Consent::Federated`]. Runs on
    /// a copy of the device; the app may keep using the client meanwhile.
    pub async fn participate(&self) -> Result<ParticipationSummary, ClientError> {
        let mut guard = self.inner.link.lock().await;
        let link = guard.as_mut().ok_or(ClientError::NotConnected)?;
        let copy = {
            let local = self.local();
            local.device.consent_cell().require_training()?;
            local.device.working_copy()
        };
        let result = link.participant.run(copy).await;
        let sent = link.participant.sent().messages()[link.absorbed..].to_vec();
        link.absorbed += sent.len();
        drop(guard);
        let mut local = self.local();
        local.stale = true;
        let outcome = match result {
            Ok((copy, summary)) => local.device.absorb(copy).map(|()| summary),
            Err(e) => Err(e),
        };
        // What left the device is recorded whatever the outcome.
        local.device.note_sent(&sent)?;
        outcome
    }
}

impl Local {
    /// Refits the private embedding if the model, the history, the
    /// exclusions or the consent changed since the last time.
    fn refresh(&mut self, global: &[f32]) -> Result<(), ClientError> {
        if self.stale {
            let cfg = self.personalization;
            self.device.personalize(global, &cfg)?;
            self.stale = false;
        }
        Ok(())
    }
}

/// Downloads the current model: a status request for its version, then the
/// chunked download (in its layout: another buildable one than `layout` is
/// taken), unless that version is `held` already (`None` then).
/// Logs every request it sends in `sent`.
async fn fetch_model(
    raw: &mut CoordinatorClient<Channel>,
    pseudonym: &str,
    layout: &Layout,
    held: Option<u64>,
    sent: &mut Vec<SentMessage>,
) -> Result<(u64, Option<(Layout, Vec<f32>)>), ClientError> {
    let rpc = |request: &'static str| move |status| ClientError::Rpc { request, status };
    let req = pb::StatusRequest {};
    sent.push(SentMessage {
        kind: "StatusRequest",
        round: 0,
        bytes: req.encoded_len(),
    });
    let version = raw
        .status(req)
        .await
        .map_err(rpc("Status"))?
        .into_inner()
        .model_version;
    if held == Some(version) {
        return Ok((version, None));
    }
    let req = pb::ModelRequest {
        pseudonym: pseudonym.to_owned(),
        round: 0,
        model_version: version,
    };
    sent.push(SentMessage {
        kind: "ModelRequest",
        round: 0,
        bytes: req.encoded_len(),
    });
    let mut stream = raw
        .download_model(req)
        .await
        .map_err(rpc("DownloadModel"))?
        .into_inner();
    let model = crate::participant::receive_model(
        &mut stream,
        layout.clone(),
        crate::participant::OtherLayouts::IfBuildable,
    )
    .await?;
    Ok((version, Some(model)))
}
