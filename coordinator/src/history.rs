//! What happened in each round: the coordinator's history, kept in its
//! checkpoint, reported by `Status` and in the metrics. Plain records, so
//! that the checkpoint does not depend on the round state machine.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::aggregate::EvalCounts;
use crate::privacy::PrivacySummary;

/// What a round asks its cohort to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum TaskKind {
    /// Train locally and submit an update.
    Train,
    /// Evaluate the model locally and submit counts.
    Evaluate,
}

impl fmt::Display for TaskKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Train => "training",
            Self::Evaluate => "evaluation",
        })
    }
}

/// What happened in one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    /// The round's number.
    pub round: u32,
    /// Training or evaluation.
    pub kind: TaskKind,
    /// True when the round completed; false when it was abandoned.
    pub completed: bool,
    /// Why it was abandoned.
    pub abandon_reason: Option<String>,
    /// The model version after the round.
    pub model_version: u64,
    /// Devices selected.
    pub selected: usize,
    /// Devices whose submission was accepted.
    pub participants: usize,
    /// Duration from start to end.
    pub seconds: f64,
    /// Evaluation counts summed over the participants.
    pub evaluation: EvalCounts,
    /// What secure aggregation did in the round, when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecureSummary>,
    /// What differential privacy did in the round, when it ran: the (ε, δ)
    /// spent once the round counted, z, C, q.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<Box<PrivacySummary>>,
}

/// What secure aggregation did in one round: devices left after each step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecureSummary {
    /// Devices selected.
    pub selected: usize,
    /// Devices whose keys were advertised (the roster).
    pub advertised: usize,
    /// Devices that shared their keys and went on to step 3.
    pub shared: usize,
    /// Devices whose masked input is in the sum.
    pub survivors: usize,
    /// Unmask responses received.
    pub responded: usize,
    /// Neighbours per device (0 before the roster was fixed).
    pub neighbours: usize,
    /// Shares needed per secret (0 before the roster was fixed).
    pub threshold: usize,
    /// The step at which the round was abandoned, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abandoned_at: Option<String>,
}
