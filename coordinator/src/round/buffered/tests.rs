//! Async mode: staleness weighting, the staleness bound, buffer steps,
//! concurrency, expired tasks, and what it refuses to run with.

use std::time::{Duration, Instant};

use fedrec_proto::tensor::encode;

use super::*;
use crate::config::{RoundsMode, StrategyName};

/// One value; async steps of `buffer` updates, at most `concurrency` out.
fn config(buffer: usize, concurrency: usize, rounds: u32) -> CoordinatorConfig {
    let mut c = CoordinatorConfig::default();
    c.rounds.mode = RoundsMode::Async;
    c.rounds.rounds = rounds;
    c.rounds.async_buffer = buffer;
    c.rounds.async_concurrency = concurrency;
    c.rounds.evaluate = false;
    c.rounds.final_evaluation = false;
    c.rounds.seed = Some(5);
    c.rounds.deadline_secs = 60.0;
    c
}

fn core(config: CoordinatorConfig) -> RoundCore {
    let layout = Layout::new(vec![("item_bias".into(), vec![1])]);
    RoundCore::new(config.validated().unwrap(), layout, vec![0.0]).unwrap()
}

fn task(core: &mut RoundCore, now: Instant, p: &Pseudonym) -> Option<Task> {
    match core.check_in(now, p).unwrap() {
        CheckIn::Task(t) => Some(t),
        _ => None,
    }
}

/// `p`'s header for its one-value update to task `t`.
fn header(p: Pseudonym, t: &Task) -> UpdateHeader {
    UpdateHeader {
        pseudonym: p,
        round: t.round,
        model_version: t.model_version,
        num_examples: 1,
        num_values: 1,
        evaluation: None,
    }
}

fn submit(
    core: &mut RoundCore,
    now: Instant,
    p: Pseudonym,
    t: &Task,
    value: f32,
) -> Result<UpdateAccepted, CoordinatorError> {
    core.submit_update(now, header(p, t), &encode(&[value]))
}

#[test]
fn the_discount_is_one_over_the_root_of_one_plus_staleness() {
    assert_eq!(staleness_discount(0), 1.0);
    assert!((staleness_discount(1) - 1.0 / 2f32.sqrt()).abs() < 1e-7);
    assert!((staleness_discount(3) - 0.5).abs() < 1e-7);
}

#[test]
fn every_k_updates_step_the_model_with_stale_ones_discounted() {
    let mut core = core(config(2, 3, 2));
    let now = Instant::now();
    let [a, b, c] = [0; 3].map(|_| core.join(now, None));
    // Tasks on demand, on version 1, without waiting for a cohort.
    let ta = task(&mut core, now, &a).expect("a slot");
    let tb = task(&mut core, now, &b).expect("a slot");
    let tc = task(&mut core, now, &c).expect("a slot");
    assert_eq!((ta.round, ta.model_version), (1, 1));
    assert_eq!(task(&mut core, now, &a), Some(ta.clone()), "asking again");
    submit(&mut core, now, a, &ta, 1.0).unwrap();
    assert_eq!(core.model().version, 1, "the buffer holds one of 2");
    submit(&mut core, now, b, &tb, 3.0).unwrap();
    assert_eq!(core.model().version, 2);
    assert_eq!(core.model().params, vec![2.0], "fedavg: x + mean");
    // c trained on version 1 (staleness 1); a's new task is on version 2.
    let ta2 = task(&mut core, now, &a).unwrap();
    assert_eq!((ta2.round, ta2.model_version), (2, 2));
    // c downloads late: the current model, for its version-1 task.
    assert_eq!(core.download(&c, 1).unwrap().version, 2);
    assert!(core.download(&b, 1).is_err(), "b has no task out");
    submit(&mut core, now, c, &tc, 2.0).unwrap();
    submit(&mut core, now, a, &ta2, 1.0).unwrap();
    let want = 2.0 + (2.0 * staleness_discount(1) + 1.0) / 2.0;
    assert!((core.model().params[0] - want).abs() < 1e-6);
    let steps = core.history();
    assert_eq!(steps.len(), 2);
    assert!(steps.iter().all(|s| s.completed && s.participants == 2));
    assert_eq!((steps[0].selected, steps[1].selected), (3, 1));
    assert_eq!(core.finished(), Some("completed 2 training rounds"));
}

#[test]
fn updates_beyond_the_staleness_bound_are_refused_counted_and_free_their_slot() {
    let mut cfg = config(1, 2, 0);
    cfg.rounds.async_max_staleness = 0;
    let mut core = core(cfg);
    let now = Instant::now();
    let [a, b] = [0; 2].map(|_| core.join(now, None));
    let ta = task(&mut core, now, &a).unwrap();
    let tb = task(&mut core, now, &b).unwrap();
    submit(&mut core, now, a, &ta, 1.0).unwrap();
    let err = submit(&mut core, now, b, &tb, 1.0).unwrap_err();
    assert!(matches!(err, CoordinatorError::TooStale { .. }), "{err}");
    assert!(
        err.to_string().contains("rounds.async_max_staleness"),
        "{err}"
    );
    assert_eq!(core.rejections().get("too_stale"), Some(&1));
    assert_eq!(core.model().params, vec![1.0], "the stale update is not in");
    let fresh = task(&mut core, now, &b).expect("b's slot was freed");
    assert_eq!(fresh.model_version, 2);
}

#[test]
fn concurrency_is_capped_and_expired_tasks_free_their_slot() {
    let mut core = core(config(1, 1, 0));
    let t0 = Instant::now();
    let [a, b] = [0; 2].map(|_| core.join(t0, None));
    let ta = task(&mut core, t0, &a).unwrap();
    let CheckIn::Wait { retry_after } = core.check_in(t0, &b).unwrap() else {
        panic!("one task at a time")
    };
    assert!(retry_after <= Duration::from_secs(60));
    assert_eq!(core.poll_timeout(), Some(ta.deadline));
    let late = ta.deadline + Duration::from_secs(1);
    let tb = task(&mut core, late, &b).expect("a's task expired");
    let err = submit(&mut core, late, a, &ta, 1.0).unwrap_err();
    assert!(
        matches!(err, CoordinatorError::TaskExpired { round: 1 }),
        "{err}"
    );
    assert_eq!(core.model().version, 1);
    // Steps later, a's update is still told that its task expired.
    submit(&mut core, late, b, &tb, 1.0).unwrap();
    assert_eq!(core.model().version, 2);
    let err = submit(&mut core, late, a, &ta, 1.0).unwrap_err();
    assert!(
        matches!(err, CoordinatorError::TaskExpired { round: 1 }),
        "{err}"
    );
}

#[test]
fn the_final_evaluation_is_a_round_after_the_last_step() {
    let mut cfg = config(1, 1, 1);
    cfg.rounds.final_evaluation = true;
    cfg.rounds.checkin_window_secs = 0.0;
    let mut core = core(cfg);
    let now = Instant::now();
    let a = core.join(now, None);
    let ta = task(&mut core, now, &a).unwrap();
    submit(&mut core, now, a, &ta, 1.0).unwrap();
    let later = now + Duration::from_secs(2);
    let te = task(&mut core, later, &a).expect("the evaluation round");
    assert_eq!(te.kind, TaskKind::Evaluate);
    assert_eq!((te.round, te.model_version), (2, 2));
}

#[test]
fn async_mode_refuses_what_needs_a_synchronized_cohort() {
    let refused = |edit: fn(&mut CoordinatorConfig)| {
        let mut c = config(2, 4, 10);
        edit(&mut c);
        c.validated().unwrap_err().to_string()
    };
    let e = refused(|c| c.secure_aggregation.enabled = true);
    assert!(e.contains("secure aggregation"), "{e}");
    let e = refused(|c| {
        c.privacy.mode = crate::config::DpMode::Central;
        c.privacy.sampling_rate = Some(0.1);
        c.strategy.weighting = crate::config::Weighting::Uniform;
    });
    assert!(
        e.contains("differential privacy") && e.contains("wrong ε"),
        "{e}"
    );
    let e = refused(|c| {
        c.strategy.name = StrategyName::Ease;
        c.strategy.weighting = crate::config::Weighting::Uniform;
    });
    assert!(e.contains("\"ease\""), "{e}");
    let mut als = config(2, 4, 10);
    als.strategy.name = StrategyName::Als;
    als.training.loss = crate::config::Loss::Als;
    assert!(als.validated().is_ok(), "the als step steps a buffer");
    let e = refused(|c| c.rounds.async_buffer = 5);
    assert!(e.contains("rounds.async_buffer"), "{e}");
    assert!(config(2, 4, 10).validated().is_ok());
}

#[test]
fn a_checkpoint_after_a_step_resumes_async_training() {
    let cfg = config(1, 2, 3);
    let mut core = core(cfg.clone());
    let now = Instant::now();
    let a = core.join(now, None);
    let ta = task(&mut core, now, &a).unwrap();
    submit(&mut core, now, a, &ta, 1.0).unwrap();
    let saved = core.checkpoint();
    let layout = Layout::new(vec![("item_bias".into(), vec![1])]);
    let mut resumed = RoundCore::resume(cfg.validated().unwrap(), layout, saved, now).unwrap();
    assert_eq!(resumed.model().version, 2);
    let t = task(&mut resumed, now, &a).expect("the pseudonym carries on");
    assert_eq!((t.round, t.model_version), (2, 2), "the next step");
    submit(&mut resumed, now, a, &t, 1.0).unwrap();
    let t = task(&mut resumed, now, &a).unwrap();
    submit(&mut resumed, now, a, &t, 1.0).unwrap();
    assert_eq!(resumed.model().params, vec![3.0]);
    assert_eq!(resumed.finished(), Some("completed 3 training rounds"));
}

/// The deadline index agrees with the tasks: a reissued task keeps one
/// deadline, expired tasks come out in deadline order, and the next deadline
/// is the earliest left.
#[test]
fn tasks_out_are_indexed_by_deadline() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let issued = |s: u64| Issued {
        round: 1,
        model_version: 0,
        deadline: at(s),
    };
    let (a, b, c) = (Pseudonym([1; 16]), Pseudonym([2; 16]), Pseudonym([3; 16]));
    let mut active = Active::default();
    active.insert(a, issued(30));
    active.insert(b, issued(10));
    active.insert(c, issued(20));
    active.insert(b, issued(40)); // b's task replaced
    assert_eq!(active.len(), 3);
    assert_eq!(active.next_deadline(), Some(at(20)));
    let expired: Vec<Pseudonym> = active
        .take_expired(at(30))
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(expired, vec![c, a]);
    assert_eq!(active.remove(&b).map(|t| t.deadline), Some(at(40)));
    assert_eq!((active.len(), active.next_deadline()), (0, None));
    assert!(active.take_expired(at(100)).is_empty());
}

/// `rounds.rest_secs`: a device that got a training task is told to wait
/// until its rest is over; the slot it freed goes to another device.
#[test]
fn a_device_rests_after_a_training_task() {
    let mut cfg = config(1, 1, 10);
    cfg.rounds.rest_secs = 60.0;
    let mut core = core(cfg);
    let now = Instant::now();
    let [a, b] = [0; 2].map(|_| core.join(now, None));
    let t = task(&mut core, now, &a).expect("a slot");
    submit(&mut core, now, a, &t, 1.0).unwrap();
    let later = now + Duration::from_secs(1);
    match core.check_in(later, &a).unwrap() {
        // Told to come back when its rest is over.
        CheckIn::Wait { retry_after } => assert_eq!(retry_after, Duration::from_secs(59)),
        other => panic!("a rests: {other:?}"),
    }
    assert!(task(&mut core, later, &b).is_some(), "b takes the slot");
    let rested = now + Duration::from_secs(60);
    let tb = task(&mut core, rested, &b).unwrap();
    submit(&mut core, rested, b, &tb, 1.0).unwrap();
    assert!(task(&mut core, rested, &a).is_some(), "a's rest is over");
}

/// A freed slot goes to a device drawn from those waiting, not to the one
/// that freed it (which checks in first); a device that stopped checking
/// in is not drawn.
#[test]
fn a_free_slot_goes_to_a_device_drawn_from_those_waiting() {
    let mut core = core(config(1, 1, 100));
    let t0 = Instant::now();
    let devices: Vec<Pseudonym> = (0..5).map(|_| core.join(t0, None)).collect();
    let gone = core.join(t0, None);
    let mut holder = devices[0];
    let mut t = task(&mut core, t0, &holder).expect("a free slot at once");
    for d in devices.iter().chain([&gone]) {
        assert!(
            task(&mut core, t0, d).is_none() || *d == holder,
            "the slot is taken"
        );
    }
    let (mut trained, mut kept) = (BTreeSet::new(), 0);
    // From 2 long polls on, `gone` (last seen at t0) has left.
    for step in 21..=60u64 {
        let now = t0 + Duration::from_secs(step);
        submit(&mut core, now, holder, &t, 1.0).unwrap();
        // The device that freed the slot checks in first, then the others.
        let order = std::iter::once(holder).chain(devices.iter().copied().filter(|d| *d != holder));
        let drawn: Vec<(Pseudonym, Task)> = order
            .filter_map(|d| task(&mut core, now, &d).map(|t| (d, t)))
            .collect();
        assert_eq!(drawn.len(), 1, "one slot, filled at once");
        kept += usize::from(drawn[0].0 == holder);
        (holder, t) = drawn[0].clone();
        trained.insert(holder);
    }
    assert!(!trained.contains(&gone));
    assert_eq!(trained.len(), devices.len(), "every waiting device trains");
    assert!(
        kept < 20,
        "the freeing device kept its slot {kept} times of 40"
    );
}

#[test]
fn a_slot_freed_by_an_update_goes_at_once_to_a_waiting_device() {
    let mut core = core(config(2, 2, 100));
    core.watch_handed();
    let t0 = Instant::now();
    let [a, b, c] = [(); 3].map(|()| core.join(t0, None));
    let t = task(&mut core, t0, &a).expect("a free slot at once");
    assert!(task(&mut core, t0, &c).is_some(), "the second slot");
    assert!(task(&mut core, t0, &b).is_none(), "both slots are taken");
    assert_eq!(core.take_handed(), vec![a, c]);
    let generation = core.generation();
    submit(&mut core, t0 + Duration::from_secs(1), a, &t, 1.0).unwrap();
    // No step yet (2 updates make one): the slot itself went to `b`, and a
    // held check-in is woken for it.
    assert_eq!(core.take_handed(), vec![b], "b drawn when a's update came");
    assert!(core.generation() > generation);
    assert!(task(&mut core, t0 + Duration::from_secs(2), &b).is_some());
    assert!(core.take_handed().is_empty(), "handed once");
}

#[test]
fn a_slot_freed_by_a_header_refused_as_too_stale_goes_at_once_to_a_waiting_device() {
    let mut c = config(1, 2, 100);
    c.rounds.async_max_staleness = 0;
    let mut core = core(c);
    core.watch_handed();
    let t0 = Instant::now();
    let [a, b, c, d] = [(); 4].map(|()| core.join(t0, None));
    let ta = task(&mut core, t0, &a).expect("a slot");
    let tc = task(&mut core, t0, &c).expect("a slot");
    assert!(task(&mut core, t0, &b).is_none() && task(&mut core, t0, &d).is_none());
    // c's update steps the model (K = 1); its slot goes to b or d.
    submit(&mut core, t0 + Duration::from_secs(1), c, &tc, 1.0).unwrap();
    let first = core.take_handed();
    assert_eq!(first.len(), 3, "a, c, then one of b and d: {first:?}");
    // a's update is now one version stale: refused at its header, before
    // any value is sent; its slot goes to the other waiting device at once.
    let refused = core.check_update_header(t0 + Duration::from_secs(2), &header(a, &ta));
    assert!(
        matches!(refused, Err(CoordinatorError::TooStale { .. })),
        "{refused:?}"
    );
    let other = if first[2] == b { d } else { b };
    assert_eq!(core.take_handed(), vec![other]);
}
