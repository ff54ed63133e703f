//! The shopper's consent: what the SDK may do with their purchases.
//!
//! Opt-in: a new device has [`Consent::None`]. The level is held in a
//! [`ConsentCell`] that every copy of a device shares, so a change made by
//! the app (for example while a training round runs on a copy of the device)
//! takes effect at once: the participant checks it before every check-in
//! and again before anything it computed is sent.

use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::error::ClientError;

/// What the shopper allows, from least to most.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Consent {
    /// Nothing is stored; recommendations are not personal (the global
    /// model's most popular items). The default.
    #[default]
    None,
    /// The purchase history is stored and used for recommendations on this
    /// device only; it never takes part in training.
    OnDevice,
    /// As `OnDevice`, and the device also takes part in federated training
    /// rounds (sending only model updates and evaluation counts).
    Federated,
}

impl Consent {
    /// Whether purchases may be stored.
    pub fn stores_history(self) -> bool {
        self >= Consent::OnDevice
    }

    /// Whether the device may take part in training or evaluation rounds.
    pub fn allows_training(self) -> bool {
        self >= Consent::Federated
    }

    /// A short name for settings screens and logs.
    pub fn name(self) -> &'static str {
        match self {
            Consent::None => "none",
            Consent::OnDevice => "on-device",
            Consent::Federated => "federated",
        }
    }
}

impl std::fmt::Display for Consent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A consent level and when the shopper set it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentRecord {
    /// The level in force.
    pub level: Consent,
    /// When it was set (Unix seconds); `None` while it is the default.
    pub set_at: Option<i64>,
}

/// What a change of consent did, so the app can follow up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsentChange {
    /// The level before the change.
    pub previous: Consent,
    /// The level now in force.
    pub current: Consent,
    /// The consent was lowered to [`Consent::None`] while purchases are still
    /// stored: the app should offer to erase them (`forget_me`). Until then
    /// they are kept, subject to retention, but not used.
    pub offer_erase: bool,
}

/// The consent record shared by a device and its copies.
#[derive(Clone, Debug, Default)]
pub struct ConsentCell(Arc<Mutex<ConsentRecord>>);

impl ConsentCell {
    /// A cell holding `record`.
    pub fn new(record: ConsentRecord) -> Self {
        Self(Arc::new(Mutex::new(record)))
    }

    /// The record in force.
    pub fn get(&self) -> ConsentRecord {
        // The record is a plain value: a panic elsewhere cannot leave it half written.
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The level in force.
    pub fn level(&self) -> Consent {
        self.get().level
    }

    /// Replaces the record; returns the previous one.
    pub fn set(&self, record: ConsentRecord) -> ConsentRecord {
        std::mem::replace(
            &mut *self.0.lock().unwrap_or_else(PoisonError::into_inner),
            record,
        )
    }

    /// An error unless the level allows training rounds.
    pub fn require_training(&self) -> Result<(), ClientError> {
        let level = self.level();
        if level.allows_training() {
            Ok(())
        } else {
            Err(ClientError::ConsentRequired {
                needed: Consent::Federated,
                current: level,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_opt_in() {
        assert_eq!(Consent::default(), Consent::None);
        assert!(!Consent::None.stores_history());
        assert!(Consent::OnDevice.stores_history() && !Consent::OnDevice.allows_training());
        assert!(Consent::Federated.stores_history() && Consent::Federated.allows_training());
    }

    #[test]
    fn copies_of_a_cell_see_a_change_at_once() {
        let cell = ConsentCell::default();
        let copy = cell.clone();
        assert!(copy.require_training().is_err());
        cell.set(ConsentRecord {
            level: Consent::Federated,
            set_at: Some(5),
        });
        assert!(copy.require_training().is_ok());
    }
}
