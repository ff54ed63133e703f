//! Unit tests of the round state machine, driven with simulated time.

use std::time::{Duration, Instant};

use fedrec_proto::tensor::encode;

use super::*;
use crate::config::Loss;

const SECOND: Duration = Duration::from_secs(1);

fn layout(n: u64) -> Layout {
    Layout::new(vec![("item_bias".into(), vec![n])])
}

/// `clients_per_round` devices per round, `rounds` rounds, no evaluation, seeded.
fn config(clients_per_round: usize, rounds: u32) -> CoordinatorConfig {
    let mut config = CoordinatorConfig::default();
    config.rounds.clients_per_round = clients_per_round;
    config.rounds.rounds = rounds;
    config.rounds.evaluate = false;
    config.rounds.final_evaluation = false;
    config.rounds.seed = Some(1);
    config.rounds.deadline_secs = 60.0;
    config.rounds.checkin_window_secs = 30.0;
    config
}

fn valid(config: CoordinatorConfig) -> ValidConfig {
    config.validated().unwrap()
}

fn core_with(config: CoordinatorConfig, params: Vec<f32>) -> RoundCore {
    let n = params.len() as u64;
    RoundCore::new(config.validated().unwrap(), layout(n), params).unwrap()
}

fn join(core: &mut RoundCore, now: Instant, n: usize) -> Vec<Pseudonym> {
    (0..n).map(|_| core.join(now, None)).collect()
}

/// Checks every device in; returns the tasks of those selected.
fn check_in_all(
    core: &mut RoundCore,
    now: Instant,
    devices: &[Pseudonym],
) -> Vec<(Pseudonym, Task)> {
    for d in devices {
        core.check_in(now, d).unwrap();
    }
    devices
        .iter()
        .filter_map(|d| match core.check_in(now, d).unwrap() {
            CheckIn::Task(t) => Some((*d, t)),
            _ => None,
        })
        .collect()
}

fn header(pseudonym: Pseudonym, task: &Task, num_examples: u64, num_values: u64) -> UpdateHeader {
    UpdateHeader {
        pseudonym,
        round: task.round,
        model_version: task.model_version,
        num_examples,
        num_values,
        evaluation: None,
    }
}

fn ended(events: &[Event]) -> Vec<RoundSummary> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::RoundEnded(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn pseudonyms_are_hex_and_parse_back() {
    let mut core = core_with(config(1, 0), vec![0.0]);
    let p = core.join(Instant::now(), None);
    let text = p.to_string();
    assert_eq!(text.len(), 32);
    assert!(
        text.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    );
    assert_eq!(text.parse::<Pseudonym>().unwrap(), p);
    assert!("xyz".parse::<Pseudonym>().is_err());
    assert!("zz".repeat(16).parse::<Pseudonym>().is_err());
    assert!("é".repeat(16).parse::<Pseudonym>().is_err());
    // `from_str_radix` alone would accept a sign.
    assert!("+f".repeat(16).parse::<Pseudonym>().is_err());
}

#[test]
fn new_rejects_bad_models() {
    let err = RoundCore::new(valid(config(1, 0)), layout(3), vec![0.0; 2]).unwrap_err();
    assert!(
        err.to_string().contains("3 values, but 2 parameters"),
        "{err}"
    );
    let err = RoundCore::new(valid(config(1, 0)), layout(2), vec![0.0, f32::NAN]).unwrap_err();
    assert!(err.to_string().contains("index 1"), "{err}");
    let mut bad = config(1, 0);
    bad.rounds.clients_per_round = 0;
    assert!(bad.validated().is_err());
}

#[test]
fn full_round_applies_the_weighted_mean_exactly() {
    let mut core = core_with(config(3, 0), vec![1.0, 2.0, 3.0, 4.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 3);
    // The first two wait; the third fills the cohort.
    assert!(matches!(
        core.check_in(t0, &devices[0]).unwrap(),
        CheckIn::Wait { .. }
    ));
    assert!(matches!(
        core.check_in(t0, &devices[1]).unwrap(),
        CheckIn::Wait { .. }
    ));
    let tasks = check_in_all(&mut core, t0, &devices);
    assert_eq!(tasks.len(), 3);
    let task = &tasks[0].1;
    assert_eq!(
        (task.kind, task.round, task.model_version),
        (TaskKind::Train, 1, 1)
    );
    assert_eq!(task.deadline, t0 + 60 * SECOND);
    assert_eq!(task.training, config(3, 0).training);
    assert!(!task.evaluate);

    let deltas = [
        [1.0, 0.0, -1.0, 0.5],
        [0.0, 2.0, 1.0, 0.5],
        [-1.0, 1.0, 0.0, 0.5],
    ];
    let weights = [1, 2, 1];
    let t1 = t0 + 5 * SECOND;
    for (i, ((device, task), (delta, weight))) in
        tasks.iter().zip(deltas.iter().zip(weights)).enumerate()
    {
        let accepted = core
            .submit_update(t1, header(*device, task, weight, 4), &encode(delta))
            .unwrap();
        assert_eq!(
            accepted,
            UpdateAccepted {
                round: 1,
                accepted: i + 1
            }
        );
    }
    let events = core.poll(t1);
    let summaries = ended(&events);
    assert_eq!(summaries.len(), 1);
    let s = &summaries[0];
    assert!(s.completed, "{s:?}");
    assert_eq!(
        (s.round, s.kind, s.model_version, s.selected, s.participants),
        (1, TaskKind::Train, 2, 3, 3)
    );
    assert_eq!(s.seconds, 5.0);
    assert_eq!(s.abandon_reason, None);
    // Mean = (1·d0 + 2·d1 + 1·d2) / 4 = [0, 1.25, 0.25, 0.5]
    let model = core.model();
    assert_eq!(model.version, 2);
    assert_eq!(model.params, vec![1.0, 3.25, 3.25, 4.5]);
    assert_eq!(model.download.decode(), model.params);
    assert_eq!(core.history(), &summaries[..]);
    assert!(core.rejections().is_empty());
    assert_eq!(core.status().open, None);
    // Rounds = 0: run forever.
    assert_eq!(core.finished(), None);
}

/// One device cannot set the round's mean by claiming a huge example count
/// (issue 19, item 2): its weight is capped at `strategy.max_examples`.
#[test]
fn an_extreme_example_count_weighs_at_most_max_examples() {
    let mut cfg = config(2, 0);
    cfg.strategy.max_examples = 100;
    let mut core = core_with(cfg, vec![0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 2);
    let tasks = check_in_all(&mut core, t0, &devices);
    let claims = [(1_000_000_000_000_000, 10.0), (100, -10.0)];
    for ((device, task), (examples, delta)) in tasks.iter().zip(claims) {
        core.submit_update(t0, header(*device, task, examples, 1), &encode(&[delta]))
            .unwrap();
    }
    assert!(ended(&core.poll(t0))[0].completed);
    // Both weigh 100: the mean is 0, not (nearly) the claimer's 10.
    assert_eq!(core.model().params, vec![0.0]);
}

/// Cohorts of 2 under the ALS loss: λ = 0.5, lr = 1, uniform weighting.
fn als_config() -> CoordinatorConfig {
    let mut cfg = config(2, 0);
    cfg.training.loss = Loss::Als;
    cfg.training.regularization = 0.5;
    cfg.training.learning_rate = 1.0;
    cfg.strategy.weighting = crate::config::Weighting::Uniform;
    cfg
}

#[test]
fn als_rounds_add_the_item_regularization_share() {
    // Under the ALS loss the round's mean gains -lr · 2λ q / N, N the joined
    // devices (here 4, of which 2 are in the cohort), before the strategy.
    let mut core = core_with(als_config(), vec![2.0, -4.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 4);
    let tasks = check_in_all(&mut core, t0, &devices);
    assert_eq!(tasks.len(), 2);
    for ((device, task), delta) in tasks.iter().zip([[1.0, 0.0], [0.0, 1.0]]) {
        core.submit_update(t0, header(*device, task, 1, 2), &encode(&delta))
            .unwrap();
    }
    assert!(ended(&core.poll(t0))[0].completed);
    // Mean [0.5, 0.5]; share 2 · 0.5 / 4 = 0.25 of q = [2, -4]: [-0.5, 1].
    assert_eq!(core.model().params, vec![2.0 + 0.5 - 0.5, -4.0 + 0.5 + 1.0]);

    // Under BPR nothing is added.
    let mut core = core_with(config(2, 0), vec![2.0, -4.0]);
    let devices = join(&mut core, t0, 4);
    let tasks = check_in_all(&mut core, t0, &devices);
    for ((device, task), delta) in tasks.iter().zip([[1.0, 0.0], [1.0, 0.0]]) {
        core.submit_update(t0, header(*device, task, 1, 2), &encode(&delta))
            .unwrap();
    }
    assert!(ended(&core.poll(t0))[0].completed);
    assert_eq!(core.model().params, vec![3.0, -4.0]);
}

#[test]
fn the_als_strategy_steps_with_the_cohorts_curvature() {
    // One item of k = 2 factors and its bias; N = 4 joined devices, 2 in
    // the cohort; λ = 0.5, lr = 1, η = 1.
    let mut cfg = als_config();
    cfg.strategy.name = crate::config::StrategyName::Als;
    cfg.strategy.server_lr = 1.0;
    let matrix = Layout::new(vec![("q".into(), vec![1, 2]), ("b".into(), vec![1])]);
    let mut core = RoundCore::new(valid(cfg.clone()), matrix, vec![2.0, -4.0, 0.0]).unwrap();
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 4);
    let tasks = check_in_all(&mut core, t0, &devices);
    assert!(tasks.iter().all(|(_, t)| t.user_moment));
    // The model's 3 values alone are refused: 3 more (x xᵀ) must follow.
    let (device, task) = &tasks[0];
    assert!(matches!(
        core.submit_update(t0, header(*device, task, 1, 3), &encode(&[0.0; 3])),
        Err(CoordinatorError::WrongNumValues {
            expected: 6,
            got: 3
        })
    ));
    // Updates, each followed by x xᵀ's upper triangle: x = [1, 0], then [0, 1].
    let updates = [
        [1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
    ];
    for ((device, task), update) in tasks.iter().zip(updates) {
        core.submit_update(t0, header(*device, task, 1, 6), &encode(&update))
            .unwrap();
    }
    assert!(ended(&core.poll(t0))[0].completed);
    // Mean gradient [0.5, 0.5], minus the regularization share
    // 2λ/N q = 0.25 [2, -4]: Δ = [0, 1.5]. M = diag(0.5, 0.5), so
    // H = 2M + 2λ/N I = 1.25 I and q = [2, -4] + [0, 1.5] / 1.25.
    let q = &core.model().params;
    assert!(
        (q[0] - 2.0).abs() < 1e-6 && (q[1] + 2.8).abs() < 1e-6,
        "{q:?}"
    );
    assert_eq!(q[2], 0.0);
    assert_eq!(q.len(), 3, "x xᵀ never enters the model");

    // A malformed x xᵀ that makes the cohort's curvature indefinite
    // abandons the round and leaves the model as it was.
    let before = core.model().params.clone();
    let tasks = check_in_all(&mut core, t0, &devices);
    let updates = [
        [1.0, 0.0, 0.0, 1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0, -50.0, 0.0],
    ];
    for ((device, task), update) in tasks.iter().zip(updates) {
        core.submit_update(t0, header(*device, task, 1, 6), &encode(&update))
            .unwrap();
    }
    let summary = &ended(&core.poll(t0))[0];
    assert!(!summary.completed);
    let reason = summary.abandon_reason.as_deref().unwrap_or_default();
    assert!(reason.contains("positive semidefinite"), "{reason}");
    assert_eq!(core.model().params, before);

    // A model without an item matrix cannot take the step.
    let err = RoundCore::new(valid(cfg), layout(3), vec![0.0; 3]).unwrap_err();
    assert!(err.to_string().contains("matrix"), "{err}");
}

#[test]
fn cohort_sampling_is_deterministic_per_seed() {
    /// Round 1 takes the first 5 devices; the other 15 wait meanwhile, so
    /// round 2 samples 5 of 15. Returns round 2's cohort as join indices.
    fn second_cohort(seed: u64) -> Vec<usize> {
        let mut config = config(5, 0);
        config.rounds.seed = Some(seed);
        let mut core = core_with(config, vec![0.0]);
        let t0 = Instant::now();
        let devices = join(&mut core, t0, 20);
        let first = check_in_all(&mut core, t0, &devices[..5]);
        assert_eq!(first.len(), 5);
        for d in &devices[5..] {
            assert!(matches!(
                core.check_in(t0, d).unwrap(),
                CheckIn::Wait { .. }
            ));
        }
        for (device, task) in &first {
            core.submit_update(t0, header(*device, task, 1, 1), &encode(&[0.0]))
                .unwrap();
        }
        let second = check_in_all(&mut core, t0, &devices[5..]);
        assert!(second.iter().all(|(_, t)| t.round == 2));
        second
            .iter()
            .map(|(p, _)| devices.iter().position(|d| d == p).unwrap())
            .collect()
    }
    let a = second_cohort(11);
    assert_eq!(a.len(), 5);
    assert_eq!(a, second_cohort(11));
    assert_ne!(a, second_cohort(12));
}

#[test]
fn fraction_mode_starts_when_everyone_waits() {
    let run = |seed: u64| {
        let mut config = config(4, 0);
        config.rounds.seed = Some(seed);
        config.rounds.fraction = Some(0.4);
        let mut core = core_with(config, vec![0.0]);
        let t0 = Instant::now();
        let devices = join(&mut core, t0, 10);
        for d in &devices[..9] {
            assert!(matches!(
                core.check_in(t0, d).unwrap(),
                CheckIn::Wait { .. }
            ));
        }
        // The tenth check-in: every joined device waits; ceil(0.4 · 10) = 4 selected.
        let tasks = check_in_all(&mut core, t0, &devices);
        tasks
            .iter()
            .map(|(p, _)| devices.iter().position(|d| d == p).unwrap())
            .collect::<Vec<_>>()
    };
    let a = run(3);
    assert_eq!(a.len(), 4);
    assert_eq!(a, run(3));
}

#[test]
fn silent_device_round_completes_at_the_deadline() {
    let mut config = config(3, 0);
    config.rounds.min_updates = 2;
    let mut core = core_with(config, vec![0.0, 0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 3);
    let tasks = check_in_all(&mut core, t0, &devices);
    assert_eq!(tasks.len(), 3);
    for (device, task) in &tasks[..2] {
        core.submit_update(
            t0 + SECOND,
            header(*device, task, 1, 2),
            &encode(&[1.0, -1.0]),
        )
        .unwrap();
    }
    assert!(ended(&core.poll(t0 + 59 * SECOND)).is_empty());
    assert_eq!(core.poll_timeout(), Some(t0 + 60 * SECOND));
    let summaries = ended(&core.poll(t0 + 60 * SECOND));
    assert_eq!(summaries.len(), 1);
    assert!(summaries[0].completed);
    assert_eq!((summaries[0].selected, summaries[0].participants), (3, 2));
    assert_eq!(core.model().params, vec![1.0, -1.0]);

    // The silent device comes back late: the round is closed.
    let (late, task) = &tasks[2];
    let err = core
        .submit_update(
            t0 + 61 * SECOND,
            header(*late, task, 1, 2),
            &encode(&[5.0, 5.0]),
        )
        .unwrap_err();
    assert_eq!(err.reason(), "round_closed");
    assert_eq!(core.model().params, vec![1.0, -1.0]);
}

#[test]
fn too_few_updates_at_the_deadline_abandon_the_round_and_the_next_starts() {
    let mut config = config(2, 0);
    config.rounds.min_updates = 2;
    let mut core = core_with(config, vec![0.5]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 2);
    let tasks = check_in_all(&mut core, t0, &devices);
    let (device, task) = &tasks[0];
    core.submit_update(t0 + SECOND, header(*device, task, 3, 1), &encode(&[1.0]))
        .unwrap();
    let events = core.poll(t0 + 60 * SECOND);
    let s = &ended(&events)[0];
    assert!(!s.completed);
    let reason = s.abandon_reason.as_deref().unwrap();
    assert!(reason.contains("only 1 of 2"), "{reason}");
    assert_eq!(s.model_version, 1);
    let model = core.model();
    assert_eq!((model.version, model.params.clone()), (1, vec![0.5]));

    // Both check in again: round 2 starts on the same model.
    let tasks = check_in_all(&mut core, t0 + 61 * SECOND, &devices);
    assert_eq!(tasks.len(), 2);
    assert_eq!((tasks[0].1.round, tasks[0].1.model_version), (2, 1));
    assert_eq!(core.status().round, 2);
}

#[test]
fn over_selection_completes_at_clients_per_round() {
    let mut config = config(2, 0);
    config.rounds.over_selection = 1.5;
    let mut core = core_with(config, vec![0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 3);
    let tasks = check_in_all(&mut core, t0, &devices);
    assert_eq!(tasks.len(), 3, "ceil(2 · 1.5) = 3 selected");
    for (device, task) in &tasks[..2] {
        core.submit_update(t0 + SECOND, header(*device, task, 1, 1), &encode(&[2.0]))
            .unwrap();
    }
    // Completed by the second update, without waiting for the deadline.
    let s = &core.history()[0];
    assert!(s.completed);
    assert_eq!((s.selected, s.participants), (3, 2));
    assert_eq!(core.model().params, vec![2.0]);
    let (straggler, task) = &tasks[2];
    let err = core
        .submit_update(
            t0 + 2 * SECOND,
            header(*straggler, task, 1, 1),
            &encode(&[9.0]),
        )
        .unwrap_err();
    assert!(
        matches!(err, CoordinatorError::RoundClosed { round: 1 }),
        "{err}"
    );
    assert_eq!(core.rejections().get("round_closed"), Some(&1));
}

#[test]
fn window_starts_a_smaller_round() {
    let mut config = config(5, 0);
    config.rounds.min_updates = 2;
    let mut core = core_with(config, vec![0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 3);
    core.check_in(t0, &devices[0]).unwrap();
    assert_eq!(
        core.poll_timeout(),
        None,
        "one waiting device is below min_updates"
    );
    core.check_in(t0 + 10 * SECOND, &devices[1]).unwrap();
    // The window counts from the first waiting device.
    assert_eq!(core.poll_timeout(), Some(t0 + 30 * SECOND));
    assert!(core.poll(t0 + 29 * SECOND).is_empty());
    let events = core.poll(t0 + 30 * SECOND);
    assert!(
        matches!(
            events[..],
            [Event::RoundStarted {
                round: 1,
                selected: 2,
                ..
            }]
        ),
        "{events:?}"
    );
    // The third device arrives during the round and waits for the next one.
    assert!(matches!(
        core.check_in(t0 + 31 * SECOND, &devices[2]).unwrap(),
        CheckIn::Wait { .. }
    ));
}

#[test]
fn window_ends_once_every_joined_device_waits() {
    // One device, three wanted: it does not wait out the window.
    let mut core = core_with(config(3, 2), vec![0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 1);
    core.check_in(t0, &devices[0]).unwrap();
    // Joins quiet for JOIN_SETTLE: the window ends then, not after 30 s.
    assert_eq!(core.poll_timeout(), Some(t0 + JOIN_SETTLE));
    let tasks = check_in_all(&mut core, t0 + JOIN_SETTLE, &devices);
    assert_eq!(tasks.len(), 1, "the only device is selected");
    // Over-selection keeps its meaning while devices are missing: with two
    // joined and one waiting, the round waits for the window.
    let mut c = config(3, 2);
    c.rounds.over_selection = 1.5;
    let mut core = core_with(c, vec![0.0]);
    let devices = join(&mut core, t0, 2);
    core.check_in(t0, &devices[0]).unwrap();
    assert_eq!(core.poll_timeout(), Some(t0 + 30 * SECOND));
    assert!(core.poll(t0 + 29 * SECOND).is_empty());
    // Both waiting: the round starts with both, before the window ends.
    let tasks = check_in_all(&mut core, t0 + 2 * SECOND, &devices);
    assert_eq!(tasks.len(), 2);
}

#[test]
fn wait_suggests_the_next_timer() {
    let mut core = core_with(config(2, 0), vec![0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 3);
    match core.check_in(t0, &devices[0]).unwrap() {
        CheckIn::Wait { retry_after } => assert_eq!(retry_after, Duration::from_secs(10)),
        other => panic!("{other:?}"),
    }
    check_in_all(&mut core, t0, &devices[..2]);
    // Round 1 is open with devices 0 and 1; device 2 waits until at most the deadline.
    match core.check_in(t0 + 55 * SECOND, &devices[2]).unwrap() {
        CheckIn::Wait { retry_after } => assert_eq!(retry_after, 5 * SECOND),
        other => panic!("{other:?}"),
    }
}

#[test]
fn final_evaluation_with_everyone_then_finished() {
    let mut config = config(2, 2);
    config.rounds.final_evaluation = true;
    config.rounds.evaluate = true;
    let mut core = core_with(config, vec![0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 3);
    let counts = EvalCounts {
        users: 1,
        hits_full: 1.0,
        ndcg_full: 0.5,
        hits_sampled: 1.0,
        ndcg_sampled: 0.75,
    };
    let mut now = t0;
    for round in 1..=2 {
        let tasks = check_in_all(&mut core, now, &devices);
        assert_eq!(tasks.len(), 2);
        for (device, task) in &tasks {
            assert_eq!((task.round, task.kind), (round, TaskKind::Train));
            assert!(task.evaluate);
            let mut h = header(*device, task, 1, 1);
            h.evaluation = Some(counts);
            core.submit_update(now, h, &encode(&[1.0])).unwrap();
        }
        let s = core.history().last().unwrap().clone();
        assert!(s.completed);
        assert_eq!(s.evaluation.users, 2);
        assert_eq!(s.evaluation.ndcg_sampled, 1.5);
        now += SECOND;
    }
    assert_eq!(core.finished(), None);
    // After the last training round: an evaluation round with all three devices.
    let tasks = check_in_all(&mut core, now, &devices);
    assert_eq!(tasks.len(), 3);
    for (device, task) in &tasks {
        assert_eq!(
            (task.round, task.kind, task.model_version),
            (3, TaskKind::Evaluate, 3)
        );
        // An update is the wrong kind of result in an evaluation round.
        let err = core
            .submit_update(now, header(*device, task, 1, 1), &encode(&[1.0]))
            .unwrap_err();
        assert_eq!(err.reason(), "wrong_task_kind");
        core.submit_evaluation(now, device, task.round, task.model_version, counts)
            .unwrap();
    }
    let events = core.poll(now);
    let s = core.history().last().unwrap();
    assert_eq!(
        (s.kind, s.completed, s.participants, s.model_version),
        (TaskKind::Evaluate, true, 3, 3)
    );
    assert_eq!(s.evaluation.users, 3);
    assert_eq!(s.evaluation.hit_rate_full(), Some(1.0));
    let reason = core.finished().unwrap().to_owned();
    assert!(reason.contains("final evaluation"), "{reason}");
    assert!(events.contains(&Event::Finished {
        reason: reason.clone()
    }));
    assert!(matches!(
        core.check_in(now, &devices[0]).unwrap(),
        CheckIn::Finished { .. }
    ));
    assert_eq!(core.poll_timeout(), None);
    assert!(core.status().finished);
}

#[test]
fn finished_after_rounds_without_final_evaluation() {
    let mut core = core_with(config(1, 2), vec![0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 1);
    for _ in 0..2 {
        let tasks = check_in_all(&mut core, t0, &devices);
        let (device, task) = &tasks[0];
        core.submit_update(t0, header(*device, task, 1, 1), &encode(&[1.0]))
            .unwrap();
    }
    assert_eq!(core.finished(), Some("completed 2 training rounds"));
    assert_eq!(core.model().params, vec![2.0]);
    assert_eq!(core.history().len(), 2);
}

#[test]
fn final_evaluation_starts_after_the_window_without_absent_devices() {
    let mut config = config(2, 1);
    config.rounds.final_evaluation = true;
    let mut core = core_with(config, vec![0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 2);
    for (device, task) in check_in_all(&mut core, t0, &devices) {
        core.submit_update(t0, header(device, &task, 1, 1), &encode(&[1.0]))
            .unwrap();
    }
    // Only device 0 comes back; the evaluation round waits for device 1 until the window passes.
    assert!(matches!(
        core.check_in(t0, &devices[0]).unwrap(),
        CheckIn::Wait { .. }
    ));
    assert_eq!(core.poll_timeout(), Some(t0 + 30 * SECOND));
    let events = core.poll(t0 + 30 * SECOND);
    assert!(
        events.contains(&Event::RoundStarted {
            round: 2,
            kind: TaskKind::Evaluate,
            model_version: 2,
            selected: 1
        }),
        "{events:?}"
    );
}

/// A core with round 1 open: devices[0] and devices[1] selected, devices[2]
/// joined but not selected, model of 3 values.
fn open_round() -> (RoundCore, Vec<Pseudonym>, Task, Instant) {
    let mut core = core_with(config(2, 0), vec![1.0, 2.0, 3.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 3);
    let tasks = check_in_all(&mut core, t0, &devices[..2]);
    assert_eq!(tasks.len(), 2);
    let task = tasks[0].1.clone();
    (core, devices, task, t0)
}

#[test]
fn bad_updates_are_rejected_with_their_reason_and_change_nothing() {
    let (mut core, devices, task, t0) = open_round();
    let stranger: Pseudonym = "00".repeat(16).parse().unwrap();
    let good = encode(&[1.0, 1.0, 1.0]);
    let h = |p: Pseudonym| header(p, &task, 1, 3);
    let nan = encode(&[1.0, f32::NAN, 1.0]);
    let inf = encode(&[f32::INFINITY, 1.0, 1.0]);
    let cases: Vec<(UpdateHeader, Vec<u8>, &str, &str)> = vec![
        (
            h(stranger),
            good.to_vec(),
            "unknown_pseudonym",
            "unknown pseudonym",
        ),
        (
            UpdateHeader {
                round: 2,
                ..h(devices[0])
            },
            good.to_vec(),
            "wrong_round",
            "update is for round 2, but round 1 is open",
        ),
        (
            UpdateHeader {
                model_version: 7,
                ..h(devices[0])
            },
            good.to_vec(),
            "wrong_model_version",
            "model version 7, but the current version is 1",
        ),
        (
            h(devices[2]),
            good.to_vec(),
            "not_in_cohort",
            "not in the cohort of round 1",
        ),
        (
            UpdateHeader {
                num_values: 4,
                ..h(devices[0])
            },
            good.to_vec(),
            "wrong_num_values",
            "announces 4 values, but the model has 3",
        ),
        (
            h(devices[0]),
            encode(&[1.0, 1.0]).to_vec(),
            "wrong_length",
            "expected 3 values, got 2",
        ),
        (h(devices[0]), good[..11].to_vec(), "misaligned", "11 bytes"),
        (
            h(devices[0]),
            nan.to_vec(),
            "not_finite",
            "index 1 is not finite (NaN)",
        ),
        (
            h(devices[0]),
            inf.to_vec(),
            "not_finite",
            "index 0 is not finite (inf)",
        ),
        (
            UpdateHeader {
                num_examples: 0,
                ..h(devices[0])
            },
            good.to_vec(),
            "zero_examples",
            "num_examples must be >= 1, got 0",
        ),
        (
            UpdateHeader {
                evaluation: Some(EvalCounts {
                    users: 1,
                    hits_full: -1.0,
                    ..EvalCounts::default()
                }),
                ..h(devices[0])
            },
            good.to_vec(),
            "bad_evaluation",
            "hits_full",
        ),
    ];
    let n = cases.len();
    for (header, values, reason, message) in cases {
        let err = core
            .submit_update(t0 + SECOND, header, &values)
            .unwrap_err();
        assert_eq!(err.reason(), reason, "{err}");
        assert!(
            err.to_string().contains(message),
            "{err:?} should mention {message:?}"
        );
        assert_eq!(core.status().accepted, 0);
    }
    assert_eq!(core.rejections().values().sum::<u64>(), n as u64);
    assert_eq!(core.rejections().get("not_finite"), Some(&2));

    // A good update after the bad ones counts; a second one is a duplicate.
    assert_eq!(
        core.submit_update(t0 + SECOND, h(devices[0]), &good)
            .unwrap()
            .accepted,
        1
    );
    let err = core
        .submit_update(t0 + SECOND, h(devices[0]), &good)
        .unwrap_err();
    assert!(
        matches!(err, CoordinatorError::Duplicate { round: 1 }),
        "{err}"
    );
    // An evaluation report in a training round is the wrong kind.
    let err = core
        .submit_evaluation(t0 + SECOND, &devices[1], 1, 1, EvalCounts::default())
        .unwrap_err();
    assert_eq!(err.reason(), "wrong_task_kind");
    core.submit_update(t0 + SECOND, h(devices[1]), &encode(&[3.0, 3.0, 3.0]))
        .unwrap();
    let model = core.model();
    // Only the two good updates count: mean [2, 2, 2].
    assert_eq!(model.params, vec![3.0, 4.0, 5.0]);
    assert!(model.params.iter().all(|v| v.is_finite()));
    assert_eq!(core.rejections().get("duplicate"), Some(&1));
}

#[test]
fn no_round_open_and_closed_round() {
    let mut core = core_with(config(2, 0), vec![0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 2);
    let h = UpdateHeader {
        pseudonym: devices[0],
        round: 1,
        model_version: 1,
        num_examples: 1,
        num_values: 1,
        evaluation: None,
    };
    let err = core
        .submit_update(t0, h.clone(), &encode(&[1.0]))
        .unwrap_err();
    assert_eq!(err.to_string(), "no round is open (request is for round 1)");
    let err = core.check_update_header(t0, &h).unwrap_err();
    assert_eq!(err.reason(), "no_round_open");
    assert_eq!(core.rejections().get("no_round_open"), Some(&2));
    let err = core
        .check_in(t0, &"ab".repeat(16).parse().unwrap())
        .unwrap_err();
    assert_eq!(err.reason(), "unknown_pseudonym");
    let err = core.download(&devices[0], 2).unwrap_err();
    assert_eq!(err.reason(), "wrong_model_version");
    assert_eq!(core.download(&devices[0], 1).unwrap().version, 1);
}

#[test]
fn check_update_header_gives_the_deadline() {
    let (mut core, devices, task, t0) = open_round();
    let deadline = core
        .check_update_header(t0, &header(devices[0], &task, 1, 3))
        .unwrap();
    assert_eq!(deadline, t0 + 60 * SECOND);
    let err = core
        .check_update_header(t0, &header(devices[0], &task, 1, 2))
        .unwrap_err();
    assert_eq!(err.reason(), "wrong_num_values");
}

#[test]
fn non_finite_strategy_result_abandons_the_round() {
    let mut core = core_with(config(1, 0), vec![f32::MAX, 0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 1);
    let (device, task) = check_in_all(&mut core, t0, &devices).remove(0);
    // Finite and within the aggregator's bound, but x + Δ overflows.
    core.submit_update(t0, header(device, &task, 1, 2), &encode(&[1e32, 1.0]))
        .unwrap();
    let s = &core.history()[0];
    assert!(!s.completed);
    assert!(
        s.abandon_reason
            .as_deref()
            .unwrap()
            .contains("non-finite parameter at index 0")
    );
    let model = core.model();
    assert_eq!(
        (model.version, model.params.clone()),
        (1, vec![f32::MAX, 0.0])
    );
}

#[test]
fn resubmitted_check_in_returns_the_same_task_and_after_submitting_waits() {
    let (mut core, devices, task, t0) = open_round();
    match core.check_in(t0 + SECOND, &devices[0]).unwrap() {
        CheckIn::Task(again) => assert_eq!(again, task),
        other => panic!("{other:?}"),
    }
    core.submit_update(
        t0 + SECOND,
        header(devices[0], &task, 1, 3),
        &encode(&[0.0; 3]),
    )
    .unwrap();
    // Submitted, so no task any more: it waits for the next round.
    assert!(matches!(
        core.check_in(t0 + SECOND, &devices[0]).unwrap(),
        CheckIn::Wait { .. }
    ));
    assert_eq!(core.status().waiting, 1);
}

#[test]
fn fraction_selects_a_share_of_the_waiting_devices() {
    let mut config = config(1, 0);
    config.rounds.fraction = Some(0.5);
    config.rounds.over_selection = 1.5;
    let mut core = core_with(config, vec![0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 4);
    // Not everyone waits yet: wait for the window.
    for d in &devices[..3] {
        assert!(matches!(
            core.check_in(t0, d).unwrap(),
            CheckIn::Wait { .. }
        ));
    }
    let events = core.poll(t0 + 30 * SECOND);
    // ceil(0.5 · 3) = 2 wanted, ceil(2 · 1.5) = 3 selected.
    assert!(
        matches!(events[..], [Event::RoundStarted { selected: 3, .. }]),
        "{events:?}"
    );
    let tasks = check_in_all(&mut core, t0 + 30 * SECOND, &devices[..3]);
    for (device, task) in &tasks[..2] {
        core.submit_update(
            t0 + 31 * SECOND,
            header(*device, task, 1, 1),
            &encode(&[1.0]),
        )
        .unwrap();
    }
    assert!(core.history()[0].completed);
}

/// Differential privacy in the round: sampling, clipping, noise, budget.
mod dp {
    use super::*;
    use crate::config::{DpMode, Weighting};
    use crate::privacy::RdpAccountant;

    fn dp_config(devices_per_round: usize, z: f64, clip: f32, q: f64) -> CoordinatorConfig {
        let mut c = config(devices_per_round, 0);
        c.strategy.weighting = Weighting::Uniform;
        c.privacy.mode = DpMode::Central;
        c.privacy.noise_multiplier = z;
        c.privacy.clip = clip;
        c.privacy.sampling_rate = Some(q);
        c
    }

    /// Runs training rounds until the core finishes or `max_rounds` ended;
    /// every selected device submits `update(device index)`.
    fn run(
        core: &mut RoundCore,
        devices: &[Pseudonym],
        max_rounds: usize,
        update: impl Fn(usize) -> Vec<f32>,
    ) -> (Vec<RoundSummary>, Vec<Task>) {
        let mut now = Instant::now();
        let mut summaries = Vec::new();
        let mut tasks = Vec::new();
        while summaries.len() < max_rounds && core.finished().is_none() {
            let selected = check_in_all(core, now, devices);
            for (p, task) in &selected {
                let i = devices.iter().position(|d| d == p).unwrap();
                let values = update(i);
                let h = header(*p, task, 1, values.len() as u64);
                core.submit_update(now, h, &encode(&values)).unwrap();
                tasks.push(task.clone());
            }
            now += SECOND * 61;
            summaries.extend(ended(&core.poll(now)));
        }
        (summaries, tasks)
    }

    #[test]
    fn a_small_budget_stops_training_at_the_right_round_and_says_why() {
        let (q, z, delta) = (0.5, 1.0, 1e-5);
        let budget = RdpAccountant::epsilon_for(q, z, 7, delta) * 1.0001;
        assert!(RdpAccountant::epsilon_for(q, z, 8, delta) > budget);
        let mut c = dp_config(1, z, 1.0, q);
        c.privacy.epsilon_budget = Some(budget);
        c.privacy.delta = delta;
        let mut core = core_with(c, vec![0.0; 4]);
        let devices = join(&mut core, Instant::now(), 20);
        let (summaries, tasks) = run(&mut core, &devices, 50, |_| vec![0.1; 4]);
        assert_eq!(summaries.len(), 7, "{summaries:?}");
        let reason = core.finished().expect("finished");
        assert!(
            reason.contains("stopped after 7 training rounds")
                && reason.contains("privacy.epsilon_budget"),
            "{reason}"
        );
        let eps: Vec<f64> = summaries
            .iter()
            .map(|s| s.privacy.as_ref().unwrap().epsilon)
            .collect();
        assert!(eps.windows(2).all(|w| w[0] < w[1]), "{eps:?}");
        assert!(eps[6] <= budget);
        assert!((eps[6] - core.privacy().unwrap().epsilon()).abs() < 1e-12);
        // Devices are told the epsilon of their round.
        for task in &tasks {
            let p = task.privacy.expect("a DP task");
            assert_eq!(p.epsilon, eps[task.round as usize - 1]);
            assert_eq!(p.noise_std, 0.0, "central mode: devices add no noise");
        }
    }

    #[test]
    fn central_noise_has_deviation_z_times_clip_over_the_expected_cohort() {
        let n = 40_000;
        let (z, clip) = (2.0, 0.5);
        let mut core = core_with(dp_config(10, z, clip, 1.0), vec![0.0; n]);
        let devices = join(&mut core, Instant::now(), 10);
        let (summaries, _) = run(&mut core, &devices, 1, |_| vec![0.0; n]);
        assert!(summaries[0].completed);
        assert_eq!(summaries[0].privacy.as_ref().unwrap().expected_cohort, 10.0);
        let lr = f64::from(core.config().strategy.server_lr);
        let change: Vec<f64> = core
            .model()
            .params
            .iter()
            .map(|v| f64::from(*v) / lr)
            .collect();
        let std = (change.iter().map(|v| v * v).sum::<f64>() / n as f64).sqrt();
        let want = z * f64::from(clip) / 10.0;
        // 40,000 draws: the sample std's own relative std is 0.35%.
        assert!((std / want - 1.0).abs() < 0.02, "std {std}, want {want}");
    }

    #[test]
    fn no_device_moves_the_model_by_more_than_the_bound() {
        let clip = 0.25_f32;
        let mut core = core_with(dp_config(4, 0.0, clip, 1.0), vec![0.0; 3]);
        let devices = join(&mut core, Instant::now(), 4);
        // One device sends a huge update, the others nothing.
        let (summaries, _) = run(&mut core, &devices, 1, |i| {
            if i == 0 {
                vec![3e6, -4e6, 0.0]
            } else {
                vec![0.0; 3]
            }
        });
        assert!(summaries[0].completed);
        let lr = core.config().strategy.server_lr;
        let change = core
            .model()
            .params
            .iter()
            .map(|v| (v / lr).powi(2))
            .sum::<f32>()
            .sqrt();
        // The mean divides by the expected cohort of 4.
        assert!((change - clip / 4.0).abs() < 1e-6, "{change}");
    }

    #[test]
    fn adaptive_clipping_moves_the_bound_towards_the_median_norm() {
        let mut c = dp_config(8, 0.0, 0.1, 1.0);
        c.privacy.adaptive_clip = true;
        let mut core = core_with(c, vec![0.0; 2]);
        let devices = join(&mut core, Instant::now(), 8);
        // Update norms 1, 2, ..., 8: the median lies between 4 and 5.
        let (summaries, _) = run(&mut core, &devices, 60, |i| vec![(i + 1) as f32, 0.0]);
        let clips: Vec<f32> = summaries
            .iter()
            .map(|s| s.privacy.as_ref().unwrap().clip)
            .collect();
        assert!(clips[1] > clips[0], "all clipped: the bound grows");
        let last = *clips.last().unwrap();
        assert!((3.0..=6.0).contains(&last), "{clips:?}");
    }

    #[test]
    fn poisson_sampling_draws_each_device_with_the_rate() {
        let mut c = dp_config(1, 1.0, 1.0, 0.25);
        // Every device is back in the pool before the next round starts.
        c.rounds.checkin_window_secs = 1e4;
        let mut core = core_with(c, vec![0.0]);
        let devices = join(&mut core, Instant::now(), 200);
        let (summaries, _) = run(&mut core, &devices, 40, |_| vec![0.0]);
        let mean = summaries.iter().map(|s| s.selected as f64).sum::<f64>() / 40.0;
        // 40 rounds of Binomial(200, 0.25): mean 50, its std 0.97.
        assert!((mean - 50.0).abs() < 4.0, "{mean}");
        assert!(
            summaries
                .iter()
                .any(|s| s.selected != summaries[0].selected)
        );
    }

    /// Replicas' loads as the leader reads them from their heartbeats.
    fn loads(replicas: &[RoundCore]) -> Vec<cluster::ReplicaLoad> {
        replicas
            .iter()
            .enumerate()
            .map(|(i, core)| cluster::ReplicaLoad {
                name: format!("r{i}"),
                waiting: core.status().waiting,
                joined: core.status().joined,
            })
            .collect()
    }

    fn share_order(round: u32, take: usize, privacy: &RoundPrivacy) -> cluster::ShareOrder {
        cluster::ShareOrder {
            round,
            kind: TaskKind::Train,
            model_version: 1,
            take,
            needed: take,
            deadline: Instant::now() + 60 * SECOND,
            privacy: Some(privacy.clone()),
        }
    }

    /// Two replicas' shares of a DP round, combined by the leader, make the
    /// model one coordinator makes from the same updates: the same clipping,
    /// the same noise (the same seed), the same division by the expected
    /// cohort, the same ε, counted once, when the leader planned the round.
    #[test]
    fn replicas_clip_and_noise_a_round_as_one_coordinator_does() {
        let (z, clip) = (1.0, 0.5);
        let update = |i: usize| vec![(i as f32 + 1.0) * 3.0, -(i as f32), 0.25];
        let mut single = core_with(dp_config(5, z, clip, 1.0), vec![0.0; 3]);
        let devices = join(&mut single, Instant::now(), 5);
        let (alone, _) = run(&mut single, &devices, 1, update);

        let now = Instant::now();
        let mut replicas: Vec<RoundCore> = (0..2)
            .map(|_| core_with(dp_config(5, z, clip, 1.0), vec![0.0; 3]).into_replica())
            .collect();
        let at = [
            join(&mut replicas[0], now, 3),
            join(&mut replicas[1], now, 2),
        ];
        for (core, devices) in replicas.iter_mut().zip(&at) {
            for d in devices {
                assert!(matches!(
                    core.check_in(now, d).unwrap(),
                    CheckIn::Wait { .. }
                ));
            }
        }
        let loads = loads(&replicas);
        let cluster::Plan::Round(plan) = replicas[0].plan_round(&loads, now, now + SECOND) else {
            panic!("every device waits: a round");
        };
        let privacy = plan.privacy.clone().expect("a DP round");
        assert_eq!(plan.shares["r0"], (3, 3));
        assert_eq!(plan.shares["r1"], (2, 2));
        assert_eq!(
            replicas[0].privacy().unwrap().epsilon(),
            privacy.summary.epsilon
        );
        let mut sums = Vec::new();
        let mut index = 0;
        for (i, (core, devices)) in replicas.iter_mut().zip(&at).enumerate() {
            let take = plan.shares[&format!("r{i}")].0;
            core.order_share(now, share_order(1, take, &privacy));
            for d in devices {
                let CheckIn::Task(task) = core.check_in(now, d).unwrap() else {
                    panic!("q = 1 samples every device");
                };
                assert_eq!(task.privacy, Some(privacy.task));
                let values = update(index);
                index += 1;
                let h = header(*d, &task, 1, values.len() as u64);
                core.submit_update(now, h, &encode(&values)).unwrap();
            }
            sums.extend(core.take_share_sums());
        }
        assert_eq!(sums.len(), 2);
        let together = replicas[0].conclude(1, TaskKind::Train, &sums, 1.0, Some(privacy));
        assert!(together.completed, "{together:?}");
        assert_eq!(together.privacy, alone[0].privacy);
        assert_eq!(together.participants, 5);
        let (a, b) = (&replicas[0].model().params, &single.model().params);
        assert!(a.iter().any(|v| *v != 0.0));
        for (x, y) in a.iter().zip(b.iter()) {
            assert!((x - y).abs() < 1e-5, "{a:?} against {b:?}");
        }
    }

    /// A replica samples each of its waiting devices with the round's q,
    /// whatever the order's `take`; the leader counts each planned round,
    /// and a plan over the budget stops training with the reason.
    #[test]
    fn replicas_sample_with_q_and_the_budget_stops_the_leader() {
        let q = 0.5;
        let mut c = dp_config(1, 1.0, 1.0, q);
        c.privacy.epsilon_budget =
            Some(RdpAccountant::epsilon_for(q, 1.0, 2, c.privacy.delta) * 1.0001);
        let now = Instant::now();
        let mut replica = core_with(c, vec![0.0; 2]).into_replica();
        let devices = join(&mut replica, now, 400);
        for d in &devices {
            replica.check_in(now, d).unwrap();
        }
        let loads = loads(std::slice::from_ref(&replica));
        let cluster::Plan::Round(first) = replica.plan_round(&loads, now, now + SECOND) else {
            panic!("a round");
        };
        let privacy = first.privacy.expect("a DP round");
        replica.order_share(now, share_order(1, 3, &privacy));
        let selected = replica
            .poll(now)
            .iter()
            .find_map(|e| match e {
                Event::RoundStarted { selected, .. } => Some(*selected),
                _ => None,
            })
            .expect("the share opened");
        // Binomial(400, 0.5): mean 200, std 10.
        assert!((150..=250).contains(&selected), "{selected}");
        assert!(matches!(
            replica.plan_round(&loads, now, now + SECOND),
            cluster::Plan::Round(_)
        ));
        let cluster::Plan::Stop(counters) = replica.plan_round(&loads, now, now + SECOND) else {
            panic!("the third round is over the budget");
        };
        let reason = counters.training_stopped.expect("a reason");
        assert!(reason.contains("privacy.epsilon_budget"), "{reason}");
    }

    /// Replicas draw a device alike: one waiting at two replicas (it
    /// moved) is in a round at both or at neither, so its chance stays q.
    /// A replica whose privacy settings differ from the order's leaves its
    /// share empty rather than run the round with other clipping or noise.
    #[test]
    fn replicas_draw_a_device_alike_and_refuse_other_privacy() {
        let now = Instant::now();
        let mut a = core_with(dp_config(1, 1.0, 1.0, 0.5), vec![0.0; 2]).into_replica();
        let mut b = core_with(dp_config(1, 1.0, 1.0, 0.5), vec![0.0; 2]).into_replica();
        let devices = join(&mut a, now, 200);
        for d in &devices {
            b.admit(now, *d, 600 * SECOND);
            a.check_in(now, d).unwrap();
            b.check_in(now, d).unwrap();
        }
        let loads = loads(std::slice::from_ref(&a));
        let cluster::Plan::Round(plan) = a.plan_round(&loads, now, now + SECOND) else {
            panic!("a round");
        };
        let privacy = plan.privacy.expect("a DP round");
        let cohort = |core: &mut RoundCore| {
            core.order_share(now, share_order(1, 200, &privacy));
            let mut drawn: Vec<Pseudonym> = devices
                .iter()
                .filter(|d| matches!(core.check_in(now, d), Ok(CheckIn::Task(_))))
                .copied()
                .collect();
            drawn.sort();
            drawn
        };
        let (at_a, at_b) = (cohort(&mut a), cohort(&mut b));
        assert_eq!(at_a, at_b, "the same devices at both replicas");
        assert!((60..=140).contains(&at_a.len()), "{}", at_a.len());

        // Other settings: an empty share, no device drawn.
        let mut other = dp_config(1, 2.0, 1.0, 0.5);
        other.rounds.seed = Some(2);
        let mut c = core_with(other, vec![0.0; 2]).into_replica();
        let mut plain = core_with(config(1, 0), vec![0.0; 2]).into_replica();
        for core in [&mut c, &mut plain] {
            for d in &devices {
                core.admit(now, *d, 600 * SECOND);
                core.check_in(now, d).unwrap();
            }
            core.order_share(now, share_order(1, 200, &privacy));
            let sums = core.take_share_sums();
            assert_eq!(sums.len(), 1);
            assert_eq!((sums[0].selected, sums[0].accepted), (0, 0));
        }
    }

    /// A replica refuses to follow a task trained under differential
    /// privacy when it runs without, and the other way round.
    #[test]
    fn a_replica_refuses_a_task_of_other_privacy() {
        let followed = |privacy: Option<crate::checkpoint::PrivacyState>| cluster::Followed {
            version: 2,
            params: vec![0.0; 2],
            m: Vec::new(),
            v: Vec::new(),
            counters: cluster::RunCounters {
                last_round: 1,
                training_rounds: 1,
                ..Default::default()
            },
            history: Vec::new(),
            privacy,
        };
        let mut dp = core_with(dp_config(1, 1.0, 1.0, 0.5), vec![0.0; 2]).into_replica();
        let err = dp.follow(followed(None)).unwrap_err().to_string();
        assert!(err.contains("without differential privacy"), "{err}");
        assert_eq!(dp.model().version, 1, "nothing followed");
        let state = dp.privacy_state();
        let mut plain = core_with(config(1, 0), vec![0.0; 2]).into_replica();
        let err = plain
            .follow(followed(state.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("under differential privacy"), "{err}");
        dp.follow(followed(state)).unwrap();
        assert_eq!(dp.model().version, 2);
    }
}

/// A core resumed from its checkpoint carries on where the first stopped:
/// same model, optimizer and accountant; no round lost or run twice.
#[test]
fn a_resumed_core_carries_on_from_its_checkpoint() {
    use crate::checkpoint::Checkpoint;
    use crate::config::{DpMode, StrategyName, Weighting};
    let mut c = config(2, 6);
    c.strategy.name = StrategyName::FedAdam;
    c.strategy.weighting = Weighting::Uniform;
    c.privacy.mode = DpMode::Central;
    c.privacy.sampling_rate = Some(1.0);
    c.privacy.noise_multiplier = 0.5;
    let mut core = core_with(c.clone(), vec![0.0; 3]);
    let devices = join(&mut core, Instant::now(), 2);
    let mut now = Instant::now();
    let round = |core: &mut RoundCore, now: &mut Instant| {
        for (p, task) in check_in_all(core, *now, &devices) {
            let h = header(p, &task, 1, 3);
            core.submit_update(*now, h, &encode(&[0.1, -0.2, 0.3]))
                .unwrap();
        }
        *now += SECOND;
        core.poll(*now);
    };
    for _ in 0..3 {
        round(&mut core, &mut now);
    }
    assert_eq!(core.history().len(), 3);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck");
    core.checkpoint().write(&path).unwrap();
    let saved = Checkpoint::read(&path).unwrap();
    assert_eq!(saved.params, core.model().params);
    assert_eq!(saved.m, core.strategy().moments().0);

    let mut resumed = RoundCore::resume(valid(c.clone()), layout(3), saved.clone(), now).unwrap();
    assert_eq!(resumed.model().version, core.model().version);
    assert_eq!(resumed.model().params, core.model().params);
    assert_eq!(resumed.history(), core.history());
    let eps = core.privacy().unwrap().epsilon();
    assert_eq!(resumed.privacy().unwrap().epsilon(), eps);
    // The devices carry on with their pseudonyms.
    for _ in 0..3 {
        round(&mut resumed, &mut now);
    }
    let rounds: Vec<u32> = resumed.history().iter().map(|s| s.round).collect();
    assert_eq!(rounds, [1, 2, 3, 4, 5, 6]);
    assert!(resumed.history().iter().all(|s| s.completed));
    assert_eq!(resumed.model().version, 7);
    assert_eq!(resumed.finished(), Some("completed 6 training rounds"));
    let want = crate::privacy::RdpAccountant::epsilon_for(1.0, 0.5, 6, c.privacy.delta);
    assert!((resumed.privacy().unwrap().epsilon() - want).abs() < 1e-9);

    // Switching privacy off since the checkpoint is refused, with the reason.
    let mut off = c;
    off.privacy.mode = DpMode::Off;
    let err = RoundCore::resume(valid(off), layout(3), saved, now)
        .unwrap_err()
        .to_string();
    assert!(err.contains("differential privacy"), "{err}");
}

/// Random and mutated messages thrown at the decoding and the validation:
/// nothing panics, every bad submission is refused, and the global model
/// stays finite.
#[test]
fn random_and_mutated_messages_never_panic_and_keep_the_model_finite() {
    use fedrec_proto::pb;
    use prost::Message;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    let mut rng = ChaCha8Rng::seed_from_u64(0xF022);
    // Decoding: random bytes, and mutations of a valid upload message.
    let valid = pb::UpdateChunk {
        part: Some(pb::update_chunk::Part::Header(pb::UpdateHeader {
            pseudonym: "00112233445566778899aabbccddeeff".into(),
            round: 1,
            model_version: 1,
            num_examples: 3,
            num_values: 8,
            ..Default::default()
        })),
    }
    .encode_to_vec();
    for case in 0..20_000 {
        let bytes: Vec<u8> = if case % 2 == 0 {
            (0..rng.random_range(0..64)).map(|_| rng.random()).collect()
        } else {
            let mut m = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..m.len());
                m[i] = rng.random();
            }
            m
        };
        if let Ok(pb::UpdateChunk {
            part: Some(pb::update_chunk::Part::Header(h)),
        }) = pb::UpdateChunk::decode(&bytes[..])
        {
            let _ = UpdateHeader::try_from(h);
        }
        let _ = pb::Task::decode(&bytes[..]);
    }

    // Validation: every selected device sends a random mutation of a valid
    // update, or a valid one; rounds go on.
    let n = 8;
    let mut c = config(4, 5);
    c.rounds.min_updates = 1;
    let mut core = core_with(c, vec![0.5; n]);
    let devices = join(&mut core, Instant::now(), 6);
    let mut now = Instant::now();
    let mut refused = 0;
    for _ in 0..40 {
        if core.finished().is_some() {
            break;
        }
        for (p, task) in check_in_all(&mut core, now, &devices) {
            for _ in 0..3 {
                let mut h = header(p, &task, rng.random_range(0..5), n as u64);
                let mut values: Vec<f32> = (0..n).map(|_| rng.random::<f32>() - 0.5).collect();
                match rng.random_range(0..10) {
                    0 => values[rng.random_range(0..n)] = f32::NAN,
                    1 => values[rng.random_range(0..n)] = f32::INFINITY,
                    2 => values[rng.random_range(0..n)] = 3e38,
                    3 => values.truncate(rng.random_range(0..n)),
                    4 => h.round = rng.random(),
                    5 => h.model_version = rng.random(),
                    6 => h.num_values = rng.random(),
                    7 => h.pseudonym = "ffffffffffffffffffffffffffffffff".parse().unwrap(),
                    _ => {}
                }
                let mut bytes = encode(&values).to_vec();
                if rng.random_range(0..20) == 0 {
                    bytes.pop();
                }
                if core.submit_update(now, h, &bytes).is_err() {
                    refused += 1;
                }
            }
        }
        now += SECOND * 61;
        core.poll(now);
        assert!(core.model().params.iter().all(|v| v.is_finite()));
    }
    assert!(refused > 50, "mutations were refused: {refused}");
    assert!(core.history().iter().any(|s| s.completed));
    assert!(core.model().params.iter().all(|v| v.is_finite()));
}

/// A session lets a device check in until it expires; then the check-in is
/// refused and counted, and the device must join again. Expired devices are
/// swept from the pool, so a round does not wait for them, while a cohort
/// member may finish its task after expiry. Without tokens too (issue 19,
/// item 4).
#[test]
fn sessions_expire_with_and_without_enrollment_tokens() {
    let mut cfg = config(2, 2);
    cfg.auth.enrollment_tokens = Some("tokens.sha256".into());
    cfg.auth.session_ttl_secs = 100.0;
    cfg.rounds.deadline_secs = 200.0;
    let mut core = core_with(cfg, vec![0.0; 2]);
    let t0 = Instant::now();
    let early = join(&mut core, t0, 2);
    // Within the session: a task (2 devices wait, clients_per_round = 2).
    let tasks = check_in_all(&mut core, t0 + 10 * SECOND, &early);
    assert_eq!(tasks.len(), 2);
    // The first finishes its task after its session ended: accepted.
    let (device, task) = &tasks[0];
    let late = t0 + 101 * SECOND;
    core.submit_update(late, header(*device, task, 1, 2), &encode(&[1.0, 1.0]))
        .unwrap();
    // Its next check-in is refused, counted, and it is forgotten.
    let err = core.check_in(late, device).unwrap_err();
    assert!(matches!(err, CoordinatorError::SessionExpired), "{err}");
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(core.rejections().get("session_expired"), Some(&1));
    assert!(matches!(
        core.check_in(late, device),
        Err(CoordinatorError::UnknownPseudonym)
    ));
    // Joining again gives a fresh session.
    let again = core.join(late, None);
    assert!(matches!(
        core.check_in(late, &again),
        Ok(CheckIn::Wait { .. })
    ));
    // Without tokens sessions expire too, after auth.session_ttl_secs.
    let mut open = core_with(config(1, 1), vec![0.0]);
    let device = open.join(t0, None);
    assert!(open.check_in(t0 + 3599 * SECOND, &device).is_ok());
    assert!(matches!(
        open.check_in(t0 + 3600 * SECOND, &device),
        Err(CoordinatorError::SessionExpired)
    ));
}

/// A session that ended and was swept out of the device table is still
/// refused as `session_expired` (issue 19, item 3), for one more lifetime;
/// then it is forgotten (`unknown_pseudonym`), so the table stays bounded.
#[test]
fn a_swept_session_is_refused_as_expired_then_forgotten() {
    let mut cfg = config(5, 0);
    cfg.auth.enrollment_tokens = Some("tokens.sha256".into());
    cfg.auth.session_ttl_secs = 100.0;
    let mut core = core_with(cfg, vec![0.0]);
    let t0 = Instant::now();
    let first = core.join(t0, None);
    // A later join sweeps the first's ended session.
    let second = core.join(t0 + 150 * SECOND, None);
    assert_eq!(core.joined(), 1);
    let err = core.check_in(t0 + 150 * SECOND, &first).unwrap_err();
    assert!(matches!(err, CoordinatorError::SessionExpired), "{err}");
    assert_eq!(core.rejections().get("session_expired"), Some(&1));
    core.join(t0 + 400 * SECOND, None);
    let err = core.check_in(t0 + 400 * SECOND, &second).unwrap_err();
    assert!(matches!(err, CoordinatorError::UnknownPseudonym), "{err}");
    assert_eq!(core.rejections().get("session_expired"), Some(&1));
}

/// The size in bytes of `core`'s checkpoint file.
fn checkpoint_bytes(core: &RoundCore) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck");
    core.checkpoint().write(&path).unwrap();
    std::fs::metadata(&path).unwrap().len()
}

/// Runs one single-device training round at `now` with a fresh device.
fn one_round(core: &mut RoundCore, now: Instant) {
    let device = core.join(now, None);
    let tasks = check_in_all(core, now, &[device]);
    let (p, task) = &tasks[0];
    let n = core.model().params.len() as u64;
    core.submit_update(now, header(*p, task, 1, n), &encode(&vec![0.0; n as usize]))
        .unwrap();
    core.poll(now);
}

/// Issue 19, item 4: 50,000 joins without tokens fill the device table
/// and the checkpoint; once their sessions have ended, the next round's end
/// sweeps them out of both, and after one more lifetime they are forgotten
/// entirely.
#[test]
fn joins_without_tokens_expire_and_leave_the_table_and_the_checkpoint() {
    let mut core = core_with(config(1, 0), vec![0.0]);
    let t0 = Instant::now();
    let ttl = core.config().auth.session_ttl();
    join(&mut core, t0, 50_000);
    assert_eq!(core.joined(), 50_000);
    let full = checkpoint_bytes(&core);
    assert!(full > 50_000 * 32, "{full} bytes");

    let later = t0 + ttl + SECOND;
    one_round(&mut core, later);
    assert_eq!(core.history().len(), 1);
    assert_eq!(core.joined(), 1, "only the fresh device is left");
    let small = checkpoint_bytes(&core);
    assert!(small < 4096, "{small} bytes, down from {full}");
    // Told once that their session expired...
    let swept: Pseudonym = *core
        .sessions
        .keys()
        .find(|p| !core.joined.contains(p))
        .unwrap();
    assert!(matches!(
        core.check_in(later, &swept),
        Err(CoordinatorError::SessionExpired)
    ));
    // ... and forgotten after one more lifetime.
    one_round(&mut core, later + 2 * ttl);
    assert_eq!(core.sessions.len(), 1, "only the last round's device");
}

/// Issue 19, item 4: a second join with the same enrollment token ends the
/// first session; its next check-in is refused (UNAUTHENTICATED, saying
/// why) and counted as `session_replaced`. Another token is unaffected.
#[test]
fn a_second_join_with_the_same_token_replaces_the_first() {
    let tokens = crate::auth::TokenSet::from_tokens(["alpha", "beta"]);
    let (alpha, beta) = (tokens.check("alpha").ok(), tokens.check("beta").ok());
    let mut core = core_with(config(5, 0), vec![0.0]);
    let t0 = Instant::now();
    let first = core.join(t0, alpha);
    let other = core.join(t0, beta);
    let second = core.join(t0 + SECOND, alpha);
    assert_eq!(core.joined(), 2);
    let err = core.check_in(t0 + SECOND, &first).unwrap_err();
    assert!(matches!(err, CoordinatorError::SessionReplaced), "{err}");
    assert_eq!(core.rejections().get("session_replaced"), Some(&1));
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status
            .message()
            .contains("replaced by a newer join with the same enrollment token"),
        "{status:?}"
    );
    for device in [second, other] {
        assert!(core.check_in(t0 + SECOND, &device).is_ok());
    }
}

/// With `auth.max_sessions_per_token = 2`, a token holds two live sessions;
/// a third join ends the oldest.
#[test]
fn a_token_holds_at_most_max_sessions_per_token() {
    let mut cfg = config(5, 0);
    cfg.auth.max_sessions_per_token = 2;
    let token = crate::auth::TokenSet::from_tokens(["alpha"])
        .check("alpha")
        .ok();
    let mut core = core_with(cfg, vec![0.0]);
    let t0 = Instant::now();
    let devices: Vec<Pseudonym> = (0..3).map(|i| core.join(t0 + i * SECOND, token)).collect();
    let now = t0 + 3 * SECOND;
    assert!(matches!(
        core.check_in(now, &devices[0]),
        Err(CoordinatorError::SessionReplaced)
    ));
    for device in &devices[1..] {
        assert!(core.check_in(now, device).is_ok());
    }
    assert_eq!(core.joined(), 2);
    assert_eq!(core.rejections().get("session_replaced"), Some(&1));
}

/// Issue 19, item 4: a session downloads one model version at most
/// `server.max_downloads_per_version` (4) times; the 5th is refused
/// (RESOURCE_EXHAUSTED, `download_limit`). The count starts afresh for the
/// next version, and when the device is selected for a round (so that
/// rounds abandoned without a new version cannot lock it out).
#[test]
fn downloads_of_one_version_are_limited_per_session() {
    let mut core = core_with(config(1, 0), vec![0.0]);
    let t0 = Instant::now();
    let device = core.join(t0, None);
    let four = |core: &mut RoundCore, version| {
        for _ in 0..4 {
            core.download(&device, version).unwrap();
        }
        core.download(&device, version).unwrap_err()
    };
    let err = four(&mut core, 1);
    assert!(
        matches!(
            err,
            CoordinatorError::DownloadLimit {
                version: 1,
                limit: 4
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("server.max_downloads_per_version"),
        "{err}"
    );
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::ResourceExhausted
    );
    assert_eq!(core.rejections().get("download_limit"), Some(&1));

    // Another device completes a round: version 2.
    one_round(&mut core, t0 + SECOND);
    assert_eq!(core.model().version, 2);
    four(&mut core, 2);
    assert_eq!(core.rejections().get("download_limit"), Some(&2));

    // Selected for a round of version 2: its task's download is allowed.
    let tasks = check_in_all(&mut core, t0 + 2 * SECOND, &[device]);
    assert_eq!(tasks[0].1.model_version, 2);
    assert!(core.download(&device, 2).is_ok());
}

/// Issue 19, item 4: pseudonyms restored from a checkpoint get a session of
/// one lifetime from the resume, so those that never come back are swept
/// out (of the device table and the next checkpoint).
#[test]
fn resumed_pseudonyms_expire_one_lifetime_after_the_resume() {
    let cfg = config(1, 0);
    let mut core = core_with(cfg.clone(), vec![0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 3);
    let ttl = core.config().auth.session_ttl();
    let resumed_at = t0 + 10 * ttl;
    let mut resumed =
        RoundCore::resume(valid(cfg), layout(1), core.checkpoint(), resumed_at).unwrap();
    assert_eq!(resumed.joined(), 3);
    for device in &devices {
        assert_eq!(resumed.sessions[device].expires, resumed_at + ttl);
    }
    let later = resumed_at + ttl;
    one_round(&mut resumed, later);
    assert_eq!(resumed.joined(), 1, "only the fresh device is left");
    assert_eq!(resumed.checkpoint().joined.len(), 1);
    assert!(matches!(
        resumed.check_in(later, &devices[1]),
        Err(CoordinatorError::SessionExpired)
    ));
}

/// A settings search's trial: its tasks ask for validation, its end leaves
/// the devices waiting (not finished), and the next run starts with a new
/// shape and the next version, counting its schedule afresh.
#[test]
fn a_trial_waits_for_the_next_run_and_a_new_shape_follows() {
    let t0 = Instant::now();
    let mut core = core_with(config(2, 1), vec![0.0; 2]).into_trial();
    let devices = join(&mut core, t0, 2);
    let tasks = check_in_all(&mut core, t0, &devices);
    assert_eq!(tasks.len(), 2);
    assert!(
        tasks.iter().all(|(_, t)| t.validation),
        "trial tasks hold out"
    );
    for (d, t) in &tasks {
        core.submit_update(t0, header(*d, t, 1, 2), &encode(&[1.0, 1.0]))
            .unwrap();
    }
    assert_eq!(core.model().version, 2);
    let status = core.status();
    assert!(status.between_runs && status.trial && !status.finished);
    assert!(core.in_search());
    for d in &devices {
        assert!(
            matches!(core.check_in(t0, d).unwrap(), CheckIn::Wait { .. }),
            "devices wait between runs"
        );
    }
    // Only between runs.
    let mut other = core_with(config(2, 1), vec![0.0; 2]);
    let err = other
        .start_run(t0, valid(config(2, 1)), layout(3), vec![0.0; 3], false)
        .unwrap_err();
    assert!(err.to_string().contains("after a trial"), "{err}");
    // The final run: three values now, the next version; the waiting
    // devices are selected at once.
    core.start_run(t0, valid(config(2, 2)), layout(3), vec![0.5; 3], false)
        .unwrap();
    assert_eq!(core.model().version, 3);
    assert_eq!(core.layout().num_values(), 3);
    assert!(!core.in_search());
    let tasks: Vec<_> = devices
        .iter()
        .filter_map(|d| match core.check_in(t0, d).unwrap() {
            CheckIn::Task(t) => Some((*d, t)),
            _ => None,
        })
        .collect();
    assert_eq!(tasks.len(), 2);
    assert!(tasks.iter().all(|(_, t)| !t.validation && t.round == 2));
    for (d, t) in &tasks {
        core.submit_update(t0, header(*d, t, 1, 3), &encode(&[1.0, 1.0, 1.0]))
            .unwrap();
    }
    assert_eq!(core.checkpoint().run_start, 1);
    assert!(core.finished().is_none(), "one of two rounds done");
    assert!(
        core.start_run(t0, valid(config(2, 1)), layout(3), vec![0.0; 3], true)
            .is_err(),
        "a final run is not interrupted"
    );
}

/// `rounds.rest_secs` in sync rounds: a device of the last cohort is told
/// to wait out its rest before it may be selected again, but it still
/// takes part in the final evaluation.
#[test]
fn a_device_of_the_last_cohort_rests_until_the_final_evaluation() {
    let mut cfg = config(1, 3);
    cfg.rounds.min_updates = 1;
    cfg.rounds.over_selection = 1.0;
    cfg.rounds.rest_secs = 600.0;
    cfg.rounds.final_evaluation = true;
    let mut core = core_with(cfg, vec![0.0]);
    let t0 = Instant::now();
    let devices = join(&mut core, t0, 2);
    let started = t0 + 31 * SECOND;
    check_in_all(&mut core, t0, &devices);
    core.poll(started);
    let tasks = check_in_all(&mut core, started, &devices);
    assert_eq!(tasks.len(), 1, "one device selected");
    let (chosen, t) = &tasks[0];
    core.submit_update(started, header(*chosen, t, 1, 1), &encode(&[1.0]))
        .unwrap();
    // Round 2 trains: the chosen device is told to wait out its rest.
    let later = started + 9 * SECOND;
    match core.check_in(later, chosen).unwrap() {
        // 600 s from its task, handed out when it checked in at t0.
        CheckIn::Wait { retry_after } => assert_eq!(retry_after, 560 * SECOND),
        other => panic!("it rests: {other:?}"),
    }
    // It trains in no round while it rests (both devices rest after their
    // round, so round 3 waits for a rest to end); the final evaluation
    // takes it.
    let mut evaluated = false;
    for k in 1..=60u32 {
        let at = later + 20 * k * SECOND;
        check_in_all(&mut core, at, &devices);
        core.poll(at);
        for (p, t) in check_in_all(&mut core, at, &devices) {
            if t.kind == TaskKind::Evaluate {
                evaluated |= p == *chosen;
                continue;
            }
            assert!(
                p != *chosen || at >= t0 + 600 * SECOND,
                "it rests through round {}",
                t.round
            );
            core.submit_update(at, header(p, &t, 1, 1), &encode(&[1.0]))
                .unwrap();
        }
    }
    let trained = core.history().iter().filter(|r| r.kind == TaskKind::Train);
    assert_eq!(trained.count(), 3, "{:?}", core.history());
    assert!(evaluated, "round 1's device evaluates the final model");
    // Round 3's device still rests, and evaluates all the same.
    let last = core.history().last().unwrap();
    assert_eq!((last.kind, last.selected), (TaskKind::Evaluate, 2));
}
