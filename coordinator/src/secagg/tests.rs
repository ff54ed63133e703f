//! Real devices (`fedrec_client::secagg`) against the coordinator's state
//! machine, with injected drop-outs, malicious messages and a curious
//! coordinator.

use super::*;
use fedrec_client::secagg::SecAggClient;
use fedrec_proto::secagg::crypto::generate_identity;
use fedrec_proto::secagg::{RevealedShare, Secret32};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

const ROUND: u64 = 41;

/// When a device drops out: the last step it completes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dropout {
    Never,
    /// Never advertises.
    BeforeAdvertising,
    /// Advertises, never shares its keys.
    AfterAdvertising,
    /// Shares its keys, never sends its masked input.
    AfterSharing,
    /// Sends its masked input, never answers the unmask request.
    AfterMasking,
}
use Dropout::*;

/// Ids are not indices: spaced, and not starting at 0.
fn party(i: usize) -> PartyId {
    PartyId(7 + 5 * i as u64)
}

fn index(p: PartyId) -> usize {
    (p.0 as usize - 7) / 5
}

/// Everything the coordinator received in a round.
#[derive(Default)]
struct Record {
    advertisements: Vec<Advertisement>,
    share_keys: Vec<ShareKeys>,
    masked: Vec<MaskedInput>,
    responses: Vec<UnmaskResponse>,
}

/// A cohort of devices and a coordinator.
struct Sim {
    rng: ChaCha20Rng,
    config: SecAggConfig,
    coordinator: SecAggRound,
    clients: Vec<SecAggClient>,
    inputs: Vec<Vec<f32>>,
    record: Record,
}

impl Sim {
    fn new(n: usize, dim: usize, config: SecAggConfig, seed: u64) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let coordinator = SecAggRound::new(config.clone(), ROUND, dim, &mut rng).unwrap();
        let clients = (0..n)
            .map(|i| {
                let identity = generate_identity(&mut rng);
                SecAggClient::new(config.clone(), ROUND, party(i), identity).unwrap()
            })
            .collect();
        // Some values beyond the default range of 1.0, to exercise clipping.
        let inputs = (0..n)
            .map(|_| (0..dim).map(|_| rng.random_range(-1.2_f32..1.2)).collect())
            .collect();
        Self {
            rng,
            config,
            coordinator,
            clients,
            inputs,
            record: Record::default(),
        }
    }

    fn quantized(&self, i: usize) -> Vec<u32> {
        let mut q = vec![0; self.inputs[i].len()];
        self.config
            .quantizer()
            .unwrap()
            .quantize_into(&self.inputs[i], &mut q)
            .unwrap();
        q
    }

    /// The wrapping sum of the quantized inputs of `parties`.
    fn expected_sum(&self, parties: &[PartyId]) -> Vec<u32> {
        let mut sum = vec![0_u32; self.inputs[0].len()];
        for &p in parties {
            for (s, q) in sum.iter_mut().zip(self.quantized(index(p))) {
                *s = s.wrapping_add(q);
            }
        }
        sum
    }

    fn advertise(&mut self, dropouts: &[Dropout]) {
        for (i, client) in self.clients.iter_mut().enumerate() {
            if dropouts[i] != BeforeAdvertising {
                let adv = client.advertise(&mut self.rng).unwrap();
                self.record.advertisements.push(adv.clone());
                self.coordinator.handle_advertisement(adv).unwrap();
            }
        }
    }

    fn share(&mut self, parties: &[PartyId], dropouts: &[Dropout]) {
        for &p in parties {
            let i = index(p);
            if dropouts[i] == AfterAdvertising {
                continue;
            }
            let roster = self.coordinator.roster_for(p).unwrap();
            let keys = self.clients[i]
                .handle_roster(&roster, &mut self.rng)
                .unwrap();
            self.record.share_keys.push(keys.clone());
            self.coordinator.handle_share_keys(keys).unwrap();
        }
    }

    fn mask(&mut self, parties: &[PartyId], dropouts: &[Dropout]) {
        for &p in parties {
            let i = index(p);
            if dropouts[i] == AfterSharing {
                continue;
            }
            let delivery = self.coordinator.shares_for(p).unwrap();
            let masked = self.clients[i]
                .handle_shares(&delivery, &self.inputs[i])
                .unwrap();
            self.coordinator.handle_masked_input(&masked).unwrap();
            self.record.masked.push(masked);
        }
    }

    fn unmask(&mut self, parties: &[PartyId], dropouts: &[Dropout]) {
        for &p in parties {
            let i = index(p);
            if dropouts[i] == AfterMasking {
                continue;
            }
            let request = self.coordinator.unmask_request_for(p).unwrap();
            let response = self.clients[i].handle_unmask(&request).unwrap();
            self.record.responses.push(response.clone());
            self.coordinator.handle_unmask_response(response).unwrap();
        }
    }

    /// Steps 1 to 3; returns the survivors.
    fn run_to_unmask(&mut self, dropouts: &[Dropout]) -> Result<Vec<PartyId>, SecAggError> {
        self.advertise(dropouts);
        let parties = self.coordinator.close_advertisements()?;
        self.share(&parties, dropouts);
        let kept = self.coordinator.close_share_keys()?;
        self.mask(&kept, dropouts);
        self.coordinator.close_masked_inputs()
    }

    /// A whole round. Honest devices never refuse anything; only the
    /// coordinator's step closings may abandon the round.
    fn run(&mut self, dropouts: &[Dropout]) -> Result<SecAggOutput, SecAggError> {
        let survivors = self.run_to_unmask(dropouts)?;
        self.unmask(&survivors, dropouts);
        self.coordinator.finish()
    }
}

/// The survivors the protocol must deliver a sum for, computed from the
/// specification alone: `None` when some step leaves a needed secret with
/// fewer than `t` share holders.
fn predicted_survivors(
    graph: &NeighbourGraph,
    t: usize,
    dropouts: &[Dropout],
) -> Option<Vec<PartyId>> {
    let n = graph.len();
    let drop = |i: usize| dropouts[index(graph.party(i))];
    let neighbours = |i: usize| graph.neighbours(i).iter().map(|&j| j as usize);
    // Step 2: those that shared, pruned until each has t sharing neighbours.
    let mut shared: Vec<bool> = (0..n).map(|i| drop(i) != AfterAdvertising).collect();
    loop {
        let weak = (0..n).find(|&i| shared[i] && neighbours(i).filter(|&j| shared[j]).count() < t);
        match weak {
            Some(i) => shared[i] = false,
            None => break,
        }
    }
    let masked: Vec<bool> = (0..n)
        .map(|i| shared[i] && drop(i) != AfterSharing)
        .collect();
    let responded: Vec<bool> = (0..n)
        .map(|i| masked[i] && drop(i) != AfterMasking)
        .collect();
    if !masked.iter().any(|m| *m) {
        return None;
    }
    for holders in [&masked, &responded] {
        for i in (0..n).filter(|&i| shared[i]) {
            let surviving_neighbours = neighbours(i).filter(|&j| masked[j]).count();
            let needed = masked[i] || surviving_neighbours > 0;
            if needed && neighbours(i).filter(|&j| holders[j]).count() < t {
                return None;
            }
        }
    }
    Some(
        (0..n)
            .filter(|&i| masked[i])
            .map(|i| graph.party(i))
            .collect(),
    )
}

/// Runs a round with `dropouts` and checks the outcome against the
/// specification: the exact sum of the right survivors, or abandonment.
/// Returns whether the round succeeded.
fn check_round(n: usize, dim: usize, dropouts: &[Dropout], seed: u64) -> bool {
    let mut sim = Sim::new(n, dim, SecAggConfig::default(), seed);
    let result = sim.run(dropouts);
    let advertised = dropouts.iter().filter(|d| **d != BeforeAdvertising).count();
    let predicted = match sim.coordinator.graph() {
        Some(graph) if advertised >= 2 => {
            predicted_survivors(graph, sim.coordinator.params().unwrap().threshold, dropouts)
        }
        _ => None,
    };
    match (result, predicted) {
        (Ok(output), Some(survivors)) => {
            assert_eq!(
                output.survivors, survivors,
                "n {n} seed {seed} {dropouts:?}"
            );
            assert_eq!(
                output.sum,
                sim.expected_sum(&survivors),
                "n {n} seed {seed}"
            );
            assert_eq!(sim.coordinator.step(), Step::Finished);
            // The masked inputs that arrived are exactly the survivors'.
            let senders: Vec<PartyId> = sim.record.masked.iter().map(|m| m.sender).collect();
            assert_eq!(senders, survivors);
            true
        }
        (Err(SecAggError::Abandoned(reason)), None) => {
            assert_eq!(sim.coordinator.abandoned(), Some(&reason));
            assert_eq!(sim.coordinator.step(), Step::Abandoned);
            assert!(matches!(
                sim.coordinator.finish(),
                Err(SecAggError::Abandoned(_))
            ));
            false
        }
        (result, predicted) => panic!(
            "n {n} seed {seed} {dropouts:?}: got {result:?}, the specification says {predicted:?}"
        ),
    }
}

#[test]
fn exact_sums_without_dropouts() {
    for (n, dim) in [(3, 64), (10, 64), (50, 32), (500, 16)] {
        let mut sim = Sim::new(n, dim, SecAggConfig::default(), n as u64);
        let output = sim.run(&vec![Never; n]).unwrap();
        let everyone: Vec<PartyId> = (0..n).map(party).collect();
        assert_eq!(output.survivors, everyone);
        assert_eq!(output.count(), n);
        assert_eq!(output.sum, sim.expected_sum(&everyone), "n {n}");

        // Decoded, it is the float sum of the clipped inputs within the
        // quantizer's bound.
        let q = sim.config.quantizer().unwrap();
        let decoded = output.decode(&q).unwrap();
        for (v, d) in decoded.iter().enumerate() {
            let exact: f64 = sim
                .inputs
                .iter()
                .map(|x| f64::from(x[v].clamp(-1.0, 1.0)))
                .sum();
            let bound = n as f64 * q.max_error() + exact.abs() * 1e-7 + 1e-6;
            assert!(
                (f64::from(*d) - exact).abs() <= bound,
                "n {n}: {d} vs {exact}"
            );
        }
    }
}

#[test]
fn dropouts_at_every_step() {
    // (n, dimension, [(device, dropout)]).
    type Pattern = (usize, usize, Vec<(usize, Dropout)>);
    let patterns: Vec<Pattern> = vec![
        // Three devices: only a drop before advertising leaves a round (of 2).
        (3, 8, vec![(1, BeforeAdvertising)]),
        (10, 32, vec![(0, BeforeAdvertising), (9, BeforeAdvertising)]),
        (10, 32, vec![(3, AfterAdvertising)]),
        (10, 32, vec![(4, AfterSharing)]),
        (10, 32, vec![(5, AfterMasking)]),
        (10, 32, vec![(2, AfterMasking), (6, AfterMasking)]),
        // Mixed: 9 devices advertise, 8 share, 7 mask, 6 answer; with k = 8
        // and t = 6 one more drop-out would end the round.
        (
            10,
            32,
            vec![(1, BeforeAdvertising), (7, AfterSharing), (8, AfterMasking)],
        ),
        (
            50,
            16,
            vec![
                (10, AfterAdvertising),
                (11, AfterAdvertising),
                (40, AfterSharing),
            ],
        ),
        (
            50,
            16,
            (0..50).step_by(7).map(|i| (i, AfterSharing)).collect(),
        ),
        (
            50,
            16,
            vec![
                (0, BeforeAdvertising),
                (1, AfterAdvertising),
                (2, AfterSharing),
                (3, AfterMasking),
            ],
        ),
        (
            500,
            16,
            (0..500)
                .step_by(23)
                .zip(
                    [
                        BeforeAdvertising,
                        AfterAdvertising,
                        AfterSharing,
                        AfterMasking,
                    ]
                    .iter()
                    .cycle(),
                )
                .map(|(i, d)| (i, *d))
                .collect(),
        ),
    ];
    for (k, (n, dim, drops)) in patterns.into_iter().enumerate() {
        let mut dropouts = vec![Never; n];
        for (i, d) in drops {
            dropouts[i] = d;
        }
        assert!(
            check_round(n, dim, &dropouts, k as u64),
            "pattern {k} should succeed"
        );
    }
    // With three devices every neighbour is needed (k = t = 2).
    for d in [AfterAdvertising, AfterSharing, AfterMasking] {
        let mut dropouts = vec![Never; 3];
        dropouts[0] = d;
        assert!(!check_round(3, 8, &dropouts, 1), "{d:?}");
    }
    // One drop-out of each kind among 10 is one too many.
    let mut dropouts = vec![Never; 10];
    for (i, d) in [
        BeforeAdvertising,
        AfterAdvertising,
        AfterSharing,
        AfterMasking,
    ]
    .into_iter()
    .enumerate()
    {
        dropouts[2 * i + 1] = d;
    }
    assert!(!check_round(10, 8, &dropouts, 2));
}

#[test]
fn randomized_dropout_patterns_follow_the_specification() {
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let (mut succeeded, mut abandoned) = (0, 0);
    for seed in 0..60 {
        let n = rng.random_range(2..40_usize);
        let rate = rng.random_range(0.0..0.3_f64);
        let dropouts: Vec<Dropout> = (0..n)
            .map(|_| {
                if rng.random_bool(rate) {
                    [
                        BeforeAdvertising,
                        AfterAdvertising,
                        AfterSharing,
                        AfterMasking,
                    ][rng.random_range(0..4)]
                } else {
                    Never
                }
            })
            .collect();
        if check_round(n, 8, &dropouts, 1000 + seed) {
            succeeded += 1;
        } else {
            abandoned += 1;
        }
    }
    // Both outcomes occur, so both halves of the check were exercised.
    assert!(
        succeeded > 20 && abandoned > 3,
        "{succeeded} succeeded, {abandoned} abandoned"
    );
}

#[test]
fn too_few_survivors_abandon_the_round_with_a_reason() {
    // A single device advertises.
    let mut dropouts = vec![BeforeAdvertising; 5];
    dropouts[2] = Never;
    let mut sim = Sim::new(5, 4, SecAggConfig::default(), 1);
    let err = sim.run(&dropouts).unwrap_err();
    assert_eq!(
        err,
        SecAggError::Abandoned(AbandonReason::TooFewParties {
            step: Step::Advertise,
            have: 1,
            need: 2
        })
    );
    assert!(err.to_string().contains("only 1 device(s) remain"), "{err}");

    // Half the devices (k = 8, t = 6) drop before sending their masked input.
    let mut dropouts = vec![Never; 10];
    for d in dropouts.iter_mut().take(5) {
        *d = AfterSharing;
    }
    let mut sim = Sim::new(10, 4, SecAggConfig::default(), 2);
    let err = sim.run(&dropouts).unwrap_err();
    let SecAggError::Abandoned(AbandonReason::TooFewShareHolders {
        step,
        have,
        threshold,
        ..
    }) = &err
    else {
        panic!("{err}")
    };
    assert_eq!((*step, *threshold), (Step::MaskedInput, 6));
    assert!(*have < 6);
    assert!(err.to_string().contains("share holders left"), "{err}");
    // Every later call is refused with the same reason; nothing is output.
    let again = sim.coordinator.finish().unwrap_err();
    assert_eq!(again, err);
    assert!(sim.coordinator.unmask_request_for(party(6)).is_err());
    assert_eq!(sim.coordinator.expected(), Some(0));

    // Too few devices share their keys: each has fewer than t sharing
    // neighbours, so pruning removes everyone.
    let mut dropouts = vec![AfterAdvertising; 10];
    dropouts[0] = Never;
    dropouts[1] = Never;
    let mut sim = Sim::new(10, 4, SecAggConfig::default(), 3);
    let err = sim.run(&dropouts).unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::Abandoned(AbandonReason::TooFewParties {
                step: Step::ShareKeys,
                ..
            })
        ),
        "{err}"
    );

    // Survivors that do not answer the unmask request: finish gives up.
    let mut dropouts = vec![Never; 10];
    for d in dropouts.iter_mut().skip(4) {
        *d = AfterMasking;
    }
    let mut sim = Sim::new(10, 4, SecAggConfig::default(), 4);
    let err = sim.run(&dropouts).unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::Abandoned(AbandonReason::TooFewShareHolders {
                step: Step::Unmask,
                secret: SecretKind::SelfMask,
                ..
            })
        ),
        "{err}"
    );
}

/// A reason, for a result that must be an error.
fn reason<T: std::fmt::Debug>(result: Result<T, SecAggError>) -> &'static str {
    result.unwrap_err().reason()
}

#[test]
fn malicious_messages_are_rejected_and_the_honest_sum_survives() {
    let n = 12;
    let dim = 16;
    let mut sim = Sim::new(n, dim, SecAggConfig::default(), 5);
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    // Device 11 drops after sharing, so that some mask keys are revealed.
    let mut dropouts = vec![Never; n];
    dropouts[11] = AfterSharing;

    // ---- Step 1 ----
    let ads: Vec<Advertisement> = sim
        .clients
        .iter_mut()
        .map(|c| c.advertise(&mut sim.rng).unwrap())
        .collect();
    let c = &mut sim.coordinator;
    let mut forged = ads[0].clone();
    forged.c_public[3] ^= 1;
    assert_eq!(reason(c.handle_advertisement(forged)), "bad_signature");
    let stranger = generate_identity(&mut rng);
    let impostor = Advertisement::sign(ROUND, party(0), &stranger, [1; 32], [2; 32], [3; 32]);
    let mut swapped = impostor.clone();
    swapped.identity = ads[0].identity;
    assert_eq!(reason(c.handle_advertisement(swapped)), "bad_signature");
    let other_round =
        Advertisement::sign(ROUND + 1, party(0), &stranger, [1; 32], [2; 32], [3; 32]);
    assert_eq!(reason(c.handle_advertisement(other_round)), "wrong_round");
    let weak = Advertisement::sign(ROUND, party(99), &stranger, [0; 32], [2; 32], [3; 32]);
    assert_eq!(reason(c.handle_advertisement(weak)), "weak_key");
    let too_early = MaskedInput {
        round: ROUND,
        sender: party(0),
        values: vec![0; dim],
    };
    assert_eq!(reason(c.handle_masked_input(&too_early)), "wrong_step");
    assert_eq!(reason(c.roster_for(party(0))), "wrong_step");
    assert_eq!(reason(c.close_share_keys()), "wrong_step");
    assert_eq!(reason(c.finish()), "wrong_step");
    for adv in &ads {
        c.handle_advertisement(adv.clone()).unwrap();
    }
    assert_eq!(reason(c.handle_advertisement(ads[3].clone())), "duplicate");
    assert_eq!(c.received(), n);
    let parties = c.close_advertisements().unwrap();
    assert_eq!(parties.len(), n);

    // ---- Step 2 ----
    assert_eq!(reason(c.handle_advertisement(ads[0].clone())), "wrong_step");
    assert_eq!(reason(c.roster_for(party(50))), "unknown_party");
    let graph = c.graph().unwrap().clone();
    let params = c.params().unwrap();
    let mut sent: Vec<ShareKeys> = Vec::new();
    for i in 0..n {
        let roster = c.roster_for(party(i)).unwrap();
        sent.push(sim.clients[i].handle_roster(&roster, &mut sim.rng).unwrap());
    }
    let honest = sent[0].clone();
    let outsider = (0..n)
        .find(|&j| j != 0 && !graph.are_neighbours(0, j))
        .unwrap();
    let mut bad: Vec<(ShareKeys, &str)> = vec![
        (
            ShareKeys {
                round: 1,
                ..honest.clone()
            },
            "wrong_round",
        ),
        (
            ShareKeys {
                sender: party(70),
                ..honest.clone()
            },
            "unknown_party",
        ),
    ];
    let mut m = honest.clone();
    m.shares[1] = m.shares[0].clone();
    bad.push((m, "duplicate"));
    let mut m = honest.clone();
    m.shares[2].recipient = party(outsider);
    bad.push((m, "not_neighbour"));
    let mut m = honest.clone();
    m.shares[2].sender = party(5);
    bad.push((m, "foreign_share"));
    let mut m = honest.clone();
    m.shares[3].ciphertext.truncate(10);
    bad.push((m, "bad_ciphertext"));
    let mut m = honest.clone();
    m.shares.pop();
    bad.push((m, "incomplete"));
    for (i, (m, why)) in bad.into_iter().enumerate() {
        assert_eq!(reason(c.handle_share_keys(m)), why, "case {i}");
    }
    assert_eq!(c.received(), 0);
    for (i, keys) in sent.iter().enumerate() {
        if dropouts[i] != AfterAdvertising {
            c.handle_share_keys(keys.clone()).unwrap();
        }
    }
    assert_eq!(reason(c.handle_share_keys(honest)), "duplicate");
    assert_eq!(reason(c.shares_for(party(0))), "wrong_step");
    let kept = c.close_share_keys().unwrap();
    assert_eq!(kept.len(), n);

    // ---- Step 3 ----
    assert_eq!(reason(c.handle_share_keys(sent[1].clone())), "wrong_step");
    // A forged share in a delivery: the coordinator cannot tell, the device
    // refuses it, and then takes the real one.
    let mut delivery = c.shares_for(party(0)).unwrap();
    assert_eq!(delivery.shares.len(), params.neighbours);
    delivery.shares[1].ciphertext[20] ^= 0x80;
    assert_eq!(
        reason(sim.clients[0].handle_shares(&delivery, &sim.inputs[0])),
        "decryption"
    );
    let mut masked = Vec::new();
    for (i, dropout) in dropouts.iter().enumerate() {
        if *dropout == AfterSharing {
            continue;
        }
        let delivery = c.shares_for(party(i)).unwrap();
        masked.push(
            sim.clients[i]
                .handle_shares(&delivery, &sim.inputs[i])
                .unwrap(),
        );
    }
    let short = MaskedInput {
        values: vec![1; dim - 1],
        ..masked[0].clone()
    };
    assert_eq!(
        c.handle_masked_input(&short),
        Err(SecAggError::WrongLength {
            expected: dim,
            got: dim - 1
        })
    );
    let unknown = MaskedInput {
        sender: party(40),
        ..masked[0].clone()
    };
    assert_eq!(reason(c.handle_masked_input(&unknown)), "unknown_party");
    for m in &masked {
        c.handle_masked_input(m).unwrap();
    }
    assert_eq!(reason(c.handle_masked_input(&masked[2])), "duplicate");
    assert_eq!(c.received(), n - 1);
    let survivors = c.close_masked_inputs().unwrap();
    assert_eq!(survivors.len(), n - 1);

    // ---- Step 4 ----
    assert_eq!(reason(c.handle_masked_input(&masked[3])), "wrong_step");
    // A dropped device asks to be unmasked.
    assert_eq!(reason(c.unmask_request_for(party(11))), "unknown_party");
    // A survivor that neighbours the dropped device 11.
    let s = (0..11).find(|&i| graph.are_neighbours(i, 11)).unwrap();
    let request = c.unmask_request_for(party(s)).unwrap();
    assert_eq!(request.dropped, vec![party(11)]);
    // The coordinator lies that a survivor dropped too, and lists it in both
    // lists: the honest device refuses to reveal anything.
    let mut lying = request.clone();
    lying.dropped.push(request.survivors[0]);
    assert_eq!(
        reason(sim.clients[s].handle_unmask(&lying)),
        "conflicting_unmask"
    );
    let response = sim.clients[s].handle_unmask(&request).unwrap();
    assert_eq!(response.mask_key_shares.len(), 1);

    let mut bad: Vec<(UnmaskResponse, &str)> = vec![
        (
            UnmaskResponse {
                round: 2,
                ..response.clone()
            },
            "wrong_round",
        ),
        (
            UnmaskResponse {
                sender: party(11),
                ..response.clone()
            },
            "unknown_party",
        ),
    ];
    // A mask-key share of a survivor (would expose its update).
    let mut r = response.clone();
    let moved = r.self_mask_shares.remove(0);
    r.mask_key_shares.push(moved);
    bad.push((r, "mask_key_share_for_survivor"));
    // A self-mask share of the dropped device.
    let mut r = response.clone();
    let moved = r.mask_key_shares.remove(0);
    r.self_mask_shares.push(moved);
    bad.push((r, "self_mask_share_for_dropped"));
    // Both shares for the dropped device.
    let mut r = response.clone();
    r.self_mask_shares.push(RevealedShare {
        owner: party(11),
        share: r.mask_key_shares[0].share.clone(),
    });
    bad.push((r, "self_mask_share_for_dropped"));
    let mut r = response.clone();
    r.self_mask_shares.push(r.self_mask_shares[0].clone());
    bad.push((r, "duplicate"));
    let mut r = response.clone();
    r.self_mask_shares.pop();
    bad.push((r, "incomplete"));
    let mut r = response.clone();
    let share = &r.self_mask_shares[0].share;
    r.self_mask_shares[0].share =
        SecretShare::new(share.index() % 200 + 1, *share.value()).unwrap();
    bad.push((r, "wrong_share_index"));
    let far = (0..11)
        .find(|&j| j != s && !graph.are_neighbours(s, j))
        .unwrap();
    let mut r = response.clone();
    r.self_mask_shares[0].owner = party(far);
    bad.push((r, "not_neighbour"));
    for (i, (r, why)) in bad.into_iter().enumerate() {
        assert_eq!(reason(c.handle_unmask_response(r)), why, "case {i}");
    }
    c.handle_unmask_response(response.clone()).unwrap();
    assert_eq!(reason(c.handle_unmask_response(response)), "duplicate");
    assert!(!c.ready());
    for &p in &survivors {
        if p == party(s) {
            continue;
        }
        let request = c.unmask_request_for(p).unwrap();
        let response = sim.clients[index(p)].handle_unmask(&request).unwrap();
        c.handle_unmask_response(response).unwrap();
    }
    assert!(c.ready());
    let output = c.finish().unwrap();
    assert_eq!(reason(c.finish()), "wrong_step");
    assert_eq!(output.survivors, survivors);
    assert_eq!(output.sum, sim.expected_sum(&survivors));
}

#[test]
fn a_corrupt_revealed_share_is_caught_not_summed() {
    let n = 10;
    let mut sim = Sim::new(n, 8, SecAggConfig::default(), 7);
    let survivors = sim.run_to_unmask(&vec![Never; n]).unwrap();
    for (k, &p) in survivors.iter().enumerate() {
        let request = sim.coordinator.unmask_request_for(p).unwrap();
        let mut response = sim.clients[index(p)].handle_unmask(&request).unwrap();
        if k == 0 {
            // A right-looking share with altered values.
            let s = &response.self_mask_shares[0];
            let mut value = *s.share.value();
            value[0] ^= 1;
            response.self_mask_shares[0].share = SecretShare::new(s.share.index(), value).unwrap();
        }
        sim.coordinator.handle_unmask_response(response).unwrap();
    }
    let err = sim.coordinator.finish().unwrap_err();
    assert!(
        matches!(
            err,
            SecAggError::Abandoned(AbandonReason::ReconstructionMismatch {
                secret: SecretKind::SelfMask,
                ..
            })
        ),
        "{err}"
    );
}

// ---- Privacy -------------------------------------------------------------

/// Pearson correlation of two vectors of codes.
fn correlation(a: &[u32], b: &[u32]) -> f64 {
    let n = a.len() as f64;
    let mean = |v: &[u32]| v.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
    let (ma, mb) = (mean(a), mean(b));
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (f64::from(*x) - ma, f64::from(*y) - mb);
        cov += dx * dy;
        va += dx * dx;
        vb += dy * dy;
    }
    cov / (va * vb).sqrt()
}

/// Checks that `v` looks nothing like the quantized update `q`: not equal,
/// uncorrelated, and (unlike `q`, whose codes are all below 2^bits) spread
/// over the whole ring.
fn assert_hidden(v: &[u32], q: &[u32], bits: u32, what: &str) {
    assert_ne!(v, q, "{what}");
    assert!(
        correlation(v, q).abs() < 0.15,
        "{what}: correlated {}",
        correlation(v, q)
    );
    assert!(q.iter().all(|x| *x < 1 << bits));
    let small = v.iter().filter(|x| **x < 1 << bits).count();
    assert!(
        small <= 5,
        "{what}: {small} of {} values look like codes",
        v.len()
    );
}

/// The pairwise mask seed of `a` (whose mask secret key is `secret`) and `b`.
fn pair_seed(secret: &[u8; 32], a: PartyId, b_public: &[u8; 32], b: PartyId) -> Secret32 {
    let shared = KeyPair::from_secret_bytes(secret)
        .agree(b_public, b)
        .unwrap();
    crypto::mask_seed(&shared, ROUND, a, b)
}

/// Removes `owner`'s pairwise mask with `peer` from `owner`'s masked input.
fn remove_pair_mask(values: &mut [u32], seed: &[u8; 32], owner: PartyId, peer: PartyId) {
    if owner < peer {
        prg::sub_mask(seed, values);
    } else {
        prg::add_mask(seed, values);
    }
}

#[test]
fn the_coordinator_learns_the_sum_but_no_single_update() {
    let n = 10;
    let dim = 1024;
    let config = SecAggConfig::default();
    let bits = config.bits;
    let mut sim = Sim::new(n, dim, config, 8);
    let mut dropouts = vec![Never; n];
    dropouts[4] = AfterSharing;
    let output = sim.run(&dropouts).unwrap();
    let t = sim.coordinator.params().unwrap().threshold;
    let graph = sim.coordinator.graph().unwrap().clone();
    let record = &sim.record;
    let ad = |p: PartyId| record.advertisements.iter().find(|a| a.party == p).unwrap();

    // Everything the coordinator could reconstruct from what it received: the
    // shares it was sent, grouped by owner and kind.
    let mut revealed: BTreeMap<(PartyId, bool), Vec<SecretShare>> = BTreeMap::new();
    for r in &record.responses {
        for s in &r.self_mask_shares {
            revealed
                .entry((s.owner, true))
                .or_default()
                .push(s.share.clone());
        }
        for s in &r.mask_key_shares {
            revealed
                .entry((s.owner, false))
                .or_default()
                .push(s.share.clone());
        }
    }
    // No device has both secrets exposed: survivors only self-mask shares,
    // the dropped device only mask-key shares.
    for i in 0..n {
        let p = party(i);
        let b = revealed.get(&(p, true)).map_or(0, Vec::len);
        let s = revealed.get(&(p, false)).map_or(0, Vec::len);
        assert!(
            b < t || s < t,
            "party {p}: {b} self-mask and {s} mask-key shares"
        );
        if output.survivors.contains(&p) {
            assert_eq!(s, 0, "a survivor's mask key was revealed");
        } else {
            assert_eq!(b, 0, "a dropped device's self mask was revealed");
        }
    }
    let dropped_key = shamir::combine(&revealed[&(party(4), false)], t).unwrap();
    assert_eq!(
        KeyPair::from_secret_bytes(&dropped_key).public(),
        &ad(party(4)).s_public
    );
    // The shares travelled encrypted: no revealed share appears in the
    // ciphertexts the coordinator routed.
    for keys in &record.share_keys {
        for e in &keys.shares {
            for shares in revealed.values() {
                for s in shares {
                    assert!(!e.ciphertext.windows(32).any(|w| w == s.value()));
                }
            }
        }
    }

    for masked in &record.masked {
        let p = masked.sender;
        let q = sim.quantized(index(p));
        assert_hidden(&masked.values, &q, bits, &format!("masked input of {p}"));
        // Remove all the coordinator can: the self mask (reconstructed) and
        // the pairwise mask with the dropped device (its key reconstructed).
        let mut residual = masked.values.clone();
        let b = shamir::combine(&revealed[&(p, true)], t).unwrap();
        prg::sub_mask(&b, &mut residual);
        let me = graph.index_of(p).unwrap();
        if graph.are_neighbours(me, graph.index_of(party(4)).unwrap()) {
            let seed = pair_seed(&dropped_key, party(4), &ad(p).s_public, p);
            remove_pair_mask(&mut residual, &seed, p, party(4));
        }
        // The pairwise masks with surviving neighbours still hide the update.
        assert_hidden(&residual, &q, bits, &format!("unmasked input of {p}"));
    }
    // Yet the sum is exact.
    let survivors: Vec<PartyId> = (0..n).filter(|&i| i != 4).map(party).collect();
    assert_eq!(output.sum, sim.expected_sum(&survivors));
}

/// Steps 1 to 3 of a round of 10 devices, all surviving, from a fixed seed:
/// the same keys and masked inputs every time.
fn sim_at_unmask() -> (Sim, Vec<PartyId>) {
    let mut sim = Sim::new(10, 512, SecAggConfig::default(), 9);
    let survivors = sim.run_to_unmask(&[Never; 10]).unwrap();
    (sim, survivors)
}

/// Asks every survivor to unmask, telling those in `liars_to` that `victim`
/// dropped out (and the others the truth); returns the victim's revealed
/// self-mask and mask-key shares.
fn collect_victim_shares(
    sim: &mut Sim,
    survivors: &[PartyId],
    victim: PartyId,
    liars_to: &[PartyId],
) -> (Vec<SecretShare>, Vec<SecretShare>) {
    let (mut b, mut s) = (Vec::new(), Vec::new());
    for &p in survivors {
        if p == victim {
            continue;
        }
        let mut request = sim.coordinator.unmask_request_for(p).unwrap();
        if liars_to.contains(&p) {
            request.survivors.retain(|x| *x != victim);
            request.dropped.push(victim);
        }
        let response = sim.clients[index(p)].handle_unmask(&request).unwrap();
        b.extend(
            response
                .self_mask_shares
                .into_iter()
                .filter(|r| r.owner == victim)
                .map(|r| r.share),
        );
        s.extend(
            response
                .mask_key_shares
                .into_iter()
                .filter(|r| r.owner == victim)
                .map(|r| r.share),
        );
    }
    (b, s)
}

#[test]
fn a_coordinator_lying_about_dropouts_cannot_unmask_a_survivor() {
    let victim = party(3);
    let q = {
        let (sim, _) = sim_at_unmask();
        sim.quantized(3)
    };
    let bits = SecAggConfig::default().bits;

    // Run A: the coordinator tells every neighbour the victim dropped, and
    // gets its mask key; no self-mask share.
    let (mut a, survivors) = sim_at_unmask();
    let graph = a.coordinator.graph().unwrap().clone();
    let t = a.coordinator.params().unwrap().threshold;
    let k = graph.degree();
    let me = graph.index_of(victim).unwrap();
    let neighbours: Vec<PartyId> = graph
        .neighbours(me)
        .iter()
        .map(|&j| graph.party(j as usize))
        .collect();
    let (b_shares, s_shares) = collect_victim_shares(&mut a, &survivors, victim, &neighbours);
    assert_eq!((b_shares.len(), s_shares.len()), (0, k));
    let secret = shamir::combine(&s_shares, t).unwrap();
    let ad = |p: PartyId| {
        a.record
            .advertisements
            .iter()
            .find(|x| x.party == p)
            .unwrap()
            .clone()
    };
    assert_eq!(
        KeyPair::from_secret_bytes(&secret).public(),
        &ad(victim).s_public
    );
    let masked = a
        .record
        .masked
        .iter()
        .find(|m| m.sender == victim)
        .unwrap()
        .values
        .clone();
    let mut without_pairs = masked.clone();
    for &p in &neighbours {
        let seed = pair_seed(&secret, victim, &ad(p).s_public, p);
        remove_pair_mask(&mut without_pairs, &seed, victim, p);
    }
    // Without the self mask the update is still hidden.
    assert_hidden(&without_pairs, &q, bits, "input without pairwise masks");

    // Run B, identical up to here: the coordinator tells the truth and gets
    // the self-mask seed; no mask-key share.
    let (mut b, survivors) = sim_at_unmask();
    assert_eq!(
        b.record
            .masked
            .iter()
            .find(|m| m.sender == victim)
            .unwrap()
            .values,
        masked
    );
    let (b_shares, s_shares) = collect_victim_shares(&mut b, &survivors, victim, &[]);
    assert_eq!((b_shares.len(), s_shares.len()), (k, 0));
    let seed = shamir::combine(&b_shares, t).unwrap();
    let mut without_self = masked.clone();
    prg::sub_mask(&seed, &mut without_self);
    assert_hidden(&without_self, &q, bits, "input without self mask");

    // Both secrets together would expose the update: this is what the
    // protocol must never let one run reveal.
    let mut exposed = without_pairs;
    prg::sub_mask(&seed, &mut exposed);
    assert_eq!(exposed, q);

    // Run C: the coordinator splits the neighbours, t told the truth and the
    // rest told the victim dropped. Since 2t > k it gets t shares of one
    // secret and fewer than t of the other.
    assert!(2 * t > k);
    let (mut c, survivors) = sim_at_unmask();
    let (b_shares, s_shares) = collect_victim_shares(&mut c, &survivors, victim, &neighbours[t..]);
    assert_eq!((b_shares.len(), s_shares.len()), (t, k - t));
    assert!(shamir::combine(&s_shares, t).is_err());
    let guess = shamir::combine(&s_shares, s_shares.len()).unwrap();
    assert_ne!(
        KeyPair::from_secret_bytes(&guess).public(),
        &ad(victim).s_public
    );
}
