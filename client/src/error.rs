//! The client crate's error type.

/// Everything that can go wrong on a device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A configuration value is out of range; the message names it.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An item index is outside the catalogue.
    #[error("item {item} is outside the catalogue of {items} items")]
    UnknownItem {
        /// The offending index.
        item: u32,
        /// Catalogue size.
        items: usize,
    },
    /// A purchase tag is not 1 to 32 ASCII letters, digits, `-` or `_`
    /// (see [`crate::store::Tag`]).
    #[error(
        "tag {tag:?} is not valid: a tag is 1 to {max} ASCII letters, digits, '-' or '_'",
        max = crate::store::MAX_TAG_LEN
    )]
    InvalidTag {
        /// The offending tag.
        tag: String,
    },
    /// No stored purchase has this item and time (it was never recorded,
    /// or retention or `forget_me` removed it).
    #[error("no stored purchase of item {item} at time {time}")]
    UnknownPurchase {
        /// The item asked for.
        item: u32,
        /// The time asked for (Unix seconds).
        time: i64,
    },
    /// The coordinator's model does not fit this device's model.
    #[error("model mismatch: {0}")]
    ModelMismatch(String),
    /// The coordinator sent something this device cannot use.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The coordinator sent a task this device refuses: a field is missing
    /// or outside its bounds (see [`crate::task::Task`]).
    #[error("the coordinator's task is refused: {field}: {reason}")]
    InvalidTask {
        /// The refused field of the wire task, e.g. `training.learning_rate`.
        field: String,
        /// Why, with the refused value.
        reason: String,
    },
    /// Could not reach the coordinator.
    #[error(
        "cannot connect to the coordinator at {endpoint}: {}",
        fedrec_proto::error_chain(source)
    )]
    Connect {
        /// Where we tried to connect.
        endpoint: String,
        /// Why it failed.
        source: tonic::transport::Error,
    },
    /// Over TLS, the coordinator closed the connection at the first request
    /// (Join). Under mutual TLS this is how it refuses a device certificate
    /// that is missing, expired or not signed by its client CA: TLS 1.3
    /// lets the device finish its handshake before the coordinator checks
    /// the certificate, so the refusal cannot arrive earlier.
    #[error(
        "the coordinator at {endpoint} refused this device's TLS connection: under mutual TLS it \
         accepts only devices presenting a certificate signed by its client CA and valid now; \
         give the device's certificate and key (fedrec client --cert FILE --key FILE, or \
         ConnectOptions::identity_pem in the SDK)"
    )]
    TlsRefused {
        /// Where we connected.
        endpoint: String,
        /// The status the Join request failed with.
        status: tonic::Status,
    },
    /// A plain-text (`http://`) connection was closed at the first request:
    /// most likely the coordinator serves TLS.
    #[error(
        "the coordinator at {endpoint} closed the plain-text connection at the first request: \
         it most likely serves TLS; connect to {https} and give the CA that signed its \
         certificate (fedrec client --ca FILE)"
    )]
    PlainTextToTls {
        /// The `http://` endpoint tried.
        endpoint: String,
        /// The same address with `https://`.
        https: String,
    },
    /// The shopper's consent does not allow what was asked.
    #[error("consent {current} does not allow this: it needs {needed}")]
    ConsentRequired {
        /// The level the action needs.
        needed: crate::consent::Consent,
        /// The level in force.
        current: crate::consent::Consent,
    },
    /// Reading or writing the device's store file failed.
    #[error("store {path}: {source}")]
    StoreIo {
        /// The store file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The store file is shorter than its header says: an interrupted copy
    /// or a damaged disk. The file is left as it is.
    #[error("store {path} is truncated: {found} bytes, expected {expected}")]
    StoreTruncated {
        /// The store file.
        path: std::path::PathBuf,
        /// Bytes the header announces.
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// The store file's contents fail authentication under the right key:
    /// they were altered. The file is left as it is.
    #[error("store {path} has been tampered with or corrupted (authentication failed)")]
    StoreTampered {
        /// The store file.
        path: std::path::PathBuf,
    },
    /// The key does not open the store file (it was written under another key).
    #[error("wrong key for store {path}")]
    WrongKey {
        /// The store file.
        path: std::path::PathBuf,
    },
    /// The file is not a store this SDK can read (magic, version, contents).
    #[error("store {path}: {detail}")]
    StoreFormat {
        /// The store file.
        path: std::path::PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// No global model is on the device yet: fetch one first
    /// ([`crate::Client::refresh_model`]).
    #[error("no global model on the device yet: fetch one from the coordinator first")]
    NoModel,
    /// A purchase was recorded before the device learned the coordinator's
    /// catalogue: connect once (the catalogue is then stored).
    #[error("the coordinator's catalogue is not known yet: connect to the coordinator once")]
    NoCatalogue,
    /// A network operation was asked for before connecting to a coordinator.
    #[error("not connected to a coordinator")]
    NotConnected,
    /// The operating system's random number generator failed.
    #[error("system random number generator failed: {0}")]
    Random(String),
    /// Secure aggregation refused a message or a call (the coordinator sent
    /// something this device must not act on, or the round cannot go on).
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] fedrec_proto::secagg::SecAggError),
    /// The coordinator answered a request with an error.
    #[error("the coordinator refused {request}: {}", status_text(status))]
    Rpc {
        /// Which request.
        request: &'static str,
        /// The gRPC status it answered.
        status: tonic::Status,
    },
}

/// A gRPC status as a sentence: its message (or its code's description),
/// then the transport's reasons, each once.
fn status_text(status: &tonic::Status) -> String {
    let mut text = if status.message().is_empty() {
        status.code().description().to_owned()
    } else {
        status.message().to_owned()
    };
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
