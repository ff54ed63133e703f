//! The coordinator side of secure aggregation: one [`SecAggRound`] per round.
//!
//! A sans-IO state machine. The caller feeds it the devices' messages
//! (`handle_*`), decides when a step ends (when every expected message
//! arrived, or at a deadline) by calling `close_*`, and asks for each
//! device's next message (`*_for`). A message that fails a check returns a
//! [`SecAggError`] and changes nothing; a step that ends with too few devices
//! abandons the round ([`SecAggError::Abandoned`]), after which every call
//! returns that error and nothing is output.
//!
//! | step | devices send | then call | devices receive |
//! |---|---|---|---|
//! | 1 | [`handle_advertisement`](SecAggRound::handle_advertisement) | [`close_advertisements`](SecAggRound::close_advertisements) | [`roster_for`](SecAggRound::roster_for) |
//! | 2 | [`handle_share_keys`](SecAggRound::handle_share_keys) | [`close_share_keys`](SecAggRound::close_share_keys) | [`shares_for`](SecAggRound::shares_for) |
//! | 3 | [`handle_masked_input`](SecAggRound::handle_masked_input) | [`close_masked_inputs`](SecAggRound::close_masked_inputs) | [`unmask_request_for`](SecAggRound::unmask_request_for) |
//! | 4 | [`handle_unmask_response`](SecAggRound::handle_unmask_response) | [`finish`](SecAggRound::finish) | — |
//!
//! The coordinator never sees an update in the clear: it routes encrypted
//! shares it cannot read, adds each masked input into one running `u32` sum
//! as it arrives (and keeps no per-device vector), and at the end removes
//! the masks with the shares the survivors reveal. Memory is
//! `O(num_values + n · k)` for `n` devices with `k` neighbours each.
//!
//! Which devices go on after each step:
//! - after step 2, devices that sent their shares, less any with fewer than
//!   `t` neighbours among them (removed repeatedly, since each removal lowers
//!   its neighbours' counts): their secrets could not be reconstructed;
//! - after step 3, the round needs every survivor to have `t` surviving
//!   neighbours (to reconstruct its self-mask seed), and every dropped device
//!   with a surviving neighbour to have `t` too (to reconstruct its mask key);
//! - [`finish`](SecAggRound::finish) needs `t` revealed shares of each of
//!   those secrets, checks each reconstructed secret against what its owner
//!   advertised, and outputs the sum of the survivors' quantized updates.
//!
//! The protocol and its guarantees are described in [`fedrec_proto::secagg`].

use fedrec_proto::secagg::crypto::{self, KeyPair, SHARE_CIPHERTEXT_LEN};
use fedrec_proto::secagg::{
    AbandonReason, Advertisement, EncryptedShare, MaskedInput, NeighbourGraph, PartyId, Quantizer,
    Roster, RoundParams, SecAggConfig, SecAggError, Secret32, SecretKind, SecretShare,
    ShareDelivery, ShareKeys, Step, UnmaskRequest, UnmaskResponse, config::MIN_PARTIES, prg,
    shamir,
};
use rand::CryptoRng;
use std::collections::BTreeMap;

/// The result of a round: the exact sum of the survivors' quantized updates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecAggOutput {
    /// The wrapping `u32` sum of the survivors' quantized updates.
    pub sum: Vec<u32>,
    /// The devices whose updates are in the sum, sorted.
    pub survivors: Vec<PartyId>,
}

impl SecAggOutput {
    /// Number of updates in the sum.
    pub fn count(&self) -> usize {
        self.survivors.len()
    }

    /// The sum of the survivors' (clipped, quantized) updates as `f32`.
    pub fn decode(&self, quantizer: &Quantizer) -> Result<Vec<f32>, SecAggError> {
        let mut out = vec![0.0; self.sum.len()];
        quantizer.decode_sum(&self.sum, self.count(), &mut out)?;
        Ok(out)
    }
}

/// How far a device got, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    /// In the roster (and, after step 2 closed, not among the devices that
    /// go on).
    Advertised,
    /// Shared its keys and kept after step 2.
    Shared,
    /// Sent its masked input.
    Masked,
    /// Sent its unmask response.
    Responded,
}

/// What is known once the roster is fixed.
#[derive(Debug)]
struct Fixed {
    params: RoundParams,
    graph: NeighbourGraph,
    /// By party index.
    advertisements: Vec<Advertisement>,
    status: Vec<Status>,
}

/// The coordinator's state for one secure aggregation round.
#[derive(Debug)]
pub struct SecAggRound {
    config: SecAggConfig,
    round: u64,
    num_values: usize,
    max_parties: usize,
    graph_seed: [u8; 32],
    step: Step,
    abandoned: Option<AbandonReason>,
    /// Step 1.
    pending: BTreeMap<PartyId, Advertisement>,
    /// From the end of step 1 on.
    fixed: Option<Fixed>,
    /// Step 2 to the end of step 3: each sender's shares, sorted by recipient.
    shares: Vec<Vec<EncryptedShare>>,
    /// Step 3 on: the running sum of masked inputs.
    sum: Vec<u32>,
    /// Step 4: revealed shares by owner index, at most `t` each.
    self_mask_shares: Vec<Vec<SecretShare>>,
    mask_key_shares: Vec<Vec<SecretShare>>,
    /// Messages accepted in the current step.
    received: usize,
}

impl SecAggRound {
    /// A round collecting updates of `num_values` values. The graph seed is
    /// drawn from `rng`. Refuses an invalid configuration.
    pub fn new(
        config: SecAggConfig,
        round: u64,
        num_values: usize,
        rng: &mut impl CryptoRng,
    ) -> Result<Self, SecAggError> {
        config.validate()?;
        if num_values == 0 {
            return Err(SecAggError::InvalidConfig(
                "updates must have at least one value, got 0".into(),
            ));
        }
        let max_parties = config.max_parties()?;
        Ok(Self {
            config,
            round,
            num_values,
            max_parties,
            graph_seed: *crypto::random_seed(rng),
            step: Step::Advertise,
            abandoned: None,
            pending: BTreeMap::new(),
            fixed: None,
            shares: Vec::new(),
            sum: Vec::new(),
            self_mask_shares: Vec::new(),
            mask_key_shares: Vec::new(),
            received: 0,
        })
    }

    /// The round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The current step.
    pub fn step(&self) -> Step {
        self.step
    }

    /// Why the round was abandoned, if it was.
    pub fn abandoned(&self) -> Option<&AbandonReason> {
        self.abandoned.as_ref()
    }

    /// The round's parameters, once the roster is fixed.
    pub fn params(&self) -> Option<RoundParams> {
        self.fixed.as_ref().map(|f| f.params)
    }

    /// The neighbour graph, once the roster is fixed.
    pub fn graph(&self) -> Option<&NeighbourGraph> {
        self.fixed.as_ref().map(|f| &f.graph)
    }

    /// Heap bytes the round holds (approximate): the running sum, the
    /// advertisements and the graph, the encrypted shares in transit and the
    /// revealed shares. `O(num_values + n · k)`: no per-device vector is
    /// ever kept.
    pub fn held_bytes(&self) -> usize {
        use std::mem::size_of;
        let pending = self.pending.len() * (size_of::<Advertisement>() + size_of::<PartyId>());
        let fixed = self.fixed.as_ref().map_or(0, |f| {
            f.advertisements.capacity() * size_of::<Advertisement>()
                + f.status.capacity() * size_of::<Status>()
                + f.graph.len() * (size_of::<PartyId>() + 4 * f.graph.degree())
        });
        let shares: usize = self
            .shares
            .iter()
            .map(|s| {
                size_of::<Vec<EncryptedShare>>()
                    + s.capacity() * size_of::<EncryptedShare>()
                    + s.iter().map(|e| e.ciphertext.capacity()).sum::<usize>()
            })
            .sum();
        let revealed: usize = self
            .self_mask_shares
            .iter()
            .chain(&self.mask_key_shares)
            .map(|v| size_of::<Vec<SecretShare>>() + v.capacity() * size_of::<SecretShare>())
            .sum();
        pending + fixed + shares + revealed + self.sum.capacity() * size_of::<u32>()
    }

    /// Messages accepted in the current step.
    pub fn received(&self) -> usize {
        self.received
    }

    /// Messages that can arrive in the current step at most (the devices
    /// still in the round); `None` while advertisements are collected.
    pub fn expected(&self) -> Option<usize> {
        let fixed = self.fixed.as_ref()?;
        let at_least = match self.step {
            Step::ShareKeys => Status::Advertised,
            Step::MaskedInput => Status::Shared,
            Step::Unmask => Status::Masked,
            _ => return Some(0),
        };
        Some(fixed.status.iter().filter(|s| **s >= at_least).count())
    }

    /// Checks that a `message` of step `message` can be handled now.
    fn expect_step(&self, message: Step) -> Result<(), SecAggError> {
        if let Some(reason) = &self.abandoned {
            return Err(SecAggError::Abandoned(reason.clone()));
        }
        if self.step != message {
            return Err(SecAggError::WrongStep {
                message,
                current: self.step,
            });
        }
        Ok(())
    }

    fn check_round(&self, round: u64) -> Result<(), SecAggError> {
        if round != self.round {
            return Err(SecAggError::WrongRound {
                expected: self.round,
                got: round,
            });
        }
        Ok(())
    }

    /// Gives up on the round: drops every secret and partial sum.
    fn abandon(&mut self, reason: AbandonReason) -> SecAggError {
        tracing::warn!(round = self.round, %reason, "secure aggregation abandoned");
        self.step = Step::Abandoned;
        self.abandoned = Some(reason.clone());
        self.shares = Vec::new();
        self.sum = Vec::new();
        self.self_mask_shares = Vec::new();
        self.mask_key_shares = Vec::new();
        SecAggError::Abandoned(reason)
    }

    /// The fixed roster; exists from step 2 on (checked by `expect_step`).
    fn fixed(&self) -> &Fixed {
        self.fixed
            .as_ref()
            .expect("the roster is fixed after step 1")
    }

    /// The index of `party` if it reached `at_least`.
    fn member(&self, party: PartyId, at_least: Status) -> Result<usize, SecAggError> {
        let fixed = self.fixed();
        fixed
            .graph
            .index_of(party)
            .filter(|&i| fixed.status[i] >= at_least)
            .ok_or(SecAggError::UnknownParty {
                party,
                step: self.step,
            })
    }

    // ---- Step 1 -------------------------------------------------------------

    /// Accepts a device's advertisement.
    ///
    /// Refused: another round, a second advertisement from the same party, a
    /// bad signature, a low-order public key, a full cohort.
    pub fn handle_advertisement(
        &mut self,
        advertisement: Advertisement,
    ) -> Result<(), SecAggError> {
        self.expect_step(Step::Advertise)?;
        self.check_round(advertisement.round)?;
        if self.pending.contains_key(&advertisement.party) {
            return Err(SecAggError::Duplicate {
                what: "advertisement",
                party: advertisement.party,
            });
        }
        if self.pending.len() >= self.max_parties {
            return Err(SecAggError::CohortFull {
                max: self.max_parties,
            });
        }
        advertisement.verify()?;
        for key in [&advertisement.c_public, &advertisement.s_public] {
            if crypto::is_weak_public_key(key) {
                return Err(SecAggError::WeakKey {
                    party: advertisement.party,
                });
            }
        }
        self.pending.insert(advertisement.party, advertisement);
        self.received += 1;
        Ok(())
    }

    /// Ends step 1: fixes the roster and the neighbour graph, and returns the
    /// devices to send [`roster_for`](Self::roster_for) to. Abandons the
    /// round with fewer than 2 devices.
    pub fn close_advertisements(&mut self) -> Result<Vec<PartyId>, SecAggError> {
        self.expect_step(Step::Advertise)?;
        let n = self.pending.len();
        if n < MIN_PARTIES {
            return Err(self.abandon(AbandonReason::TooFewParties {
                step: Step::Advertise,
                have: n,
                need: MIN_PARTIES,
            }));
        }
        let params = self.config.params(n)?;
        let parties: Vec<PartyId> = self.pending.keys().copied().collect();
        let graph = NeighbourGraph::new(parties.clone(), params.neighbours, &self.graph_seed)?;
        let advertisements = std::mem::take(&mut self.pending).into_values().collect();
        self.fixed = Some(Fixed {
            params,
            graph,
            advertisements,
            status: vec![Status::Advertised; n],
        });
        self.shares = vec![Vec::new(); n];
        self.step = Step::ShareKeys;
        self.received = 0;
        tracing::debug!(
            round = self.round,
            parties = n,
            neighbours = params.neighbours,
            threshold = params.threshold,
            "secure aggregation roster fixed"
        );
        Ok(parties)
    }

    // ---- Step 2 -------------------------------------------------------------

    /// The roster for `party`: every participant, the graph seed, and the
    /// advertisements of `party` and its neighbours. Available during step 2.
    pub fn roster_for(&self, party: PartyId) -> Result<Roster, SecAggError> {
        self.expect_step(Step::ShareKeys)?;
        let fixed = self.fixed();
        let me = self.member(party, Status::Advertised)?;
        let mut members: Vec<usize> = fixed
            .graph
            .neighbours(me)
            .iter()
            .map(|&j| j as usize)
            .collect();
        members.push(me);
        members.sort_unstable();
        Ok(Roster {
            round: self.round,
            graph_seed: self.graph_seed,
            parties: fixed.graph.parties().to_vec(),
            advertisements: members
                .into_iter()
                .map(|i| fixed.advertisements[i].clone())
                .collect(),
        })
    }

    /// Accepts a device's encrypted shares, to be routed to its neighbours.
    ///
    /// Refused: another round; a device not in the roster, or that already
    /// sent; a share naming another sender, addressed to a non-neighbour,
    /// duplicated, or of the wrong length; a share missing for a neighbour.
    pub fn handle_share_keys(&mut self, message: ShareKeys) -> Result<(), SecAggError> {
        self.expect_step(Step::ShareKeys)?;
        self.check_round(message.round)?;
        let sender = message.sender;
        let me = self.member(sender, Status::Advertised)?;
        let fixed = self.fixed();
        if !self.shares[me].is_empty() {
            return Err(SecAggError::Duplicate {
                what: "share keys message",
                party: sender,
            });
        }
        let k = fixed.params.neighbours;
        let mut by_slot: Vec<Option<EncryptedShare>> = vec![None; k];
        for share in message.shares {
            if share.sender != sender {
                return Err(SecAggError::ForeignShare {
                    sender,
                    claimed: share.sender,
                });
            }
            let slot = fixed
                .graph
                .index_of(share.recipient)
                .and_then(|r| fixed.graph.slot(me, r))
                .ok_or(SecAggError::NotNeighbour {
                    party: share.recipient,
                    other: sender,
                })?;
            if share.ciphertext.len() != SHARE_CIPHERTEXT_LEN {
                return Err(SecAggError::BadCiphertext {
                    sender,
                    recipient: share.recipient,
                    len: share.ciphertext.len(),
                    expected: SHARE_CIPHERTEXT_LEN,
                });
            }
            if by_slot[slot].is_some() {
                return Err(SecAggError::Duplicate {
                    what: "share",
                    party: share.recipient,
                });
            }
            by_slot[slot] = Some(share);
        }
        let shares: Vec<EncryptedShare> = by_slot.into_iter().flatten().collect();
        if shares.len() != k {
            return Err(SecAggError::Incomplete {
                what: "share keys message",
                party: sender,
                expected: k,
                got: shares.len(),
            });
        }
        // Slots are in party order, so `shares` is sorted by recipient.
        self.shares[me] = shares;
        self.received += 1;
        Ok(())
    }

    /// Ends step 2: keeps the devices that shared their keys and have at
    /// least `t` neighbours that did too (repeatedly), and returns them: send
    /// each its [`shares_for`](Self::shares_for). Abandons the round if none
    /// is left.
    pub fn close_share_keys(&mut self) -> Result<Vec<PartyId>, SecAggError> {
        self.expect_step(Step::ShareKeys)?;
        let shared: Vec<bool> = self.shares.iter().map(|s| !s.is_empty()).collect();
        let fixed = self.fixed();
        let t = fixed.params.threshold;
        let graph = &fixed.graph;
        let mut keep = shared.clone();
        let mut count: Vec<usize> = (0..graph.len())
            .map(|i| {
                graph
                    .neighbours(i)
                    .iter()
                    .filter(|&&j| keep[j as usize])
                    .count()
            })
            .collect();
        let mut queue: Vec<usize> = (0..graph.len())
            .filter(|&i| keep[i] && count[i] < t)
            .collect();
        while let Some(i) = queue.pop() {
            if !keep[i] {
                continue;
            }
            keep[i] = false;
            for &j in graph.neighbours(i) {
                let j = j as usize;
                count[j] -= 1;
                if keep[j] && count[j] < t {
                    queue.push(j);
                }
            }
        }
        let kept: Vec<PartyId> = (0..graph.len())
            .filter(|&i| keep[i])
            .map(|i| graph.party(i))
            .collect();
        let removed = shared
            .iter()
            .zip(&keep)
            .filter(|(s, k)| **s && !**k)
            .count();
        if kept.is_empty() {
            return Err(self.abandon(AbandonReason::TooFewParties {
                step: Step::ShareKeys,
                have: 0,
                need: t + 1,
            }));
        }
        let fixed = self
            .fixed
            .as_mut()
            .expect("the roster is fixed after step 1");
        for (i, k) in keep.iter().enumerate() {
            if *k {
                fixed.status[i] = Status::Shared;
            } else {
                self.shares[i] = Vec::new();
            }
        }
        self.sum = vec![0; self.num_values];
        self.step = Step::MaskedInput;
        self.received = 0;
        tracing::debug!(
            round = self.round,
            shared = shared.iter().filter(|s| **s).count(),
            removed,
            kept = kept.len(),
            "secure aggregation share keys closed"
        );
        Ok(kept)
    }

    // ---- Step 3 -------------------------------------------------------------

    /// The shares addressed to `party` by its neighbours that go on; `party`
    /// masks against exactly those. Available during step 3.
    pub fn shares_for(&self, party: PartyId) -> Result<ShareDelivery, SecAggError> {
        self.expect_step(Step::MaskedInput)?;
        let me = self.member(party, Status::Shared)?;
        let fixed = self.fixed();
        let shares = fixed
            .graph
            .neighbours(me)
            .iter()
            .map(|&j| j as usize)
            .filter(|&j| fixed.status[j] >= Status::Shared)
            .filter_map(|j| {
                let from = &self.shares[j];
                from.binary_search_by_key(&party, |s| s.recipient)
                    .ok()
                    .map(|i| from[i].clone())
            })
            .collect();
        Ok(ShareDelivery {
            round: self.round,
            recipient: party,
            shares,
        })
    }

    /// Adds a device's masked input into the running sum; the vector itself
    /// is not kept.
    ///
    /// Refused: another round; a device that is not in step 3, or already
    /// sent; a vector of the wrong length.
    pub fn handle_masked_input(&mut self, input: &MaskedInput) -> Result<(), SecAggError> {
        self.expect_step(Step::MaskedInput)?;
        self.check_round(input.round)?;
        let me = self.member(input.sender, Status::Shared)?;
        if self.fixed().status[me] >= Status::Masked {
            return Err(SecAggError::Duplicate {
                what: "masked input",
                party: input.sender,
            });
        }
        if input.values.len() != self.num_values {
            return Err(SecAggError::WrongLength {
                expected: self.num_values,
                got: input.values.len(),
            });
        }
        for (s, v) in self.sum.iter_mut().zip(&input.values) {
            *s = s.wrapping_add(*v);
        }
        self.fixed
            .as_mut()
            .expect("the roster is fixed after step 1")
            .status[me] = Status::Masked;
        self.received += 1;
        Ok(())
    }

    /// Ends step 3: the devices whose masked input arrived are the survivors;
    /// returns them (send each its [`unmask_request_for`](Self::unmask_request_for)).
    /// Abandons the round if a secret that must be reconstructed has fewer
    /// than `t` surviving share holders.
    pub fn close_masked_inputs(&mut self) -> Result<Vec<PartyId>, SecAggError> {
        self.expect_step(Step::MaskedInput)?;
        let fixed = self.fixed();
        let t = fixed.params.threshold;
        let survivors: Vec<usize> = (0..fixed.graph.len())
            .filter(|&i| fixed.status[i] >= Status::Masked)
            .collect();
        if survivors.is_empty() {
            return Err(self.abandon(AbandonReason::TooFewParties {
                step: Step::MaskedInput,
                have: 0,
                need: t + 1,
            }));
        }
        if let Some(reason) = self.missing_holders(Step::MaskedInput, Status::Masked) {
            return Err(self.abandon(reason));
        }
        let dropped = self
            .fixed()
            .status
            .iter()
            .filter(|s| **s == Status::Shared)
            .count();
        let parties: Vec<PartyId> = survivors
            .iter()
            .map(|&i| self.fixed().graph.party(i))
            .collect();
        let n = self.fixed().graph.len();
        self.shares = Vec::new();
        self.self_mask_shares = vec![Vec::new(); n];
        self.mask_key_shares = vec![Vec::new(); n];
        self.step = Step::Unmask;
        self.received = 0;
        tracing::debug!(
            round = self.round,
            survivors = parties.len(),
            dropped,
            "secure aggregation masked inputs closed"
        );
        Ok(parties)
    }

    /// The first secret that cannot be reconstructed because fewer than `t`
    /// of its owner's neighbours reached `holders`: every survivor's self-mask
    /// seed, and the mask key of every dropped device with a surviving
    /// neighbour.
    fn missing_holders(&self, step: Step, holders: Status) -> Option<AbandonReason> {
        let fixed = self.fixed();
        let t = fixed.params.threshold;
        for (i, &status) in fixed.status.iter().enumerate() {
            let secret = match status {
                Status::Advertised => continue,
                Status::Shared => SecretKind::MaskKey,
                Status::Masked | Status::Responded => SecretKind::SelfMask,
            };
            let neighbours = fixed.graph.neighbours(i);
            let masked = neighbours
                .iter()
                .filter(|&&j| fixed.status[j as usize] >= Status::Masked)
                .count();
            let have = neighbours
                .iter()
                .filter(|&&j| fixed.status[j as usize] >= holders)
                .count();
            let needed = secret == SecretKind::SelfMask || masked > 0;
            if needed && have < t {
                return Some(AbandonReason::TooFewShareHolders {
                    step,
                    party: fixed.graph.party(i),
                    secret,
                    have,
                    threshold: t,
                });
            }
        }
        None
    }

    // ---- Step 4 -------------------------------------------------------------

    /// What `party` must reveal: its neighbours that survived and those that
    /// dropped after step 2. Available during step 4.
    pub fn unmask_request_for(&self, party: PartyId) -> Result<UnmaskRequest, SecAggError> {
        self.expect_step(Step::Unmask)?;
        let me = self.member(party, Status::Masked)?;
        let fixed = self.fixed();
        let mut survivors = Vec::new();
        let mut dropped = Vec::new();
        for &j in fixed.graph.neighbours(me) {
            let j = j as usize;
            match fixed.status[j] {
                Status::Advertised => {}
                Status::Shared => dropped.push(fixed.graph.party(j)),
                Status::Masked | Status::Responded => survivors.push(fixed.graph.party(j)),
            }
        }
        Ok(UnmaskRequest {
            round: self.round,
            recipient: party,
            survivors,
            dropped,
        })
    }

    /// Accepts a survivor's revealed shares.
    ///
    /// Refused: another round; a device that is not a survivor, or already
    /// sent; a share of a non-neighbour, of a device not in step 3, or with
    /// the wrong index; a self-mask share of a dropped device; a mask-key
    /// share of a survivor; duplicates; a missing share.
    pub fn handle_unmask_response(&mut self, response: UnmaskResponse) -> Result<(), SecAggError> {
        self.expect_step(Step::Unmask)?;
        self.check_round(response.round)?;
        let sender = response.sender;
        let me = self.member(sender, Status::Masked)?;
        let fixed = self.fixed();
        if fixed.status[me] == Status::Responded {
            return Err(SecAggError::Duplicate {
                what: "unmask response",
                party: sender,
            });
        }
        let mut seen = vec![false; fixed.params.neighbours];
        let mut accepted: Vec<(usize, SecretKind, SecretShare)> = Vec::new();
        for (list, secret) in [
            (response.self_mask_shares, SecretKind::SelfMask),
            (response.mask_key_shares, SecretKind::MaskKey),
        ] {
            for revealed in list {
                let owner = revealed.owner;
                let (o, slot) = fixed
                    .graph
                    .index_of(owner)
                    .and_then(|o| Some((o, fixed.graph.slot(me, o)?)))
                    .ok_or(SecAggError::NotNeighbour {
                        party: owner,
                        other: sender,
                    })?;
                match (fixed.status[o], secret) {
                    (Status::Advertised, _) => {
                        return Err(SecAggError::UnknownParty {
                            party: owner,
                            step: Step::Unmask,
                        });
                    }
                    (Status::Shared, SecretKind::SelfMask) => {
                        return Err(SecAggError::SelfMaskShareForDropped { sender, owner });
                    }
                    (Status::Masked | Status::Responded, SecretKind::MaskKey) => {
                        return Err(SecAggError::MaskKeyShareForSurvivor { sender, owner });
                    }
                    _ => {}
                }
                if std::mem::replace(&mut seen[slot], true) {
                    return Err(SecAggError::Duplicate {
                        what: "revealed share",
                        party: owner,
                    });
                }
                // Both sides compute the index from the graph: the holder in
                // slot s of the owner's neighbours has the share at s + 1.
                let expected = fixed
                    .graph
                    .share_index(o, me)
                    .ok_or(SecAggError::NotNeighbour {
                        party: owner,
                        other: sender,
                    })?;
                if revealed.share.index() != expected {
                    return Err(SecAggError::WrongShareIndex {
                        owner,
                        holder: sender,
                        secret,
                        expected,
                        got: revealed.share.index(),
                    });
                }
                accepted.push((o, secret, revealed.share));
            }
        }
        let due = fixed
            .graph
            .neighbours(me)
            .iter()
            .filter(|&&j| fixed.status[j as usize] >= Status::Shared)
            .count();
        if accepted.len() != due {
            return Err(SecAggError::Incomplete {
                what: "unmask response",
                party: sender,
                expected: due,
                got: accepted.len(),
            });
        }
        let t = fixed.params.threshold;
        for (o, secret, share) in accepted {
            let list = match secret {
                SecretKind::SelfMask => &mut self.self_mask_shares[o],
                SecretKind::MaskKey => &mut self.mask_key_shares[o],
            };
            if list.len() < t {
                list.push(share);
            }
        }
        self.fixed
            .as_mut()
            .expect("the roster is fixed after step 1")
            .status[me] = Status::Responded;
        self.received += 1;
        Ok(())
    }

    /// Whether [`finish`](Self::finish) has the `t` shares of every secret it
    /// must reconstruct (more responses are then not needed).
    pub fn ready(&self) -> bool {
        self.step == Step::Unmask && self.missing_shares().is_none()
    }

    /// The first secret with fewer than `t` revealed shares.
    fn missing_shares(&self) -> Option<AbandonReason> {
        let fixed = self.fixed();
        let t = fixed.params.threshold;
        (0..fixed.graph.len()).find_map(|i| {
            let (secret, have) = match fixed.status[i] {
                Status::Advertised => return None,
                Status::Shared => {
                    let has_surviving_neighbour = fixed
                        .graph
                        .neighbours(i)
                        .iter()
                        .any(|&j| fixed.status[j as usize] >= Status::Masked);
                    if !has_surviving_neighbour {
                        return None;
                    }
                    (SecretKind::MaskKey, self.mask_key_shares[i].len())
                }
                Status::Masked | Status::Responded => {
                    (SecretKind::SelfMask, self.self_mask_shares[i].len())
                }
            };
            (have < t).then(|| AbandonReason::TooFewShareHolders {
                step: Step::Unmask,
                party: fixed.graph.party(i),
                secret,
                have,
                threshold: t,
            })
        })
    }

    /// Ends the round: reconstructs the secrets, removes the survivors' self
    /// masks and the dropped devices' pairwise masks, and returns the exact
    /// sum of the survivors' quantized updates. Abandons the round if a
    /// secret has fewer than `t` shares or does not match what its owner
    /// advertised.
    pub fn finish(&mut self) -> Result<SecAggOutput, SecAggError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.finish_with(threads)
    }

    /// [`finish`](Self::finish) expanding the masks on `threads` threads (the
    /// output does not depend on it).
    pub fn finish_with(&mut self, threads: usize) -> Result<SecAggOutput, SecAggError> {
        self.expect_step(Step::Unmask)?;
        if let Some(reason) = self.missing_shares() {
            return Err(self.abandon(reason));
        }
        let masks = match self.masks() {
            Ok(masks) => masks,
            Err(reason) => return Err(self.abandon(reason)),
        };
        let mut sum = std::mem::take(&mut self.sum);
        prg::apply_masks(&masks, &mut sum, threads);
        let fixed = self.fixed();
        let survivors: Vec<PartyId> = (0..fixed.graph.len())
            .filter(|&i| fixed.status[i] >= Status::Masked)
            .map(|i| fixed.graph.party(i))
            .collect();
        self.self_mask_shares = Vec::new();
        self.mask_key_shares = Vec::new();
        self.step = Step::Finished;
        tracing::debug!(
            round = self.round,
            survivors = survivors.len(),
            "secure aggregation finished"
        );
        Ok(SecAggOutput { sum, survivors })
    }

    /// Reconstructs the secrets and returns every mask left in the sum, with
    /// the sign that removes it.
    fn masks(&self) -> Result<Vec<(Secret32, prg::Sign)>, AbandonReason> {
        let mut masks = Vec::new();
        let fixed = self.fixed();
        let t = fixed.params.threshold;
        let mismatch = |i: usize, secret| AbandonReason::ReconstructionMismatch {
            party: fixed.graph.party(i),
            secret,
        };
        for i in 0..fixed.graph.len() {
            let party = fixed.graph.party(i);
            let advertised = &fixed.advertisements[i];
            match fixed.status[i] {
                Status::Advertised => {}
                Status::Masked | Status::Responded => {
                    let b = shamir::combine(&self.self_mask_shares[i], t)
                        .map_err(|_| mismatch(i, SecretKind::SelfMask))?;
                    if crypto::self_mask_commitment(self.round, party, &b)
                        != advertised.self_mask_commitment
                    {
                        return Err(mismatch(i, SecretKind::SelfMask));
                    }
                    masks.push((b, prg::Sign::Sub));
                }
                Status::Shared => {
                    let surviving: Vec<usize> = fixed
                        .graph
                        .neighbours(i)
                        .iter()
                        .map(|&j| j as usize)
                        .filter(|&j| fixed.status[j] >= Status::Masked)
                        .collect();
                    if surviving.is_empty() {
                        continue;
                    }
                    let secret = shamir::combine(&self.mask_key_shares[i], t)
                        .map_err(|_| mismatch(i, SecretKind::MaskKey))?;
                    let key = KeyPair::from_secret_bytes(&secret);
                    if *key.public() != advertised.s_public {
                        return Err(mismatch(i, SecretKind::MaskKey));
                    }
                    for j in surviving {
                        let peer = fixed.graph.party(j);
                        // Keys were checked not to be low-order on receipt, so
                        // agreement cannot fail.
                        let shared = key
                            .agree(&fixed.advertisements[j].s_public, peer)
                            .map_err(|_| mismatch(i, SecretKind::MaskKey))?;
                        let seed = crypto::mask_seed(&shared, self.round, party, peer);
                        // The survivor added the mask if its id is the smaller.
                        let sign = if peer < party {
                            prg::Sign::Sub
                        } else {
                            prg::Sign::Add
                        };
                        masks.push((seed, sign));
                    }
                }
            }
        }
        Ok(masks)
    }
}

#[cfg(test)]
mod tests;
