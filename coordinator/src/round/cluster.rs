//! A replica of a replicated coordinator (`fedrec serve --store`).
//!
//! Several replicas share one store; each keeps its own devices (sessions,
//! the waiting pool, tasks, uploads) in its own core, and none steps the
//! model on its own. Instead:
//!
//! 1. the leader plans each round from every replica's waiting devices
//!    ([`plan_round`]) and the store carries the plan to the replicas;
//! 2. each replica opens its *share* of the round on its own waiting devices
//!    ([`RoundCore::order_share`]): a round like any other, secure
//!    aggregation included, over its sub-cohort;
//! 3. when its share closes (all in, or the deadline) the replica does not
//!    apply it: it keeps its partial sum ([`RoundCore::take_share_sums`]),
//!    which the driver commits to the store;
//! 4. the leader combines every share into the round's mean and steps the
//!    model through the strategy ([`RoundCore::conclude`]), and commits the
//!    outcome;
//! 5. every replica follows the store's committed state
//!    ([`RoundCore::follow`]): the model version, the round counters, the
//!    history, and with them the end of training.
//!
//! Nothing here touches the store: the driver (`fedrec serve --store`)
//! moves orders, sums and committed state between the store and the core.

use std::time::Instant;

use rand::RngExt;

use super::selection::Opening;
use super::*;
use crate::privacy::BudgetExhausted;

/// The leader's order for one replica's share of a round.
#[derive(Clone, Debug, PartialEq)]
pub struct ShareOrder {
    /// The round (the round after the store's last ended one).
    pub round: u32,
    /// Training or evaluation.
    pub kind: TaskKind,
    /// The model version the round works on.
    pub model_version: u64,
    /// Devices to select from those waiting here (fewer if fewer wait).
    pub take: usize,
    /// Accepted submissions that close the share before its deadline.
    pub needed: usize,
    /// When the share closes at the latest.
    pub deadline: Instant,
    /// Under differential privacy (training rounds): the round's privacy,
    /// fixed by the leader. The replica then samples each of its waiting
    /// devices with the round's q instead of taking `take` of them.
    pub privacy: Option<RoundPrivacy>,
}

/// What one replica's devices gave to a round: its partial sum.
#[derive(Clone, Debug, PartialEq)]
pub struct ShareSum {
    /// The round.
    pub round: u32,
    /// The model version the share worked on.
    pub model_version: u64,
    /// Σ weight × update over its accepted updates (under secure
    /// aggregation the unmasked sum of its sub-cohort); zeros when none.
    pub weighted_sum: Vec<f32>,
    /// Σ weight.
    pub weight: f64,
    /// Updates within the clipping bound, under adaptive clipping (noisy
    /// in distributed mode).
    pub within_clip: f64,
    /// Submissions accepted (0 for a share dropped as a whole).
    pub accepted: usize,
    /// Devices selected here.
    pub selected: usize,
    /// The devices' summed evaluation counts.
    pub evaluation: EvalCounts,
}

/// A run's round counters, as a checkpoint and the store hold them (the
/// store's JSON uses these field names).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunCounters {
    /// The last round ended.
    pub last_round: u32,
    /// The last round before the current run.
    pub run_start: u32,
    /// Training rounds ended.
    pub training_rounds: u32,
    /// The final evaluation round has ended.
    pub final_evaluation_done: bool,
    /// Why training stopped early, if it did.
    pub training_stopped: Option<String>,
}

/// The committed state a replica follows.
#[derive(Clone, Debug)]
pub struct Followed {
    /// The current model version.
    pub version: u64,
    /// Its parameters.
    pub params: Vec<f32>,
    /// The server optimizer's moments (empty without one).
    pub m: Vec<f32>,
    /// The server optimizer's second moments (empty without one).
    pub v: Vec<f32>,
    /// The round counters.
    pub counters: RunCounters,
    /// Every ended round, oldest first.
    pub history: Vec<RoundSummary>,
    /// Differential privacy's state: the accountant's ledger (every round
    /// ordered so far) and the clipping bound.
    pub privacy: Option<PrivacyState>,
}

/// One replica's devices, as its heartbeat reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaLoad {
    /// The replica's name.
    pub name: String,
    /// Devices waiting for a task there.
    pub waiting: usize,
    /// Devices joined there.
    pub joined: usize,
}

/// The leader's plan for the next round: each replica's share.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundPlan {
    /// Training or evaluation.
    pub kind: TaskKind,
    /// By replica: devices to select there, and the submissions that
    /// close its share early.
    pub shares: BTreeMap<String, (usize, usize)>,
    /// Under differential privacy (training rounds): the round's privacy,
    /// already counted by the accountant.
    pub privacy: Option<RoundPrivacy>,
}

/// What the leader does next ([`RoundCore::plan_round`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Nothing yet: the next round's start condition does not hold.
    Wait,
    /// Order this round.
    Round(RoundPlan),
    /// Training stopped without a round (the privacy budget is spent):
    /// commit these counters, which every replica then follows.
    Stop(RunCounters),
}

/// A replica's part of the core's state.
#[derive(Debug, Default)]
pub(super) struct Replica {
    /// The order for the next share, until it opens.
    order: Option<ShareOrder>,
    /// Closed shares not yet taken by the driver.
    sums: VecDeque<ShareSum>,
    /// The last round whose share opened here (or that had none here).
    shared: u32,
}

/// Splits `selected` devices over the replicas in proportion to the
/// devices waiting at each (largest remainders), never more than wait
/// there; `needed` is split the same way, at least one per non-empty share.
fn split(
    loads: &[ReplicaLoad],
    selected: usize,
    needed: usize,
) -> BTreeMap<String, (usize, usize)> {
    let waiting: usize = loads.iter().map(|l| l.waiting).sum();
    let mut shares: Vec<(usize, f64)> = loads
        .iter()
        .map(|l| {
            let exact = selected as f64 * l.waiting as f64 / waiting.max(1) as f64;
            (exact.floor() as usize, exact.fract())
        })
        .collect();
    let mut left = selected - shares.iter().map(|s| s.0).sum::<usize>();
    let mut order: Vec<usize> = (0..loads.len()).collect();
    order.sort_by(|a, b| shares[*b].1.total_cmp(&shares[*a].1).then(a.cmp(b)));
    for i in order.into_iter().cycle().take(loads.len() * 2) {
        if left == 0 {
            break;
        }
        if shares[i].0 < loads[i].waiting {
            shares[i].0 += 1;
            left -= 1;
        }
    }
    loads
        .iter()
        .zip(shares)
        .map(|(load, (take, _))| {
            let need = (needed * take).div_ceil(selected.max(1)).min(take);
            (load.name.clone(), (take, need.max(usize::from(take > 0))))
        })
        .collect()
}

impl RoundCore {
    /// Makes this core a replica: it opens rounds only on the leader's
    /// orders and keeps its closed shares' sums instead of applying them.
    pub fn into_replica(mut self) -> Self {
        self.replica = Some(Replica::default());
        self
    }

    /// Whether this core is a replica ([`into_replica`](Self::into_replica)).
    pub fn is_replica(&self) -> bool {
        self.replica.is_some()
    }

    /// The leader's plan for the next round given every live replica's
    /// devices: the same start rules as a single coordinator's, over the
    /// sum of the replicas' waiting devices (`window_start` is when the
    /// leader first saw devices waiting with no round open).
    ///
    /// Under differential privacy a training round is counted by the
    /// accountant here, when it is planned (the driver commits the ledger
    /// with the order, so a round is counted even if its leader dies):
    /// every replica's share is all its waiting devices, each of which the
    /// replica samples with probability q, so every device waiting anywhere
    /// is in the round independently with probability q, as the accountant
    /// assumes. A round the budget refuses stops training instead.
    pub fn plan_round(
        &mut self,
        loads: &[ReplicaLoad],
        window_start: Instant,
        now: Instant,
    ) -> Plan {
        let Some(kind) = self.next_kind().filter(|_| self.finished.is_none()) else {
            return Plan::Wait;
        };
        let r = &self.config.rounds;
        let waiting: usize = loads.iter().map(|l| l.waiting).sum();
        let joined: usize = loads.iter().map(|l| l.joined).sum();
        if waiting == 0 {
            return Plan::Wait;
        }
        let dp = kind == TaskKind::Train && self.privacy.is_some();
        let window_passed = now >= window_start + r.checkin_window();
        let enough_after_window = window_passed && waiting >= r.min_updates;
        // Joins reach the leader only through heartbeats: every device
        // waiting counts once the first waited a moment.
        let everyone_waits = waiting >= joined && now >= window_start + JOIN_SETTLE;
        let over = |n: usize| ((n as f64) * r.over_selection).ceil() as usize;
        let (selected, needed) = match (kind, r.fraction) {
            (TaskKind::Evaluate, _) => {
                if !(everyone_waits || enough_after_window) {
                    return Plan::Wait;
                }
                (waiting, waiting)
            }
            (_, _) if dp => {
                if !((everyone_waits && waiting >= r.min_updates) || enough_after_window) {
                    return Plan::Wait;
                }
                (waiting, waiting)
            }
            (_, Some(fraction)) => {
                if !((everyone_waits && waiting >= r.min_updates) || enough_after_window) {
                    return Plan::Wait;
                }
                let wanted = ((waiting as f64 * fraction).ceil() as usize)
                    .max(r.min_updates)
                    .min(waiting);
                let selected = over(wanted).min(waiting);
                (selected, wanted.min(selected))
            }
            (_, None) => {
                let target = over(r.clients_per_round);
                if !(waiting >= target
                    || enough_after_window
                    || (everyone_waits && waiting >= r.min_updates))
                {
                    return Plan::Wait;
                }
                let selected = target.min(waiting);
                (selected, r.clients_per_round.min(selected))
            }
        };
        let privacy = match self.privacy.as_mut().filter(|_| dp) {
            Some(mechanism) => match mechanism.start_round(waiting) {
                Ok(mut round) => {
                    round.sampling_key = self.rng.random();
                    Some(round)
                }
                Err(BudgetExhausted(reason)) => {
                    tracing::warn!(%reason, "training stopped");
                    self.training_stopped = Some(reason);
                    self.generation += 1;
                    self.finish_if_done();
                    return Plan::Stop(self.counters());
                }
            },
            None => None,
        };
        Plan::Round(RoundPlan {
            kind,
            shares: split(loads, selected, needed),
            privacy,
        })
    }

    /// Takes the leader's order for this replica's share of the next
    /// round; it opens at once on the devices waiting here (or, with none
    /// waiting, closes at once as an empty share). An order for a round
    /// already shared here, or on another model version, is ignored.
    pub fn order_share(&mut self, now: Instant, order: ShareOrder) {
        let version = self.model.version;
        let Some(replica) = self.replica.as_mut() else {
            return;
        };
        if order.round <= replica.shared || order.model_version != version {
            return;
        }
        replica.order = Some(order);
        self.advance(now);
    }

    /// The shares that closed since the last call, for the store.
    pub fn take_share_sums(&mut self) -> Vec<ShareSum> {
        self.replica
            .as_mut()
            .map(|r| r.sums.drain(..).collect())
            .unwrap_or_default()
    }

    /// The round counters.
    pub fn counters(&self) -> RunCounters {
        let checkpoint = self.checkpoint_counters();
        RunCounters {
            last_round: checkpoint.0,
            run_start: self.run_start,
            training_rounds: checkpoint.1,
            final_evaluation_done: self.final_evaluation_done,
            training_stopped: self.training_stopped.clone(),
        }
    }

    /// Opens the ordered share, if one waits (see [`order_share`](Self::order_share)).
    pub(super) fn start_share(&mut self, now: Instant) -> bool {
        let Some(replica) = self.replica.as_mut() else {
            return false;
        };
        let Some(mut order) = replica.order.take() else {
            return false;
        };
        replica.shared = order.round;
        if self.finished.is_some() {
            return false;
        }
        // Under differential privacy a replica takes part only with the
        // privacy it is configured for (its devices' clipping and weights,
        // its sub-cohort minimum), and only when the leader counted its
        // waiting devices (`take`): otherwise its share is empty.
        if order.kind == TaskKind::Train
            && let Some(refused) = self.refuses_privacy(&order)
        {
            tracing::warn!(round = order.round, %refused, "this replica's share left empty");
            order.take = 0;
        }
        let cohort = match &order.privacy {
            Some(_) if order.take == 0 => BTreeMap::new(),
            Some(privacy) => {
                self.sample_keyed(privacy.sampling_rate(), privacy.sampling_key, order.round)
            }
            None => self.sample_pool(order.take.min(self.pool.len())),
        };
        if cohort.is_empty() {
            let sum = ShareSum {
                round: order.round,
                model_version: order.model_version,
                weighted_sum: vec![0.0; self.update_len()],
                weight: 0.0,
                within_clip: 0.0,
                accepted: 0,
                selected: 0,
                evaluation: EvalCounts::default(),
            };
            if let Some(replica) = self.replica.as_mut() {
                replica.sums.push_back(sum);
            }
            self.generation += 1;
            return true;
        }
        let selected = cohort.len();
        let needed = match order.privacy {
            Some(_) => selected,
            None => order.needed.clamp(1, selected),
        };
        let opening = Opening {
            number: order.round,
            kind: order.kind,
            needed,
            deadline: order.deadline,
        };
        self.open_round(opening, cohort, order.privacy, now);
        // A secure sub-cohort of fewer than min_updates devices could never
        // be unmasked (and would hold too little distributed noise): it is
        // dropped at once rather than after its devices trained.
        let min = self.config.rounds.min_updates;
        if secagg::is_secure(order.kind, self.config.secure_aggregation.enabled) && selected < min {
            let reason = format!(
                "this replica's secure sub-cohort has {selected} devices, fewer than \
                 rounds.min_updates = {min}"
            );
            self.close(now, Some(reason));
        }
        true
    }

    /// Why this replica cannot take part in a training round of `order`'s
    /// privacy: it runs without differential privacy and the order has it,
    /// or the other way round, or with other settings (mode, q, noise
    /// multiplier, δ). Replicas of a task must share their `[privacy]`.
    fn refuses_privacy(&self, order: &ShareOrder) -> Option<String> {
        match (&self.privacy, &order.privacy) {
            (None, None) => None,
            (Some(_), None) => Some(
                "the round was ordered without differential privacy, which this replica runs"
                    .to_owned(),
            ),
            (None, Some(_)) => Some(
                "the round was ordered under differential privacy, which this replica does not \
                 run"
                .to_owned(),
            ),
            (Some(mine), Some(theirs)) => {
                let s = &theirs.summary;
                let same = s.mode == mine.mode()
                    && s.sampling_rate == mine.sampling_rate()
                    && s.noise_multiplier == mine.noise_multiplier()
                    && s.delta == mine.delta();
                (!same).then(|| {
                    format!(
                        "the round's privacy ({} mode, q {}, z {}, delta {}) is not this \
                         replica's ({} mode, q {}, z {}, delta {})",
                        s.mode,
                        s.sampling_rate,
                        s.noise_multiplier,
                        s.delta,
                        mine.mode(),
                        mine.sampling_rate(),
                        mine.noise_multiplier(),
                        mine.delta()
                    )
                })
            }
        }
    }

    /// Closes this replica's share of a round: its sum is kept for the
    /// driver, never applied here. A share `abandon`ed (a secure sub-cohort
    /// with too few survivors) is dropped as a whole: it counts no update.
    pub(super) fn close_share(
        &mut self,
        now: Instant,
        mut open: OpenRound,
        abandon: Option<String>,
    ) {
        let totals = match (&abandon, open.secure.as_mut()) {
            (Some(_), _) => None,
            (None, Some(secure)) => secure.totals.take(),
            (None, None) => self.aggregator.totals(),
        };
        if let Some(reason) = &abandon {
            tracing::warn!(round = open.number, %reason, "this replica's share dropped");
        }
        // Evaluation shares sum counts only; a dropped training share
        // counts nothing.
        let accepted = if totals.is_some() || open.kind == TaskKind::Evaluate {
            open.accepted
        } else {
            0
        };
        let (weighted_sum, weight, within_clip) = totals
            .map(|t| (t.weighted_sum, t.weight, t.within_clip))
            .unwrap_or_else(|| (vec![0.0; self.update_len()], 0.0, 0.0));
        let sum = ShareSum {
            round: open.number,
            model_version: open.model_version,
            weighted_sum,
            weight,
            within_clip,
            accepted,
            selected: open.cohort.len(),
            evaluation: open.evaluation,
        };
        if let Some(replica) = self.replica.as_mut() {
            replica.sums.push_back(sum);
        }
        self.aggregator.reset();
        self.sweep(now);
        self.generation += 1;
    }

    /// The leader ends round `round` from every replica's share: the
    /// shares' sums make the round's mean, which the strategy turns into
    /// the next model version (a training round with at least
    /// `rounds.min_updates` updates in all); the round is recorded and the
    /// counters move on, as a single coordinator's `close` does. Under
    /// differential privacy (`privacy`, from the round's order) the
    /// combined sum gets the central noise and is divided by the expected
    /// cohort, and adaptive clipping moves the bound, as in one
    /// coordinator. The driver then commits [`checkpoint`](Self::checkpoint)'s
    /// model, [`privacy_state`](Self::privacy_state) and the summary
    /// returned.
    pub fn conclude(
        &mut self,
        round: u32,
        kind: TaskKind,
        sums: &[ShareSum],
        seconds: f64,
        mut privacy: Option<RoundPrivacy>,
    ) -> RoundSummary {
        let accepted: usize = sums.iter().map(|s| s.accepted).sum();
        let selected: usize = sums.iter().map(|s| s.selected).sum();
        let mut evaluation = EvalCounts::default();
        sums.iter().for_each(|s| evaluation.add(&s.evaluation));
        let min = self.config.rounds.min_updates;
        let abandon = match kind {
            TaskKind::Train if accepted < min => Some(format!(
                "only {accepted} of {selected} selected devices submitted by the deadline, \
                 across {} replicas' shares; {min} required (rounds.min_updates)",
                sums.len()
            )),
            TaskKind::Train if self.privacy.is_some() != privacy.is_some() => Some(
                "the round's order and this leader disagree on differential privacy (replicas \
                 with different [privacy] settings); the model was not changed"
                    .to_owned(),
            ),
            TaskKind::Train => {
                let n = self.update_len();
                let mut total = vec![0.0f64; n];
                let (mut weight, mut within_clip) = (0.0, 0.0);
                for s in sums.iter().filter(|s| s.weighted_sum.len() == n) {
                    total
                        .iter_mut()
                        .zip(&s.weighted_sum)
                        .for_each(|(t, v)| *t += f64::from(*v));
                    weight += s.weight;
                    within_clip += s.within_clip;
                }
                let mean = match (self.privacy.as_mut(), privacy.as_mut()) {
                    (Some(mechanism), Some(round)) => {
                        let sum: Vec<f32> = total.iter().map(|t| *t as f32).collect();
                        Some(mechanism.finish_round(
                            round,
                            NoisySum {
                                sum: &sum,
                                within_clip,
                            },
                        ))
                    }
                    _ => {
                        (weight > 0.0).then(|| total.iter().map(|t| (t / weight) as f32).collect())
                    }
                };
                self.apply_mean(mean, round, accepted)
            }
            _ => {
                self.final_evaluation_done = true;
                None
            }
        };
        self.last_round = self.last_round.max(round);
        if kind == TaskKind::Train {
            self.training_rounds += 1;
        }
        let summary = RoundSummary {
            round,
            kind,
            completed: abandon.is_none(),
            abandon_reason: abandon,
            model_version: self.model.version,
            selected,
            participants: accepted,
            seconds,
            evaluation,
            secure_aggregation: None,
            privacy: privacy.map(|p| Box::new(p.summary)),
        };
        self.history.push(summary.clone());
        self.events.push_back(Event::RoundEnded(summary.clone()));
        self.generation += 1;
        self.finish_if_done();
        summary
    }

    /// Follows the store's committed state: its model version (replacing
    /// this core's model and optimizer moments), counters, history and
    /// differential privacy's state. A share still open here for a round
    /// that has ended is dropped (its devices' late submissions are
    /// refused); an order for it too. Refuses a model of another size, and
    /// a task trained under differential privacy when this replica runs
    /// without it (or the other way round), changing nothing.
    pub fn follow(&mut self, state: Followed) -> Result<(), CoordinatorError> {
        let Followed {
            version,
            params,
            m,
            v,
            counters,
            history,
            privacy,
        } = state;
        if params.len() != self.model.params.len() {
            return Err(CoordinatorError::InvalidModel(format!(
                "the store's model version {version} has {} values, this replica's model {}",
                params.len(),
                self.model.params.len()
            )));
        }
        tensor::check_finite(&params)
            .map_err(|e| CoordinatorError::InvalidModel(format!("store version {version}: {e}")))?;
        let (source, started) = ("the store's task was", counters.training_rounds > 0);
        if let Some(refused) = self.privacy_refusal(privacy.as_ref(), source, started) {
            return Err(refused);
        }
        self.strategy
            .restore_moments(m, v)
            .map_err(CoordinatorError::InvalidModel)?;
        self.set_privacy(privacy);
        self.model = Arc::new(ModelSnapshot::new(
            version,
            self.model.layout.clone(),
            params,
            self.config.download.encoding,
        ));
        for summary in history.iter().skip(self.history.len()) {
            self.events.push_back(Event::RoundEnded(summary.clone()));
        }
        self.history = history;
        let RunCounters {
            last_round,
            run_start,
            training_rounds,
            final_evaluation_done,
            training_stopped,
        } = counters;
        if self.open.as_ref().is_some_and(|o| o.number <= last_round) {
            self.open = None;
            self.aggregator.reset();
        }
        if let Some(replica) = self.replica.as_mut() {
            if replica
                .order
                .as_ref()
                .is_some_and(|o| o.round <= last_round)
            {
                replica.order = None;
            }
            replica.shared = replica.shared.max(last_round);
        }
        self.last_round = self.last_round.max(last_round);
        self.run_start = run_start;
        self.training_rounds = training_rounds;
        self.final_evaluation_done = final_evaluation_done;
        self.training_stopped = training_stopped;
        self.generation += 1;
        self.finish_if_done();
        Ok(())
    }

    /// Admits a device that joined at another replica, whose session has
    /// `remaining` time left there (from the store).
    pub fn admit(&mut self, now: Instant, pseudonym: Pseudonym, remaining: Duration) {
        if self.joined.insert(pseudonym) {
            let expires = now + remaining.min(self.config.auth.session_ttl());
            self.sessions.insert(pseudonym, Session::new(expires));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, waiting: usize) -> ReplicaLoad {
        ReplicaLoad {
            name: name.to_owned(),
            waiting,
            joined: waiting,
        }
    }

    #[test]
    fn a_cohort_is_split_in_proportion_to_the_waiting_devices() {
        let loads = [load("a", 10), load("b", 5), load("c", 0), load("d", 5)];
        let shares = split(&loads, 8, 6);
        let takes: Vec<usize> = shares.values().map(|s| s.0).collect();
        assert_eq!(takes, vec![4, 2, 0, 2]);
        assert_eq!(shares["a"].1, 3);
        assert_eq!(shares["c"], (0, 0));
        // Never more than wait at a replica, all selected when all wait.
        let shares = split(&[load("a", 1), load("b", 7)], 8, 8);
        assert_eq!(shares["a"], (1, 1));
        assert_eq!(shares["b"], (7, 7));
        let shares = split(&[load("a", 1), load("b", 1), load("c", 1)], 2, 2);
        assert_eq!(shares.values().map(|s| s.0).sum::<usize>(), 2);
    }
}
