//! Conversions between protobuf messages and domain types, at the edge only.

use std::time::Duration;

use fedrec_proto::pb::{self};

use crate::CoordinatorError;
use crate::aggregate::EvalCounts;
use crate::round::{CheckIn, RoundSummary, TaskKind, UpdateHeader};

use crate::round::Task;

use super::*;

/// A check-in's outcome as its protobuf answer; deadlines relative to `now`.
pub(super) fn check_in_response(outcome: CheckIn, now: std::time::Instant) -> pb::CheckInResponse {
    use pb::check_in_response::Outcome;
    let outcome = match outcome {
        CheckIn::Task(task) => Outcome::Task(task_to_pb(&task, now)),
        CheckIn::Wait { retry_after } => Outcome::Wait(pb::Wait {
            retry_after_ms: u32::try_from(retry_after.as_millis()).unwrap_or(u32::MAX),
        }),
        CheckIn::Finished { reason } => Outcome::Finished(pb::Finished { reason }),
    };
    pb::CheckInResponse {
        outcome: Some(outcome),
    }
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// Conversions between protobuf messages and domain types, at the edge only.

impl TryFrom<pb::UpdateHeader> for UpdateHeader {
    type Error = CoordinatorError;

    fn try_from(header: pb::UpdateHeader) -> Result<Self, Self::Error> {
        Ok(Self {
            pseudonym: header.pseudonym.parse()?,
            round: header.round,
            model_version: header.model_version,
            num_examples: header.num_examples,
            num_values: header.num_values,
            evaluation: header.evaluation.map(EvalCounts::from),
        })
    }
}

/// The protobuf twin of a task kind.
pub fn task_kind_to_pb(kind: TaskKind) -> pb::TaskKind {
    match kind {
        TaskKind::Train => pb::TaskKind::Train,
        TaskKind::Evaluate => pb::TaskKind::Evaluate,
    }
}

/// A round summary as its protobuf twin.
pub fn summary_to_pb(s: &RoundSummary) -> pb::RoundSummary {
    pb::RoundSummary {
        round: s.round,
        kind: task_kind_to_pb(s.kind) as i32,
        completed: s.completed,
        abandon_reason: s.abandon_reason.clone().unwrap_or_default(),
        model_version: s.model_version,
        participants: u32::try_from(s.participants).unwrap_or(u32::MAX),
        selected: u32::try_from(s.selected).unwrap_or(u32::MAX),
        seconds: s.seconds,
        evaluation: Some(pb::EvaluationCounts::from(&s.evaluation)),
        privacy: s.privacy.as_ref().map(|p| pb::PrivacyBudget {
            epsilon: p.epsilon,
            delta: p.delta,
        }),
    }
}

/// A device's task as its protobuf twin, its deadline counted from `now`:
/// what a device receives (the gRPC service's check-in answer, and an
/// in-process simulation's devices).
pub fn task_to_pb(task: &Task, now: std::time::Instant) -> pb::Task {
    pb::Task {
        kind: task_kind_to_pb(task.kind) as i32,
        round: task.round,
        model_version: task.model_version,
        deadline_ms: millis(task.deadline.saturating_duration_since(now)),
        training: Some(pb::TrainingConfig {
            local_epochs: task.training.local_epochs,
            learning_rate: task.training.learning_rate,
            regularization: task.training.regularization,
            negatives: task.training.negatives,
            proximal_mu: task.training.proximal_mu,
            loss: pb::Loss::from(task.training.loss) as i32,
            confidence: task.training.confidence,
            evaluate: task.evaluate,
            user_moment: task.user_moment,
        }),
        // Without differential privacy there is no budget to report;
        // devices then show "not reported".
        privacy: task.privacy.map(|p| pb::PrivacyBudget {
            epsilon: p.epsilon,
            delta: p.delta,
        }),
        dp: task.privacy.map(|p| pb::DpTask {
            clip: p.clip,
            noise_stddev: p.noise_std,
            report_clipping: p.count_noise_std.is_some(),
            count_noise_stddev: p.count_noise_std.unwrap_or(0.0),
        }),
        secure_aggregation: task.secure_aggregation.as_ref().map(secagg::task_to_pb),
        upload_encoding: task.upload_encoding.to_pb().into(),
        validation: task.validation,
    }
}
