//! The fedrec coordinator: forms rounds of devices, combines their model
//! updates into the global model, and serves it all over gRPC.
//!
//! The coordinator never knows what the model is: it holds a
//! [`Layout`](fedrec_proto::Layout) and a flat vector of global parameters
//! given to it at construction. Devices send dense updates (the change to the
//! global parameters) weighted by their number of local examples, and
//! evaluation counts; never purchases.
//!
//! # How the pieces fit
//!
//! - [`config`]: [`CoordinatorConfig`], the validated TOML configuration.
//! - [`round`]: [`RoundCore`], the sans-IO state machine. Every input is a
//!   method call with the current time passed in (`join`, `check_in`,
//!   `submit_update`, `submit_evaluation`, `poll`); outputs are return values
//!   and queries (`poll_timeout`, `model`, `history`, `status`). No tokio, no
//!   sockets, no clock: tests and in-process simulations step it directly.
//!   With `[secure_aggregation]` enabled, training rounds run the four
//!   SecAgg+ steps ([`round::secagg`]) over the state machine of [`secagg`]:
//!   the coordinator learns the cohort's sum, never one device's update.
//! - [`secagg`]: [`secagg::SecAggRound`], the coordinator side of one secure
//!   aggregation (sans-IO, memory `O(update + n·k)`).
//! - [`aggregate`]: the streaming weighted sum of a round's updates (memory
//!   independent of the cohort size) and the summed evaluation counts.
//! - [`strategy`]: the server optimizers (FedAvg, FedAvgM, FedAdam, FedYogi,
//!   FedAdagrad, and `als`, a step preconditioned by the cohort's curvature
//!   under the ALS loss) that turn the round's mean update into the next model.
//! - [`service`]: the thin tonic adapter. [`CoordinatorService`] wraps the core
//!   in a mutex, turns check-ins into long polls, streams the model in chunks,
//!   buffers uploads under a concurrency limit, and runs a driver task that
//!   calls `poll` at `poll_timeout` so deadlines pass even when devices fall
//!   silent. [`ServiceHandle`] lets an in-process caller watch progress.
//! - [`tls`]: the `[tls]` section as tonic's rustls server configuration
//!   (TLS, and mutual TLS that authenticates devices by certificate).
//! - [`error`]: [`CoordinatorError`], the crate's one error type, and its single
//!   mapping to gRPC status codes.
//!
//! # Driving the core directly
//!
//! ```
//! use std::time::{Duration, Instant};
//! use fedrec_coordinator::{CheckIn, CoordinatorConfig, Event, RoundCore, UpdateHeader};
//! use fedrec_proto::{tensor, Layout};
//!
//! let mut config = CoordinatorConfig::default();
//! config.rounds.rounds = 1;
//! config.rounds.clients_per_round = 2;
//! config.rounds.final_evaluation = false;
//! config.rounds.seed = Some(7);
//! let layout = Layout::new(vec![("item_bias".into(), vec![3])]);
//! let mut core = RoundCore::new(config.validated().unwrap(), layout, vec![0.0; 3]).unwrap();
//!
//! let now = Instant::now();
//! let devices = [core.join(now, None), core.join(now, None)];
//! // The first device waits; the second fills the cohort and starts round 1.
//! assert!(matches!(core.check_in(now, &devices[0]).unwrap(), CheckIn::Wait { .. }));
//! let CheckIn::Task(task) = core.check_in(now, &devices[1]).unwrap() else { panic!("cohort is full") };
//! assert_eq!((task.round, task.model_version), (1, 1));
//!
//! // Each device submits the change to the global parameters and its weight.
//! for (device, (delta, examples)) in devices.iter().zip([([1.0, 2.0, 3.0], 1), ([3.0, 2.0, 1.0], 3)]) {
//!     let header = UpdateHeader {
//!         pseudonym: *device,
//!         round: task.round,
//!         model_version: task.model_version,
//!         num_examples: examples,
//!         num_values: 3,
//!         evaluation: None,
//!     };
//!     core.submit_update(now + Duration::from_secs(1), header, &tensor::encode(&delta)).unwrap();
//! }
//!
//! let events = core.poll(now + Duration::from_secs(1));
//! assert!(events.iter().any(|e| matches!(e, Event::RoundEnded(s) if s.completed)));
//! let model = core.model();
//! assert_eq!(model.version, 2);
//! // FedAvg with weights 1 and 3: (1·[1, 2, 3] + 3·[3, 2, 1]) / 4
//! assert_eq!(model.params, vec![2.5, 2.0, 1.5]);
//! assert!(core.finished().is_some());
//! ```
//!
//! # Serving over gRPC
//!
//! ```no_run
//! # async fn run(core: fedrec_coordinator::RoundCore) -> Result<(), fedrec_coordinator::CoordinatorError> {
//! use fedrec_coordinator::{CoordinatorService, ServeOptions};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await.unwrap();
//! let service = CoordinatorService::new(core, ServeOptions::default());
//! let handle = service.handle();
//! // Stop serving once every round is done (a real server would also listen for Ctrl-C).
//! service.serve(listener, async move { handle.finished().await; }).await
//! # }
//! ```

pub mod aggregate;
pub mod auth;
pub mod bootstrap;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod history;
pub mod listener;
pub mod metrics;
pub mod privacy;
pub mod round;
pub mod secagg;
pub mod service;
pub mod strategy;
pub mod tls;

pub use aggregate::{Aggregator, EvalCounts};
pub use config::{CoordinatorConfig, ValidConfig};
pub use error::CoordinatorError;
pub use round::{
    CheckIn, CoordinatorStatus, Event, ModelSnapshot, Pseudonym, RoundCore, RoundSummary,
    SecurePoll, SecureSum, SecureSummary, SecureTask, SecureWant, Task, TaskKind, UnmaskDone,
    UnmaskJob, UpdateAccepted, UpdateHeader,
};
pub use service::{
    CoordinatorService, DOWNLOAD_CHUNK_BYTES, Progress, ServeOptions, ServiceHandle, serve,
};
pub use strategy::Strategy;
