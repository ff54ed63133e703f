//! Secure rounds of the core, stepped with simulated time and the devices'
//! real state machines (`fedrec_client::secagg`).

use std::time::{Duration, Instant};

use fedrec_client::secagg::SecAggClient;
use fedrec_proto::secagg::payload::{self, Weighting};
use fedrec_proto::secagg::{Quantizer, SecAggError, crypto};
use fedrec_proto::{EvalCounts, Layout};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::*;
use crate::config::{CoordinatorConfig, Weighting as ConfigWeighting};
use crate::round::{CheckIn, Event, RoundSummary, Task, UpdateHeader};

const VALUES: usize = 5;
const STEP: Duration = Duration::from_secs(10);

fn config(n: usize, weighting: ConfigWeighting) -> CoordinatorConfig {
    let mut c = CoordinatorConfig::default();
    c.rounds.clients_per_round = n;
    c.rounds.rounds = 2;
    c.rounds.evaluate = true;
    c.rounds.final_evaluation = false;
    c.rounds.seed = Some(3);
    c.rounds.deadline_secs = 60.0;
    c.strategy.weighting = weighting;
    c.secure_aggregation.enabled = true;
    c.secure_aggregation.step_secs = STEP.as_secs_f64();
    c.secure_aggregation.max_examples = 10;
    c
}

/// One device: its pseudonym, task, state machine and update.
struct Device {
    pseudonym: Pseudonym,
    task: Task,
    client: SecAggClient,
    update: Vec<f32>,
    examples: u64,
    counts: EvalCounts,
}

impl Device {
    fn party(&self) -> PartyId {
        self.task.secure_aggregation.as_ref().unwrap().party
    }

    /// What this device masks.
    fn input(&self, weighting: Weighting, range: f32) -> Vec<f32> {
        payload::encode(
            &self.update,
            self.examples,
            Some(&self.counts),
            weighting,
            range,
            0.0,
        )
    }
}

struct Cohort {
    core: RoundCore,
    now: Instant,
    rng: ChaCha20Rng,
    devices: Vec<Device>,
    weighting: Weighting,
    quantizer: Quantizer,
}

impl Cohort {
    /// `n` devices in an open secure round.
    fn open(config: CoordinatorConfig) -> Self {
        let n = config.rounds.clients_per_round;
        let layout = Layout::new(vec![("item_bias".into(), vec![VALUES as u64])]);
        let mut core =
            RoundCore::new(config.validated().unwrap(), layout, vec![0.5; VALUES]).unwrap();
        let now = Instant::now();
        let pseudonyms: Vec<Pseudonym> = (0..n).map(|_| core.join(now, None)).collect();
        let mut cohort = Self {
            core,
            now,
            rng: ChaCha20Rng::seed_from_u64(n as u64),
            devices: Vec::new(),
            weighting: Weighting::Uniform,
            quantizer: Quantizer::new(1.0, 20).unwrap(),
        };
        cohort.check_in(&pseudonyms);
        cohort
    }

    /// Checks every device in and makes a state machine for each task.
    fn check_in(&mut self, pseudonyms: &[Pseudonym]) {
        for p in pseudonyms {
            self.core.check_in(self.now, p).unwrap();
        }
        self.devices.clear();
        for (i, p) in pseudonyms.iter().enumerate() {
            let CheckIn::Task(task) = self.core.check_in(self.now, p).unwrap() else {
                panic!("device {i} got no task");
            };
            let secure = task.secure_aggregation.clone().expect("a secure task");
            self.weighting = secure.weighting;
            self.quantizer = secure.config.quantizer().unwrap();
            let identity = crypto::generate_identity(&mut self.rng);
            let client =
                SecAggClient::new(secure.config, task.round.into(), secure.party, identity)
                    .unwrap();
            let update = (0..VALUES)
                .map(|v| ((i * 7 + v * 3) % 11) as f32 / 10.0 - 0.5)
                .collect();
            self.devices.push(Device {
                pseudonym: *p,
                task,
                client,
                update,
                examples: 1 + i as u64 * 3,
                counts: EvalCounts {
                    users: 1,
                    hits_full: (i % 2) as f64,
                    ndcg_full: (i % 2) as f64 * 0.5,
                    hits_sampled: 1.0,
                    ndcg_sampled: 0.25,
                },
            });
        }
    }

    fn round(&self) -> u32 {
        self.devices[0].task.round
    }

    fn advertise(&mut self, which: impl Fn(usize) -> bool) {
        let round = self.round();
        for (i, d) in self
            .devices
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| which(*i))
        {
            let ad = d.client.advertise(&mut self.rng).unwrap();
            self.core
                .secagg_advertise(self.now, &d.pseudonym, round, ad)
                .unwrap_or_else(|e| panic!("device {i}: {e}"));
        }
    }

    fn share(&mut self, which: impl Fn(usize) -> bool) {
        let round = self.round();
        for (i, d) in self
            .devices
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| which(*i))
        {
            let poll = self
                .core
                .secagg_poll(self.now, &d.pseudonym, round, SecureWant::Roster)
                .unwrap();
            let SecurePoll::Roster(roster) = poll else {
                panic!("device {i}: {poll:?}");
            };
            let keys = d.client.handle_roster(&roster, &mut self.rng).unwrap();
            self.core
                .secagg_share_keys(self.now, &d.pseudonym, round, keys)
                .unwrap();
        }
    }

    fn mask(&mut self, which: impl Fn(usize) -> bool) {
        let round = self.round();
        let (weighting, range) = (self.weighting, self.quantizer.range());
        for (i, d) in self
            .devices
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| which(*i))
        {
            let poll = self
                .core
                .secagg_poll(self.now, &d.pseudonym, round, SecureWant::Shares)
                .unwrap();
            let SecurePoll::Shares(delivery) = poll else {
                panic!("device {i}: {poll:?}");
            };
            let input = d.input(weighting, range);
            let masked = d.client.handle_shares(&delivery, &input).unwrap();
            self.core
                .secagg_masked_input(self.now, &d.pseudonym, round, d.task.model_version, &masked)
                .unwrap();
        }
    }

    /// Survivors answer their unmask requests until the step closes.
    fn unmask(&mut self, which: impl Fn(usize) -> bool) {
        let round = self.round();
        for d in self
            .devices
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| which(*i))
            .map(|(_, d)| d)
        {
            match self
                .core
                .secagg_poll(self.now, &d.pseudonym, round, SecureWant::Unmask)
                .unwrap()
            {
                SecurePoll::Unmask(request) => {
                    let response = d.client.handle_unmask(&request).unwrap();
                    self.core
                        .secagg_unmask(self.now, &d.pseudonym, round, response)
                        .unwrap();
                }
                SecurePoll::Wait { .. } => return, // every share is in
                other => panic!("{other:?}"),
            }
        }
    }

    /// Moves the clock past the current step's deadline.
    fn pass_deadline(&mut self) -> Vec<Event> {
        let deadline = self.core.poll_timeout().expect("a step deadline");
        self.now = deadline;
        self.core.poll(self.now)
    }

    /// The wrapping sum of the quantized inputs of `devices`.
    fn expected_sum(&self, devices: &[usize]) -> Vec<u32> {
        let mut sum = vec![0_u32; VALUES + payload::EXTRA_VALUES];
        for &i in devices {
            let input = self.devices[i].input(self.weighting, self.quantizer.range());
            self.quantizer.add_quantized(&input, &mut sum).unwrap();
        }
        sum
    }

    /// The model FedAvg (server_lr 1) makes of that sum.
    fn expected_model(&self, devices: &[usize], before: &[f32]) -> Vec<f32> {
        let sum = self.expected_sum(devices);
        let mut decoded = vec![0.0; sum.len()];
        self.quantizer
            .decode_sum(&sum, devices.len(), &mut decoded)
            .unwrap();
        let totals = payload::decode(
            &decoded,
            devices.len(),
            self.weighting,
            self.quantizer.range(),
        )
        .unwrap();
        before
            .iter()
            .zip(totals.mean())
            .map(|(p, m)| p + 1.0 * m)
            .collect()
    }

    fn last(&self) -> RoundSummary {
        self.core.history().last().cloned().expect("a round ended")
    }
}

fn everyone(_: usize) -> bool {
    true
}

#[test]
fn a_secure_round_applies_exactly_the_unmasked_weighted_mean() {
    for weighting in [ConfigWeighting::Examples, ConfigWeighting::Uniform] {
        let mut c = Cohort::open(config(6, weighting));
        let before = c.core.model().params.clone();
        let d0 = c.devices[0].pseudonym;
        let round = c.round();

        // A plain update is refused in a secure round.
        let header = UpdateHeader {
            pseudonym: d0,
            round,
            model_version: 1,
            num_examples: 1,
            num_values: VALUES as u64,
            evaluation: None,
        };
        let err = c
            .core
            .submit_update(c.now, header, &fedrec_proto::tensor::encode(&[0.0; VALUES]))
            .unwrap_err();
        assert_eq!(err.reason(), "secure_round", "{err}");

        // The roster is not ready before everyone advertised.
        c.advertise(|i| i < 5);
        let poll = c
            .core
            .secagg_poll(c.now, &d0, round, SecureWant::Roster)
            .unwrap();
        assert!(matches!(poll, SecurePoll::Wait { .. }), "{poll:?}");
        c.advertise(|i| i == 5);
        c.share(everyone);
        c.mask(everyone);
        // Too late for a roster now.
        let err = c
            .core
            .secagg_poll(c.now, &d0, round, SecureWant::Roster)
            .unwrap_err();
        assert!(
            err.to_string().contains("not accepted at step unmask"),
            "{err}"
        );

        c.unmask(everyone);
        let job = c.core.take_unmask_job().expect("every share is in");
        assert_eq!(c.core.poll_timeout(), None, "no deadline while unmasking");
        let done = job.run();
        c.core.complete_unmask(c.now, done);

        let all: Vec<usize> = (0..6).collect();
        let sum = c.core.last_secure_sum().expect("a sum").clone();
        assert_eq!(sum.round, round);
        assert_eq!(sum.sum, c.expected_sum(&all), "{weighting:?}");
        assert_eq!(c.core.model().version, 2);
        assert_eq!(
            c.core.model().params,
            c.expected_model(&all, &before),
            "{weighting:?}: bit for bit"
        );
        let s = c.last();
        assert!(s.completed, "{s:?}");
        assert_eq!(s.participants, 6);
        let sa = s.secure_aggregation.expect("a secure summary");
        assert_eq!(
            (sa.selected, sa.advertised, sa.shared, sa.survivors),
            (6, 6, 6, 6)
        );
        // The counts are the cohort's totals.
        assert_eq!(s.evaluation.users, 6);
        assert!(
            (s.evaluation.hits_full - 3.0).abs() < 1e-4,
            "{:?}",
            s.evaluation
        );
        assert!(
            (s.evaluation.ndcg_sampled - 1.5).abs() < 1e-4,
            "{:?}",
            s.evaluation
        );
    }
}

#[test]
fn messages_must_come_from_the_callers_party_and_the_right_step() {
    let mut c = Cohort::open(config(4, ConfigWeighting::Uniform));
    let round = c.round();
    let (d0, d1) = (c.devices[0].pseudonym, c.devices[1].party());
    let mut forged = c.devices[1].client.advertise(&mut c.rng).unwrap();
    let err = c
        .core
        .secagg_advertise(c.now, &d0, round, forged.clone())
        .unwrap_err();
    assert!(
        matches!(err, CoordinatorError::WrongParty { claimed, .. } if claimed == d1),
        "{err}"
    );
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::PermissionDenied
    );
    forged.round += 1;
    let err = c
        .core
        .secagg_advertise(c.now, &c.devices[1].pseudonym.clone(), round + 1, forged)
        .unwrap_err();
    assert_eq!(err.reason(), "wrong_round", "{err}");
    // A stranger is not in the cohort.
    let stranger = c.core.join(c.now, None);
    let err = c
        .core
        .secagg_poll(c.now, &stranger, round, SecureWant::Roster)
        .unwrap_err();
    assert_eq!(err.reason(), "not_in_cohort", "{err}");
    // An unmask response during step 1.
    let response = fedrec_proto::secagg::UnmaskResponse {
        round: round.into(),
        sender: c.devices[0].party(),
        self_mask_shares: vec![],
        mask_key_shares: vec![],
    };
    let err = c
        .core
        .secagg_unmask(c.now, &d0, round, response)
        .unwrap_err();
    assert!(
        matches!(err, CoordinatorError::SecAgg(SecAggError::WrongStep { .. })),
        "{err}"
    );
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::FailedPrecondition
    );
    assert!(c.core.rejections()["wrong_party"] >= 1);
}

#[test]
fn silent_devices_are_left_behind_at_each_step_deadline() {
    // 20 devices: 10 neighbours each, 7 shares needed, so that even a
    // device neighbouring all four silent ones keeps enough share holders.
    let n = 20;
    let mut c = Cohort::open(config(n, ConfigWeighting::Examples));
    let before = c.core.model().params.clone();
    let start = c.now;
    // Device 0 never advertises, 1 never shares, 2 never masks, 3 never unmasks.
    c.advertise(|i| i != 0);
    assert_eq!(c.core.poll_timeout(), Some(start + STEP));
    c.pass_deadline();
    c.share(|i| i > 1);
    c.pass_deadline();
    c.mask(|i| i > 2);
    // The masked-input step (devices train in it) ends at the round's deadline.
    assert_eq!(c.core.poll_timeout(), Some(start + Duration::from_secs(60)));
    c.pass_deadline();
    c.unmask(|i| i > 3);
    let ended = c.core.status().open.is_some();
    assert!(ended, "the round waits for its unmasking job");
    c.core.run_unmask_jobs(c.now);

    let survivors: Vec<usize> = (3..n).collect();
    let sum = c
        .core
        .last_secure_sum()
        .unwrap_or_else(|| panic!("no sum: {:?}", c.last()));
    let parties: Vec<PartyId> = survivors.iter().map(|&i| c.devices[i].party()).collect();
    let mut sorted = parties.clone();
    sorted.sort();
    assert_eq!(sum.survivors, sorted);
    assert_eq!(sum.sum, c.expected_sum(&survivors));
    assert_eq!(c.core.model().params, c.expected_model(&survivors, &before));
    let s = c.last();
    assert!(s.completed, "{s:?}");
    let sa = s.secure_aggregation.unwrap();
    assert_eq!(
        (sa.selected, sa.advertised, sa.shared, sa.survivors),
        (n, n - 1, n - 2, n - 3)
    );
}

#[test]
fn too_few_survivors_abandon_the_round_and_the_next_one_proceeds() {
    let mut c = Cohort::open(config(4, ConfigWeighting::Uniform));
    let before = c.core.model();
    c.advertise(everyone);
    c.share(everyone);
    // Only one masked input arrives: its self mask has too few holders left.
    c.mask(|i| i == 0);
    let events = c.pass_deadline();
    let ended: Vec<&RoundSummary> = events
        .iter()
        .filter_map(|e| match e {
            Event::RoundEnded(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(ended.len(), 1);
    let s = ended[0];
    assert!(!s.completed);
    let reason = s.abandon_reason.as_deref().unwrap();
    assert!(
        reason.starts_with("secure aggregation abandoned"),
        "{reason}"
    );
    assert!(reason.contains("share holders"), "{reason}");
    assert_eq!(
        s.secure_aggregation
            .as_ref()
            .unwrap()
            .abandoned_at
            .as_deref(),
        Some("masked input")
    );
    assert_eq!(c.core.model().version, before.version, "nothing applied");
    assert_eq!(c.core.model().params, before.params);
    assert!(c.core.last_secure_sum().is_none());

    // The next round starts with the same devices and completes.
    let pseudonyms: Vec<Pseudonym> = c.devices.iter().map(|d| d.pseudonym).collect();
    c.check_in(&pseudonyms);
    assert_eq!(c.round(), 2);
    c.advertise(everyone);
    c.share(everyone);
    c.mask(everyone);
    c.unmask(everyone);
    c.core.run_unmask_jobs(c.now);
    assert!(c.last().completed);
    assert_eq!(c.core.model().version, before.version + 1);
}

#[test]
fn a_late_or_foreign_unmasking_result_is_ignored() {
    let mut c = Cohort::open(config(3, ConfigWeighting::Uniform));
    c.advertise(everyone);
    c.share(everyone);
    c.mask(everyone);
    c.unmask(everyone);
    let job = c.core.take_unmask_job().unwrap();
    assert!(c.core.take_unmask_job().is_none(), "one job per round");
    let mut other = job.run();
    other.round += 1;
    c.core.complete_unmask(c.now, other);
    assert!(
        c.core.history().is_empty(),
        "still waiting for its own result"
    );
    c.core
        .fail_unmask(c.now, c.round(), "the task running it failed".into());
    let s = c.last();
    assert!(!s.completed);
    assert_eq!(
        s.abandon_reason.as_deref(),
        Some("the task running it failed")
    );
}
