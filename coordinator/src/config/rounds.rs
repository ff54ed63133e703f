//! `[rounds]`: how rounds are formed and ended.

use super::*;
use crate::CoordinatorError;

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default `rounds.rounds` (0 = run forever).
pub const DEFAULT_ROUNDS: u32 = 0;
/// Default `rounds.clients_per_round`.
pub const DEFAULT_CLIENTS_PER_ROUND: usize = 10;
/// Default `rounds.over_selection`.
pub const DEFAULT_OVER_SELECTION: f64 = 1.0;
/// Default `rounds.min_updates`.
pub const DEFAULT_MIN_UPDATES: usize = 1;
/// Default `rounds.deadline_secs`.
pub const DEFAULT_DEADLINE_SECS: f64 = 60.0;
/// Default `rounds.checkin_window_secs`.
pub const DEFAULT_CHECKIN_WINDOW_SECS: f64 = 30.0;
/// Default `rounds.evaluate`.
pub const DEFAULT_EVALUATE: bool = true;
/// Default `rounds.final_evaluation`.
pub const DEFAULT_FINAL_EVALUATION: bool = true;
/// Default `rounds.async_concurrency`.
pub const DEFAULT_ASYNC_CONCURRENCY: usize = 100;
/// Default `rounds.async_buffer`.
pub const DEFAULT_ASYNC_BUFFER: usize = 10;
/// Default `rounds.async_max_staleness`.
pub const DEFAULT_ASYNC_MAX_STALENESS: u64 = 10;
/// Default `rounds.rest_secs`.
pub const DEFAULT_REST_SECS: f64 = 0.0;

/// How training is paced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoundsMode {
    /// Synchronous rounds: a cohort is selected, trains on one model version
    /// and the round closes at its target count or deadline.
    #[default]
    Sync,
    /// Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022):
    /// eligible devices that check in wait for a slot, and each free slot
    /// (up to `async_concurrency` training at once) goes to a device drawn
    /// at random from those waiting; each accepted update is
    /// weighted by its staleness τ (versions since the one it started from)
    /// as `1/√(1+τ)` and folded into a buffer; every `async_buffer`
    /// accepted updates the server step runs and the model version
    /// advances. `rounds.rounds` counts these steps. Updates more than
    /// `async_max_staleness` versions stale are refused (`too_stale`).
    Async,
}

/// `[rounds]`: how rounds are formed and ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoundsConfig {
    /// Number of training rounds (completed or abandoned) before finishing;
    /// 0 runs forever. Default [`DEFAULT_ROUNDS`].
    pub rounds: u32,
    /// Updates wanted per training round. Default [`DEFAULT_CLIENTS_PER_ROUND`].
    pub clients_per_round: usize,
    /// Instead of a count, the fraction (0, 1] of the waiting devices to
    /// select; the round then starts when the check-in window passes (or every
    /// joined device is waiting). Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// Over-selection factor (>= 1): select `ceil(wanted * over_selection)`
    /// devices and complete the round as soon as `wanted` updates arrived, to
    /// absorb drop-outs. Default [`DEFAULT_OVER_SELECTION`].
    pub over_selection: f64,
    /// Fewest updates a round needs: a round still short of it at its deadline
    /// is abandoned (nothing applied), and a round starts after the check-in
    /// window only when at least this many devices wait. Default
    /// [`DEFAULT_MIN_UPDATES`].
    pub min_updates: usize,
    /// Seconds from a round's start to its deadline. Default [`DEFAULT_DEADLINE_SECS`].
    pub deadline_secs: f64,
    /// Seconds to wait for a full cohort, counted from when the first device
    /// started waiting (or the previous round ended); past it a round starts
    /// with the devices waiting, if at least `min_updates`. The window ends
    /// early when every joined device is waiting (and they are at least
    /// `min_updates`) and no device has joined for
    /// [`JOIN_SETTLE`](crate::round::JOIN_SETTLE): waiting longer could only
    /// bring new devices. Default
    /// [`DEFAULT_CHECKIN_WINDOW_SECS`].
    pub checkin_window_secs: f64,
    /// Ask training cohorts to evaluate the received model before training and
    /// report the counts with their update. Default [`DEFAULT_EVALUATE`].
    pub evaluate: bool,
    /// After the last training round, run one evaluation round with every
    /// joined device. Default [`DEFAULT_FINAL_EVALUATION`].
    pub final_evaluation: bool,
    /// Synchronous rounds or asynchronous buffered aggregation. Default
    /// [`RoundsMode::Sync`].
    pub mode: RoundsMode,
    /// Async mode: most devices training at once. Default
    /// [`DEFAULT_ASYNC_CONCURRENCY`].
    pub async_concurrency: usize,
    /// Async mode: accepted updates per server step (FedBuff's K). Default
    /// [`DEFAULT_ASYNC_BUFFER`].
    pub async_buffer: usize,
    /// Async mode: most model versions an update may lag behind the current
    /// one. Default [`DEFAULT_ASYNC_MAX_STALENESS`].
    pub async_max_staleness: u64,
    /// Seconds a device rests after it gets a training task before it may
    /// get another (either mode): while training runs, its check-ins are
    /// answered with a wait until then (the final evaluation still takes
    /// it). A cap on how often one device trains (its battery, its data's
    /// weight in the model). 0 = no rest. Not with differential privacy.
    /// Default [`DEFAULT_REST_SECS`].
    pub rest_secs: f64,
    /// Seed of the pseudonym and cohort-sampling RNG; unset = OS entropy.
    /// Set it for reproducible simulations only: with a known seed, pseudonyms
    /// (which act as the devices' credentials) are predictable. Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Default for RoundsConfig {
    fn default() -> Self {
        Self {
            rounds: DEFAULT_ROUNDS,
            clients_per_round: DEFAULT_CLIENTS_PER_ROUND,
            fraction: None,
            over_selection: DEFAULT_OVER_SELECTION,
            min_updates: DEFAULT_MIN_UPDATES,
            deadline_secs: DEFAULT_DEADLINE_SECS,
            checkin_window_secs: DEFAULT_CHECKIN_WINDOW_SECS,
            evaluate: DEFAULT_EVALUATE,
            final_evaluation: DEFAULT_FINAL_EVALUATION,
            mode: RoundsMode::Sync,
            async_concurrency: DEFAULT_ASYNC_CONCURRENCY,
            async_buffer: DEFAULT_ASYNC_BUFFER,
            async_max_staleness: DEFAULT_ASYNC_MAX_STALENESS,
            rest_secs: DEFAULT_REST_SECS,
            seed: None,
        }
    }
}

impl RoundsConfig {
    /// `deadline_secs` as a duration (valid after [`CoordinatorConfig::validate`]).
    pub fn deadline(&self) -> Duration {
        secs(self.deadline_secs)
    }

    /// `checkin_window_secs` as a duration (valid after [`CoordinatorConfig::validate`]).
    pub fn checkin_window(&self) -> Duration {
        secs(self.checkin_window_secs)
    }

    /// `rest_secs` as a duration (valid after [`CoordinatorConfig::validate`]).
    pub fn rest(&self) -> Duration {
        secs(self.rest_secs)
    }
}

impl RoundsConfig {
    /// Checks the `[rounds]` ranges.
    pub(crate) fn validate(&self) -> Result<(), CoordinatorError> {
        let r = self;
        if r.clients_per_round < 1 {
            return Err(invalid(format!(
                "rounds.clients_per_round must be >= 1, got {}",
                r.clients_per_round
            )));
        }
        if let Some(f) = r.fraction {
            check_range("rounds.fraction", f, 0.0, true, 1.0)?;
        }
        check_range(
            "rounds.over_selection",
            r.over_selection,
            1.0,
            false,
            1000.0,
        )?;
        if r.min_updates < 1 {
            return Err(invalid(format!(
                "rounds.min_updates must be >= 1, got {}",
                r.min_updates
            )));
        }
        if r.fraction.is_none() && r.min_updates > r.clients_per_round {
            return Err(invalid(format!(
                "rounds.min_updates ({}) must be <= rounds.clients_per_round ({})",
                r.min_updates, r.clients_per_round
            )));
        }
        check_range("rounds.deadline_secs", r.deadline_secs, 0.0, true, MAX_SECS)?;
        check_range(
            "rounds.checkin_window_secs",
            r.checkin_window_secs,
            0.0,
            false,
            MAX_SECS,
        )?;
        check_range("rounds.rest_secs", r.rest_secs, 0.0, false, MAX_SECS)?;
        if r.async_buffer < 1 || r.async_buffer > r.async_concurrency {
            return Err(invalid(format!(
                "rounds.async_buffer must be >= 1 and <= rounds.async_concurrency ({}), got {}: \
                 a server step needs that many devices training at once",
                r.async_concurrency, r.async_buffer
            )));
        }

        Ok(())
    }
}
