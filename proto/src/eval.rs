//! Leave-one-out evaluation counts: what devices report about the model's
//! quality, and all they report (sums, never which items).

use crate::pb;

/// Leave-one-out evaluation counts, summed over devices.
///
/// Each device reports counts for its own held-out purchase(s) only; the
/// coordinator only ever sees these sums.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalCounts {
    /// Devices (users) with a held-out purchase that contributed.
    pub users: u64,
    /// Full ranking: hits in the top 10.
    pub hits_full: f64,
    /// Full ranking: sum of NDCG@10.
    pub ndcg_full: f64,
    /// Among 100 sampled candidates: hits in the top 10.
    pub hits_sampled: f64,
    /// Among 100 sampled candidates: sum of NDCG@10.
    pub ndcg_sampled: f64,
}

impl EvalCounts {
    /// Adds another device's (or round's) counts.
    pub fn add(&mut self, other: &EvalCounts) {
        self.users = self.users.saturating_add(other.users);
        self.hits_full += other.hits_full;
        self.ndcg_full += other.ndcg_full;
        self.hits_sampled += other.hits_sampled;
        self.ndcg_sampled += other.ndcg_sampled;
    }

    /// HR@10 under full ranking, when any user contributed.
    pub fn hit_rate_full(&self) -> Option<f64> {
        self.ratio(self.hits_full)
    }

    /// NDCG@10 under full ranking, when any user contributed.
    pub fn ndcg_full_mean(&self) -> Option<f64> {
        self.ratio(self.ndcg_full)
    }

    /// HR@10 among 100 sampled candidates, when any user contributed.
    pub fn hit_rate_sampled(&self) -> Option<f64> {
        self.ratio(self.hits_sampled)
    }

    /// NDCG@10 among 100 sampled candidates, when any user contributed.
    pub fn ndcg_sampled_mean(&self) -> Option<f64> {
        self.ratio(self.ndcg_sampled)
    }

    fn ratio(&self, value: f64) -> Option<f64> {
        (self.users > 0).then(|| value / self.users as f64)
    }
}

impl From<pb::EvaluationCounts> for EvalCounts {
    fn from(c: pb::EvaluationCounts) -> Self {
        Self {
            users: c.users,
            hits_full: c.hits_full,
            ndcg_full: c.ndcg_full,
            hits_sampled: c.hits_sampled,
            ndcg_sampled: c.ndcg_sampled,
        }
    }
}

impl From<&EvalCounts> for pb::EvaluationCounts {
    fn from(c: &EvalCounts) -> Self {
        Self {
            users: c.users,
            hits_full: c.hits_full,
            ndcg_full: c.ndcg_full,
            hits_sampled: c.hits_sampled,
            ndcg_sampled: c.ndcg_sampled,
        }
    }
}
