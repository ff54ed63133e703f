//! The driver task: polls the core at its timeouts and when its state
//! changes, runs secure aggregation's unmasking off the lock, and logs round
//! events.

use std::sync::Arc;

use crate::round::Event;

use super::*;

/// The driver: polls the core when a timer is due or its state changed.
pub(super) async fn drive(shared: Arc<Shared>) {
    let mut changes = shared.progress.subscribe();
    loop {
        // Mark changes seen *before* polling, so a change made after the poll
        // wakes the next iteration.
        changes.borrow_and_update();
        let step = shared.with_core(|core| {
            let events = core.poll(now());
            (events, core.poll_timeout(), core.finished().is_some())
        });
        let Ok((events, timeout, finished)) = step else {
            tracing::error!("driver stopped: coordinator state poisoned");
            return;
        };
        events.iter().for_each(log_event);
        if finished {
            return;
        }
        // A secure round whose last step closed: unmask off the lock, then
        // look again (the round has ended).
        if secagg::run_unmask_job(&shared).await {
            continue;
        }
        let timer = async {
            match timeout {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = timer => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = shared.stop_driver.notified() => return,
        }
    }
}

pub(super) fn log_event(event: &Event) {
    match event {
        Event::RoundStarted {
            round,
            kind,
            model_version,
            selected,
        } => tracing::info!(round, %kind, model_version, selected, "round started"),
        Event::RoundEnded(s) if s.completed => tracing::info!(
            round = s.round,
            kind = %s.kind,
            model_version = s.model_version,
            selected = s.selected,
            participants = s.participants,
            seconds = s.seconds,
            epsilon = s.privacy.as_ref().map(|p| p.epsilon),
            "round completed"
        ),
        Event::RoundEnded(s) => tracing::warn!(
            round = s.round,
            kind = %s.kind,
            selected = s.selected,
            participants = s.participants,
            epsilon = s.privacy.as_ref().map(|p| p.epsilon),
            reason = s.abandon_reason.as_deref().unwrap_or(""),
            "round abandoned"
        ),
        Event::Finished { reason } => tracing::info!(%reason, "coordinator finished"),
    }
}
