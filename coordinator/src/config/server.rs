//! `[server]`: the listener, and the limits on requests, uploads, downloads and connections.

use super::*;
use crate::CoordinatorError;
use std::net::SocketAddr;

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default `server.listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Default `server.long_poll_secs`.
pub const DEFAULT_LONG_POLL_SECS: f64 = 10.0;
/// Default `server.max_concurrent_uploads`: 4. Over loopback, where the
/// coordinator's CPU is the limit, rounds took as long with 4 upload and
/// 8 download slots as with 8 and 16 (100 × 118,592 and 10 × 1,000,000
/// values), and 1,000 devices × 1,000,000 values peaked at 72–88 MB
/// instead of 110–122 MB (BENCHMARKS.md). Where devices upload over slow
/// links, a slot is held for the whole upload: raise it there.
pub const DEFAULT_MAX_CONCURRENT_UPLOADS: usize = 4;
/// Default `server.max_concurrent_downloads` (see
/// [`DEFAULT_MAX_CONCURRENT_UPLOADS`]).
pub const DEFAULT_MAX_CONCURRENT_DOWNLOADS: usize = 8;

/// `[server]`: network and resource limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on, `IP:port`. Default [`DEFAULT_LISTEN`].
    pub listen: String,
    /// How long a CheckIn may wait for a task before answering Wait, in
    /// seconds. Default [`DEFAULT_LONG_POLL_SECS`].
    pub long_poll_secs: f64,
    /// How many uploads may stream in at once. Uploads are buffered whole
    /// before validation (4 bytes per model value each), so this bounds the
    /// coordinator's memory. Default [`DEFAULT_MAX_CONCURRENT_UPLOADS`].
    pub max_concurrent_uploads: usize,
    /// How many model downloads may stream out at once; more wait for a
    /// free slot. Each holds up to a chunk of encoded values and the
    /// transport's send buffer, so this bounds the coordinator's memory
    /// when a large cohort downloads together. Default
    /// [`DEFAULT_MAX_CONCURRENT_DOWNLOADS`].
    pub max_concurrent_downloads: usize,
    /// Most concurrent requests (HTTP/2 streams) on one connection; more
    /// are refused by the transport. Default
    /// [`DEFAULT_MAX_STREAMS_PER_CONNECTION`].
    pub max_streams_per_connection: u32,
    /// Most joins per minute from one IP address (a token bucket: bursts up
    /// to the limit); more get RESOURCE_EXHAUSTED, counted as
    /// `join_rate_limited`. 0 = no limit. Behind a load balancer every join
    /// comes from the balancer's address: set 0 and limit at the balancer,
    /// or raise it. Default [`DEFAULT_JOINS_PER_MINUTE_PER_SOURCE`].
    pub joins_per_minute_per_source: u32,
    /// Whether joins from loopback (127.0.0.0/8, ::1) count against
    /// `joins_per_minute_per_source`. Off, they are exempt: simulations join
    /// every device from 127.0.0.1, and a local proxy's or health checker's
    /// requests come from there too. Default: false.
    pub join_limit_loopback: bool,
    /// How many times one session may download the same model version
    /// (counted afresh whenever the device is selected for a round); more
    /// get RESOURCE_EXHAUSTED, counted as `download_limit`. Default
    /// [`DEFAULT_MAX_DOWNLOADS_PER_VERSION`].
    pub max_downloads_per_version: u32,
    /// Head start of a granted upload slot, in seconds: a reserved slot
    /// whose upload has not started within it is given to the next device
    /// (the reservation's lease), and an upload gets it on top of the time
    /// its bytes need at `upload_min_bytes_per_sec`. Default
    /// [`DEFAULT_UPLOAD_GRACE_SECS`].
    pub upload_grace_secs: f64,
    /// Slowest upload that keeps its slot, in bytes per second: an upload
    /// that has received `b` bytes must receive its next message within
    /// `upload_grace_secs + (b + one message) / upload_min_bytes_per_sec`
    /// of the slot's grant, or it loses the slot (`DEADLINE_EXCEEDED`,
    /// counted as `upload_stalled`), so that stalled devices cannot hold
    /// every slot until the round's deadline. Default
    /// [`DEFAULT_UPLOAD_MIN_BYTES_PER_SEC`].
    pub upload_min_bytes_per_sec: u64,
    /// Most connections open at once; one more is accepted and closed at
    /// once, and counted (`connection_limit`). Each idle connection holds
    /// about 27 KB (BENCHMARKS.md), and one file descriptor: the process's limit (`ulimit
    /// -n`) must allow this many. Default [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// A connection with no request in flight and none started or ended
    /// for this long is closed, in seconds (devices reconnect on their
    /// next request; a long poll keeps its connection busy). Default
    /// [`DEFAULT_IDLE_TIMEOUT_SECS`].
    pub idle_timeout_secs: f64,
    /// Interval of HTTP/2 keepalive pings on each connection, in seconds: a
    /// peer that does not answer within `keepalive_timeout_secs` is
    /// dropped, so connections to vanished devices do not linger. Default
    /// [`DEFAULT_KEEPALIVE_SECS`].
    pub keepalive_secs: f64,
    /// How long a keepalive ping may go unanswered, in seconds. Default
    /// [`DEFAULT_KEEPALIVE_TIMEOUT_SECS`].
    pub keepalive_timeout_secs: f64,
    /// How long a TLS handshake may take, in seconds; a client that opens a
    /// connection and says nothing is dropped after it. Default
    /// [`DEFAULT_TLS_HANDSHAKE_SECS`].
    pub tls_handshake_secs: f64,
}

/// Default `server.max_connections`: 50,000 (about 1 GB of idle connections).
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;
/// Default `server.idle_timeout_secs`: five minutes.
pub const DEFAULT_IDLE_TIMEOUT_SECS: f64 = 300.0;
/// Default `server.keepalive_secs`: one minute.
pub const DEFAULT_KEEPALIVE_SECS: f64 = 60.0;
/// Default `server.keepalive_timeout_secs`: 20 seconds.
pub const DEFAULT_KEEPALIVE_TIMEOUT_SECS: f64 = 20.0;
/// Default `server.tls_handshake_secs`: 10 seconds.
pub const DEFAULT_TLS_HANDSHAKE_SECS: f64 = 10.0;

/// Default `server.upload_grace_secs`: 10 seconds.
pub const DEFAULT_UPLOAD_GRACE_SECS: f64 = 10.0;
/// Default `server.upload_min_bytes_per_sec`: 64 KiB/s (512 kbit/s), what
/// a slow phone on a poor mobile network still uploads. A device that
/// stalls right after its header loses its slot after 10 s + 1 MiB at that
/// rate, about 27 s, well before the default 60 s deadline.
pub const DEFAULT_UPLOAD_MIN_BYTES_PER_SEC: u64 = 64 * 1024;

/// Default `server.joins_per_minute_per_source`: 60, one a second on
/// average. A device joins once per session (an hour by default), so even a
/// household or office of devices behind one NAT address stays far below
/// it, while one address cannot mint pseudonyms faster than 3,600 an hour.
pub const DEFAULT_JOINS_PER_MINUTE_PER_SOURCE: u32 = 60;

/// Default `server.max_downloads_per_version`: 4, the download a task
/// needs plus retries after dropped connections.
pub const DEFAULT_MAX_DOWNLOADS_PER_VERSION: u32 = 4;

/// Default `server.max_streams_per_connection`.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 1024;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.to_owned(),
            long_poll_secs: DEFAULT_LONG_POLL_SECS,
            max_concurrent_uploads: DEFAULT_MAX_CONCURRENT_UPLOADS,
            max_concurrent_downloads: DEFAULT_MAX_CONCURRENT_DOWNLOADS,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            joins_per_minute_per_source: DEFAULT_JOINS_PER_MINUTE_PER_SOURCE,
            join_limit_loopback: false,
            max_downloads_per_version: DEFAULT_MAX_DOWNLOADS_PER_VERSION,
            upload_grace_secs: DEFAULT_UPLOAD_GRACE_SECS,
            upload_min_bytes_per_sec: DEFAULT_UPLOAD_MIN_BYTES_PER_SEC,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT_SECS,
            keepalive_secs: DEFAULT_KEEPALIVE_SECS,
            keepalive_timeout_secs: DEFAULT_KEEPALIVE_TIMEOUT_SECS,
            tls_handshake_secs: DEFAULT_TLS_HANDSHAKE_SECS,
        }
    }
}

impl ServerConfig {
    /// `upload_grace_secs` as a duration (valid after [`CoordinatorConfig::validate`]).
    pub fn upload_grace(&self) -> Duration {
        secs(self.upload_grace_secs)
    }

    /// `long_poll_secs` as a duration (valid after [`CoordinatorConfig::validate`]).
    pub fn long_poll(&self) -> Duration {
        secs(self.long_poll_secs)
    }

    /// `idle_timeout_secs` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        secs(self.idle_timeout_secs)
    }

    /// `keepalive_secs` as a duration.
    pub fn keepalive(&self) -> Duration {
        secs(self.keepalive_secs)
    }

    /// `keepalive_timeout_secs` as a duration.
    pub fn keepalive_timeout(&self) -> Duration {
        secs(self.keepalive_timeout_secs)
    }

    /// `tls_handshake_secs` as a duration.
    pub fn tls_handshake(&self) -> Duration {
        secs(self.tls_handshake_secs)
    }
}

impl ServerConfig {
    /// Checks the `[server]` ranges.
    pub(crate) fn validate(&self) -> Result<(), CoordinatorError> {
        let s = self;
        s.listen.parse::<SocketAddr>().map_err(|_| {
            invalid(format!(
                "server.listen must be an IP:port address such as {DEFAULT_LISTEN:?}, got {:?}",
                s.listen
            ))
        })?;
        check_range(
            "server.long_poll_secs",
            s.long_poll_secs,
            0.0,
            true,
            MAX_SECS,
        )?;
        if s.max_streams_per_connection < 1 {
            return Err(invalid(
                "server.max_streams_per_connection must be >= 1, got 0".to_owned(),
            ));
        }
        if s.max_downloads_per_version < 1 {
            return Err(invalid(
                "server.max_downloads_per_version must be >= 1, got 0".to_owned(),
            ));
        }
        check_range(
            "server.upload_grace_secs",
            s.upload_grace_secs,
            0.0,
            true,
            MAX_SECS,
        )?;
        for (name, value) in [
            ("server.idle_timeout_secs", s.idle_timeout_secs),
            ("server.keepalive_secs", s.keepalive_secs),
            ("server.keepalive_timeout_secs", s.keepalive_timeout_secs),
            ("server.tls_handshake_secs", s.tls_handshake_secs),
        ] {
            check_range(name, value, 0.0, true, MAX_SECS)?;
        }
        if s.max_connections < 1 {
            return Err(invalid(
                "server.max_connections must be >= 1, got 0".to_owned(),
            ));
        }
        if s.upload_min_bytes_per_sec < 1 {
            return Err(invalid(
                "server.upload_min_bytes_per_sec must be >= 1, got 0".to_owned(),
            ));
        }
        if s.max_concurrent_uploads < 1 || s.max_concurrent_downloads < 1 {
            return Err(invalid(format!(
                "server.max_concurrent_uploads and server.max_concurrent_downloads must be >= 1, \
                 got {} and {}",
                s.max_concurrent_uploads, s.max_concurrent_downloads
            )));
        }

        Ok(())
    }
}
