//! The store's one error type.

/// Why a store operation failed. Messages name the server as
/// `user@host:port/database`, never the URL itself, so no password is ever
/// shown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store URL could not be parsed.
    #[error("invalid store URL: {0}")]
    InvalidUrl(String),
    /// No PostgreSQL answered at the address (refused, timed out, no route).
    #[error("cannot reach PostgreSQL at {target}: {message}")]
    Unreachable {
        /// `user@host:port/database`.
        target: String,
        /// The socket error.
        message: String,
    },
    /// PostgreSQL refused the user or the password.
    #[error("PostgreSQL at {target} refused the login: {message}")]
    Auth {
        /// `user@host:port/database`.
        target: String,
        /// The server's reason.
        message: String,
    },
    /// The connection failed otherwise (no such database, protocol error…).
    #[error("cannot connect to PostgreSQL at {target}: {message}")]
    Connect {
        /// `user@host:port/database`.
        target: String,
        /// What failed.
        message: String,
    },
    /// The store was migrated by a newer fedrec.
    #[error(
        "the store's schema is version {found}, this fedrec knows up to {known}: upgrade fedrec"
    )]
    SchemaTooNew {
        /// The store's schema version.
        found: i32,
        /// The newest version this build knows.
        known: i32,
    },
    /// The store's task was trained over another catalogue.
    #[error(
        "task {0:?} in the store has another catalogue (other item ids, or another order) than \
         this coordinator's: give every replica the same --items or --catalogue"
    )]
    TaskCatalogue(String),
    /// The store's task has a model of another shape.
    #[error(
        "task {task:?} in the store has the model shape {stored}, this coordinator's is {wanted}: \
         use another task name or another store"
    )]
    TaskShape {
        /// The task.
        task: String,
        /// The stored layout, in words.
        stored: String,
        /// The layout asked for, in words.
        wanted: String,
    },
    /// The task is not in the store (see [`Store::open_task`](crate::Store::open_task)).
    #[error("task {0:?} is not in the store")]
    UnknownTask(String),
    /// A replica's partial sum that cannot be combined.
    #[error("invalid partial sum: {0}")]
    InvalidPartial(String),
    /// The task has no model version yet.
    #[error("task {0:?} has no model version in the store")]
    NoModel(String),
    /// A parameter vector does not have the task's number of values.
    #[error("task {task:?} has models of {expected} values, got {got}")]
    ParamsLength {
        /// The task.
        task: String,
        /// Values in the task's layout.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// A checkpoint older than the store's model was to be imported.
    #[error(
        "task {task:?} in the store is at model version {stored}, newer than the checkpoint's \
         {checkpoint}: not imported"
    )]
    NewerInStore {
        /// The task.
        task: String,
        /// The store's current version.
        stored: u64,
        /// The checkpoint's version.
        checkpoint: u64,
    },
    /// A commit named a previous version that is not the current one:
    /// another leader (or an earlier try of this one) committed first.
    /// Nothing was written.
    #[error(
        "task {task:?}: the commit expected model version {expected:?} but the store is at \
         {found:?}; nothing was written"
    )]
    StaleVersion {
        /// The task.
        task: String,
        /// The version the commit replaces (None: no model yet).
        expected: Option<u64>,
        /// The store's current version.
        found: Option<u64>,
    },
    /// A round's end named a round that is not past the store's last one:
    /// it has already ended (a retry after a lost answer, or a deposed
    /// leader). Nothing was written.
    #[error(
        "task {task:?}: round {round} cannot end, the store's last ended round is {last}; \
         nothing was written"
    )]
    StaleRound {
        /// The task.
        task: String,
        /// The round that was to end.
        round: u32,
        /// The store's last ended round.
        last: u32,
    },
    /// A version number that cannot be stored or does not move forward.
    #[error("invalid model version: {0}")]
    InvalidVersion(String),
    /// Data in the store that this build cannot read.
    #[error("the store holds unreadable data: {0}")]
    Corrupt(String),
    /// A query failed.
    #[error("store query failed ({what}): {source}")]
    Query {
        /// What was being done.
        what: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Adds what was being done to a driver error.
pub(crate) trait Context<T> {
    fn during(self, what: &'static str) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, tokio_postgres::Error> {
    fn during(self, what: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Query { what, source })
    }
}
