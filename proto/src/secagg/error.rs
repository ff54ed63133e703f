//! The one error type of secure aggregation, shared by devices and the
//! coordinator.

use std::fmt;

use super::{PartyId, Step};

/// Which of a device's two secrets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SecretKind {
    /// The self-mask seed `b`, revealed for devices that sent a masked input.
    SelfMask,
    /// The secret key `s` of the pairwise masks, revealed for devices that
    /// dropped out after sharing their keys.
    MaskKey,
}

impl fmt::Display for SecretKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SelfMask => "self-mask seed",
            Self::MaskKey => "mask key",
        })
    }
}

/// Why the coordinator gave up on a round. No partial sum is ever output.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AbandonReason {
    /// Too few devices completed a step for the round to go on.
    TooFewParties {
        /// The step that closed.
        step: Step,
        /// Devices still in the round after it.
        have: usize,
        /// The fewest that can go on.
        need: usize,
    },
    /// A secret that must be reconstructed has fewer than `threshold` share
    /// holders left (too many of the device's neighbours dropped out).
    TooFewShareHolders {
        /// The step at which it was found.
        step: Step,
        /// Whose secret.
        party: PartyId,
        /// Which secret.
        secret: SecretKind,
        /// Share holders left.
        have: usize,
        /// Shares needed.
        threshold: usize,
    },
    /// A reconstructed secret does not match its owner's commitment (self-mask
    /// seed) or public key (mask key): some share holder sent a corrupt share.
    ReconstructionMismatch {
        /// Whose secret.
        party: PartyId,
        /// Which secret.
        secret: SecretKind,
    },
}

impl fmt::Display for AbandonReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooFewParties { step, have, need } => write!(
                f,
                "only {have} device(s) remain after step {step}, at least {need} are needed"
            ),
            Self::TooFewShareHolders {
                step,
                party,
                secret,
                have,
                threshold,
            } => write!(
                f,
                "the {secret} of party {party} has {have} share holders left at step {step}, \
                 {threshold} are needed to reconstruct it"
            ),
            Self::ReconstructionMismatch { party, secret } => write!(
                f,
                "the reconstructed {secret} of party {party} does not match what it advertised: \
                 a share holder sent a corrupt share"
            ),
        }
    }
}

/// Everything that can go wrong in secure aggregation: a bad configuration, a
/// message refused by a device or by the coordinator, a round abandoned.
///
/// A refused message leaves the state machine that refused it unchanged.
/// Every message names the offending value; [`SecAggError::reason`] gives a
/// short stable label for counting rejections.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SecAggError {
    /// A configuration value is out of range, or does not fit the cohort.
    #[error("invalid secure aggregation configuration: {0}")]
    InvalidConfig(String),
    /// A message or call arrived at the wrong step.
    #[error("a {message} message is not accepted at step {current}")]
    WrongStep {
        /// The step the message belongs to.
        message: Step,
        /// The step the round (or device) is at.
        current: Step,
    },
    /// The message is for another round.
    #[error("message is for round {got}, but this is round {expected}")]
    WrongRound {
        /// This round.
        expected: u64,
        /// The round named by the message.
        got: u64,
    },
    /// The message is addressed to another device.
    #[error("message is addressed to party {got}, but this is party {expected}")]
    WrongRecipient {
        /// This device.
        expected: PartyId,
        /// The recipient named by the message.
        got: PartyId,
    },
    /// The party is not (or no longer) a participant of this step.
    #[error("party {party} is not a participant of step {step}")]
    UnknownParty {
        /// The party.
        party: PartyId,
        /// The step.
        step: Step,
    },
    /// Something was sent twice.
    #[error("duplicate {what} for party {party}")]
    Duplicate {
        /// What was duplicated.
        what: &'static str,
        /// The party it concerns.
        party: PartyId,
    },
    /// An advertisement's signature does not verify.
    #[error("the advertisement of party {party} has an invalid signature")]
    BadSignature {
        /// The party named by the advertisement.
        party: PartyId,
    },
    /// An advertisement is signed with an identity key that is not trusted for
    /// this party.
    #[error("the advertisement of party {party} is signed with an untrusted identity key")]
    UntrustedIdentity {
        /// The party named by the advertisement.
        party: PartyId,
    },
    /// A public key is a low-order point, so key agreement with it yields a
    /// value everyone can compute.
    #[error("the public key of party {party} is a low-order point")]
    WeakKey {
        /// The party whose key it is.
        party: PartyId,
    },
    /// The roster is inconsistent (unsorted, missing this device, keys that
    /// differ from what this device advertised, ...).
    #[error("malformed roster: {0}")]
    MalformedRoster(String),
    /// Two parties that are not neighbours in the round's graph.
    #[error("party {party} is not a neighbour of party {other}")]
    NotNeighbour {
        /// The party that sent or is named.
        party: PartyId,
        /// The party it was expected to neighbour.
        other: PartyId,
    },
    /// A message lacks entries that are required.
    #[error("incomplete {what} from party {party}: expected {expected} entries, got {got}")]
    Incomplete {
        /// What is incomplete.
        what: &'static str,
        /// The sender.
        party: PartyId,
        /// Entries expected.
        expected: usize,
        /// Entries received.
        got: usize,
    },
    /// A share in a device's message names another device as its sender.
    #[error("the message of party {sender} carries a share from party {claimed}")]
    ForeignShare {
        /// The device that sent the message.
        sender: PartyId,
        /// The sender named by the share.
        claimed: PartyId,
    },
    /// A share ciphertext has the wrong length.
    #[error(
        "the share from party {sender} to party {recipient} is {len} bytes, expected {expected}"
    )]
    BadCiphertext {
        /// The sender named by the share.
        sender: PartyId,
        /// The recipient named by the share.
        recipient: PartyId,
        /// Its length.
        len: usize,
        /// The length every share ciphertext has.
        expected: usize,
    },
    /// An encrypted share does not decrypt: forged, corrupted, replayed from
    /// another round or addressed to another device.
    #[error("the share from party {sender} to party {recipient} does not decrypt")]
    Decryption {
        /// The sender named by the share.
        sender: PartyId,
        /// The recipient named by the share.
        recipient: PartyId,
    },
    /// A share has the wrong evaluation point for its holder.
    #[error(
        "the share of party {owner}'s {secret} held by party {holder} has index {got}, expected {expected}"
    )]
    WrongShareIndex {
        /// Whose secret.
        owner: PartyId,
        /// The neighbour holding the share.
        holder: PartyId,
        /// Which secret.
        secret: SecretKind,
        /// The index the graph assigns to the holder.
        expected: u8,
        /// The index in the share.
        got: u8,
    },
    /// A device asked (or was asked) to reveal a mask-key share of a device
    /// that sent its masked input: with its self-mask seed this would expose
    /// that device's update.
    #[error("party {sender} revealed a mask-key share of party {owner}, which is a survivor")]
    MaskKeyShareForSurvivor {
        /// The device that revealed it.
        sender: PartyId,
        /// The survivor.
        owner: PartyId,
    },
    /// A device revealed a self-mask share of a device that dropped out.
    #[error("party {sender} revealed a self-mask share of party {owner}, which dropped out")]
    SelfMaskShareForDropped {
        /// The device that revealed it.
        sender: PartyId,
        /// The device that dropped out.
        owner: PartyId,
    },
    /// An unmask request lists a neighbour both as a survivor and as dropped:
    /// answering would reveal both of its secrets.
    #[error("unmask request lists party {party} both as a survivor and as dropped")]
    ConflictingUnmask {
        /// The neighbour listed twice.
        party: PartyId,
    },
    /// An unmask request does not match the neighbours this device masked with.
    #[error("unmask request does not match this device's neighbours: {0}")]
    MalformedUnmask(String),
    /// Fewer survivors than the threshold: unmasking would expose too small a
    /// sum, so the device refuses.
    #[error("only {have} of this device's neighbours survived, at least {threshold} are required")]
    TooFewSurvivors {
        /// Surviving neighbours.
        have: usize,
        /// The threshold.
        threshold: usize,
    },
    /// Fewer neighbours shared their keys than the threshold.
    #[error("only {have} neighbours shared their keys, at least {threshold} are required")]
    TooFewShares {
        /// Neighbours whose shares arrived.
        have: usize,
        /// The threshold.
        threshold: usize,
    },
    /// A vector has the wrong number of values.
    #[error("expected {expected} values, got {got}")]
    WrongLength {
        /// Values expected.
        expected: usize,
        /// Values received.
        got: usize,
    },
    /// An input value is NaN or infinite.
    #[error("value at index {index} is not finite ({value})")]
    NotFinite {
        /// Index of the first offending value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// More devices than the quantizer can sum without overflow.
    #[error("the cohort is full: at most {max} devices can be summed without overflow")]
    CohortFull {
        /// The most devices allowed.
        max: usize,
    },
    /// Shamir reconstruction was given unusable shares.
    #[error("cannot reconstruct a secret: {0}")]
    Shamir(String),
    /// The round was abandoned; nothing will be output.
    #[error("round abandoned: {0}")]
    Abandoned(AbandonReason),
    /// A message from the wire has the wrong shape (a key, signature or
    /// share of the wrong length, a partial integer, ...).
    #[error("malformed secure aggregation message: {0}")]
    Malformed(String),
}

impl SecAggError {
    /// A short, stable label for this error, used to count rejections.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidConfig(_) => "invalid_config",
            Self::WrongStep { .. } => "wrong_step",
            Self::WrongRound { .. } => "wrong_round",
            Self::WrongRecipient { .. } => "wrong_recipient",
            Self::UnknownParty { .. } => "unknown_party",
            Self::Duplicate { .. } => "duplicate",
            Self::BadSignature { .. } => "bad_signature",
            Self::UntrustedIdentity { .. } => "untrusted_identity",
            Self::WeakKey { .. } => "weak_key",
            Self::MalformedRoster(_) => "malformed_roster",
            Self::NotNeighbour { .. } => "not_neighbour",
            Self::Incomplete { .. } => "incomplete",
            Self::ForeignShare { .. } => "foreign_share",
            Self::BadCiphertext { .. } => "bad_ciphertext",
            Self::Decryption { .. } => "decryption",
            Self::WrongShareIndex { .. } => "wrong_share_index",
            Self::MaskKeyShareForSurvivor { .. } => "mask_key_share_for_survivor",
            Self::SelfMaskShareForDropped { .. } => "self_mask_share_for_dropped",
            Self::ConflictingUnmask { .. } => "conflicting_unmask",
            Self::MalformedUnmask(_) => "malformed_unmask",
            Self::TooFewSurvivors { .. } => "too_few_survivors",
            Self::TooFewShares { .. } => "too_few_shares",
            Self::WrongLength { .. } => "wrong_length",
            Self::NotFinite { .. } => "not_finite",
            Self::CohortFull { .. } => "cohort_full",
            Self::Shamir(_) => "shamir",
            Self::Abandoned(_) => "abandoned",
            Self::Malformed(_) => "malformed",
        }
    }
}
