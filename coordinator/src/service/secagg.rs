//! The secure aggregation RPCs: protobuf in, [`RoundCore`] calls, protobuf
//! out. The core checks every message against the caller's party; this
//! layer parses, long-polls and streams only.

use tonic::{Status, Streaming};

use fedrec_proto::pb::{self, sec_agg_masked_chunk::Part};
use fedrec_proto::secagg::{Advertisement, MaskedInput, PartyId, ShareKeys, UnmaskResponse, wire};

use super::{CoordinatorService, Shared, now, parse_pseudonym, rejected};
use crate::CoordinatorError;
use crate::round::{SecurePoll, SecureTask, SecureWant};

/// The protobuf twin of a device's secure aggregation task.
pub(super) fn task_to_pb(task: &SecureTask) -> pb::SecAggTask {
    wire::task_to_pb(task.party, &task.config, task.weighting)
}

fn malformed(shared: &Shared, what: &str) -> Status {
    shared.reject_at_edge(CoordinatorError::Malformed(what.to_owned()))
}

impl CoordinatorService {
    pub(super) async fn secagg_advertise(
        &self,
        request: pb::SecAggAdvertiseRequest,
    ) -> Result<pb::SecAggAck, Status> {
        let shared = &self.shared;
        let pseudonym = parse_pseudonym(shared, &request.pseudonym)?;
        let advertisement = request
            .advertisement
            .ok_or_else(|| malformed(shared, "advertise request without an advertisement"))?;
        let advertisement =
            Advertisement::try_from(advertisement).map_err(|e| shared.reject_at_edge(e.into()))?;
        let round = request.round;
        shared
            .with_core(|core| core.secagg_advertise(now(), &pseudonym, round, advertisement))?
            .map_err(rejected)?;
        tracing::debug!(%pseudonym, round, "keys advertised");
        Ok(pb::SecAggAck { round })
    }

    pub(super) async fn secagg_share_keys(
        &self,
        request: pb::SecAggShareKeysRequest,
    ) -> Result<pb::SecAggAck, Status> {
        let shared = &self.shared;
        let pseudonym = parse_pseudonym(shared, &request.pseudonym)?;
        let round = request.round;
        let message = ShareKeys {
            round: round.into(),
            sender: PartyId(request.sender),
            shares: wire::shares_from_pb(request.shares),
        };
        shared
            .with_core(|core| core.secagg_share_keys(now(), &pseudonym, round, message))?
            .map_err(rejected)?;
        tracing::debug!(%pseudonym, round, "keys shared");
        Ok(pb::SecAggAck { round })
    }

    pub(super) async fn secagg_unmask(
        &self,
        request: pb::SecAggUnmaskSubmission,
    ) -> Result<pb::SecAggAck, Status> {
        let shared = &self.shared;
        let pseudonym = parse_pseudonym(shared, &request.pseudonym)?;
        let round = request.round;
        let parse =
            |list| wire::revealed_from_pb(list).map_err(|e| shared.reject_at_edge(e.into()));
        let response = UnmaskResponse {
            round: round.into(),
            sender: PartyId(request.sender),
            self_mask_shares: parse(request.self_mask_shares)?,
            mask_key_shares: parse(request.mask_key_shares)?,
        };
        shared
            .with_core(|core| core.secagg_unmask(now(), &pseudonym, round, response))?
            .map_err(rejected)?;
        tracing::debug!(%pseudonym, round, "shares revealed");
        Ok(pb::SecAggAck { round })
    }

    /// A long poll: answers as soon as the wanted message is available, the
    /// round ended, or the long-poll time passed (then: wait).
    pub(super) async fn secagg_poll(
        &self,
        request: pb::SecAggPollRequest,
    ) -> Result<pb::SecAggPollResponse, Status> {
        use pb::sec_agg_poll_response::Outcome;
        let shared = &self.shared;
        let pseudonym = parse_pseudonym(shared, &request.pseudonym)?;
        let want = match request.want() {
            pb::SecAggWant::Roster => SecureWant::Roster,
            pb::SecAggWant::Shares => SecureWant::Shares,
            pb::SecAggWant::Unmask => SecureWant::Unmask,
            pb::SecAggWant::Unspecified => {
                return Err(malformed(shared, "secure aggregation poll without `want`"));
            }
        };
        let until = tokio::time::Instant::now() + shared.long_poll;
        let mut changes = shared.progress.subscribe();
        loop {
            changes.borrow_and_update();
            let outcome = shared
                .with_core(|core| core.secagg_poll(now(), &pseudonym, request.round, want))?
                .map_err(rejected)?;
            let outcome = match outcome {
                SecurePoll::Wait { .. } => {
                    tokio::select! {
                        changed = changes.changed() => {
                            if changed.is_ok() {
                                continue;
                            }
                        }
                        () = tokio::time::sleep_until(until) => {}
                    }
                    Outcome::Wait(pb::Wait { retry_after_ms: 0 })
                }
                SecurePoll::Roster(roster) => Outcome::Roster((&roster).into()),
                SecurePoll::Shares(delivery) => Outcome::Shares((&delivery).into()),
                SecurePoll::Unmask(request) => Outcome::Unmask((&request).into()),
                SecurePoll::Ended { completed, reason } => Outcome::Ended(pb::SecAggEnded {
                    completed,
                    reason: reason.unwrap_or_default(),
                }),
            };
            return Ok(pb::SecAggPollResponse {
                outcome: Some(outcome),
            });
        }
    }

    /// Receives a masked input: header first (checked before any value is
    /// read), then the values into one buffer of 4 bytes per value, bounded
    /// like plain uploads by `server.max_concurrent_uploads`.
    pub(super) async fn secagg_masked_input(
        &self,
        stream: &mut Streaming<pb::SecAggMaskedChunk>,
    ) -> Result<pb::SecAggAck, Status> {
        let shared = &self.shared;
        let header = match stream.message().await? {
            Some(pb::SecAggMaskedChunk {
                part: Some(Part::Header(header)),
            }) => header,
            _ => {
                return Err(malformed(
                    shared,
                    "the first message of a masked input must be its header",
                ));
            }
        };
        let pseudonym = parse_pseudonym(shared, &header.pseudonym)?;
        let sender = PartyId(header.sender);
        let (round, model_version) = (header.round, header.model_version);
        let deadline = shared
            .with_core(|core| {
                core.check_masked_header(
                    now(),
                    &pseudonym,
                    round,
                    model_version,
                    sender,
                    header.num_values,
                )
            })?
            .map_err(rejected)?;
        // The header matched the expected length, so this is its byte size.
        let limit = usize::try_from(header.num_values)
            .unwrap_or(usize::MAX)
            .saturating_mul(4);
        let _busy = shared.busy(pseudonym)?;
        let mut upload = shared.upload_slot(&pseudonym, round, deadline).await?;
        let mut bytes = Vec::with_capacity(limit);
        while let Some(chunk) = upload.next(stream).await? {
            match chunk.part {
                Some(Part::Values(values)) => {
                    let got = bytes.len() + values.len();
                    if got > limit {
                        return Err(
                            shared.reject_at_edge(CoordinatorError::TooLarge { limit, got })
                        );
                    }
                    bytes.extend_from_slice(&values);
                    upload.received(values.len());
                }
                Some(Part::Header(_)) => {
                    return Err(malformed(
                        shared,
                        "a masked input must have exactly one header",
                    ));
                }
                None => {
                    return Err(malformed(
                        shared,
                        "masked input chunk without header or values",
                    ));
                }
            }
        }
        shared
            .bytes_in
            .fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let values = wire::decode_masked(&bytes).map_err(|e| shared.reject_at_edge(e.into()))?;
        drop(bytes);
        let input = MaskedInput {
            round: round.into(),
            sender,
            values,
        };
        shared
            .with_core(|core| {
                core.secagg_masked_input(now(), &pseudonym, round, model_version, &input)
            })?
            .map_err(rejected)?;
        tracing::debug!(%pseudonym, round, "masked input accepted");
        Ok(pb::SecAggAck { round })
    }
}

/// Runs the open round's unmasking job, if there is one, on a blocking
/// thread (it is CPU-heavy and must not hold the core's lock), then hands
/// the result back. Returns whether there was one.
pub(super) async fn run_unmask_job(shared: &Shared) -> bool {
    let Ok(Some(job)) = shared.with_core(|core| core.take_unmask_job()) else {
        return false;
    };
    let round = job.round();
    tracing::debug!(round, "unmasking the sum");
    match tokio::task::spawn_blocking(move || job.run()).await {
        Ok(done) => {
            let _ = shared.with_core(|core| core.complete_unmask(now(), done));
        }
        Err(e) => {
            tracing::error!(round, error = %e, "unmasking task failed");
            let reason = format!("secure aggregation: the unmasking task failed: {e}");
            let _ = shared.with_core(|core| core.fail_unmask(now(), round, reason));
        }
    }
    true
}
