//! The app's view of the device's state, as a trait the app implements.

use std::sync::Arc;

use fedrec_client::eligibility::{Conditions, Eligibility};

/// The device's state as the app sees it, asked before every check-in.
#[derive(Clone, Debug, PartialEq, Eq, uniffi::Record)]
pub struct DeviceState {
    /// The shopper is not using the device.
    pub idle: bool,
    /// The device is charging.
    pub charging: bool,
    /// The network is unmetered (Wi-Fi, not mobile data).
    pub unmetered: bool,
}

/// Implemented by the app (Kotlin: from WorkManager's constraints or
/// `BatteryManager`/`ConnectivityManager`; Swift: from `BGTaskScheduler`'s
/// requirements or `ProcessInfo`). The device takes part in training only
/// while all three hold; otherwise `participate` returns at once, saying
/// why, and the app's scheduler tries again later.
///
/// Called on the thread that called `participate`. An exception thrown
/// here becomes `FedrecError.Internal` from `participate`.
#[uniffi::export(foreign)]
pub trait DeviceConditions: Send + Sync {
    /// The device's state now.
    fn current(&self) -> DeviceState;
}

/// Adapts the app's [`DeviceConditions`] to the SDK's [`Conditions`].
pub(crate) struct AppConditions(pub(crate) Arc<dyn DeviceConditions>);

impl std::fmt::Debug for AppConditions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppConditions")
    }
}

impl Conditions for AppConditions {
    fn eligible(&self) -> Eligibility {
        let state = self.0.current();
        let missing: Vec<&str> = [
            (!state.idle).then_some("in use"),
            (!state.charging).then_some("not charging"),
            (!state.unmetered).then_some("metered network"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if missing.is_empty() {
            Eligibility::Eligible
        } else {
            Eligibility::NotNow(missing.join(", "))
        }
    }
}
