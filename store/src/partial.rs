//! Partial sums: each replica's share of a round, combined by the leader.

use fedrec_proto::{EvalCounts, tensor};

use crate::error::Context;
use crate::task::{decode, json, to_db};
use crate::{Store, StoreError};

/// What one replica folded from its own devices for a round.
#[derive(Clone, Debug, PartialEq)]
pub struct Partial {
    /// The replica's name (`[cluster]`'s replica name).
    pub replica: String,
    /// Sum of weight × update over its accepted updates (under secure
    /// aggregation: its sub-cohort's unmasked sum).
    pub weighted_sum: Vec<f32>,
    /// Sum of the weights.
    pub weight: f64,
    /// Updates within the clipping bound, under adaptive clipping (0
    /// otherwise).
    pub within_clip: f64,
    /// Updates folded in.
    pub accepted: u64,
    /// Devices the replica selected for its share.
    pub selected: u64,
    /// The devices' summed evaluation counts.
    pub evaluation: EvalCounts,
}

impl Store {
    /// Commits `partial`, the share of round `round` on model version
    /// `model_version`, once: returns `false` (and changes nothing) when
    /// that replica's share of the round is already there, so a replica
    /// that retries after a lost answer cannot count its devices twice.
    /// Refuses a sum with a non-finite value or shorter than the model.
    pub async fn put_partial(
        &mut self,
        task: &str,
        round: u32,
        model_version: u64,
        partial: &Partial,
    ) -> Result<bool, StoreError> {
        let num_values: i64 = self
            .client
            .query_opt("SELECT num_values FROM task WHERE name = $1", &[&task])
            .await
            .during("reading the task")?
            .ok_or_else(|| StoreError::UnknownTask(task.to_owned()))?
            .get(0);
        let sum = &partial.weighted_sum;
        if (sum.len() as i64) < num_values
            || !sum.iter().all(|v| v.is_finite())
            || !partial.weight.is_finite()
            || !partial.within_clip.is_finite()
        {
            return Err(StoreError::InvalidPartial(format!(
                "replica {:?}'s share of round {round}: {} values for a model of {num_values}, \
                 all finite required",
                partial.replica,
                sum.len()
            )));
        }
        let inserted = self
            .client
            .execute(
                "INSERT INTO partial_sum \
                 (task, round, model_version, replica, weighted_sum, weight, accepted, evaluation, \
                 within_clip, selected) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT DO NOTHING",
                &[
                    &task,
                    &i64::from(round),
                    &to_db(model_version)?,
                    &partial.replica,
                    &tensor::encode(sum).as_ref(),
                    &partial.weight,
                    &to_db(partial.accepted)?,
                    &json(&partial.evaluation, "evaluation counts")?,
                    &partial.within_clip,
                    &to_db(partial.selected)?,
                ],
            )
            .await
            .during("committing a partial sum")?;
        Ok(inserted == 1)
    }

    /// Every replica's share of round `round` on `model_version`, by
    /// replica name.
    pub async fn partials(
        &self,
        task: &str,
        round: u32,
        model_version: u64,
    ) -> Result<Vec<Partial>, StoreError> {
        let rows = self
            .client
            .query(
                "SELECT replica, weighted_sum, weight, accepted, evaluation, within_clip, selected \
                 FROM partial_sum \
                 WHERE task = $1 AND round = $2 AND model_version = $3 ORDER BY replica",
                &[&task, &i64::from(round), &to_db(model_version)?],
            )
            .await
            .during("reading the partial sums")?;
        rows.into_iter()
            .map(|row| {
                let replica: String = row.get(0);
                let accepted: i64 = row.get(3);
                let selected: i64 = row.get(6);
                Ok(Partial {
                    weighted_sum: decode(row.get(1), "a partial sum")?,
                    weight: row.get(2),
                    within_clip: row.get(5),
                    accepted: u64::try_from(accepted).map_err(|_| {
                        StoreError::Corrupt(format!("negative update count {accepted}"))
                    })?,
                    selected: u64::try_from(selected).map_err(|_| {
                        StoreError::Corrupt(format!("negative selected count {selected}"))
                    })?,
                    evaluation: serde_json::from_value(row.get(4)).map_err(|e| {
                        StoreError::Corrupt(format!("{replica}'s evaluation counts: {e}"))
                    })?,
                    replica,
                })
            })
            .collect()
    }
}
