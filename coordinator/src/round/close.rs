//! Ending rounds: the round's mean update through the strategy, the
//! summary, and the end of training.

use std::time::Instant;

use super::*;

impl RoundCore {
    /// Values in one device's update: the model's, then what the strategy
    /// asks for after them (`als`: the upper triangle of `x xᵀ`).
    pub(crate) fn update_len(&self) -> usize {
        self.model.params.len() + self.strategy.extra_values()
    }

    /// Ends the open round: completes it (applying the strategy for a
    /// training round) unless `abandon` gives a reason.
    pub(super) fn close(&mut self, now: Instant, mut abandon: Option<String>) {
        let Some(mut open) = self.open.take() else {
            return;
        };
        if self.replica.is_some() {
            self.close_share(now, open, abandon);
            return;
        }
        if abandon.is_none() && open.kind == TaskKind::Train {
            // The round completed, so at least min_updates >= 1 updates were
            // added (or, under secure aggregation, the sum was unmasked).
            let totals = match open.secure.as_mut() {
                Some(secure) => secure.totals.take(),
                None => self.aggregator.totals(),
            };
            let mean = match (self.privacy.as_mut(), open.privacy.as_mut(), totals) {
                (Some(mechanism), Some(round), Some(totals)) => Some(mechanism.finish_round(
                    round,
                    NoisySum {
                        sum: &totals.weighted_sum,
                        within_clip: totals.within_clip,
                    },
                )),
                (_, _, totals) => totals.map(|t| t.mean()),
            };
            abandon = self.apply_mean(mean, open.number, open.accepted);
        }
        self.aggregator.reset();
        if open.kind == TaskKind::Evaluate {
            self.final_evaluation_done = true;
        }
        let summary = RoundSummary {
            round: open.number,
            kind: open.kind,
            completed: abandon.is_none(),
            abandon_reason: abandon,
            model_version: self.model.version,
            selected: open.cohort.len(),
            participants: open.accepted,
            seconds: now.saturating_duration_since(open.started).as_secs_f64(),
            evaluation: open.evaluation,
            secure_aggregation: open.secure.as_ref().map(secagg::SecureRound::summary),
            privacy: open.privacy.map(|p| Box::new(p.summary)),
        };
        self.history.push(summary.clone());
        self.events.push_back(Event::RoundEnded(summary));
        self.sweep(now);
        self.window_start = (!self.pool.is_empty()).then_some(now);
        self.generation += 1;
        self.finish_if_done();
    }

    /// Steps the model with the `devices` devices' mean update (training
    /// round or async step `number`) through the strategy, making the next
    /// version; or returns why the model was not changed.
    pub(super) fn apply_mean(
        &mut self,
        mean: Option<Vec<f32>>,
        number: u32,
        devices: usize,
    ) -> Option<String> {
        let Some(mean) = mean else {
            return Some("no update to apply".to_owned());
        };
        let round = crate::strategy::Round {
            lr_factor: self.config.strategy.schedule.factor(
                (number - self.run_start).into(),
                self.config.rounds.rounds.into(),
            ),
            devices,
            joined: self.joined.len(),
            training: &self.config.training,
        };
        match self.strategy.step(&self.model.params, mean, &round) {
            Ok(params) => {
                let layout = self.model.layout.clone();
                self.model = Arc::new(ModelSnapshot::new(
                    self.model.version + 1,
                    layout,
                    params,
                    self.config.download.encoding,
                ));
                None
            }
            Err(e) => Some(format!("{e}; the model was not changed")),
        }
    }

    /// Finishes when no round is left to run.
    pub(super) fn finish_if_done(&mut self) {
        if self.next_kind().is_some() || self.between_runs {
            return;
        }
        if self.trial {
            // The search's driver starts the next run; devices wait.
            self.between_runs = true;
            self.window_start = None;
            self.generation += 1;
            return;
        }
        let rounds = self.training_rounds;
        let mut reason = match &self.training_stopped {
            Some(stopped) => format!("stopped after {rounds} training rounds: {stopped}"),
            None => format!("completed {rounds} training rounds"),
        };
        if self.final_evaluation_done {
            reason.push_str(" and the final evaluation");
        }
        self.finished = Some(reason.clone());
        self.pool.clear();
        self.window_start = None;
        self.generation += 1;
        self.events.push_back(Event::Finished { reason });
    }
}
