//! What the device keeps and what left it, for the shopper to see.
//!
//! The device keeps a [`Ledger`] in its store: every round it took part in
//! (the task, when, the privacy budget the coordinator reported, how much
//! local training it did) with the kinds and byte counts of the messages it
//! sent, and the messages sent outside rounds (joining, check-ins, model
//! downloads). [`Device::transparency_report`] combines it with a summary of
//! the stored purchases and of what the shopper excluded into a
//! [`TransparencyReport`], serializable for an app and renderable as plain
//! text for a settings screen.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::consent::ConsentRecord;
use crate::exclusion::{Exclusion, Exclusions};
use crate::retention::RetentionPolicy;
use crate::store::Purchase;

/// One message that left the device.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SentMessage {
    /// The message kind, e.g. `"UpdateChunk"`.
    pub kind: &'static str,
    /// The round it belonged to (0 outside rounds).
    pub round: u32,
    /// Its size, protobuf-encoded, in bytes.
    pub bytes: usize,
}

/// Messages of one kind: how many, and their encoded size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageCount {
    /// Messages sent.
    pub count: u64,
    /// Their total size, protobuf-encoded, in bytes.
    pub bytes: u64,
}

/// A differential-privacy guarantee, as the coordinator reported it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyBudget {
    /// ε spent so far.
    pub epsilon: f64,
    /// δ of the guarantee.
    pub delta: f64,
}

/// How much local training one task did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingReport {
    /// Epochs spent fitting the private embedding to the received model.
    pub personalize_epochs: u32,
    /// Epochs of local training of the global parameters.
    pub train_epochs: u32,
    /// Epochs the coordinator asked for (of each).
    pub requested_epochs: u32,
    /// Whether the time budget stopped training before the requested epochs.
    pub stopped_by_budget: bool,
    /// Time spent, in milliseconds, by the device's clock.
    pub millis: u64,
}

/// One round the device took part in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundRecord {
    /// The coordinator's round number.
    pub round: u32,
    /// `"train"` or `"evaluate"` (`"unknown"` if only messages were logged).
    pub task: String,
    /// When the task arrived (Unix seconds).
    pub at: i64,
    /// Messages sent for this round, by kind.
    pub messages: BTreeMap<String, MessageCount>,
    /// The privacy budget the coordinator reported with the task.
    pub privacy: Option<PrivacyBudget>,
    /// Local training done, for training tasks.
    pub training: Option<TrainingReport>,
}

impl RoundRecord {
    /// Bytes sent for this round.
    pub fn bytes(&self) -> u64 {
        self.messages.values().map(|m| m.bytes).sum()
    }
}

/// The device's record of its participation, kept in its store.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ledger {
    /// Messages sent outside any round (joining, check-ins, model
    /// downloads), by kind.
    pub outside_rounds: BTreeMap<String, MessageCount>,
    /// Every round taken part in, oldest first.
    pub rounds: Vec<RoundRecord>,
    /// When the shopper last erased their data (`forget_me`), if ever.
    pub erased_at: Option<i64>,
}

impl Ledger {
    /// Adds messages that left the device (as logged by the participant).
    pub fn add_sent(&mut self, messages: &[SentMessage], now: i64) {
        for m in messages {
            let slot = if m.round == 0 {
                self.outside_rounds.entry(m.kind.to_owned()).or_default()
            } else {
                let i = match self.rounds.iter().rposition(|r| r.round == m.round) {
                    Some(i) => i,
                    None => {
                        self.rounds
                            .push(RoundRecord::new(m.round, "unknown", now, None));
                        self.rounds.len() - 1
                    }
                };
                self.rounds[i]
                    .messages
                    .entry(m.kind.to_owned())
                    .or_default()
            };
            slot.count += 1;
            slot.bytes += m.bytes as u64;
        }
    }

    /// Total bytes sent, in rounds and outside.
    pub fn total_bytes(&self) -> u64 {
        self.outside_rounds.values().map(|m| m.bytes).sum::<u64>()
            + self.rounds.iter().map(RoundRecord::bytes).sum::<u64>()
    }

    /// The latest privacy budget any task reported.
    pub fn privacy(&self) -> Option<PrivacyBudget> {
        self.rounds.iter().rev().find_map(|r| r.privacy)
    }
}

impl RoundRecord {
    pub(crate) fn new(round: u32, task: &str, at: i64, privacy: Option<PrivacyBudget>) -> Self {
        Self {
            round,
            task: task.to_owned(),
            at,
            messages: BTreeMap::new(),
            privacy,
            training: None,
        }
    }
}

/// What is stored on the device, in summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredSummary {
    /// Purchases stored, excluded ones too (they are stored).
    pub purchases: usize,
    /// How many of them are excluded by the shopper: stored, but used for
    /// nothing.
    pub not_used: usize,
    /// Distinct items among them.
    pub distinct_items: usize,
    /// Time of the earliest stored purchase (Unix seconds).
    pub first: Option<i64>,
    /// Time of the latest stored purchase (Unix seconds).
    pub last: Option<i64>,
    /// Values in the private user embedding (kept on the device only).
    pub private_embedding_values: usize,
    /// The purchases themselves (excluded ones too), only when asked for.
    pub items: Option<Vec<Purchase>>,
    /// Whether the store is an encrypted file (false: in memory only).
    pub encrypted_file: bool,
}

/// What the shopper excluded from personalization and training, in summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExclusionSummary {
    /// Single purchases excluded.
    pub purchases: usize,
    /// Items excluded (every purchase of them).
    pub items: usize,
    /// Tags excluded (every purchase with them).
    pub tags: usize,
    /// The exclusions themselves, only when asked for (they name items and
    /// tags).
    pub list: Option<Exclusions>,
}

impl ExclusionSummary {
    pub(crate) fn new(exclusions: Exclusions, include_items: bool) -> Self {
        let count = |f: fn(&Exclusion) -> bool| exclusions.iter().filter(|x| f(x)).count();
        Self {
            purchases: count(|x| matches!(x, Exclusion::Purchase(_))),
            items: count(|x| matches!(x, Exclusion::Item(_))),
            tags: count(|x| matches!(x, Exclusion::Tag(_))),
            list: include_items.then_some(exclusions),
        }
    }
}

/// Everything the shopper may want to know, at one moment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TransparencyReport {
    /// When the report was made (Unix seconds).
    pub generated_at: i64,
    /// The consent in force and when it was set.
    pub consent: ConsentRecord,
    /// What is stored.
    pub stored: StoredSummary,
    /// What the shopper excluded.
    pub exclusions: ExclusionSummary,
    /// The retention policy in force.
    pub retention: RetentionPolicy,
    /// Every round taken part in, with what was sent.
    pub rounds: Vec<RoundRecord>,
    /// Messages sent outside rounds, by kind.
    pub outside_rounds: BTreeMap<String, MessageCount>,
    /// Total bytes that left the device.
    pub total_bytes_sent: u64,
    /// The latest (ε, δ) the coordinator reported; `None`: not reported.
    pub privacy: Option<PrivacyBudget>,
    /// When the shopper last erased their data, if ever.
    pub erased_at: Option<i64>,
}

impl TransparencyReport {
    /// Plain text for a settings screen.
    pub fn to_text(&self) -> String {
        let mut s = self.summary();
        s.push_str("\nDetails\n");
        let c = &self.consent;
        let since = c
            .set_at
            .map_or_else(|| "the default".to_owned(), |t| format!("set {}", date(t)));
        let _ = writeln!(s, "Consent: {} ({since})", c.level);
        let st = &self.stored;
        let place = if st.encrypted_file {
            "in an encrypted file on this device"
        } else {
            "in memory on this device"
        };
        match (st.first, st.last) {
            (Some(a), Some(b)) => {
                let _ = writeln!(
                    s,
                    "Stored {place}: {} purchases of {} items, from {} to {}",
                    st.purchases,
                    st.distinct_items,
                    date(a),
                    date(b)
                );
            }
            _ => {
                let _ = writeln!(s, "Stored {place}: no purchases");
            }
        }
        if st.not_used > 0 {
            let _ = writeln!(
                s,
                "  of which {} not used for recommendations or training: you excluded them",
                plural(st.not_used, "purchase")
            );
        }
        let _ = writeln!(
            s,
            "Also stored: a private profile of {} numbers that never leaves this device",
            st.private_embedding_values
        );
        let age = self
            .retention
            .max_age
            .map_or("no age limit".to_owned(), |a| {
                format!("{} days", a.as_secs() / 86_400)
            });
        let count = self
            .retention
            .max_events
            .map_or("no count limit".to_owned(), |n| {
                format!("at most {n} purchases")
            });
        let _ = writeln!(s, "Kept: {age}, {count}");
        if let Some(items) = &st.items {
            for p in items {
                let mut line = format!(
                    "  {}  item {}  quantity {}",
                    date(p.time),
                    p.item,
                    p.quantity
                );
                if let Some(tag) = &p.tag {
                    let _ = write!(line, "  tag {tag}");
                }
                if self.exclusions.list.as_ref().is_some_and(|x| x.excludes(p)) {
                    line.push_str("  (excluded: not used)");
                }
                let _ = writeln!(s, "{line}");
            }
        }
        let x = &self.exclusions;
        let kinds: Vec<String> = [
            (x.purchases, "single purchase"),
            (x.items, "item"),
            (x.tags, "tag"),
        ]
        .into_iter()
        .filter(|&(n, _)| n > 0)
        .map(|(n, noun)| plural(n, noun))
        .collect();
        if kinds.is_empty() {
            let _ = writeln!(s, "Excluded by you: nothing");
        } else {
            let _ = writeln!(
                s,
                "Excluded by you from recommendations and training: {}",
                kinds.join(", ")
            );
        }
        for e in x.list.iter().flat_map(Exclusions::iter) {
            let _ = match e {
                Exclusion::Purchase(k) => {
                    writeln!(s, "  the purchase of item {} on {}", k.item, date(k.time))
                }
                Exclusion::Item(item) => writeln!(s, "  every purchase of item {item}"),
                Exclusion::Tag(tag) => writeln!(s, "  every purchase tagged {tag}"),
            };
        }
        let _ = writeln!(
            s,
            "Sent: {} bytes in all, in {} rounds",
            self.total_bytes_sent,
            self.rounds.len()
        );
        for r in &self.rounds {
            let kinds: Vec<String> = r
                .messages
                .iter()
                .map(|(k, m)| format!("{} {k} ({} B)", m.count, m.bytes))
                .collect();
            let mut line = format!(
                "  round {} ({}, {}): {} B — {}",
                r.round,
                r.task,
                date(r.at),
                r.bytes(),
                kinds.join(", ")
            );
            if let Some(t) = &r.training {
                let _ = write!(
                    line,
                    "; trained {} of {} epochs{}",
                    t.train_epochs,
                    t.requested_epochs,
                    if t.stopped_by_budget {
                        " (time budget)"
                    } else {
                        ""
                    }
                );
            }
            let _ = writeln!(s, "{line}");
        }
        if !self.outside_rounds.is_empty() {
            let kinds: Vec<String> = self
                .outside_rounds
                .iter()
                .map(|(k, m)| format!("{} {k} ({} B)", m.count, m.bytes))
                .collect();
            let _ = writeln!(s, "  outside rounds: {}", kinds.join(", "));
        }
        match self.privacy {
            Some(p) => {
                let _ = writeln!(s, "Privacy budget: ε = {:.3}, δ = {:e}", p.epsilon, p.delta);
            }
            None => {
                let _ = writeln!(s, "Privacy budget: not reported by the coordinator");
            }
        }
        if let Some(t) = self.erased_at {
            let _ = writeln!(s, "Data last erased: {}", date(t));
        }
        s
    }
}

impl TransparencyReport {
    /// The report in a few plain sentences: what is stored and for how
    /// long, what was sent and what never was, and the privacy budget.
    pub fn summary(&self) -> String {
        let mut s = String::from("In short\n");
        let st = &self.stored;
        let place = if st.encrypted_file {
            "in an encrypted file"
        } else {
            "in memory"
        };
        let age = self
            .retention
            .max_age
            .map_or("with no age limit".to_owned(), |a| {
                format!("for at most {} days", a.as_secs() / 86_400)
            });
        let _ = writeln!(
            s,
            "- This device keeps {} {place}, {age}; forgetting you erases them.",
            plural(st.purchases, "purchase")
        );
        let kb = self.total_bytes_sent.div_ceil(1000);
        let _ = writeln!(
            s,
            "- It sent {kb} KB in {}: changes to the shared model and counts of how well \
             it recommends. Your purchases and your private profile never left it.",
            plural(self.rounds.len(), "session")
        );
        let _ = match self.privacy {
            Some(p) => writeln!(
                s,
                "- Privacy budget ε = {:.2}: the smaller it is, the less anyone can learn \
                 about you from the shared model.",
                p.epsilon
            ),
            None => writeln!(
                s,
                "- Privacy budget: none reported; the coordinator does not add the noise \
                 that would bound what the shared model reveals about you."
            ),
        };
        s
    }
}

impl std::fmt::Display for TransparencyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// `n` and `noun`, plural unless `n` is 1.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `YYYY-MM-DD` (UTC) of a Unix time.
pub(crate) fn date(unix: i64) -> String {
    // Days to civil date (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
    let z = unix.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        assert_eq!(date(1_700_000_000), "2023-11-14");
        assert_eq!(date(-86_400), "1969-12-31");
    }
}
