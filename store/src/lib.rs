//! The coordinator's shared state on PostgreSQL: the foundation of the
//! replicated coordinator (`fedrec serve --store postgres://…`).
//!
//! A single coordinator keeps its state in a checkpoint file
//! ([`fedrec_coordinator::checkpoint`]). Replicas instead share one
//! PostgreSQL, which gives them consensus and durability: this crate holds
//! the schema, its migrations, and the few transactions the replicas build on.
//!
//! # How the pieces fit
//!
//! - [`Store::connect`] opens a connection and brings the schema up to date
//!   ([`migrate`]: versioned migrations embedded in the build, applied under
//!   an advisory lock, refused when the store is newer than the build).
//! - [`Store::open_task`] creates a task with its model layout, or checks
//!   that the stored one has the same shape.
//! - [`Store::import_checkpoint`] moves a single coordinator's checkpoint
//!   into the store; [`Store::latest`] reads the current model back.
//! - [`Store::try_lead`] takes a task's leadership: a session advisory lock
//!   that PostgreSQL releases when the leader's connection ends (see
//!   [`lead`](crate::Store::try_lead)).
//! - [`Store::put_partial`] commits one replica's share of a round (its
//!   devices' weighted sum) once; [`Store::partials`] gives the leader
//!   every share of the round.
//! - [`Store::commit_version`] is the "applied exactly once" primitive: a new
//!   model version, its round summary and the accountant's state, written in
//!   one transaction that checks the version it replaces.
//!
//! The replicated coordinator builds on these:
//!
//! - [`Store::open_round`]: the leader opens round `last_round + 1` on the
//!   current model by writing its [`RoundOrder`] (each replica's [`Share`],
//!   and under differential privacy the round's privacy), once, together
//!   with the accountant's state that counts it; replicas read it with
//!   [`Store::open_order`].
//! - [`Store::end_round`]: the leader ends the round in one transaction
//!   ([`EndRound`]): new model version if any, summary, [`RunState`],
//!   privacy state; it checks both the round number
//!   ([`StoreError::StaleRound`]) and the version it replaces, so a round
//!   ends exactly once. [`Store::run_state`] reads the counters back;
//!   [`Store::put_run_state`] records training stopped between rounds (the
//!   privacy budget spent).
//! - [`Store::heartbeat`] and [`Store::replicas`]: each replica's
//!   [`ReplicaBeat`] (waiting and joined devices), stamped by the database's
//!   clock; the leader shares rounds among the recently seen.
//! - [`Store::put_session`], [`Store::session`], [`Store::end_session`]:
//!   device sessions with an expiry, so any replica can serve any device.
//!
//! ```no_run
//! # async fn demo(layout: fedrec_proto::Layout, params: Vec<f32>) -> Result<(), fedrec_store::StoreError> {
//! use fedrec_store::{NewVersion, Store};
//!
//! let mut store = Store::connect("postgres://fedrec@db.internal/fedrec").await?;
//! store.open_task("shop", &layout).await?;
//! let current = store.latest("shop").await?.map(|m| m.version);
//! store
//!     .commit_version("shop", &NewVersion {
//!         previous: current,
//!         version: current.map_or(1, |v| v + 1),
//!         params: &params,
//!         m: &[],
//!         v: &[],
//!         summary: None,
//!         privacy: None,
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # The schema (version 4, `migrations/`)
//!
//! | table | one row per | holds |
//! |---|---|---|
//! | `schema_version` | applied migration | version, name, when |
//! | `task` | task | name, layout (JSON), number of values (the shape check), `current_version` (the head), the catalogue's SHA-256 (version 3), created |
//! | `model_version` | (task, version) | params (little-endian `f32`, bytea), the server optimizer's moments, created |
//! | `round_summary` | (task, seq) | round number, model version, the [`RoundSummary`] as JSON |
//! | `privacy_state` | task | the [`PrivacyState`] (ledger, clip) as JSON, as of a model version |
//! | `run_state` | task | a checkpoint's round counters as JSON |
//! | `session` | (task, pseudonym) | a joined device's session: its enrollment token's digest, its expiry |
//! | `partial_sum` (version 2) | (task, round, model version, replica) | a replica's share of a round: weighted sum, weight, updates, evaluation counts; updates within the clipping bound (version 4) |
//! | `round_order` (version 3) | (task, round) | the leader's order opening a round: model version, kind (`train`/`evaluate`), deadline, each replica's share (JSON); the round's privacy (JSON, version 4) |
//! | `replica` (version 3) | (task, replica name) | a replica's heartbeat: url, waiting and joined devices, when last seen (the database's clock) |
//!
//! A model version is one `bytea` value, so at most 1 GiB: 256 M parameters,
//! far beyond today's models; a chunked table would lift that in a migration.
//!
//! `task.current_version` moves only through `UPDATE … WHERE current_version
//! IS NOT DISTINCT FROM <expected>`: PostgreSQL locks the row, so of two
//! commits naming the same previous version exactly one succeeds; the other
//! gets [`StoreError::StaleVersion`] and writes nothing.
//!
//! # What later slices add
//!
//! - a connection pool (methods with a transaction take `&mut self` on one
//!   connection; reads and single statements take `&self`, which
//!   tokio-postgres allows to run concurrently on one connection);
//! - removing expired sessions and long-silent replicas' rows.
//!
//! Tests run against a real PostgreSQL started by `fedrec_store::testing`
//! (feature `testing`: `initdb` on a temporary directory, a free port).

mod cluster;
mod error;
mod lead;
pub mod migrate;
mod partial;
mod task;
#[cfg(feature = "testing")]
pub mod testing;
mod tls;

use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config, NoTls, Socket};

pub use cluster::{DbActivity, ReplicaBeat, RoundOrder, Share};
use error::Context;
pub use error::StoreError;
pub use fedrec_coordinator::checkpoint::{Checkpoint, PrivacyState};
pub use fedrec_coordinator::history::RoundSummary;
pub use lead::LEADER_LOCK_CLASS;
pub use migrate::SCHEMA_VERSION;
pub use partial::Partial;
pub use task::{EndRound, Model, NewModel, NewVersion, RunState};

/// How long [`Store::connect`] waits for the server when the URL sets no
/// `connect_timeout`.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to the store, its schema current.
pub struct Store {
    client: Client,
    target: String,
    /// Tasks this connection leads ([`Store::try_lead`]).
    leading: std::collections::BTreeSet<String>,
    /// The frequent statements, prepared once on this connection
    /// ([`Store::prepared`]).
    prepared: std::sync::Mutex<std::collections::HashMap<&'static str, tokio_postgres::Statement>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to the PostgreSQL at `url` (`postgres://user:password@host:port/database`,
    /// or libpq's `key=value` form) and migrates its schema to
    /// [`SCHEMA_VERSION`]. With `sslmode=require` (or `sslrootcert=FILE`)
    /// the connection is TLS, the server's certificate verified against
    /// `sslrootcert`'s CA certificates or the public web roots; otherwise it
    /// is plain TCP. Errors say what failed (unreachable, login, database,
    /// certificate, schema too new) and name the server without the
    /// password.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (url, root_cert) = tls::take_root_cert(url);
        let mut config: Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::InvalidUrl(e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let encrypted = match config.get_ssl_mode() {
            SslMode::Require => true,
            SslMode::Disable => false,
            _ => root_cert.is_some(),
        };
        let (mut client, target) = if encrypted {
            config.ssl_mode(SslMode::Require);
            let target = format!("{} over TLS", describe(&config));
            let connector = tls::connector(root_cert.as_deref())?;
            (open(&config, connector, &target).await?, target)
        } else {
            let target = describe(&config);
            (open(&config, NoTls, &target).await?, target)
        };
        migrate::migrate(&mut client).await?;
        Ok(Self {
            client,
            target,
            leading: Default::default(),
            prepared: Default::default(),
        })
    }

    /// `sql` prepared on this connection, once. A statement given as text
    /// is prepared again at every call, which costs PostgreSQL a second
    /// round trip (and a transaction of its own): the statements of every
    /// join, session lookup and tick of a replica's loop go through here.
    pub(crate) async fn prepared(
        &self,
        sql: &'static str,
    ) -> Result<tokio_postgres::Statement, StoreError> {
        let cached = self
            .prepared
            .lock()
            .expect("not poisoned")
            .get(sql)
            .cloned();
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = self
            .client
            .prepare(sql)
            .await
            .during("preparing a statement")?;
        self.prepared
            .lock()
            .expect("not poisoned")
            .insert(sql, statement.clone());
        Ok(statement)
    }

    /// Lets this connection's commits return before they reach the disk
    /// (`synchronous_commit = off`): a PostgreSQL crash may lose its last
    /// few commits, never corrupt anything. For writes that are cheap to
    /// lose and frequent: device sessions (a device whose session is lost
    /// joins again), so that a join does not wait for a disk flush.
    pub async fn relax_commits(&self) -> Result<(), StoreError> {
        self.client
            .batch_execute("SET synchronous_commit = off")
            .await
            .during("relaxing the connection's commits")?;
        Ok(())
    }

    /// The server, as `user@host:port/database`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Whether this connection is encrypted, as the server sees it
    /// (`pg_stat_ssl`).
    pub async fn encrypted(&self) -> Result<bool, StoreError> {
        let row = self
            .client
            .query_one(
                "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
                &[],
            )
            .await
            .during("reading the connection's encryption")?;
        Ok(row.get(0))
    }

    /// The schema version recorded in the store.
    pub async fn schema_version(&self) -> Result<i32, StoreError> {
        migrate::schema_version(&self.client).await
    }
}

/// `user@host:port/database`, from the parsed configuration (never the
/// password).
/// Connects with `tls` and runs the connection on its own task (which logs
/// its end); errors name `target`.
async fn open<T>(config: &Config, tls: T, target: &str) -> Result<Client, StoreError>
where
    T: MakeTlsConnect<Socket> + Send,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, connection) = config
        .connect(tls)
        .await
        .map_err(|e| connect_error(target, e))?;
    let log_target = target.to_owned();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(store = %log_target, error = %e, "store connection lost");
        }
    });
    Ok(client)
}

fn describe(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => format!("{host}:5432"),
            }
        })
        .collect();
    format!(
        "{}@{}/{}",
        config.get_user().unwrap_or("?"),
        hosts.join(","),
        config.get_dbname().or(config.get_user()).unwrap_or("?")
    )
}

/// Sorts a connection failure into what the operator has to fix.
fn connect_error(target: &str, e: tokio_postgres::Error) -> StoreError {
    let target = target.to_owned();
    if let Some(db) = e.as_db_error() {
        let message = db.message().to_owned();
        let code = db.code();
        return if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            StoreError::Auth { target, message }
        } else {
            StoreError::Connect { target, message }
        };
    }
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return StoreError::Unreachable {
                target,
                message: io.to_string(),
            };
        }
        source = s.source();
    }
    let message = e.to_string();
    if message.contains("timeout") || message.contains("timed out") {
        StoreError::Unreachable { target, message }
    } else if message.contains("password") {
        StoreError::Auth { target, message }
    } else {
        StoreError::Connect { target, message }
    }
}
