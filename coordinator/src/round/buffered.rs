//! Asynchronous buffered aggregation (`rounds.mode = "async"`; FedBuff,
//! Nguyen et al. 2022).
//!
//! While training, no round is open: devices that check in wait for a
//! slot, up to `rounds.async_concurrency` tasks are out at once, and a
//! free slot goes to a device drawn at random from those waiting (FedBuff
//! samples devices uniformly): not to whichever checks in first, which
//! would be the device that just handed in its update and freed the slot.
//! A device waits while it checks in at least every
//! [`WAITING_FRESH_POLLS`] long polls. Each accepted update is weighted by its
//! staleness τ (versions published since the one it started from) as
//! `1/√(1+τ)` ([`staleness_discount`]) and folded into the aggregator; every
//! `rounds.async_buffer` accepted updates the strategy steps, the model
//! version advances and the step is recorded in the history like a round
//! (`rounds.rounds` counts steps). An update more than
//! `rounds.async_max_staleness` versions stale is refused (`too_stale`);
//! a task not answered by its deadline (`rounds.deadline_secs` after it was
//! issued) frees its slot (`task_expired` when its update comes later).
//! After the last step the final evaluation, if any, is an ordinary
//! synchronous round.
//!
//! The buffer is not checkpointed: a checkpoint is written after a step,
//! when the buffer is empty; updates accepted since the last step are lost
//! with the process, as an open round's are.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::RngExt;

use super::*;

/// A waiting device that has not checked in for this many long polls
/// (`server.long_poll_secs`) is taken to have left.
pub const WAITING_FRESH_POLLS: u32 = 2;

/// FedBuff's staleness weight `s(τ) = 1/√(1+τ)`.
pub fn staleness_discount(staleness: u64) -> f32 {
    (1.0 / (1.0 + staleness as f64).sqrt()) as f32
}

/// A task handed out in async mode.
#[derive(Clone, Copy, Debug)]
pub(super) struct Issued {
    /// The step it was issued in (the task's `round`).
    round: u32,
    /// The version it trains on.
    model_version: u64,
    deadline: Instant,
}

/// The tasks out, by device and by deadline: finding the expired ones and
/// the next deadline costs a lookup, not a pass over every task (both are
/// asked on every event).
#[derive(Debug, Default)]
struct Active {
    by_device: BTreeMap<Pseudonym, Issued>,
    by_deadline: BTreeSet<(Instant, Pseudonym)>,
}

impl Active {
    fn insert(&mut self, pseudonym: Pseudonym, issued: Issued) {
        if let Some(old) = self.by_device.insert(pseudonym, issued) {
            self.by_deadline.remove(&(old.deadline, pseudonym));
        }
        self.by_deadline.insert((issued.deadline, pseudonym));
    }

    fn remove(&mut self, pseudonym: &Pseudonym) -> Option<Issued> {
        let issued = self.by_device.remove(pseudonym)?;
        self.by_deadline.remove(&(issued.deadline, *pseudonym));
        Some(issued)
    }

    fn get(&self, pseudonym: &Pseudonym) -> Option<&Issued> {
        self.by_device.get(pseudonym)
    }

    fn len(&self) -> usize {
        self.by_device.len()
    }

    /// The earliest deadline.
    fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|&(deadline, _)| deadline)
    }

    /// Removes and returns the tasks whose deadline is `now` or earlier.
    fn take_expired(&mut self, now: Instant) -> Vec<(Pseudonym, Issued)> {
        let mut expired = Vec::new();
        while self.by_deadline.first().is_some_and(|&(d, _)| d <= now) {
            let Some((_, pseudonym)) = self.by_deadline.pop_first() else {
                break;
            };
            if let Some(issued) = self.by_device.remove(&pseudonym) {
                expired.push((pseudonym, issued));
            }
        }
        expired
    }
}

/// The devices waiting for a slot, each with its last check-in: drawn from
/// uniformly (a vector, and each device's place in it). Devices that left
/// are dropped when drawn.
#[derive(Debug, Default)]
struct Waiting {
    devices: Vec<(Pseudonym, Instant)>,
    place: BTreeMap<Pseudonym, usize>,
}

impl Waiting {
    /// `pseudonym` checked in at `now` and waits.
    fn seen(&mut self, pseudonym: Pseudonym, now: Instant) {
        match self.place.get(&pseudonym) {
            Some(&i) => self.devices[i].1 = now,
            None => {
                self.place.insert(pseudonym, self.devices.len());
                self.devices.push((pseudonym, now));
            }
        }
    }

    fn remove_at(&mut self, i: usize) -> (Pseudonym, Instant) {
        let removed = self.devices.swap_remove(i);
        self.place.remove(&removed.0);
        if let Some(moved) = self.devices.get(i) {
            self.place.insert(moved.0, i);
        }
        removed
    }

    fn remove(&mut self, pseudonym: &Pseudonym) {
        if let Some(&i) = self.place.get(pseudonym) {
            self.remove_at(i);
        }
    }

    /// A device drawn uniformly from those seen at `fresh` or later whose
    /// session is `live` (the others, met on the way, have left and are
    /// dropped).
    fn draw(
        &mut self,
        rng: &mut impl RngExt,
        fresh: Option<Instant>,
        live: impl Fn(&Pseudonym) -> bool,
    ) -> Option<Pseudonym> {
        while !self.devices.is_empty() {
            let (pseudonym, seen) = self.remove_at(rng.random_range(0..self.devices.len()));
            if fresh.is_none_or(|f| seen >= f) && live(&pseudonym) {
                return Some(pseudonym);
            }
        }
        None
    }
}

/// Async mode's state while training: the step being filled.
#[derive(Debug)]
pub(super) struct Buffer {
    /// The step's number (also `last_round`).
    number: u32,
    started: Instant,
    /// Tasks out, by device.
    active: Active,
    /// Devices waiting for a slot.
    waiting: Waiting,
    /// Devices whose last task passed its deadline, and the step it was
    /// issued in (to say so when its update comes, however many steps
    /// later). Kept until the device gets a new task or leaves: at most
    /// one entry per joined device.
    expired: BTreeMap<Pseudonym, u32>,
    /// Tasks issued during this step.
    issued: usize,
    /// Updates accepted into this step.
    accepted: usize,
    evaluation: EvalCounts,
}

impl RoundCore {
    /// Whether training runs in async mode now (a step is being filled or
    /// the next one is due).
    pub(super) fn buffered_training(&self) -> bool {
        self.config.rounds.mode == crate::config::RoundsMode::Async
            && self.finished.is_none()
            && (self.buffer.is_some() || self.next_kind() == Some(TaskKind::Train))
    }

    /// Async mode's part of [`advance`](Self::advance): starts the first
    /// step, frees the slots of tasks past their deadline, and steps the
    /// model when the buffer is full.
    pub(super) fn advance_buffer(&mut self, now: Instant) {
        self.sweep_sessions(now);
        if self.buffer.is_none() {
            self.start_step(now);
        }
        let Some(buffer) = self.buffer.as_mut() else {
            return;
        };
        for (p, task) in buffer.active.take_expired(now) {
            buffer.expired.insert(p, task.round);
        }
        if buffer.accepted >= self.config.rounds.async_buffer {
            self.step_buffer(now);
        }
        self.fill_slots(now);
    }

    fn start_step(&mut self, now: Instant) {
        self.last_round += 1;
        self.training_rounds += 1;
        self.aggregator.reset();
        let (active, waiting, mut expired) = self
            .buffer
            .take()
            .map(|b| (b.active, b.waiting, b.expired))
            .unwrap_or_default();
        expired.retain(|p, _| self.joined.contains(p));
        self.buffer = Some(Buffer {
            number: self.last_round,
            started: now,
            active,
            waiting,
            expired,
            issued: 0,
            accepted: 0,
            evaluation: EvalCounts::default(),
        });
        self.generation += 1;
        self.events.push_back(Event::RoundStarted {
            round: self.last_round,
            kind: TaskKind::Train,
            model_version: self.model.version,
            selected: 0,
        });
    }

    /// The server step on the buffer's mean; then the next step, or the end
    /// of training.
    fn step_buffer(&mut self, now: Instant) {
        let Some(buffer) = self.buffer.as_ref() else {
            return;
        };
        let (number, accepted, issued, started, evaluation) = (
            buffer.number,
            buffer.accepted,
            buffer.issued,
            buffer.started,
            buffer.evaluation,
        );
        let mean = self.aggregator.totals().map(|t| t.mean());
        let abandon = self.apply_mean(mean, number, accepted);
        self.aggregator.reset();
        let summary = RoundSummary {
            round: number,
            kind: TaskKind::Train,
            completed: abandon.is_none(),
            abandon_reason: abandon,
            model_version: self.model.version,
            selected: issued,
            participants: accepted,
            seconds: now.saturating_duration_since(started).as_secs_f64(),
            evaluation,
            secure_aggregation: None,
            privacy: None,
        };
        self.history.push(summary.clone());
        self.events.push_back(Event::RoundEnded(summary));
        self.sweep(now);
        self.generation += 1;
        if self.next_kind() == Some(TaskKind::Train) {
            self.start_step(now);
        } else {
            // Tasks still out are answered `round_closed`.
            self.buffer = None;
            self.window_start = (!self.pool.is_empty()).then_some(now);
            self.finish_if_done();
        }
    }

    /// `pseudonym` checks in for a task: it waits for a slot, the free
    /// slots go to devices drawn from those waiting, and its task if it was
    /// drawn (now or before).
    pub(super) fn admit_buffered(&mut self, now: Instant, pseudonym: &Pseudonym) -> Option<Task> {
        self.buffer.as_mut()?.waiting.seen(*pseudonym, now);
        self.fill_slots(now);
        self.buffered_task(pseudonym)
    }

    /// Hands each free slot to a device drawn from those waiting, as soon
    /// as it frees (an update accepted or refused, a task expired, a step
    /// taken): a device whose check-in is held learns of it at once.
    fn fill_slots(&mut self, now: Instant) {
        let limit = self.config.rounds.async_concurrency;
        // `None`: a window too long to count back from, so every device
        // still waits.
        let fresh = Duration::try_from_secs_f64(self.config.server.long_poll_secs)
            .ok()
            .and_then(|poll| poll.checked_mul(WAITING_FRESH_POLLS))
            .and_then(|window| now.checked_sub(window));
        while let Some(buffer) = self.buffer.as_mut()
            && buffer.active.len() < limit
        {
            let (joined, sessions) = (&self.joined, &self.sessions);
            let live =
                |p: &Pseudonym| joined.contains(p) && sessions.get(p).is_some_and(|s| s.live(now));
            let Some(drawn) = buffer.waiting.draw(&mut self.rng, fresh, live) else {
                break;
            };
            self.issue_buffered(now, &drawn);
        }
    }

    /// Hands `pseudonym` a task on the current version.
    fn issue_buffered(&mut self, now: Instant, pseudonym: &Pseudonym) {
        let deadline = now + self.config.rounds.deadline();
        let version = self.model.version;
        let Some(buffer) = self.buffer.as_mut() else {
            return;
        };
        buffer.waiting.remove(pseudonym);
        buffer.active.insert(
            *pseudonym,
            Issued {
                round: buffer.number,
                model_version: version,
                deadline,
            },
        );
        buffer.expired.remove(pseudonym);
        buffer.issued += 1;
        self.pool.remove(pseudonym);
        self.hand_task(pseudonym, TaskKind::Train, now);
        self.generation += 1;
    }

    /// The task out for `pseudonym`, if any.
    pub(super) fn buffered_task(&self, pseudonym: &Pseudonym) -> Option<Task> {
        let issued = self.buffer.as_ref()?.active.get(pseudonym)?;
        Some(Task {
            kind: TaskKind::Train,
            round: issued.round,
            model_version: issued.model_version,
            deadline: issued.deadline,
            training: self.config.training,
            evaluate: self.config.rounds.evaluate,
            secure_aggregation: None,
            privacy: None,
            upload_encoding: self.config.upload.encoding,
            user_moment: self.strategy.extra_values() > 0,
            validation: self.trial,
        })
    }

    /// The earliest deadline of a task out, when async training runs.
    pub(super) fn buffer_timeout(&self) -> Option<Option<Instant>> {
        let buffer = self.buffer.as_ref()?;
        Some(buffer.active.next_deadline())
    }

    /// Checks an async update's device, step and version; returns its
    /// staleness discount.
    pub(super) fn check_buffered(&self, header: &UpdateHeader) -> Result<f32, CoordinatorError> {
        let Some(buffer) = &self.buffer else {
            return Ok(1.0);
        };
        if !self.joined.contains(&header.pseudonym) {
            return Err(CoordinatorError::UnknownPseudonym);
        }
        let Some(issued) = buffer.active.get(&header.pseudonym) else {
            return Err(match buffer.expired.get(&header.pseudonym) {
                Some(&round) => CoordinatorError::TaskExpired { round },
                None => CoordinatorError::NotInCohort {
                    round: header.round,
                },
            });
        };
        if header.round != issued.round {
            return Err(CoordinatorError::WrongRound {
                got: header.round,
                open: issued.round,
            });
        }
        if header.model_version != issued.model_version {
            return Err(CoordinatorError::WrongModelVersion {
                got: header.model_version,
                current: issued.model_version,
            });
        }
        let current = self.model.version;
        let staleness = current.saturating_sub(issued.model_version);
        let bound = self.config.rounds.async_max_staleness;
        if staleness > bound {
            return Err(CoordinatorError::TooStale {
                started_from: issued.model_version,
                current,
                bound,
            });
        }
        Ok(staleness_discount(staleness))
    }

    /// Frees the slot of a task whose update was refused as too stale.
    pub(super) fn drop_buffered(&mut self, pseudonym: &Pseudonym) {
        if let Some(buffer) = self.buffer.as_mut() {
            buffer.active.remove(pseudonym);
        }
    }

    /// Counts an accepted async update; `None` outside async training.
    pub(super) fn record_buffered(
        &mut self,
        pseudonym: &Pseudonym,
        counts: Option<&EvalCounts>,
    ) -> Option<UpdateAccepted> {
        let buffer = self.buffer.as_mut()?;
        let issued = buffer.active.remove(pseudonym)?;
        buffer.accepted += 1;
        if let Some(counts) = counts {
            buffer.evaluation.add(counts);
        }
        Some(UpdateAccepted {
            round: issued.round,
            accepted: buffer.accepted,
        })
    }

    /// Tasks out and updates in the step being filled.
    pub(super) fn buffer_status(&self) -> Option<(usize, usize)> {
        self.buffer.as_ref().map(|b| (b.active.len(), b.accepted))
    }
}

#[cfg(test)]
mod tests;
