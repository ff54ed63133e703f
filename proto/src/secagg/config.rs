//! The configuration of secure aggregation, shared by the coordinator and
//! the devices, and the per-round parameters derived from it.
//!
//! Devices must check the configuration they are given ([`SecAggConfig::params`]
//! does): a coordinator that lowered the threshold could collect both secrets
//! of a device from its neighbours.

use serde::{Deserialize, Serialize};

use super::graph::{default_degree, effective_degree};
use super::shamir::MAX_SHARES;
use super::{Quantizer, SecAggError};

/// Default [`SecAggConfig::threshold`]: two thirds of the neighbours.
pub const DEFAULT_THRESHOLD: f64 = 2.0 / 3.0;
/// Default [`SecAggConfig::range`].
pub const DEFAULT_RANGE: f32 = 1.0;
/// Default [`SecAggConfig::bits`].
pub const DEFAULT_BITS: u32 = 20;
/// The fewest devices a round can have.
pub const MIN_PARTIES: usize = 2;
/// The most neighbours a device can have (shares per secret, GF(2⁸)).
pub const MAX_NEIGHBOURS: usize = MAX_SHARES;

/// How secure aggregation runs. Every field has a default, so an empty TOML
/// table is valid.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecAggConfig {
    /// Neighbours per device, `k`. Default (`None`): `2 · ⌈log2 n⌉` for a
    /// cohort of `n` (18 for 500 devices), the SecAgg+ choice of `k =
    /// O(log n)`: each device's work and traffic grow logarithmically with the
    /// cohort instead of linearly. Bell et al. derive larger constants for
    /// formal guarantees against a given fraction of corrupt and dropped
    /// devices; raise `k` for more margin. Capped at `n − 1` (everyone is
    /// everyone's neighbour, as in the original SecAgg) and raised by one when
    /// both `k` and `n` are odd. At most 255 (shares per secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub neighbours: Option<usize>,
    /// Shares needed to reconstruct a device's secret, as a fraction of its
    /// neighbours: `t = ⌈threshold · k⌉`. Must be in `(0.5, 1]`: with
    /// `2t > k` no coordinator can collect `t` shares of both secrets of a
    /// device from its honest neighbours. Default 2/3: each device tolerates
    /// a third of its neighbours dropping out, and its update stays hidden
    /// unless at least `2t − k ≈ k/3` of its neighbours collude with the
    /// coordinator (at `t = ⌊k/2⌋ + 1` two colluders would suffice).
    pub threshold: f64,
    /// Updates are clipped to `[-range, range]` before quantization. Default
    /// 1.0.
    pub range: f32,
    /// Bits per quantized value, in `2..=31`. Default 20: a worst-case error
    /// of `range / (2²⁰ − 2) ≈ 1e-6 · range` per value, and cohorts of up to
    /// 4,096 devices before the `u32` sum could overflow.
    pub bits: u32,
}

impl Default for SecAggConfig {
    fn default() -> Self {
        Self {
            neighbours: None,
            threshold: DEFAULT_THRESHOLD,
            range: DEFAULT_RANGE,
            bits: DEFAULT_BITS,
        }
    }
}

/// What a round of `parties` devices runs with: both sides derive it from
/// the configuration and the roster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoundParams {
    /// Devices that advertised keys, `n`.
    pub parties: usize,
    /// Neighbours per device, `k` (the graph's degree).
    pub neighbours: usize,
    /// Shares needed to reconstruct a secret, `t`, with `2t > k`.
    pub threshold: usize,
}

impl SecAggConfig {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), SecAggError> {
        if !(self.threshold > 0.5 && self.threshold <= 1.0) {
            return Err(SecAggError::InvalidConfig(format!(
                "threshold must be a fraction of the neighbours in (0.5, 1], got {}",
                self.threshold
            )));
        }
        if let Some(k) = self.neighbours
            && !(1..=MAX_NEIGHBOURS).contains(&k)
        {
            return Err(SecAggError::InvalidConfig(format!(
                "neighbours must be in 1..={MAX_NEIGHBOURS}, got {k}"
            )));
        }
        Quantizer::new(self.range, self.bits)?;
        Ok(())
    }

    /// The quantizer of `range` and `bits`.
    pub fn quantizer(&self) -> Result<Quantizer, SecAggError> {
        Quantizer::new(self.range, self.bits)
    }

    /// The largest cohort whose sum cannot overflow
    /// ([`Quantizer::max_summands`]).
    pub fn max_parties(&self) -> Result<usize, SecAggError> {
        Ok(self.quantizer()?.max_summands())
    }

    /// The parameters of a round with `parties` devices; refuses
    /// configurations that are invalid or do not fit that cohort.
    pub fn params(&self, parties: usize) -> Result<RoundParams, SecAggError> {
        self.validate()?;
        if parties < MIN_PARTIES {
            return Err(SecAggError::InvalidConfig(format!(
                "a round needs at least {MIN_PARTIES} devices, got {parties}"
            )));
        }
        let max = self.max_parties()?;
        if parties > max {
            return Err(SecAggError::InvalidConfig(format!(
                "{parties} devices overflow the sum of {}-bit values (at most {max}); \
                 lower bits or the cohort size",
                self.bits
            )));
        }
        let neighbours = match self.neighbours {
            Some(k) => effective_degree(parties, k),
            None => default_degree(parties),
        };
        if neighbours > MAX_NEIGHBOURS {
            return Err(SecAggError::InvalidConfig(format!(
                "{parties} devices need {neighbours} neighbours each, at most \
                 {MAX_NEIGHBOURS} are supported; set neighbours"
            )));
        }
        Ok(RoundParams {
            parties,
            neighbours,
            threshold: threshold_count(neighbours, self.threshold),
        })
    }
}

/// `⌈fraction · k⌉`, and at least `⌊k/2⌋ + 1`. A product within 1e-9 of an
/// integer counts as that integer, so that `2/3 · 18` gives 12, not 13, on
/// every platform.
fn threshold_count(k: usize, fraction: f64) -> usize {
    let t = (fraction * k as f64 - 1e-9).ceil() as usize;
    t.clamp(k / 2 + 1, k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_derived_parameters() {
        let c = SecAggConfig::default();
        c.validate().unwrap();
        assert_eq!(c.max_parties().unwrap(), 4096);
        for (n, k, t) in [
            (2, 1, 1),
            (3, 2, 2),
            (4, 3, 2),
            (10, 8, 6),
            (50, 12, 8),
            (100, 14, 10),
            (500, 18, 12),
            (4096, 24, 16),
        ] {
            let p = c.params(n).unwrap();
            assert_eq!((p.parties, p.neighbours, p.threshold), (n, k, t), "n {n}");
            assert!(2 * p.threshold > p.neighbours);
        }
        let c = SecAggConfig {
            neighbours: Some(5),
            threshold: 0.51,
            ..SecAggConfig::default()
        };
        let p = c.params(9).unwrap();
        assert_eq!((p.neighbours, p.threshold), (6, 4));
        let p = c.params(10).unwrap();
        assert_eq!((p.neighbours, p.threshold), (5, 3));
        let full = SecAggConfig {
            threshold: 1.0,
            ..c
        };
        assert_eq!(full.params(10).unwrap().threshold, 5);
    }

    #[test]
    fn thresholds_are_more_than_half() {
        for k in 1..=255 {
            for f in [0.5000001, 0.51, 0.6, 2.0 / 3.0, 0.75, 0.9, 1.0] {
                let t = threshold_count(k, f);
                assert!(2 * t > k && t <= k, "k {k} f {f} t {t}");
                assert!(t as f64 >= f * k as f64 - 1e-6, "k {k} f {f} t {t}");
            }
        }
        assert_eq!(threshold_count(18, 2.0 / 3.0), 12);
        assert_eq!(threshold_count(3, 2.0 / 3.0), 2);
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let base = SecAggConfig::default();
        let cases = [
            (
                SecAggConfig {
                    threshold: 0.5,
                    ..base.clone()
                },
                "threshold",
            ),
            (
                SecAggConfig {
                    threshold: 1.5,
                    ..base.clone()
                },
                "threshold",
            ),
            (
                SecAggConfig {
                    threshold: f64::NAN,
                    ..base.clone()
                },
                "threshold",
            ),
            (
                SecAggConfig {
                    neighbours: Some(0),
                    ..base.clone()
                },
                "neighbours",
            ),
            (
                SecAggConfig {
                    neighbours: Some(256),
                    ..base.clone()
                },
                "neighbours",
            ),
            (
                SecAggConfig {
                    range: 0.0,
                    ..base.clone()
                },
                "range",
            ),
            (
                SecAggConfig {
                    bits: 32,
                    ..base.clone()
                },
                "bits",
            ),
        ];
        for (config, needle) in cases {
            let err = config.validate().unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
            assert!(config.params(10).is_err());
        }
        let err = base.params(1).unwrap_err();
        assert!(err.to_string().contains("at least 2"), "{err}");
        let err = base.params(4097).unwrap_err();
        assert!(err.to_string().contains("overflow"), "{err}");
        let coarse = SecAggConfig { bits: 31, ..base };
        assert_eq!(coarse.params(2).unwrap().neighbours, 1);
        let err = coarse.params(3).unwrap_err();
        assert!(err.to_string().contains("at most 2"), "{err}");
        let wide = SecAggConfig {
            neighbours: Some(255),
            bits: 8,
            ..SecAggConfig::default()
        };
        assert_eq!(wide.params(256).unwrap().neighbours, 255);
        // 255 is odd and so is 257: the graph would need 256 neighbours.
        let err = wide.params(257).unwrap_err();
        assert!(err.to_string().contains("256 neighbours"), "{err}");
    }
}
