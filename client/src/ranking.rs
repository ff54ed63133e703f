//! Leave-one-out ranking metrics, computed where the data is: on the device.
//!
//! A device that holds out one purchase ranks it against the catalogue and
//! reports only [`EvalCounts`]: how many hits in the top 10 and the NDCG sum.

use rand::{Rng, RngExt};

/// The cut-off of every metric here: HR@10, NDCG@10, coverage@10.
pub const K: usize = 10;

/// Number of candidates in the sampled protocol: the held-out item and 99
/// sampled items the user never interacted with.
pub const SAMPLED_CANDIDATES: usize = 100;

pub use fedrec_proto::EvalCounts;

/// HR@k of one user given the 0-based rank of the held-out item.
pub fn hit_at(rank: usize, k: usize) -> f64 {
    if rank < k { 1.0 } else { 0.0 }
}

/// NDCG@k of one user with one relevant item at 0-based `rank`:
/// `1 / log2(rank + 2)` inside the cut-off, 0 outside.
pub fn ndcg_at(rank: usize, k: usize) -> f64 {
    if rank < k {
        1.0 / ((rank + 2) as f64).log2()
    } else {
        0.0
    }
}

/// Whether candidate `j` ranks before `target` (higher score; equal scores
/// broken by the smaller index, so ties are deterministic).
fn ahead(scores: &[f32], j: usize, target: usize) -> bool {
    scores[j] > scores[target] || (scores[j] == scores[target] && j < target)
}

/// 0-based rank of `target` among all items except those in `train` (sorted);
/// the target itself always competes, even when it is also in `train`
/// (a repeat purchase).
pub fn full_rank(scores: &[f32], train: &[u32], target: u32) -> usize {
    debug_assert!(train.is_sorted(), "training items must be sorted");
    let t = target as usize;
    // Every item ahead of the target (a pass that vectorizes), less the
    // distinct training items among them.
    let ahead_all = (0..scores.len()).filter(|&j| ahead(scores, j, t)).count();
    let ahead_train = train
        .iter()
        .enumerate()
        .filter(|&(k, &j)| k == 0 || train[k - 1] != j)
        .filter(|&(_, &j)| (j as usize) < scores.len() && ahead(scores, j as usize, t))
        .count();
    // Saturating: unsorted `train` with repeats could count one twice.
    ahead_all.saturating_sub(ahead_train)
}

/// Up to 99 distinct items sampled uniformly from those the user never
/// interacted with (not in `train`, not `target`): the competitors of the
/// held-out item in the sampled protocol.
pub fn sample_candidates(
    n_items: usize,
    train: &[u32],
    target: u32,
    rng: &mut dyn Rng,
) -> Vec<usize> {
    let t = target as usize;
    let eligible = |j: &usize| *j != t && train.binary_search(&(*j as u32)).is_err();
    let count = (0..n_items).filter(eligible).count();
    let want = (SAMPLED_CANDIDATES - 1).min(count);
    if want * 2 >= count {
        // Dense case: a uniform subset by a partial shuffle of the eligible items.
        let mut pool: Vec<usize> = (0..n_items).filter(eligible).collect();
        for i in 0..want {
            let r = rng.random_range(i..pool.len());
            pool.swap(i, r);
        }
        pool.truncate(want);
        pool
    } else {
        let mut chosen: Vec<usize> = Vec::with_capacity(want);
        while chosen.len() < want {
            let j = rng.random_range(0..n_items);
            if eligible(&j) && !chosen.contains(&j) {
                chosen.push(j);
            }
        }
        chosen
    }
}

/// 0-based rank of `target` among itself and the [`sample_candidates`].
pub fn sampled_rank(scores: &[f32], train: &[u32], target: u32, rng: &mut dyn Rng) -> usize {
    sample_candidates(scores.len(), train, target, rng)
        .into_iter()
        .filter(|&j| ahead(scores, j, target as usize))
        .count()
}

/// A purchase kept out of training to evaluate a model on, and what it
/// competes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldOut {
    /// The held-out item.
    pub item: u32,
    /// Whether the shopper's training items are left out of the ranking
    /// (the "discover" question: which item they have not bought comes
    /// next), or every item competes (buy-again, next purchase).
    pub exclude_history: bool,
    /// Seed of the 99 sampled competitors of the sampled protocol, when it
    /// is reported (drawn from items outside the history).
    pub candidate_seed: Option<u64>,
}

/// Evaluates one user: ranks the held-out item among every item except
/// `exclude` (sorted; the target always competes), and among sampled
/// candidates drawn from outside `history` when `rng` is given (the sampled
/// counts stay 0 otherwise).
pub fn evaluate_user(
    scores: &[f32],
    exclude: &[u32],
    history: &[u32],
    target: u32,
    rng: Option<&mut dyn Rng>,
) -> EvalCounts {
    let full = full_rank(scores, exclude, target);
    let (hits_sampled, ndcg_sampled) = match rng {
        Some(rng) => {
            let sampled = sampled_rank(scores, history, target, rng);
            (hit_at(sampled, K), ndcg_at(sampled, K))
        }
        None => (0.0, 0.0),
    };
    EvalCounts {
        users: 1,
        hits_full: hit_at(full, K),
        ndcg_full: ndcg_at(full, K),
        hits_sampled,
        ndcg_sampled,
    }
}

/// The `k` best-scoring items not in `exclude` (sorted), best first; ties
/// broken by the smaller index.
pub fn top_k(scores: &[f32], exclude: &[u32], k: usize) -> Vec<u32> {
    let mut cands: Vec<u32> = (0..scores.len() as u32)
        .filter(|j| exclude.binary_search(j).is_err())
        .collect();
    let better = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    if cands.len() > k {
        cands.select_nth_unstable_by(k, better);
        cands.truncate(k);
    }
    cands.sort_unstable_by(better);
    cands
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn hand_computed_metrics() {
        assert_eq!(hit_at(0, 10), 1.0);
        assert_eq!(hit_at(9, 10), 1.0);
        assert_eq!(hit_at(10, 10), 0.0);
        assert_eq!(ndcg_at(0, 10), 1.0);
        assert!((ndcg_at(1, 10) - 1.0 / 3f64.log2()).abs() < 1e-12);
        assert!((ndcg_at(2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(ndcg_at(10, 10), 0.0);
    }

    #[test]
    fn full_rank_excludes_training_items_but_not_the_target() {
        // scores: item 0 best, then 1, 2, 3, 4
        let scores = [5.0, 4.0, 3.0, 2.0, 1.0];
        assert_eq!(full_rank(&scores, &[], 3), 3);
        assert_eq!(full_rank(&scores, &[0, 1], 3), 1);
        // repeat purchase: target 1 is also in train and still ranked
        assert_eq!(full_rank(&scores, &[0, 1], 1), 0);
        // a repeated or unknown training item is excluded once, or ignored
        assert_eq!(full_rank(&scores, &[0, 0, 1, 9], 3), 1);
        // ties broken by index
        assert_eq!(full_rank(&[1.0, 1.0, 1.0], &[], 1), 1);
    }

    #[test]
    fn sampled_rank_uses_at_most_99_unseen_items() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // 1000 items, target has the 6th best score overall; items 0..5 are better.
        let scores: Vec<f32> = (0..1000).map(|i| -(i as f32)).collect();
        let r = sampled_rank(&scores, &[0, 1, 2, 3, 4], 5, &mut rng);
        assert_eq!(
            r, 0,
            "all better items are in train, so none can be sampled"
        );
        let r = sampled_rank(&scores, &[], 999, &mut rng);
        assert_eq!(r, 99, "worst item ranks behind all 99 sampled");
        // tiny catalogue: fewer candidates than 99
        let r = sampled_rank(&[3.0, 2.0, 1.0], &[], 2, &mut rng);
        assert_eq!(r, 2);
    }

    #[test]
    fn top_k_orders_and_excludes() {
        let scores = [0.1, 0.9, 0.5, 0.9, 0.0];
        assert_eq!(top_k(&scores, &[], 3), vec![1, 3, 2]);
        assert_eq!(top_k(&scores, &[1], 2), vec![3, 2]);
        assert_eq!(top_k(&scores, &[], 10).len(), 5);
    }
}
