//! The records and enums the bindings exchange, each the foreign twin of an
//! SDK type, converted at the boundary.

use fedrec_client::{consent, device, exclusion, participant, recommend, store, transparency};

use crate::error::FedrecError;

/// What the shopper allows (see the SDK's `Consent`). Default `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum Consent {
    /// Nothing is stored; recommendations are the popular items.
    None,
    /// Purchases are kept on the device for personal recommendations only.
    OnDevice,
    /// Also take part in federated training.
    Federated,
}

impl From<Consent> for consent::Consent {
    fn from(c: Consent) -> Self {
        match c {
            Consent::None => Self::None,
            Consent::OnDevice => Self::OnDevice,
            Consent::Federated => Self::Federated,
        }
    }
}

impl From<consent::Consent> for Consent {
    fn from(c: consent::Consent) -> Self {
        match c {
            consent::Consent::OnDevice => Self::OnDevice,
            consent::Consent::Federated => Self::Federated,
            _ => Self::None,
        }
    }
}

/// The consent in force and when it was set.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ConsentRecord {
    /// The level.
    pub level: Consent,
    /// When it was set (Unix seconds); `None`: never set (the default).
    pub set_at: Option<i64>,
}

impl From<consent::ConsentRecord> for ConsentRecord {
    fn from(r: consent::ConsentRecord) -> Self {
        Self {
            level: r.level.into(),
            set_at: r.set_at,
        }
    }
}

/// The result of `set_consent`.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ConsentChange {
    /// The level before.
    pub previous: Consent,
    /// The level now.
    pub current: Consent,
    /// Lowered to `None` with purchases stored: the app should offer
    /// `forget_me`.
    pub offer_erase: bool,
}

impl From<consent::ConsentChange> for ConsentChange {
    fn from(c: consent::ConsentChange) -> Self {
        Self {
            previous: c.previous.into(),
            current: c.current.into(),
            offer_erase: c.offer_erase,
        }
    }
}

/// One purchase, as the app reports it: nothing more is stored.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct Purchase {
    /// The item's index in the catalogue (0 ≤ item < items).
    pub item: u32,
    /// When (Unix seconds).
    pub time: i64,
    /// How many (> 0).
    pub quantity: f32,
    /// A short tag the shopper may exclude by ("gift"): 1 to 32 ASCII
    /// letters, digits, `-` or `_`.
    #[uniffi(default = None)]
    pub tag: Option<String>,
}

impl TryFrom<Purchase> for store::Purchase {
    type Error = FedrecError;
    fn try_from(p: Purchase) -> Result<Self, FedrecError> {
        let purchase = store::Purchase::new(p.item, p.time, p.quantity);
        Ok(match p.tag {
            Some(tag) => purchase.with_tag(store::Tag::new(tag)?),
            None => purchase,
        })
    }
}

impl From<&store::Purchase> for Purchase {
    fn from(p: &store::Purchase) -> Self {
        Self {
            item: p.item,
            time: p.time,
            quantity: p.quantity,
            tag: p.tag.as_ref().map(|t| t.as_str().to_owned()),
        }
    }
}

/// What became of a recorded purchase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum Recorded {
    /// Stored.
    Stored,
    /// Not stored: the consent is `None`.
    NotStored,
    /// Not kept: older than the retention policy allows.
    Expired,
}

impl From<device::Recorded> for Recorded {
    fn from(r: device::Recorded) -> Self {
        match r {
            device::Recorded::Stored => Self::Stored,
            device::Recorded::Expired => Self::Expired,
            _ => Self::NotStored,
        }
    }
}

/// What the shopper leaves out of personalization and training.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum Exclusion {
    /// One stored purchase, by its item and time.
    Purchase {
        /// The purchase's item.
        item: u32,
        /// The purchase's time (Unix seconds).
        time: i64,
    },
    /// Every purchase of this item.
    Item {
        /// The item.
        item: u32,
    },
    /// Every purchase with this tag.
    Tag {
        /// The tag.
        tag: String,
    },
}

impl TryFrom<Exclusion> for exclusion::Exclusion {
    type Error = FedrecError;
    fn try_from(e: Exclusion) -> Result<Self, FedrecError> {
        Ok(match e {
            Exclusion::Purchase { item, time } => Self::Purchase(store::PurchaseKey { item, time }),
            Exclusion::Item { item } => Self::Item(item),
            Exclusion::Tag { tag } => Self::tag(&tag)?,
        })
    }
}

/// The SDK's exclusions this version of the bindings can show (all of
/// them today; the SDK's enum is non-exhaustive).
pub(crate) fn exclusion_from(e: &exclusion::Exclusion) -> Option<Exclusion> {
    Some(match e {
        exclusion::Exclusion::Purchase(key) => Exclusion::Purchase {
            item: key.item,
            time: key.time,
        },
        exclusion::Exclusion::Item(item) => Exclusion::Item { item: *item },
        exclusion::Exclusion::Tag(tag) => Exclusion::Tag {
            tag: tag.as_str().to_owned(),
        },
        _ => return None,
    })
}

/// Why a list is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum Basis {
    /// Ranked for this shopper from their own purchases.
    Personal,
    /// The most popular items: the consent is `None`.
    PopularNoConsent,
    /// The most popular items: nothing stored yet, or all of it excluded.
    PopularColdStart,
}

impl From<recommend::Basis> for Basis {
    fn from(b: recommend::Basis) -> Self {
        match b {
            recommend::Basis::Personal => Self::Personal,
            recommend::Basis::PopularNoConsent => Self::PopularNoConsent,
            _ => Self::PopularColdStart,
        }
    }
}

/// The rows a shopping app shows, each best first.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct Recommendations {
    /// "Recommended for you" (discover), diversified by the client's knob.
    pub discover: Vec<u32>,
    /// "Buy it again": the shopper's own past items; empty without a
    /// personal basis.
    pub buy_again: Vec<u32>,
    /// One list blending both by how often this shopper re-buys.
    pub blended: Vec<u32>,
    /// What they were ranked on.
    pub basis: Basis,
}

impl From<recommend::Recommendations> for Recommendations {
    fn from(r: recommend::Recommendations) -> Self {
        Self {
            discover: r.items,
            buy_again: r.buy_again,
            blended: r.blended,
            basis: r.basis.into(),
        }
    }
}

/// One of the shopper's purchases and how much it makes an item relevant.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct Contribution {
    /// The purchased item.
    pub item: u32,
    /// Its share of the item's score.
    pub weight: f32,
}

/// Why an item is a candidate for buying again.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct RebuyReason {
    /// Times bought.
    pub purchases: u32,
    /// Days since the last purchase.
    pub days_since_last: f64,
    /// The usual days between purchases, if bought more than once.
    pub every_days: Option<f64>,
}

/// Why an item is recommended.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct Explanation {
    /// The item explained.
    pub item: u32,
    /// What the ranking was based on.
    pub basis: Basis,
    /// The item's score for a shopper the model knows nothing about.
    pub baseline: f32,
    /// The shopper's own purchases that make it relevant, largest first.
    pub because: Vec<Contribution>,
    /// When the shopper bought it before: why it is worth buying again.
    pub rebuy: Option<RebuyReason>,
    /// The explanation as a sentence for the app's screen.
    pub text: String,
}

impl From<recommend::Explanation> for Explanation {
    fn from(e: recommend::Explanation) -> Self {
        Self {
            text: e.text(),
            item: e.item,
            basis: e.basis.into(),
            baseline: e.baseline,
            because: e
                .because
                .iter()
                .map(|c| Contribution {
                    item: c.item,
                    weight: c.weight,
                })
                .collect(),
            rebuy: e.rebuy.map(|r| RebuyReason {
                purchases: r.purchases,
                days_since_last: r.days_since_last,
                every_days: r.every_days,
            }),
        }
    }
}

/// What one call of `participate` did.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ParticipationSummary {
    /// Training tasks completed and accepted.
    pub trained: u32,
    /// Evaluation tasks completed and accepted.
    pub evaluated: u32,
    /// Submissions the coordinator refused (e.g. the round had closed).
    pub refused: u32,
    /// Tasks cut short because the coordinator became unreachable.
    pub interrupted: u32,
    /// Times the device reached the coordinator again after losing it.
    pub reconnects: u32,
    /// Times the device joined again after its session expired.
    pub rejoins: u32,
    /// Times the device moved to another of its coordinator URLs because
    /// the one in use could not be reached.
    pub failovers: u32,
    /// Why it stopped (the task limit, "not eligible: …", the coordinator
    /// finishing).
    pub finished_reason: String,
}

impl From<participant::ParticipationSummary> for ParticipationSummary {
    fn from(s: participant::ParticipationSummary) -> Self {
        Self {
            trained: s.trained,
            evaluated: s.evaluated,
            refused: s.refused,
            interrupted: s.interrupted,
            reconnects: s.reconnects,
            rejoins: s.rejoins,
            failovers: s.failovers,
            finished_reason: s.finished_reason,
        }
    }
}

/// Messages of one kind sent to the coordinator.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct MessageCount {
    /// The message kind (e.g. "Update").
    pub kind: String,
    /// How many.
    pub count: u64,
    /// Their protobuf bytes.
    pub bytes: u64,
}

fn message_counts(
    map: &std::collections::BTreeMap<String, transparency::MessageCount>,
) -> Vec<MessageCount> {
    map.iter()
        .map(|(kind, c)| MessageCount {
            kind: kind.clone(),
            count: c.count,
            bytes: c.bytes,
        })
        .collect()
}

/// The privacy budget (ε, δ) the coordinator reports.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct PrivacyBudget {
    /// ε.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
}

impl From<transparency::PrivacyBudget> for PrivacyBudget {
    fn from(p: transparency::PrivacyBudget) -> Self {
        Self {
            epsilon: p.epsilon,
            delta: p.delta,
        }
    }
}

/// One round the device took part in.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct RoundRecord {
    /// The coordinator's round number.
    pub round: u32,
    /// The task ("train", "evaluate").
    pub task: String,
    /// When (Unix seconds).
    pub at: i64,
    /// What was sent, by kind.
    pub messages: Vec<MessageCount>,
    /// Bytes sent in the round.
    pub bytes: u64,
    /// The privacy budget reported after the round, if any.
    pub privacy: Option<PrivacyBudget>,
}

/// What is stored on the device.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct StoredSummary {
    /// Purchases stored (excluded ones too).
    pub purchases: u64,
    /// Of those, excluded by the shopper.
    pub not_used: u64,
    /// Distinct items among them.
    pub distinct_items: u64,
    /// The oldest purchase's time, if any.
    pub first: Option<i64>,
    /// The newest purchase's time, if any.
    pub last: Option<i64>,
    /// Values of the private embedding (never sent).
    pub private_embedding_values: u64,
    /// The purchases themselves (only when asked for).
    pub items: Option<Vec<Purchase>>,
    /// Whether the state is kept in an encrypted file.
    pub encrypted_file: bool,
}

/// What the shopper excluded.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ExclusionSummary {
    /// Purchases excluded one by one.
    pub purchases: u64,
    /// Items excluded.
    pub items: u64,
    /// Tags excluded.
    pub tags: u64,
    /// The exclusions themselves (only when asked for).
    pub list: Option<Vec<Exclusion>>,
}

/// What the device stores, what the shopper excluded and what left the
/// device: the settings screen's "your data" and a data-access request's
/// answer (see also `transparency_text` and `transparency_json`).
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct TransparencyReport {
    /// When generated (Unix seconds).
    pub generated_at: i64,
    /// The consent in force.
    pub consent: ConsentRecord,
    /// What is stored.
    pub stored: StoredSummary,
    /// What is excluded.
    pub exclusions: ExclusionSummary,
    /// Purchases older than this many days are dropped, if limited.
    pub retention_max_age_days: Option<f64>,
    /// At most this many purchases are kept, if limited.
    pub retention_max_purchases: Option<u64>,
    /// Every round taken part in.
    pub rounds: Vec<RoundRecord>,
    /// Messages sent outside rounds (joining, model downloads).
    pub outside_rounds: Vec<MessageCount>,
    /// All bytes sent to the coordinator.
    pub total_bytes_sent: u64,
    /// The latest privacy budget the coordinator reported, if any.
    pub privacy: Option<PrivacyBudget>,
    /// When the shopper last erased their data (Unix seconds), if ever.
    pub erased_at: Option<i64>,
}

impl From<&transparency::TransparencyReport> for TransparencyReport {
    fn from(r: &transparency::TransparencyReport) -> Self {
        Self {
            generated_at: r.generated_at,
            consent: r.consent.into(),
            stored: StoredSummary {
                purchases: r.stored.purchases as u64,
                not_used: r.stored.not_used as u64,
                distinct_items: r.stored.distinct_items as u64,
                first: r.stored.first,
                last: r.stored.last,
                private_embedding_values: r.stored.private_embedding_values as u64,
                items: r
                    .stored
                    .items
                    .as_ref()
                    .map(|ps| ps.iter().map(Purchase::from).collect()),
                encrypted_file: r.stored.encrypted_file,
            },
            exclusions: ExclusionSummary {
                purchases: r.exclusions.purchases as u64,
                items: r.exclusions.items as u64,
                tags: r.exclusions.tags as u64,
                list: r
                    .exclusions
                    .list
                    .as_ref()
                    .map(|l| l.iter().filter_map(exclusion_from).collect()),
            },
            retention_max_age_days: r.retention.max_age.map(|d| d.as_secs_f64() / 86_400.0),
            retention_max_purchases: r.retention.max_events.map(|n| n as u64),
            rounds: r
                .rounds
                .iter()
                .map(|round| RoundRecord {
                    round: round.round,
                    task: round.task.clone(),
                    at: round.at,
                    messages: message_counts(&round.messages),
                    bytes: round.bytes(),
                    privacy: round.privacy.map(PrivacyBudget::from),
                })
                .collect(),
            outside_rounds: message_counts(&r.outside_rounds),
            total_bytes_sent: r.total_bytes_sent,
            privacy: r.privacy.map(PrivacyBudget::from),
            erased_at: r.erased_at,
        }
    }
}
