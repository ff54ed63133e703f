//! Admission: upload and download slots, the pace an upload must keep, one
//! claim per device, and joins per source.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Status, Streaming};

use crate::CoordinatorError;
use crate::round::Pseudonym;

use super::*;

/// Waits for one of `slots` (uploads or downloads).
pub(super) async fn slot(slots: &Arc<Semaphore>) -> Result<OwnedSemaphorePermit, Status> {
    Arc::clone(slots)
        .acquire_owned()
        .await
        .map_err(|_| Status::unavailable("the coordinator is shutting down"))
}

/// An upload slot held for a device until `until`, granted at `granted`.
pub(super) struct Reservation {
    pub(super) permit: OwnedSemaphorePermit,
    pub(super) granted: tokio::time::Instant,
    pub(super) until: tokio::time::Instant,
}

/// The pace an upload holding a slot must keep: `server.upload_grace_secs`
/// and `server.upload_min_bytes_per_sec`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Pace {
    pub(super) grace: Duration,
    pub(super) min_rate: u64,
    /// The largest message the server decodes: what the next one may weigh.
    pub(super) max_message: usize,
}

/// An upload that holds a slot: the slot, and what the upload must keep up
/// with (the pace since the grant, and the round's deadline).
pub(super) struct PacedUpload<'a> {
    pub(super) shared: &'a Shared,
    pub(super) round: u32,
    pub(super) granted: tokio::time::Instant,
    pub(super) deadline: tokio::time::Instant,
    /// Bytes received since the grant.
    pub(super) received: usize,
    pub(super) _slot: OwnedSemaphorePermit,
}

impl PacedUpload<'_> {
    /// The next message, if it arrives in time: refused as
    /// [`CoordinatorError::UploadStalled`] when it falls behind the pace,
    /// [`CoordinatorError::UploadTimeout`] at the round's deadline.
    pub(super) async fn next<T>(&mut self, stream: &mut Streaming<T>) -> Result<Option<T>, Status> {
        let pace = self.shared.pace;
        let need = (self.received + pace.max_message) as f64 / pace.min_rate as f64;
        let by = Duration::try_from_secs_f64(need)
            .ok()
            .and_then(|d| self.granted.checked_add(pace.grace + d))
            .map_or(self.deadline, |t| t.min(self.deadline));
        match tokio::time::timeout_at(by, stream.message()).await {
            Ok(message) => message,
            Err(_) if by == self.deadline => Err(self
                .shared
                .reject_at_edge(CoordinatorError::UploadTimeout { round: self.round })),
            Err(_) => Err(self.shared.reject_at_edge(CoordinatorError::UploadStalled {
                round: self.round,
                received: self.received,
                secs: self.granted.elapsed().as_secs_f64(),
                min_rate: pace.min_rate,
            })),
        }
    }

    /// Counts `bytes` received.
    pub(super) fn received(&mut self, bytes: usize) {
        self.received += bytes;
    }
}

/// A device's claim on the upload slots: while it lives, the device's other
/// requests for a slot are refused (at most one per device).
pub(super) struct Busy<'a> {
    pub(super) shared: &'a Shared,
    pub(super) pseudonym: Pseudonym,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.shared.busy.lock() {
            busy.remove(&self.pseudonym);
        }
    }
}

/// A token bucket per source address: `limit` joins per minute, in bursts
/// of at most `limit`; loopback sources are exempt unless `loopback`
/// (`server.join_limit_loopback`).
pub(super) struct JoinLimiter {
    pub(super) limit: u32,
    pub(super) loopback: bool,
    pub(super) buckets:
        Mutex<std::collections::HashMap<std::net::IpAddr, (f64, std::time::Instant)>>,
}

impl JoinLimiter {
    /// The limiter `server` asks for, if any.
    pub(super) fn new(server: &crate::config::ServerConfig) -> Option<Self> {
        (server.joins_per_minute_per_source > 0).then(|| Self {
            limit: server.joins_per_minute_per_source,
            loopback: server.join_limit_loopback,
            buckets: Mutex::new(Default::default()),
        })
    }

    /// Takes a token for `source` at `now`; false when none is left.
    pub(super) fn allow(&self, source: std::net::IpAddr, now: std::time::Instant) -> bool {
        if !self.loopback && source.to_canonical().is_loopback() {
            return true;
        }
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        let capacity = f64::from(self.limit);
        let per_sec = capacity / 60.0;
        if buckets.len() > 100_000 {
            // Forget sources whose bucket has refilled: they are full anyway.
            buckets.retain(|_, (_, t)| now.duration_since(*t).as_secs_f64() * per_sec < capacity);
        }
        let (tokens, last) = buckets.entry(source).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * per_sec).min(capacity);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::{Duration, Instant};

    use super::JoinLimiter;
    use crate::config::ServerConfig;

    fn limiter(limit: u32, loopback: bool) -> Option<JoinLimiter> {
        JoinLimiter::new(&ServerConfig {
            joins_per_minute_per_source: limit,
            join_limit_loopback: loopback,
            ..ServerConfig::default()
        })
    }

    /// Issue 19, item 4: joins are limited per source by default (60 a
    /// minute, refilled over time), except from loopback unless
    /// `server.join_limit_loopback`; 0 means no limit.
    #[test]
    fn joins_are_limited_per_source_except_from_loopback() {
        let t0 = Instant::now();
        let default = limiter(ServerConfig::default().joins_per_minute_per_source, false)
            .expect("limited by default");
        let remote: IpAddr = "192.0.2.7".parse().unwrap();
        assert!((0..60).all(|_| default.allow(remote, t0)));
        assert!(
            !default.allow(remote, t0),
            "the 61st join within the minute"
        );
        assert!(
            default.allow("192.0.2.8".parse().unwrap(), t0),
            "another source"
        );
        assert!(
            default.allow(remote, t0 + Duration::from_secs(1)),
            "refilled"
        );
        for loopback in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            let ip: IpAddr = loopback.parse().unwrap();
            assert!(
                (0..1000).all(|_| default.allow(ip, t0)),
                "{loopback} exempt"
            );
        }
        let strict = limiter(3, true).unwrap();
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        assert!((0..3).all(|_| strict.allow(local, t0)));
        assert!(!strict.allow(local, t0), "loopback limited when asked");
        assert!(limiter(0, true).is_none(), "0 = no limit");
    }
}
