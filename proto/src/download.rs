//! The model download: encoded once per model version, decoded on every device.
//!
//! The coordinator encodes each model version once, in the [`Encoding`] it
//! is configured with ([`EncodedModel::new`]), and streams the same chunks
//! to every device of the cohort ([`EncodedModel::chunks`]). A device
//! rebuilds the values with a [`ModelAssembler`], whatever the encoding;
//! malformed chunks are errors, never panics. Updates always travel as f32
//! ([`crate::tensor`]): they feed aggregation and secure aggregation.
//!
//! | encoding | bytes per value | error of a decoded value `x̂` ([`Encoding::error_bound`]) |
//! |---|---|---|
//! | `f32` | 4 | none |
//! | `f16` | 2 | `max(abs(x)·2⁻¹¹, 2⁻²⁵)` for `abs(x) ≤ 65504`; larger magnitudes saturate to ±65504 |
//! | `q8` | 1 + 8/[`Q8_BLOCK`] | `(max_b − min_b)/510 + 2⁻²²·max(abs(min_b), abs(max_b))`, `b` the value's block |
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
//! use fedrec_proto::download::{EncodedModel, Encoding, ModelAssembler};
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

/// Values per q8 block.
pub const Q8_BLOCK: usize = 256;

/// Largest magnitude an f16 holds; larger values saturate to it.
const F16_MAX: f32 = 65504.0;

/// How downloaded model values travel. Chosen by the coordinator
/// (`[download] encoding`); devices decode all of them.
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
        let blocks = match self {
            Encoding::Q8 => values.div_ceil(Q8_BLOCK),
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

    fn from_pb(value: i32) -> Result<Self, DownloadError> {
        match pb::ValueEncoding::try_from(value) {
            Ok(pb::ValueEncoding::F32) => Ok(Encoding::F32),
            Ok(pb::ValueEncoding::F16) => Ok(Encoding::F16),
            Ok(pb::ValueEncoding::Q8) => Ok(Encoding::Q8),
            Err(_) => Err(DownloadError::UnknownEncoding(value)),
        }
    }

    fn to_pb(self) -> pb::ValueEncoding {
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

/// Why a downloaded model could not be used.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum DownloadError {
    /// The coordinator's model has another layout than the device's.
    #[error("the coordinator's model layout {got:?} differs from this device's {want:?}")]
    LayoutMismatch {
        /// The coordinator's.
        got: Layout,
        /// The device's.
        want: Layout,
    },
    /// The chunk names an encoding this device does not know.
    #[error("model chunk in unknown encoding {0} (a newer protocol?)")]
    UnknownEncoding(i32),
    /// The chunk's bytes are not a whole number of values.
    #[error("{encoding} model chunk of {bytes} bytes is not a whole number of {}-byte values", encoding.bytes_per_value())]
    Misaligned {
        /// The chunk's encoding.
        encoding: Encoding,
        /// Its length in bytes.
        bytes: usize,
    },
    /// Chunks must arrive in order, without gaps or overlaps.
    #[error("model chunk at value {offset}, expected the next one at {expected}")]
    OutOfOrder {
        /// The chunk's offset.
        offset: u64,
        /// Values received so far.
        expected: usize,
    },
    /// The chunk reaches past the model's end.
    #[error("model chunk at {offset} with {len} values overruns the model's {total}")]
    Overrun {
        /// The chunk's offset.
        offset: usize,
        /// Its values.
        len: usize,
        /// The model's values.
        total: usize,
    },
    /// A q8 chunk without block parameters, or with a block size of 0.
    #[error("q8 model chunk without blocks (block_values = 0 or no q8 field)")]
    MissingQ8Blocks,
    /// A q8 chunk's parameters do not match its number of blocks.
    #[error(
        "q8 model chunk of {values} values in blocks of {block_values} needs {expected} \
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
    #[error("model: {0}")]
    Tensor(#[from] TensorError),
}

/// A model version encoded for download, shared by every device that asks
/// for it.
#[derive(Clone, Debug, PartialEq)]
pub struct EncodedModel {
    encoding: Encoding,
    /// Number of values.
    len: usize,
    /// The values in `encoding`, concatenated.
    payload: Bytes,
    /// q8 only: per block, its minimum and its scale.
    mins: Vec<f32>,
    scales: Vec<f32>,
}

impl EncodedModel {
    /// Encodes `values` (finite; the coordinator checks its models).
    pub fn new(values: &[f32], encoding: Encoding) -> Self {
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
                for block in values.chunks(Q8_BLOCK) {
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

    /// Bytes each device downloads: the encoded values and q8's block
    /// parameters (protobuf framing aside).
    pub fn wire_bytes(&self) -> usize {
        self.encoding.wire_bytes(self.len)
    }

    /// The values as every device decodes them.
    pub fn decode(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len];
        let blocks = (self.encoding == Encoding::Q8).then(|| Q8Blocks {
            block_values: Q8_BLOCK,
            mins: &self.mins,
            scales: &self.scales,
        });
        decode_values(self.encoding, &self.payload, blocks, &mut out)
            .expect("encoded by EncodedModel::new: lengths and block parameters are consistent");
        out
    }

    /// The model in chunks of at most about `chunk_bytes` bytes each (at
    /// least one value, or one q8 block), with `encoding`, `offset`,
    /// `values` and `q8` set; the caller adds the model version and the
    /// layout. Chunks share the encoded bytes.
    pub fn chunks(&self, chunk_bytes: usize) -> impl Iterator<Item = pb::ModelChunk> + '_ {
        let step = match self.encoding {
            Encoding::Q8 => (chunk_bytes / (Q8_BLOCK + 8)).max(1) * Q8_BLOCK,
            e => (chunk_bytes / e.bytes_per_value()).max(1),
        };
        let width = self.encoding.bytes_per_value();
        (0..self.len).step_by(step).map(move |start| {
            let end = (start + step).min(self.len);
            let q8 = (self.encoding == Encoding::Q8).then(|| {
                let blocks = start / Q8_BLOCK..end.div_ceil(Q8_BLOCK);
                pb::Q8Blocks {
                    block_values: Q8_BLOCK as u32,
                    min: self.mins[blocks.clone()].to_vec(),
                    scale: self.scales[blocks].to_vec(),
                }
            });
            pb::ModelChunk {
                offset: start as u64,
                values: self.payload.slice(start * width..end * width),
                encoding: self.encoding.to_pb().into(),
                q8,
                ..Default::default()
            }
        })
    }
}

/// Rebuilds a model from its chunks, on the device: a plain struct fed by
/// the transport, chunk by chunk.
#[derive(Debug)]
pub struct ModelAssembler {
    want: Layout,
    values: Vec<f32>,
    received: usize,
}

impl ModelAssembler {
    /// Expects a model laid out as `want`.
    pub fn new(want: Layout) -> Self {
        let values = vec![0.0; want.num_values()];
        Self {
            want,
            values,
            received: 0,
        }
    }

    /// Decodes the next chunk. Chunks must come in order; the first one
    /// carries the layout, which must be the device's.
    pub fn add(&mut self, chunk: &pb::ModelChunk) -> Result<(), DownloadError> {
        if chunk.offset == 0 && !chunk.layout.is_empty() {
            let got = Layout::from_pb(&chunk.layout);
            if got != self.want {
                return Err(DownloadError::LayoutMismatch {
                    got,
                    want: self.want.clone(),
                });
            }
        }
        if chunk.offset != self.received as u64 {
            return Err(DownloadError::OutOfOrder {
                offset: chunk.offset,
                expected: self.received,
            });
        }
        let encoding = Encoding::from_pb(chunk.encoding)?;
        let bytes = chunk.values.len();
        if !bytes.is_multiple_of(encoding.bytes_per_value()) {
            return Err(DownloadError::Misaligned { encoding, bytes });
        }
        let (start, len, total) = (
            self.received,
            bytes / encoding.bytes_per_value(),
            self.values.len(),
        );
        let end =
            start
                .checked_add(len)
                .filter(|&end| end <= total)
                .ok_or(DownloadError::Overrun {
                    offset: start,
                    len,
                    total,
                })?;
        let blocks = match (encoding, &chunk.q8) {
            (Encoding::Q8, Some(q8)) if q8.block_values > 0 => Some(Q8Blocks {
                block_values: q8.block_values as usize,
                mins: &q8.min,
                scales: &q8.scale,
            }),
            (Encoding::Q8, _) => return Err(DownloadError::MissingQ8Blocks),
            _ => None,
        };
        decode_values(
            encoding,
            &chunk.values,
            blocks,
            &mut self.values[start..end],
        )?;
        self.received = end;
        Ok(())
    }

    /// The model, once every value has arrived and all are finite.
    pub fn finish(self) -> Result<Vec<f32>, DownloadError> {
        if self.received != self.values.len() {
            return Err(DownloadError::Incomplete {
                received: self.received,
                total: self.values.len(),
            });
        }
        tensor::check_finite(&self.values)?;
        Ok(self.values)
    }
}

/// q8 block parameters of a run of values.
struct Q8Blocks<'a> {
    block_values: usize,
    mins: &'a [f32],
    scales: &'a [f32],
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
    for &v in block {
        let q = if scale > 0.0 {
            ((f64::from(v) - f64::from(min)) / f64::from(scale)).round()
        } else {
            0.0
        };
        // The clamp only absorbs rounding of `scale`: q is in [0, 255].
        out.push(q.clamp(0.0, 255.0) as u8);
    }
    (min, scale)
}

/// Decodes `bytes` in `encoding` into `out`, which holds exactly as many
/// values as `bytes` encodes (the caller checked the length).
fn decode_values(
    encoding: Encoding,
    bytes: &[u8],
    blocks: Option<Q8Blocks<'_>>,
    out: &mut [f32],
) -> Result<(), DownloadError> {
    match (encoding, blocks) {
        (Encoding::F32, _) => tensor::decode_into(out, bytes)?,
        (Encoding::F16, _) => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        (Encoding::Q8, None) => return Err(DownloadError::MissingQ8Blocks),
        (Encoding::Q8, Some(q8)) => {
            let expected = out.len().div_ceil(q8.block_values);
            if q8.mins.len() != expected || q8.scales.len() != expected {
                return Err(DownloadError::Q8BlockCount {
                    values: out.len(),
                    block_values: q8.block_values as u32,
                    expected,
                    mins: q8.mins.len(),
                    scales: q8.scales.len(),
                });
            }
            let runs = out
                .chunks_mut(q8.block_values)
                .zip(bytes.chunks(q8.block_values));
            for (block, ((values, qs), (&min, &scale))) in
                runs.zip(q8.mins.iter().zip(q8.scales)).enumerate()
            {
                if !min.is_finite() || !scale.is_finite() || scale < 0.0 {
                    return Err(DownloadError::Q8BadBlock { block, min, scale });
                }
                for (v, &q) in values.iter_mut().zip(qs) {
                    // In f64, so that min + 255·scale cannot overflow f32
                    // before the cast (finite() catches what still does).
                    *v = (f64::from(min) + f64::from(q) * f64::from(scale)) as f32;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
