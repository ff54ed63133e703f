//! Flat little-endian `f32` encoding of models and updates.
//!
//! Values travel as raw little-endian `f32` bytes: no per-value framing, so a
//! model of `n` values is exactly `4 n` bytes. Decoding never copies into an
//! intermediate vector: [`fold_into`] adds encoded values straight into a
//! running sum, and [`decode_into`] writes them into a caller's buffer.

use std::borrow::Cow;

use bytes::Bytes;

/// Why encoded values could not be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    /// The byte length is not a multiple of 4.
    #[error("encoded values must be a multiple of 4 bytes, got {0} bytes")]
    Misaligned(usize),
    /// The number of values differs from the expected one.
    #[error("expected {expected} values, got {got}")]
    WrongLength {
        /// Values expected.
        expected: usize,
        /// Values received.
        got: usize,
    },
    /// A value is NaN or infinite.
    #[error("value at index {index} is not finite ({value})")]
    NotFinite {
        /// Index of the first offending value.
        index: usize,
        /// The value itself.
        value: f32,
    },
}

/// Encodes values as little-endian `f32` bytes.
pub fn encode(values: &[f32]) -> Bytes {
    match le_bytes(values) {
        Cow::Borrowed(bytes) => Bytes::copy_from_slice(bytes),
        Cow::Owned(bytes) => Bytes::from(bytes),
    }
}

/// The values' little-endian `f32` bytes: the values' own memory on a
/// little-endian machine (no copy), an encoded copy elsewhere.
pub fn le_bytes(values: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// Splits encoded values into chunks of at most `chunk_bytes` bytes (rounded
/// down to whole values, at least one value). Chunks share the input's memory.
pub fn chunks(encoded: &Bytes, chunk_bytes: usize) -> impl Iterator<Item = (usize, Bytes)> + '_ {
    let step = (chunk_bytes / 4).max(1) * 4;
    (0..encoded.len()).step_by(step).map(move |start| {
        (
            start / 4,
            encoded.slice(start..(start + step).min(encoded.len())),
        )
    })
}

/// The values encoded in `bytes`, checked to be exactly `expected` when given.
fn values(
    bytes: &[u8],
    expected: Option<usize>,
) -> Result<impl Iterator<Item = f32> + '_, TensorError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(TensorError::Misaligned(bytes.len()));
    }
    if let Some(expected) = expected.filter(|&e| e != bytes.len() / 4) {
        return Err(TensorError::WrongLength {
            expected,
            got: bytes.len() / 4,
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
}

/// The values of `bytes` in place, without a copy, when the machine is
/// little-endian and the bytes are aligned for `f32` (an in-process update
/// always is); `None` otherwise, and the caller decodes value by value.
fn in_place(bytes: &[u8]) -> Option<&[f32]> {
    if cfg!(target_endian = "little") {
        bytemuck::try_cast_slice(bytes).ok()
    } else {
        None
    }
}

/// Whether `keep` holds for every whole value encoded in `bytes`, in one
/// branch-free pass (it vectorizes).
pub fn all_values(bytes: &[u8], keep: impl Fn(f32) -> bool) -> bool {
    match in_place(bytes) {
        Some(values) => values.iter().fold(true, |ok, &v| ok & keep(v)),
        None => bytes.chunks_exact(4).fold(true, |ok, b| {
            ok & keep(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }),
    }
}

/// Decodes `bytes` into `out`, which must have exactly the right length.
pub fn decode_into(out: &mut [f32], bytes: &[u8]) -> Result<(), TensorError> {
    let decoded = values(bytes, Some(out.len()))?;
    for (o, v) in out.iter_mut().zip(decoded) {
        *o = v;
    }
    Ok(())
}

/// Decodes `bytes` into a new vector.
pub fn decode(bytes: &[u8]) -> Result<Vec<f32>, TensorError> {
    Ok(values(bytes, None)?.collect())
}

/// Checks that every value is finite; returns the first offender otherwise.
pub fn check_finite(values: &[f32]) -> Result<(), TensorError> {
    // A branch-free pass first (it vectorizes); the search only on failure.
    if values.iter().fold(true, |ok, v| ok & v.is_finite()) {
        return Ok(());
    }
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(TensorError::NotFinite {
            index,
            value: values[index],
        }),
    }
}

/// Adds `weight * value` for every encoded value into `sum`, which must have
/// the same length as the encoded values.
pub fn fold_into(sum: &mut [f32], bytes: &[u8], weight: f32) -> Result<(), TensorError> {
    fn fold(sum: &mut [f32], values: impl Iterator<Item = f32>, weight: f32) {
        for (s, v) in sum.iter_mut().zip(values) {
            *s += weight * v;
        }
    }
    let decoded = values(bytes, Some(sum.len()))?;
    match in_place(bytes) {
        Some(values) => fold(sum, values.iter().copied(), weight),
        None => fold(sum, decoded, weight),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_chunks() {
        let v: Vec<f32> = (0..1001).map(|i| i as f32 * 0.25 - 3.0).collect();
        let enc = encode(&v);
        assert_eq!(enc.len(), 4004);
        assert_eq!(decode(&enc).unwrap(), v);
        // The wire's byte order, whatever the machine's.
        assert_eq!(&enc[4..8], &(-2.75f32).to_le_bytes());
        assert_eq!(&*le_bytes(&v), &enc[..]);
        let mut joined = Vec::new();
        let mut next = 0;
        for (offset, chunk) in chunks(&enc, 1000) {
            assert_eq!(offset, next);
            assert!(chunk.len() <= 1000);
            next += chunk.len() / 4;
            joined.extend_from_slice(&chunk);
        }
        assert_eq!(decode(&joined).unwrap(), v);
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(decode(&[0, 0, 0]), Err(TensorError::Misaligned(3)));
        let mut out = [0.0; 2];
        assert_eq!(
            decode_into(&mut out, &encode(&[1.0])),
            Err(TensorError::WrongLength {
                expected: 2,
                got: 1
            })
        );
        let err = check_finite(&[1.0, f32::NAN]).unwrap_err();
        assert!(err.to_string().contains("index 1"), "{err}");
    }

    #[test]
    fn unaligned_bytes_read_the_same_values() {
        let v = [1.5f32, -2.0, 3.25, 0.0];
        let mut buffer = vec![0u8];
        buffer.extend_from_slice(&encode(&v));
        let (aligned, unaligned) = (le_bytes(&v), &buffer[1..]);
        assert_eq!(in_place(&aligned).is_some(), cfg!(target_endian = "little"));
        assert!(in_place(unaligned).is_none());
        for bytes in [&aligned[..], unaligned] {
            let mut sum = [1.0f32; 4];
            fold_into(&mut sum, bytes, 2.0).unwrap();
            assert_eq!(sum, [4.0, -3.0, 7.5, 1.0]);
            assert!(all_values(bytes, |x| x.abs() <= 3.25));
            assert!(!all_values(bytes, |x| x.abs() < 3.25));
        }
    }

    #[test]
    fn fold_adds_weighted() {
        let mut sum = vec![1.0, 2.0];
        fold_into(&mut sum, &encode(&[0.5, -1.0]), 2.0).unwrap();
        assert_eq!(sum, vec![2.0, 0.0]);
        assert!(fold_into(&mut sum, &encode(&[0.5]), 1.0).is_err());
    }
}
