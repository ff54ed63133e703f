//! The client object the app holds: the SDK's [`BlockingClient`] behind
//! types the bindings can carry.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fedrec_client::connect::ConnectOptions;
use fedrec_client::eligibility::ParticipationPolicy;
use fedrec_client::vault::StoreKey;
use fedrec_client::{BlockingClient, Client};

use crate::conditions::{AppConditions, DeviceConditions};
use crate::error::{FedrecError, guard};
use crate::types::{
    Consent, ConsentChange, ConsentRecord, Exclusion, Explanation, ParticipationSummary, Purchase,
    Recommendations, Recorded, TransparencyReport, exclusion_from,
};

/// How to open a client.
#[derive(Clone, Debug, uniffi::Record)]
pub struct OpenOptions {
    /// The store file, in the app's private storage (created on first use).
    pub store_path: String,
    /// The store's 32-byte key, from the Android Keystore or the iOS
    /// Keychain. The same key must be given every time.
    pub store_key: Vec<u8>,
    /// The diversity knob λ in [0, 1] of the discover row (0 = pure
    /// relevance). Default 0.
    #[uniffi(default = 0.0)]
    pub diversity: f32,
    /// Local-training time per round, in milliseconds. Default: none.
    #[uniffi(default = None)]
    pub time_budget_ms: Option<u64>,
    /// Seeds the device's randomness (tests only). Default: the system's.
    #[uniffi(default = None)]
    pub seed: Option<u64>,
}

/// How to reach the coordinator. All fields default to none: plain text,
/// for `http://` endpoints (development only).
#[derive(Clone, Debug, Default, uniffi::Record)]
pub struct ConnectConfig {
    /// The CA certificate(s) that signed the coordinator's certificate,
    /// PEM; needed for `https://`.
    #[uniffi(default = None)]
    pub ca_pem: Option<String>,
    /// The device's certificate chain (PEM), for mutual TLS; with `key_pem`.
    #[uniffi(default = None)]
    pub cert_pem: Option<String>,
    /// The device's private key (PEM), for mutual TLS; with `cert_pem`.
    #[uniffi(default = None)]
    pub key_pem: Option<String>,
    /// The enrollment token, for a coordinator that admits enrolled
    /// devices only.
    #[uniffi(default = None)]
    pub enrollment_token: Option<String>,
    /// Checks the coordinator's certificate against this name instead of
    /// the URL's host.
    #[uniffi(default = None)]
    pub domain_name: Option<String>,
}

impl TryFrom<ConnectConfig> for ConnectOptions {
    type Error = FedrecError;
    fn try_from(c: ConnectConfig) -> Result<Self, FedrecError> {
        let mut options = ConnectOptions::new();
        if let Some(ca) = c.ca_pem {
            options = options.ca_pem(ca);
        }
        match (c.cert_pem, c.key_pem) {
            (Some(cert), Some(key)) => options = options.identity_pem(cert, key),
            (None, None) => {}
            _ => {
                return Err(FedrecError::invalid(
                    "mutual TLS needs both the device certificate and its key, got one of them",
                ));
            }
        }
        if let Some(token) = c.enrollment_token {
            options = options.enrollment_token(token);
        }
        if let Some(name) = c.domain_name {
            options = options.domain_name(name);
        }
        Ok(options)
    }
}

/// A shopper's device: the one object an app holds (one per store file).
///
/// Every method blocks the calling thread: local ones briefly (a file
/// write at most), network ones (`connect`, `refresh_model`,
/// `participate`) for as long as the coordinator takes. Call them off the
/// UI thread. The object may be shared between threads.
#[derive(Debug, uniffi::Object)]
pub struct FedrecClient {
    inner: BlockingClient,
}

#[uniffi::export]
impl FedrecClient {
    /// Opens the encrypted store (or starts an empty one). The model's
    /// shape and the catalogue are the coordinator's: learned at `connect`
    /// and kept in the store, so a client reopened offline knows them. A
    /// damaged store or a wrong key is an error and leaves the file
    /// untouched. `conditions`: when the device may train; `None`: always.
    #[uniffi::constructor]
    pub fn open(
        options: OpenOptions,
        conditions: Option<Arc<dyn DeviceConditions>>,
    ) -> Result<Arc<Self>, FedrecError> {
        guard(|| {
            let key: [u8; 32] = options.store_key.as_slice().try_into().map_err(|_| {
                FedrecError::invalid(format!(
                    "the store key must be 32 bytes, got {}",
                    options.store_key.len()
                ))
            })?;
            let mut policy = ParticipationPolicy {
                // One task per call, and no waiting inside the SDK while the
                // device is not eligible: the app's scheduler calls again.
                max_tasks: Some(1),
                give_up_after: Some(Duration::ZERO),
                time_budget: options.time_budget_ms.map(Duration::from_millis),
                ..ParticipationPolicy::default()
            };
            if let Some(conditions) = conditions {
                policy.conditions = Arc::new(AppConditions(conditions));
            }
            let mut builder = Client::builder_from_coordinator()
                .store(PathBuf::from(options.store_path), StoreKey::from_bytes(key))
                .participation(policy)
                .diversity(options.diversity);
            if let Some(seed) = options.seed {
                builder = builder.seed(seed);
            }
            Ok(Arc::new(Self {
                inner: BlockingClient::open(builder)?,
            }))
        })
    }

    /// Connects to the coordinator at `url` (e.g. `https://shop.example:443`)
    /// and joins, learning the model's shape and the catalogue (stored);
    /// joining sends nothing about the shopper. `url` may be a
    /// comma-separated list of the coordinator's replicas: they are tried
    /// in order, and later calls move to the next whenever the one in use
    /// cannot be reached, keeping the device's session.
    pub fn connect(&self, url: String, config: Option<ConnectConfig>) -> Result<(), FedrecError> {
        guard(|| {
            let options = ConnectOptions::try_from(config.unwrap_or_default())?;
            Ok(self.inner.connect_with(&url, &options)?)
        })
    }

    /// The consent in force.
    pub fn consent(&self) -> Result<ConsentRecord, FedrecError> {
        guard(|| Ok(self.inner.consent().into()))
    }

    /// Sets the shopper's consent; it applies at once, also to a round in
    /// progress.
    pub fn set_consent(&self, level: Consent) -> Result<ConsentChange, FedrecError> {
        guard(|| Ok(self.inner.set_consent(level.into())?.into()))
    }

    /// Records a purchase (stored only if the consent allows). Before the
    /// first `connect` ever, the catalogue is unknown: `NoCatalogue`.
    pub fn record(&self, purchase: Purchase) -> Result<Recorded, FedrecError> {
        guard(|| Ok(self.inner.record(purchase.try_into()?)?.into()))
    }

    /// The rows to show, `k` items each: discover (diversified), buy again
    /// and blended. The popular items without consent or history. Before
    /// the first `refresh_model` (offline after a restart, say): the
    /// buy-again row only, discover empty; never an error.
    pub fn recommend(&self, k: i32) -> Result<Recommendations, FedrecError> {
        guard(|| Ok(self.inner.recommend(count(k)?)?.into()))
    }

    /// Sets the diversity knob λ in [0, 1] of the discover row.
    pub fn set_diversity(&self, diversity: f32) -> Result<(), FedrecError> {
        guard(|| Ok(self.inner.set_diversity(diversity)?))
    }

    /// Why `item` is recommended; an item outside the catalogue is
    /// `InvalidArgument`.
    pub fn explain(&self, item: u32) -> Result<Explanation, FedrecError> {
        guard(|| Ok(self.inner.explain(item)?.into()))
    }

    /// Leaves a purchase, an item or a tag out of personalization and
    /// training; returns whether it was new.
    pub fn exclude(&self, exclusion: Exclusion) -> Result<bool, FedrecError> {
        guard(|| Ok(self.inner.exclude(exclusion.try_into()?)?))
    }

    /// Uses again what `exclusion` left out; returns whether it was in force.
    pub fn include(&self, exclusion: Exclusion) -> Result<bool, FedrecError> {
        guard(|| Ok(self.inner.include(exclusion.try_into()?)?))
    }

    /// What the shopper excluded.
    pub fn exclusions(&self) -> Result<Vec<Exclusion>, FedrecError> {
        guard(|| {
            Ok(self
                .inner
                .exclusions()
                .iter()
                .filter_map(exclusion_from)
                .collect())
        })
    }

    /// Downloads the coordinator's current model (unless held already);
    /// returns its version.
    pub fn refresh_model(&self) -> Result<u64, FedrecError> {
        guard(|| Ok(self.inner.refresh_model()?))
    }

    /// The model's item index of the app's item `id` in the coordinator's
    /// catalogue (as last announced and stored); `None` when the catalogue
    /// does not list it, or no catalogue is known.
    pub fn item_index(&self, id: String) -> Result<Option<u32>, FedrecError> {
        guard(|| Ok(self.inner.client().catalogue().and_then(|c| c.index(&id))))
    }

    /// The version of the model on the device, if any.
    pub fn model_version(&self) -> Result<Option<u64>, FedrecError> {
        guard(|| Ok(self.inner.client().model_version()))
    }

    /// Takes part in one training or evaluation task if the device is
    /// eligible (returns at once, saying why, if not). Needs `Federated`
    /// consent.
    pub fn participate(&self) -> Result<ParticipationSummary, FedrecError> {
        guard(|| Ok(self.inner.participate()?.into()))
    }

    /// What is stored, excluded and sent; purchases and exclusions listed
    /// only with `include_items`.
    pub fn transparency_report(
        &self,
        include_items: bool,
    ) -> Result<TransparencyReport, FedrecError> {
        guard(|| Ok((&self.inner.transparency_report(include_items)).into()))
    }

    /// The transparency report as text for a settings screen.
    pub fn transparency_text(&self) -> Result<String, FedrecError> {
        guard(|| Ok(self.inner.transparency_report(false).to_text()))
    }

    /// The transparency report as JSON, purchases included, for a
    /// data-access request.
    pub fn transparency_json(&self) -> Result<String, FedrecError> {
        guard(|| {
            serde_json::to_string_pretty(&self.inner.transparency_report(true))
                .map_err(|e| FedrecError::Internal(format!("cannot write the report: {e}")))
        })
    }

    /// Erases the purchase history, the private embedding and the training
    /// state, on disk too.
    pub fn forget_me(&self) -> Result<(), FedrecError> {
        guard(|| Ok(self.inner.forget_me()?))
    }
}

/// A count from the app (`k`), which foreign languages pass as a signed int.
fn count(k: i32) -> Result<usize, FedrecError> {
    usize::try_from(k).map_err(|_| FedrecError::invalid(format!("k must be >= 0, got {k}")))
}
