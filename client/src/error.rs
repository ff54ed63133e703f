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
    /// The coordinator's model does not fit this device's model.
    #[error("model mismatch: {0}")]
    ModelMismatch(String),
    /// The coordinator sent something this device cannot use.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Could not reach the coordinator.
    #[error("cannot connect to the coordinator at {endpoint}: {source}")]
    Connect {
        /// Where we tried to connect.
        endpoint: String,
        /// Why it failed.
        source: tonic::transport::Error,
    },
    /// Secure aggregation refused a message or a call (the coordinator sent
    /// something this device must not act on, or the round cannot go on).
    #[error("secure aggregation: {0}")]
    SecAgg(#[from] fedrec_proto::secagg::SecAggError),
    /// The coordinator answered a request with an error.
    #[error("coordinator refused {request}: {status}")]
    Rpc {
        /// Which request.
        request: &'static str,
        /// The gRPC status it answered.
        status: tonic::Status,
    },
}
