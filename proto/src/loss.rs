//! The devices' training objective: one enum for the coordinator's
//! `[training]` section, the task on the wire and the device's model.

use serde::{Deserialize, Serialize};

use crate::pb;

/// What local training minimizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Loss {
    /// Bayesian personalized ranking over sampled negatives, by local SGD
    /// (Rendle et al. 2009): several local epochs, the private vector
    /// trained alongside.
    #[default]
    Bpr,
    /// Confidence-weighted least squares over all items (Hu, Koren &
    /// Volinsky 2008, as implicit ALS): the private vector is solved exactly
    /// on the device and the update is one exact gradient step of the
    /// global parameters (`local_epochs` is not used).
    Als,
}

impl From<Loss> for pb::Loss {
    fn from(loss: Loss) -> Self {
        match loss {
            Loss::Bpr => pb::Loss::Bpr,
            Loss::Als => pb::Loss::Als,
        }
    }
}

impl From<pb::Loss> for Loss {
    fn from(loss: pb::Loss) -> Self {
        match loss {
            pb::Loss::Bpr => Loss::Bpr,
            pb::Loss::Als => Loss::Als,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_twin_round_trips() {
        for loss in [Loss::Bpr, Loss::Als] {
            assert_eq!(Loss::from(pb::Loss::from(loss)), loss);
        }
    }
}
