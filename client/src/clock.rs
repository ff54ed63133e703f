//! Time as the device sees it, passed in from outside.
//!
//! Two readings: wall-clock Unix seconds (purchase times, retention, when
//! consent was set) and a monotonic duration (the local-training time
//! budget). The SDK reads both only through [`Clock`], so tests and
//! simulations can set them; apps use [`SystemClock`], the default.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Seconds since the Unix epoch (wall clock).
    fn unix_now(&self) -> i64;
    /// Time since an arbitrary fixed origin; never goes backwards.
    fn monotonic(&self) -> Duration;
}

/// The operating system's clocks.
#[derive(Clone, Copy, Debug)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// The system clock; its monotonic origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn unix_now(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            // A clock set before 1970: count backwards.
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        }
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told to (tests, simulations). Clones share
/// the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock {
    unix: Arc<AtomicI64>,
    mono_nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `unix` seconds and a monotonic time of zero.
    pub fn new(unix: i64) -> Self {
        Self {
            unix: Arc::new(AtomicI64::new(unix)),
            mono_nanos: Arc::default(),
        }
    }

    /// Moves both readings forward by `by`.
    pub fn advance(&self, by: Duration) {
        let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
        self.unix.fetch_add(secs, Ordering::SeqCst);
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.mono_nanos.fetch_add(nanos, Ordering::SeqCst);
    }

    /// Sets the wall clock to `unix` seconds (the monotonic reading is kept).
    pub fn set_unix(&self, unix: i64) {
        self.unix.store(unix, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn unix_now(&self) -> i64 {
        self.unix.load(Ordering::SeqCst)
    }

    fn monotonic(&self) -> Duration {
        Duration::from_nanos(self.mono_nanos.load(Ordering::SeqCst))
    }
}

/// The default clock of a device.
pub(crate) fn system() -> Arc<dyn Clock> {
    Arc::new(SystemClock::new())
}
