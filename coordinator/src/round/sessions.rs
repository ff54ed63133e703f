//! Sessions: joins, pseudonyms and their expiry, and the sweep of ended
//! sessions out of the device table.

use std::time::Instant;

use super::*;

/// A device's session: what its pseudonym may do, and until when.
#[derive(Clone, Copy, Debug)]
pub(super) struct Session {
    /// When it stops letting the device start new work.
    pub(super) expires: Instant,
    /// Ended by a newer join with the same token (refused as
    /// `session_replaced` rather than `session_expired`).
    pub(super) replaced: bool,
    /// The model version last downloaded, and how many times.
    pub(super) downloads: (u64, u32),
    /// Until when it gets no new training task (`rounds.rest_secs` after
    /// its last one).
    pub(super) rests_until: Option<Instant>,
}

impl Session {
    /// Whether it still lets the device start new work at `now`.
    pub(super) fn live(&self, now: Instant) -> bool {
        now < self.expires
    }

    pub(super) fn new(expires: Instant) -> Self {
        Self {
            expires,
            replaced: false,
            downloads: (0, 0),
            rests_until: None,
        }
    }
}

impl RoundCore {
    /// `pseudonym` gets a task of `kind` at `now`: its download count
    /// starts afresh, and after a training task it rests `rounds.rest_secs`.
    pub(super) fn hand_task(&mut self, pseudonym: &Pseudonym, kind: TaskKind, now: Instant) {
        let rest = self.config.rounds.rest();
        if let Some(handed) = self.handed.as_mut() {
            handed.push(*pseudonym);
        }
        if let Some(session) = self.sessions.get_mut(pseudonym) {
            session.downloads = (0, 0);
            if kind == TaskKind::Train && !rest.is_zero() {
                session.rests_until = Some(now + rest);
            }
        }
    }

    /// How long `pseudonym` still rests at `now`, if it does.
    pub(super) fn resting(&self, pseudonym: &Pseudonym, now: Instant) -> Option<Duration> {
        let until = self.sessions.get(pseudonym)?.rests_until?;
        (until > now).then(|| until - now)
    }

    /// Admits a new device and returns its fresh random pseudonym, whose
    /// session lasts `auth.session_ttl_secs`. A device that joined with an
    /// enrollment token (`token`, from [`crate::auth::TokenSet::check`])
    /// ends the token's oldest live session when the token already holds
    /// `auth.max_sessions_per_token`.
    pub fn join(&mut self, now: Instant, token: Option<TokenId>) -> Pseudonym {
        self.advance(now);
        let pseudonym = loop {
            let mut bytes = [0u8; 16];
            self.rng.fill_bytes(&mut bytes);
            let pseudonym = Pseudonym(bytes);
            // A collision (with a live or a remembered session) is
            // astronomically unlikely, but cheap to rule out.
            if !self.sessions.contains_key(&pseudonym) && self.joined.insert(pseudonym) {
                break pseudonym;
            }
        };
        self.last_join = Some(now);
        let ttl = self.config.auth.session_ttl();
        self.sessions.insert(pseudonym, Session::new(now + ttl));
        if let Some(token) = token {
            let max = self.config.auth.max_sessions_per_token as usize;
            let mut held = self.token_sessions.remove(&token).unwrap_or_default();
            // Live: joined, and not expired (those are swept soon).
            held.retain(|p| {
                self.joined.contains(p) && self.sessions.get(p).is_some_and(|s| s.live(now))
            });
            while held.len() >= max {
                if let Some(oldest) = held.pop_front() {
                    self.end_replaced(&[oldest]);
                }
            }
            held.push_back(pseudonym);
            self.token_sessions.insert(token, held);
        }
        pseudonym
    }

    /// Ends the sessions a newer join of their enrollment token replaced
    /// (here, or at another replica): each is told `session_replaced` at
    /// its next check-in. Sessions unknown here are ignored.
    pub fn end_replaced(&mut self, pseudonyms: &[Pseudonym]) {
        for pseudonym in pseudonyms {
            if let Some(session) = self.sessions.get_mut(pseudonym)
                && !session.replaced
            {
                session.replaced = true;
                self.end_session(pseudonym);
                self.generation += 1;
            }
        }
    }

    /// Takes a device out of the joined devices and the pool; its session
    /// is remembered until the sweep forgets it.
    pub(super) fn end_session(&mut self, pseudonym: &Pseudonym) {
        self.joined.remove(pseudonym);
        self.pool.remove(pseudonym);
    }

    /// Every sixteenth of a session's lifetime, [`sweep`](Self::sweep)s.
    pub(super) fn sweep_sessions(&mut self, now: Instant) {
        if self.next_session_sweep.is_none_or(|t| now >= t) {
            self.sweep(now);
        }
    }

    /// Forgets the devices whose sessions ended by `now`, so that they are
    /// not selected, do not count as joined and are not checkpointed;
    /// members of the open round's cohort may still finish its task. An
    /// ended session is remembered for one more lifetime, so that the
    /// device's next check-in is told (and counted) `session_expired` or
    /// `session_replaced` rather than `unknown_pseudonym`; then it is
    /// forgotten entirely. Runs every sixteenth of a lifetime, and when a
    /// round ends (before its checkpoint).
    pub(super) fn sweep(&mut self, now: Instant) {
        let ttl = self.config.auth.session_ttl();
        self.next_session_sweep = Some(now + ttl / 16);
        let open = self.open.as_ref();
        let ended: Vec<Pseudonym> = self
            .sessions
            .iter()
            .filter(|&(p, s)| !s.live(now) && !open.is_some_and(|o| o.cohort.contains_key(p)))
            .map(|(p, _)| *p)
            .collect();
        for pseudonym in &ended {
            self.end_session(pseudonym);
        }
        self.sessions
            .retain(|_, s| now < s.expires.checked_add(ttl).unwrap_or(s.expires));
    }
}
