//! Offline evaluation on a leave-one-out split: the centralized and
//! popularity baselines, and the metrics every method is reported with.
//!
//! Every method ranks each user's held-out item with the same sampled
//! candidates ([`candidate_seed`]), so the numbers are comparable.

use std::sync::Arc;

use fedrec_client::metrics::{self, EvalCounts, K};
use fedrec_client::model::{Model, TrainingConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::Split;

/// HR@10 and NDCG@10 under one candidate protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Ranking {
    /// Hit rate at 10.
    pub hr_at_10: f64,
    /// NDCG at 10.
    pub ndcg_at_10: f64,
}

/// The metrics reported for each method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Full ranking: every item the user did not train on, plus the held-out item.
    pub full: Ranking,
    /// The held-out item among 100 candidates (99 sampled non-interactions).
    pub sampled100: Ranking,
    /// Fraction of the catalogue that appears in at least one user's top 10.
    pub coverage_at_10: f64,
    /// Users evaluated.
    pub users: u64,
}

impl Metrics {
    /// Metrics from summed counts and the number of distinct recommended items.
    pub fn from_counts(c: &EvalCounts, covered: usize, n_items: usize) -> Self {
        Self {
            full: Ranking {
                hr_at_10: c.hit_rate_full().unwrap_or(0.0),
                ndcg_at_10: c.ndcg_full_mean().unwrap_or(0.0),
            },
            sampled100: Ranking {
                hr_at_10: c.hit_rate_sampled().unwrap_or(0.0),
                ndcg_at_10: c.ndcg_sampled_mean().unwrap_or(0.0),
            },
            coverage_at_10: covered as f64 / n_items.max(1) as f64,
            users: c.users,
        }
    }
}

/// The seed of user `user`'s 99 sampled candidates under evaluation seed `seed`.
pub fn candidate_seed(seed: u64, user: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (user as u64).wrapping_add(1)
}

/// Tracks which items appear in users' top-10 lists.
#[derive(Clone, Debug)]
pub struct Coverage {
    seen: Vec<bool>,
}

impl Coverage {
    /// Empty coverage over `n_items` items.
    pub fn new(n_items: usize) -> Self {
        Self {
            seen: vec![false; n_items],
        }
    }

    /// Marks a top-10 list.
    pub fn add(&mut self, items: &[u32]) {
        for &i in items {
            self.seen[i as usize] = true;
        }
    }

    /// Distinct items seen.
    pub fn covered(&self) -> usize {
        self.seen.iter().filter(|s| **s).count()
    }
}

/// Evaluates a scorer over every user with a held-out item. `score(user, out)`
/// fills `out` with a score per item.
pub fn evaluate(split: &Split, seed: u64, mut score: impl FnMut(usize, &mut Vec<f32>)) -> Metrics {
    let mut counts = EvalCounts::default();
    let mut coverage = Coverage::new(split.n_items);
    let mut scores = Vec::with_capacity(split.n_items);
    for (user, target) in split.test.iter().enumerate() {
        let Some(target) = *target else { continue };
        score(user, &mut scores);
        let train = &split.train[user];
        let mut rng = ChaCha8Rng::seed_from_u64(candidate_seed(seed, user));
        counts.add(&metrics::evaluate_user(&scores, train, target, &mut rng));
        coverage.add(&metrics::top_k(&scores, train, K));
    }
    Metrics::from_counts(&counts, coverage.covered(), split.n_items)
}

/// Item popularity: the number of users who interacted with each item in training.
pub fn popularity_scores(split: &Split) -> Vec<f32> {
    let mut counts = vec![0.0_f32; split.n_items];
    for items in &split.train {
        for &i in items {
            counts[i as usize] += 1.0;
        }
    }
    counts
}

/// The popularity baseline: rank by global interaction count.
pub fn popularity(split: &Split, seed: u64) -> Metrics {
    let pop = popularity_scores(split);
    evaluate(split, seed, |_, out| {
        out.clear();
        out.extend_from_slice(&pop);
    })
}

/// The centralized baseline: the same model trained on all users' data in one
/// process ([`Model::fit_centralized`]: SGD passes for BPR, alternating least
/// squares for the ALS loss). Returns the global parameters and every user's
/// embedding.
pub fn train_centralized(
    model: &Arc<dyn Model>,
    split: &Split,
    cfg: &TrainingConfig,
    epochs: u32,
    seed: u64,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut params = model.init_global(&mut rng);
    let mut users: Vec<Vec<f32>> = (0..split.train.len())
        .map(|_| model.init_private(&mut rng))
        .collect();
    model.fit_centralized(&mut params, &mut users, &split.train, cfg, epochs, &mut rng);
    (params, users)
}

/// Trains the centralized baseline and evaluates it.
pub fn centralized(
    model: &Arc<dyn Model>,
    split: &Split,
    cfg: &TrainingConfig,
    epochs: u32,
    seed: u64,
) -> Metrics {
    let (params, users) = train_centralized(model, split, cfg, epochs, seed);
    evaluate(split, seed, |u, out| {
        model.score_all(&params, &users[u], out)
    })
}

/// Writes `split` for external baselines (e.g. `scripts/implicit_peer.py`):
/// `train.tsv` (`user<TAB>item`, each pair once), `test.tsv`
/// (`user<TAB>held_out<TAB>c1,…,c99`: the sampled candidates every method
/// here uses under `seed`) and `meta.json`. Indices are dense, from 0.
pub fn write_split(
    split: &Split,
    seed: u64,
    name: &str,
    dir: &std::path::Path,
) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let mut train = std::io::BufWriter::new(std::fs::File::create(dir.join("train.tsv"))?);
    for (user, items) in split.train.iter().enumerate() {
        for item in items {
            writeln!(train, "{user}\t{item}")?;
        }
    }
    train.flush()?;
    let mut test = std::io::BufWriter::new(std::fs::File::create(dir.join("test.tsv"))?);
    for (user, target) in split.test.iter().enumerate() {
        let Some(target) = *target else { continue };
        let mut rng = ChaCha8Rng::seed_from_u64(candidate_seed(seed, user));
        let cands = metrics::sample_candidates(split.n_items, &split.train[user], target, &mut rng);
        let cands: Vec<String> = cands.iter().map(ToString::to_string).collect();
        writeln!(test, "{user}\t{target}\t{}", cands.join(","))?;
    }
    test.flush()?;
    let meta = serde_json::json!({
        "users": split.train.len(),
        "items": split.n_items,
        "data": name,
        "seed": seed,
    });
    std::fs::write(dir.join("meta.json"), meta.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{SyntheticConfig, leave_one_out, synthetic};
    use fedrec_client::model::MatrixFactorization;

    #[test]
    fn centralized_beats_popularity_on_planted_clusters() {
        let ds = synthetic(&SyntheticConfig {
            users: 300,
            items: 200,
            ..Default::default()
        })
        .unwrap();
        let split = leave_one_out(&ds);
        let model: Arc<dyn Model> = Arc::new(MatrixFactorization::new(200, 16, 0.1).unwrap());
        let pop = popularity(&split, 1);
        let cen = centralized(&model, &split, &TrainingConfig::default(), 20, 1);
        assert!(pop.full.hr_at_10 > 0.0);
        assert!(
            cen.full.hr_at_10 > pop.full.hr_at_10,
            "centralized {cen:?} vs popularity {pop:?}"
        );
        assert!(cen.coverage_at_10 > pop.coverage_at_10);
    }

    #[test]
    fn written_split_has_the_evaluation_candidates() {
        let ds = synthetic(&SyntheticConfig {
            users: 30,
            items: 150,
            ..Default::default()
        })
        .unwrap();
        let split = leave_one_out(&ds);
        let dir = tempfile::tempdir().unwrap();
        write_split(&split, 3, "synthetic", dir.path()).unwrap();
        let train = std::fs::read_to_string(dir.path().join("train.tsv")).unwrap();
        let pairs: usize = split.train.iter().map(Vec::len).sum();
        assert_eq!(train.lines().count(), pairs);
        let test = std::fs::read_to_string(dir.path().join("test.tsv")).unwrap();
        assert_eq!(test.lines().count(), split.test.iter().flatten().count());
        // The candidates written are those the evaluation ranks against:
        // ranking with scores that favour exactly them puts the target last.
        for line in test.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let (user, target): (usize, u32) = (f[0].parse().unwrap(), f[1].parse().unwrap());
            let cands: Vec<usize> = f[2].split(',').map(|c| c.parse().unwrap()).collect();
            assert!(cands.len() <= 99);
            let mut scores = vec![0.0_f32; split.n_items];
            for &c in &cands {
                scores[c] = 1.0;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(candidate_seed(3, user));
            assert_eq!(
                metrics::sampled_rank(&scores, &split.train[user], target, &mut rng),
                cands.len()
            );
        }
    }
}
