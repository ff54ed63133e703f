//! The device's side of the transparency report: what it stores, what
//! the shopper excluded and what has left it (the report's types are in
//! [`crate::transparency`]).

use super::Device;
use crate::task::{Task, TaskKind};
use crate::transparency::{
    ExclusionSummary, Ledger, RoundRecord, SentMessage, StoredSummary, TransparencyReport,
};

impl Device {
    /// Notes a task the participant received (its round, kind and the
    /// privacy budget reported with it), before the device works on it.
    pub(crate) fn note_task(&mut self, task: &Task) {
        let kind = match task.kind() {
            TaskKind::Evaluate => "evaluate",
            _ => "train",
        };
        let now = self.clock.unix_now();
        self.ledger
            .rounds
            .push(RoundRecord::new(task.round(), kind, now, task.privacy()));
    }

    /// What this device stores, what the shopper excluded and what has
    /// left it. The purchases and the exclusions themselves are listed only
    /// with `include_items`.
    pub fn transparency_report(&self, include_items: bool) -> TransparencyReport {
        let range = self.store.time_range();
        let exclusions = self.exclusions();
        let purchases = self.store.purchases();
        TransparencyReport {
            generated_at: self.clock.unix_now(),
            consent: self.consent.get(),
            stored: StoredSummary {
                purchases: purchases.len(),
                not_used: purchases.iter().filter(|p| exclusions.excludes(p)).count(),
                distinct_items: self.store.items().len(),
                first: range.map(|r| r.0),
                last: range.map(|r| r.1),
                private_embedding_values: self.private.len(),
                items: include_items.then(|| purchases.to_vec()),
                encrypted_file: self.vault.is_some(),
            },
            exclusions: ExclusionSummary::new(exclusions, include_items),
            retention: self.retention,
            rounds: self.ledger.rounds.clone(),
            outside_rounds: self.ledger.outside_rounds.clone(),
            total_bytes_sent: self.ledger.total_bytes(),
            privacy: self.ledger.privacy(),
            erased_at: self.ledger.erased_at,
        }
    }

    /// Adds messages that left the device to its ledger (and saves it).
    /// [`crate::Client`] does this for every message it sends; a caller
    /// driving a [`crate::participant::Participant`] itself passes
    /// `participant.sent().messages()` (those not yet added).
    pub fn note_sent(&mut self, messages: &[SentMessage]) -> Result<(), crate::ClientError> {
        if messages.is_empty() {
            return Ok(());
        }
        let now = self.clock.unix_now();
        self.ledger.add_sent(messages, now);
        self.persist()
    }

    /// The ledger of rounds and messages.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transparency::{PrivacyBudget, SentMessage};

    #[test]
    fn a_reported_privacy_budget_is_recorded_and_shown() {
        let model = std::sync::Arc::new(crate::model::MatrixFactorization::new(5, 2, 0.1).unwrap());
        let mut d = Device::new(model, 1);
        d.note_task(&Task::for_tests(TaskKind::Train, 4));
        let text = d.transparency_report(false).to_text();
        assert!(text.contains("Privacy budget: not reported"), "{text}");
        // The plain summary comes first, the detail after it.
        assert!(text.starts_with("In short\n"), "{text}");
        assert!(text.find("never left") < text.find("Details"), "{text}");
        assert!(text.contains("Privacy budget: none reported"), "{text}");
        let budget = PrivacyBudget {
            epsilon: 1.5,
            delta: 1e-6,
        };
        d.note_task(&Task::for_tests(TaskKind::Train, 5).with_privacy(budget));
        let report = d.transparency_report(false);
        assert_eq!(report.privacy, Some(budget));
        assert!(
            report.to_text().contains("ε = 1.500, δ = 1e-6"),
            "{}",
            report.to_text()
        );
    }

    #[test]
    fn messages_are_attributed_to_their_round() {
        let mut l = Ledger::default();
        l.rounds.push(RoundRecord::new(3, "train", 10, None));
        let sent = [
            SentMessage {
                kind: "CheckInRequest",
                round: 0,
                bytes: 10,
            },
            SentMessage {
                kind: "UpdateChunk",
                round: 3,
                bytes: 100,
            },
            SentMessage {
                kind: "UpdateChunk",
                round: 3,
                bytes: 50,
            },
            SentMessage {
                kind: "EvaluationReport",
                round: 4,
                bytes: 7,
            },
        ];
        l.add_sent(&sent, 20);
        assert_eq!(l.rounds[0].messages["UpdateChunk"].bytes, 150);
        assert_eq!(l.rounds[0].messages["UpdateChunk"].count, 2);
        assert_eq!(l.rounds[1].task, "unknown");
        assert_eq!(l.total_bytes(), 167);
    }
}
