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
//! resource is rounds): every setting of [`AUTO_SPACE`] trains
//! [`STAGE_ROUNDS`]`[0]` of [`AUTO_ROUNDS`]; the best third goes on to the
//! next stage with more rounds, and so on. Each trial runs its own cosine
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
//! [`crate::baselines::EASE_GRID`], and chooses between the two models on
//! the same validation events.
//!
//! Not searched, with the reason: the step. The `als` server step at
//! `server_lr` 1 is the exact item step of ALS for items nobody in the
//! cohort bought (see [`super::als_recipe`]); the rounds and the cosine
//! schedule set how far it moves.

use serde::Serialize;

use super::{Observer, RunKind, SimConfig, run_cut};
use crate::data::{Protocol, Stage};
use crate::eval::Metrics;

/// The settings `--preset auto` searches.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SearchSpace {
    /// Latent factors.
    pub factors: Vec<usize>,
    /// ALS confidence of a purchase (an item not bought has 1).
    pub confidence: Vec<f32>,
    /// L2 regularization.
    pub regularization: Vec<f32>,
}

/// The documented search space of `--preset auto`: 18 settings across the
/// usual implicit-ALS ranges (factors 32 to 128; confidence 2 to 20, the
/// `implicit` library's α; regularization from nearly none to strong).
pub fn auto_space() -> SearchSpace {
    SearchSpace {
        factors: AUTO_SPACE.0.to_vec(),
        confidence: AUTO_SPACE.1.to_vec(),
        regularization: AUTO_SPACE.2.to_vec(),
    }
}

/// Factors, confidences and regularizations of [`auto_space`].
pub const AUTO_SPACE: ([usize; 3], [f32; 3], [f32; 2]) =
    ([32, 64, 128], [2.0, 5.0, 20.0], [0.01, 1.0]);

/// Rounds of each stage, as fractions of [`AUTO_ROUNDS`] (at least
/// [`MIN_STAGE_ROUNDS`]); each stage keeps the best third.
pub const STAGE_ROUNDS: [f64; 3] = [0.125, 0.25, 0.5];

/// Fewest rounds a trial trains.
pub const MIN_STAGE_ROUNDS: u32 = 2;

/// The rounds the stages' fractions refer to (the recipe's budget for one
/// run: about ten visits per device at its cohort of up to 1,000).
pub const AUTO_ROUNDS: u32 = 40;

/// One trial of the search.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Trial {
    /// The stage (0 first; EASE trials come after the ALS stages).
    pub stage: usize,
    /// `"als"` or `"ease"`.
    pub model: &'static str,
    /// ALS: latent factors (0 for EASE).
    pub factors: usize,
    /// ALS: confidence (0 for EASE).
    pub confidence: f32,
    /// ALS: regularization; EASE: its λ.
    pub regularization: f32,
    /// Rounds trained.
    pub rounds: u32,
    /// The devices' evaluation of the trial's model on their validation
    /// events.
    pub validation: Metrics,
    /// Devices that took part, summed over the trial's rounds.
    pub device_rounds: usize,
}

/// The search in the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SearchReport {
    /// What was searched.
    pub space: SearchSpace,
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

/// Runs the search on `protocol`'s first track's validation cut with `cfg`
/// (whose coordinator is the ALS recipe) and returns it; the caller trains
/// the chosen setting.
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
        .tracks()
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no track to search on"))?;
    let ev = protocol
        .evaluation(first, Stage::Validation)
        .filter(|e| e.n_users() > 0)
        .ok_or_else(|| anyhow::anyhow!("no validation event to choose settings on"))?;
    let space = auto_space();
    let mut candidates: Vec<(usize, f32, f32)> = Vec::new();
    for &f in &space.factors {
        for &c in &space.confidence {
            for &r in &space.regularization {
                candidates.push((f, c, r));
            }
        }
    }
    let stage_rounds: Vec<u32> = STAGE_ROUNDS
        .iter()
        .map(|x| ((f64::from(AUTO_ROUNDS) * x).ceil() as u32).max(MIN_STAGE_ROUNDS))
        .collect();
    let mut trials: Vec<Trial> = Vec::new();
    for (stage, &rounds) in stage_rounds.iter().enumerate() {
        let mut results: Vec<Trial> = Vec::new();
        for &(factors, confidence, regularization) in &candidates {
            observer.phase(&format!(
                "auto: stage {} of {}, {factors} factors, confidence {confidence}, \
                 regularization {regularization}, {rounds} rounds",
                stage + 1,
                stage_rounds.len()
            ));
            let mut trial_cfg = cfg.clone();
            let c = &mut trial_cfg.coordinator;
            c.model.factors = factors;
            c.training.confidence = confidence;
            c.training.regularization = regularization;
            c.rounds.rounds = rounds;
            let run = run_cut(protocol, ev, &[], &trial_cfg, observer, RunKind::Trial)?;
            let validation = run.federated.first().map(|(_, m)| *m).unwrap_or_default();
            results.push(Trial {
                stage,
                model: "als",
                factors,
                confidence,
                regularization,
                rounds,
                validation,
                device_rounds: run.rounds.iter().map(|r| r.participants).sum(),
            });
        }
        // Best first; a stable sort keeps the earlier trial first on ties.
        results.sort_by(|a, b| better(b, a));
        let keep = results.len().div_ceil(3).max(1);
        candidates = results[..keep]
            .iter()
            .map(|t| (t.factors, t.confidence, t.regularization))
            .collect();
        trials.extend(results);
    }
    if protocol.n_items() <= fedrec_client::ease::MAX_ITEMS {
        let stage = stage_rounds.len();
        for &lambda in &crate::baselines::EASE_GRID {
            observer.phase(&format!("auto: federated EASE, lambda {lambda}"));
            let mut trial_cfg = cfg.clone();
            trial_cfg.coordinator = super::ease_recipe(lambda);
            let run = run_cut(protocol, ev, &[], &trial_cfg, observer, RunKind::Trial)?;
            trials.push(Trial {
                stage,
                model: "ease",
                factors: 0,
                confidence: 0.0,
                regularization: lambda,
                rounds: 1,
                validation: run.federated.first().map(|(_, m)| *m).unwrap_or_default(),
                device_rounds: run.rounds.iter().map(|r| r.participants).sum(),
            });
        }
    }
    let chosen = trials
        .iter()
        .fold(None::<&Trial>, |best, t| match best {
            Some(b) if better(b, t) != std::cmp::Ordering::Less => Some(b),
            _ => Some(t),
        })
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("the search ran no trial"))?;
    Ok(SearchReport {
        space,
        stage_rounds,
        device_rounds: trials.iter().map(|t| t.device_rounds).sum(),
        trials,
        chosen,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Orders trials by validation NDCG@10, then HR@10.
fn better(a: &Trial, b: &Trial) -> std::cmp::Ordering {
    let key = |t: &Trial| (t.validation.full.ndcg_at_10, t.validation.full.hr_at_10);
    key(a)
        .partial_cmp(&key(b))
        .unwrap_or(std::cmp::Ordering::Equal)
}
