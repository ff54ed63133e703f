//! Values on the wire in a chosen [`Encoding`]: model downloads and
//! compressed uploads.
//!
//! **Downloads.** The coordinator encodes each model version once, in the
//! encoding it is configured with (`[download] encoding`,
//! [`EncodedModel::new`]), and streams the same chunks to every device of
//! the cohort ([`EncodedModel::chunks`]). A device rebuilds the values with
//! a [`ModelAssembler`], whatever the encoding.
//!
//! **Uploads.** In plain training rounds the coordinator may ask devices for
//! a compressed update (`[upload] encoding`, the task's `upload_encoding`):
//! the device encodes its update the same way
//! ([`EncodedModel::update_parts`]) and the coordinator decodes each run as
//! it arrives into the little-endian f32 bytes that aggregation folds
//! ([`append_update_run`]). The quantization error then enters the mean of
//! the cohort's updates: a q8 update is off by at most half a step of its
//! block per value, and the errors of different devices partly cancel.
//! Secure aggregation quantizes its masked inputs itself (`bits`), so its
//! inputs never use these encodings.
//!
//! Malformed chunks are errors, never panics.
//!
//! | encoding | bytes per value | error of a decoded value `x̂` ([`Encoding::error_bound`]) |
//! |---|---|---|
//! | `f32` | 4 | none |
//! | `f16` | 2 | `max(abs(x)·2⁻¹¹, 2⁻²⁵)` for `abs(x) ≤ 65504`; larger magnitudes saturate to ±65504 |
//! | `q8` | 1 + 8/[`Q8_BLOCK`] (uploads: 1 + 8/[`Q8_UPLOAD_BLOCK`]) | `(max_b − min_b)/510 + 2⁻²²·max(abs(min_b), abs(max_b))`, `b` the value's block |
//!
//! **f16** is IEEE binary16, rounded to nearest (conversion by the `half`
//! crate). **q8** is asymmetric linear quantization per block of
//! [`Q8_BLOCK`] consecutive values: with `min` and `max` the block's extreme
//! values and `scale = (max − min)/255`, a value travels as the byte
//! `q = round((x − min)/scale)` and is decoded as `min + q·scale`, half a
//! step from the original at most (the second term of the bound is f32
//! rounding). Blocks keep an outlier's effect local: 256 values are 8 item
//! embeddings of 32 factors, and their two parameters cost 8 bytes (3%).
//!
//! Blocks start every [`Q8_BLOCK`] values from the model's first value, and
//! chunks hold whole blocks, so what a device decodes does not depend on
//! the chunk size: an in-process simulation that hands devices
//! [`EncodedModel::decode`] gives them exactly what a gRPC download does.
//!
//! ```
//! use fedrec_proto::codec::{EncodedModel, Encoding, ModelAssembler};
//! use fedrec_proto::Layout;
//! let layout = Layout::new(vec![("item_factors".into(), vec![1000, 3])]);
//! let values: Vec<f32> = (0..3000).map(|i| (i as f32 * 0.37).sin()).collect();
//! let model = EncodedModel::new(&values, Encoding::Q8);
//! assert!(model.wire_bytes() < values.len() * 4 / 3);
//! let mut device = ModelAssembler::new(layout);
//! for chunk in model.chunks(1024) {
//!     device.add(&chunk).unwrap();
//! }
//! let decoded = device.finish().unwrap();
//! assert_eq!(decoded, model.decode());
//! for (x, y) in values.iter().zip(&decoded) {
//!     assert!((x - y).abs() <= 2.0 / 510.0 + 1e-6);
//! }
//! ```

use std::fmt;

use bytes::Bytes;
use half::f16;
use serde::{Deserialize, Serialize};

use crate::tensor::{self, TensorError};
use crate::{Layout, pb};

/// Values per q8 block of a model download.
pub const Q8_BLOCK: usize = 256;

/// Values per q8 block of an upload: one item's embedding at 32 factors.
/// An update's values span orders of magnitude within 256 (a bought item's
/// gradient beside seven items not bought), and the server optimizer's
/// per-coordinate scaling turns the small values' quantization error into
/// full steps: on MovieLens-100K (movielens preset) q8 uploads in blocks of
/// 256 lost 6% of HR@10 (0.141 against 0.1495 with f32), in blocks of 32
/// none (0.1506). Rounding stochastically instead did not help (0.141 and
/// 0.147). The block parameters then cost 0.25 bytes a value.
pub const Q8_UPLOAD_BLOCK: usize = 32;

/// Largest magnitude an f16 holds; larger values saturate to it.
const F16_MAX: f32 = 65504.0;

/// How model values (downloads) or update values (uploads) travel. Chosen
/// by the coordinator (`[download] encoding`, `[upload] encoding`); devices
/// and the coordinator decode all of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Little-endian f32: exact, 4 bytes a value (the default).
    #[default]
    F32,
    /// IEEE binary16: 2 bytes a value, relative error at most 2⁻¹¹.
    F16,
    /// 8-bit linear quantization per block of [`Q8_BLOCK`] values: about
    /// 1.03 bytes a value, error at most half a block's step.
    Q8,
}

impl Encoding {
    /// Every encoding, in order of size.
    pub const ALL: [Encoding; 3] = [Encoding::F32, Encoding::F16, Encoding::Q8];

    /// The encoding's name, as in the configuration (`f32`, `f16`, `q8`).
    pub fn name(self) -> &'static str {
        match self {
            Encoding::F32 => "f32",
            Encoding::F16 => "f16",
            Encoding::Q8 => "q8",
        }
    }

    /// Bytes of `values` per value (q8's block parameters aside).
    pub fn bytes_per_value(self) -> usize {
        match self {
            Encoding::F32 => 4,
            Encoding::F16 => 2,
            Encoding::Q8 => 1,
        }
    }

    /// Bytes of a download of `values` values: the encoded values and q8's
    /// block parameters (protobuf framing aside).
    pub fn wire_bytes(self, values: usize) -> usize {
        self.bytes_in_blocks(values, Q8_BLOCK)
    }

    /// Bytes of an upload of `values` values (q8 in blocks of
    /// [`Q8_UPLOAD_BLOCK`]).
    pub fn upload_wire_bytes(self, values: usize) -> usize {
        self.bytes_in_blocks(values, Q8_UPLOAD_BLOCK)
    }

    fn bytes_in_blocks(self, values: usize, block_values: usize) -> usize {
        let blocks = match self {
            Encoding::Q8 => values.div_ceil(block_values),
            _ => 0,
        };
        values * self.bytes_per_value() + 8 * blocks
    }

    /// The largest error the encoding makes on `x`, a value of a q8 block
    /// whose smallest and largest values are `block_min` and `block_max`
    /// (ignored by the other encodings). See the [module docs](self).
    pub fn error_bound(self, x: f32, block_min: f32, block_max: f32) -> f64 {
        let x = f64::from(x).abs();
        match self {
            Encoding::F32 => 0.0,
            Encoding::F16 if x > f64::from(F16_MAX) => x - f64::from(F16_MAX),
            Encoding::F16 => (x * 2f64.powi(-11)).max(2f64.powi(-25)),
            Encoding::Q8 => {
                let range = f64::from(block_max) - f64::from(block_min);
                let magnitude = f64::from(block_min.abs().max(block_max.abs()));
                range / 510.0 + magnitude * 2f64.powi(-22)
            }
        }
    }

    /// The index of the first value of `decoded` farther from `original`
    /// than [`error_bound`](Self::error_bound) allows (or not finite), with
    /// q8 blocks of `block_values`; `None` when every value is within it.
    pub fn first_beyond_bound(
        self,
        original: &[f32],
        decoded: &[f32],
        block_values: usize,
    ) -> Option<usize> {
        assert_eq!(original.len(), decoded.len(), "as many values decoded");
        let blocks = original
            .chunks(block_values)
            .zip(decoded.chunks(block_values));
        for (b, (xs, ys)) in blocks.enumerate() {
            let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for (i, (x, y)) in xs.iter().zip(ys).enumerate() {
                let err = (f64::from(*x) - f64::from(*y)).abs();
                if !(y.is_finite() && err <= self.error_bound(*x, lo, hi)) {
                    return Some(b * block_values + i);
                }
            }
        }
        None
    }

    /// The encoding of the protobuf enum value `value`.
    pub fn from_pb(value: i32) -> Result<Self, CodecError> {
        match pb::ValueEncoding::try_from(value) {
            Ok(pb::ValueEncoding::F32) => Ok(Encoding::F32),
            Ok(pb::ValueEncoding::F16) => Ok(Encoding::F16),
            Ok(pb::ValueEncoding::Q8) => Ok(Encoding::Q8),
            Err(_) => Err(CodecError::UnknownEncoding(value)),
        }
    }

    /// The protobuf enum value.
    pub fn to_pb(self) -> pb::ValueEncoding {
        match self {
            Encoding::F32 => pb::ValueEncoding::F32,
            Encoding::F16 => pb::ValueEncoding::F16,
            Encoding::Q8 => pb::ValueEncoding::Q8,
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why encoded values (a downloaded model, an upload) could not be used.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum CodecError {
    /// The coordinator's model has another layout than the device's.
    #[error("the coordinator's model ({got}) differs from this device's ({want})")]
    LayoutMismatch {
        /// The coordinator's.
        got: Layout,
        /// The device's.
        want: Layout,
    },
    /// The chunk names an encoding this device does not know.
    #[error("chunk in unknown value encoding {0} (a newer protocol?)")]
    UnknownEncoding(i32),
    /// The chunk's bytes are not a whole number of values.
    #[error("{encoding} chunk of {bytes} bytes is not a whole number of {}-byte values", encoding.bytes_per_value())]
    Misaligned {
        /// The chunk's encoding.
        encoding: Encoding,
        /// Its length in bytes.
        bytes: usize,
    },
    /// Chunks must arrive in order, without gaps or overlaps.
    #[error("chunk at value {offset}, expected the next one at {expected}")]
    OutOfOrder {
        /// The chunk's offset.
        offset: u64,
        /// Values received so far.
        expected: usize,
    },
    /// The chunk reaches past the last value.
    #[error("chunk at value {offset} with {len} values overruns the {total} values expected")]
    Overrun {
        /// The chunk's offset.
        offset: usize,
        /// Its values.
        len: usize,
        /// Values expected in all.
        total: usize,
    },
    /// A q8 chunk without block parameters, or with a block size of 0.
    #[error("q8 chunk without blocks (block_values = 0 or no q8 field)")]
    MissingQ8Blocks,
    /// A q8 chunk's parameters do not match its number of blocks.
    #[error(
        "q8 chunk of {values} values in blocks of {block_values} needs {expected} \
         block minimums and scales, got {mins} and {scales}"
    )]
    Q8BlockCount {
        /// Values in the chunk.
        values: usize,
        /// Values per block.
        block_values: u32,
        /// Blocks in the chunk.
        expected: usize,
        /// Minimums received.
        mins: usize,
        /// Scales received.
        scales: usize,
    },
    /// A q8 block's minimum or scale is not finite, or its scale negative.
    #[error(
        "q8 block {block} of the chunk has min {min} and scale {scale}: both must be finite, the scale >= 0"
    )]
    Q8BadBlock {
        /// The block's index in its chunk.
        block: usize,
        /// Its minimum.
        min: f32,
        /// Its scale.
        scale: f32,
    },
    /// The stream ended before every value arrived.
    #[error("model download ended after {received} of {total} values")]
    Incomplete {
        /// Values received.
        received: usize,
        /// The model's values.
        total: usize,
    },
    /// Decoded f32 values are unusable (a value is not finite).
    #[error("values: {0}")]
    Tensor(#[from] TensorError),
}

/// Values encoded once: a model version for download, shared by every
/// device that asks for it, or a device's update for upload.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedModel {
    encoding: Encoding,
    /// Number of values.
    len: usize,
    /// q8: values per block.
    block_values: usize,
    /// The values in `encoding`, concatenated.
    payload: Bytes,
    /// q8 only: per block, its minimum and its scale.
    mins: Vec<f32>,
    scales: Vec<f32>,
}

impl EncodedModel {
    /// Encodes `values` (finite; the coordinator checks its models),
    /// rounding to nearest.
    pub fn new(values: &[f32], encoding: Encoding) -> Self {
        Self::encode(values, encoding, Q8_BLOCK)
    }

    /// Encodes a device's update for upload: as [`new`](Self::new), but
    /// q8 in blocks of [`Q8_UPLOAD_BLOCK`] values.
    pub fn for_upload(values: &[f32], encoding: Encoding) -> Self {
        Self::encode(values, encoding, Q8_UPLOAD_BLOCK)
    }

    fn encode(values: &[f32], encoding: Encoding, block_values: usize) -> Self {
        let mut mins = Vec::new();
        let mut scales = Vec::new();
        let payload = match encoding {
            Encoding::F32 => tensor::encode(values),
            Encoding::F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(v.clamp(-F16_MAX, F16_MAX)).to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
            Encoding::Q8 => {
                let mut out = Vec::with_capacity(values.len());
                for block in values.chunks(block_values) {
                    let (min, scale) = q8_encode_block(block, &mut out);
                    mins.push(min);
                    scales.push(scale);
                }
                out.into()
            }
        };
        Self {
            encoding,
            len: values.len(),
            block_values,
            payload,
            mins,
            scales,
        }
    }

    /// The encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Number of values.
    pub fn num_values(&self) -> usize {
        self.len
    }

    /// Bytes on the wire: the encoded values and q8's block parameters
    /// (protobuf framing aside).
    pub fn wire_bytes(&self) -> usize {
        self.encoding.bytes_in_blocks(self.len, self.block_values)
    }

    /// The values as every device decodes them.
    pub fn decode(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len);
        let blocks = (self.encoding == Encoding::Q8).then(|| Q8Blocks {
            block_values: self.block_values,
            mins: &self.mins,
            scales: &self.scales,
        });
        decode_values(
            self.encoding,
            &self.payload,
            blocks.as_ref(),
            self.len,
            |batch| out.extend_from_slice(batch),
        )
        .expect("encoded by EncodedModel::new: lengths and block parameters are consistent");
        out
    }

    /// The model in chunks of at most about `chunk_bytes` bytes each (at
    /// least one value, or one q8 block), with `encoding`, `offset`,
    /// `values` and `q8` set; the caller adds the model version and the
    /// layout. Chunks share the encoded bytes.
    pub fn chunks(&self, chunk_bytes: usize) -> impl Iterator<Item = pb::ModelChunk> + '_ {
        self.runs(chunk_bytes).map(|run| pb::ModelChunk {
            offset: run.offset,
            values: run.values,
            encoding: run.encoding,
            q8: run.q8,
            ..Default::default()
        })
    }

    /// An upload of these values under `header`: the header, then
    /// [`update_parts`](Self::update_parts).
    pub fn update_chunks(
        &self,
        header: pb::UpdateHeader,
        chunk_bytes: usize,
    ) -> Vec<pb::UpdateChunk> {
        std::iter::once(pb::update_chunk::Part::Header(header))
            .chain(self.update_parts(chunk_bytes))
            .map(|part| pb::UpdateChunk { part: Some(part) })
            .collect()
    }

    /// An update's values as the parts of an upload (after its header), in
    /// runs of at most about `chunk_bytes` bytes: plain `values` for f32
    /// (which every coordinator reads), `encoded` runs otherwise.
    pub fn update_parts(
        &self,
        chunk_bytes: usize,
    ) -> impl Iterator<Item = pb::update_chunk::Part> + '_ {
        self.runs(chunk_bytes).map(|run| match self.encoding {
            Encoding::F32 => pb::update_chunk::Part::Values(run.values),
            _ => pb::update_chunk::Part::Encoded(run),
        })
    }

    /// The values in runs of at most about `chunk_bytes` bytes each (at
    /// least one value, or one q8 block), sharing the encoded bytes.
    fn runs(&self, chunk_bytes: usize) -> impl Iterator<Item = pb::EncodedValues> + '_ {
        let step = match self.encoding {
            Encoding::Q8 => (chunk_bytes / (self.block_values + 8)).max(1) * self.block_values,
            e => (chunk_bytes / e.bytes_per_value()).max(1),
        };
        let width = self.encoding.bytes_per_value();
        (0..self.len).step_by(step).map(move |start| {
            let end = (start + step).min(self.len);
            let q8 = (self.encoding == Encoding::Q8).then(|| {
                let blocks = start / self.block_values..end.div_ceil(self.block_values);
                pb::Q8Blocks {
                    block_values: self.block_values as u32,
                    min: self.mins[blocks.clone()].to_vec(),
                    scale: self.scales[blocks].to_vec(),
                }
            });
            pb::EncodedValues {
                offset: start as u64,
                values: self.payload.slice(start * width..end * width),
                encoding: self.encoding.to_pb().into(),
                q8,
            }
        })
    }
}

/// Rebuilds a model from its chunks, on the device: a plain struct fed by
/// the transport, chunk by chunk.
#[derive(Debug)]
pub struct ModelAssembler {
    want: Layout,
    /// The values received so far; never more than the layout's.
    values: Vec<f32>,
}

impl ModelAssembler {
    /// Expects a model laid out as `want`.
    pub fn new(want: Layout) -> Self {
        // Reserved, not zeroed: every value is written once, as it arrives.
        let values = Vec::with_capacity(want.num_values());
        Self { want, values }
    }

    /// Decodes the next chunk. Chunks must come in order; the first one
    /// carries the layout, which must be the device's.
    pub fn add(&mut self, chunk: &pb::ModelChunk) -> Result<(), CodecError> {
        if chunk.offset == 0 && !chunk.layout.is_empty() {
            let got = Layout::from_pb(&chunk.layout);
            if got != self.want {
                return Err(CodecError::LayoutMismatch {
                    got,
                    want: self.want.clone(),
                });
            }
        }
        let run = Run::check(
            chunk.offset,
            chunk.encoding,
            &chunk.values,
            chunk.q8.as_ref(),
            self.values.len(),
            self.want.num_values(),
        )?;
        run.decode(|batch| self.values.extend_from_slice(batch))
    }

    /// The model, once every value has arrived and all are finite.
    pub fn finish(self) -> Result<Vec<f32>, CodecError> {
        let total = self.want.num_values();
        if self.values.len() != total {
            return Err(CodecError::Incomplete {
                received: self.values.len(),
                total,
            });
        }
        tensor::check_finite(&self.values)?;
        Ok(self.values)
    }
}

/// Decodes the next run of an upload onto `out`, the little-endian f32
/// bytes of the values received so far (what aggregation folds), for an
/// update of `total` values. The run must start at the next value and stay
/// within `total`; on an error `out` is unchanged. Whether the values are
/// finite and complete is the aggregator's check.
pub fn append_update_run(
    run: &pb::EncodedValues,
    out: &mut Vec<u8>,
    total: usize,
) -> Result<(), CodecError> {
    if !out.len().is_multiple_of(4) {
        return Err(CodecError::Misaligned {
            encoding: Encoding::F32,
            bytes: out.len(),
        });
    }
    let run = Run::check(
        run.offset,
        run.encoding,
        &run.values,
        run.q8.as_ref(),
        out.len() / 4,
        total,
    )?;
    out.reserve(4 * run.len);
    if run.encoding == Encoding::F32 {
        // Already the bytes aggregation folds.
        out.extend_from_slice(run.bytes);
        return Ok(());
    }
    let mut bytes = [0; 4 * DECODE_BATCH];
    // Errors come before the first batch: `out` is unchanged on one.
    run.decode(|batch| {
        for (b, v) in bytes.chunks_exact_mut(4).zip(batch) {
            b.copy_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&bytes[..4 * batch.len()]);
    })
}

/// q8 block parameters of a run of values.
struct Q8Blocks<'a> {
    block_values: usize,
    mins: &'a [f32],
    scales: &'a [f32],
}

/// A run of encoded values, checked against where it must go.
struct Run<'a> {
    encoding: Encoding,
    bytes: &'a [u8],
    blocks: Option<Q8Blocks<'a>>,
    /// Values in the run.
    len: usize,
}

impl<'a> Run<'a> {
    /// The run at `offset` of `bytes` in `encoding` (with `q8` blocks),
    /// which must start at value `next` and end by value `total`.
    fn check(
        offset: u64,
        encoding: i32,
        bytes: &'a [u8],
        q8: Option<&'a pb::Q8Blocks>,
        next: usize,
        total: usize,
    ) -> Result<Self, CodecError> {
        if offset != next as u64 {
            return Err(CodecError::OutOfOrder {
                offset,
                expected: next,
            });
        }
        let encoding = Encoding::from_pb(encoding)?;
        if !bytes.len().is_multiple_of(encoding.bytes_per_value()) {
            return Err(CodecError::Misaligned {
                encoding,
                bytes: bytes.len(),
            });
        }
        let len = bytes.len() / encoding.bytes_per_value();
        next.checked_add(len)
            .filter(|&end| end <= total)
            .ok_or(CodecError::Overrun {
                offset: next,
                len,
                total,
            })?;
        let blocks = match (encoding, q8) {
            (Encoding::Q8, Some(q8)) if q8.block_values > 0 => Some(Q8Blocks {
                block_values: q8.block_values as usize,
                mins: &q8.min,
                scales: &q8.scale,
            }),
            (Encoding::Q8, _) => return Err(CodecError::MissingQ8Blocks),
            _ => None,
        };
        Ok(Self {
            encoding,
            bytes,
            blocks,
            len,
        })
    }

    /// Hands the decoded values to `emit` in order, in batches of at most
    /// [`DECODE_BATCH`]; every q8 block's parameters are checked before the
    /// first batch.
    fn decode(&self, emit: impl FnMut(&[f32])) -> Result<(), CodecError> {
        decode_values(
            self.encoding,
            self.bytes,
            self.blocks.as_ref(),
            self.len,
            emit,
        )
    }
}

/// Quantizes one block into `out`; returns its minimum and scale.
fn q8_encode_block(block: &[f32], out: &mut Vec<u8>) -> (f32, f32) {
    let (min, max) = block
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    // In f64, so that the range of two huge values of opposite signs cannot
    // overflow.
    let scale = ((f64::from(max) - f64::from(min)) / 255.0) as f32;
    let inverse = if scale > 0.0 {
        1.0 / f64::from(scale)
    } else {
        0.0
    };
    for &v in block {
        let q = ((f64::from(v) - f64::from(min)) * inverse).round();
        // The clamp only absorbs rounding of `scale`: q is in [0, 255].
        out.push(q.clamp(0.0, 255.0) as u8);
    }
    (min, scale)
}

/// Values decoded at a time: a batch stays in L1 and each loop over one
/// vectorizes.
const DECODE_BATCH: usize = 256;

/// Decodes the `len` values of `bytes` in `encoding` (the caller checked
/// the length), handing them to `emit` in order, in batches of at most
/// [`DECODE_BATCH`]. On an error nothing has been emitted.
fn decode_values(
    encoding: Encoding,
    bytes: &[u8],
    blocks: Option<&Q8Blocks<'_>>,
    len: usize,
    mut emit: impl FnMut(&[f32]),
) -> Result<(), CodecError> {
    let mut batch = [0.0_f32; DECODE_BATCH];
    match (encoding, blocks) {
        (Encoding::F32, _) => {
            for part in bytes.chunks(4 * DECODE_BATCH) {
                for (v, b) in batch.iter_mut().zip(part.chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                emit(&batch[..part.len() / 4]);
            }
        }
        (Encoding::F16, _) => {
            for part in bytes.chunks(2 * DECODE_BATCH) {
                for (v, b) in batch.iter_mut().zip(part.chunks_exact(2)) {
                    *v = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
                emit(&batch[..part.len() / 2]);
            }
        }
        (Encoding::Q8, None) => return Err(CodecError::MissingQ8Blocks),
        (Encoding::Q8, Some(q8)) => {
            let expected = len.div_ceil(q8.block_values);
            if q8.mins.len() != expected || q8.scales.len() != expected {
                return Err(CodecError::Q8BlockCount {
                    values: len,
                    block_values: q8.block_values as u32,
                    expected,
                    mins: q8.mins.len(),
                    scales: q8.scales.len(),
                });
            }
            if let Some(block) = q8
                .mins
                .iter()
                .zip(q8.scales)
                .position(|(m, s)| !m.is_finite() || !s.is_finite() || *s < 0.0)
            {
                let (min, scale) = (q8.mins[block], q8.scales[block]);
                return Err(CodecError::Q8BadBlock { block, min, scale });
            }
            let params = q8.mins.iter().zip(q8.scales);
            for (qs, (&min, &scale)) in bytes.chunks(q8.block_values).zip(params) {
                let (min, scale) = (f64::from(min), f64::from(scale));
                for part in qs.chunks(DECODE_BATCH) {
                    for (v, &q) in batch.iter_mut().zip(part) {
                        // In f64, so that min + 255·scale cannot overflow
                        // f32 before the cast (finite() catches what still
                        // does).
                        *v = (min + f64::from(q) * scale) as f32;
                    }
                    emit(&batch[..part.len()]);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
