//! How long purchases are kept, and how many.
//!
//! A [`RetentionPolicy`] is enforced on every write to a device's store and
//! every load of it: purchases older than `max_age`, then the oldest beyond
//! `max_events`, are dropped before anything else happens.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ClientError;

/// Default maximum age of a stored purchase: 365 days.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(365 * 24 * 3600);
/// Default maximum number of stored purchases.
pub const DEFAULT_MAX_EVENTS: usize = 10_000;

/// Limits on what the store keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Purchases older than this (by their own time, against the device's
    /// clock) are dropped; `None`: no age limit. Default [`DEFAULT_MAX_AGE`].
    pub max_age: Option<Duration>,
    /// At most this many purchases are kept, the most recent; `None`: no
    /// limit. Default [`DEFAULT_MAX_EVENTS`].
    pub max_events: Option<usize>,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            max_age: Some(DEFAULT_MAX_AGE),
            max_events: Some(DEFAULT_MAX_EVENTS),
        }
    }
}

impl RetentionPolicy {
    /// No limits (simulations replaying old data sets; not for apps).
    pub const UNLIMITED: Self = Self {
        max_age: None,
        max_events: None,
    };

    /// Checks the limits: `max_events` at least 1 and `max_age` at least one second.
    pub fn validate(&self) -> Result<(), ClientError> {
        if self.max_events == Some(0) {
            return Err(ClientError::InvalidConfig(
                "retention max_events must be >= 1, got 0".into(),
            ));
        }
        if let Some(age) = self.max_age
            && age < Duration::from_secs(1)
        {
            return Err(ClientError::InvalidConfig(format!(
                "retention max_age must be >= 1 s, got {age:?}"
            )));
        }
        Ok(())
    }

    /// The oldest purchase time (Unix seconds) kept at `now`, if any limit.
    pub(crate) fn cutoff(&self, now: i64) -> Option<i64> {
        self.max_age
            .map(|age| now.saturating_sub(i64::try_from(age.as_secs()).unwrap_or(i64::MAX)))
    }
}
