//! `[auth]`: sessions, and device authentication by enrollment token.

use super::*;
use crate::CoordinatorError;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[auth]`: sessions, and device authentication by enrollment token.
///
/// A device that joins receives a pseudonym that acts as its session
/// credential for `session_ttl_secs`, with or without tokens; after that its
/// check-ins are refused (`UNAUTHENTICATED`, counted as `session_expired`)
/// and it joins again (the SDK does so by itself), so that devices that
/// never come back do not stay in the device table.
///
/// Each device may be given a secret token when it is enrolled (`fedrec
/// tokens` makes them); the coordinator holds only the tokens' SHA-256
/// digests, so its disk never holds a credential. A device then presents
/// its token when it joins. A join without a token, or with a token not in
/// the file, gets `UNAUTHENTICATED` and is counted (`missing_token`,
/// `unknown_token`). A token holds at most `max_sessions_per_token` live
/// sessions: a further join ends the oldest (its next check-in is refused
/// `UNAUTHENTICATED`, counted as `session_replaced`). Revoking a device is
/// deleting its digest and restarting the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A file of token digests: one SHA-256 (64 hex digits) per line, `#`
    /// comments and blank lines ignored. Default: unset (no tokens needed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment_tokens: Option<PathBuf>,
    /// How long a session lets a device start new work, in seconds, with or
    /// without `enrollment_tokens`. A task already handed out can be
    /// finished after expiry. At least `server.long_poll_secs + 30`.
    /// Default [`DEFAULT_SESSION_TTL_SECS`].
    pub session_ttl_secs: f64,
    /// Most live sessions one enrollment token holds (with
    /// `enrollment_tokens`): a join beyond it ends the token's oldest
    /// session, so a leaked or shared token cannot fill the device table.
    /// The link between a token and its sessions is not checkpointed: after
    /// a restart, sessions resumed from the checkpoint count for no token
    /// and end by `session_ttl_secs`. Default
    /// [`DEFAULT_MAX_SESSIONS_PER_TOKEN`].
    pub max_sessions_per_token: u32,
}

/// How much longer than `server.long_poll_secs` a session must last at
/// least (`auth.session_ttl_secs`): a device checks in, waits out the long
/// poll, and checks in again within this margin.
pub const SESSION_MARGIN_SECS: f64 = 30.0;

/// Default `auth.session_ttl_secs`: one hour.
pub const DEFAULT_SESSION_TTL_SECS: f64 = 3600.0;

/// Default `auth.max_sessions_per_token`: one device, one session.
pub const DEFAULT_MAX_SESSIONS_PER_TOKEN: u32 = 1;

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            enrollment_tokens: None,
            session_ttl_secs: DEFAULT_SESSION_TTL_SECS,
            max_sessions_per_token: DEFAULT_MAX_SESSIONS_PER_TOKEN,
        }
    }
}

impl AuthConfig {
    /// How long a session lasts (valid after [`CoordinatorConfig::validate`]).
    pub fn session_ttl(&self) -> Duration {
        secs(self.session_ttl_secs)
    }
}

impl AuthConfig {
    /// Checks the `[auth]` ranges.
    pub(crate) fn validate(&self) -> Result<(), CoordinatorError> {
        check_range(
            "auth.session_ttl_secs",
            self.session_ttl_secs,
            0.0,
            true,
            MAX_SECS,
        )?;
        if self.max_sessions_per_token < 1 {
            return Err(invalid(
                "auth.max_sessions_per_token must be >= 1, got 0".to_owned(),
            ));
        }
        Ok(())
    }
}
