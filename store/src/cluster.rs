//! What the replicas of a task share besides the model: the leader's round
//! orders, each replica's heartbeat, and device sessions.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use fedrec_coordinator::history::TaskKind;
use fedrec_coordinator::privacy::RoundPrivacy;
use serde::{Deserialize, Serialize};
use tokio_postgres::error::SqlState;

use crate::error::Context;
use crate::task::{from_db, json, last_round, lock_task, to_db, write_privacy};
use crate::{PrivacyState, Store, StoreError};

/// A round as the leader opens it: what every replica's share of the round
/// is to be. Stored in `round_order`; open while its round is past the
/// task's `last_round` ([`Store::open_order`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RoundOrder {
    /// The round: the task's `last_round + 1`.
    pub round: u32,
    /// The model version the round trains or evaluates: the task's current
    /// one.
    pub model_version: u64,
    /// Training or evaluation.
    pub kind: TaskKind,
    /// When the replicas close their shares. The store keeps microseconds:
    /// finer parts are dropped.
    pub deadline: SystemTime,
    /// Per replica name, its share.
    pub shares: BTreeMap<String, Share>,
    /// Under differential privacy (training rounds): the round's privacy,
    /// which every replica and whichever leader ends the round apply.
    pub privacy: Option<RoundPrivacy>,
}

/// One replica's share of a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// How many of its waiting devices the replica selects.
    pub take: usize,
    /// How many updates (or evaluations) its share needs to count.
    pub needed: usize,
}

/// A replica's heartbeat: where it serves and how many devices it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaBeat {
    /// The replica's name (`[cluster]`'s replica name), unique in the task.
    pub name: String,
    /// Where it serves devices.
    pub url: String,
    /// Its devices waiting to be selected.
    pub waiting: u64,
    /// Its joined devices.
    pub joined: u64,
}

fn kind_to_db(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::Evaluate => "evaluate",
        // TaskKind is non-exhaustive; a new kind needs a migration (the
        // column's CHECK) before it can be stored anyway.
        _ => "train",
    }
}

fn kind_from_db(kind: &str) -> Result<TaskKind, StoreError> {
    match kind {
        "train" => Ok(TaskKind::Train),
        "evaluate" => Ok(TaskKind::Evaluate),
        other => Err(StoreError::Corrupt(format!("round kind {other:?}"))),
    }
}

/// A count as a `bigint` (counts beyond 2^63 - 1 saturate: they cannot
/// happen).
fn count_to_db(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn count_from_db(n: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("negative {what} {n}")))
}

/// A foreign-key violation on `task` means the task is not in the store.
fn unknown_task(
    task: &str,
    what: &'static str,
) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    let task = task.to_owned();
    move |e| {
        if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) {
            StoreError::UnknownTask(task)
        } else {
            StoreError::Query { what, source: e }
        }
    }
}

/// The database's cumulative activity counters (PostgreSQL's
/// `pg_stat_database` for the store's database), for measuring the load a
/// coordinator puts on it. PostgreSQL updates them when a session's
/// transaction ends, at most once a second, and an idle session's only
/// after about ten seconds: compare readings taken that far apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct DbActivity {
    /// Transactions committed and rolled back (each statement outside an
    /// explicit transaction is one).
    pub transactions: i64,
    /// Rows read by scans (`tup_returned`).
    pub rows_read: i64,
    /// Rows inserted, updated and deleted.
    pub rows_written: i64,
}

impl std::ops::Sub for DbActivity {
    type Output = Self;
    fn sub(self, rhs: Self) -> Self {
        Self {
            transactions: self.transactions - rhs.transactions,
            rows_read: self.rows_read - rhs.rows_read,
            rows_written: self.rows_written - rhs.rows_written,
        }
    }
}

impl Store {
    /// The database's activity counters now (see [`DbActivity`]).
    pub async fn activity(&self) -> Result<DbActivity, StoreError> {
        let row = self
            .client
            .query_one(
                "SELECT xact_commit + xact_rollback, tup_returned,
                        tup_inserted + tup_updated + tup_deleted
                 FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await
            .during("reading the database's activity")?;
        Ok(DbActivity {
            transactions: row.get(0),
            rows_read: row.get(1),
            rows_written: row.get(2),
        })
    }

    /// Opens a round by writing its order, once: in one transaction with
    /// the task's row locked, the order is inserted only if the round has
    /// no order yet, `order.model_version` is the task's current version
    /// and `order.round` follows the last ended round (`last_round + 1`, 0
    /// without round counters). Returns whether it was inserted; `false`
    /// changes nothing. So a leader that lost its lease, or retries after a
    /// lost answer, cannot open a round twice or open one on a stale model:
    /// it reads [`Store::open_order`] to see what is open instead.
    ///
    /// `accountant`, under differential privacy, is the privacy state with
    /// this round counted: it replaces the task's in the same transaction,
    /// so a round is counted exactly when its order exists.
    pub async fn open_round(
        &mut self,
        task: &str,
        order: &RoundOrder,
        accountant: Option<&PrivacyState>,
    ) -> Result<bool, StoreError> {
        let shares = json(&order.shares, "round shares")?;
        let privacy = order
            .privacy
            .as_ref()
            .map(|p| json(p, "round privacy"))
            .transpose()?;
        let version = to_db(order.model_version)?;
        let tx = self
            .client
            .transaction()
            .await
            .during("starting to open a round")?;
        let (_, current) = lock_task(&tx, task).await?;
        if current != Some(order.model_version) {
            return Ok(false);
        }
        let last = last_round(&tx, task).await?;
        if u64::from(last) + 1 != u64::from(order.round) {
            return Ok(false);
        }
        let inserted = tx
            .execute(
                "INSERT INTO round_order
                 (task, round, model_version, kind, deadline, shares, privacy)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (task, round) DO NOTHING",
                &[
                    &task,
                    &i64::from(order.round),
                    &version,
                    &kind_to_db(order.kind),
                    &order.deadline,
                    &shares,
                    &privacy,
                ],
            )
            .await
            .during("writing the round order")?;
        if inserted == 1
            && let Some(accountant) = accountant
        {
            write_privacy(&tx, task, version, accountant).await?;
        }
        tx.commit().await.during("committing the round order")?;
        Ok(inserted == 1)
    }

    /// The open round's order: the highest order past the task's last
    /// ended round (None between rounds). Every replica polls it to learn
    /// that a round has opened and what its share is; the round's end
    /// ([`Store::end_round`]) moves `last_round` and so closes it.
    pub async fn open_order(&self, task: &str) -> Result<Option<RoundOrder>, StoreError> {
        let row = self
            .client
            .query_opt(
                &self.prepared("SELECT round, model_version, kind, deadline, shares, privacy FROM round_order
                 WHERE task = $1 AND round > coalesce(
                     (SELECT (state->>'last_round')::bigint FROM run_state WHERE task = $1), 0)
                 ORDER BY round DESC LIMIT 1").await?,
                &[&task],
            )
            .await
            .during("reading the open round's order")?;
        let Some(row) = row else {
            return Ok(None);
        };
        let round: i64 = row.get(0);
        Ok(Some(RoundOrder {
            round: u32::try_from(round)
                .map_err(|_| StoreError::Corrupt(format!("round number {round}")))?,
            model_version: from_db(row.get(1))?,
            kind: kind_from_db(row.get(2))?,
            deadline: row.get(3),
            shares: serde_json::from_value(row.get(4))
                .map_err(|e| StoreError::Corrupt(format!("round {round}'s shares: {e}")))?,
            privacy: row
                .get::<_, Option<serde_json::Value>>(5)
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("round {round}'s privacy: {e}")))?,
        }))
    }

    /// Records the task's catalogue (its item ids in model order, as a
    /// SHA-256 digest) the first time, and refuses another one afterwards
    /// with [`StoreError::TaskCatalogue`]: replicas whose model rows mean
    /// different items must not train one model.
    pub async fn check_catalogue(&self, task: &str, ids: &[String]) -> Result<(), StoreError> {
        let text = ids.join("\n");
        self.client
            .execute(
                "UPDATE task SET catalogue = sha256(convert_to($2, 'UTF8'))
                 WHERE name = $1 AND catalogue IS NULL",
                &[&task, &text],
            )
            .await
            .during("recording the task's catalogue")?;
        let same: Option<bool> = self
            .client
            .query_opt(
                "SELECT catalogue = sha256(convert_to($2, 'UTF8')) FROM task WHERE name = $1",
                &[&task, &text],
            )
            .await
            .during("checking the task's catalogue")?
            .ok_or_else(|| StoreError::UnknownTask(task.to_owned()))?
            .get(0);
        match same {
            Some(true) => Ok(()),
            _ => Err(StoreError::TaskCatalogue(task.to_owned())),
        }
    }

    /// Records a replica's heartbeat (replacing its previous one), stamped
    /// with the database's clock so that replicas' clocks need not agree.
    /// The leader sizes its round orders from the recent ones
    /// ([`Store::replicas`]).
    pub async fn heartbeat(&self, task: &str, beat: &ReplicaBeat) -> Result<(), StoreError> {
        self.client
            .execute(
                &self
                    .prepared(
                        "INSERT INTO replica (task, name, url, waiting, joined, seen)
                 VALUES ($1, $2, $3, $4, $5, now())
                 ON CONFLICT (task, name) DO UPDATE
                 SET url = EXCLUDED.url, waiting = EXCLUDED.waiting,
                     joined = EXCLUDED.joined, seen = EXCLUDED.seen",
                    )
                    .await?,
                &[
                    &task,
                    &beat.name,
                    &beat.url,
                    &count_to_db(beat.waiting),
                    &count_to_db(beat.joined),
                ],
            )
            .await
            .map_err(unknown_task(task, "recording a heartbeat"))?;
        Ok(())
    }

    /// The replicas whose last heartbeat is at most `within` old by the
    /// database's clock, by name: the live ones, among which the leader
    /// shares out a round (a replica that stopped beating drops out by
    /// itself, with no one to remove it).
    pub async fn replicas(
        &self,
        task: &str,
        within: Duration,
    ) -> Result<Vec<ReplicaBeat>, StoreError> {
        let rows = self
            .client
            .query(
                &self
                    .prepared(
                        "SELECT name, url, waiting, joined FROM replica
                 WHERE task = $1 AND seen >= now() - $2::float8 * interval '1 second'
                 ORDER BY name",
                    )
                    .await?,
                &[&task, &within.as_secs_f64()],
            )
            .await
            .during("reading the replicas")?;
        rows.into_iter()
            .map(|row| {
                Ok(ReplicaBeat {
                    name: row.get(0),
                    url: row.get(1),
                    waiting: count_from_db(row.get(2), "waiting count")?,
                    joined: count_from_db(row.get(3), "joined count")?,
                })
            })
            .collect()
    }

    /// Records (or renews) a device's session, valid for `ttl` from the
    /// database's now, so that any replica can serve the device.
    ///
    /// `token` is the digest of the enrollment token it joined with and
    /// that token's limit of live sessions (`auth.max_sessions_per_token`):
    /// the token's oldest live sessions beyond the limit, wherever they
    /// joined, are ended, so the limit holds across replicas. `None` keeps
    /// the stored token and ends nothing (a renewal need not know it).
    /// Returns the pseudonyms ended.
    ///
    /// One statement, so one transaction: the session is recorded and the
    /// token's oldest ended together, or neither. Two joins of one token at
    /// once both keep the token's newest sessions, so they agree.
    pub async fn put_session(
        &self,
        task: &str,
        pseudonym: &str,
        token: Option<(&str, u32)>,
        ttl: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let (digest, max) = token.unzip();
        // The UPDATE does not see the row the INSERT adds (one snapshot):
        // it keeps the newest max - 1 of the others.
        let rows = self
            .client
            .query(
                &self
                    .prepared(
                        "WITH joined AS (
                     INSERT INTO session (task, pseudonym, token, expires)
                     VALUES ($1, $2, $3, now() + $5::float8 * interval '1 second')
                     ON CONFLICT (task, pseudonym) DO UPDATE
                     SET token = coalesce(EXCLUDED.token, session.token),
                         expires = EXCLUDED.expires)
                 UPDATE session SET expires = least(expires, now()), replaced = now()
                 WHERE task = $1 AND pseudonym IN (
                     SELECT pseudonym FROM session
                     WHERE task = $1 AND token = $3 AND replaced IS NULL AND pseudonym <> $2
                       AND (expires IS NULL OR expires > now())
                     ORDER BY created DESC, pseudonym DESC OFFSET $4::bigint - 1)
                 RETURNING pseudonym",
                    )
                    .await?,
                &[
                    &task,
                    &pseudonym,
                    &digest,
                    &i64::from(max.unwrap_or(1)),
                    &ttl.as_secs_f64(),
                ],
            )
            .await
            .map_err(unknown_task(task, "writing a session"))?;
        Ok(rows.into_iter().map(|row| row.get(0)).collect())
    }

    /// A device's session: None when it is unknown or expired (the device
    /// must join again), `Some(None)` when it has no expiry (imported from a
    /// checkpoint, which keeps none), else `Some(Some(remaining))`.
    pub async fn session(
        &self,
        task: &str,
        pseudonym: &str,
    ) -> Result<Option<Option<Duration>>, StoreError> {
        let row = self
            .client
            .query_opt(
                &self
                    .prepared(
                        "SELECT extract(epoch FROM (expires - now()))::float8 FROM session
                 WHERE task = $1 AND pseudonym = $2 AND replaced IS NULL
                   AND (expires IS NULL OR expires > now())",
                    )
                    .await?,
                &[&task, &pseudonym],
            )
            .await
            .during("reading a session")?;
        Ok(row.map(|row| {
            row.get::<_, Option<f64>>(0)
                .map(|secs| Duration::from_secs_f64(secs.max(0.0)))
        }))
    }

    /// The sessions a newer join of their token ended within the last
    /// `within` (the database's clock): a replica ends those it holds.
    pub async fn replaced_sessions(
        &self,
        task: &str,
        within: Duration,
    ) -> Result<Vec<String>, StoreError> {
        let rows = self
            .client
            .query(
                &self
                    .prepared(
                        "SELECT pseudonym FROM session
                 WHERE task = $1 AND replaced >= now() - $2::float8 * interval '1 second'",
                    )
                    .await?,
                &[&task, &within.as_secs_f64()],
            )
            .await
            .during("reading the replaced sessions")?;
        Ok(rows.into_iter().map(|row| row.get(0)).collect())
    }

    /// Housekeeping: deletes the sessions that ended more than `keep` ago
    /// and the heartbeats of replicas silent for longer than `keep`.
    /// Returns how many rows of each went.
    pub async fn sweep(&self, task: &str, keep: Duration) -> Result<(u64, u64), StoreError> {
        let keep = keep.as_secs_f64();
        let sessions = self
            .client
            .execute(
                "DELETE FROM session
                 WHERE task = $1 AND expires < now() - $2::float8 * interval '1 second'",
                &[&task, &keep],
            )
            .await
            .during("deleting ended sessions")?;
        let replicas = self
            .client
            .execute(
                "DELETE FROM replica
                 WHERE task = $1 AND seen < now() - $2::float8 * interval '1 second'",
                &[&task, &keep],
            )
            .await
            .during("deleting silent replicas")?;
        Ok((sessions, replicas))
    }

    /// Ends a device's session (nothing if it has none): it left, or was
    /// removed.
    pub async fn end_session(&self, task: &str, pseudonym: &str) -> Result<(), StoreError> {
        self.client
            .execute(
                "DELETE FROM session WHERE task = $1 AND pseudonym = $2",
                &[&task, &pseudonym],
            )
            .await
            .during("ending a session")?;
        Ok(())
    }
}
