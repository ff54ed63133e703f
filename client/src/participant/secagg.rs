//! A training task through secure aggregation: the participant drives a
//! [`SecAggClient`] over the coordinator's SecAgg RPCs.
//!
//! The device advertises fresh keys for the round (signed with a fresh
//! identity key, so that neighbours cannot link its rounds), then downloads
//! the model and trains on a blocking thread while it exchanges key shares
//! with its neighbours through the coordinator. Its update, clipped, scaled
//! by its weight and followed by the weight and its evaluation counts
//! ([`fedrec_proto::secagg::payload`]), is masked and streamed in chunks;
//! last, it reveals the shares the coordinator asks for, which the
//! [`SecAggClient`] checks can never unmask this round's survivors.
//! Every message goes through the [`SentLog`](super::SentLog).

use std::time::Duration;

use fedrec_proto::pb::{self, sec_agg_poll_response::Outcome};
use fedrec_proto::secagg::{PartyId, Roster, ShareDelivery, UnmaskRequest, crypto, wire};
use fedrec_proto::tensor;

use super::{Participant, TaskEnd, rpc, unreachable};
use crate::device::Device;
use crate::error::ClientError;
use crate::secagg::SecAggClient;
use crate::task::Task;

/// How a secure task ended for this device.
enum Refusal {
    /// The coordinator went on without this device (or the round ended):
    /// not an error of the device.
    Refused(String),
    /// The coordinator could not be reached.
    Interrupted,
    /// Something that stops the participant.
    Fatal(ClientError),
}

impl From<ClientError> for Refusal {
    fn from(err: ClientError) -> Self {
        match err {
            ClientError::Rpc { status, .. } if unreachable(&status) => Self::Interrupted,
            // A refused message or a round that moved on: this round is lost.
            ClientError::Rpc { request, status } => {
                Self::Refused(format!("{request}: {}", status.message()))
            }
            // A roster or request this device will not act on.
            ClientError::SecAgg(e) => Self::Refused(e.to_string()),
            other => Self::Fatal(other),
        }
    }
}

/// The message a poll brought.
enum Polled {
    Roster(Roster),
    Shares(ShareDelivery),
    Unmask(UnmaskRequest),
    Ended(String),
}

impl Participant {
    /// Runs a training task whose update goes through secure aggregation.
    /// Returns the device and how the task ended (accepted: its masked
    /// input is in the sum, if the round completes).
    pub(super) async fn do_secure_task(
        &mut self,
        device: Device,
        task: &Task,
    ) -> Result<(Device, TaskEnd), ClientError> {
        let secure = task.secure().ok_or_else(|| {
            ClientError::Protocol("a secure task without secure aggregation".into())
        })?;
        let party = secure.party;
        let round = task.round();
        let mut client = {
            let mut rng = rand::rng();
            let identity = crypto::generate_identity(&mut rng);
            SecAggClient::new(secure.config.clone(), round.into(), party, identity)?
        };
        // Step 1 first: the keys do not depend on the update, and the step
        // closes as soon as the whole cohort advertised.
        let advertisement = client.advertise(&mut rand::rng())?;
        let request = pb::SecAggAdvertiseRequest {
            pseudonym: self.pseudonym.clone(),
            round,
            advertisement: Some((&advertisement).into()),
        };
        self.sent.log("SecAggAdvertiseRequest", round, &request);
        if let Err(e) = self.client.sec_agg_advertise(request).await {
            return self.give_up(device, round, rpc("SecAggAdvertise")(e).into());
        }
        let mut device = device;
        let global = match self.download(&mut device, task).await {
            Ok(global) => global,
            Err(e) => return self.give_up(device, round, e.into()),
        };

        // Train while the keys are exchanged.
        let work = task.clone();
        let training = tokio::task::spawn_blocking(move || {
            let mut device = device;
            let output = device.run_task(&work, &global);
            (device, output)
        });
        let exchanged = self.exchange_keys(round, party, &mut client).await;
        let (device, output) = training
            .await
            .map_err(|e| ClientError::Protocol(format!("local training task failed: {e}")))?;
        let delivery = match exchanged {
            Ok(delivery) => delivery,
            Err(refusal) => return self.give_up(device, round, refusal),
        };
        let output = output?;

        // Step 3: mask (CPU: one mask expansion per neighbour) off the runtime.
        let input = output.secure_input(task)?;
        drop(output);
        let (mut client, masked) = tokio::task::spawn_blocking(move || {
            let masked = client.handle_shares(&delivery, &input);
            (client, masked)
        })
        .await
        .map_err(|e| ClientError::Protocol(format!("masking task failed: {e}")))?;
        let masked = match masked {
            Ok(masked) => masked,
            Err(e) => return self.give_up(device, round, ClientError::from(e).into()),
        };
        if let Err(refusal) = self
            .send_masked(task, party, &wire::encode_masked(&masked.values))
            .await
        {
            return self.give_up(device, round, refusal);
        }
        drop(masked);

        // The update is in the sum now. Step 4 helps remove the masks; the
        // step may close without this device once every share is in.
        match self.reveal(round, party, &mut client).await {
            Ok(()) | Err(Refusal::Refused(_)) => Ok((device, TaskEnd::Accepted)),
            Err(refusal) => self.give_up(device, round, refusal),
        }
    }

    /// Step 4: reveals what the coordinator asks for, if the client agrees.
    async fn reveal(
        &mut self,
        round: u32,
        party: PartyId,
        client: &mut SecAggClient,
    ) -> Result<(), Refusal> {
        let request = match self.poll(round, pb::SecAggWant::Unmask).await? {
            Polled::Unmask(request) => request,
            other => return Err(unexpected(other)),
        };
        let response = client.handle_unmask(&request).map_err(ClientError::from)?;
        let request = pb::SecAggUnmaskSubmission {
            pseudonym: self.pseudonym.clone(),
            round,
            sender: party.0,
            self_mask_shares: response.self_mask_shares.iter().map(Into::into).collect(),
            mask_key_shares: response.mask_key_shares.iter().map(Into::into).collect(),
        };
        self.sent.log("SecAggUnmaskSubmission", round, &request);
        self.client
            .sec_agg_unmask(request)
            .await
            .map_err(rpc("SecAggUnmask"))?;
        Ok(())
    }

    /// Steps 1 and 2 after advertising: the roster, this device's shares,
    /// and the shares its neighbours sent it.
    async fn exchange_keys(
        &mut self,
        round: u32,
        party: PartyId,
        client: &mut SecAggClient,
    ) -> Result<ShareDelivery, Refusal> {
        let roster = match self.poll(round, pb::SecAggWant::Roster).await? {
            Polled::Roster(roster) => roster,
            other => return Err(unexpected(other)),
        };
        let keys = client
            .handle_roster(&roster, &mut rand::rng())
            .map_err(ClientError::from)?;
        let request = pb::SecAggShareKeysRequest {
            pseudonym: self.pseudonym.clone(),
            round,
            sender: party.0,
            shares: keys.shares.iter().map(Into::into).collect(),
        };
        self.sent.log("SecAggShareKeysRequest", round, &request);
        self.client
            .sec_agg_share_keys(request)
            .await
            .map_err(rpc("SecAggShareKeys"))?;
        match self.poll(round, pb::SecAggWant::Shares).await? {
            Polled::Shares(delivery) => Ok(delivery),
            other => Err(unexpected(other)),
        }
    }

    /// Long-polls until the wanted message arrives or the round ends.
    async fn poll(&mut self, round: u32, want: pb::SecAggWant) -> Result<Polled, Refusal> {
        loop {
            let request = pb::SecAggPollRequest {
                pseudonym: self.pseudonym.clone(),
                round,
                want: want as i32,
            };
            self.sent.log("SecAggPollRequest", round, &request);
            let response = self
                .client
                .sec_agg_poll(request)
                .await
                .map_err(rpc("SecAggPoll"))?
                .into_inner();
            return Ok(match response.outcome {
                Some(Outcome::Wait(wait)) => {
                    if wait.retry_after_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(wait.retry_after_ms.into())).await;
                    }
                    continue;
                }
                Some(Outcome::Roster(roster)) => {
                    Polled::Roster(Roster::try_from(roster).map_err(ClientError::from)?)
                }
                Some(Outcome::Shares(delivery)) => Polled::Shares(delivery.into()),
                Some(Outcome::Unmask(request)) => Polled::Unmask(request.into()),
                Some(Outcome::Ended(ended)) => Polled::Ended(if ended.completed {
                    "the round completed without this device".into()
                } else {
                    format!("the round was abandoned: {}", ended.reason)
                }),
                None => {
                    return Err(Refusal::Fatal(ClientError::Protocol(
                        "secure aggregation poll answer without outcome".into(),
                    )));
                }
            });
        }
    }

    /// Streams a masked input: its header, then the values in chunks.
    async fn send_masked(
        &mut self,
        task: &Task,
        party: PartyId,
        encoded: &bytes::Bytes,
    ) -> Result<(), Refusal> {
        let header = pb::SecAggMaskedHeader {
            pseudonym: self.pseudonym.clone(),
            round: task.round(),
            model_version: task.model_version(),
            sender: party.0,
            num_values: (encoded.len() / 4) as u64,
        };
        let mut chunks = vec![pb::SecAggMaskedChunk {
            part: Some(pb::sec_agg_masked_chunk::Part::Header(header)),
        }];
        chunks.extend(
            tensor::chunks(encoded, self.chunk_bytes).map(|(_, values)| pb::SecAggMaskedChunk {
                part: Some(pb::sec_agg_masked_chunk::Part::Values(values)),
            }),
        );
        for c in &chunks {
            self.sent.log("SecAggMaskedChunk", task.round(), c);
        }
        self.client
            .sec_agg_masked_input(tokio_stream::iter(chunks))
            .await
            .map_err(rpc("SecAggMaskedInput"))?;
        Ok(())
    }

    /// Ends the task without contributing: a refusal is logged and counted,
    /// anything else is an error.
    fn give_up(
        &self,
        device: Device,
        round: u32,
        refusal: Refusal,
    ) -> Result<(Device, TaskEnd), ClientError> {
        match refusal {
            Refusal::Refused(why) => {
                tracing::debug!(pseudonym = %self.pseudonym, round, %why, "secure aggregation round left");
                Ok((device, TaskEnd::Refused))
            }
            Refusal::Interrupted => Ok((device, TaskEnd::Interrupted)),
            Refusal::Fatal(err) => Err(err),
        }
    }
}

/// A poll that brought something else than what the step needs.
fn unexpected(polled: Polled) -> Refusal {
    Refusal::Refused(match polled {
        Polled::Ended(why) => why,
        _ => "the coordinator answered with a message of another step".into(),
    })
}
