//! The synthetic purchase log that serves as the project's default data.
//!
//! Model: items have a power-law (Zipf-like) popularity and belong to one of
//! `clusters` latent taste clusters; each user belongs to one cluster, buys a
//! heavy-tailed (log-normal) number of items, each drawn with probability
//! `affinity` from the own cluster's items and otherwise from the whole
//! catalogue, weighted by popularity within the chosen pool. Users mostly buy
//! distinct items; about [`REPEAT_PROBABILITY`] of purchases repeat an earlier
//! one.

use std::collections::HashSet;

use rand::distr::weighted::WeightedIndex;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Geometric, LogNormal};

use super::{DataError, Dataset, Interaction};

/// Share of purchases that repeat an item the user already bought.
pub const REPEAT_PROBABILITY: f64 = 0.05;

/// Shortest history a synthetic user gets (enough for a train/test split
/// with at least two training interactions).
pub const MIN_HISTORY: usize = 3;

/// Coefficient of variation of the log-normal history length: heavy-tailed
/// like real shoppers (median about half the mean, a few users with many
/// times the mean).
const HISTORY_CV: f64 = 1.5;

/// Unix seconds of 2024-01-01T00:00:00Z, the earliest synthetic timestamp.
pub const START_TIME: i64 = 1_704_067_200;

/// Users start buying at a uniform offset within this many seconds of
/// [`START_TIME`] (30 days).
const START_SPREAD: i64 = 30 * 86_400;

/// Mean gap between two purchases of a user, in seconds (2 days).
const MEAN_GAP: f64 = 2.0 * 86_400.0;

/// Probability that a quantity is exactly 1 (quantities are 1 + a geometric
/// number, capped at [`MAX_QUANTITY`]).
const SINGLE_QUANTITY_PROBABILITY: f64 = 0.6;

/// Largest synthetic quantity.
const MAX_QUANTITY: u64 = 10;

/// Tries at drawing a not-yet-bought item before falling back to a scan.
const MAX_DRAWS: usize = 64;

/// Parameters of [`synthetic()`].
#[derive(Clone, Debug)]
pub struct SyntheticConfig {
    /// Number of users (>= 2). Default 1000: enough clients for a federated
    /// simulation, small enough to train in seconds.
    pub users: usize,
    /// Number of catalogue items (>= 3 and >= `clusters`). Default 500: a
    /// small shop, half as many items as users, so items get many interactions.
    pub items: usize,
    /// Number of latent taste clusters (1..=items). Default 8: enough
    /// structure for collaborative filtering to beat popularity.
    pub clusters: usize,
    /// Mean number of purchases per user (3 ..= items). Default 25.0: of the
    /// order of real e-commerce and MovieLens-100K-per-user histories scaled
    /// down.
    pub mean_history: f64,
    /// Zipf exponent `s` of item popularity, weight of rank `r` = `1/r^s`
    /// (0 ..= 10; 0 means uniform). Default 0.8: a long tail as in retail
    /// logs. Since users rarely rebuy, heavy users reach into the tail, so
    /// the realised skew is milder than the weights': with all defaults the
    /// top 10% of items draw about 27% of purchases.
    pub popularity_exponent: f64,
    /// Probability mass a user puts on the own cluster's items (0 ..= 1).
    /// Default 0.8: clear tastes, yet a fifth of purchases explore the whole
    /// catalogue.
    pub affinity: f64,
    /// Seed of the ChaCha8 generator. Default 42 (arbitrary, fixed so the
    /// default data set is reproducible).
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            users: 1000,
            items: 500,
            clusters: 8,
            mean_history: 25.0,
            popularity_exponent: 0.8,
            affinity: 0.8,
            seed: 42,
        }
    }
}

impl SyntheticConfig {
    /// Checks every parameter's range (see the field docs).
    ///
    /// # Errors
    /// [`DataError::InvalidConfig`] naming the first parameter out of range,
    /// e.g. `users must be >= 2, got 0`.
    pub fn validate(&self) -> Result<(), DataError> {
        let bad = |param, requirement: &str, value: String| {
            Err(DataError::InvalidConfig {
                param,
                requirement: requirement.to_owned(),
                value,
            })
        };
        let max_ids = u32::MAX as usize;
        if self.users < 2 {
            return bad("users", ">= 2", self.users.to_string());
        }
        if self.users > max_ids {
            return bad("users", &format!("<= {max_ids}"), self.users.to_string());
        }
        if self.items < MIN_HISTORY {
            return bad(
                "items",
                &format!(">= {MIN_HISTORY}"),
                self.items.to_string(),
            );
        }
        if self.items > max_ids {
            return bad("items", &format!("<= {max_ids}"), self.items.to_string());
        }
        if self.clusters < 1 || self.clusters > self.items {
            return bad(
                "clusters",
                &format!("between 1 and items ({})", self.items),
                self.clusters.to_string(),
            );
        }
        if !(self.mean_history >= MIN_HISTORY as f64 && self.mean_history <= self.items as f64) {
            return bad(
                "mean_history",
                &format!("between {MIN_HISTORY} and items ({})", self.items),
                self.mean_history.to_string(),
            );
        }
        if !(0.0..=10.0).contains(&self.popularity_exponent) {
            return bad(
                "popularity_exponent",
                "between 0 and 10",
                self.popularity_exponent.to_string(),
            );
        }
        if !(0.0..=1.0).contains(&self.affinity) {
            return bad("affinity", "between 0 and 1", self.affinity.to_string());
        }
        Ok(())
    }
}

/// The hidden structure behind a synthetic data set, for tests and analyses.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticTruth {
    /// Cluster of each dense user index.
    pub user_cluster: Vec<u32>,
    /// Cluster of each dense item index.
    pub item_cluster: Vec<u32>,
    /// Popularity weight of each dense item index, normalised to sum to 1.
    pub item_popularity: Vec<f64>,
}

/// Generates a synthetic purchase log.
///
/// Items have a power-law (Zipf-like) popularity and belong to one of
/// `clusters` latent taste clusters; each user belongs to one cluster and buys
/// a log-normal (heavy-tailed) number of items, at least [`MIN_HISTORY`],
/// each drawn with probability `affinity` from the own cluster's items and
/// otherwise from the whole catalogue, weighted by popularity within the
/// chosen pool. Users buy distinct items, except that about
/// [`REPEAT_PROBABILITY`] of purchases repeat an earlier one.
///
/// Deterministic: the same config gives an identical [`Dataset`]. Users are
/// `u0000`, `u0001`, ... and appear in index order, each with at least
/// [`MIN_HISTORY`] purchases sorted by strictly increasing time (Unix
/// seconds from [`START_TIME`]); `item_ids` lists the whole catalogue `i0000`,
/// `i0001`, ... (an item may have no interaction). Quantities are small
/// positive integers. The name is `"synthetic"`, nothing is skipped.
///
/// # Errors
/// Whatever [`SyntheticConfig::validate`] reports.
pub fn synthetic(cfg: &SyntheticConfig) -> Result<Dataset, DataError> {
    synthetic_with_truth(cfg).map(|(ds, _)| ds)
}

/// [`synthetic()`], also returning the clusters and popularities used.
///
/// # Errors
/// Whatever [`SyntheticConfig::validate`] reports.
pub fn synthetic_with_truth(cfg: &SyntheticConfig) -> Result<(Dataset, SyntheticTruth), DataError> {
    cfg.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let n_items = cfg.items;

    // Popularity: a random item order gets Zipf weights 1, 1/2^s, 1/3^s, ...
    let mut order: Vec<u32> = (0..n_items).map(index_u32).collect();
    order.shuffle(&mut rng);
    let mut popularity = vec![0.0f64; n_items];
    for (rank, &item) in order.iter().enumerate() {
        if let Some(w) = popularity.get_mut(item as usize) {
            *w = (rank as f64 + 1.0).powf(-cfg.popularity_exponent);
        }
    }

    // Clusters: another random order dealt round-robin, so every cluster has
    // items and a mix of popular and rare ones.
    order.shuffle(&mut rng);
    let mut item_cluster = vec![0u32; n_items];
    let mut cluster_items: Vec<Vec<u32>> = vec![Vec::new(); cfg.clusters];
    for (k, &item) in order.iter().enumerate() {
        let c = k % cfg.clusters;
        if let Some(slot) = item_cluster.get_mut(item as usize) {
            *slot = index_u32(c);
        }
        if let Some(list) = cluster_items.get_mut(c) {
            list.push(item);
        }
    }
    for list in &mut cluster_items {
        list.sort_unstable();
    }

    let weights_of = |items: &[u32]| -> Result<WeightedIndex<f64>, DataError> {
        let w = items
            .iter()
            .map(|&i| popularity.get(i as usize).copied().unwrap_or(0.0));
        WeightedIndex::new(w).map_err(|e| DataError::InvalidConfig {
            param: "popularity_exponent",
            requirement: format!("small enough for usable weights ({e})"),
            value: cfg.popularity_exponent.to_string(),
        })
    };
    let all_items: Vec<u32> = (0..n_items).map(index_u32).collect();
    let global = weights_of(&all_items)?;
    let per_cluster = cluster_items
        .iter()
        .map(|items| weights_of(items))
        .collect::<Result<Vec<_>, _>>()?;

    let extra_mean = cfg.mean_history - MIN_HISTORY as f64;
    let extra = if extra_mean > 0.0 {
        LogNormal::from_mean_cv(extra_mean, HISTORY_CV).ok()
    } else {
        None
    };
    let gap = Exp::new(1.0 / MEAN_GAP).map_err(|e| DataError::InvalidConfig {
        param: "mean gap",
        requirement: format!("valid ({e})"),
        value: MEAN_GAP.to_string(),
    })?;
    let quantity =
        Geometric::new(SINGLE_QUANTITY_PROBABILITY).map_err(|e| DataError::InvalidConfig {
            param: "quantity probability",
            requirement: format!("valid ({e})"),
            value: SINGLE_QUANTITY_PROBABILITY.to_string(),
        })?;

    let mut interactions = Vec::with_capacity((cfg.users as f64 * cfg.mean_history) as usize);
    let mut user_cluster = Vec::with_capacity(cfg.users);
    let mut history: Vec<u32> = Vec::new();
    let mut seen: HashSet<u32> = HashSet::new();
    for user in 0..cfg.users {
        let cluster = rng.random_range(0..cfg.clusters);
        user_cluster.push(index_u32(cluster));
        let extra_len = extra.as_ref().map_or(0.0, |d| d.sample(&mut rng).round());
        // The float-to-int cast saturates; the cap keeps distinct items possible.
        let len = MIN_HISTORY.saturating_add(extra_len as usize).min(n_items);

        history.clear();
        seen.clear();
        let mut time = START_TIME + rng.random_range(0..START_SPREAD);
        for _ in 0..len {
            let item = if !history.is_empty() && rng.random_bool(REPEAT_PROBABILITY) {
                history
                    .get(rng.random_range(0..history.len()))
                    .copied()
                    .unwrap_or(0)
            } else {
                draw_new_item(
                    &mut rng,
                    cfg.affinity,
                    (&global, &all_items),
                    (
                        per_cluster.get(cluster),
                        cluster_items.get(cluster).map_or(&[][..], Vec::as_slice),
                    ),
                    &popularity,
                    &seen,
                )
            };
            seen.insert(item);
            history.push(item);
            time = time.saturating_add((gap.sample(&mut rng) as i64).saturating_add(1));
            let q = 1 + quantity.sample(&mut rng).min(MAX_QUANTITY - 1);
            interactions.push(Interaction {
                user: index_u32(user),
                item,
                time,
                quantity: q as f32,
            });
        }
    }

    let total: f64 = popularity.iter().sum();
    let item_popularity = popularity.iter().map(|w| w / total).collect();
    let ds = Dataset {
        name: "synthetic".to_owned(),
        user_ids: ids("u", cfg.users),
        item_ids: ids("i", n_items),
        interactions,
        timed: true,
        skipped: Default::default(),
        timed: true,
    };
    let truth = SyntheticTruth {
        user_cluster,
        item_cluster,
        item_popularity,
    };
    Ok((ds, truth))
}

/// Draws an item the user has not bought yet. The pool is the own cluster
/// with probability `affinity`, else the whole catalogue; within the pool,
/// items are drawn by popularity. After [`MAX_DRAWS`] draws that hit bought
/// items, the draw is made exactly among the pool's unbought items (still by
/// popularity), and only when the pool is exhausted among the catalogue's.
fn draw_new_item(
    rng: &mut ChaCha8Rng,
    affinity: f64,
    global: (&WeightedIndex<f64>, &[u32]),
    own: (Option<&WeightedIndex<f64>>, &[u32]),
    popularity: &[f64],
    seen: &HashSet<u32>,
) -> u32 {
    let (dist, items) = match own {
        (Some(dist), items) if rng.random_bool(affinity) => (dist, items),
        _ => global,
    };
    for _ in 0..MAX_DRAWS {
        if let Some(&item) = items.get(dist.sample(rng))
            && !seen.contains(&item)
        {
            return item;
        }
    }
    draw_unseen(rng, items, popularity, seen)
        .or_else(|| draw_unseen(rng, global.1, popularity, seen))
        .unwrap_or(0)
}

/// Draws by popularity among the items of `items` not in `seen` (uniformly
/// if their weights are unusable); `None` if all are seen.
fn draw_unseen(
    rng: &mut ChaCha8Rng,
    items: &[u32],
    popularity: &[f64],
    seen: &HashSet<u32>,
) -> Option<u32> {
    let unseen: Vec<u32> = items
        .iter()
        .copied()
        .filter(|i| !seen.contains(i))
        .collect();
    if unseen.is_empty() {
        return None;
    }
    let weights = unseen
        .iter()
        .map(|&i| popularity.get(i as usize).copied().unwrap_or(0.0));
    let pick = match WeightedIndex::new(weights) {
        Ok(dist) => dist.sample(rng),
        Err(_) => rng.random_range(0..unseen.len()),
    };
    unseen.get(pick).copied()
}

/// `prefix` followed by `0..n` zero-padded to a common width.
fn ids(prefix: &str, n: usize) -> Vec<String> {
    let width = n.saturating_sub(1).to_string().len().max(4);
    (0..n).map(|i| format!("{prefix}{i:0width$}")).collect()
}

/// Casts an index already validated to fit in `u32`.
fn index_u32(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SyntheticConfig {
        SyntheticConfig {
            users: 300,
            items: 200,
            ..SyntheticConfig::default()
        }
    }

    fn generate(cfg: &SyntheticConfig) -> (Dataset, SyntheticTruth) {
        match synthetic_with_truth(cfg) {
            Ok(x) => x,
            Err(e) => panic!("generation failed: {e}"),
        }
    }

    #[test]
    fn deterministic_per_seed() {
        let cfg = small();
        let (a, ta) = generate(&cfg);
        let (b, tb) = generate(&cfg);
        assert_eq!(a, b);
        assert_eq!(ta, tb);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        let (c, _) = generate(&SyntheticConfig { seed: 7, ..cfg });
        assert_ne!(a.interactions, c.interactions);
    }

    #[test]
    fn respects_config() {
        let cfg = SyntheticConfig::default();
        let (ds, truth) = generate(&cfg);
        assert_eq!(ds.name, "synthetic");
        assert_eq!(ds.n_users(), cfg.users);
        assert_eq!(ds.n_items(), cfg.items);
        assert_eq!(ds.user_ids.first().map(String::as_str), Some("u0000"));
        assert_eq!(ds.item_ids.last().map(String::as_str), Some("i0499"));
        assert!(ds.skipped.is_empty());
        assert_eq!(truth.user_cluster.len(), cfg.users);
        assert_eq!(truth.item_cluster.len(), cfg.items);

        let mut counts = vec![0usize; cfg.users];
        let mut last_time = vec![i64::MIN; cfg.users];
        let mut previous_user = 0u32;
        for x in &ds.interactions {
            assert!((x.user as usize) < cfg.users && (x.item as usize) < cfg.items);
            assert!(x.user >= previous_user, "grouped by user in index order");
            previous_user = x.user;
            let u = x.user as usize;
            counts[u] += 1;
            assert!(x.time > last_time[u], "strictly increasing time per user");
            assert!(x.time > START_TIME);
            last_time[u] = x.time;
            assert!(x.quantity >= 1.0 && x.quantity <= MAX_QUANTITY as f32);
            assert_eq!(x.quantity.fract(), 0.0);
        }
        assert!(counts.iter().all(|&c| c >= MIN_HISTORY));
        let mean = ds.interactions.len() as f64 / cfg.users as f64;
        assert!(
            (mean - cfg.mean_history).abs() < 0.2 * cfg.mean_history,
            "mean {mean}"
        );
        // Heavy tail: some users with far more than the mean.
        assert!(counts.iter().any(|&c| c as f64 > 3.0 * cfg.mean_history));
        // Every cluster has items.
        for c in 0..cfg.clusters as u32 {
            assert!(truth.item_cluster.contains(&c));
        }
    }

    #[test]
    fn popularity_is_skewed() {
        let cfg = SyntheticConfig::default();
        let (ds, _) = generate(&cfg);
        let mut per_item = vec![0usize; cfg.items];
        for x in &ds.interactions {
            per_item[x.item as usize] += 1;
        }
        per_item.sort_unstable_by(|a, b| b.cmp(a));
        let top: usize = per_item.iter().take(cfg.items / 10).sum();
        let share = top as f64 / ds.interactions.len() as f64;
        assert!(
            share > 0.2,
            "top 10% of items get {share:.3} of interactions"
        );
    }

    #[test]
    fn purchases_concentrate_on_own_cluster() {
        let share = |affinity: f64| {
            let cfg = SyntheticConfig {
                affinity,
                ..SyntheticConfig::default()
            };
            let (ds, t) = generate(&cfg);
            let own = ds
                .interactions
                .iter()
                .filter(|x| t.user_cluster[x.user as usize] == t.item_cluster[x.item as usize])
                .count();
            own as f64 / ds.interactions.len() as f64
        };
        let high = share(0.8);
        let none = share(0.0);
        // Heavy users exhaust their cluster (no rebuying), so the realised
        // share (0.74 with the defaults) stays below the affinity.
        assert!(
            high > 0.6 && high > 3.0 * none,
            "own-cluster share {high:.3} with affinity 0.8"
        );
        assert!(none < 0.3, "own-cluster share {none:.3} with affinity 0");
    }

    #[test]
    fn some_repeat_purchases() {
        let (ds, _) = generate(&SyntheticConfig::default());
        let mut pairs = HashSet::new();
        let repeats = ds
            .interactions
            .iter()
            .filter(|x| !pairs.insert((x.user, x.item)))
            .count();
        let share = repeats as f64 / ds.interactions.len() as f64;
        assert!(share > 0.01 && share < 0.1, "repeat share {share:.3}");
    }

    #[test]
    fn tiny_and_extreme_configs_work() {
        let cfgs = [
            SyntheticConfig {
                users: 2,
                items: 3,
                clusters: 3,
                mean_history: 3.0,
                ..SyntheticConfig::default()
            },
            SyntheticConfig {
                users: 50,
                items: 10,
                clusters: 1,
                mean_history: 10.0,
                popularity_exponent: 10.0,
                affinity: 1.0,
                seed: 1,
            },
        ];
        for cfg in cfgs {
            let (ds, _) = generate(&cfg);
            assert_eq!(ds.n_users(), cfg.users);
            assert!(ds.interactions.len() >= MIN_HISTORY * cfg.users);
        }
    }

    #[test]
    fn validate_messages() {
        let msg = |cfg: SyntheticConfig| cfg.validate().err().map(|e| e.to_string());
        let d = SyntheticConfig::default;
        assert_eq!(
            msg(SyntheticConfig { users: 0, ..d() }).as_deref(),
            Some("users must be >= 2, got 0")
        );
        assert_eq!(
            msg(SyntheticConfig { items: 2, ..d() }).as_deref(),
            Some("items must be >= 3, got 2")
        );
        assert_eq!(
            msg(SyntheticConfig { clusters: 0, ..d() }).as_deref(),
            Some("clusters must be between 1 and items (500), got 0")
        );
        assert_eq!(
            msg(SyntheticConfig {
                mean_history: f64::NAN,
                ..d()
            })
            .as_deref(),
            Some("mean_history must be between 3 and items (500), got NaN")
        );
        assert_eq!(
            msg(SyntheticConfig {
                affinity: 1.5,
                ..d()
            })
            .as_deref(),
            Some("affinity must be between 0 and 1, got 1.5")
        );
        assert_eq!(
            msg(SyntheticConfig {
                popularity_exponent: -1.0,
                ..d()
            })
            .as_deref(),
            Some("popularity_exponent must be between 0 and 10, got -1")
        );
        assert!(d().validate().is_ok());
        assert!(synthetic(&SyntheticConfig { users: 1, ..d() }).is_err());
    }
}
