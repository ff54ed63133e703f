//! `--preset auto`: the ALS recipe's settings chosen by federated
//! evaluation on the devices' validation events, with no setting chosen by
//! hand.
//!
//! Every trial is a federated run on the validation cut of the first track
//! (discover): the devices train on their purchases before their
//! validation event and, in the final evaluation round, report only counts
//! (hits and NDCG sums) for that event. The coordinator ranks the trials by
//! the summed NDCG@10 (ties: HR@10, then the earlier trial).
//!
//! The search is successive halving (Jamieson & Talwalkar 2016; the
//! resource is rounds): every setting of the `[search]` space
//! ([`SearchConfig`], the same for `fedrec serve`'s `[model] preset =
//! "auto"`) trains [`STAGE_ROUNDS`]`[0]` of `search.rounds`; the best third
//! goes on to the next stage with more rounds, and so on. [`Halving`] is
//! that schedule; this module's [`search`] runs it in a simulation, and
//! `fedrec serve` runs it against real devices. Each trial runs its own cosine
//! schedule to its own end, so a short trial is a complete (short)
//! training, not the start of a long one, and the number of rounds is part
//! of what is chosen: the best trial of any stage (setting and rounds) is
//! trained on the test cut. (On MovieLens-100K more rounds overfit: the
//! validation NDCG@10 of the best setting fell from 0.074 at 5 rounds to
//! 0.067 at 20.)
//!
//! On catalogues up to [`fedrec_client::ease::MAX_ITEMS`] items the search
//! also tries federated EASE ([`super::ease_recipe`]: one round in which
//! every device sends its co-purchases) at each λ of
//! [`crate::baselines::EASE_GRID`] (when `search.ease`), and chooses between the two models on
//! the same validation events.
//!
//! Not searched, with the reason: the step. The `als` server step at
//! `server_lr` 1 is the exact item step of ALS for items nobody in the
//! cohort bought (see [`super::als_recipe`]); the rounds and the cosine
//! schedule set how far it moves.

use std::collections::VecDeque;

use fedrec_coordinator::config::SearchConfig;
use serde::{Deserialize, Serialize};

use super::{Observer, RunKind, SimConfig, run_cut};
use crate::data::{Protocol, Stage};
use crate::eval::Metrics;

/// Rounds of each stage, as fractions of `search.rounds` (at least
/// [`MIN_STAGE_ROUNDS`]); each stage keeps the best third.
pub const STAGE_ROUNDS: [f64; 3] = [0.125, 0.25, 0.5];

/// Fewest rounds a trial trains.
pub const MIN_STAGE_ROUNDS: u32 = 2;

/// The model a trial trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchModel {
    /// Matrix factorization by the ALS recipe.
    Als,
    /// Federated EASE (one round of co-purchases).
    Ease,
}

/// What one trial trains.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrialSettings {
    /// The stage (0 first; EASE trials come after the ALS stages).
    pub stage: usize,
    /// ALS or EASE.
    pub model: SearchModel,
    /// ALS: latent factors (0 for EASE).
    pub factors: usize,
    /// ALS: confidence (0 for EASE).
    pub confidence: f32,
    /// ALS: regularization; EASE: its λ.
    pub regularization: f32,
    /// Rounds trained.
    pub rounds: u32,
}

impl TrialSettings {
    /// Sets `cfg` to train these settings: for ALS its factors,
    /// confidence, regularization and rounds; for EASE the sections
    /// [`super::ease_recipe`] sets (training, strategy, model, the cohort
    /// and one round, secure aggregation's range). Everything else (the
    /// server, sessions, deadlines, seeds) stays as it is.
    pub fn apply(&self, cfg: &mut fedrec_coordinator::config::CoordinatorConfig) {
        if self.model == SearchModel::Ease {
            let ease = super::ease_recipe(self.regularization);
            cfg.training = ease.training;
            cfg.strategy = ease.strategy;
            cfg.model.factors = ease.model.factors;
            cfg.model.init_std = ease.model.init_std;
            cfg.rounds.rounds = ease.rounds.rounds;
            cfg.rounds.clients_per_round = ease.rounds.clients_per_round;
            cfg.secure_aggregation.range = ease.secure_aggregation.range;
            cfg.secure_aggregation.bits = ease.secure_aggregation.bits;
        } else {
            cfg.model.factors = self.factors;
            cfg.training.confidence = self.confidence;
            cfg.training.regularization = self.regularization;
            cfg.rounds.rounds = self.rounds;
        }
    }
}

/// In words, as the progress lines and `fedrec serve` print it.
impl std::fmt::Display for TrialSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.model {
            SearchModel::Ease => write!(f, "federated EASE, lambda {}", self.regularization),
            SearchModel::Als => write!(
                f,
                "ALS, {} factors, confidence {}, regularization {}, {} rounds",
                self.factors, self.confidence, self.regularization, self.rounds
            ),
        }
    }
}

/// One trial of the search.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trial {
    /// What it trained.
    #[serde(flatten)]
    pub settings: TrialSettings,
    /// The devices' evaluation of the trial's model on their validation
    /// events.
    pub validation: Metrics,
    /// Devices that took part, summed over the trial's rounds.
    pub device_rounds: usize,
}

/// The search in the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SearchReport {
    /// What was searched, and the budget.
    pub space: SearchConfig,
    /// Rounds per stage.
    pub stage_rounds: Vec<u32>,
    /// Every trial, in the order run.
    pub trials: Vec<Trial>,
    /// The setting and rounds chosen (the best trial of any stage).
    pub chosen: Trial,
    /// Devices that took part in all trials together (the search's cost, in
    /// device tasks; the final run's rounds are not included).
    pub device_rounds: usize,
    /// Wall-clock seconds of the search.
    pub seconds: f64,
}

/// Successive halving over a [`SearchConfig`]: which trial comes next,
/// given the validation figures of those run so far.
#[derive(Clone, Debug)]
pub struct Halving {
    space: SearchConfig,
    stage_rounds: Vec<u32>,
    /// The current stage's trials not run yet, in order.
    pending: VecDeque<TrialSettings>,
    /// The current stage's trials run so far.
    stage_trials: Vec<Trial>,
    /// EASE's λ still to try once the ALS stages are done.
    ease: VecDeque<f32>,
    trials: Vec<Trial>,
}

impl Halving {
    /// The schedule of `space`, then federated EASE at each of
    /// `ease_lambdas` (none: EASE is not tried).
    pub fn new(space: &SearchConfig, ease_lambdas: &[f32]) -> Self {
        let stage_rounds: Vec<u32> = STAGE_ROUNDS
            .iter()
            .map(|x| ((f64::from(space.rounds) * x).ceil() as u32).max(MIN_STAGE_ROUNDS))
            .collect();
        let mut pending = VecDeque::new();
        for &factors in &space.factors {
            for &confidence in &space.confidence {
                for &regularization in &space.regularization {
                    pending.push_back(TrialSettings {
                        stage: 0,
                        model: SearchModel::Als,
                        factors,
                        confidence,
                        regularization,
                        rounds: stage_rounds[0],
                    });
                }
            }
        }
        Self {
            space: space.clone(),
            stage_rounds,
            pending,
            stage_trials: Vec::new(),
            ease: ease_lambdas.iter().copied().collect(),
            trials: Vec::new(),
        }
    }

    /// Trials the whole search runs: every setting at the first stage, a
    /// third (rounded up) at each next one, and the EASE trials.
    pub fn planned_trials(&self) -> usize {
        let mut n = self.space.factors.len()
            * self.space.confidence.len()
            * self.space.regularization.len();
        let mut total = 0;
        for _ in &self.stage_rounds {
            total += n;
            n = n.div_ceil(3).max(1);
        }
        total + self.ease.len()
    }

    /// Rounds per stage.
    pub fn stage_rounds(&self) -> &[u32] {
        &self.stage_rounds
    }

    /// The trials known before any has run: every setting of the first
    /// stage, and the EASE trials.
    pub fn candidates(&self) -> Vec<TrialSettings> {
        let ease = self.ease.iter().map(|&lambda| self.ease_trial(lambda));
        self.pending.iter().copied().chain(ease).collect()
    }

    /// The next trial to run, or `None` when the search is done.
    pub fn next(&self) -> Option<TrialSettings> {
        if let Some(settings) = self.pending.front() {
            return Some(*settings);
        }
        self.ease.front().map(|&lambda| self.ease_trial(lambda))
    }

    /// Federated EASE at `lambda`, after the ALS stages.
    fn ease_trial(&self, lambda: f32) -> TrialSettings {
        TrialSettings {
            stage: self.stage_rounds.len(),
            model: SearchModel::Ease,
            factors: 0,
            confidence: 0.0,
            regularization: lambda,
            rounds: 1,
        }
    }

    /// Records the result of the trial [`next`](Self::next) gave; a stage's
    /// last trial keeps the best third for the next stage.
    pub fn record(&mut self, validation: Metrics, device_rounds: usize) {
        let Some(settings) = self.next() else {
            return;
        };
        let trial = Trial {
            settings,
            validation,
            device_rounds,
        };
        if self.pending.pop_front().is_none() {
            self.ease.pop_front();
            self.trials.push(trial);
            return;
        }
        self.stage_trials.push(trial);
        if !self.pending.is_empty() {
            return;
        }
        // Best first; a stable sort keeps the earlier trial first on ties.
        let mut results = std::mem::take(&mut self.stage_trials);
        results.sort_by(|a, b| better(b, a));
        let stage = settings.stage + 1;
        if let Some(&rounds) = self.stage_rounds.get(stage) {
            let keep = results.len().div_ceil(3).max(1);
            self.pending = results[..keep]
                .iter()
                .map(|t| TrialSettings {
                    stage,
                    rounds,
                    ..t.settings
                })
                .collect();
        }
        self.trials.extend(results);
    }

    /// The search's report, once [`next`](Self::next) gives nothing more;
    /// `seconds` is how long it took.
    ///
    /// # Errors
    /// When no trial ran.
    pub fn finish(&self, seconds: f64) -> anyhow::Result<SearchReport> {
        let chosen = self
            .trials
            .iter()
            .fold(None::<&Trial>, |best, t| match best {
                Some(b) if better(b, t) != std::cmp::Ordering::Less => Some(b),
                _ => Some(t),
            })
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("the search ran no trial"))?;
        Ok(SearchReport {
            space: self.space.clone(),
            stage_rounds: self.stage_rounds.clone(),
            device_rounds: self.trials.iter().map(|t| t.device_rounds).sum(),
            trials: self.trials.clone(),
            chosen,
            seconds,
        })
    }
}

/// The λ of federated EASE the search tries on a catalogue of `items`:
/// [`crate::baselines::EASE_GRID`] when `space.ease` and the catalogue is
/// small enough for its item-item model, else none.
pub fn ease_lambdas(space: &SearchConfig, items: usize) -> &'static [f32] {
    if space.ease && items <= fedrec_client::ease::MAX_ITEMS {
        &crate::baselines::EASE_GRID
    } else {
        &[]
    }
}

/// Runs the search on `protocol`'s first track's validation cut with `cfg`
/// (whose coordinator is the ALS recipe; its `[search]` is the space) and
/// returns it; the caller trains the chosen setting.
///
/// # Errors
/// Under differential privacy (every trial would have to be counted in ε,
/// which the accountant does not do: refused rather than understated), or
/// when the data have no validation event.
pub fn search(
    protocol: &Protocol,
    cfg: &SimConfig,
    observer: &mut dyn Observer,
) -> anyhow::Result<SearchReport> {
    anyhow::ensure!(
        !cfg.coordinator.privacy.enabled(),
        "--preset auto is refused under differential privacy: its trials would each spend \
         privacy budget, and the accountant counts only the final run; choose the settings \
         by hand (e.g. --preset movielens)"
    );
    let start = std::time::Instant::now();
    let first = protocol
        .training_tracks()
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no track to search on"))?;
    let ev = protocol
        .evaluation(first, Stage::Validation)
        .filter(|e| e.n_users() > 0)
        .ok_or_else(|| anyhow::anyhow!("no validation event to choose settings on"))?;
    let space = &cfg.coordinator.search;
    let mut halving = Halving::new(space, ease_lambdas(space, protocol.n_items()));
    let planned = halving.planned_trials();
    let mut done = 0;
    while let Some(t) = halving.next() {
        let mut trial_cfg = cfg.clone();
        t.apply(&mut trial_cfg.coordinator);
        done += 1;
        observer.phase(&format!("auto: trial {done} of {planned}: {t}"));
        let run = run_cut(protocol, ev, &[], &trial_cfg, observer, RunKind::Trial)?;
        halving.record(
            run.federated.first().map(|(_, m)| *m).unwrap_or_default(),
            run.rounds.iter().map(|r| r.participants).sum(),
        );
    }
    halving.finish(start.elapsed().as_secs_f64())
}

/// Orders trials by validation NDCG@10, then HR@10.
fn better(a: &Trial, b: &Trial) -> std::cmp::Ordering {
    let key = |t: &Trial| (t.validation.full.ndcg_at_10, t.validation.full.hr_at_10);
    key(a)
        .partial_cmp(&key(b))
        .unwrap_or(std::cmp::Ordering::Equal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::Ranking;

    fn scored(ndcg: f64) -> Metrics {
        Metrics {
            full: Ranking {
                hr_at_10: ndcg * 2.0,
                ndcg_at_10: ndcg,
            },
            ..Metrics::default()
        }
    }

    /// Every setting at the first stage, the best third at each next one
    /// with more rounds, then EASE; the best trial of any stage is chosen.
    #[test]
    fn halving_keeps_the_best_third_and_chooses_the_best_trial() {
        let space = SearchConfig {
            rounds: 16,
            factors: vec![8, 16, 32],
            confidence: vec![2.0, 5.0],
            regularization: vec![0.1],
            ease: true,
        };
        let mut halving = Halving::new(&space, &[100.0]);
        assert_eq!(halving.stage_rounds(), &[2, 4, 8]);
        // 6 settings, then 2, then 1, then one EASE trial.
        let planned = halving.planned_trials();
        assert_eq!(planned, 10);
        let mut ran = Vec::new();
        while let Some(t) = halving.next() {
            // Validation favours 32 factors at confidence 5, more so with
            // more rounds; EASE scores below the best ALS trial.
            let score = match t.model {
                SearchModel::Ease => 0.01,
                _ => {
                    t.factors as f64 / 1000.0 * t.confidence as f64 / 5.0
                        + f64::from(t.rounds) / 1000.0
                }
            };
            ran.push(t);
            halving.record(scored(score), 10);
        }
        assert_eq!(ran.len(), planned);
        let stage = |s: usize| ran.iter().filter(|t| t.stage == s).count();
        assert_eq!((stage(0), stage(1), stage(2), stage(3)), (6, 2, 1, 1));
        // The best two of the first stage, best first, with more rounds.
        let second: Vec<_> = ran[6..8].iter().map(|t| (t.factors, t.rounds)).collect();
        assert_eq!(second, [(32, 4), (16, 4)]);
        assert!(ran[6..8].iter().all(|t| t.confidence == 5.0));
        assert_eq!(ran[9].model, SearchModel::Ease);
        let report = halving.finish(1.0).unwrap();
        assert_eq!(report.trials.len(), 10);
        assert_eq!(report.device_rounds, 100);
        let chosen = report.chosen.settings;
        assert_eq!(
            (
                chosen.model,
                chosen.factors,
                chosen.confidence,
                chosen.rounds
            ),
            (SearchModel::Als, 32, 5.0, 8)
        );
        let mut cfg = fedrec_coordinator::config::CoordinatorConfig::default();
        chosen.apply(&mut cfg);
        assert_eq!((cfg.model.factors, cfg.rounds.rounds), (32, 8));
        assert_eq!(cfg.training.confidence, 5.0);
        ran[9].apply(&mut cfg);
        assert_eq!(
            cfg.strategy.name,
            fedrec_coordinator::config::StrategyName::Ease
        );
        assert_eq!(cfg.rounds.rounds, 1);
    }

    /// On the simulation's ALS recipe, an EASE trial's settings make
    /// exactly the EASE recipe (so the search's figures did not move when
    /// serve began to share it).
    #[test]
    fn an_ease_trial_on_the_als_recipe_is_the_ease_recipe() {
        let mut cfg = super::super::als_recipe();
        let t = TrialSettings {
            stage: 3,
            model: SearchModel::Ease,
            factors: 0,
            confidence: 0.0,
            regularization: 200.0,
            rounds: 1,
        };
        t.apply(&mut cfg);
        assert_eq!(cfg, super::super::ease_recipe(200.0));
    }
}
