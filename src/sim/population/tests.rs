//! The population simulator: availability windows, drop-outs, both modes,
//! and determinism.

use fedrec_coordinator::config::RoundsMode;

use super::*;
use crate::data::{SyntheticConfig, synthetic};
use crate::sim::{self, Baselines, SimConfig, Transport};

fn population(hours: f64) -> Population {
    Population {
        hours,
        evaluate_every_minutes: 120.0,
        ..Population::default()
    }
}

fn run(mode: RoundsMode, p: Population) -> PopulationReport {
    run_with(mode, p, |_| {})
}

fn run_with(
    mode: RoundsMode,
    p: Population,
    edit: impl FnOnce(&mut fedrec_coordinator::config::CoordinatorConfig),
) -> PopulationReport {
    let ds = synthetic(&SyntheticConfig {
        users: 150,
        items: 40,
        ..SyntheticConfig::default()
    })
    .unwrap();
    let mut coordinator = sim::default_coordinator_config();
    coordinator.rounds.rounds = 6;
    coordinator.rounds.clients_per_round = 10;
    coordinator.rounds.over_selection = 1.3;
    coordinator.rounds.deadline_secs = 300.0;
    coordinator.rounds.checkin_window_secs = 120.0;
    coordinator.rounds.mode = mode;
    coordinator.rounds.async_buffer = 10;
    coordinator.rounds.async_concurrency = 15;
    edit(&mut coordinator);
    let cfg = SimConfig {
        coordinator,
        transport: Transport::Inproc,
        seed: 11,
        centralized_epochs: 1,
        baselines: Baselines::Quick,
        auto: false,
        attack: None,
        population: Some(p),
        held_out: Default::default(),
    };
    let report = sim::run(&ds, &cfg, &mut ()).unwrap();
    report
        .population
        .into_iter()
        .next()
        .expect("a population run")
}

#[test]
fn windows_are_sorted_disjoint_and_within_the_horizon() {
    let p = Population::default();
    let horizon = 72.0 * 3600.0;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..50 {
        let t = Traits::draw(&p, horizon, &mut rng);
        assert!(t.compute_secs > 0.0 && t.download_bps > 0.0 && t.upload_bps > 0.0);
        for w in t.windows.windows(2) {
            assert!(w[0].1 < w[1].0, "disjoint and sorted: {w:?}");
        }
        for &(s, e) in &t.windows {
            assert!(s >= 0.0 && s < horizon && e > s);
            assert_eq!(t.window_at(s), Ok(e));
        }
    }
    let never = Population {
        availability: Availability {
            night_probability: 0.0,
            windows_per_day: 0.0,
            ..Availability::default()
        },
        ..Population::default()
    };
    let t = Traits::draw(&never, horizon, &mut rng);
    assert!(t.windows.is_empty());
    assert_eq!(t.window_at(0.0), Err(None));
}

#[test]
fn both_modes_train_and_the_run_is_deterministic() {
    for mode in [RoundsMode::Sync, RoundsMode::Async] {
        let a = run(mode, population(24.0));
        assert!(a.accepted >= 60, "{mode:?}: 6 steps of 10: {a:?}");
        assert!(a.device_hours > 0.0 && (0.0..1.0).contains(&a.thrown_away));
        assert!(a.curve.len() >= 2, "{mode:?}: {:?}", a.curve);
        assert!(a.curve.last().unwrap().model_version > 1);
        let b = run(mode, population(24.0));
        assert_eq!(a.curve, b.curve, "{mode:?}: same seed, same run");
        assert_eq!(
            (a.accepted, a.refused, a.dropped),
            (b.accepted, b.refused, b.dropped)
        );
    }
}

/// The `als` step in async mode: each buffer of updates, trained on
/// versions up to `async_max_staleness` apart, steps the items by its
/// curvature, and the model improves on the devices' held-out purchases.
#[test]
fn async_mode_steps_the_als_strategy() {
    use fedrec_coordinator::config::{Loss, StrategyName, Weighting};
    let r = run_with(RoundsMode::Async, population(24.0), |c| {
        c.training.loss = Loss::Als;
        c.training.learning_rate = 1.0;
        c.strategy.name = StrategyName::Als;
        c.strategy.weighting = Weighting::Uniform;
        c.model.init_std = 0.01;
    });
    assert!(r.accepted >= 60, "6 steps of 10: {r:?}");
    let (first, last) = (&r.curve[0], r.curve.last().unwrap());
    assert_eq!(last.model_version, 7, "{:?}", r.curve);
    assert!(last.hr_at_10 > first.hr_at_10, "{:?}", r.curve);
}

#[test]
fn drop_outs_throw_the_work_away() {
    let p = Population {
        dropout: 1.0,
        ..population(6.0)
    };
    let r = run(RoundsMode::Async, p);
    assert!(r.tasks > 0 && r.dropped > 0);
    assert_eq!(r.accepted, 0);
    assert_eq!(r.thrown_away, 1.0);
    assert_eq!(r.curve.last().unwrap().model_version, 1, "nothing applied");
}

#[test]
fn the_shipped_population_file_is_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("populations/phones.toml");
    assert_eq!(Population::from_file(&path).unwrap(), Population::default());
}

#[test]
fn a_bad_population_file_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pop.toml");
    std::fs::write(&path, "dropout = 1.5\n").unwrap();
    let err = format!("{:#}", Population::from_file(&path).unwrap_err());
    assert!(err.contains("pop.toml") && err.contains("dropout"), "{err}");
    std::fs::write(&path, "[compute]\nmedian = 3\n").unwrap();
    let err = format!("{:#}", Population::from_file(&path).unwrap_err());
    assert!(err.contains("unknown field"), "{err}");
}

/// Free async slots go to devices drawn from those waiting, so updates come
/// from many devices; `rounds.rest_secs` spreads them over more still.
#[test]
fn a_rest_spreads_async_training_over_the_fleet() {
    let contributors = |rest: f64| {
        let r = run_with(RoundsMode::Async, population(6.0), |c| {
            c.rounds.rest_secs = rest;
        });
        assert!(r.accepted >= 60, "6 steps of 10: {r:?}");
        (r.curve.last().unwrap().contributors, r.accepted)
    };
    let (without, accepted) = contributors(0.0);
    let (with, _) = contributors(1800.0);
    assert!(without < accepted, "some devices trained more than once");
    assert!(
        with > without,
        "{with} devices with a rest, {without} without"
    );
}

#[test]
fn a_free_slot_is_taken_as_soon_as_it_frees() {
    // Always available, never dropping out, 30 s a task on a fast network:
    // 2 slots over an hour hold 2 × 120 tasks when a waiting device (its
    // check-in held, as over gRPC) starts the moment a slot frees. Waiting
    // for its next check-in instead (up to `server.long_poll_secs`, 10 s)
    // fitted 192.
    let mut p = population(1.0);
    p.dropout = 0.0;
    p.compute.sigma = 0.0;
    p.compute.median_secs = 30.0;
    p.network = Network {
        download_mbps: 1e4,
        upload_mbps: 1e4,
        sigma: 0.0,
    };
    p.availability.night_hours = 24.0;
    p.availability.night_probability = 1.0;
    p.availability.windows_per_day = 0.0;
    let r = run_with(RoundsMode::Async, p, |c| {
        c.rounds.rounds = 1000;
        c.rounds.async_buffer = 2;
        c.rounds.async_concurrency = 2;
    });
    assert!(
        (228..=240).contains(&r.tasks),
        "{} tasks in 2 slots of 120 each",
        r.tasks
    );
}
