//! Tasks and their model versions: open, import, read, commit.

use fedrec_proto::{Layout, tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::{GenericClient, Transaction};

use crate::error::Context;
use crate::{Checkpoint, PrivacyState, RoundSummary, Store, StoreError};

/// A model version as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// The version.
    pub version: u64,
    /// The parameters, in the task's layout order.
    pub params: Vec<f32>,
    /// The server optimizer's first moments (empty without one).
    pub m: Vec<f32>,
    /// The server optimizer's second moments (empty without one).
    pub v: Vec<f32>,
}

/// What [`Store::commit_version`] writes: a round's outcome.
#[derive(Clone, Copy, Debug)]
pub struct NewVersion<'a> {
    /// The version this one replaces: the store's current version, which
    /// the commit checks (None: the task has no model yet).
    pub previous: Option<u64>,
    /// The new version, greater than `previous`.
    pub version: u64,
    /// The new parameters.
    pub params: &'a [f32],
    /// The server optimizer's first moments after the round (empty without
    /// a server optimizer).
    pub m: &'a [f32],
    /// The server optimizer's second moments (empty without one).
    pub v: &'a [f32],
    /// The ended round, appended to the history.
    pub summary: Option<&'a RoundSummary>,
    /// The privacy accountant's state after the round.
    pub privacy: Option<&'a PrivacyState>,
}

/// One tensor of a layout, as the `task.layout` JSON holds it.
#[derive(Serialize, Deserialize)]
struct TensorJson {
    name: String,
    shape: Vec<u64>,
}

/// A task's round counters: a checkpoint's, and what [`Store::end_round`]
/// moves on, as the coordinator's core counts them. Stored as the
/// `run_state.state` JSON, under their field names.
pub use fedrec_coordinator::round::cluster::RunCounters as RunState;

/// A new model version, as [`EndRound`] carries it.
#[derive(Clone, Copy, Debug)]
pub struct NewModel<'a> {
    /// The new version, greater than the one it replaces.
    pub version: u64,
    /// The new parameters.
    pub params: &'a [f32],
    /// The server optimizer's first moments after the round (empty without
    /// a server optimizer).
    pub m: &'a [f32],
    /// The server optimizer's second moments (empty without one).
    pub v: &'a [f32],
}

/// What [`Store::end_round`] writes: everything a round's end changes.
#[derive(Clone, Copy, Debug)]
pub struct EndRound<'a> {
    /// The round that ends: greater than the stored `last_round`.
    pub round: u32,
    /// The store's current version, which the transaction checks (None:
    /// the task has no model yet).
    pub previous: Option<u64>,
    /// The round's new model (None: the round made none, say it was
    /// abandoned or evaluated).
    pub model: Option<NewModel<'a>>,
    /// The ended round, appended to the history.
    pub summary: &'a RoundSummary,
    /// The round counters after the round (`run.last_round` is normally
    /// `round`).
    pub run: &'a RunState,
    /// The privacy accountant's state after the round (None: unchanged).
    pub privacy: Option<&'a PrivacyState>,
}

/// Rounds [`Store::end_round`] keeps of partial sums and round orders
/// behind the ended one, for debugging: older ones are deleted.
const KEEP_ROUNDS: i64 = 5;

fn layout_json(layout: &Layout) -> Value {
    let tensors: Vec<TensorJson> = layout
        .tensors()
        .iter()
        .map(|(name, shape)| TensorJson {
            name: name.clone(),
            shape: shape.clone(),
        })
        .collect();
    serde_json::to_value(tensors).expect("plain strings and integers serialize")
}

fn layout_from_json(value: Value) -> Result<Layout, StoreError> {
    let tensors: Vec<TensorJson> = serde_json::from_value(value)
        .map_err(|e| StoreError::Corrupt(format!("task layout: {e}")))?;
    Ok(Layout::new(
        tensors.into_iter().map(|t| (t.name, t.shape)).collect(),
    ))
}

pub(crate) fn to_db(version: u64) -> Result<i64, StoreError> {
    i64::try_from(version)
        .map_err(|_| StoreError::InvalidVersion(format!("{version} exceeds 2^63 - 1")))
}

pub(crate) fn from_db(version: i64) -> Result<u64, StoreError> {
    u64::try_from(version)
        .map_err(|_| StoreError::Corrupt(format!("negative model version {version}")))
}

pub(crate) fn json<T: Serialize>(value: &T, what: &str) -> Result<Value, StoreError> {
    serde_json::to_value(value).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

pub(crate) fn decode(bytes: &[u8], what: &str) -> Result<Vec<f32>, StoreError> {
    tensor::decode(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Locks the task's row for the transaction; returns its number of values
/// and current version.
pub(crate) async fn lock_task(
    tx: &Transaction<'_>,
    task: &str,
) -> Result<(usize, Option<u64>), StoreError> {
    let row = tx
        .query_opt(
            "SELECT num_values, current_version FROM task WHERE name = $1 FOR UPDATE",
            &[&task],
        )
        .await
        .during("locking the task")?
        .ok_or_else(|| StoreError::UnknownTask(task.to_owned()))?;
    let num_values: i64 = row.get(0);
    let current: Option<i64> = row.get(1);
    Ok((num_values as usize, current.map(from_db).transpose()?))
}

fn check_len(task: &str, expected: usize, params: &[f32]) -> Result<(), StoreError> {
    if params.len() == expected {
        Ok(())
    } else {
        Err(StoreError::ParamsLength {
            task: task.to_owned(),
            expected,
            got: params.len(),
        })
    }
}

/// Writes a model version and moves the head to it.
async fn write_version(
    tx: &Transaction<'_>,
    task: &str,
    version: i64,
    params: &[f32],
    m: &[f32],
    v: &[f32],
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO model_version (task, version, params, optimizer_m, optimizer_v)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (task, version) DO UPDATE
         SET params = EXCLUDED.params, optimizer_m = EXCLUDED.optimizer_m,
             optimizer_v = EXCLUDED.optimizer_v, created = now()",
        &[
            &task,
            &version,
            &tensor::encode(params).as_ref(),
            &tensor::encode(m).as_ref(),
            &tensor::encode(v).as_ref(),
        ],
    )
    .await
    .during("writing the model version")?;
    tx.execute(
        "UPDATE task SET current_version = $2 WHERE name = $1",
        &[&task, &version],
    )
    .await
    .during("moving the task's head")?;
    Ok(())
}

pub(crate) async fn write_privacy(
    tx: &Transaction<'_>,
    task: &str,
    version: i64,
    privacy: &PrivacyState,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO privacy_state (task, model_version, state) VALUES ($1, $2, $3)
         ON CONFLICT (task) DO UPDATE
         SET model_version = EXCLUDED.model_version, state = EXCLUDED.state, updated = now()",
        &[&task, &version, &json(privacy, "privacy state")?],
    )
    .await
    .during("writing the privacy state")?;
    Ok(())
}

async fn append_summary(
    tx: &Transaction<'_>,
    task: &str,
    seq: i64,
    summary: &RoundSummary,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO round_summary (task, seq, round, model_version, summary)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &task,
            &seq,
            &i64::from(summary.round),
            &to_db(summary.model_version)?,
            &json(summary, "round summary")?,
        ],
    )
    .await
    .during("writing a round summary")?;
    Ok(())
}

/// Checks, before any transaction, that a new model follows `previous`.
fn check_follows(previous: Option<u64>, model: Option<&NewModel<'_>>) -> Result<(), StoreError> {
    if let Some(model) = model {
        if previous.is_some_and(|p| model.version <= p) {
            return Err(StoreError::InvalidVersion(format!(
                "{} does not follow {}",
                model.version,
                previous.unwrap_or_default()
            )));
        }
        to_db(model.version)?;
    }
    Ok(())
}

/// The shared core of [`Store::commit_version`] and [`Store::end_round`],
/// inside their transaction, the task's row locked (`locked`: what
/// [`lock_task`] returned): checks that the current version is `previous`
/// and the model's shape, writes the model (moving the head), appends the
/// summary (numbered after the history's last), replaces the privacy state
/// as of the new head. Returns the head afterwards.
async fn apply_step(
    tx: &Transaction<'_>,
    task: &str,
    (num_values, current): (usize, Option<u64>),
    previous: Option<u64>,
    model: Option<&NewModel<'_>>,
    summary: Option<&RoundSummary>,
    privacy: Option<&PrivacyState>,
) -> Result<Option<u64>, StoreError> {
    if current != previous {
        return Err(StoreError::StaleVersion {
            task: task.to_owned(),
            expected: previous,
            found: current,
        });
    }
    let mut head = current;
    if let Some(model) = model {
        check_len(task, num_values, model.params)?;
        for moments in [model.m, model.v] {
            if !moments.is_empty() {
                check_len(task, num_values, moments)?;
            }
        }
        let version = to_db(model.version)?;
        write_version(tx, task, version, model.params, model.m, model.v).await?;
        head = Some(model.version);
    }
    if let Some(summary) = summary {
        let row = tx
            .query_one(
                "SELECT coalesce(max(seq), 0) + 1 FROM round_summary WHERE task = $1",
                &[&task],
            )
            .await
            .during("numbering the round summary")?;
        append_summary(tx, task, row.get(0), summary).await?;
    }
    if let Some(privacy) = privacy {
        let version = head.ok_or_else(|| StoreError::NoModel(task.to_owned()))?;
        write_privacy(tx, task, to_db(version)?, privacy).await?;
    }
    Ok(head)
}

async fn write_run_state(
    tx: &Transaction<'_>,
    task: &str,
    version: i64,
    run: &RunState,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO run_state (task, model_version, state) VALUES ($1, $2, $3)
         ON CONFLICT (task) DO UPDATE
         SET model_version = EXCLUDED.model_version, state = EXCLUDED.state, updated = now()",
        &[&task, &version, &json(run, "run state")?],
    )
    .await
    .during("writing the run state")?;
    Ok(())
}

fn run_state_from_json(value: Value) -> Result<RunState, StoreError> {
    serde_json::from_value(value).map_err(|e| StoreError::Corrupt(format!("run state: {e}")))
}

/// The task's last ended round (0 without round counters).
pub(crate) async fn last_round(client: &impl GenericClient, task: &str) -> Result<u32, StoreError> {
    let row = client
        .query_opt("SELECT state FROM run_state WHERE task = $1", &[&task])
        .await
        .during("reading the last round")?;
    Ok(match row {
        Some(row) => run_state_from_json(row.get(0))?.last_round,
        None => 0,
    })
}

impl Store {
    /// Creates the task with its model layout, or checks that the stored
    /// task has the same one; refuses another shape with
    /// [`StoreError::TaskShape`], naming both.
    pub async fn open_task(&mut self, task: &str, layout: &Layout) -> Result<(), StoreError> {
        let num_values =
            i64::try_from(layout.num_values()).expect("a layout's size fits in memory, so in i64");
        self.client
            .execute(
                "INSERT INTO task (name, layout, num_values) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO NOTHING",
                &[&task, &layout_json(layout), &num_values],
            )
            .await
            .during("creating the task")?;
        let row = self
            .client
            .query_one("SELECT layout FROM task WHERE name = $1", &[&task])
            .await
            .during("reading the task")?;
        let stored = layout_from_json(row.get(0))?;
        if stored != *layout {
            return Err(StoreError::TaskShape {
                task: task.to_owned(),
                stored: stored.to_string(),
                wanted: layout.to_string(),
            });
        }
        Ok(())
    }

    /// Writes a single coordinator's checkpoint into the store, in one
    /// transaction: its model version (params and optimizer moments) as the
    /// task's current one, its history (replacing the task's), its privacy
    /// state and round counters, its joined devices as sessions. Refuses
    /// with [`StoreError::NewerInStore`] when the store's model is newer.
    /// A checkpoint of the store's current version replaces it, so
    /// importing the same checkpoint again changes nothing.
    pub async fn import_checkpoint(
        &mut self,
        task: &str,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        let version = to_db(checkpoint.model_version)?;
        let tx = self
            .client
            .transaction()
            .await
            .during("starting the import")?;
        let (num_values, current) = lock_task(&tx, task).await?;
        check_len(task, num_values, &checkpoint.params)?;
        for moments in [&checkpoint.m, &checkpoint.v] {
            if !moments.is_empty() {
                check_len(task, num_values, moments)?;
            }
        }
        if let Some(stored) = current.filter(|v| *v > checkpoint.model_version) {
            return Err(StoreError::NewerInStore {
                task: task.to_owned(),
                stored,
                checkpoint: checkpoint.model_version,
            });
        }
        write_version(
            &tx,
            task,
            version,
            &checkpoint.params,
            &checkpoint.m,
            &checkpoint.v,
        )
        .await?;
        tx.execute("DELETE FROM round_summary WHERE task = $1", &[&task])
            .await
            .during("replacing the history")?;
        for (seq, summary) in (1..).zip(&checkpoint.history) {
            append_summary(&tx, task, seq, summary).await?;
        }
        match &checkpoint.privacy {
            Some(privacy) => write_privacy(&tx, task, version, privacy).await?,
            None => {
                tx.execute("DELETE FROM privacy_state WHERE task = $1", &[&task])
                    .await
                    .during("clearing the privacy state")?;
            }
        }
        let run = RunState {
            last_round: checkpoint.last_round,
            run_start: checkpoint.run_start,
            training_rounds: checkpoint.training_rounds,
            final_evaluation_done: checkpoint.final_evaluation_done,
            training_stopped: checkpoint.training_stopped.clone(),
        };
        write_run_state(&tx, task, version, &run).await?;
        for pseudonym in &checkpoint.joined {
            tx.execute(
                "INSERT INTO session (task, pseudonym) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&task, pseudonym],
            )
            .await
            .during("writing a session")?;
        }
        tx.commit().await.during("committing the import")?;
        tracing::info!(
            task,
            version = checkpoint.model_version,
            rounds = checkpoint.history.len(),
            "checkpoint imported into the store"
        );
        Ok(())
    }

    /// The task's current model (None before its first version).
    pub async fn latest(&self, task: &str) -> Result<Option<Model>, StoreError> {
        let row = self
            .client
            .query_opt(
                "SELECT t.current_version, m.params, m.optimizer_m, m.optimizer_v
                 FROM task t
                 LEFT JOIN model_version m ON m.task = t.name AND m.version = t.current_version
                 WHERE t.name = $1",
                &[&task],
            )
            .await
            .during("reading the current model")?
            .ok_or_else(|| StoreError::UnknownTask(task.to_owned()))?;
        let Some(version) = row.get::<_, Option<i64>>(0) else {
            return Ok(None);
        };
        let params: Option<Vec<u8>> = row.get(1);
        let params = params.ok_or_else(|| {
            StoreError::Corrupt(format!("task {task:?}: version {version} has no row"))
        })?;
        Ok(Some(Model {
            version: from_db(version)?,
            params: decode(&params, "params")?,
            m: decode(
                &row.get::<_, Option<Vec<u8>>>(2).unwrap_or_default(),
                "moments",
            )?,
            v: decode(
                &row.get::<_, Option<Vec<u8>>>(3).unwrap_or_default(),
                "moments",
            )?,
        }))
    }

    /// The task's ended rounds, oldest first.
    pub async fn history(&self, task: &str) -> Result<Vec<RoundSummary>, StoreError> {
        let rows = self
            .client
            .query(
                "SELECT summary FROM round_summary WHERE task = $1 ORDER BY seq",
                &[&task],
            )
            .await
            .during("reading the history")?;
        rows.into_iter()
            .map(|row| {
                serde_json::from_value(row.get(0))
                    .map_err(|e| StoreError::Corrupt(format!("round summary: {e}")))
            })
            .collect()
    }

    /// The task's privacy state, when it has one.
    pub async fn privacy(&self, task: &str) -> Result<Option<PrivacyState>, StoreError> {
        let row = self
            .client
            .query_opt("SELECT state FROM privacy_state WHERE task = $1", &[&task])
            .await
            .during("reading the privacy state")?;
        row.map(|row| {
            serde_json::from_value(row.get(0))
                .map_err(|e| StoreError::Corrupt(format!("privacy state: {e}")))
        })
        .transpose()
    }

    /// Commits a round's outcome in one transaction: the new model version
    /// becomes current, its summary joins the history, the privacy state is
    /// replaced. The transaction locks the task and checks that its current
    /// version is `new.previous`; if not, it fails with
    /// [`StoreError::StaleVersion`] and writes nothing, so a round is
    /// applied exactly once however many leaders or retries try it.
    ///
    /// The replicated coordinator's leader uses [`Store::end_round`], which
    /// checks the round number too and moves the round counters with it;
    /// both share the same checks and writes.
    pub async fn commit_version(
        &mut self,
        task: &str,
        new: &NewVersion<'_>,
    ) -> Result<(), StoreError> {
        let model = NewModel {
            version: new.version,
            params: new.params,
            m: new.m,
            v: new.v,
        };
        check_follows(new.previous, Some(&model))?;
        let tx = self
            .client
            .transaction()
            .await
            .during("starting the commit")?;
        let locked = lock_task(&tx, task).await?;
        apply_step(
            &tx,
            task,
            locked,
            new.previous,
            Some(&model),
            new.summary,
            new.privacy,
        )
        .await?;
        tx.commit().await.during("committing the model version")?;
        Ok(())
    }

    /// Ends round `end.round` in one transaction, the replicated leader's
    /// "applied exactly once": the new model version (if any) becomes
    /// current, the summary joins the history, the round counters and the
    /// privacy state are replaced, and the round's order is thereby closed
    /// ([`Store::open_order`] looks past `last_round`).
    ///
    /// The transaction locks the task's row and refuses, writing nothing,
    /// a round that is not past the stored `last_round` (0 without round
    /// counters) with [`StoreError::StaleRound`] (a leader's retry after a
    /// lost answer, or a deposed leader ending a round its successor
    /// already ended), and a `previous` that is not the current version
    /// with [`StoreError::StaleVersion`]. A new model must follow
    /// `previous` ([`StoreError::InvalidVersion`]) and have the task's
    /// shape ([`StoreError::ParamsLength`]); a round that ends with no
    /// model in the store at all is refused with [`StoreError::NoModel`]
    /// (the counters are stored as of a model version).
    ///
    /// Housekeeping in the same transaction: partial sums and round orders
    /// of rounds up to `end.round - 5` are deleted; the last few stay for
    /// debugging.
    pub async fn end_round(&mut self, task: &str, end: &EndRound<'_>) -> Result<(), StoreError> {
        check_follows(end.previous, end.model.as_ref())?;
        let tx = self
            .client
            .transaction()
            .await
            .during("starting the round's end")?;
        let locked = lock_task(&tx, task).await?;
        let last = last_round(&tx, task).await?;
        if last >= end.round {
            return Err(StoreError::StaleRound {
                task: task.to_owned(),
                round: end.round,
                last,
            });
        }
        let current = apply_step(
            &tx,
            task,
            locked,
            end.previous,
            end.model.as_ref(),
            Some(end.summary),
            end.privacy,
        )
        .await?
        .ok_or_else(|| StoreError::NoModel(task.to_owned()))?;
        write_run_state(&tx, task, to_db(current)?, end.run).await?;
        let horizon = i64::from(end.round) - KEEP_ROUNDS;
        for (sql, what) in [
            (
                "DELETE FROM partial_sum WHERE task = $1 AND round <= $2",
                "deleting old partial sums",
            ),
            (
                "DELETE FROM round_order WHERE task = $1 AND round <= $2",
                "deleting old round orders",
            ),
        ] {
            tx.execute(sql, &[&task, &horizon]).await.during(what)?;
        }
        tx.commit().await.during("committing the round's end")?;
        Ok(())
    }

    /// Replaces the task's round counters without ending a round (training
    /// stopped by the privacy budget, which every replica then follows).
    /// Refuses, writing nothing, counters whose `last_round` is not the
    /// stored one with [`StoreError::StaleRound`] (a deposed leader's view),
    /// and a task with no model with [`StoreError::NoModel`].
    pub async fn put_run_state(&mut self, task: &str, run: &RunState) -> Result<(), StoreError> {
        let tx = self
            .client
            .transaction()
            .await
            .during("starting to update the run state")?;
        let (_, current) = lock_task(&tx, task).await?;
        let last = last_round(&tx, task).await?;
        if last != run.last_round {
            return Err(StoreError::StaleRound {
                task: task.to_owned(),
                round: run.last_round,
                last,
            });
        }
        let current = current.ok_or_else(|| StoreError::NoModel(task.to_owned()))?;
        write_run_state(&tx, task, to_db(current)?, run).await?;
        tx.commit().await.during("committing the run state")?;
        Ok(())
    }

    /// The task's round counters (None before any: a task neither imported
    /// nor past its first round, or an unknown task). A replica reads them
    /// to know which round is open and where the run stands.
    pub async fn run_state(&self, task: &str) -> Result<Option<RunState>, StoreError> {
        let row = self
            .client
            .query_opt(
                &self
                    .prepared("SELECT state FROM run_state WHERE task = $1")
                    .await?,
                &[&task],
            )
            .await
            .during("reading the run state")?;
        row.map(|row| run_state_from_json(row.get(0))).transpose()
    }
}
