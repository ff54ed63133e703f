//! A coordinator's task as the device works on it, and the one step that
//! works on it.
//!
//! A task arrives on the wire as a `pb::Task`. It is converted once, with
//! [`Task::try_from`], into a [`Task`]: its training configuration checked
//! against the bounds both ends share ([`fedrec_proto::limits`]), its
//! differential-privacy instructions ([`DpSpec`]) and its secure aggregation
//! configuration ([`SecureTask`]) checked too; a refused field is named in
//! the [`ClientError::InvalidTask`]. Nothing after the conversion checks the
//! task again: holding a [`Task`] is the proof it is valid.
//!
//! [`Device::run_task`] is the device's whole work on a task, without I/O:
//! given the downloaded global parameters it trains (then clips and adds
//! noise, as the task's DP asks) or evaluates, and returns a [`TaskOutput`].
//! The gRPC participant uploads it (encoded in the task's
//! [`upload_encoding`](Task::upload_encoding), or through secure aggregation
//! with [`TaskOutput::secure_input`]); an in-process simulation hands it to
//! the coordinator core directly.
//!
//! ```
//! use std::sync::Arc;
//! use fedrec_client::{consent::Consent, device::Device, model::{MatrixFactorization, Model}};
//! use fedrec_client::store::Purchase;
//! use fedrec_client::task::{Task, TaskOutput};
//! use fedrec_proto::pb;
//! use rand::SeedableRng;
//!
//! let wire = pb::Task {
//!     kind: pb::TaskKind::Train.into(),
//!     round: 1,
//!     training: Some(pb::TrainingConfig {
//!         local_epochs: 2,
//!         learning_rate: 0.05,
//!         negatives: 1,
//!         confidence: 1.0,
//!         ..Default::default()
//!     }),
//!     ..Default::default()
//! };
//! let task = Task::try_from(&wire).unwrap();
//!
//! let model = Arc::new(MatrixFactorization::new(20, 4, 0.1).unwrap());
//! let global = model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
//! let mut device = Device::new(model, 7);
//! device.set_consent(Consent::Federated).unwrap();
//! device.record(Purchase::new(3, 0, 1.0)).unwrap();
//! let TaskOutput::Update(update) = device.run_task(&task, &global).unwrap() else {
//!     panic!("a training task gives an update");
//! };
//! assert_eq!(update.delta.len(), global.len());
//! ```

use std::time::Duration;

use fedrec_proto::codec::Encoding;
use fedrec_proto::pb;
use fedrec_proto::secagg::payload::{self, Weighting};
use fedrec_proto::secagg::{PartyId, SecAggConfig, wire};

use crate::error::ClientError;
use crate::model::LocalTraining;
use crate::privacy::DpSpec;
use crate::ranking::EvalCounts;
use crate::transparency::PrivacyBudget;
use crate::transparency::TrainingReport;

/// What a task asks of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TaskKind {
    /// Train on the downloaded model and send an update.
    Train,
    /// Evaluate the downloaded model on the held-out purchase and send counts.
    Evaluate,
}

/// How the device takes part in a secure aggregation round.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SecureTask {
    /// The device's id in this round's secure aggregation (never its
    /// pseudonym: the only identity its neighbours learn).
    pub party: PartyId,
    /// The protocol's configuration, checked: a device never runs with one
    /// that would let the coordinator unmask it (see
    /// [`SecAggConfig::validate`]).
    pub config: SecAggConfig,
    /// How the device weighs its update in the cohort's mean.
    pub weighting: Weighting,
}

/// A task from the coordinator, valid: made only by converting the wire
/// task ([`Task::try_from`]), which checks every field.
#[derive(Clone, Debug, PartialEq)]
pub struct Task {
    kind: TaskKind,
    round: u32,
    model_version: u64,
    deadline: Duration,
    training: LocalTraining,
    evaluate: bool,
    dp: Option<DpSpec>,
    secure: Option<SecureTask>,
    upload_encoding: Encoding,
    privacy: Option<PrivacyBudget>,
    validation: bool,
}

impl Task {
    /// Train or evaluate.
    pub fn kind(&self) -> TaskKind {
        self.kind
    }

    /// The coordinator's round number.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// The model version to download and to name in the submission.
    pub fn model_version(&self) -> u64 {
        self.model_version
    }

    /// Time left until the round's deadline when the task was received.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The local training configuration (also what evaluation fits the
    /// private embedding with), within the shared bounds.
    pub fn training(&self) -> &LocalTraining {
        &self.training
    }

    /// Whether a training task also evaluates the received model first and
    /// reports the counts with its update.
    pub fn evaluate(&self) -> bool {
        self.evaluate
    }

    /// What differential privacy asks of the update: clipping, the device's
    /// share of the noise. `None`: the update leaves as trained.
    pub fn dp(&self) -> Option<&DpSpec> {
        self.dp.as_ref()
    }

    /// Set for a training task whose update goes through secure aggregation.
    pub fn secure(&self) -> Option<&SecureTask> {
        self.secure.as_ref()
    }

    /// How a plain upload encodes the update's values: the task's choice,
    /// or f32 (which the coordinator always accepts) when the device does
    /// not know the encoding asked for.
    pub fn upload_encoding(&self) -> Encoding {
        self.upload_encoding
    }

    /// The privacy budget the coordinator reported with the task, if any
    /// (for the transparency report).
    pub fn privacy(&self) -> Option<PrivacyBudget> {
        self.privacy
    }

    /// Whether the task belongs to a trial run of the coordinator's
    /// settings search (`[model] preset = "auto"`). The device then keeps
    /// its own validation purchase out of the task: the latest purchase of
    /// an item it had not bought before (see
    /// [`PurchaseStore::validation_purchase`](crate::store::PurchaseStore::validation_purchase)).
    /// Training (personalization and the update) runs on the history
    /// without that item, and the evaluation (an evaluation task, or a
    /// training task that also evaluates) ranks that item, with the items
    /// trained on left out of the ranking; only the counts leave the
    /// device. The held-out purchase an app or simulation set
    /// ([`Device::hold_out`](crate::device::Device::hold_out)) is not used
    /// and not changed.
    ///
    /// A device without such a purchase, or with fewer than two distinct
    /// items in use, trains on its whole history as usual and reports no
    /// evaluation counts.
    ///
    /// The model's shape may change from one trial to the next: the
    /// participant adopts the layout the download carries (see
    /// [`Device::adopt_shape`](crate::device::Device::adopt_shape)).
    pub fn validation(&self) -> bool {
        self.validation
    }
}

/// A refused field of the wire task.
fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ClientError {
    ClientError::InvalidTask {
        field: field.into(),
        reason: reason.into(),
    }
}

impl TryFrom<&pb::Task> for Task {
    type Error = ClientError;

    /// Converts and checks the wire task. A kind this device does not know
    /// is taken as training; an upload encoding it does not know as f32;
    /// secure aggregation is read for training tasks only.
    fn try_from(task: &pb::Task) -> Result<Self, ClientError> {
        let kind = match task.kind() {
            pb::TaskKind::Evaluate => TaskKind::Evaluate,
            _ => TaskKind::Train,
        };
        let t = task
            .training
            .as_ref()
            .ok_or_else(|| invalid("training", "missing"))?;
        let training = LocalTraining {
            local_epochs: t.local_epochs,
            learning_rate: t.learning_rate,
            regularization: t.regularization,
            negatives: t.negatives,
            proximal_mu: t.proximal_mu,
            loss: t.loss().into(),
            confidence: t.confidence,
            user_moment: t.user_moment,
        };
        training
            .check()
            .map_err(|(field, reason)| invalid(format!("training.{field}"), reason))?;
        let dp = task.dp.as_ref().map(DpSpec::try_from).transpose()?;
        let secure = match (kind, &task.secure_aggregation) {
            (TaskKind::Train, Some(secure)) => Some(SecureTask::try_from(secure)?),
            _ => None,
        };
        Ok(Self {
            kind,
            round: task.round,
            model_version: task.model_version,
            deadline: Duration::from_millis(task.deadline_ms),
            training,
            evaluate: t.evaluate,
            dp,
            secure,
            upload_encoding: Encoding::from_pb(task.upload_encoding).unwrap_or_default(),
            privacy: task.privacy.map(|p| PrivacyBudget {
                epsilon: p.epsilon,
                delta: p.delta,
            }),
            validation: task.validation,
        })
    }
}

impl TryFrom<&pb::DpTask> for DpSpec {
    type Error = ClientError;

    /// Refuses a clipping bound that is not positive and finite, or a
    /// negative or non-finite noise.
    fn try_from(dp: &pb::DpTask) -> Result<Self, ClientError> {
        if !(dp.clip.is_finite() && dp.clip > 0.0) {
            return Err(invalid(
                "dp.clip",
                format!("must be positive and finite, got {}", dp.clip),
            ));
        }
        for (field, std) in [
            ("dp.noise_stddev", dp.noise_stddev),
            ("dp.count_noise_stddev", dp.count_noise_stddev),
        ] {
            if !(std.is_finite() && std >= 0.0) {
                return Err(invalid(
                    field,
                    format!("must be finite and >= 0, got {std}"),
                ));
            }
        }
        Ok(Self {
            clip: dp.clip,
            noise_std: dp.noise_stddev,
            count_noise_std: dp.report_clipping.then_some(dp.count_noise_stddev),
        })
    }
}

impl TryFrom<&pb::SecAggTask> for SecureTask {
    type Error = ClientError;

    /// Refuses a configuration the protocol does not allow (see
    /// [`wire::task_from_pb`]).
    fn try_from(secure: &pb::SecAggTask) -> Result<Self, ClientError> {
        let (party, config, weighting) =
            wire::task_from_pb(secure).map_err(|e| invalid("secure_aggregation", e.to_string()))?;
        Ok(Self {
            party,
            config,
            weighting,
        })
    }
}

/// What a device sends back after local training.
#[derive(Clone, Debug)]
pub struct LocalUpdate {
    /// Dense change to the global parameters (same length whatever was
    /// bought), followed by the upper triangle of `x xᵀ` when the task asked
    /// for it ([`LocalTraining::user_moment`]).
    pub delta: Vec<f32>,
    /// How many of `delta`'s last values are not the model's but the extra
    /// values the coordinator's strategy asked for (the upper triangle of
    /// `x xᵀ`, `k(k+1)/2` values, under [`LocalTraining::user_moment`]);
    /// 0 otherwise.
    pub extras: usize,
    /// FedAvg weight: the number of distinct purchases trained on.
    pub num_examples: u64,
    /// Evaluation of the received model, when it was asked for.
    pub evaluation: Option<EvalCounts>,
    /// How much local training was done (stays on the device).
    pub training: TrainingReport,
    /// Under adaptive DP clipping, the indicator the device reports (see
    /// [`crate::privacy::privatize`]); 0 otherwise.
    pub within_clip: f32,
}

impl LocalUpdate {
    /// The change to the global parameters: `delta` without the extras.
    pub fn model_delta(&self) -> &[f32] {
        &self.delta[..self.delta.len().saturating_sub(self.extras)]
    }

    /// The extra values the task asked for after the model's (see
    /// [`extras`](Self::extras)); empty when it asked for none.
    pub fn extras(&self) -> &[f32] {
        &self.delta[self.delta.len().saturating_sub(self.extras)..]
    }
}

/// What the device computed for a task.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum TaskOutput {
    /// A training task's update (clipped and noised as the task's DP asks),
    /// with the extra values the task asked for after the model's (see
    /// [`LocalUpdate::extras`]) and the evaluation counts when asked.
    Update(LocalUpdate),
    /// An evaluation task's counts; `None` when the device holds no
    /// purchase out (it then reports zero counts).
    Evaluation(Option<EvalCounts>),
}

impl TaskOutput {
    /// What the device masks in a secure aggregation round: the update
    /// clipped to the protocol's range and scaled by the device's weight,
    /// then the weight, the evaluation counts and the clipping indicator
    /// ([`payload::encode`]). Refuses a task without secure aggregation
    /// and an output without an update.
    pub fn secure_input(&self, task: &Task) -> Result<Vec<f32>, ClientError> {
        let (TaskOutput::Update(update), Some(secure)) = (self, task.secure()) else {
            return Err(ClientError::Protocol(
                "only a training task's update goes through secure aggregation".into(),
            ));
        };
        Ok(payload::encode(
            &update.delta,
            update.num_examples,
            update.evaluation.as_ref(),
            secure.weighting,
            secure.config.range,
            update.within_clip,
        ))
    }
}

#[cfg(test)]
impl Task {
    /// A valid task of `kind` for `round` with the default training
    /// configuration, for tests that need one without a wire task.
    pub(crate) fn for_tests(kind: TaskKind, round: u32) -> Self {
        Self {
            kind,
            round,
            model_version: 0,
            deadline: Duration::ZERO,
            training: LocalTraining::default(),
            evaluate: false,
            dp: None,
            secure: None,
            upload_encoding: Encoding::F32,
            privacy: None,
            validation: false,
        }
    }

    /// The same task reporting `privacy`.
    pub(crate) fn with_privacy(self, privacy: PrivacyBudget) -> Self {
        Self {
            privacy: Some(privacy),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::device::Device;
    use crate::model::Loss;
    use std::sync::Arc;

    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::consent::Consent;
    use crate::model::{MatrixFactorization, Model};
    use crate::store::Purchase;

    fn wire(kind: pb::TaskKind, loss: pb::Loss) -> pb::Task {
        pb::Task {
            kind: kind.into(),
            round: 3,
            model_version: 7,
            deadline_ms: 1_500,
            training: Some(pb::TrainingConfig {
                local_epochs: 2,
                learning_rate: 0.05,
                regularization: 0.01,
                negatives: 1,
                evaluate: true,
                proximal_mu: 0.0,
                loss: loss.into(),
                confidence: 5.0,
                user_moment: loss == pb::Loss::Als,
            }),
            ..Default::default()
        }
    }

    fn refused_field(task: &pb::Task) -> String {
        match Task::try_from(task) {
            Err(ClientError::InvalidTask { field, reason }) => {
                // The message carries the field and the refused value.
                let message = ClientError::InvalidTask {
                    field: field.clone(),
                    reason,
                }
                .to_string();
                assert!(message.contains(&field), "{message}");
                field
            }
            other => panic!("expected an invalid task, got {other:?}"),
        }
    }

    #[test]
    fn a_wire_task_converts_with_every_field() {
        let mut w = wire(pb::TaskKind::Train, pb::Loss::Als);
        w.upload_encoding = pb::ValueEncoding::Q8.into();
        w.privacy = Some(pb::PrivacyBudget {
            epsilon: 1.5,
            delta: 1e-6,
        });
        w.dp = Some(pb::DpTask {
            clip: 2.0,
            noise_stddev: 0.1,
            report_clipping: true,
            count_noise_stddev: 0.5,
        });
        let task = Task::try_from(&w).unwrap();
        assert_eq!(task.kind(), TaskKind::Train);
        assert_eq!((task.round(), task.model_version()), (3, 7));
        assert_eq!(task.deadline(), Duration::from_millis(1_500));
        assert_eq!(task.training().loss, Loss::Als);
        assert!(task.training().user_moment && task.evaluate());
        assert_eq!(task.upload_encoding(), Encoding::Q8);
        assert_eq!(
            task.dp(),
            Some(&DpSpec {
                clip: 2.0,
                noise_std: 0.1,
                count_noise_std: Some(0.5),
            })
        );
        assert_eq!(task.privacy().map(|p| p.epsilon), Some(1.5));
        assert!(task.secure().is_none());

        // What a newer coordinator may send: an unknown encoding is f32, an
        // unknown kind is training.
        w.upload_encoding = 99;
        w.kind = 99;
        let task = Task::try_from(&w).unwrap();
        assert_eq!(task.upload_encoding(), Encoding::F32);
        assert_eq!(task.kind(), TaskKind::Train);
    }

    #[test]
    fn a_bad_field_is_named_in_the_refusal() {
        let good = wire(pb::TaskKind::Train, pb::Loss::Bpr);
        let mut w = good;
        w.training = None;
        assert_eq!(refused_field(&w), "training");

        let mut w = good;
        w.training.as_mut().unwrap().learning_rate = 20.0;
        assert_eq!(refused_field(&w), "training.learning_rate");
        let err = Task::try_from(&w).unwrap_err().to_string();
        assert!(err.contains("got 20"), "{err}");

        let mut w = good;
        w.training.as_mut().unwrap().local_epochs = 0;
        assert_eq!(refused_field(&w), "training.local_epochs");

        let mut w = good;
        w.training.as_mut().unwrap().user_moment = true;
        assert_eq!(refused_field(&w), "training.user_moment");

        let mut w = good;
        w.dp = Some(pb::DpTask {
            clip: 0.0,
            ..Default::default()
        });
        assert_eq!(refused_field(&w), "dp.clip");
        w.dp = Some(pb::DpTask {
            clip: 1.0,
            noise_stddev: f32::NAN,
            ..Default::default()
        });
        assert_eq!(refused_field(&w), "dp.noise_stddev");
        w.dp = Some(pb::DpTask {
            clip: 1.0,
            report_clipping: true,
            count_noise_stddev: -1.0,
            ..Default::default()
        });
        assert_eq!(refused_field(&w), "dp.count_noise_stddev");

        // A threshold of one half or less would let the coordinator unmask.
        let mut w = good;
        w.secure_aggregation = Some(pb::SecAggTask {
            party: 1,
            threshold: 0.5,
            range: 1.0,
            bits: 16,
            ..Default::default()
        });
        assert_eq!(refused_field(&w), "secure_aggregation");
        // Read for training tasks only.
        w.kind = pb::TaskKind::Evaluate.into();
        assert!(Task::try_from(&w).unwrap().secure().is_none());
    }

    #[test]
    fn the_validation_flag_is_read_for_every_kind() {
        for kind in [pb::TaskKind::Train, pb::TaskKind::Evaluate] {
            let mut w = wire(kind, pb::Loss::Bpr);
            assert!(!Task::try_from(&w).unwrap().validation());
            w.validation = true;
            assert!(Task::try_from(&w).unwrap().validation());
        }
    }

    fn device(model: &Arc<MatrixFactorization>) -> Device {
        let mut d = Device::new(Arc::clone(model) as Arc<dyn Model>, 5);
        d.set_consent(Consent::Federated).unwrap();
        for item in [1, 2, 4] {
            d.record(Purchase::new(item, 0, 1.0)).unwrap();
        }
        d
    }

    #[test]
    fn run_task_trains_evaluates_and_appends_what_the_task_asks_for() {
        let k = 3;
        let model = Arc::new(MatrixFactorization::new(6, k, 0.1).unwrap());
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(1));

        // Training under ALS with the user moment: the model's values, then
        // the upper triangle of x xᵀ; the same as `Device::train`.
        let task = Task::try_from(&wire(pb::TaskKind::Train, pb::Loss::Als)).unwrap();
        let TaskOutput::Update(update) = device(&model).run_task(&task, &global).unwrap() else {
            panic!("a training task gives an update");
        };
        assert_eq!(update.extras, k * (k + 1) / 2);
        assert_eq!(update.delta.len(), global.len() + update.extras);
        assert_eq!(update.model_delta().len(), global.len());
        assert_eq!(update.num_examples, 3);
        assert_eq!(update.within_clip, 0.0);
        let direct = device(&model)
            .train(&global, task.training(), task.evaluate())
            .unwrap();
        assert_eq!(update.delta, direct.delta);
        assert_eq!(update.extras(), direct.extras());

        // With DP: clipped to the bound and the indicator reported.
        let mut w = wire(pb::TaskKind::Train, pb::Loss::Bpr);
        w.dp = Some(pb::DpTask {
            clip: 1e-3,
            report_clipping: true,
            ..Default::default()
        });
        let task = Task::try_from(&w).unwrap();
        let TaskOutput::Update(update) = device(&model).run_task(&task, &global).unwrap() else {
            panic!("a training task gives an update");
        };
        assert_eq!(update.extras, 0);
        let norm = update.delta.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(norm <= 1e-3 * (1.0 + 1e-5), "norm {norm}");
        assert_eq!(update.within_clip, 0.0, "the update was clipped");
        // A plain task has no secure aggregation input.
        assert!(TaskOutput::Update(update).secure_input(&task).is_err());

        // Evaluation: counts (none without a held-out purchase).
        let task = Task::try_from(&wire(pb::TaskKind::Evaluate, pb::Loss::Bpr)).unwrap();
        let out = device(&model).run_task(&task, &global).unwrap();
        assert!(matches!(out, TaskOutput::Evaluation(None)), "{out:?}");

        // Parameters of another model are refused, and so is a device
        // without federated consent.
        assert!(matches!(
            device(&model).run_task(&task, &global[1..]),
            Err(ClientError::ModelMismatch(_))
        ));
        let mut d = device(&model);
        d.set_consent(Consent::OnDevice).unwrap();
        assert!(matches!(
            d.run_task(&task, &global),
            Err(ClientError::ConsentRequired { .. })
        ));
    }

    #[test]
    fn the_secure_input_is_the_weighted_update_and_its_counts() {
        let model = Arc::new(MatrixFactorization::new(6, 2, 0.1).unwrap());
        let global = model.init_global(&mut ChaCha8Rng::seed_from_u64(2));
        let mut w = wire(pb::TaskKind::Train, pb::Loss::Bpr);
        w.secure_aggregation = Some(wire::task_to_pb(
            PartyId(4),
            &SecAggConfig::default(),
            Weighting::Uniform,
        ));
        let task = Task::try_from(&w).unwrap();
        let secure = task.secure().unwrap();
        assert_eq!(secure.party, PartyId(4));
        let out = device(&model).run_task(&task, &global).unwrap();
        let input = out.secure_input(&task).unwrap();
        let TaskOutput::Update(update) = &out else {
            panic!("a training task gives an update");
        };
        assert_eq!(
            input,
            payload::encode(
                &update.delta,
                update.num_examples,
                update.evaluation.as_ref(),
                Weighting::Uniform,
                secure.config.range,
                0.0,
            )
        );
        assert_eq!(input.len(), update.delta.len() + payload::EXTRA_VALUES);
    }
}
