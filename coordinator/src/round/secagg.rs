//! Secure aggregation inside a training round: [`RoundCore`]'s side of the
//! four SecAgg+ steps, still sans-IO.
//!
//! With `secure_aggregation.enabled`, a training round selects its cohort as
//! usual and gives each device a [`SecureTask`]: its [`PartyId`] for this
//! round (a per-round index; neighbours never learn pseudonyms) and the
//! protocol's configuration. Each device then
//!
//! 1. advertises its keys ([`RoundCore::secagg_advertise`]), then waits for
//!    its roster ([`RoundCore::secagg_poll`] with [`SecureWant::Roster`]),
//!    downloading the model and training meanwhile;
//! 2. shares its keys ([`RoundCore::secagg_share_keys`]) and waits for the
//!    shares addressed to it ([`SecureWant::Shares`]);
//! 3. sends its masked input ([`RoundCore::secagg_masked_input`]) and waits
//!    for its unmask request ([`SecureWant::Unmask`]);
//! 4. reveals the shares asked for ([`RoundCore::secagg_unmask`]).
//!
//! Every message is checked against the caller: the party it names must be
//! the caller's party in this round ([`CoordinatorError::WrongParty`]).
//! Each step closes when every device still in the round has sent its
//! message, or at the step's deadline (`secure_aggregation.step_secs`
//! after the step began; the masked-input step, during which devices train,
//! at the round's deadline), so a silent device cannot stall a round; the
//! masked-input step also closes once `rounds.clients_per_round` inputs
//! arrived (over-selection). The unmasking step closes as soon as every
//! secret to reconstruct has `t` shares.
//!
//! Removing the masks is CPU-heavy (one mask expansion per survivor and per
//! pair with a dropped device), so the core does not do it inside a call:
//! it hands out an [`UnmaskJob`] ([`RoundCore::take_unmask_job`]) for the
//! caller to run where it likes (the gRPC service runs it on a blocking
//! thread) and to give back ([`RoundCore::complete_unmask`]);
//! [`RoundCore::run_unmask_jobs`] runs it in place. The decoded sum then
//! goes to the strategy exactly as the plain mean does. A round whose secure
//! aggregation is abandoned applies nothing, records the reason in its
//! [`RoundSummary`](super::RoundSummary), and the next round starts as usual.

use fedrec_proto::secagg::payload::{self, EXTRA_VALUES};
use fedrec_proto::secagg::{
    Advertisement, MaskedInput, PartyId, Quantizer, Roster, SecAggConfig, SecAggError,
    ShareDelivery, ShareKeys, Step, UnmaskRequest, UnmaskResponse,
};

use super::{CoordinatorError, Duration, Instant, OpenRound, Pseudonym, RoundCore, TaskKind};
use crate::secagg::{SecAggOutput, SecAggRound};

/// A device's part in a round's secure aggregation, sent with its task.
#[derive(Clone, Debug, PartialEq)]
pub struct SecureTask {
    /// The device's id in this round; the only identity its neighbours see.
    pub party: PartyId,
    /// The protocol's configuration (the device checks it).
    pub config: SecAggConfig,
    /// How the device weighs its update.
    pub weighting: payload::Weighting,
}

pub use crate::history::SecureSummary;

/// Which message a device waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecureWant {
    /// Its roster, once step 1 closed.
    Roster,
    /// The shares its neighbours sent it, once step 2 closed.
    Shares,
    /// Its unmask request, once step 3 closed.
    Unmask,
}

impl SecureWant {
    /// The step during which the message is available.
    fn step(self) -> Step {
        match self {
            Self::Roster => Step::ShareKeys,
            Self::Shares => Step::MaskedInput,
            Self::Unmask => Step::Unmask,
        }
    }
}

/// The answer to [`RoundCore::secagg_poll`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum SecurePoll {
    /// Step 1 closed: the device's roster.
    Roster(Roster),
    /// Step 2 closed: the shares addressed to the device.
    Shares(ShareDelivery),
    /// Step 3 closed: what the device must reveal.
    Unmask(UnmaskRequest),
    /// Not yet; polling again after `retry_after` cannot miss a deadline.
    Wait {
        /// Suggested delay before the next poll.
        retry_after: Duration,
    },
    /// The round ended; the device has nothing more to do in it.
    Ended {
        /// Whether the round completed (its sum was applied).
        completed: bool,
        /// Why it was abandoned, if it was.
        reason: Option<String>,
    },
}

/// What the coordinator learned from a round's secure aggregation: the
/// wrapping `u32` sum of the survivors' quantized inputs (update, weight,
/// evaluation counts; see `fedrec_proto::secagg::payload`), and who they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecureSum {
    /// The round.
    pub round: u32,
    /// The sum, `num_values + EXTRA_VALUES` values.
    pub sum: Vec<u32>,
    /// The survivors' parties, sorted.
    pub survivors: Vec<PartyId>,
}

/// The unmasking of a round, to run off the caller's critical section.
#[derive(Debug)]
pub struct UnmaskJob {
    round: u32,
    agg: Box<SecAggRound>,
}

impl UnmaskJob {
    /// The round.
    pub fn round(&self) -> u32 {
        self.round
    }

    /// Reconstructs the secrets and removes every mask (CPU-heavy, no I/O).
    pub fn run(mut self) -> UnmaskDone {
        let result = self.agg.finish();
        UnmaskDone {
            round: self.round,
            result,
        }
    }
}

/// A finished [`UnmaskJob`], for [`RoundCore::complete_unmask`].
#[derive(Debug)]
pub struct UnmaskDone {
    round: u32,
    result: Result<SecAggOutput, SecAggError>,
}

/// The secure aggregation state of an open training round.
#[derive(Debug)]
pub(super) struct SecureRound {
    /// The protocol's state; `None` once the unmasking job was created.
    agg: Option<Box<SecAggRound>>,
    /// The job, until [`RoundCore::take_unmask_job`] takes it.
    job: Option<UnmaskJob>,
    /// Every cohort member's party.
    parties: std::collections::BTreeMap<Pseudonym, PartyId>,
    config: SecAggConfig,
    quantizer: Quantizer,
    weighting: payload::Weighting,
    /// When the current step closes at the latest.
    step_deadline: Instant,
    summary: SecureSummary,
    /// The decoded totals, once unmasked.
    pub(super) totals: Option<payload::Totals>,
}

impl SecureRound {
    /// The secure aggregation of round `number` for `cohort`.
    pub(super) fn new(
        core: &mut RoundCore,
        number: u32,
        cohort: impl Iterator<Item = Pseudonym>,
        now: Instant,
    ) -> Self {
        let sa = &core.config.secure_aggregation;
        let config = sa.protocol();
        let weighting = sa.weighting(core.config.strategy.weighting);
        let step_deadline = now + sa.step();
        let num_values = core.update_len() + EXTRA_VALUES;
        // The configuration was validated before `RoundCore::new` and
        // `num_values` is at least EXTRA_VALUES > 0: the only two ways
        // `SecAggRound::new` can fail.
        let agg = SecAggRound::new(
            config.clone(),
            number.into(),
            num_values,
            &mut core.secure_rng,
        )
        .expect("validated configuration and a non-empty input");
        let quantizer = config
            .quantizer()
            .expect("validated secure aggregation configuration");
        let parties: std::collections::BTreeMap<Pseudonym, PartyId> = cohort
            .enumerate()
            .map(|(i, p)| (p, PartyId(i as u64)))
            .collect();
        Self {
            agg: Some(Box::new(agg)),
            job: None,
            summary: SecureSummary {
                selected: parties.len(),
                ..SecureSummary::default()
            },
            parties,
            config,
            quantizer,
            weighting,
            step_deadline,
            totals: None,
        }
    }

    /// The task part of the device `pseudonym`.
    pub(super) fn task(&self, pseudonym: &Pseudonym) -> Option<SecureTask> {
        Some(SecureTask {
            party: *self.parties.get(pseudonym)?,
            config: self.config.clone(),
            weighting: self.weighting,
        })
    }

    /// When the core must act by itself: the step's deadline, unless the
    /// unmasking job is out (then only its completion changes anything).
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.agg.as_ref().map(|_| self.step_deadline)
    }

    /// Messages accepted in the current step.
    pub(super) fn received(&self) -> usize {
        self.agg.as_ref().map_or(0, |a| a.received())
    }

    /// The summary so far.
    pub(super) fn summary(&self) -> SecureSummary {
        self.summary.clone()
    }
}

/// The outcome of looking at the open secure round in `advance`.
enum Progress {
    /// Nothing due.
    Idle,
    /// A step closed; look again.
    Stepped,
    /// The round must close with this abandonment reason.
    Abandon(String),
}

impl RoundCore {
    /// The open round's secure aggregation and the caller's party, after
    /// checking that `pseudonym` may send a secure aggregation message for
    /// `round` now.
    fn secure_caller(
        &self,
        pseudonym: &Pseudonym,
        round: u32,
    ) -> Result<(&OpenRound, PartyId), CoordinatorError> {
        let open = self.open_round_for(pseudonym, round)?;
        let Some(secure) = &open.secure else {
            return Err(CoordinatorError::NotSecureRound { round });
        };
        let party = *secure
            .parties
            .get(pseudonym)
            .ok_or(CoordinatorError::NotInCohort { round })?;
        Ok((open, party))
    }

    /// Like [`secure_caller`](Self::secure_caller), and checks that the
    /// message's claimed sender is the caller's party.
    fn secure_sender(
        &self,
        pseudonym: &Pseudonym,
        round: u32,
        claimed: PartyId,
    ) -> Result<PartyId, CoordinatorError> {
        let (_, caller) = self.secure_caller(pseudonym, round)?;
        if claimed != caller {
            return Err(CoordinatorError::WrongParty { claimed, caller });
        }
        Ok(caller)
    }

    /// The open round's protocol state, for a message of step `message`.
    fn secure_agg(&mut self, message: Step) -> Result<&mut SecAggRound, CoordinatorError> {
        let secure = self
            .open
            .as_mut()
            .and_then(|o| o.secure.as_mut())
            .ok_or_else(|| CoordinatorError::Internal("no secure round is open".into()))?;
        match secure.agg.as_deref_mut() {
            Some(agg) => Ok(agg),
            None => Err(SecAggError::WrongStep {
                message,
                current: Step::Unmask,
            }
            .into()),
        }
    }

    /// Runs `f` on the open secure round after the caller checks, counts a
    /// rejection, and advances the state machine.
    fn secure_call<R>(
        &mut self,
        now: Instant,
        f: impl FnOnce(&mut Self) -> Result<R, CoordinatorError>,
    ) -> Result<R, CoordinatorError> {
        self.advance(now);
        let result = f(self).map_err(|e| self.reject(e));
        self.advance(now);
        result
    }

    /// Step 1: a device's advertisement. It must name the caller's party.
    pub fn secagg_advertise(
        &mut self,
        now: Instant,
        pseudonym: &Pseudonym,
        round: u32,
        advertisement: Advertisement,
    ) -> Result<(), CoordinatorError> {
        self.secure_call(now, |core| {
            core.secure_sender(pseudonym, round, advertisement.party)?;
            core.secure_agg(Step::Advertise)?
                .handle_advertisement(advertisement)?;
            // The task is taken: a later check-in waits for the next round.
            if let Some(open) = core.open.as_mut() {
                open.cohort.insert(*pseudonym, true);
            }
            Ok(())
        })
    }

    /// Step 2: a device's encrypted shares, to route to its neighbours.
    pub fn secagg_share_keys(
        &mut self,
        now: Instant,
        pseudonym: &Pseudonym,
        round: u32,
        message: ShareKeys,
    ) -> Result<(), CoordinatorError> {
        self.secure_call(now, |core| {
            core.secure_sender(pseudonym, round, message.sender)?;
            Ok(core
                .secure_agg(Step::ShareKeys)?
                .handle_share_keys(message)?)
        })
    }

    /// Checks the header of a masked input before its values are received,
    /// so that a transport can refuse it early. Returns the step's
    /// deadline. Rejections are counted.
    pub fn check_masked_header(
        &mut self,
        now: Instant,
        pseudonym: &Pseudonym,
        round: u32,
        model_version: u64,
        sender: PartyId,
        num_values: u64,
    ) -> Result<Instant, CoordinatorError> {
        self.secure_call(now, |core| {
            core.secure_sender(pseudonym, round, sender)?;
            core.check_masked(model_version, num_values)?;
            let secure = core.open.as_ref().and_then(|o| o.secure.as_ref());
            Ok(secure.map_or(now, |s| s.step_deadline))
        })
    }

    fn check_masked(
        &mut self,
        model_version: u64,
        num_values: u64,
    ) -> Result<(), CoordinatorError> {
        let expected = self.update_len() + EXTRA_VALUES;
        let open = self
            .open
            .as_ref()
            .ok_or_else(|| CoordinatorError::Internal("no round is open".into()))?;
        if model_version != open.model_version {
            return Err(CoordinatorError::WrongModelVersion {
                got: model_version,
                current: open.model_version,
            });
        }
        let step = self.secure_agg(Step::MaskedInput)?.step();
        if step != Step::MaskedInput {
            return Err(SecAggError::WrongStep {
                message: Step::MaskedInput,
                current: step,
            }
            .into());
        }
        if num_values != expected as u64 {
            return Err(SecAggError::WrongLength {
                expected,
                got: usize::try_from(num_values).unwrap_or(usize::MAX),
            }
            .into());
        }
        Ok(())
    }

    /// Step 3: a device's masked input (its update plus masks, `num_values +
    /// EXTRA_VALUES` values), added into the round's running sum.
    pub fn secagg_masked_input(
        &mut self,
        now: Instant,
        pseudonym: &Pseudonym,
        round: u32,
        model_version: u64,
        input: &MaskedInput,
    ) -> Result<(), CoordinatorError> {
        self.secure_call(now, |core| {
            core.secure_sender(pseudonym, round, input.sender)?;
            core.check_masked(model_version, input.values.len() as u64)?;
            Ok(core
                .secure_agg(Step::MaskedInput)?
                .handle_masked_input(input)?)
        })
    }

    /// Step 4: a survivor's revealed shares.
    pub fn secagg_unmask(
        &mut self,
        now: Instant,
        pseudonym: &Pseudonym,
        round: u32,
        response: UnmaskResponse,
    ) -> Result<(), CoordinatorError> {
        self.secure_call(now, |core| {
            core.secure_sender(pseudonym, round, response.sender)?;
            Ok(core
                .secure_agg(Step::Unmask)?
                .handle_unmask_response(response)?)
        })
    }

    /// The next message for `pseudonym` in `round`: what it `want`s once the
    /// step before closed, [`SecurePoll::Wait`] until then, or
    /// [`SecurePoll::Ended`] once the round ended. A device the round went
    /// on without (it missed a step, or was dropped) gets an error.
    pub fn secagg_poll(
        &mut self,
        now: Instant,
        pseudonym: &Pseudonym,
        round: u32,
        want: SecureWant,
    ) -> Result<SecurePoll, CoordinatorError> {
        self.advance(now);
        let result = self.poll_secure(now, pseudonym, round, want);
        result.map_err(|e| self.reject(e))
    }

    fn poll_secure(
        &self,
        now: Instant,
        pseudonym: &Pseudonym,
        round: u32,
        want: SecureWant,
    ) -> Result<SecurePoll, CoordinatorError> {
        if !self.joined.contains(pseudonym) {
            return Err(CoordinatorError::UnknownPseudonym);
        }
        let ended = |summary: &super::RoundSummary| SecurePoll::Ended {
            completed: summary.completed,
            reason: summary.abandon_reason.clone(),
        };
        let open = match &self.open {
            Some(open) if open.number == round => open,
            _ if round >= 1 && round <= self.last_round => {
                return self
                    .history
                    .iter()
                    .rev()
                    .find(|s| s.round == round)
                    .map(ended)
                    .ok_or(CoordinatorError::RoundClosed { round });
            }
            _ => return Err(CoordinatorError::NoRoundOpen { round }),
        };
        let (_, party) = self.secure_caller(pseudonym, round)?;
        let Some(secure) = &open.secure else {
            return Err(CoordinatorError::NotSecureRound { round });
        };
        let long_poll =
            Duration::try_from_secs_f64(self.config.server.long_poll_secs).unwrap_or(Duration::MAX);
        let wait = |deadline: Instant| SecurePoll::Wait {
            retry_after: deadline.saturating_duration_since(now).min(long_poll),
        };
        let Some(agg) = &secure.agg else {
            // Unmasking: nothing more to send; the end comes with the result.
            return Ok(wait(now + long_poll));
        };
        let step = agg.step();
        let wanted = want.step();
        if step < wanted {
            return Ok(wait(secure.step_deadline));
        }
        if step > wanted {
            return Err(SecAggError::WrongStep {
                message: wanted,
                current: step,
            }
            .into());
        }
        Ok(match want {
            SecureWant::Roster => SecurePoll::Roster(agg.roster_for(party)?),
            SecureWant::Shares => SecurePoll::Shares(agg.shares_for(party)?),
            SecureWant::Unmask => SecurePoll::Unmask(agg.unmask_request_for(party)?),
        })
    }

    /// The unmasking of the open round, once its last step closed with every
    /// share needed. Run it ([`UnmaskJob::run`]) and hand the result to
    /// [`complete_unmask`](Self::complete_unmask); until then the round
    /// waits (no deadline applies).
    pub fn take_unmask_job(&mut self) -> Option<UnmaskJob> {
        self.open.as_mut()?.secure.as_mut()?.job.take()
    }

    /// Applies a finished unmasking: the decoded mean goes to the strategy
    /// (or the round is abandoned with the reason), and the round ends.
    /// A result for another round than the open one is ignored.
    pub fn complete_unmask(&mut self, now: Instant, done: UnmaskDone) {
        let waiting = self.open.as_ref().is_some_and(|o| {
            o.number == done.round
                && o.secure
                    .as_ref()
                    .is_some_and(|s| s.agg.is_none() && s.job.is_none())
        });
        if !waiting {
            tracing::warn!(
                round = done.round,
                "unmasking result for a round not waiting for it"
            );
            return;
        }
        let abandon = match done.result {
            Ok(output) => self.apply_secure_output(done.round, output).err(),
            Err(e) => Some(abandon_text(&e)),
        };
        if let Some(secure) = self.open.as_mut().and_then(|o| o.secure.as_mut())
            && abandon.is_some()
        {
            secure.summary.abandoned_at = Some(Step::Unmask.to_string());
        }
        self.close(now, abandon);
        self.advance(now);
    }

    /// Abandons the open round whose unmasking job was lost (the task
    /// running it failed), with `reason`. Ignored for another round.
    pub fn fail_unmask(&mut self, now: Instant, round: u32, reason: String) {
        let waiting = self.open.as_ref().is_some_and(|o| {
            o.number == round && o.secure.as_ref().is_some_and(|s| s.agg.is_none())
        });
        if waiting {
            self.close(now, Some(reason));
            self.advance(now);
        }
    }

    /// Runs every pending unmasking job in place (for in-process callers).
    pub fn run_unmask_jobs(&mut self, now: Instant) {
        while let Some(job) = self.take_unmask_job() {
            let done = job.run();
            self.complete_unmask(now, done);
        }
    }

    /// Heap bytes held by the open round's secure aggregation state
    /// ([`SecAggRound::held_bytes`]), if one is open.
    pub fn secure_state_bytes(&self) -> Option<usize> {
        let secure = self.open.as_ref()?.secure.as_ref()?;
        let agg = secure
            .agg
            .as_deref()
            .or(secure.job.as_ref().map(|j| &*j.agg))?;
        Some(agg.held_bytes())
    }

    /// The sum of the last round whose secure aggregation completed: all the
    /// coordinator learned from it (kept for audits and tests).
    pub fn last_secure_sum(&self) -> Option<&SecureSum> {
        self.last_secure_sum.as_ref()
    }

    /// Decodes the sum into the mean update and the evaluation counts.
    fn apply_secure_output(&mut self, round: u32, output: SecAggOutput) -> Result<(), String> {
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| "no round is open".to_owned())?;
        let secure = open
            .secure
            .as_mut()
            .ok_or_else(|| "the round has no secure aggregation".to_owned())?;
        let count = output.count();
        let decoded = output
            .decode(&secure.quantizer)
            .map_err(|e| format!("secure aggregation: cannot decode the sum: {e}"))?;
        let totals = payload::decode(&decoded, count, secure.weighting, secure.quantizer.range())
            .map_err(|e| format!("secure aggregation: {e}"))?;
        secure.summary.survivors = count;
        open.evaluation.add(&totals.counts);
        secure.totals = Some(totals);
        open.accepted = count;
        self.last_secure_sum = Some(SecureSum {
            round,
            sum: output.sum,
            survivors: output.survivors,
        });
        Ok(())
    }

    /// Closes what is due in the open secure round. Returns whether
    /// anything changed (`advance` then looks again).
    pub(super) fn advance_secure(&mut self, now: Instant) -> bool {
        match self.step_secure(now) {
            Progress::Idle => false,
            Progress::Stepped => {
                self.generation += 1;
                true
            }
            Progress::Abandon(reason) => {
                self.close(now, Some(reason));
                true
            }
        }
    }

    fn step_secure(&mut self, now: Instant) -> Progress {
        let min_updates = self.config.rounds.min_updates;
        let step_length = self.config.secure_aggregation.step();
        let Some(open) = self.open.as_mut() else {
            return Progress::Idle;
        };
        let (round_deadline, needed, selected) = (open.deadline, open.needed, open.cohort.len());
        let Some(secure) = open.secure.as_mut() else {
            return Progress::Idle;
        };
        let Some(agg) = secure.agg.as_deref_mut() else {
            return Progress::Idle;
        };
        let due = now >= secure.step_deadline;
        let step = agg.step();
        let received = agg.received();
        let all_in = agg.expected().is_some_and(|e| received >= e);
        let result = match step {
            Step::Advertise => {
                if !(due || received >= selected) {
                    return Progress::Idle;
                }
                agg.close_advertisements().map(|parties| {
                    secure.summary.advertised = parties.len();
                    if let Some(p) = agg.params() {
                        secure.summary.neighbours = p.neighbours;
                        secure.summary.threshold = p.threshold;
                    }
                    secure.step_deadline = now + step_length;
                })
            }
            Step::ShareKeys => {
                if !(due || all_in) {
                    return Progress::Idle;
                }
                agg.close_share_keys().map(|kept| {
                    secure.summary.shared = kept.len();
                    // Devices train during the next step: it ends at the
                    // round's deadline, and lasts at least one step length.
                    secure.step_deadline = round_deadline.max(now + step_length);
                })
            }
            Step::MaskedInput => {
                if !(due || all_in || received >= needed) {
                    return Progress::Idle;
                }
                if received < min_updates {
                    secure.summary.abandoned_at = Some(step.to_string());
                    return Progress::Abandon(format!(
                        "secure aggregation: only {received} of {} devices sent their masked \
                         input by the deadline; {min_updates} required (rounds.min_updates)",
                        secure.summary.shared
                    ));
                }
                agg.close_masked_inputs().map(|survivors| {
                    secure.summary.survivors = survivors.len();
                    secure.step_deadline = now + step_length;
                })
            }
            Step::Unmask => {
                let ready = agg.ready();
                if !(due || all_in || ready) {
                    return Progress::Idle;
                }
                secure.summary.responded = received;
                if ready {
                    // Every secret has its shares: unmask off the critical path.
                    let agg = secure.agg.take().expect("checked above");
                    secure.job = Some(UnmaskJob {
                        round: open.number,
                        agg,
                    });
                    return Progress::Stepped;
                }
                // Not ready: `finish` abandons at once, before any heavy work.
                agg.finish().map(|_| ())
            }
            _ => return Progress::Idle,
        };
        match result {
            Ok(()) => Progress::Stepped,
            Err(e) => {
                secure.summary.abandoned_at = Some(step.to_string());
                Progress::Abandon(abandon_text(&e))
            }
        }
    }
}

/// The round summary's reason for a failed secure aggregation.
fn abandon_text(err: &SecAggError) -> String {
    match err {
        SecAggError::Abandoned(reason) => format!("secure aggregation abandoned: {reason}"),
        other => format!("secure aggregation abandoned: {other}"),
    }
}

/// `Task` kinds that run secure aggregation.
pub(super) fn is_secure(kind: TaskKind, enabled: bool) -> bool {
    enabled && kind == TaskKind::Train
}

#[cfg(test)]
mod tests;
