//! Leadership of a task: one replica at a time steps a task's model.
//!
//! The lease is a PostgreSQL session advisory lock on the task's name
//! (the two-key form, in its own key space: class [`LEADER_LOCK_CLASS`] and
//! `hashtext(task)`), held by the leading replica's connection. PostgreSQL
//! releases it when that connection ends, however it ends: a replica killed
//! with SIGKILL loses its socket and with it the lease, with no expiry to
//! wait for and no clock of ours involved. Another replica then takes it on
//! its next [`Store::try_lead`]. A replica that is cut off from the store
//! but still running must stop stepping the model as soon as a store call
//! fails: its lease may be gone; [`Store::end_round`]'s checks of the round
//! and of the previous version (and [`Store::commit_version`]'s of the
//! version) keep a stale leader from applying a round twice even so, and
//! [`Store::open_round`]'s keep it from opening one twice.

use crate::error::Context;
use crate::{Store, StoreError};

/// The first key of the leader locks (`"fedr"` as a big-endian `i32`),
/// apart from the migration lock's single-key space.
pub const LEADER_LOCK_CLASS: i32 = 0x6665_6472;

impl Store {
    /// Takes the leadership of `task` if no other connection holds it, and
    /// returns whether this connection leads (again `true` if it already
    /// did: the lock is taken at most once per connection).
    pub async fn try_lead(&mut self, task: &str) -> Result<bool, StoreError> {
        if self.leading.contains(task) {
            return Ok(true);
        }
        let row = self
            .client
            .query_one(
                &self
                    .prepared("SELECT pg_try_advisory_lock($1, hashtext($2))")
                    .await?,
                &[&LEADER_LOCK_CLASS, &task],
            )
            .await
            .during("taking the task's leadership")?;
        let leads: bool = row.get(0);
        if leads {
            self.leading.insert(task.to_owned());
        }
        Ok(leads)
    }

    /// Waits until this connection leads `task` (when the leader resigns or
    /// its connection ends). The connection does nothing else meanwhile:
    /// a follower waits on a connection of its own.
    pub async fn lead(&mut self, task: &str) -> Result<(), StoreError> {
        if self.leading.contains(task) {
            return Ok(());
        }
        self.client
            .execute(
                "SELECT pg_advisory_lock($1, hashtext($2))",
                &[&LEADER_LOCK_CLASS, &task],
            )
            .await
            .during("waiting for the task's leadership")?;
        self.leading.insert(task.to_owned());
        Ok(())
    }

    /// Gives up the leadership of `task` (nothing if this connection does
    /// not lead it), so that another replica can take it at once.
    pub async fn resign(&mut self, task: &str) -> Result<(), StoreError> {
        if !self.leading.remove(task) {
            return Ok(());
        }
        self.client
            .execute(
                "SELECT pg_advisory_unlock($1, hashtext($2))",
                &[&LEADER_LOCK_CLASS, &task],
            )
            .await
            .during("giving up the task's leadership")?;
        Ok(())
    }

    /// Whether this connection leads `task` (as far as it knows: a lost
    /// connection loses the lease, and the next store call fails).
    pub fn leads(&self, task: &str) -> bool {
        self.leading.contains(task)
    }
}
