//! When a device may take part in training, and how much work it does.
//!
//! The app knows the device's state (idle, charging, on an unmetered
//! network); it tells the SDK through [`Conditions`]. Before every check-in
//! the participant asks; while the answer is "not now" it waits with an
//! exponential back-off ([`Backoff`]) and sends nothing. A
//! [`ParticipationPolicy`] also sets a time budget for local training per
//! round and how many tasks one call of `Participant::run` may do.

use std::sync::Arc;
use std::time::Duration;

use crate::consent::ConsentCell;
use crate::error::ClientError;

/// Whether the device may take part now.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Eligibility {
    /// Conditions hold: the device may check in.
    Eligible,
    /// Not now; the reason is shown in logs and summaries (e.g. "on battery").
    NotNow(String),
}

/// The app's view of the device's state.
pub trait Conditions: Send + Sync + std::fmt::Debug {
    /// Whether the device may take part in training now.
    fn eligible(&self) -> Eligibility;
}

/// Conditions that always hold (simulations, desktop apps, tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct Always;

impl Conditions for Always {
    fn eligible(&self) -> Eligibility {
        Eligibility::Eligible
    }
}

/// Conditions given by a closure.
pub struct FnConditions<F>(pub F);

impl<F> std::fmt::Debug for FnConditions<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnConditions")
    }
}

impl<F: Fn() -> Eligibility + Send + Sync> Conditions for FnConditions<F> {
    fn eligible(&self) -> Eligibility {
        (self.0)()
    }
}

/// How long to wait between asks while the device is not eligible.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first wait. Default 30 s.
    pub initial: Duration,
    /// The longest wait; each wait doubles up to it. Default 30 min.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(30),
            max: Duration::from_secs(30 * 60),
        }
    }
}

/// When and how much a device takes part in training.
#[derive(Clone, Debug)]
pub struct ParticipationPolicy {
    /// The app's conditions, asked before every check-in. Default [`Always`].
    pub conditions: Arc<dyn Conditions>,
    /// Waits between asks while not eligible.
    pub backoff: Backoff,
    /// Stop waiting (and end `Participant::run`) after this long without
    /// being eligible; `None`: wait as long as it takes. Default `None`.
    pub give_up_after: Option<Duration>,
    /// Local-training time per task. With the BPR loss, training stops
    /// between epochs once it is spent (at least one epoch of fitting the
    /// private embedding and one of training are always done, so the
    /// overshoot is at most one epoch of each). With the ALS loss a task is
    /// one exact solve and one gradient and cannot be split: the budget is
    /// only reported as exceeded. `None`: no budget. Default `None`.
    pub time_budget: Option<Duration>,
    /// Tasks (training or evaluation) one call of `Participant::run` does
    /// before it returns; `None`: until the coordinator finishes. Default `None`.
    pub max_tasks: Option<u32>,
    /// Waits between attempts while the coordinator cannot be reached (it
    /// restarts, the network is down). Default 250 ms doubling to 30 s.
    pub reconnect: Backoff,
    /// Stop trying (and end `Participant::run` with the transport error)
    /// after the coordinator has been unreachable this long; `None`: keep
    /// trying. Default 15 minutes.
    pub reconnect_for: Option<Duration>,
}

impl Default for ParticipationPolicy {
    fn default() -> Self {
        Self {
            conditions: Arc::new(Always),
            backoff: Backoff::default(),
            give_up_after: None,
            time_budget: None,
            max_tasks: None,
            reconnect: Backoff {
                initial: Duration::from_millis(250),
                max: Duration::from_secs(30),
            },
            reconnect_for: Some(Duration::from_secs(15 * 60)),
        }
    }
}

/// What the participant does next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Check in.
    Proceed,
    /// Stop taking part, for this reason.
    Stop(String),
}

/// Decides whether the participant may check in now under `policy`,
/// waiting (with back-off, sending nothing) while the device is not
/// eligible. Errors when the shopper's `consent` does not allow training.
/// `tasks_done`: tasks this run has done so far.
pub(crate) async fn before_check_in(
    policy: &ParticipationPolicy,
    consent: &ConsentCell,
    tasks_done: u32,
) -> Result<Gate, ClientError> {
    if policy.max_tasks.is_some_and(|max| tasks_done >= max) {
        return Ok(Gate::Stop(format!("did the {tasks_done} tasks asked for")));
    }
    let mut wait = policy.backoff.initial;
    let mut waited = Duration::ZERO;
    loop {
        consent.require_training()?;
        match policy.conditions.eligible() {
            Eligibility::Eligible => return Ok(Gate::Proceed),
            Eligibility::NotNow(reason) => {
                if policy.give_up_after.is_some_and(|limit| waited >= limit) {
                    tracing::debug!(%reason, waited_secs = waited.as_secs(), "not eligible; giving up");
                    return Ok(Gate::Stop(format!("not eligible: {reason}")));
                }
                tracing::debug!(%reason, wait_secs = wait.as_secs(), "not eligible; waiting");
                tokio::time::sleep(wait).await;
                waited += wait;
                wait = (wait * 2).min(policy.backoff.max.max(policy.backoff.initial));
            }
        }
    }
}
