//! The device side of secure aggregation: one [`SecAggClient`] per round.
//!
//! A sans-IO state machine. Each step is one method call that takes what the
//! coordinator sent and returns what to send back; randomness is passed in.
//! Calls must come in order; a call out of order, or any message that fails
//! a check, returns a [`SecAggError`] and leaves the client as it was.
//!
//! | step | call | sends |
//! |---|---|---|
//! | 1 | [`advertise`](SecAggClient::advertise) | [`Advertisement`] |
//! | 2 | [`handle_roster`](SecAggClient::handle_roster) | [`ShareKeys`] |
//! | 3 | [`handle_shares`](SecAggClient::handle_shares) (with the update) | [`MaskedInput`] |
//! | 4 | [`handle_unmask`](SecAggClient::handle_unmask) | [`UnmaskResponse`] |
//!
//! What the device guards, whatever the coordinator sends: it checks every
//! neighbour's signature (and, when given, that the identity key is the one
//! trusted for that party); it shares its secrets only with its neighbours
//! in the graph every party can compute; it reveals, per neighbour, at most
//! one of the two shares it holds, answers one unmask request only, and
//! refuses when fewer than `t` of its neighbours survived. The protocol and
//! its guarantees are described in [`fedrec_proto::secagg`].
//!
//! ```
//! use fedrec_client::secagg::SecAggClient;
//! use fedrec_proto::secagg::{crypto, PartyId, SecAggConfig, Step};
//!
//! let mut rng = rand::rng();
//! let identity = crypto::generate_identity(&mut rng);
//! let mut client = SecAggClient::new(SecAggConfig::default(), 1, PartyId(7), identity).unwrap();
//! let advertisement = client.advertise(&mut rng).unwrap();
//! assert_eq!(advertisement.party, PartyId(7));
//! advertisement.verify().unwrap();
//! assert_eq!(client.step(), Step::ShareKeys); // waiting for the roster
//! ```

use std::collections::BTreeMap;

use fedrec_proto::secagg::crypto::{self, KeyPair, SigningKey, VerifyingKey};
use fedrec_proto::secagg::{
    Advertisement, MaskedInput, NeighbourGraph, PartyId, Quantizer, RevealedShare, Roster,
    SecAggConfig, SecAggError, Secret32, SecretKind, SecretShare, ShareDelivery, ShareKeys, Step,
    UnmaskRequest, UnmaskResponse, prg, shamir,
};
use rand::CryptoRng;

/// One device's part in one secure aggregation round.
#[derive(Debug)]
pub struct SecAggClient {
    round: u64,
    party: PartyId,
    config: SecAggConfig,
    quantizer: Quantizer,
    identity: SigningKey,
    trusted: Option<BTreeMap<PartyId, VerifyingKey>>,
    state: State,
}

/// Where the device is in the round, with the secrets it still needs.
enum State {
    /// Nothing sent yet.
    Start,
    /// Keys advertised, waiting for the roster.
    Advertised(Box<Keys>),
    /// Shares sent, waiting for the neighbours' shares.
    SharedKeys(Box<Shared>),
    /// Masked input sent, waiting for the unmask request.
    Masked(Box<Masked>),
    /// Unmask response sent.
    Finished,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.write_str(match self {
            Self::Start => "Start",
            Self::Advertised(_) => "Advertised",
            Self::SharedKeys(_) => "SharedKeys",
            Self::Masked(_) => "Masked",
            Self::Finished => "Finished",
        })
    }
}

/// This round's key pairs and self-mask seed.
struct Keys {
    c: KeyPair,
    s: KeyPair,
    b: Secret32,
    advertisement: Advertisement,
}

/// After step 2: what step 3 needs.
struct Shared {
    b: Secret32,
    threshold: usize,
    /// Sorted by party.
    neighbours: Vec<Neighbour>,
}

/// What this device knows about one neighbour after step 2.
struct Neighbour {
    party: PartyId,
    /// Decrypts the shares this neighbour sends us.
    receive_key: Secret32,
    /// Seed of our pairwise mask.
    mask_seed: Secret32,
    /// The index of the shares of its secrets we must receive.
    share_index: u8,
}

/// After step 3: the neighbours' shares we hold, one pair per neighbour we
/// masked against (self-mask share, mask-key share).
struct Masked {
    threshold: usize,
    held: BTreeMap<PartyId, (SecretShare, SecretShare)>,
}

impl SecAggClient {
    /// A device `party` ready for `round`, with its long-term Ed25519
    /// `identity` key. Refuses an invalid configuration.
    pub fn new(
        config: SecAggConfig,
        round: u64,
        party: PartyId,
        identity: SigningKey,
    ) -> Result<Self, SecAggError> {
        config.validate()?;
        let quantizer = config.quantizer()?;
        Ok(Self {
            round,
            party,
            config,
            quantizer,
            identity,
            trusted: None,
            state: State::Start,
        })
    }

    /// Accept advertisements only when signed with the identity key given
    /// here for their party (a party not listed is refused). Without this,
    /// each advertisement's own identity key is used, which proves integrity
    /// but not who the device is: only keys certified by someone other than
    /// the coordinator stop it from inventing devices.
    pub fn trust_identities(&mut self, keys: BTreeMap<PartyId, VerifyingKey>) {
        self.trusted = Some(keys);
    }

    /// This device.
    pub fn party(&self) -> PartyId {
        self.party
    }

    /// The round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The step whose message this device expects to handle or send next.
    pub fn step(&self) -> Step {
        match self.state {
            State::Start => Step::Advertise,
            State::Advertised(_) => Step::ShareKeys,
            State::SharedKeys(_) => Step::MaskedInput,
            State::Masked(_) => Step::Unmask,
            State::Finished => Step::Finished,
        }
    }

    fn wrong_step(&self, message: Step) -> SecAggError {
        SecAggError::WrongStep {
            message,
            current: self.step(),
        }
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

    fn check_recipient(&self, recipient: PartyId) -> Result<(), SecAggError> {
        if recipient != self.party {
            return Err(SecAggError::WrongRecipient {
                expected: self.party,
                got: recipient,
            });
        }
        Ok(())
    }

    /// Step 1: makes this round's two key pairs and self-mask seed, and
    /// returns the signed advertisement of the public keys.
    pub fn advertise(&mut self, rng: &mut impl CryptoRng) -> Result<Advertisement, SecAggError> {
        if !matches!(self.state, State::Start) {
            return Err(self.wrong_step(Step::Advertise));
        }
        let c = KeyPair::generate(rng);
        let s = KeyPair::generate(rng);
        let b = crypto::random_seed(rng);
        let advertisement = Advertisement::sign(
            self.round,
            self.party,
            &self.identity,
            *c.public(),
            *s.public(),
            crypto::self_mask_commitment(self.round, self.party, &b),
        );
        self.state = State::Advertised(Box::new(Keys {
            c,
            s,
            b,
            advertisement: advertisement.clone(),
        }));
        Ok(advertisement)
    }

    /// Step 2: checks the roster, finds this device's neighbours, and returns
    /// `t`-of-`k` shares of its self-mask seed and mask key, encrypted for
    /// each neighbour.
    ///
    /// Refused: another round; a configuration that does not fit the cohort;
    /// an unsorted party list or one without this device; advertisements
    /// other than exactly this device's (unaltered) and its neighbours'; a
    /// bad or untrusted signature; a low-order public key.
    pub fn handle_roster(
        &mut self,
        roster: &Roster,
        rng: &mut impl CryptoRng,
    ) -> Result<ShareKeys, SecAggError> {
        let State::Advertised(keys) = &self.state else {
            return Err(self.wrong_step(Step::ShareKeys));
        };
        self.check_round(roster.round)?;
        let params = self.config.params(roster.parties.len())?;
        let graph = NeighbourGraph::new(
            roster.parties.clone(),
            params.neighbours,
            &roster.graph_seed,
        )?;
        let me = graph.index_of(self.party).ok_or_else(|| {
            SecAggError::MalformedRoster(format!("this device (party {}) is not in it", self.party))
        })?;

        // Exactly this device's and its neighbours' advertisements, in order.
        let mut expected: Vec<usize> = graph.neighbours(me).iter().map(|&j| j as usize).collect();
        expected.push(me);
        expected.sort_unstable();
        let got: Vec<PartyId> = roster.advertisements.iter().map(|a| a.party).collect();
        let want: Vec<PartyId> = expected.iter().map(|&i| graph.party(i)).collect();
        if got != want {
            return Err(SecAggError::MalformedRoster(format!(
                "expected the advertisements of parties {}, got {}",
                list(&want),
                list(&got)
            )));
        }

        let mut neighbours = Vec::with_capacity(params.neighbours);
        let mut outgoing = Vec::with_capacity(params.neighbours);
        for (adv, &index) in roster.advertisements.iter().zip(&expected) {
            if index == me {
                if *adv != keys.advertisement {
                    return Err(SecAggError::MalformedRoster(
                        "it alters this device's own advertisement".into(),
                    ));
                }
                continue;
            }
            self.check_round(adv.round)?;
            let key = adv.verify()?;
            if let Some(trusted) = &self.trusted
                && trusted.get(&adv.party) != Some(&key)
            {
                return Err(SecAggError::UntrustedIdentity { party: adv.party });
            }
            let c_shared = keys.c.agree(&adv.c_public, adv.party)?;
            let s_shared = keys.s.agree(&adv.s_public, adv.party)?;
            let share_index = graph
                .share_index(index, me)
                .ok_or(SecAggError::NotNeighbour {
                    party: self.party,
                    other: adv.party,
                })?;
            neighbours.push(Neighbour {
                party: adv.party,
                receive_key: crypto::share_key(&c_shared, self.round, adv.party, self.party),
                mask_seed: crypto::mask_seed(&s_shared, self.round, self.party, adv.party),
                share_index,
            });
            outgoing.push(crypto::share_key(
                &c_shared, self.round, self.party, adv.party,
            ));
        }

        let b_shares = shamir::split(&keys.b, params.threshold, params.neighbours, rng)?;
        let s_shares = shamir::split(
            &keys.s.secret_bytes(),
            params.threshold,
            params.neighbours,
            rng,
        )?;
        // Neighbour in slot i (sorted by party) gets the shares at point i + 1.
        let shares = neighbours
            .iter()
            .zip(&outgoing)
            .zip(b_shares.iter().zip(&s_shares))
            .map(|((n, key), (b, s))| {
                crypto::encrypt_shares(key, self.round, self.party, n.party, b, s)
            })
            .collect();

        self.state = State::SharedKeys(Box::new(Shared {
            b: keys.b.clone(),
            threshold: params.threshold,
            neighbours,
        }));
        Ok(ShareKeys {
            round: self.round,
            sender: self.party,
            shares,
        })
    }

    /// Step 3: keeps the neighbours' shares addressed to this device and
    /// returns its masked update: the quantized `update`, plus its self mask,
    /// plus a pairwise mask with each neighbour whose shares arrived (added
    /// when this device's id is the smaller, subtracted otherwise).
    ///
    /// Refused: another round or recipient; a share from a non-neighbour, a
    /// duplicate, one that does not decrypt or has the wrong index; fewer
    /// than `t` neighbours' shares; a NaN or infinite update value.
    pub fn handle_shares(
        &mut self,
        delivery: &ShareDelivery,
        update: &[f32],
    ) -> Result<MaskedInput, SecAggError> {
        let State::SharedKeys(shared) = &self.state else {
            return Err(self.wrong_step(Step::MaskedInput));
        };
        self.check_round(delivery.round)?;
        self.check_recipient(delivery.recipient)?;

        let mut held = BTreeMap::new();
        for share in &delivery.shares {
            self.check_recipient(share.recipient)?;
            let neighbour = shared
                .neighbours
                .binary_search_by_key(&share.sender, |n| n.party)
                .map(|i| &shared.neighbours[i])
                .map_err(|_| SecAggError::NotNeighbour {
                    party: share.sender,
                    other: self.party,
                })?;
            if held.contains_key(&share.sender) {
                return Err(SecAggError::Duplicate {
                    what: "share",
                    party: share.sender,
                });
            }
            let (b, s) = crypto::decrypt_shares(&neighbour.receive_key, self.round, share)?;
            for (got, secret) in [
                (b.index(), SecretKind::SelfMask),
                (s.index(), SecretKind::MaskKey),
            ] {
                if got != neighbour.share_index {
                    return Err(SecAggError::WrongShareIndex {
                        owner: share.sender,
                        holder: self.party,
                        secret,
                        expected: neighbour.share_index,
                        got,
                    });
                }
            }
            held.insert(share.sender, (b, s));
        }
        if held.len() < shared.threshold {
            return Err(SecAggError::TooFewShares {
                have: held.len(),
                threshold: shared.threshold,
            });
        }

        let mut values = vec![0_u32; update.len()];
        self.quantizer.quantize_into(update, &mut values)?;
        prg::add_mask(&shared.b, &mut values);
        for n in shared
            .neighbours
            .iter()
            .filter(|n| held.contains_key(&n.party))
        {
            if self.party < n.party {
                prg::add_mask(&n.mask_seed, &mut values);
            } else {
                prg::sub_mask(&n.mask_seed, &mut values);
            }
        }

        self.state = State::Masked(Box::new(Masked {
            threshold: shared.threshold,
            held,
        }));
        Ok(MaskedInput {
            round: self.round,
            sender: self.party,
            values,
        })
    }

    /// Step 4: reveals the shares of the survivors' self-mask seeds and of the
    /// dropped neighbours' mask keys. Answered once; the client is then
    /// finished.
    ///
    /// Refused: another round or recipient; a neighbour listed twice or as
    /// both survivor and dropped; this device listed; a party this device did
    /// not mask against; one it did that is not listed; fewer than `t`
    /// survivors.
    pub fn handle_unmask(
        &mut self,
        request: &UnmaskRequest,
    ) -> Result<UnmaskResponse, SecAggError> {
        let State::Masked(masked) = &self.state else {
            return Err(self.wrong_step(Step::Unmask));
        };
        self.check_round(request.round)?;
        self.check_recipient(request.recipient)?;

        // Classify every listed party, refusing any inconsistency.
        let mut kind: BTreeMap<PartyId, SecretKind> = BTreeMap::new();
        for (list, secret) in [
            (&request.survivors, SecretKind::SelfMask),
            (&request.dropped, SecretKind::MaskKey),
        ] {
            for &party in list.iter() {
                if party == self.party {
                    return Err(SecAggError::MalformedUnmask(format!(
                        "it lists this device (party {party}), which sent its masked input"
                    )));
                }
                match kind.insert(party, secret) {
                    None => {}
                    Some(previous) if previous != secret => {
                        return Err(SecAggError::ConflictingUnmask { party });
                    }
                    Some(_) => {
                        return Err(SecAggError::MalformedUnmask(format!(
                            "it lists party {party} twice"
                        )));
                    }
                }
                if !masked.held.contains_key(&party) {
                    return Err(SecAggError::MalformedUnmask(format!(
                        "party {party} is not a neighbour this device masked against"
                    )));
                }
            }
        }
        if let Some(missing) = masked.held.keys().find(|p| !kind.contains_key(p)) {
            return Err(SecAggError::MalformedUnmask(format!(
                "neighbour {missing} is listed neither as a survivor nor as dropped"
            )));
        }
        if request.survivors.len() < masked.threshold {
            return Err(SecAggError::TooFewSurvivors {
                have: request.survivors.len(),
                threshold: masked.threshold,
            });
        }

        let mut self_mask_shares = Vec::with_capacity(request.survivors.len());
        let mut mask_key_shares = Vec::with_capacity(request.dropped.len());
        for (&owner, (b, s)) in &masked.held {
            // Every held neighbour was classified just above.
            match kind[&owner] {
                SecretKind::SelfMask => self_mask_shares.push(RevealedShare {
                    owner,
                    share: b.clone(),
                }),
                SecretKind::MaskKey => mask_key_shares.push(RevealedShare {
                    owner,
                    share: s.clone(),
                }),
            }
        }
        self.state = State::Finished;
        Ok(UnmaskResponse {
            round: self.round,
            sender: self.party,
            self_mask_shares,
            mask_key_shares,
        })
    }
}

/// `[a, b, c]`, shortened past 12 entries.
fn list(parties: &[PartyId]) -> String {
    let shown: Vec<String> = parties.iter().take(12).map(ToString::to_string).collect();
    let more = if parties.len() > 12 {
        format!(", … ({} in all)", parties.len())
    } else {
        String::new()
    };
    format!("[{}{more}]", shown.join(", "))
}

#[cfg(test)]
mod tests;
