//! Versioned schema migrations, embedded in the build.
//!
//! [`MIGRATIONS`] is the ordered list; the store's `schema_version` table
//! records each one applied. [`migrate`] holds a PostgreSQL advisory lock
//! ([`MIGRATION_LOCK`]) while it reads the version and applies what is
//! missing, each migration in its own transaction together with its
//! `schema_version` row, so replicas starting at once apply every migration
//! exactly once, and a crash leaves the store at some whole version. A store
//! whose schema is newer than this build's is refused, untouched.

use tokio_postgres::Client;

use crate::StoreError;
use crate::error::Context;

/// One schema change.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    /// Its version: 1, 2, 3… in order, with no gaps.
    pub version: i32,
    /// A short name, recorded beside the version.
    pub name: &'static str,
    /// The SQL, applied in one transaction.
    pub sql: &'static str,
}

/// Every migration this build knows, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "partial_sum",
        sql: include_str!("../migrations/0002_partial_sum.sql"),
    },
    Migration {
        version: 3,
        name: "cluster",
        sql: include_str!("../migrations/0003_cluster.sql"),
    },
    Migration {
        version: 4,
        name: "cluster_privacy_tokens",
        sql: include_str!("../migrations/0004_cluster_privacy_tokens.sql"),
    },
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// The advisory lock key held while migrating ("fedrecmg" as a big-endian
/// i64), the same for every fedrec.
pub const MIGRATION_LOCK: i64 = i64::from_be_bytes(*b"fedrecmg");

/// Brings the schema up to [`SCHEMA_VERSION`]; returns the versions applied
/// (empty when it was current). Refuses a newer schema with
/// [`StoreError::SchemaTooNew`].
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .during("taking the migration lock")?;
    let result = apply(client).await;
    // The lock belongs to the session: released here, or by the server if
    // the connection is gone.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .during("releasing the migration lock");
    let applied = result?;
    unlocked?;
    Ok(applied)
}

/// The schema version recorded in the store (0 for an empty store).
pub async fn schema_version(client: &Client) -> Result<i32, StoreError> {
    let row = client
        .query_one(
            "SELECT to_regclass('schema_version') IS NOT NULL AS present",
            &[],
        )
        .await
        .during("looking for schema_version")?;
    if !row.get::<_, bool>(0) {
        return Ok(0);
    }
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await
        .during("reading the schema version")?;
    Ok(row.get(0))
}

async fn apply(client: &mut Client) -> Result<Vec<i32>, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                 version integer PRIMARY KEY,
                 name    text NOT NULL,
                 applied timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .during("creating schema_version")?;
    let current = schema_version(client).await?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: SCHEMA_VERSION,
        });
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        let tx = client.transaction().await.during("starting a migration")?;
        tx.batch_execute(m.sql)
            .await
            .during("applying a migration")?;
        tx.execute(
            "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .during("recording a migration")?;
        tx.commit().await.during("committing a migration")?;
        tracing::info!(version = m.version, name = m.name, "store schema migrated");
        applied.push(m.version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
        }
    }
}
