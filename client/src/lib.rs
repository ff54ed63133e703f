//! The fedrec device SDK: recommendations computed on the shopper's device,
//! trained by federated learning, under the shopper's control.
//!
//! This is `examples/shop_app.rs` (run it with `cargo run -p fedrec-client
//! --example shop_app`): an app records purchases, sets consent, gets
//! recommendations and explanations, takes part in training rounds against
//! a coordinator (started in the same process here), and prints the
//! transparency report.
//!
//! ```no_run
#![doc = include_str!("../examples/shop_app.rs")]
//! ```
//!
//! # What the shopper is promised
//! - **Opt-in consent** ([`consent::Consent`]): `None` (the default) stores
//!   nothing and recommends popular items; `OnDevice` keeps the history for
//!   recommendations on the device only; `Federated` also takes part in
//!   training. A change applies at once, also to a round in progress.
//! - **Necessary data only**: a [`store::Purchase`] is an item, a time, a
//!   quantity and, if the app gives one, a short [`store::Tag`] ("gift"),
//!   nothing else; a [`retention::RetentionPolicy`] (age, count) is
//!   enforced on every write and load; [`Client::forget_me`] erases the
//!   history, the private embedding and the training state.
//! - **The shopper's controls** ([`exclusion::Exclusion`]): one purchase, an
//!   item or a tag can be left out of personalization and training
//!   ([`Client::exclude`]); excluded purchases are as if never made, at once,
//!   also for a round in progress. They stay stored, and reported, until
//!   retention or forget-me removes them.
//! - **Encrypted, crash-safe store** ([`vault`]): one file, ChaCha20-Poly1305
//!   under the app's key, replaced atomically; damage and a wrong key are
//!   reported, never papered over.
//! - **Transparency** ([`transparency::TransparencyReport`]): what is stored,
//!   what the shopper excluded, every round taken part in with the kinds and
//!   sizes of the messages sent, and the privacy budget the coordinator
//!   reports.
//! - **Nothing personal in logs**: the SDK logs counts, never items or
//!   embeddings.
//!
//! # How the pieces fit
//! - [`Client`] (async) and [`BlockingClient`]: the API for apps.
//! - [`device::Device`]: sans-IO; holds the store, the consent, the private
//!   embedding and the ledger; trains, evaluates and recommends given the
//!   global parameters.
//! - [`task::Task`]: a coordinator's task, converted once from the wire and
//!   checked; [`device::Device::run_task`] is the device's whole work on it,
//!   without I/O, for the gRPC participant and the simulations alike.
//! - [`store::PurchaseStore`]: the purchases; [`exclusion`]: what the
//!   shopper left out of them; [`vault::Vault`]: the file.
//! - [`model::Model`] / [`model::MatrixFactorization`]: global item embeddings
//!   and biases, and a private user embedding that never leaves the device.
//! - [`recommend`]: popularity fallback, diversity (maximal marginal
//!   relevance), explanations.
//! - [`eligibility`]: the app's [`eligibility::Conditions`], back-off, the
//!   time budget for local training.
//! - [`secagg::SecAggClient`]: sans-IO; the device's side of one secure
//!   aggregation round (keys, encrypted shares, masked update, unmasking).
//! - [`privacy`]: differential privacy on the device (clipping, the
//!   device's share of the noise).
//! - [`participant::Participant`]: the gRPC transport that takes a device
//!   through rounds with a coordinator, through secure aggregation when a
//!   task asks for it.
//! - [`ranking`]: leave-one-out HR@10 / NDCG@10 computed on the device.
//!
//! The device alone, without a coordinator:
//!
//! ```
//! use std::sync::Arc;
//! use fedrec_client::{consent::Consent, device::Device, model::{MatrixFactorization, Model, LocalTraining}, store::Purchase};
//! use rand::SeedableRng;
//!
//! let model = Arc::new(MatrixFactorization::new(50, 8, 0.1).unwrap());
//! let global = model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
//! let mut device = Device::new(model, 7);
//! device.set_consent(Consent::Federated).unwrap(); // opt-in: nothing is stored before
//! for item in [3, 4, 5] {
//!     device.record(Purchase::new(item, 0, 1.0)).unwrap();
//! }
//! let update = device.train(&global, &LocalTraining::default(), false).unwrap();
//! assert_eq!(update.delta.len(), global.len()); // dense, whatever was bought
//! let recs = device.recommend(&global, 10).unwrap();
//! assert!(!recs.contains(&3)); // already bought
//! ```

mod als;
pub mod app;
pub mod blocking;
pub mod clock;
pub mod connect;
pub mod consent;
pub mod device;
pub mod ease;
pub mod eligibility;
pub mod error;
pub mod exclusion;
mod linalg;
pub mod model;
pub mod participant;
pub mod privacy;
pub mod ranking;
pub mod recommend;
pub mod repeat;
pub mod retention;
pub mod secagg;
pub mod store;
pub mod task;
pub mod transparency;
pub mod vault;

pub use app::{Client, ClientBuilder};
pub use blocking::BlockingClient;
pub use error::ClientError;
