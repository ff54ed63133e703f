//! The one error type of the bindings: a case per kind of
//! [`ClientError`], each carrying the SDK's message.

use fedrec_client::ClientError;

/// Everything a call into the SDK can fail with. In Kotlin and Swift this is
/// `FedrecException` / `FedrecError` with one subclass or case per kind; in
/// Python `FedrecError.<Kind>`. Each carries a message for logs and support
/// (never shown to shoppers as is: it may name files).
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum FedrecError {
    /// An argument from the app is out of range or unknown: a key that is
    /// not 32 bytes, a negative count, an item outside the catalogue, a
    /// malformed tag, a purchase that is not stored, a diversity outside
    /// [0, 1].
    #[error("{0}")]
    InvalidArgument(String),
    /// The shopper's consent does not allow this (e.g. training under
    /// `OnDevice`).
    #[error("{0}")]
    ConsentRequired(String),
    /// The coordinator cannot be reached (address, network, TLS handshake)
    /// or stopped answering.
    #[error("{0}")]
    CoordinatorUnreachable(String),
    /// The coordinator refused this device's TLS connection (under mutual
    /// TLS: no valid device certificate).
    #[error("{0}")]
    TlsRefused(String),
    /// A plain-text connection to a coordinator that serves TLS.
    #[error("{0}")]
    PlainTextToTls(String),
    /// The coordinator does not admit this device (a missing or wrong
    /// enrollment token, an expired session).
    #[error("{0}")]
    Unauthenticated(String),
    /// The coordinator answered a request with another error.
    #[error("{0}")]
    CoordinatorRefused(String),
    /// The coordinator sent something this device cannot use (a malformed
    /// message, a refused task, a secure-aggregation violation).
    #[error("{0}")]
    Protocol(String),
    /// The coordinator trains a model this SDK does not know, or its new
    /// catalogue does not hold the stored purchases.
    #[error("{0}")]
    ModelMismatch(String),
    /// The store file is damaged, truncated, tampered with or not a store.
    /// It is left untouched.
    #[error("{0}")]
    StoreCorrupt(String),
    /// The key does not open the store file.
    #[error("{0}")]
    WrongKey(String),
    /// Reading or writing the store file failed (permissions, disk full).
    #[error("{0}")]
    StoreIo(String),
    /// No global model on the device yet (for `explain`): call
    /// `refresh_model` first.
    #[error("{0}")]
    NoModel(String),
    /// A purchase recorded before the device ever connected: the
    /// coordinator's catalogue is not known yet (it is stored once learned).
    #[error("{0}")]
    NoCatalogue(String),
    /// A network call before `connect`.
    #[error("{0}")]
    NotConnected(String),
    /// A fault inside the SDK (a caught panic, the system's random number
    /// generator failing, an error kind this version does not know). The
    /// client stays usable; the store keeps its last good state.
    #[error("{0}")]
    Internal(String),
}

impl FedrecError {
    /// An [`InvalidArgument`](Self::InvalidArgument) error.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }
}

impl From<ClientError> for FedrecError {
    fn from(e: ClientError) -> Self {
        let message = e.to_string();
        match e {
            ClientError::InvalidConfig(_)
            | ClientError::UnknownItem { .. }
            | ClientError::InvalidTag { .. }
            | ClientError::UnknownPurchase { .. } => Self::InvalidArgument(message),
            ClientError::ConsentRequired { .. } => Self::ConsentRequired(message),
            ClientError::Connect { .. } => Self::CoordinatorUnreachable(message),
            ClientError::TlsRefused { .. } => Self::TlsRefused(message),
            ClientError::PlainTextToTls { .. } => Self::PlainTextToTls(message),
            ClientError::Rpc { status, .. } => match status.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                    Self::Unauthenticated(message)
                }
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    Self::CoordinatorUnreachable(message)
                }
                _ => Self::CoordinatorRefused(message),
            },
            ClientError::Protocol(_) | ClientError::InvalidTask { .. } | ClientError::SecAgg(_) => {
                Self::Protocol(message)
            }
            ClientError::ModelMismatch(_) => Self::ModelMismatch(message),
            ClientError::StoreTruncated { .. }
            | ClientError::StoreTampered { .. }
            | ClientError::StoreFormat { .. } => Self::StoreCorrupt(message),
            ClientError::WrongKey { .. } => Self::WrongKey(message),
            ClientError::StoreIo { .. } => Self::StoreIo(message),
            ClientError::NoModel => Self::NoModel(message),
            ClientError::NotConnected => Self::NotConnected(message),
            ClientError::NoCatalogue => Self::NoCatalogue(message),
            // `Random`, and kinds added to the SDK after this mapping.
            _ => Self::Internal(message),
        }
    }
}

/// Runs `f`, turning a panic into [`FedrecError::Internal`] so that none
/// crosses into the app (UniFFI would catch it too, but as an untyped
/// internal error). Every exported call goes through here.
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, FedrecError>) -> Result<T, FedrecError> {
    // AssertUnwindSafe: the client's locks recover from poisoning, and every
    // SDK operation either completes or fails before it saves, so the state
    // seen after a panic is the last good one.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        Err(FedrecError::Internal(format!(
            "internal error in the SDK: {what}"
        )))
    })
}
