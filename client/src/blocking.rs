//! A blocking facade over [`Client`], for apps that are not async.
//!
//! Like mini-redis's `blocking_client`, it owns a small single-threaded
//! Tokio runtime and blocks on the async client's futures. Local operations
//! pass straight through. Do not call it from inside an async runtime
//! (Tokio panics when a runtime blocks inside another); use [`Client`] there.

use crate::app::{Client, ClientBuilder};
use crate::consent::{Consent, ConsentChange, ConsentRecord};
use crate::device::{Device, Recorded};
use crate::error::ClientError;
use crate::exclusion::{Exclusion, Exclusions};
use crate::participant::ParticipationSummary;
use crate::recommend::{Explanation, Recommendations};
use crate::store::Purchase;
use crate::transparency::TransparencyReport;

/// A [`Client`] whose network operations block the calling thread.
#[derive(Debug)]
pub struct BlockingClient {
    inner: Client,
    runtime: tokio::runtime::Runtime,
}

impl BlockingClient {
    /// Opens a client from `builder` (see [`Client::builder`]).
    pub fn open(builder: ClientBuilder) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::InvalidConfig(format!("cannot start a runtime: {e}")))?;
        Ok(Self {
            inner: builder.open()?,
            runtime,
        })
    }

    /// The async client underneath (shares its state).
    pub fn client(&self) -> &Client {
        &self.inner
    }

    /// See [`Client::record`].
    pub fn record(&self, purchase: Purchase) -> Result<Recorded, ClientError> {
        self.inner.record(purchase)
    }

    /// See [`Client::consent`].
    pub fn consent(&self) -> ConsentRecord {
        self.inner.consent()
    }

    /// See [`Client::set_consent`].
    pub fn set_consent(&self, level: Consent) -> Result<ConsentChange, ClientError> {
        self.inner.set_consent(level)
    }

    /// See [`Client::exclude`].
    pub fn exclude(&self, exclusion: Exclusion) -> Result<bool, ClientError> {
        self.inner.exclude(exclusion)
    }

    /// See [`Client::include`].
    pub fn include(&self, exclusion: Exclusion) -> Result<bool, ClientError> {
        self.inner.include(exclusion)
    }

    /// See [`Client::exclusions`].
    pub fn exclusions(&self) -> Exclusions {
        self.inner.exclusions()
    }

    /// See [`Client::forget_me`].
    pub fn forget_me(&self) -> Result<(), ClientError> {
        self.inner.forget_me()
    }

    /// See [`Client::set_diversity`].
    pub fn set_diversity(&self, diversity: f32) -> Result<(), ClientError> {
        self.inner.set_diversity(diversity)
    }

    /// See [`Client::recommend`].
    pub fn recommend(&self, k: usize) -> Result<Recommendations, ClientError> {
        self.inner.recommend(k)
    }

    /// See [`Client::explain`].
    pub fn explain(&self, item: u32) -> Result<Explanation, ClientError> {
        self.inner.explain(item)
    }

    /// See [`Client::transparency_report`].
    pub fn transparency_report(&self, include_items: bool) -> TransparencyReport {
        self.inner.transparency_report(include_items)
    }

    /// See [`Client::with_device`].
    pub fn with_device<R>(&self, f: impl FnOnce(&mut Device) -> R) -> R {
        self.inner.with_device(f)
    }

    /// See [`Client::connect`]; blocks until joined.
    pub fn connect(&self, endpoints: &str) -> Result<(), ClientError> {
        self.runtime.block_on(self.inner.connect(endpoints))
    }

    /// See [`Client::connect_with`]; blocks until joined.
    pub fn connect_with(
        &self,
        endpoints: &str,
        options: &crate::connect::ConnectOptions,
    ) -> Result<(), ClientError> {
        self.runtime
            .block_on(self.inner.connect_with(endpoints, options))
    }

    /// See [`Client::connect_any`]; blocks until joined.
    pub fn connect_any(
        &self,
        endpoints: &[impl AsRef<str>],
        options: &crate::connect::ConnectOptions,
    ) -> Result<(), ClientError> {
        self.runtime
            .block_on(self.inner.connect_any(endpoints, options))
    }

    /// See [`Client::refresh_model`]; blocks until downloaded.
    pub fn refresh_model(&self) -> Result<u64, ClientError> {
        self.runtime.block_on(self.inner.refresh_model())
    }

    /// See [`Client::participate`]; blocks until done.
    pub fn participate(&self) -> Result<ParticipationSummary, ClientError> {
        self.runtime.block_on(self.inner.participate())
    }
}
