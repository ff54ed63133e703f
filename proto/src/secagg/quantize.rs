//! Fixed-point quantization of `f32` updates into the ring of integers
//! modulo 2³², where masks are added and cancel exactly.
//!
//! A value `x` is clipped to `[-range, range]` and mapped to the nearest of
//! `L + 1` evenly spaced levels, `L = 2^bits − 2`:
//! `q(x) = round((clip(x) + range) · L / (2 · range))`, an integer in `[0, L]`.
//! The quantization step is `Δ = 2 · range / L`.
//!
//! **Zero is a level.** `L` is even, so the odd number of levels is
//! symmetric around 0 and 0 itself is one (code `L / 2`): a value of exactly
//! 0, which is most of a dense update, is encoded without error. With `2^bits`
//! levels 0 would fall between two of them, and every zero would decode as
//! half a step, a bias that adds up over a cohort and over rounds.
//!
//! **Error.** For one value, `|dequantize(q(x)) − clip(x)| ≤ Δ / 2 =
//! range / (2^bits − 2)` ([`Quantizer::max_error`]), up to the final rounding
//! of the result to `f32` (half an ulp, at most `2⁻²⁴ · range`). For a sum of
//! `count` values decoded by [`Quantizer::decode_sum`], the error is at most
//! `count · range / (2^bits − 2)`, again up to the rounding of the result to
//! `f32`. Clipping is not an error of the quantizer: values beyond `range` are
//! deliberately cut, so choose `range` to cover the updates (or to be the
//! clipping bound of differential privacy).
//!
//! **Overflow.** Codes are added with wrapping `u32` arithmetic (the masks
//! need it), so the true sum of `count` codes must stay below 2³²:
//! `count · L ≤ 2³² − 1`, that is `count ≤` [`Quantizer::max_summands`].
//! The decoder refuses larger counts, and [`SecAggConfig::params`] refuses
//! cohorts that large.
//!
//! [`SecAggConfig::params`]: super::SecAggConfig::params

use super::SecAggError;

/// Maps `f32` values to `bits`-bit integers and decodes sums of them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quantizer {
    range: f32,
    bits: u32,
}

impl Quantizer {
    /// The smallest supported `bits` (three levels: `-range`, 0, `range`).
    pub const MIN_BITS: u32 = 2;
    /// The largest supported `bits` (at 32 bits not even two codes could be
    /// added without overflow).
    pub const MAX_BITS: u32 = 31;

    /// A quantizer clipping to `[-range, range]` with `2^bits − 1` levels.
    ///
    /// `range` must be finite and positive, `bits` in `2..=31`.
    pub fn new(range: f32, bits: u32) -> Result<Self, SecAggError> {
        if !(range.is_finite() && range > 0.0) {
            return Err(SecAggError::InvalidConfig(format!(
                "range must be finite and > 0, got {range}"
            )));
        }
        if !(Self::MIN_BITS..=Self::MAX_BITS).contains(&bits) {
            return Err(SecAggError::InvalidConfig(format!(
                "bits must be in {}..={}, got {bits}",
                Self::MIN_BITS,
                Self::MAX_BITS
            )));
        }
        Ok(Self { range, bits })
    }

    /// The clipping bound.
    pub fn range(&self) -> f32 {
        self.range
    }

    /// Bits per quantized value.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// The largest code, `2^bits − 2` (the code of `+range`; 0 has code
    /// `max_code / 2`).
    pub fn max_code(&self) -> u32 {
        (1_u32 << self.bits) - 2
    }

    /// The quantization step `Δ = 2 · range / (2^bits − 2)`.
    pub fn step(&self) -> f64 {
        2.0 * f64::from(self.range) / f64::from(self.max_code())
    }

    /// The worst-case error of one quantized value, `Δ / 2 = range /
    /// (2^bits − 2)` (before the final rounding to `f32`).
    pub fn max_error(&self) -> f64 {
        self.step() / 2.0
    }

    /// How many codes can be added without the sum reaching 2³²:
    /// `⌊(2³² − 1) / (2^bits − 2)⌋`.
    pub fn max_summands(&self) -> usize {
        (u32::MAX / self.max_code()) as usize
    }

    /// The code of one value: clipped to `[-range, range]`, then rounded to
    /// the nearest level. NaN is treated as 0; the slice methods reject it.
    pub fn quantize(&self, value: f32) -> u32 {
        self.code(value, f64::from(self.range), self.levels_per_unit())
    }

    /// Levels per unit of value, `1 / Δ`.
    fn levels_per_unit(&self) -> f64 {
        f64::from(self.max_code()) / (2.0 * f64::from(self.range))
    }

    /// [`quantize`](Self::quantize) with its constants hoisted (the hot loop
    /// of masking: no division and no call to `round` per value).
    #[inline]
    fn code(&self, value: f32, range: f64, per_unit: f64) -> u32 {
        let value = if value.is_nan() { 0.0 } else { value };
        let clipped = f64::from(value.clamp(-self.range, self.range));
        // `clipped + range` is in [0, 2 · range]: adding one half and
        // truncating rounds to the nearest level; `min` guards the top end.
        (((clipped + range) * per_unit + 0.5) as u32).min(self.max_code())
    }

    /// The value a code stands for: `code · Δ − range`.
    pub fn dequantize(&self, code: u32) -> f32 {
        (f64::from(code) * self.step() - f64::from(self.range)) as f32
    }

    /// Writes the codes of `values` into `out` (same length). Rejects NaN and
    /// infinite values, leaving `out` untouched.
    pub fn quantize_into(&self, values: &[f32], out: &mut [u32]) -> Result<(), SecAggError> {
        check_input(values, out.len())?;
        let (range, per_unit) = (f64::from(self.range), self.levels_per_unit());
        for (o, v) in out.iter_mut().zip(values) {
            *o = self.code(*v, range, per_unit);
        }
        Ok(())
    }

    /// Adds the codes of `values` into `acc` (same length) with wrapping
    /// arithmetic. Rejects NaN and infinite values, leaving `acc` untouched.
    pub fn add_quantized(&self, values: &[f32], acc: &mut [u32]) -> Result<(), SecAggError> {
        check_input(values, acc.len())?;
        let (range, per_unit) = (f64::from(self.range), self.levels_per_unit());
        for (a, v) in acc.iter_mut().zip(values) {
            *a = a.wrapping_add(self.code(*v, range, per_unit));
        }
        Ok(())
    }

    /// Decodes the wrapping sum of `count` quantized vectors into the sum of
    /// the (clipped, quantized) values: `out[i] = sum[i] · Δ − count · range`.
    ///
    /// `out` must have the length of `sum`, and `count` must be at most
    /// [`max_summands`](Self::max_summands) (otherwise the sum may have
    /// wrapped and cannot be decoded). The error bound is in the module docs.
    pub fn decode_sum(
        &self,
        sum: &[u32],
        count: usize,
        out: &mut [f32],
    ) -> Result<(), SecAggError> {
        if out.len() != sum.len() {
            return Err(SecAggError::WrongLength {
                expected: sum.len(),
                got: out.len(),
            });
        }
        if count > self.max_summands() {
            return Err(SecAggError::CohortFull {
                max: self.max_summands(),
            });
        }
        let step = self.step();
        let offset = count as f64 * f64::from(self.range);
        for (o, s) in out.iter_mut().zip(sum) {
            *o = (f64::from(*s) * step - offset) as f32;
        }
        Ok(())
    }
}

/// Checks lengths and finiteness of an input vector.
fn check_input(values: &[f32], len: usize) -> Result<(), SecAggError> {
    if values.len() != len {
        return Err(SecAggError::WrongLength {
            expected: len,
            got: values.len(),
        });
    }
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(SecAggError::NotFinite {
            index,
            value: values[index],
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::{Rng, SeedableRng};

    /// A uniform f32 in [lo, hi).
    fn uniform(rng: &mut ChaCha20Rng, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * (rng.next_u32() >> 8) as f32 / (1 << 24) as f32
    }

    #[test]
    fn round_trip_error_is_within_the_stated_bound() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for (range, bits) in [(1.0, 20), (0.05, 16), (3.0, 8), (1.0, 2), (100.0, 31)] {
            let q = Quantizer::new(range, bits).unwrap();
            // Bound: half a step, plus half an f32 ulp of the output.
            let bound = q.max_error() + f64::from(range) * f64::EPSILON.max(2f64.powi(-24));
            let mut worst = 0.0_f64;
            for _ in 0..20_000 {
                let x = uniform(&mut rng, -range, range);
                let err = (f64::from(q.dequantize(q.quantize(x))) - f64::from(x)).abs();
                worst = worst.max(err);
                assert!(
                    err <= bound,
                    "range {range} bits {bits}: x {x} err {err} > {bound}"
                );
            }
            // The bound is tight: some value comes within 10% of it (for fine
            // grids the f32 inputs sample the step densely enough).
            if bits <= 20 {
                assert!(
                    worst > 0.9 * q.max_error(),
                    "worst {worst} vs {}",
                    q.max_error()
                );
            }
        }
        let q = Quantizer::new(1.0, 20).unwrap();
        assert_eq!(q.quantize(-1.0), 0);
        assert_eq!(q.quantize(1.0), q.max_code());
        assert_eq!(q.quantize(0.0), q.max_code() / 2);
        assert_eq!(q.dequantize(q.max_code() / 2), 0.0, "zero is a level");
        assert!((q.max_error() - 1.0 / f64::from((1 << 20) - 2)).abs() < 1e-18);
    }

    #[test]
    fn clipping() {
        let q = Quantizer::new(0.5, 12).unwrap();
        assert_eq!(q.quantize(7.0), q.max_code());
        assert_eq!(q.quantize(f32::INFINITY), q.max_code());
        assert_eq!(q.quantize(-0.5000001), 0);
        assert_eq!(q.quantize(f32::MIN), 0);
        assert_eq!(q.dequantize(q.quantize(7.0)), 0.5);
        assert_eq!(q.dequantize(q.quantize(-9.0)), -0.5);
        assert_eq!(q.quantize(f32::NAN), q.quantize(0.0));
        let mut out = [0; 2];
        let err = q.quantize_into(&[1.0, f32::NAN], &mut out).unwrap_err();
        assert_eq!(err.reason(), "not_finite");
        assert!(err.to_string().contains("index 1"), "{err}");
        assert_eq!(out, [0, 0]);
        let err = q.add_quantized(&[1.0], &mut out).unwrap_err();
        assert_eq!(
            err,
            SecAggError::WrongLength {
                expected: 2,
                got: 1
            }
        );
    }

    #[test]
    fn sums_decode_within_count_times_the_bound() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let q = Quantizer::new(2.0, 16).unwrap();
        let count = 300;
        let dim = 64;
        let mut acc = vec![0_u32; dim];
        let mut exact = vec![0.0_f64; dim];
        for _ in 0..count {
            let values: Vec<f32> = (0..dim).map(|_| uniform(&mut rng, -3.0, 3.0)).collect();
            q.add_quantized(&values, &mut acc).unwrap();
            for (e, v) in exact.iter_mut().zip(&values) {
                *e += f64::from(v.clamp(-2.0, 2.0));
            }
        }
        let mut out = vec![0.0; dim];
        q.decode_sum(&acc, count, &mut out).unwrap();
        for (o, e) in out.iter().zip(&exact) {
            let bound = count as f64 * q.max_error() + e.abs() * 2f64.powi(-24) + 1e-9;
            assert!((f64::from(*o) - e).abs() <= bound, "{o} vs {e}");
        }
        assert!(q.decode_sum(&acc, count, &mut out[1..]).is_err());
    }

    #[test]
    fn max_summands_is_exactly_the_overflow_limit() {
        for bits in [2, 8, 16, 20, 24, 31] {
            let q = Quantizer::new(1.0, bits).unwrap();
            let m = q.max_summands();
            let top = u64::from(q.max_code());
            assert!(m as u64 * top <= u64::from(u32::MAX), "bits {bits}");
            assert!((m as u64 + 1) * top > u64::from(u32::MAX), "bits {bits}");
            // m copies of +range decode exactly; one more wraps and is refused.
            let mut acc = [0_u32];
            for _ in 0..m.min(10_000) {
                q.add_quantized(&[1.0], &mut acc).unwrap();
            }
            // The rest of the m codes of +range at once.
            acc[0] += (m.saturating_sub(10_000) as u32) * q.max_code();
            let mut out = [0.0];
            q.decode_sum(&acc, m, &mut out).unwrap();
            let expected = m as f64;
            assert!(
                (f64::from(out[0]) - expected).abs() <= expected * 1e-6,
                "bits {bits}"
            );
            assert_eq!(
                q.decode_sum(&acc, m + 1, &mut out),
                Err(SecAggError::CohortFull { max: m })
            );
        }
        assert_eq!(Quantizer::new(1.0, 16).unwrap().max_summands(), 65_538);
        assert_eq!(Quantizer::new(1.0, 20).unwrap().max_summands(), 4_096);
        assert_eq!(Quantizer::new(1.0, 31).unwrap().max_summands(), 2);
    }

    #[test]
    fn invalid_quantizers_are_named() {
        for (range, bits, needle) in [
            (0.0, 8, "range"),
            (-1.0, 8, "range"),
            (f32::NAN, 8, "range"),
            (f32::INFINITY, 8, "range"),
            (1.0, 0, "bits"),
            (1.0, 1, "bits"),
            (1.0, 32, "bits"),
        ] {
            let err = Quantizer::new(range, bits).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
    }
}
