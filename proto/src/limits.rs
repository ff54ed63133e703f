//! The bounds of the training settings a task carries, checked at both
//! ends: the coordinator refuses a configuration outside them at start-up
//! (so that it never hands out a task every device would refuse), and each
//! device refuses a task outside them.
//!
//! ```
//! use fedrec_proto::limits;
//! assert!(limits::LEARNING_RATE.check(0.05).is_ok());
//! let err = limits::LEARNING_RATE.check(20.0).unwrap_err();
//! assert_eq!(err.to_string(), "learning_rate must be in (0, 10], got 20");
//! let err = limits::LOCAL_EPOCHS.check(1e300).unwrap_err();
//! assert_eq!(err.to_string(), "local_epochs must be in [1, 1000], got 1e300");
//! ```

use std::fmt;

/// A range `[lo, hi]` (or `(lo, hi]`) a named setting must fall in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound {
    /// The setting's name, as in a task's `TrainingConfig`.
    pub name: &'static str,
    /// The lower end.
    pub lo: f64,
    /// Whether `lo` itself is excluded.
    pub open_lo: bool,
    /// The upper end (included).
    pub hi: f64,
}

/// A value outside its [`Bound`]; its message names the setting, the range
/// and the value.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
#[error("{} must be in {}{}, {}], got {}", bound.name, if bound.open_lo { '(' } else { '[' }, Number(bound.lo), Number(bound.hi), Number(*value))]
pub struct OutOfBounds {
    /// The bound.
    pub bound: Bound,
    /// The refused value.
    pub value: f64,
}

impl Bound {
    /// Checks that `value` is finite and inside the bound.
    pub fn check(&self, value: f64) -> Result<(), OutOfBounds> {
        let above = if self.open_lo {
            value > self.lo
        } else {
            value >= self.lo
        };
        if value.is_finite() && above && value <= self.hi {
            Ok(())
        } else {
            Err(OutOfBounds {
                bound: *self,
                value,
            })
        }
    }
}

/// `local_epochs`: passes over the device's purchases per task.
pub const LOCAL_EPOCHS: Bound = Bound {
    name: "local_epochs",
    lo: 1.0,
    open_lo: false,
    hi: 1000.0,
};
/// `learning_rate` of local SGD.
pub const LEARNING_RATE: Bound = Bound {
    name: "learning_rate",
    lo: 0.0,
    open_lo: true,
    hi: 10.0,
};
/// `regularization` (L2).
pub const REGULARIZATION: Bound = Bound {
    name: "regularization",
    lo: 0.0,
    open_lo: false,
    hi: 10.0,
};
/// `proximal_mu` (FedProx).
pub const PROXIMAL_MU: Bound = Bound {
    name: "proximal_mu",
    lo: 0.0,
    open_lo: false,
    hi: 100.0,
};
/// `confidence` of a purchase under the ALS loss.
pub const CONFIDENCE: Bound = Bound {
    name: "confidence",
    lo: 1.0,
    open_lo: false,
    hi: 1e4,
};
/// `negatives` sampled per purchase.
pub const NEGATIVES: Bound = Bound {
    name: "negatives",
    lo: 1.0,
    open_lo: false,
    hi: 1000.0,
};

/// A task's training settings, as numbers, checked together against the
/// bounds above (in this order; the first one outside is reported).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Training {
    /// Passes over the device's purchases per task.
    pub local_epochs: f64,
    /// Learning rate of local SGD.
    pub learning_rate: f64,
    /// L2 regularization.
    pub regularization: f64,
    /// FedProx's proximal term.
    pub proximal_mu: f64,
    /// Confidence of a purchase under the ALS loss.
    pub confidence: f64,
    /// Negatives sampled per purchase.
    pub negatives: f64,
}

impl Training {
    /// Checks every setting against its bound.
    pub fn check(&self) -> Result<(), OutOfBounds> {
        LOCAL_EPOCHS.check(self.local_epochs)?;
        LEARNING_RATE.check(self.learning_rate)?;
        REGULARIZATION.check(self.regularization)?;
        PROXIMAL_MU.check(self.proximal_mu)?;
        CONFIDENCE.check(self.confidence)?;
        NEGATIVES.check(self.negatives)
    }
}

/// A number as people read it: plain when short (`20`, `0.05`), in
/// scientific notation when plain would be long (`1e300`, `1e-12`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Number(pub f64);

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0.abs();
        if v.is_finite() && v != 0.0 && !(1e-6..1e15).contains(&v) {
            write!(f, "{:e}", self.0)
        } else {
            write!(f, "{}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_refuse_out_of_range_and_non_finite_values_naming_them() {
        assert!(NEGATIVES.check(1000.0).is_ok());
        assert!(REGULARIZATION.check(0.0).is_ok());
        assert!(LEARNING_RATE.check(0.0).is_err());
        assert!(PROXIMAL_MU.check(f64::NAN).is_err());
        assert_eq!(
            PROXIMAL_MU.check(101.0).unwrap_err().to_string(),
            "proximal_mu must be in [0, 100], got 101"
        );
        assert_eq!(Number(1e-300).to_string(), "1e-300");
        assert_eq!(Number(0.05).to_string(), "0.05");
        assert_eq!(Number(f64::INFINITY).to_string(), "inf");
    }
}
