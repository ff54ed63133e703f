//! Starting rounds: what comes next, the check-in window, and the cohort
//! selected from the waiting devices.

use std::time::Instant;

use rand::RngExt;

use super::*;

impl RoundCore {
    /// Runs the state machine until nothing more is due at `now`.
    pub(super) fn advance(&mut self, now: Instant) {
        loop {
            match &self.open {
                Some(open) if open.secure.is_some() => {
                    if !self.advance_secure(now) {
                        return;
                    }
                }
                Some(open) if open.accepted >= open.needed => self.close(now, None),
                Some(open) if now >= open.deadline => {
                    let min = self.config.rounds.min_updates;
                    // A replica's share closes as it is: the leader counts
                    // min_updates over every share.
                    if open.accepted >= min || self.replica.is_some() {
                        self.close(now, None);
                    } else {
                        let reason = format!(
                            "only {} of {} selected devices submitted by the deadline; {} required (rounds.min_updates)",
                            open.accepted,
                            open.cohort.len(),
                            min
                        );
                        self.close(now, Some(reason));
                    }
                }
                Some(_) => return,
                None if self.buffered_training() => {
                    self.advance_buffer(now);
                    if self.buffered_training() {
                        return;
                    }
                }
                None => {
                    if !self.try_start(now) {
                        return;
                    }
                }
            }
        }
    }

    /// The kind of the next round, or `None` when all rounds are done.
    pub(super) fn next_kind(&self) -> Option<TaskKind> {
        let rounds = self.config.rounds.rounds;
        if self.training_stopped.is_none() && (rounds == 0 || self.training_rounds < rounds) {
            Some(TaskKind::Train)
        } else if self.config.rounds.final_evaluation && !self.final_evaluation_done {
            Some(TaskKind::Evaluate)
        } else {
            None
        }
    }

    /// Opens the next round if its start condition holds.
    pub(super) fn try_start(&mut self, now: Instant) -> bool {
        self.sweep_sessions(now);
        if self.replica.is_some() {
            return self.start_share(now);
        }
        if self.finished.is_some() || self.pool.is_empty() {
            return false;
        }
        let Some(kind) = self.next_kind() else {
            return false;
        };
        let r = &self.config.rounds;
        let waiting = self.pool.len();
        let window_passed = self
            .window_start
            .is_some_and(|t| now >= t + r.checkin_window());
        let enough_after_window = window_passed && waiting >= r.min_updates;
        let everyone_waits = waiting == self.joined.len();
        let over = |n: usize| ((n as f64) * r.over_selection).ceil() as usize;
        let dp = kind == TaskKind::Train && self.privacy.is_some();
        let (selected, needed) = match (kind, r.fraction) {
            (TaskKind::Train, _) if dp => {
                // Poisson sampling, once every device waits (or the window
                // passed): the accountant's q holds for each of them.
                if !((everyone_waits && waiting >= r.min_updates) || enough_after_window) {
                    return false;
                }
                (0, 0)
            }
            (TaskKind::Evaluate, _) => {
                if !(everyone_waits || enough_after_window) {
                    return false;
                }
                (waiting, waiting)
            }
            (TaskKind::Train, Some(fraction)) => {
                if !((everyone_waits && waiting >= r.min_updates) || enough_after_window) {
                    return false;
                }
                let wanted = ((waiting as f64 * fraction).ceil() as usize)
                    .max(r.min_updates)
                    .min(waiting);
                let selected = over(wanted).min(waiting);
                (selected, wanted.min(selected))
            }
            (TaskKind::Train, None) => {
                let target = over(r.clients_per_round);
                // Every joined device waiting: waiting longer could only
                // bring devices that have not joined yet, so the window
                // ends now (a single-device deployment does not wait).
                let settled = self.last_join.is_none_or(|t| now >= t + JOIN_SETTLE);
                if !(waiting >= target
                    || enough_after_window
                    || (everyone_waits && settled && waiting >= r.min_updates))
                {
                    return false;
                }
                let selected = target.min(waiting);
                (selected, r.clients_per_round.min(selected))
            }
        };
        let mut privacy = None;
        if dp && let Some(mechanism) = self.privacy.as_mut() {
            match mechanism.start_round(waiting) {
                Ok(round) => privacy = Some(round),
                Err(refused) => {
                    tracing::warn!(reason = %refused.0, "training stopped");
                    self.training_stopped = Some(refused.0);
                    self.finish_if_done();
                    return true;
                }
            }
        }
        let cohort = if let Some(round) = &privacy {
            self.sample_each(round.sampling_rate())
        } else {
            self.sample_pool(selected)
        };
        let (selected, needed) = if dp {
            (cohort.len(), cohort.len())
        } else {
            (selected, needed)
        };
        self.last_round += 1;
        if kind == TaskKind::Train {
            self.training_rounds += 1;
        }
        let deadline = now + self.config.rounds.deadline();
        let opened = Opening {
            number: self.last_round,
            kind,
            needed,
            deadline,
        };
        self.open_round(opened, cohort, privacy, now);
        let r_min = self.config.rounds.min_updates;
        if dp && selected < r_min {
            let reason = format!(
                "Poisson sampling drew {selected} devices, fewer than rounds.min_updates = {r_min}; \
                 the round still counts against the privacy budget"
            );
            self.close(now, Some(reason));
        }
        true
    }

    /// Samples `selected` of the waiting devices (all of them when
    /// `selected` covers the pool), taking them out of the pool.
    pub(super) fn sample_pool(&mut self, selected: usize) -> BTreeMap<Pseudonym, bool> {
        let waiting = self.pool.len();
        if selected >= waiting {
            return std::mem::take(&mut self.pool)
                .into_iter()
                .map(|p| (p, false))
                .collect();
        }
        let candidates: Vec<Pseudonym> = self.pool.iter().copied().collect();
        rand::seq::index::sample(&mut self.rng, waiting, selected)
            .into_iter()
            .map(|i| (candidates[i], false))
            .collect()
    }

    /// Poisson sampling, as the privacy accountant assumes: each waiting
    /// device is in the cohort with probability `q`, independently.
    pub(super) fn sample_each(&mut self, q: f64) -> BTreeMap<Pseudonym, bool> {
        let rng = &mut self.rng;
        self.pool
            .iter()
            .filter(|_| rng.random_bool(q))
            .map(|p| (*p, false))
            .collect()
    }

    /// Poisson sampling that every replica of a replicated coordinator
    /// draws alike: a waiting device is in round `round` when a hash of
    /// (`key`, `round`, its pseudonym) falls below `q`. With a fresh random
    /// key for each round, each device is in with probability `q`,
    /// independently of the others, as the accountant assumes, and a
    /// device waiting at two replicas (it moved) is drawn at both or at
    /// neither, never with probability 2q.
    pub(super) fn sample_keyed(&self, q: f64, key: u64, round: u32) -> BTreeMap<Pseudonym, bool> {
        use sha2::{Digest, Sha256};
        self.pool
            .iter()
            .filter(|p| {
                let digest = Sha256::new()
                    .chain_update(key.to_le_bytes())
                    .chain_update(round.to_le_bytes())
                    .chain_update(p.0)
                    .finalize();
                let draw = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
                (draw as f64) < q * 2f64.powi(64)
            })
            .map(|p| (*p, false))
            .collect()
    }

    /// Opens round `opening.number` for `cohort` (already chosen): the
    /// devices leave the pool, the aggregator starts afresh, and secure
    /// aggregation starts for a secure training round.
    pub(super) fn open_round(
        &mut self,
        opening: Opening,
        cohort: BTreeMap<Pseudonym, bool>,
        privacy: Option<RoundPrivacy>,
        now: Instant,
    ) {
        let Opening {
            number,
            kind,
            needed,
            deadline,
        } = opening;
        for p in cohort.keys() {
            self.pool.remove(p);
            self.hand_task(p, kind, now);
        }
        self.window_start = None;
        self.aggregator.reset();
        let selected = cohort.len();
        let secure = secagg::is_secure(kind, self.config.secure_aggregation.enabled)
            .then(|| secagg::SecureRound::new(self, number, cohort.keys().copied(), now));
        self.open = Some(OpenRound {
            number,
            kind,
            model_version: self.model.version,
            started: now,
            deadline,
            cohort,
            needed,
            accepted: 0,
            evaluation: EvalCounts::default(),
            secure,
            privacy,
        });
        self.generation += 1;
        self.events.push_back(Event::RoundStarted {
            round: number,
            kind,
            model_version: self.model.version,
            selected,
        });
    }
}

/// What a round opens with, beside its cohort.
pub(super) struct Opening {
    pub(super) number: u32,
    pub(super) kind: TaskKind,
    /// Accepted submissions that complete it before its deadline.
    pub(super) needed: usize,
    pub(super) deadline: Instant,
}
