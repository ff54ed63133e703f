//! The coordinator's one error type, and its single mapping to gRPC status codes.

use std::path::PathBuf;

use fedrec_proto::secagg::{PartyId, SecAggError};
use fedrec_proto::tensor::TensorError;

use crate::round::TaskKind;

/// Everything that can go wrong in the coordinator: bad configuration, and
/// requests from devices that are refused.
///
/// Every message names the offending value. [`CoordinatorError::reason`] gives
/// a short stable label for counting rejections; `From<CoordinatorError> for
/// tonic::Status` is the one place that chooses gRPC status codes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A checkpoint could not be resumed from (at start-up).
    #[error("cannot resume from {}: {source}", path.display())]
    Resume {
        /// The checkpoint file.
        path: PathBuf,
        /// Why.
        source: Box<CoordinatorError>,
    },
    /// A configuration file could not be read, parsed or validated.
    #[error("configuration file {}: {message}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The initial model given to the coordinator is unusable.
    #[error("invalid initial model: {0}")]
    InvalidModel(String),
    /// The device speaks another protocol version.
    #[error("protocol version {got} is not supported; this coordinator speaks version {expected}")]
    ProtocolVersion {
        /// The device's version.
        got: u32,
        /// The coordinator's version.
        expected: u32,
    },
    /// The pseudonym was never handed out by this coordinator (or is malformed).
    #[error("unknown pseudonym; join first")]
    UnknownPseudonym,
    /// A join without an enrollment token, when `auth.enrollment_tokens` is set.
    #[error(
        "this coordinator admits enrolled devices only: join with the device's enrollment token"
    )]
    MissingToken,
    /// A join with a token whose digest is not in `auth.enrollment_tokens`.
    #[error("enrollment token not recognised (not enrolled, or revoked)")]
    UnknownToken,
    /// A check-in after the session (pseudonym) expired.
    #[error("session expired (auth.session_ttl_secs): join again")]
    SessionExpired,
    /// A check-in with a session that a newer join with the same
    /// enrollment token ended (`auth.max_sessions_per_token`).
    #[error(
        "this session was replaced by a newer join with the same enrollment token \
         (auth.max_sessions_per_token)"
    )]
    SessionReplaced,
    /// No round is open, and the request names a round that never started.
    #[error("no round is open (request is for round {round})")]
    NoRoundOpen {
        /// The round named by the request.
        round: u32,
    },
    /// The request is for a round that has already completed or been abandoned.
    #[error("round {round} is closed")]
    RoundClosed {
        /// The round named by the request.
        round: u32,
    },
    /// Async mode: the update started from a model version too far behind.
    #[error(
        "the update was computed from model version {started_from}, {} versions behind the \
         current version {current}; async mode refuses updates more than {bound} versions \
         stale (rounds.async_max_staleness): check in for a new task",
        current - started_from
    )]
    TooStale {
        /// The version the device trained on.
        started_from: u64,
        /// The current version.
        current: u64,
        /// `rounds.async_max_staleness`.
        bound: u64,
    },
    /// Async mode: the device's task passed its deadline before its update came.
    #[error(
        "the task of step {round} passed its deadline (rounds.deadline_secs) before the update \
         arrived: check in for a new task"
    )]
    TaskExpired {
        /// The step the task was issued in.
        round: u32,
    },
    /// The request is for another round than the open one.
    #[error("update is for round {got}, but round {open} is open")]
    WrongRound {
        /// The round named by the request.
        got: u32,
        /// The open round.
        open: u32,
    },
    /// The request is for another model version than the current one.
    #[error("request is for model version {got}, but the current version is {current}")]
    WrongModelVersion {
        /// The version named by the request.
        got: u64,
        /// The current version.
        current: u64,
    },
    /// The device was not selected for the open round.
    #[error("device is not in the cohort of round {round}")]
    NotInCohort {
        /// The open round.
        round: u32,
    },
    /// The device already submitted for this round.
    #[error("device already submitted for round {round}")]
    Duplicate {
        /// The open round.
        round: u32,
    },
    /// An update sent to an evaluation round, or an evaluation to a training round.
    #[error("round {round} is a {expected} round, but a {got} result was sent")]
    WrongTaskKind {
        /// The open round.
        round: u32,
        /// What the round asks for.
        expected: TaskKind,
        /// What was sent.
        got: TaskKind,
    },
    /// The update header announces another number of values than the model has.
    #[error("update announces {got} values, but the model has {expected}")]
    WrongNumValues {
        /// The model's number of values.
        expected: usize,
        /// The announced number.
        got: u64,
    },
    /// The update's values are malformed: misaligned, wrong length, NaN or infinite.
    #[error("bad update values: {0}")]
    BadValues(#[from] TensorError),
    /// A (finite) value whose weighted size could make the running sum overflow.
    #[error("update value at index {index} ({value}) is out of range: weighted by the example count it exceeds the bound {bound:e} that keeps the aggregate finite", bound = crate::aggregate::MAX_WEIGHTED_VALUE)]
    Overflow {
        /// Index of the first offending value.
        index: usize,
        /// The value itself.
        value: f32,
    },
    /// The update claims zero training examples (its FedAvg weight).
    #[error("num_examples must be >= 1, got 0")]
    ZeroExamples,
    /// Evaluation counts that are negative, not finite, or exceed the user count.
    #[error("evaluation count {field} must be finite, >= 0 and <= users ({users}), got {value}")]
    BadEvaluation {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: f64,
        /// The reported number of users.
        users: u64,
    },
    /// The uploaded values exceed the model's size.
    #[error("update is larger than the model: {got} bytes received, at most {limit} allowed")]
    TooLarge {
        /// The most bytes allowed (4 per model value).
        limit: usize,
        /// Bytes received so far.
        got: usize,
    },
    /// Too many joins from one network address.
    #[error(
        "too many joins from this address: at most {limit} per minute (server.joins_per_minute_per_source); try again later"
    )]
    JoinRateLimited {
        /// The configured limit.
        limit: u32,
    },
    /// A connection closed at once because `server.max_connections` were
    /// open (counted only: the peer gets no gRPC status).
    #[error("too many connections: at most {limit} at once (server.max_connections)")]
    TooManyConnections {
        /// The configured limit.
        limit: usize,
    },
    /// A session downloaded the same model version too often.
    #[error(
        "model version {version} was already downloaded {limit} times by this session \
         (server.max_downloads_per_version)"
    )]
    DownloadLimit {
        /// The version asked for.
        version: u64,
        /// The configured limit.
        limit: u32,
    },
    /// The round's deadline passed while the update was still streaming in.
    #[error("round {round} reached its deadline before the upload finished")]
    UploadTimeout {
        /// The round.
        round: u32,
    },
    /// An upload holding a slot fell below `server.upload_min_bytes_per_sec`
    /// (after `server.upload_grace_secs`) and lost its slot.
    #[error(
        "upload for round {round} too slow: {received} bytes in {secs:.1} s since its slot was \
         granted, below server.upload_min_bytes_per_sec = {min_rate} after \
         server.upload_grace_secs; the slot went to another device"
    )]
    UploadStalled {
        /// The round.
        round: u32,
        /// Bytes received before the upload stalled.
        received: usize,
        /// Seconds since the slot was granted.
        secs: f64,
        /// The configured minimum rate.
        min_rate: u64,
    },
    /// A device asked for a second upload slot while holding or waiting for one.
    #[error("this device already holds or waits for an upload slot (at most one per device)")]
    UploadInProgress,
    /// A request is structurally wrong (missing field, header not first, ...).
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A secure aggregation message was refused, or the round's secure
    /// aggregation was abandoned.
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] SecAggError),
    /// A secure aggregation message claims to come from another party than
    /// the caller's.
    #[error("the message claims to come from party {claimed}, but the caller is party {caller}")]
    WrongParty {
        /// The party the message names as its sender.
        claimed: PartyId,
        /// The caller's party in this round.
        caller: PartyId,
    },
    /// A plain update sent to a round that runs secure aggregation.
    #[error("round {round} uses secure aggregation: send a masked input, not a plain update")]
    SecureRound {
        /// The open round.
        round: u32,
    },
    /// A secure aggregation message sent to a round without it.
    #[error("round {round} does not use secure aggregation")]
    NotSecureRound {
        /// The open round.
        round: u32,
    },
    /// The coordinator's shared state was poisoned by a panic.
    #[error("internal error: {0}")]
    Internal(String),
    /// A replica cannot reach its store just now; the device tries again
    /// (here or at another replica).
    #[error("the coordinator's store is unavailable ({0}); try again")]
    StoreUnavailable(String),
    /// A TLS certificate, key or CA file is missing or unusable.
    #[error("TLS file {}: {message}", path.display())]
    Tls {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The checkpoint cannot be written (checked at start-up with a first
    /// write, so that a missing or read-only directory is not found only
    /// after the first round).
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// The gRPC server failed.
    #[error("gRPC transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl CoordinatorError {
    /// Whether an update was refused only for coming too late: its round
    /// closed or moved on (over-selection closes a round at its target),
    /// its task expired, async mode moved too many versions on, or the
    /// device's session ended while it trained (it joins again). The
    /// device's work is lost, but nothing is wrong with it.
    pub fn came_too_late(&self) -> bool {
        matches!(
            self,
            Self::UnknownPseudonym
                | Self::SessionExpired
                | Self::RoundClosed { .. }
                | Self::TooStale { .. }
                | Self::TaskExpired { .. }
                | Self::WrongRound { .. }
        )
    }

    /// A short, stable label for this error, used to count rejections.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidConfig(_)
            | Self::ConfigFile { .. }
            | Self::Tls { .. }
            | Self::Resume { .. } => "invalid_config",
            Self::InvalidModel(_) => "invalid_model",
            Self::ProtocolVersion { .. } => "protocol_version",
            Self::UnknownPseudonym => "unknown_pseudonym",
            Self::MissingToken => "missing_token",
            Self::UnknownToken => "unknown_token",
            Self::SessionExpired => "session_expired",
            Self::SessionReplaced => "session_replaced",
            Self::NoRoundOpen { .. } => "no_round_open",
            Self::RoundClosed { .. } => "round_closed",
            Self::TooStale { .. } => "too_stale",
            Self::TaskExpired { .. } => "task_expired",
            Self::WrongRound { .. } => "wrong_round",
            Self::WrongModelVersion { .. } => "wrong_model_version",
            Self::NotInCohort { .. } => "not_in_cohort",
            Self::Duplicate { .. } => "duplicate",
            Self::WrongTaskKind { .. } => "wrong_task_kind",
            Self::WrongNumValues { .. } => "wrong_num_values",
            Self::BadValues(TensorError::Misaligned(_)) => "misaligned",
            Self::BadValues(TensorError::WrongLength { .. }) => "wrong_length",
            Self::BadValues(TensorError::NotFinite { .. }) => "not_finite",
            Self::Overflow { .. } => "overflow",
            Self::ZeroExamples => "zero_examples",
            Self::BadEvaluation { .. } => "bad_evaluation",
            Self::TooLarge { .. } => "too_large",
            Self::JoinRateLimited { .. } => "join_rate_limited",
            Self::TooManyConnections { .. } => "connection_limit",
            Self::DownloadLimit { .. } => "download_limit",
            Self::UploadTimeout { .. } => "upload_timeout",
            Self::UploadStalled { .. } => "upload_stalled",
            Self::UploadInProgress => "upload_in_progress",
            Self::Malformed(_) => "malformed",
            Self::SecAgg(e) => e.reason(),
            Self::WrongParty { .. } => "wrong_party",
            Self::SecureRound { .. } => "secure_round",
            Self::NotSecureRound { .. } => "not_secure_round",
            Self::Internal(_) => "internal",
            Self::StoreUnavailable(_) => "store_unavailable",
            Self::Transport(_) => "transport",
            Self::Checkpoint(_) => "checkpoint",
        }
    }
}

/// The one mapping from coordinator errors to gRPC status codes.
impl From<CoordinatorError> for tonic::Status {
    fn from(err: CoordinatorError) -> Self {
        use tonic::Code;
        let code = match &err {
            CoordinatorError::UnknownPseudonym
            | CoordinatorError::MissingToken
            | CoordinatorError::UnknownToken
            | CoordinatorError::SessionExpired
            | CoordinatorError::SessionReplaced => Code::Unauthenticated,
            CoordinatorError::NotInCohort { .. } => Code::PermissionDenied,
            CoordinatorError::Duplicate { .. } => Code::AlreadyExists,
            CoordinatorError::ProtocolVersion { .. }
            | CoordinatorError::NoRoundOpen { .. }
            | CoordinatorError::RoundClosed { .. }
            | CoordinatorError::TooStale { .. }
            | CoordinatorError::TaskExpired { .. }
            | CoordinatorError::WrongRound { .. }
            | CoordinatorError::WrongModelVersion { .. }
            | CoordinatorError::WrongTaskKind { .. } => Code::FailedPrecondition,
            CoordinatorError::WrongNumValues { .. }
            | CoordinatorError::BadValues(_)
            | CoordinatorError::Overflow { .. }
            | CoordinatorError::ZeroExamples
            | CoordinatorError::BadEvaluation { .. }
            | CoordinatorError::Malformed(_) => Code::InvalidArgument,
            CoordinatorError::TooLarge { .. }
            | CoordinatorError::JoinRateLimited { .. }
            | CoordinatorError::TooManyConnections { .. }
            | CoordinatorError::DownloadLimit { .. } => Code::ResourceExhausted,
            CoordinatorError::UploadTimeout { .. } | CoordinatorError::UploadStalled { .. } => {
                Code::DeadlineExceeded
            }
            CoordinatorError::UploadInProgress => Code::AlreadyExists,
            CoordinatorError::StoreUnavailable(_) => Code::Unavailable,
            CoordinatorError::SecAgg(e) => secagg_code(e),
            CoordinatorError::WrongParty { .. } => Code::PermissionDenied,
            CoordinatorError::SecureRound { .. } | CoordinatorError::NotSecureRound { .. } => {
                Code::FailedPrecondition
            }
            CoordinatorError::InvalidConfig(_)
            | CoordinatorError::ConfigFile { .. }
            | CoordinatorError::Tls { .. }
            | CoordinatorError::Resume { .. }
            | CoordinatorError::InvalidModel(_)
            | CoordinatorError::Internal(_)
            | CoordinatorError::Checkpoint(_)
            | CoordinatorError::Transport(_) => Code::Internal,
        };
        tonic::Status::new(code, err.to_string())
    }
}

/// The gRPC code of each kind of secure aggregation error.
fn secagg_code(err: &SecAggError) -> tonic::Code {
    use tonic::Code;
    match err {
        // The round (or this device's part in it) is not where the message
        // belongs: retrying the same message cannot help.
        SecAggError::WrongStep { .. }
        | SecAggError::WrongRound { .. }
        | SecAggError::Abandoned(_)
        | SecAggError::TooFewSurvivors { .. }
        | SecAggError::TooFewShares { .. } => Code::FailedPrecondition,
        // The device is not (or no longer) a participant of the step.
        SecAggError::UnknownParty { .. } => Code::PermissionDenied,
        SecAggError::Duplicate { .. } => Code::AlreadyExists,
        SecAggError::CohortFull { .. } => Code::ResourceExhausted,
        // The coordinator's own configuration does not fit the cohort.
        SecAggError::InvalidConfig(_) => Code::Internal,
        // Everything else is a message that is wrong in itself: a bad key or
        // signature, a share for a non-neighbour, a forged or duplicated
        // share, a share that would unmask a survivor, a wrong length.
        _ => Code::InvalidArgument,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_value_and_codes_match() {
        let err = CoordinatorError::WrongRound { got: 3, open: 4 };
        assert_eq!(
            err.to_string(),
            "update is for round 3, but round 4 is open"
        );
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("round 3"));

        let err = CoordinatorError::BadValues(TensorError::NotFinite {
            index: 7,
            value: f32::NAN,
        });
        assert_eq!(err.reason(), "not_finite");
        assert!(err.to_string().contains("index 7"), "{err}");
        assert_eq!(
            tonic::Status::from(err).code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            tonic::Status::from(CoordinatorError::TooLarge { limit: 4, got: 8 }).code(),
            tonic::Code::ResourceExhausted
        );
    }

    #[test]
    fn secure_aggregation_errors_map_to_codes_and_keep_their_reason() {
        use fedrec_proto::secagg::{AbandonReason, Step};
        use tonic::Code;
        let cases: Vec<(SecAggError, Code, &str)> = vec![
            (
                SecAggError::WrongStep {
                    message: Step::ShareKeys,
                    current: Step::Advertise,
                },
                Code::FailedPrecondition,
                "not accepted at step advertise keys",
            ),
            (
                SecAggError::NotNeighbour {
                    party: PartyId(3),
                    other: PartyId(4),
                },
                Code::InvalidArgument,
                "party 3 is not a neighbour of party 4",
            ),
            (
                SecAggError::MaskKeyShareForSurvivor {
                    sender: PartyId(1),
                    owner: PartyId(2),
                },
                Code::InvalidArgument,
                "which is a survivor",
            ),
            (
                SecAggError::Duplicate {
                    what: "share",
                    party: PartyId(5),
                },
                Code::AlreadyExists,
                "duplicate share for party 5",
            ),
            (
                SecAggError::UnknownParty {
                    party: PartyId(9),
                    step: Step::Unmask,
                },
                Code::PermissionDenied,
                "party 9 is not a participant",
            ),
            (
                SecAggError::Abandoned(AbandonReason::TooFewParties {
                    step: Step::MaskedInput,
                    have: 1,
                    need: 3,
                }),
                Code::FailedPrecondition,
                "only 1 device(s) remain",
            ),
        ];
        for (err, code, needle) in cases {
            let reason = err.reason();
            let err = CoordinatorError::from(err);
            assert_eq!(err.reason(), reason);
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(needle), "{status:?}");
            assert!(
                status.message().starts_with("secure aggregation: "),
                "{status:?}"
            );
        }
        let status = tonic::Status::from(CoordinatorError::WrongParty {
            claimed: PartyId(1),
            caller: PartyId(2),
        });
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "the message claims to come from party 1, but the caller is party 2"
        );
    }
}
