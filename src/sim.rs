//! Simulations: one virtual device per user of a data set, against a real
//! coordinator core.
//!
//! Two transports run the same coordinator core and the same device code
//! (each device converts the wire form of its task into a
//! [`fedrec_client::task::Task`] and works on it with
//! [`Device::run_task`]):
//! - [`Transport::Grpc`]: a coordinator served on 127.0.0.1 (port 0), every
//!   device a [`Participant`] speaking the whole protocol, as in a
//!   deployment (the devices share [`SIM_CONNECTIONS`] HTTP/2 connections);
//! - [`Transport::Inproc`]: the core driven by direct method calls with a
//!   virtual clock, devices trained in parallel on all cores. Deterministic:
//!   the same seed gives the same numbers.
//!
//! Both end with a federated evaluation round in which every device ranks its
//! held-out purchase locally and reports only counts; the report sets those
//! beside the centralized and popularity baselines on the same split.
//!
//! With `secure_aggregation.enabled`, both run every training round through
//! secure aggregation with the devices' real [`fedrec_client::secagg`]
//! state machines ([`secure`] in process).

mod grpc;
mod inproc;
pub mod population;
mod presets;
mod report;
pub mod search;
pub mod secagg;
pub mod tracks;

use grpc::run_grpc;
pub use grpc::{SIM_ACTIVE, SIM_CONNECTIONS, connect};
use inproc::{Outcome, record_summary, run_inproc};
pub use presets::*;
pub use report::*;

pub use tracks::{Baselines, Final};

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use fedrec_client::clock::ManualClock;
use fedrec_client::consent::Consent;
use fedrec_client::device::Device;
use fedrec_client::model::{LocalTraining, Model};
use fedrec_client::ranking::EvalCounts;
use fedrec_client::recommend::Row;
use fedrec_client::retention::RetentionPolicy;
use fedrec_client::store::Purchase;
use fedrec_coordinator::config::{CoordinatorConfig, StrategyName, ValidConfig};
use fedrec_coordinator::round::RoundCore;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::{Dataset, Evaluation, Protocol, Stage, Track};
use crate::eval::{self, Coverage, Metrics};

/// How devices reach the coordinator in a simulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Real gRPC over loopback.
    Grpc,
    /// The same core without sockets (deterministic, for large runs).
    Inproc,
}

/// Everything a simulation needs besides the data.
#[derive(Clone, Debug, Serialize)]
pub struct SimConfig {
    /// The coordinator's configuration (rounds, cohort, training, strategy, model).
    pub coordinator: CoordinatorConfig,
    /// Transport between devices and coordinator.
    pub transport: Transport,
    /// Seed of everything random: model init, devices, cohorts, evaluation.
    pub seed: u64,
    /// Epochs of the centralized baseline over all users' data.
    pub centralized_epochs: u32,
    /// Which baselines run beside fedrec.
    pub baselines: Baselines,
    /// Choose factors, confidence and regularization by federated
    /// evaluation on the validation events first ([`search`]).
    pub auto: bool,
    /// Devices that misbehave (in-process plain rounds only), to measure
    /// robust aggregation. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attack: Option<Attack>,
    /// Simulate a fleet of phones on a virtual clock instead of
    /// always-available devices ([`population`]; in process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub population: Option<population::Population>,
    /// The events the devices hold out and every figure is measured on:
    /// the test events, or the validation events (one earlier, on data
    /// without the test events) to choose settings without looking at test.
    pub held_out: Stage,
}

/// Some devices send bad updates.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Attack {
    /// What they send.
    pub kind: AttackKind,
    /// The fraction of devices that misbehave, chosen by the seed.
    pub fraction: f64,
}

/// What a misbehaving device sends instead of its update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttackKind {
    /// Its honest update times 100.
    Scale,
    /// Standard normal noise in every value.
    Noise,
}

impl Attack {
    /// Whether device `index` misbehaves under `seed`.
    fn applies(&self, seed: u64, index: usize) -> bool {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xBAD_DE71CE ^ index as u64);
        rand::RngExt::random_bool(&mut rng, self.fraction.clamp(0.0, 1.0))
    }

    /// Turns `update` into the attack's.
    fn corrupt(&self, update: &mut [f32], seed: u64, round: u32) {
        match self.kind {
            AttackKind::Scale => update.iter_mut().for_each(|v| *v *= 100.0),
            AttackKind::Noise => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (u64::from(round) << 32));
                let normal = rand_distr::StandardNormal;
                update
                    .iter_mut()
                    .for_each(|v| *v = rand_distr::Distribution::sample(&normal, &mut rng));
            }
        }
    }
}

/// The devices of a cut: one per user with training data, each holding its
/// training purchases (with their times and quantities) and, as its
/// held-out purchase, its event in `ev` (if any).
pub fn make_devices(
    model: &Arc<dyn Model>,
    protocol: &Protocol,
    ev: &Evaluation,
    seed: u64,
) -> anyhow::Result<Vec<(usize, Device)>> {
    let cut = &protocol.cuts[ev.cut];
    let mut devices = Vec::new();
    for user in 0..cut.n_users() {
        if !cut.items[user].is_empty() {
            devices.push((user, make_device(model, protocol, ev, user, seed)?));
        }
    }
    Ok(devices)
}

/// The device of `user`: its training purchases of `ev`'s cut in the store
/// and its held-out purchase in `ev` (if any) as evaluation target, with
/// the same candidates as every other method under `seed`.
pub fn make_device(
    model: &Arc<dyn Model>,
    protocol: &Protocol,
    ev: &Evaluation,
    user: usize,
    seed: u64,
) -> anyhow::Result<Device> {
    make_catalogue_device(model, protocol, ev, user, seed, Some).map(|(device, _)| device)
}

/// What [`make_catalogue_device`] could not map into the coordinator's
/// catalogue: those purchases stay on the device, unused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unmapped {
    /// Training purchases of items the catalogue does not list.
    pub purchases: usize,
    /// Distinct such items.
    pub items: usize,
    /// Whether the held-out purchase's item is not listed (the device then
    /// holds nothing out and its evaluations count nothing).
    pub held_out: bool,
}

/// [`make_device`] for a device whose model rows are the coordinator's
/// catalogue rather than the data set's items: `index` maps a data-set item
/// to its model row, if the catalogue lists it. Purchases of items it does
/// not list are left out of the device's store and counted.
pub fn make_catalogue_device(
    model: &Arc<dyn Model>,
    protocol: &Protocol,
    ev: &Evaluation,
    user: usize,
    seed: u64,
    index: impl Fn(u32) -> Option<u32>,
) -> anyhow::Result<(Device, Unmapped)> {
    // The device lives at the moment of its held-out purchase (the first
    // event after its training data), or of its last purchase: replayed
    // data are in the past, and "now" is when the shopper shops.
    let events = &protocol.histories.users[user];
    let end = protocol.cuts[ev.cut].ends[user];
    let now = events.get(end).or(events.last()).map_or(0, |e| e.time);
    let mut device = Device::builder(Arc::clone(model))
        .seed(seed ^ (user as u64).wrapping_mul(0xA24B_AED4_963E_E407))
        .retention(RetentionPolicy::UNLIMITED)
        .clock(Arc::new(ManualClock::new(now)))
        .in_memory()?;
    // A simulated shopper has opted in to federated training.
    device.set_consent(Consent::Federated)?;
    let mut unmapped = Unmapped::default();
    let mut unknown_items = std::collections::HashSet::new();
    for e in protocol.cuts[ev.cut].events(&protocol.histories, user) {
        match index(e.item) {
            Some(item) => {
                device.record(Purchase::new(item, e.time, e.quantity))?;
            }
            None => {
                unmapped.purchases += 1;
                unknown_items.insert(e.item);
            }
        }
    }
    unmapped.items = unknown_items.len();
    if let Some(mut held) = eval::held_out(ev, seed, user) {
        match index(held.item) {
            Some(item) => {
                held.item = item;
                device.hold_out(held)?;
            }
            None => unmapped.held_out = true,
        }
    }
    Ok((device, unmapped))
}

/// The device-side training configuration of a coordinator configuration.
pub fn device_training(t: &fedrec_coordinator::config::TrainingConfig) -> LocalTraining {
    LocalTraining {
        local_epochs: t.local_epochs,
        learning_rate: t.learning_rate,
        regularization: t.regularization,
        negatives: t.negatives,
        proximal_mu: t.proximal_mu,
        loss: t.loss,
        confidence: t.confidence,
        user_moment: false,
    }
}

/// What a federated run on a cut is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RunKind {
    /// The first track's run: everything, the diversity knob included.
    Main,
    /// Another cut's run: federated, centralized, on-device rows.
    Other,
    /// A search trial: the federated evaluation on its own track only.
    Trial,
}

/// One federated run on one training cut, and what it measured.
pub(crate) struct CutRun {
    rounds: Vec<RoundRow>,
    /// The federated figures per track evaluated on this cut.
    federated: Vec<(Track, Metrics)>,
    /// The centralized figures per track.
    centralized: Vec<(Track, Metrics)>,
    /// The devices' own buy-again and blended rows, per track.
    on_device: Vec<(Track, &'static str, Metrics)>,
    diversity: Option<crate::diversity::DiversityReport>,
    federated_seconds: f64,
    centralized_seconds: f64,
    coord: ValidConfig,
    population: Option<population::PopulationReport>,
}

/// Runs a whole simulation on `ds`: for each training cut of the
/// evaluation protocol (discover's, and the latest-time cut of buy-again
/// and next purchase where it differs), federated training over the chosen
/// transport and the devices' evaluation, fedrec's centralized model; then
/// the baselines on every track.
pub fn run(ds: &Dataset, cfg: &SimConfig, observer: &mut dyn Observer) -> anyhow::Result<Report> {
    let start = Instant::now();
    let protocol = Protocol::new(ds);
    let tracks = protocol.tracks();
    let training_order = protocol.training_tracks();
    let Some(&first) = training_order.first() else {
        bail!(
            "no user of {} has a purchase at two different times: nothing to hold out",
            ds.name
        );
    };
    let mut cfg = cfg.clone();
    let search = if cfg.auto {
        let report = search::search(&protocol, &cfg, observer)?;
        report.chosen.settings.apply(&mut cfg.coordinator);
        Some(report)
    } else {
        None
    };
    let cfg = &cfg;
    // One federated run per test cut, each evaluated on the tracks of its
    // cut. Devices hold the event of the cut's first track in training
    // order: discover, or next purchase on the latest-time cut (every user
    // has a next purchase; only re-buyers have a buy-again event), so a
    // population run follows that track's quality.
    let mut runs: Vec<CutRun> = Vec::new();
    let mut run_cuts: Vec<usize> = Vec::new();
    for &track in &training_order {
        let Some(ev) = protocol.evaluation(track, cfg.held_out) else {
            continue;
        };
        if run_cuts.contains(&ev.cut) {
            continue;
        }
        run_cuts.push(ev.cut);
        let others: Vec<&Evaluation> = protocol
            .evaluations_of(ev.cut)
            .filter(|e| e.stage == cfg.held_out && e.track != track)
            .collect();
        let kind = if runs.is_empty() {
            RunKind::Main
        } else {
            RunKind::Other
        };
        runs.push(run_cut(&protocol, ev, &others, cfg, observer, kind)?);
    }

    observer.phase("baselines");
    let mut baselines =
        tracks::baselines(&protocol, cfg.baselines, cfg.held_out, cfg.seed, &mut |p| {
            observer.phase(p)
        });
    let mut final_tracks = Vec::new();
    for &track in &tracks {
        let Some(ev) = protocol.evaluation(track, cfg.held_out) else {
            continue;
        };
        let valid = protocol.evaluation(track, Stage::Validation);
        let mut methods = Vec::new();
        for run in &runs {
            for (t, m) in &run.federated {
                if *t == track {
                    methods.push(tracks::MethodResult::plain("federated", *m));
                }
            }
            for (t, m) in &run.centralized {
                if *t == track {
                    methods.push(tracks::MethodResult::plain("centralized", *m));
                }
            }
            for (t, name, m) in &run.on_device {
                if *t == track {
                    methods.push(tracks::MethodResult::plain(name, *m));
                }
            }
        }
        methods.extend(baselines.remove(&track).unwrap_or_default());
        final_tracks.push(tracks::TrackReport {
            track,
            users: ev.n_users(),
            skipped_users: ev.skipped_users,
            dropped_events: ev.dropped_events,
            validation_users: valid.map_or(0, Evaluation::n_users),
            methods,
        });
    }
    let mut runs = runs.into_iter();
    let main = runs.next().context("no federated run")?;
    let latest = runs.next();
    let population = std::iter::once(&main)
        .chain(latest.as_ref())
        .filter_map(|r| r.population.clone())
        .collect();
    let coord = main.coord.clone();
    let rounds = main.rounds;
    let device_rounds: usize = rounds.iter().map(|r| r.participants).sum();
    let round_seconds: f64 = rounds.iter().map(|r| r.seconds).sum();
    let secure_aggregation = SecureReport::new(&coord, &rounds);
    let privacy = PrivacyReport::new(&coord, &rounds);
    let encoding = coord.download.encoding;
    let values = coord.model.factors.saturating_add(1) * protocol.n_items();
    let download = DownloadReport {
        encoding,
        values,
        bytes_per_device: encoding.wire_bytes(values),
    };
    let first_ev = protocol
        .evaluation(first, cfg.held_out)
        .context("first track")?;
    Ok(Report {
        population,
        search,
        secure_aggregation,
        privacy,
        download,
        config: SimConfig {
            coordinator: coord.into_inner(),
            ..cfg.clone()
        },
        data: DataSummary {
            name: ds.name.clone(),
            users: ds.n_users(),
            items: protocol.n_items(),
            interactions: ds.interactions.len(),
            merged_rows: protocol.histories.merged_rows,
            test_users: first_ev.n_users(),
            skipped_users: first_ev.skipped_users,
            skipped_rows: ds.skipped.clone(),
        },
        rounds,
        rounds_latest_cut: latest
            .as_ref()
            .map(|r| r.rounds.clone())
            .unwrap_or_default(),
        final_: tracks::Final {
            tracks: final_tracks,
            diversity: main
                .diversity
                .unwrap_or_else(|| crate::diversity::DiversityReport {
                    embedding: "",
                    rows: Vec::new(),
                }),
        },
        timing: Timing {
            total_seconds: start.elapsed().as_secs_f64(),
            federated_seconds: main.federated_seconds
                + latest.as_ref().map_or(0.0, |r| r.federated_seconds),
            centralized_seconds: main.centralized_seconds
                + latest.as_ref().map_or(0.0, |r| r.centralized_seconds),
            device_rounds,
            devices_per_second: if round_seconds > 0.0 {
                device_rounds as f64 / round_seconds
            } else {
                0.0
            },
            peak_rss_mb: crate::bench::peak_rss_mb("/proc/self/status").ok(),
        },
    })
}

/// Federated training on `ev`'s cut with the devices holding `ev`'s events,
/// then the devices' evaluation on `ev` (through the final evaluation
/// round) and on `others` (the other tracks of the same cut, on the same
/// devices), and the centralized model on all of them.
pub(crate) fn run_cut(
    protocol: &Protocol,
    ev: &Evaluation,
    others: &[&Evaluation],
    cfg: &SimConfig,
    observer: &mut dyn Observer,
    kind: RunKind,
) -> anyhow::Result<CutRun> {
    let n_items = protocol.n_items();
    let cut = &protocol.cuts[ev.cut];
    let mut coord = cfg.coordinator.clone();
    coord.rounds.seed = Some(cfg.seed);
    coord.model.items = Some(n_items);
    // A population run measures quality itself, on the devices it has.
    coord.rounds.final_evaluation = cfg.population.is_none();
    let model = model_for(&coord, n_items)?;
    let devices = make_devices(&model, protocol, ev, cfg.seed)?;
    if devices.is_empty() {
        bail!("the data set has no user with training data");
    }
    // Never ask for more devices than exist.
    coord.rounds.clients_per_round = coord.rounds.clients_per_round.min(devices.len());
    coord.rounds.min_updates = coord.rounds.min_updates.min(coord.rounds.clients_per_round);
    if coord.privacy.enabled() && coord.privacy.sampling_rate.is_none() {
        // Poisson sampling with the cohort size asked for, on average.
        coord.privacy.sampling_rate =
            Some(coord.rounds.clients_per_round as f64 / devices.len() as f64);
    }
    let coord = coord
        .validated()
        .context("invalid coordinator configuration")?;
    let params = model.init_global(&mut ChaCha8Rng::seed_from_u64(cfg.seed));
    let core = RoundCore::new(coord.clone(), model.layout(), params)
        .context("cannot start the coordinator")?;

    observer.phase(&format!("federated training, {} cut", ev.track));
    observer.start(coord.rounds.rounds);
    let fed_start = Instant::now();
    let mut fleet = None;
    let (rounds, final_counts, global, mut devices) = match (&cfg.population, cfg.transport) {
        (Some(p), _) => {
            let training = device_training(&coord.training);
            let (outcome, report) =
                population::run_population(core, devices, p, ev, &training, cfg.seed, observer)?;
            fleet = Some(report);
            outcome
        }
        (None, Transport::Inproc) => run_inproc(core, devices, observer, cfg.attack)?,
        (None, Transport::Grpc) => run_grpc(core, devices, observer)?,
    };
    // Coverage of the federated model: each evaluated device's own top 10
    // (computed on the device; a simulation can look, a deployment would
    // aggregate it).
    let mut coverage = Coverage::new(n_items);
    for (user, device) in devices.iter_mut() {
        if let Some(held) = eval::held_out(ev, cfg.seed, *user) {
            coverage.add(&device.evaluate_held_out(&global, &held, Row::Discover)?.1);
        }
    }
    let mut federated = vec![(
        ev.track,
        Metrics::from_counts(
            &final_counts,
            coverage.covered(),
            n_items,
            ev.track.sampled(),
        ),
    )];
    // The other tracks of this cut, and the device's own buy-again and
    // blended rows on the tracks without exclusion, on the same devices and
    // model.
    let mut on_device = Vec::new();
    for e in std::iter::once(ev).chain(others.iter().copied()) {
        let rows: &[(&str, Row)] = match (e.track == ev.track, e.track.excludes_history()) {
            (true, true) => &[],
            (true, false) => &[
                ("buy_again_on_device", Row::BuyAgain),
                ("blended_on_device", Row::Blended),
            ],
            (false, true) => &[("federated", Row::Discover)],
            (false, false) => &[
                ("federated", Row::Discover),
                ("buy_again_on_device", Row::BuyAgain),
                ("blended_on_device", Row::Blended),
            ],
        };
        for &(name, row) in rows {
            let mut counts = EvalCounts::default();
            let mut coverage = Coverage::new(n_items);
            for (user, device) in &devices {
                if let Some(held) = eval::held_out(e, cfg.seed, *user) {
                    let (c, top) = device.evaluate_held_out(&global, &held, row)?;
                    counts.add(&c);
                    coverage.add(&top);
                }
            }
            let m = Metrics::from_counts(&counts, coverage.covered(), n_items, e.track.sampled());
            if name == "federated" {
                federated.push((e.track, m));
            } else {
                on_device.push((e.track, name, m));
            }
        }
    }
    let diversity = if kind == RunKind::Main {
        Some(crate::diversity::evaluate(&devices, &global, n_items)?)
    } else {
        None
    };
    let federated_seconds = fed_start.elapsed().as_secs_f64();
    if kind == RunKind::Trial {
        return Ok(CutRun {
            rounds,
            federated,
            centralized: Vec::new(),
            on_device,
            diversity,
            federated_seconds,
            centralized_seconds: 0.0,
            coord,
            population: fleet,
        });
    }

    observer.phase(&format!("centralized baseline, {} cut", ev.track));
    let cen_start = Instant::now();
    let evals: Vec<&Evaluation> = std::iter::once(ev).chain(others.iter().copied()).collect();
    let centralized: Vec<(Track, Metrics)> = if coord.strategy.name == StrategyName::Ease {
        // EASE in one place is the closed form on all the cut's data.
        let fitted = crate::baselines::Baseline::Ease {
            lambda: coord.strategy.ease_lambda,
        }
        .fit(&protocol.histories, cut)
        .map_err(anyhow::Error::msg)?;
        evals
            .iter()
            .map(|e| {
                (
                    e.track,
                    eval::evaluate(cut, e, cfg.seed, |u, out| fitted.score(u, out)),
                )
            })
            .collect()
    } else {
        let (params, users) = eval::train_centralized(
            &model,
            cut,
            &device_training(&coord.training),
            cfg.centralized_epochs,
            cfg.seed,
        );
        evals
            .iter()
            .map(|e| {
                (
                    e.track,
                    eval::evaluate(cut, e, cfg.seed, |u, out| {
                        model.score_all(&params, &users[u], &cut.items[u], out)
                    }),
                )
            })
            .collect()
    };
    if let Some(fleet) = fleet.as_mut()
        && let Some((_, m)) = centralized.iter().find(|(t, _)| *t == ev.track)
    {
        fleet.set_target(m.full.hr_at_10, population::TARGET_FRACTION);
    }
    Ok(CutRun {
        rounds,
        federated,
        centralized,
        on_device,
        diversity,
        federated_seconds,
        centralized_seconds: cen_start.elapsed().as_secs_f64(),
        coord,
        population: fleet,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fedrec_client::model::MatrixFactorization;
    use fedrec_client::task::Task as DeviceTask;
    use fedrec_coordinator::round::CheckIn;
    use fedrec_coordinator::service::task_to_pb;
    use fedrec_proto::codec::Encoding;

    use super::inproc::check_in;
    use super::*;
    use crate::data::Interaction;

    /// Sessions expire without enrollment tokens too (issue 19, item 4).
    /// The virtual clock moves only to a timer while no device has work, so
    /// a simulation stays far below `auth.session_ttl_secs`; should it pass
    /// it, a device joins again, as the SDK's do, rather than failing the run.
    #[test]
    fn an_inproc_device_joins_again_when_its_session_expired() {
        let layout = fedrec_proto::Layout::new(vec![("b".into(), vec![1])]);
        let mut core = RoundCore::new(ValidConfig::default(), layout, vec![0.0]).unwrap();
        let t0 = Instant::now();
        let first = core.join(t0, None);
        let mut pseudonym = first;
        let later = t0 + core.config().auth.session_ttl();
        assert!(check_in(&mut core, later, &mut pseudonym).is_ok());
        assert_ne!(pseudonym, first, "a fresh session");
        assert_eq!(core.joined(), 1);
    }

    /// The in-process transport's edge: a device reads its task through the
    /// wire form, as over gRPC, and finds what the coordinator set.
    #[test]
    fn devices_read_their_task_as_the_coordinator_set_it() {
        use fedrec_coordinator::config::{DpMode, Loss, Weighting};
        let mut secure = default_coordinator_config();
        secure.rounds.clients_per_round = 3;
        secure.rounds.min_updates = 3;
        secure.secure_aggregation.enabled = true;
        secure.privacy.mode = DpMode::Distributed;
        secure.privacy.noise_multiplier = 0.5;
        secure.privacy.sampling_rate = Some(0.5);
        secure.privacy.adaptive_clip = true;
        secure.strategy.weighting = Weighting::Uniform;
        let mut plain = default_coordinator_config();
        plain.rounds.clients_per_round = 3;
        plain.rounds.min_updates = 3;
        plain.upload.encoding = Encoding::Q8;
        plain.training.loss = Loss::Als;
        plain.training.proximal_mu = 0.5;
        for mut cfg in [secure, plain] {
            // Seeded: Poisson sampling at q = 0.5 draws all three devices
            // (min_updates) in one round of eight, so an unseeded run could
            // miss a task in 20 tries.
            cfg.rounds.seed = Some(7);
            let layout = fedrec_proto::Layout::new(vec![("b".into(), vec![4])]);
            let mut core =
                RoundCore::new(cfg.clone().validated().unwrap(), layout, vec![0.0; 4]).unwrap();
            let t0 = Instant::now();
            let mut pseudonyms: Vec<_> = (0..3).map(|_| core.join(t0, None)).collect();
            // As `run_inproc` does: check in, else move the clock to the
            // next timer, until a round hands out a task.
            let mut now = t0 + Duration::from_millis(1_250);
            let mut task = None;
            for _ in 0..20 {
                for p in &mut pseudonyms {
                    if let CheckIn::Task(t) = check_in(&mut core, now, p).unwrap() {
                        task.get_or_insert(t);
                    }
                }
                if task.is_some() {
                    break;
                }
                now = core.poll_timeout().filter(|t| *t > now).unwrap_or(now)
                    + Duration::from_millis(250);
                core.poll(now);
            }
            let task = task.expect("a task");
            let device = DeviceTask::try_from(&task_to_pb(&task, now)).unwrap();
            assert_eq!(device.round(), task.round);
            assert_eq!(device.model_version(), task.model_version);
            assert_eq!(
                device.deadline().as_millis(),
                task.deadline.duration_since(now).as_millis()
            );
            assert_eq!(
                *device.training(),
                LocalTraining {
                    user_moment: task.user_moment,
                    ..device_training(&task.training)
                }
            );
            assert_eq!(device.evaluate(), task.evaluate);
            assert_eq!(device.upload_encoding(), task.upload_encoding);
            let dp = device
                .dp()
                .map(|d| (d.clip, d.noise_std, d.count_noise_std));
            let want = task
                .privacy
                .map(|p| (p.clip, p.noise_std, p.count_noise_std));
            assert_eq!(dp, want);
            assert_eq!(
                device.privacy().map(|p| (p.epsilon, p.delta)),
                task.privacy.map(|p| (p.epsilon, p.delta))
            );
            let secure = device
                .secure()
                .map(|s| (s.party, s.config.clone(), s.weighting));
            let want = task
                .secure_aggregation
                .as_ref()
                .map(|s| (s.party, s.config.clone(), s.weighting));
            assert_eq!(secure, want);
            assert_eq!(secure.is_some(), cfg.secure_aggregation.enabled);
            assert_eq!(dp.is_some(), cfg.privacy.enabled());
        }
    }

    /// Replayed purchases of any date become devices: a simulated device
    /// lives at the moment of its held-out purchase, so neither a past
    /// data set nor one dated after today's clock is refused.
    #[test]
    fn devices_replay_purchases_of_any_date() {
        let year_2100 = 4_102_444_800;
        let rows = [(0, 0, 1), (0, 1, 2), (1, 1, 1), (1, 2, 3)];
        let ds = Dataset {
            name: "t".into(),
            user_ids: vec!["a".into(), "b".into()],
            item_ids: vec!["x".into(), "y".into(), "z".into()],
            interactions: rows
                .iter()
                .map(|&(user, item, day)| Interaction {
                    user,
                    item,
                    time: year_2100 + day * 86_400,
                    quantity: 1.0,
                })
                .collect(),
            timed: true,
            ..Dataset::default()
        };
        let protocol = Protocol::new(&ds);
        let model: Arc<dyn Model> = Arc::new(MatrixFactorization::new(3, 4, 0.1).unwrap());
        let ev = protocol.evaluation(Track::Discover, Stage::Test).unwrap();
        let devices = make_devices(&model, &protocol, ev, 1).unwrap();
        assert_eq!(devices.len(), 2);
        for (user, device) in &devices {
            let first = protocol.histories.users[*user][0];
            assert_eq!(device.store().purchases()[0].time, first.time);
            // The clock is at the held-out purchase.
            assert_eq!(
                device.clock().unix_now(),
                year_2100 + [2, 3][*user] * 86_400
            );
        }
    }

    /// Over-selection in process: the devices beyond a round's target
    /// finish after it closed; their updates are refused as late and the
    /// run goes on (it used to fail on the first of them).
    #[test]
    fn over_selected_devices_late_for_their_round_do_not_fail_the_run() {
        let ds = crate::data::synthetic(&crate::data::SyntheticConfig {
            users: 60,
            items: 30,
            ..crate::data::SyntheticConfig::default()
        })
        .unwrap();
        let mut coordinator = default_coordinator_config();
        coordinator.rounds.rounds = 3;
        coordinator.rounds.clients_per_round = 10;
        coordinator.rounds.over_selection = 1.5;
        let cfg = SimConfig {
            coordinator,
            transport: Transport::Inproc,
            seed: 3,
            centralized_epochs: 1,
            baselines: Baselines::Quick,
            auto: false,
            attack: None,
            population: None,
            held_out: Default::default(),
        };
        let report = run(&ds, &cfg, &mut ()).unwrap();
        let training: Vec<_> = report.rounds.iter().filter(|r| r.completed).collect();
        assert!(training.len() >= 3, "{:?}", report.rounds);
        assert!(
            training.iter().any(|r| r.participants == 10),
            "rounds close at their target: {:?}",
            report.rounds
        );
    }
}
