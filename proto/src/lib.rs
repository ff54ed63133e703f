//! The fedrec wire protocol, shared byte for byte by devices and the coordinator.
//!
//! - [`pb`]: the gRPC messages and services generated from `proto/fedrec.proto`
//!   (compiled in `build.rs` by protox, a pure-Rust protobuf compiler).
//! - [`tensor`]: the flat little-endian `f32` encoding of models and updates,
//!   chunking for streams, and zero-copy folding of encoded values into a sum.
//! - [`codec`]: models and updates in a chosen encoding (f32, f16 or 8-bit
//!   quantized): the download, encoded once per model version and decoded
//!   chunk by chunk on the device, and compressed uploads, decoded chunk by
//!   chunk on the coordinator.
//! - [`symmetric`]: how a symmetric matrix (a device's `x xᵀ` under the
//!   ALS loss) travels: its upper triangle, row by row.
//! - [`limits`]: the bounds of the training settings, checked by the
//!   coordinator's configuration and by every device.
//! - [`Layout`]: the names and shapes of the model's tensors.
//! - [`catalogue`]: which item each row of the model is, announced at join.
//!
//! ```
//! use fedrec_proto::{tensor, Layout};
//! let layout = Layout::new(vec![("item_factors".into(), vec![3, 2]), ("item_bias".into(), vec![3])]);
//! assert_eq!(layout.num_values(), 9);
//! let values = vec![0.5_f32; 9];
//! let bytes = tensor::encode(&values);
//! let mut sum = vec![0.0_f32; 9];
//! tensor::fold_into(&mut sum, &bytes, 2.0).unwrap();
//! assert_eq!(sum[0], 1.0);
//! ```

pub mod catalogue;
pub mod codec;
pub mod eval;
pub mod limits;
pub mod loss;
pub mod protobuf_codec;
pub mod secagg;
pub mod symmetric;
pub mod tensor;

pub use eval::EvalCounts;
pub use loss::Loss;

/// Messages and services generated from `proto/fedrec.proto`.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("fedrec.v1");
}

/// The protocol version; a device and a coordinator must agree on it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default size of one chunk of a streamed model or update, in bytes (1 MiB,
/// well below tonic's default 4 MiB receive limit).
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;

/// HTTP/2 flow-control window of one stream, both ends (8 MiB).
/// With the h2 default of 64 KiB a sender stalls after every 64 KiB until
/// the receiver's window update arrives, which caps a model download far
/// below what loopback or a LAN can carry.
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;

/// HTTP/2 flow-control window of one stream on the coordinator's side
/// (1 MiB): what an upload may have in flight before the coordinator reads
/// it. Devices reserve an upload slot before sending any value
/// ([`reserve_and_upload`]), so every upload that sends is being read, and
/// this window only bounds the transport's buffer per upload (the
/// coordinator holds `server.max_concurrent_uploads` of them).
pub const SERVER_STREAM_WINDOW_BYTES: u32 = 1 << 20;

/// Largest HTTP/2 frame either end accepts (256 KiB, against the protocol's
/// default 16 KiB): a chunk of a model or an update then crosses in a few
/// frames instead of 64, with fewer headers, wake-ups and system calls.
pub const MAX_FRAME_BYTES: u32 = 256 << 10;

/// HTTP/2 flow-control window of one connection, shared by its streams
/// (32 MiB).
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;

/// A client endpoint for `url` with fedrec's transport settings: the
/// flow-control windows above and no Nagle delay.
pub fn endpoint(
    url: impl Into<String>,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    Ok(tonic::transport::Endpoint::from_shared(url.into())?
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .tcp_nodelay(true))
}

/// A server builder with fedrec's transport settings (see [`endpoint`]).
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(SERVER_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .tcp_nodelay(true)
}

/// `err` and its sources, joined by ": ". A transport error alone often
/// says only "transport error"; the reason (an untrusted certificate, a
/// refused connection) is in its sources.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether the PEM text `bytes` holds a block whose label ends with `label`
/// (`"CERTIFICATE"`, or `"PRIVATE KEY"` for any of the key labels).
pub fn has_pem_block(bytes: &[u8], label: &str) -> bool {
    String::from_utf8_lossy(bytes).lines().any(|line| {
        line.strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    })
}

/// Uploads `chunks` (the header first, then the values) after reserving an
/// upload slot for that header ([`ReserveUpload`](pb::coordinator_client::CoordinatorClient::reserve_upload)),
/// asking again while the coordinator answers that none freed within its
/// long poll. A refusal of the header ends it at once, with its status.
/// `sent` sees each reservation request before it is sent.
pub async fn reserve_and_upload(
    client: &mut pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>,
    chunks: Vec<pb::UpdateChunk>,
    mut sent: impl FnMut(&pb::UpdateHeader),
) -> Result<pb::UpdateAck, tonic::Status> {
    let Some(pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(header)),
    }) = chunks.first()
    else {
        return Err(tonic::Status::invalid_argument(
            "an upload starts with its header",
        ));
    };
    loop {
        sent(header);
        if client
            .reserve_upload(header.clone())
            .await?
            .into_inner()
            .granted
        {
            break;
        }
    }
    Ok(client
        .submit_update(tokio_stream::iter(chunks))
        .await?
        .into_inner())
}

/// Names and shapes of a model's tensors, in the order their values are
/// concatenated on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    tensors: Vec<(String, Vec<u64>)>,
}

impl Layout {
    /// A layout from `(name, shape)` pairs.
    pub fn new(tensors: Vec<(String, Vec<u64>)>) -> Self {
        Self { tensors }
    }

    /// The `(name, shape)` pairs.
    pub fn tensors(&self) -> &[(String, Vec<u64>)] {
        &self.tensors
    }

    /// Total number of `f32` values across all tensors.
    pub fn num_values(&self) -> usize {
        self.tensors
            .iter()
            .map(|(_, shape)| shape.iter().product::<u64>() as usize)
            .sum()
    }

    /// The layout as protobuf messages.
    pub fn to_pb(&self) -> Vec<pb::TensorSpec> {
        self.tensors
            .iter()
            .map(|(name, shape)| pb::TensorSpec {
                name: name.clone(),
                shape: shape.clone(),
            })
            .collect()
    }

    /// The layout from protobuf messages.
    pub fn from_pb(specs: &[pb::TensorSpec]) -> Self {
        Self::new(
            specs
                .iter()
                .map(|s| (s.name.clone(), s.shape.clone()))
                .collect(),
        )
    }
}

/// In words, e.g. `item_factors 100 × 32, item_bias 100`.
impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tensors.is_empty() {
            return f.write_str("no tensors");
        }
        for (i, (name, shape)) in self.tensors.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
            write!(f, "{name} {}", dims.join(" × "))?;
        }
        Ok(())
    }
}
