//! The fedrec device SDK.
//!
//! A shopper's purchases stay on the device. The SDK trains the recommender
//! locally and sends the coordinator only the change to the global model.
//!
//! # How the pieces fit
//! - [`store::PurchaseStore`]: the purchases (item, time, quantity; nothing else).
//! - [`model::Model`] / [`model::MatrixFactorization`]: global item embeddings
//!   and biases, and a private user embedding that never leaves the device.
//! - [`device::Device`]: sans-IO; trains, evaluates and recommends given the
//!   global parameters.
//! - [`participant::Participant`]: the gRPC transport that takes a device
//!   through rounds with a coordinator.
//! - [`metrics`]: leave-one-out HR@10 / NDCG@10 computed on the device.
//!
//! ```
//! use std::sync::Arc;
//! use fedrec_client::{consent::Consent, device::Device, model::{MatrixFactorization, Model, TrainingConfig}, store::Purchase};
//! use rand::SeedableRng;
//!
//! let model = Arc::new(MatrixFactorization::new(50, 8, 0.1).unwrap());
//! let global = model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
//! let mut device = Device::new(model, 7);
//! device.set_consent(Consent::Federated).unwrap(); // opt-in: nothing is stored before
//! for item in [3, 4, 5] {
//!     device.record(Purchase { item, time: 0, quantity: 1.0 }).unwrap();
//! }
//! let update = device.train(&global, &TrainingConfig::default(), false).unwrap();
//! assert_eq!(update.delta.len(), global.len()); // dense, whatever was bought
//! let recs = device.recommend(&global, 10).unwrap();
//! assert!(!recs.contains(&3)); // already bought
//! ```

mod als;
pub mod app;
pub mod blocking;
pub mod clock;
pub mod consent;
pub mod device;
pub mod eligibility;
pub mod error;
pub mod metrics;
pub mod model;
pub mod participant;
pub mod recommend;
pub mod retention;
pub mod secagg;
pub mod store;
pub mod transparency;
pub mod vault;

pub use app::{Client, ClientBuilder};
pub use blocking::BlockingClient;
pub use error::ClientError;
