//! Tests of the device state machine, with a hand-rolled router standing in
//! for the coordinator (the coordinator crate tests the two together).

use super::*;
use fedrec_proto::secagg::crypto::generate_identity;
use fedrec_proto::secagg::{EncryptedShare, NeighbourGraph};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const ROUND: u64 = 9;

/// A cohort of devices and everything a coordinator would hold.
struct Net {
    rng: ChaCha20Rng,
    identities: Vec<SigningKey>,
    clients: Vec<SecAggClient>,
    ads: Vec<Advertisement>,
    graph: NeighbourGraph,
    seed: [u8; 32],
}

fn party(i: usize) -> PartyId {
    PartyId(100 + 2 * i as u64)
}

impl Net {
    /// `n` devices that have advertised.
    fn new(n: usize, config: SecAggConfig) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(n as u64);
        let identities: Vec<SigningKey> = (0..n).map(|_| generate_identity(&mut rng)).collect();
        let mut clients: Vec<SecAggClient> = identities
            .iter()
            .enumerate()
            .map(|(i, id)| SecAggClient::new(config.clone(), ROUND, party(i), id.clone()).unwrap())
            .collect();
        let ads = clients
            .iter_mut()
            .map(|c| c.advertise(&mut rng).unwrap())
            .collect();
        let params = config.params(n).unwrap();
        let seed = [n as u8; 32];
        let graph =
            NeighbourGraph::new((0..n).map(party).collect(), params.neighbours, &seed).unwrap();
        Self {
            rng,
            identities,
            clients,
            ads,
            graph,
            seed,
        }
    }

    fn roster(&self, i: usize) -> Roster {
        let mut members: Vec<usize> = self
            .graph
            .neighbours(i)
            .iter()
            .map(|&j| j as usize)
            .collect();
        members.push(i);
        members.sort_unstable();
        Roster {
            round: ROUND,
            graph_seed: self.seed,
            parties: self.graph.parties().to_vec(),
            advertisements: members.iter().map(|&j| self.ads[j].clone()).collect(),
        }
    }

    /// Every device handles its roster.
    fn share_all(&mut self) -> Vec<ShareKeys> {
        (0..self.clients.len())
            .map(|i| {
                let roster = self.roster(i);
                self.clients[i]
                    .handle_roster(&roster, &mut self.rng)
                    .unwrap()
            })
            .collect()
    }
}

/// The shares addressed to `recipient` among `sent`.
fn delivery(sent: &[ShareKeys], recipient: PartyId) -> ShareDelivery {
    ShareDelivery {
        round: ROUND,
        recipient,
        shares: sent
            .iter()
            .flat_map(|s| {
                s.shares
                    .iter()
                    .filter(|e| e.recipient == recipient)
                    .cloned()
            })
            .collect(),
    }
}

fn update(i: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|v| ((i * 7 + v * 3) % 19) as f32 / 10.0 - 0.9)
        .collect()
}

#[test]
fn masks_cancel_and_self_masks_are_reconstructible() {
    let n = 10;
    let config = SecAggConfig::default();
    let quantizer = config.quantizer().unwrap();
    let mut net = Net::new(n, config);
    let sent = net.share_all();
    for s in &sent {
        assert_eq!(s.shares.len(), 8);
    }
    let mut sum = vec![0_u32; 6];
    let mut expected = vec![0_u32; 6];
    for i in 0..n {
        let masked = net.clients[i]
            .handle_shares(&delivery(&sent, party(i)), &update(i, 6))
            .unwrap();
        assert_eq!(masked.sender, party(i));
        for (s, v) in sum.iter_mut().zip(&masked.values) {
            *s = s.wrapping_add(*v);
        }
        quantizer
            .add_quantized(&update(i, 6), &mut expected)
            .unwrap();
    }
    // Every pairwise mask cancels; only the self masks remain.
    let mut b_shares: BTreeMap<PartyId, Vec<SecretShare>> = BTreeMap::new();
    for i in 0..n {
        let neighbours: Vec<PartyId> = net
            .graph
            .neighbours(i)
            .iter()
            .map(|&j| party(j as usize))
            .collect();
        let response = net.clients[i]
            .handle_unmask(&UnmaskRequest {
                round: ROUND,
                recipient: party(i),
                survivors: neighbours.clone(),
                dropped: vec![],
            })
            .unwrap();
        assert!(response.mask_key_shares.is_empty());
        let owners: Vec<PartyId> = response.self_mask_shares.iter().map(|r| r.owner).collect();
        assert_eq!(owners, neighbours);
        for r in response.self_mask_shares {
            b_shares.entry(r.owner).or_default().push(r.share);
        }
        assert_eq!(net.clients[i].step(), Step::Finished);
    }
    for (owner, shares) in &b_shares {
        let b = shamir::combine(shares, 6).unwrap();
        let index = owner.0 as usize / 2 - 50;
        assert_eq!(
            crypto::self_mask_commitment(ROUND, *owner, &b),
            net.ads[index].self_mask_commitment
        );
        prg::sub_mask(&b, &mut sum);
    }
    assert_eq!(sum, expected);
}

#[test]
fn calls_out_of_order_are_refused_and_change_nothing() {
    let mut net = Net::new(5, SecAggConfig::default());
    let mut fresh = SecAggClient::new(
        SecAggConfig::default(),
        ROUND,
        party(0),
        net.identities[0].clone(),
    )
    .unwrap();
    let roster = net.roster(0);
    let err = fresh.handle_roster(&roster, &mut net.rng).unwrap_err();
    assert_eq!(
        err,
        SecAggError::WrongStep {
            message: Step::ShareKeys,
            current: Step::Advertise
        }
    );
    assert_eq!(
        err.to_string(),
        "a share keys message is not accepted at step advertise keys"
    );
    let empty = ShareDelivery {
        round: ROUND,
        recipient: party(0),
        shares: vec![],
    };
    assert_eq!(
        fresh.handle_shares(&empty, &[]).unwrap_err().reason(),
        "wrong_step"
    );
    assert_eq!(fresh.step(), Step::Advertise);

    // Advertising twice is refused.
    let err = net.clients[0].advertise(&mut net.rng).unwrap_err();
    assert_eq!(err.reason(), "wrong_step");
    let request = UnmaskRequest {
        round: ROUND,
        recipient: party(0),
        survivors: vec![],
        dropped: vec![],
    };
    assert_eq!(
        net.clients[0].handle_unmask(&request).unwrap_err().reason(),
        "wrong_step"
    );
    assert_eq!(net.clients[0].step(), Step::ShareKeys);

    let sent = net.share_all();
    // A second roster is refused.
    let roster = net.roster(0);
    assert_eq!(
        net.clients[0]
            .handle_roster(&roster, &mut net.rng)
            .unwrap_err()
            .reason(),
        "wrong_step"
    );
    for i in 0..5 {
        net.clients[i]
            .handle_shares(&delivery(&sent, party(i)), &update(i, 3))
            .unwrap();
    }
    // A second masked input would let the coordinator compare two maskings.
    let err = net.clients[0]
        .handle_shares(&delivery(&sent, party(0)), &update(0, 3))
        .unwrap_err();
    assert_eq!(err.reason(), "wrong_step");
    let neighbours: Vec<PartyId> = net
        .graph
        .neighbours(0)
        .iter()
        .map(|&j| party(j as usize))
        .collect();
    let request = UnmaskRequest {
        round: ROUND,
        recipient: party(0),
        survivors: neighbours.clone(),
        dropped: vec![],
    };
    net.clients[0].handle_unmask(&request).unwrap();
    // Only one unmask request is ever answered, even a different one.
    let again = UnmaskRequest {
        survivors: vec![],
        dropped: neighbours,
        ..request
    };
    let err = net.clients[0].handle_unmask(&again).unwrap_err();
    assert_eq!(
        err,
        SecAggError::WrongStep {
            message: Step::Unmask,
            current: Step::Finished
        }
    );
}

#[test]
fn bad_rosters_are_refused() {
    let n = 12;
    let mut net = Net::new(n, SecAggConfig::default());
    let me = 3;
    let good = net.roster(me);
    let neighbour = net.graph.neighbours(me)[0] as usize;
    let outsider = (0..n)
        .find(|&j| j != me && !net.graph.are_neighbours(me, j))
        .unwrap();

    let mut cases: Vec<(Roster, &str)> = Vec::new();
    cases.push((
        Roster {
            round: ROUND + 1,
            ..good.clone()
        },
        "wrong_round",
    ));
    let mut r = good.clone();
    r.parties.retain(|p| *p != party(me));
    cases.push((r, "malformed_roster"));
    let mut r = good.clone();
    r.parties.swap(0, 1);
    cases.push((r, "malformed_roster"));
    let mut r = good.clone();
    r.advertisements.retain(|a| a.party != party(neighbour));
    cases.push((r, "malformed_roster"));
    let mut r = good.clone();
    r.advertisements.push(net.ads[outsider].clone());
    r.advertisements.sort_by_key(|a| a.party);
    cases.push((r, "malformed_roster"));
    // Another graph seed gives other neighbours.
    cases.push((
        Roster {
            graph_seed: [77; 32],
            ..good.clone()
        },
        "malformed_roster",
    ));
    // The coordinator swaps this device's keys for its own.
    let mut r = good.clone();
    let mine = r
        .advertisements
        .iter_mut()
        .find(|a| a.party == party(me))
        .unwrap();
    *mine = Advertisement::sign(
        ROUND,
        party(me),
        &net.identities[me],
        [9; 32],
        mine.s_public,
        mine.self_mask_commitment,
    );
    cases.push((r, "malformed_roster"));
    // A forged neighbour advertisement (one bit of a key flipped).
    let mut r = good.clone();
    let adv = r
        .advertisements
        .iter_mut()
        .find(|a| a.party == party(neighbour))
        .unwrap();
    adv.s_public[0] ^= 1;
    cases.push((r, "bad_signature"));
    // An advertisement of another round, correctly signed.
    let mut r = good.clone();
    let adv = r
        .advertisements
        .iter_mut()
        .find(|a| a.party == party(neighbour))
        .unwrap();
    *adv = Advertisement::sign(
        ROUND + 1,
        adv.party,
        &net.identities[neighbour],
        adv.c_public,
        adv.s_public,
        adv.self_mask_commitment,
    );
    cases.push((r, "wrong_round"));
    // A low-order key, correctly signed (by a colluding neighbour).
    let mut r = good.clone();
    let adv = r
        .advertisements
        .iter_mut()
        .find(|a| a.party == party(neighbour))
        .unwrap();
    *adv = Advertisement::sign(
        ROUND,
        adv.party,
        &net.identities[neighbour],
        adv.c_public,
        [0; 32],
        adv.self_mask_commitment,
    );
    cases.push((r, "weak_key"));
    for (i, (roster, reason)) in cases.into_iter().enumerate() {
        let err = net.clients[me]
            .handle_roster(&roster, &mut net.rng)
            .unwrap_err();
        assert_eq!(err.reason(), reason, "case {i}: {err}");
        assert_eq!(net.clients[me].step(), Step::ShareKeys, "case {i}");
    }
    // A device configured for 31-bit values refuses a cohort of more than 2.
    let mut narrow = SecAggClient::new(
        SecAggConfig {
            bits: 31,
            ..SecAggConfig::default()
        },
        ROUND,
        party(me),
        net.identities[me].clone(),
    )
    .unwrap();
    narrow.advertise(&mut net.rng).unwrap();
    let err = narrow.handle_roster(&good, &mut net.rng).unwrap_err();
    assert_eq!(err.reason(), "invalid_config", "{err}");
    // After all that, the real roster still works.
    let roster = net.roster(me);
    net.clients[me]
        .handle_roster(&roster, &mut net.rng)
        .unwrap();
}

#[test]
fn pinned_identities_are_enforced() {
    let mut net = Net::new(6, SecAggConfig::default());
    let me = 0;
    let mut keys: BTreeMap<PartyId, VerifyingKey> = net
        .identities
        .iter()
        .enumerate()
        .map(|(i, id)| (party(i), id.verifying_key()))
        .collect();
    let neighbour = net.graph.neighbours(me)[0] as usize;
    // The coordinator replaces a neighbour with a device of its own making.
    keys.insert(
        party(neighbour),
        generate_identity(&mut net.rng).verifying_key(),
    );
    net.clients[me].trust_identities(keys.clone());
    let roster = net.roster(me);
    let err = net.clients[me]
        .handle_roster(&roster, &mut net.rng)
        .unwrap_err();
    assert_eq!(
        err,
        SecAggError::UntrustedIdentity {
            party: party(neighbour)
        }
    );
    keys.insert(party(neighbour), net.identities[neighbour].verifying_key());
    net.clients[me].trust_identities(keys);
    net.clients[me]
        .handle_roster(&roster, &mut net.rng)
        .unwrap();
}

#[test]
fn bad_deliveries_are_refused() {
    let n = 12;
    let mut net = Net::new(n, SecAggConfig::default());
    let sent = net.share_all();
    let me = 5;
    let good = delivery(&sent, party(me));
    let threshold = SecAggConfig::default().params(n).unwrap().threshold;
    assert_eq!(good.shares.len(), 8);
    let outsider = (0..n)
        .find(|&j| j != me && !net.graph.are_neighbours(me, j))
        .unwrap();
    // A neighbour of the outsider that is not `me`: its share for the outsider.
    let other = net.graph.neighbours(outsider)[0] as usize;
    let foreign = sent[other]
        .shares
        .iter()
        .find(|e| e.recipient == party(outsider))
        .unwrap()
        .clone();

    let mut cases: Vec<(ShareDelivery, &str)> = vec![
        (
            ShareDelivery {
                round: ROUND + 1,
                ..good.clone()
            },
            "wrong_round",
        ),
        (
            ShareDelivery {
                recipient: party(me + 1),
                ..good.clone()
            },
            "wrong_recipient",
        ),
    ];
    // A share from a device that is not a neighbour.
    let mut d = good.clone();
    d.shares[0] = EncryptedShare {
        sender: party(outsider),
        ..d.shares[0].clone()
    };
    cases.push((d, "not_neighbour"));
    // A share addressed to someone else.
    let mut d = good.clone();
    d.shares.push(foreign.clone());
    cases.push((d, "wrong_recipient"));
    // The same share addressed to someone else, relabelled for `me`.
    let mut d = good.clone();
    d.shares[0] = EncryptedShare {
        recipient: party(me),
        ..foreign
    };
    cases.push((
        d,
        if net.graph.are_neighbours(me, other) {
            "decryption"
        } else {
            "not_neighbour"
        },
    ));
    // A duplicate.
    let mut d = good.clone();
    d.shares.push(d.shares[2].clone());
    cases.push((d, "duplicate"));
    // A bit flip in a ciphertext.
    let mut d = good.clone();
    d.shares[1].ciphertext[5] ^= 0x10;
    cases.push((d, "decryption"));
    // A share of another sender's (relabelled): decrypts under the wrong key.
    let mut d = good.clone();
    d.shares[1].ciphertext = d.shares[2].ciphertext.clone();
    cases.push((d, "decryption"));
    // Fewer than t neighbours' shares.
    let mut d = good.clone();
    d.shares.truncate(threshold - 1);
    cases.push((d, "too_few_shares"));

    for (i, (d, reason)) in cases.into_iter().enumerate() {
        let err = net.clients[me].handle_shares(&d, &[0.5; 4]).unwrap_err();
        assert_eq!(err.reason(), reason, "case {i}: {err}");
        assert_eq!(net.clients[me].step(), Step::MaskedInput);
    }
    let err = net.clients[me]
        .handle_shares(&good, &[0.5, f32::NAN])
        .unwrap_err();
    assert_eq!(err.reason(), "not_finite");
    // Exactly t shares are enough.
    let mut d = good;
    d.shares.truncate(threshold);
    let masked = net.clients[me].handle_shares(&d, &[0.5; 4]).unwrap();
    assert_eq!(masked.values.len(), 4);
}

#[test]
fn unmask_requests_that_could_expose_a_neighbour_are_refused() {
    let n = 12;
    let mut net = Net::new(n, SecAggConfig::default());
    let sent = net.share_all();
    let me = 7;
    net.clients[me]
        .handle_shares(&delivery(&sent, party(me)), &update(me, 4))
        .unwrap();
    let neighbours: Vec<PartyId> = net
        .graph
        .neighbours(me)
        .iter()
        .map(|&j| party(j as usize))
        .collect();
    let outsider = (0..n)
        .find(|&j| j != me && !net.graph.are_neighbours(me, j))
        .unwrap();
    let request = |survivors: Vec<PartyId>, dropped: Vec<PartyId>| UnmaskRequest {
        round: ROUND,
        recipient: party(me),
        survivors,
        dropped,
    };
    let (head, tail) = neighbours.split_at(6);
    let cases = vec![
        (
            UnmaskRequest {
                round: 1,
                ..request(neighbours.clone(), vec![])
            },
            "wrong_round",
        ),
        (
            UnmaskRequest {
                recipient: party(0),
                ..request(neighbours.clone(), vec![])
            },
            "wrong_recipient",
        ),
        // Both kinds of share for one neighbour: refused outright.
        (
            request(neighbours.clone(), vec![neighbours[2]]),
            "conflicting_unmask",
        ),
        (
            request(tail.to_vec(), neighbours.clone()),
            "conflicting_unmask",
        ),
        // Asking this device's own mask key (it sent a masked input).
        (
            request(neighbours.clone(), vec![party(me)]),
            "malformed_unmask",
        ),
        (
            request(neighbours.clone(), vec![party(outsider)]),
            "malformed_unmask",
        ),
        (
            request([neighbours.clone(), vec![neighbours[0]]].concat(), vec![]),
            "malformed_unmask",
        ),
        (request(head.to_vec(), vec![]), "malformed_unmask"),
        // Fewer than t = 6 survivors.
        (
            request(head[..5].to_vec(), [&head[5..], tail].concat()),
            "too_few_survivors",
        ),
    ];
    for (i, (req, reason)) in cases.into_iter().enumerate() {
        let err = net.clients[me].handle_unmask(&req).unwrap_err();
        assert_eq!(err.reason(), reason, "case {i}: {err}");
        assert_eq!(net.clients[me].step(), Step::Unmask);
    }
    // A consistent request: self-mask shares of survivors, mask-key shares of
    // the dropped, never both for one neighbour.
    let response = net.clients[me]
        .handle_unmask(&request(head.to_vec(), tail.to_vec()))
        .unwrap();
    let b: Vec<PartyId> = response.self_mask_shares.iter().map(|r| r.owner).collect();
    let s: Vec<PartyId> = response.mask_key_shares.iter().map(|r| r.owner).collect();
    assert_eq!((b.as_slice(), s.as_slice()), (head, tail));
    let index = net
        .graph
        .share_index(net.graph.index_of(head[0]).unwrap(), me)
        .unwrap();
    assert_eq!(response.self_mask_shares[0].share.index(), index);
}
