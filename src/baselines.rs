//! The simple baselines every report sets beside fedrec, fitted on one
//! training [`Cut`]: the obvious rules a shopping app would otherwise ship,
//! and the centralized item-item models that lead on sparse catalogues.
//!
//! - [`Baseline::Popularity`]: items by how many users bought them.
//! - [`Baseline::PersonalFrequency`]: the user's own past items by purchase
//!   count (ties: the more recent first), then the rest by popularity.
//! - [`Baseline::Recency`]: the user's own past items, most recent first
//!   (ties: more purchases first), then the rest by popularity.
//! - [`Baseline::ItemKnn`]: item-based nearest neighbours: cosine
//!   similarity of the items' co-purchase vectors (who bought them), each
//!   item's `k` most similar kept; a user's score for `j` is the sum of the
//!   similarities of `j` to the items they bought (Deshpande & Karypis 2004;
//!   Sarwar et al. 2001).
//! - [`Baseline::Ease`]: EASE (Steck 2019): the item-item weights `B`
//!   minimizing `‖X − XB‖² + λ‖B‖²` with a zero diagonal, in closed form:
//!   `P = (XᵀX + λI)⁻¹`, `B_ij = −P_ij / P_jj`. The items × items solve is
//!   a Cholesky factorization by `faer`; catalogues above
//!   [`EASE_MAX_ITEMS`] are skipped (the matrices no longer fit a laptop's
//!   memory) and the report says so.
//!
//! Purchase counts and recency come from the cut's events (identical rows
//! merged); the item-item models use who bought what (each user-item pair
//! once), as the federated model does.

use faer::{Mat, Side};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::{Cut, Histories};

/// Largest catalogue EASE is fitted on: its three items × items matrices of
/// `f32` (the co-purchase Gram, its Cholesky factor, the inverse) take
/// 3 GB at 16,384 items.
pub const EASE_MAX_ITEMS: usize = 16_384;

/// The settings tried for item-KNN, chosen on the validation event:
/// neighbours kept per item.
pub const ITEM_KNN_GRID: [usize; 6] = [10, 20, 50, 100, 200, 500];

/// The settings tried for EASE, chosen on the validation event: its L2
/// weight λ (Steck 2019 reports 200 to 3,000 on catalogues of 10⁴ to 4·10⁴
/// items; smaller catalogues with fewer users need less).
pub const EASE_GRID: [f32; 8] = [5.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 3000.0];

/// A baseline method and its setting.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Baseline {
    /// Items by the number of users who bought them.
    Popularity,
    /// The user's past items by purchase count, then popularity.
    PersonalFrequency,
    /// The user's past items by recency, then popularity.
    Recency,
    /// Item-based k nearest neighbours (cosine).
    ItemKnn {
        /// Neighbours kept per item.
        k: usize,
    },
    /// EASE with L2 weight `lambda`.
    Ease {
        /// The L2 weight λ.
        lambda: f32,
    },
}

impl Baseline {
    /// The method's name in reports (without its setting).
    pub fn name(&self) -> &'static str {
        match self {
            Baseline::Popularity => "popularity",
            Baseline::PersonalFrequency => "personal_frequency",
            Baseline::Recency => "recency",
            Baseline::ItemKnn { .. } => "item_knn",
            Baseline::Ease { .. } => "ease",
        }
    }

    /// The setting, written for a person (`k=50`, `lambda=200`), empty for
    /// rules without one.
    pub fn setting(&self) -> String {
        match self {
            Baseline::ItemKnn { k } => format!("k={k}"),
            Baseline::Ease { lambda } => format!("lambda={lambda}"),
            _ => String::new(),
        }
    }

    /// Whether the method only reorders the user's own past items (and
    /// therefore says nothing on the discover track, where those are not
    /// candidates).
    pub fn personal_only(&self) -> bool {
        matches!(self, Baseline::PersonalFrequency | Baseline::Recency)
    }

    /// Fits the baseline on `cut`. `None` when it cannot run on this
    /// catalogue (EASE beyond [`EASE_MAX_ITEMS`] items, or a failed
    /// factorization), with the reason.
    pub fn fit(&self, histories: &Histories, cut: &Cut) -> Result<Fitted, String> {
        let popularity = popularity_order(cut);
        Ok(match *self {
            Baseline::Popularity => Fitted::Popularity(popularity),
            Baseline::PersonalFrequency | Baseline::Recency => Fitted::Personal {
                by_recency: *self == Baseline::Recency,
                popularity,
                histories: Personal::new(histories, cut),
            },
            Baseline::ItemKnn { k } => Fitted::Knn(ItemKnn::fit(cut, k)),
            Baseline::Ease { lambda } => Fitted::Ease(Ease::fit(cut, lambda)?),
        })
    }
}

/// A fitted baseline: scores every item for a user of its cut.
#[derive(Debug)]
pub enum Fitted {
    /// Popularity scores.
    Popularity(Vec<f32>),
    /// A personal rule.
    Personal {
        /// Recency first (else purchase count first).
        by_recency: bool,
        /// Popularity scores, for the rest of the catalogue.
        popularity: Vec<f32>,
        /// Each user's past items with counts and last times.
        histories: Personal,
    },
    /// Item-KNN neighbour lists.
    Knn(ItemKnn),
    /// EASE weights.
    Ease(Ease),
}

impl Fitted {
    /// Scores of every item for `user` into `out`.
    pub fn score(&self, user: usize, out: &mut Vec<f32>) {
        match self {
            Fitted::Popularity(pop) => {
                out.clear();
                out.extend_from_slice(pop);
            }
            Fitted::Personal {
                by_recency,
                popularity,
                histories,
            } => histories.score(user, *by_recency, popularity, out),
            Fitted::Knn(knn) => knn.score(user, out),
            Fitted::Ease(ease) => ease.score(user, out),
        }
    }
}

/// Popularity as scores: the number of users who bought each item in `cut`
/// (ties are broken by the smaller index when ranking).
pub fn popularity_order(cut: &Cut) -> Vec<f32> {
    let mut counts = vec![0.0_f32; cut.n_items];
    for items in &cut.items {
        for &i in items {
            counts[i as usize] += 1.0;
        }
    }
    counts
}

/// Each user's past items with their purchase counts and last purchase
/// times, for the personal rules.
#[derive(Debug)]
pub struct Personal {
    /// Per user: (item, purchase events, last time), sorted by item.
    users: Vec<Vec<(u32, u32, i64)>>,
}

impl Personal {
    fn new(histories: &Histories, cut: &Cut) -> Self {
        let users = (0..cut.n_users())
            .map(|u| {
                let mut stats: Vec<(u32, u32, i64)> = Vec::new();
                for e in cut.events(histories, u) {
                    match stats.binary_search_by_key(&e.item, |s| s.0) {
                        Ok(at) => {
                            stats[at].1 += 1;
                            stats[at].2 = stats[at].2.max(e.time);
                        }
                        Err(at) => stats.insert(at, (e.item, 1, e.time)),
                    }
                }
                stats
            })
            .collect();
        Self { users }
    }

    /// The user's past items in the rule's order score above every other
    /// item, which keep their popularity order. Scores are exact integers
    /// (below 2²⁴ for catalogues of fewer than 8 million items).
    fn score(&self, user: usize, by_recency: bool, popularity: &[f32], out: &mut Vec<f32>) {
        let n = popularity.len();
        // The rest of the catalogue: ranks by popularity (ties by index),
        // turned into scores in 1..=n.
        out.clear();
        out.extend_from_slice(popularity);
        let mut past = self.users[user].clone();
        past.sort_by(|a, b| {
            let (ka, kb) = if by_recency {
                ((a.2, i64::from(a.1)), (b.2, i64::from(b.1)))
            } else {
                ((i64::from(a.1), a.2), (i64::from(b.1), b.2))
            };
            kb.cmp(&ka)
                .then(popularity[b.0 as usize].total_cmp(&popularity[a.0 as usize]))
                .then(a.0.cmp(&b.0))
        });
        // Above every popularity count (at most the number of users).
        let top = popularity.iter().copied().fold(0.0_f32, f32::max) + 1.0;
        let m = past.len();
        for (rank, &(item, _, _)) in past.iter().enumerate() {
            out[item as usize] = top + (m - rank) as f32;
        }
        debug_assert_eq!(out.len(), n);
    }
}

/// For every item, its co-purchase counts with every other item, handed to
/// `row(i, counts)` in parallel (one scratch row per thread). The work is
/// the sum over users of their distinct items squared.
fn cooccurrence_rows<T: Send>(cut: &Cut, row: impl Fn(usize, &[u32]) -> T + Sync + Send) -> Vec<T> {
    let n = cut.n_items;
    let mut buyers: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (u, items) in cut.items.iter().enumerate() {
        for &i in items {
            buyers[i as usize].push(u as u32);
        }
    }
    (0..n)
        .into_par_iter()
        .map_init(
            || (vec![0_u32; n], Vec::<u32>::new()),
            |(counts, touched), i| {
                for &u in &buyers[i] {
                    for &j in &cut.items[u as usize] {
                        if counts[j as usize] == 0 {
                            touched.push(j);
                        }
                        counts[j as usize] += 1;
                    }
                }
                let result = row(i, counts);
                for &j in touched.iter() {
                    counts[j as usize] = 0;
                }
                touched.clear();
                result
            },
        )
        .collect()
}

/// Item-based nearest neighbours.
#[derive(Debug)]
pub struct ItemKnn {
    /// Per item: its `k` most similar items and the cosine similarities.
    neighbours: Vec<Vec<(u32, f32)>>,
    /// The cut's training items per user.
    users: Vec<Vec<u32>>,
    n_items: usize,
}

impl ItemKnn {
    /// Fits on `cut`, keeping `k` neighbours per item (an item is not its
    /// own neighbour).
    pub fn fit(cut: &Cut, k: usize) -> Self {
        let n = cut.n_items;
        let buyers: Vec<f32> = popularity_order(cut);
        let neighbours = cooccurrence_rows(cut, |i, counts| {
            if buyers[i] == 0.0 {
                return Vec::new();
            }
            let mut sims: Vec<(u32, f32)> = (0..n)
                .filter(|&j| j != i && counts[j] > 0)
                .map(|j| (j as u32, counts[j] as f32 / (buyers[i] * buyers[j]).sqrt()))
                .collect();
            let better = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
            if sims.len() > k {
                sims.select_nth_unstable_by(k, better);
                sims.truncate(k);
            }
            sims.sort_unstable_by(better);
            sims
        });
        Self {
            neighbours,
            users: cut.items.clone(),
            n_items: n,
        }
    }

    fn score(&self, user: usize, out: &mut Vec<f32>) {
        out.clear();
        out.resize(self.n_items, 0.0);
        for &i in &self.users[user] {
            for &(j, s) in &self.neighbours[i as usize] {
                out[j as usize] += s;
            }
        }
    }
}

/// EASE's fitted model: `P = (XᵀX + λI)⁻¹`, from which `B_ij = −P_ij/P_jj`.
pub struct Ease {
    /// `P`, symmetric, column-major.
    p: Mat<f32>,
    users: Vec<Vec<u32>>,
}

impl std::fmt::Debug for Ease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ease")
            .field("items", &self.p.nrows())
            .finish_non_exhaustive()
    }
}

impl Ease {
    /// Fits on `cut` with L2 weight `lambda`.
    ///
    /// # Errors
    /// A catalogue over [`EASE_MAX_ITEMS`], or a Gram matrix that is not
    /// positive definite (λ ≤ 0), with the reason.
    pub fn fit(cut: &Cut, lambda: f32) -> Result<Self, String> {
        let n = cut.n_items;
        if n > EASE_MAX_ITEMS {
            return Err(format!(
                "skipped: {n} items is over EASE's limit of {EASE_MAX_ITEMS} (items × items matrices)"
            ));
        }
        let rows = cooccurrence_rows(cut, |_, counts| {
            counts.iter().map(|&c| c as f32).collect::<Vec<f32>>()
        });
        let mut g = Mat::<f32>::zeros(n, n);
        for (j, row) in rows.into_iter().enumerate() {
            // Symmetric: row j is column j.
            g.col_as_slice_mut(j).copy_from_slice(&row);
            g[(j, j)] += lambda;
        }
        let llt = g.llt(Side::Lower).map_err(|e| {
            format!("the Gram matrix plus {lambda}·I is not positive definite: {e:?}")
        })?;
        drop(g);
        let p = faer::linalg::solvers::DenseSolveCore::inverse(&llt);
        Ok(Self {
            p,
            users: cut.items.clone(),
        })
    }

    /// `score_j = Σ_{i∈h} B_ij = −(Σ_{i∈h, i≠j} P_ij) / P_jj`: the columns
    /// of the user's items summed (P is symmetric), their own entries left
    /// out (B's diagonal is zero).
    fn score(&self, user: usize, out: &mut Vec<f32>) {
        let n = self.p.nrows();
        out.clear();
        out.resize(n, 0.0);
        let history = &self.users[user];
        for &i in history {
            for (o, v) in out.iter_mut().zip(self.p.col_as_slice(i as usize)) {
                *o += v;
            }
        }
        for &i in history {
            out[i as usize] -= self.p[(i as usize, i as usize)];
        }
        for (j, o) in out.iter_mut().enumerate() {
            *o = -*o / self.p[(j, j)];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Dataset, Interaction, Protocol, Stage, Track};

    fn protocol(rows: &[(u32, u32, i64)]) -> Protocol {
        let users = rows.iter().map(|r| r.0 + 1).max().unwrap_or(0) as usize;
        let items = rows.iter().map(|r| r.1 + 1).max().unwrap_or(0) as usize;
        Protocol::new(&Dataset {
            name: "t".into(),
            user_ids: (0..users).map(|u| u.to_string()).collect(),
            item_ids: (0..items).map(|i| i.to_string()).collect(),
            interactions: rows
                .iter()
                .map(|&(user, item, time)| Interaction {
                    user,
                    item,
                    time,
                    quantity: 1.0,
                })
                .collect(),
            ..Dataset::default()
        })
    }

    fn scores(p: &Protocol, b: Baseline, user: usize) -> Vec<f32> {
        let e = p
            .evaluation(Track::NextPurchase, Stage::Test)
            .or(p.evaluation(Track::Discover, Stage::Test))
            .unwrap();
        let fitted = b.fit(&p.histories, &p.cuts[e.cut]).unwrap();
        let mut out = Vec::new();
        fitted.score(user, &mut out);
        out
    }

    fn order(scores: &[f32]) -> Vec<u32> {
        fedrec_client::ranking::top_k(scores, &[], scores.len())
    }

    #[test]
    fn personal_frequency_puts_the_most_bought_first_then_popularity() {
        // User 0 bought 3 twice, 1 once (later), then 4 (held out).
        // Popularity in training: item 2 by three users.
        let p = protocol(&[
            (0, 3, 1),
            (0, 3, 2),
            (0, 1, 3),
            (0, 4, 9),
            (1, 2, 1),
            (1, 0, 2),
            (2, 2, 1),
            (2, 0, 2),
            (3, 2, 1),
            (3, 4, 2),
        ]);
        let freq = order(&scores(&p, Baseline::PersonalFrequency, 0));
        assert_eq!(&freq[..3], &[3, 1, 2]);
        // Recency: 1 (time 3) before 3 (time 2).
        let rec = order(&scores(&p, Baseline::Recency, 0));
        assert_eq!(&rec[..3], &[1, 3, 2]);
    }

    #[test]
    fn item_knn_scores_co_purchased_items() {
        // 0 and 1 always bought together; 2 alone.
        let p = protocol(&[
            (0, 0, 1),
            (0, 1, 1),
            (0, 5, 2),
            (1, 0, 1),
            (1, 1, 1),
            (1, 5, 2),
            (2, 2, 1),
            (2, 5, 2),
            (3, 0, 1),
            (3, 5, 2),
        ]);
        // User 3 bought 0: its neighbour 1 scores, 2 does not.
        let s = scores(&p, Baseline::ItemKnn { k: 10 }, 3);
        assert!(s[1] > 0.0 && s[2] == 0.0, "{s:?}");
        // Cosine of 0 and 1: 2 shared buyers / sqrt(3 · 2).
        assert!((s[1] - 2.0 / 6f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn ease_matches_its_closed_form_on_a_small_catalogue() {
        let rows: Vec<(u32, u32, i64)> = vec![
            (0, 0, 1),
            (0, 1, 1),
            (0, 3, 2),
            (1, 0, 1),
            (1, 2, 1),
            (1, 3, 2),
            (2, 1, 1),
            (2, 2, 1),
            (2, 3, 2),
        ];
        let p = protocol(&rows);
        let lambda = 1.0_f32;
        let s = scores(&p, Baseline::Ease { lambda }, 0);
        // Reference: the 4×4 Gram of the training pairs, inverted by hand
        // with Gauss-Jordan in f64.
        let e = p.evaluation(Track::Discover, Stage::Test).unwrap();
        let cut = &p.cuts[e.cut];
        let n = 4;
        let mut g = vec![vec![0.0_f64; 2 * n]; n];
        for items in &cut.items {
            for &i in items {
                for &j in items {
                    g[i as usize][j as usize] += 1.0;
                }
            }
        }
        for (i, row) in g.iter_mut().enumerate() {
            row[i] += f64::from(lambda);
            row[n + i] = 1.0;
        }
        for c in 0..n {
            let pivot = g[c][c];
            for v in g[c].iter_mut() {
                *v /= pivot;
            }
            for r in 0..n {
                if r != c {
                    let f = g[r][c];
                    let pivot_row = g[c].clone();
                    for (v, pv) in g[r].iter_mut().zip(pivot_row) {
                        *v -= f * pv;
                    }
                }
            }
        }
        let pinv = |i: usize, j: usize| g[i][n + j];
        for (j, &got) in s.iter().enumerate() {
            let want: f64 = cut.items[0]
                .iter()
                .filter(|&&i| i as usize != j)
                .map(|&i| -pinv(i as usize, j) / pinv(j, j))
                .sum();
            assert!(
                (f64::from(got) - want).abs() < 1e-4,
                "item {j}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn ease_refuses_a_catalogue_over_its_limit() {
        let cut = Cut {
            ends: vec![],
            items: vec![],
            n_items: EASE_MAX_ITEMS + 1,
        };
        let err = Ease::fit(&cut, 100.0).unwrap_err();
        assert!(err.contains("limit"), "{err}");
    }
}
