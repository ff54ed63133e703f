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

pub mod search;
pub mod secagg;
pub mod tracks;

pub use tracks::{Baselines, Final};

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fedrec_client::clock::ManualClock;
use fedrec_client::consent::Consent;
use fedrec_client::device::Device;
use fedrec_client::model::{MatrixFactorization, Model, TrainingConfig};
use fedrec_client::participant::Participant;
use fedrec_client::ranking::EvalCounts;
use fedrec_client::recommend::Row;
use fedrec_client::retention::RetentionPolicy;
use fedrec_client::store::Purchase;
use fedrec_client::task::{Task as DeviceTask, TaskOutput};
use fedrec_coordinator::CoordinatorError;
use fedrec_coordinator::config::{
    CoordinatorConfig, DpMode, SecureAggregationConfig, StrategyName,
};
use fedrec_coordinator::privacy::PrivacySummary;
use fedrec_coordinator::round::{
    CheckIn, Pseudonym, RoundCore, RoundSummary, SecureSummary, TaskKind, UpdateHeader,
};
use fedrec_coordinator::service::{CoordinatorService, ServeOptions, task_to_pb};
use fedrec_proto::codec::{EncodedModel, Encoding};
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

/// One row of the per-round report.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRow {
    /// Round number.
    pub round: u32,
    /// Devices whose update was accepted.
    pub participants: usize,
    /// Wall-clock seconds of the round.
    pub seconds: f64,
    /// HR@10 (full ranking) of the model the cohort received, measured by
    /// the cohort on its own held-out purchases.
    pub hr_at_10: f64,
    /// NDCG@10 (full ranking), likewise.
    pub ndcg_at_10: f64,
    /// Whether the round completed (false: abandoned, nothing applied).
    pub completed: bool,
    /// Why it was abandoned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abandon_reason: Option<String>,
    /// Devices left after each secure aggregation step, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecureSummary>,
    /// Differential privacy in the round (ε spent after it), when on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySummary>,
}

/// Differential privacy in the report.
#[derive(Clone, Debug, Serialize)]
pub struct PrivacyReport {
    /// "off", "central" or "distributed".
    pub mode: DpMode,
    /// The configured budget, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_budget: Option<f64>,
    /// Whether the clipping bound adapted.
    pub adaptive_clip: bool,
    /// After the last training round: ε, δ, z, C (the last round's), q and
    /// the expected cohort.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub last_round: Option<PrivacySummary>,
    /// Training rounds run (fewer than configured when the budget ran out).
    pub training_rounds: usize,
}

impl PrivacyReport {
    fn new(config: &CoordinatorConfig, rows: &[RoundRow]) -> Self {
        let p = &config.privacy;
        Self {
            mode: p.mode,
            epsilon_budget: p.epsilon_budget,
            adaptive_clip: p.adaptive_clip && p.enabled(),
            last_round: rows.iter().rev().find_map(|r| r.privacy.clone()),
            training_rounds: rows.len(),
        }
    }
}

/// Secure aggregation in the report.
#[derive(Clone, Debug, Serialize)]
pub struct SecureReport {
    /// Whether training rounds ran through secure aggregation.
    pub enabled: bool,
    /// Its configuration, when enabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<SecureAggregationConfig>,
    /// Worst-case quantization error of one value of a round's mean update
    /// under uniform weighting, `range / (2^bits − 2)` (with example
    /// weighting, times the cohort size over its summed weight).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_error_per_value: Option<f64>,
    /// Per training round: devices left after each step, abandonments.
    pub rounds: Vec<SecureRoundRow>,
}

/// One training round's secure aggregation.
#[derive(Clone, Debug, Serialize)]
pub struct SecureRoundRow {
    /// Round number.
    pub round: u32,
    /// Devices left after each step.
    #[serde(flatten)]
    pub steps: SecureSummary,
    /// Why the round was abandoned, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abandon_reason: Option<String>,
}

impl SecureReport {
    fn new(config: &CoordinatorConfig, rows: &[RoundRow]) -> Self {
        let sa = &config.secure_aggregation;
        Self {
            enabled: sa.enabled,
            config: sa.enabled.then(|| sa.clone()),
            max_error_per_value: sa
                .enabled
                .then(|| sa.protocol().quantizer().ok().map(|q| q.max_error()))
                .flatten(),
            rounds: rows
                .iter()
                .filter_map(|r| {
                    Some(SecureRoundRow {
                        round: r.round,
                        steps: r.secure_aggregation.clone()?,
                        abandon_reason: r.abandon_reason.clone(),
                    })
                })
                .collect(),
        }
    }
}

/// What the data looked like.
#[derive(Clone, Debug, Serialize)]
pub struct DataSummary {
    /// Data set name.
    pub name: String,
    /// Users (devices).
    pub users: usize,
    /// Items in the catalogue.
    pub items: usize,
    /// Interactions loaded.
    pub interactions: usize,
    /// Rows merged into an identical (user, item, time) row.
    pub merged_rows: u64,
    /// Users with a held-out item on the first track.
    pub test_users: usize,
    /// Users without a qualifying event on the first track.
    pub skipped_users: usize,
    /// Rows skipped while loading, by reason.
    pub skipped_rows: std::collections::BTreeMap<String, u64>,
}

/// Wall-clock timing.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    /// Whole simulation, baselines included.
    pub total_seconds: f64,
    /// Federated training and evaluation.
    pub federated_seconds: f64,
    /// Centralized baseline.
    pub centralized_seconds: f64,
    /// Devices that took part in the training rounds, summed over rounds.
    pub device_rounds: usize,
    /// `device_rounds` over the rounds' summed seconds (each round's
    /// download, local training, upload and aggregation; its evaluation
    /// too when rounds are evaluated; over gRPC the first round also
    /// includes the devices joining). 0 when no round ran.
    pub devices_per_second: f64,
}

/// The simulation's report (written as JSON by `--report`).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The configuration used.
    pub config: SimConfig,
    /// The data.
    pub data: DataSummary,
    /// The `--preset auto` search, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<search::SearchReport>,
    /// Every round of the federated run on the first track's cut.
    pub rounds: Vec<RoundRow>,
    /// Every round of the federated run on the latest-time cut (buy-again
    /// and next purchase), when it differs from the first track's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds_latest_cut: Vec<RoundRow>,
    /// Final metrics per track.
    #[serde(rename = "final")]
    pub final_: Final,
    /// Whether secure aggregation was on, and what it did per round.
    pub secure_aggregation: SecureReport,
    /// Differential privacy: the mode and the (ε, δ) spent.
    pub privacy: PrivacyReport,
    /// How the model travelled to the devices.
    pub download: DownloadReport,
    /// Timing.
    pub timing: Timing,
}

/// The model download in the report.
#[derive(Clone, Debug, Serialize)]
pub struct DownloadReport {
    /// The wire format (`[download] encoding`): f32, f16 or q8.
    pub encoding: Encoding,
    /// Values in the model.
    pub values: usize,
    /// Bytes of one device's download (values and q8 block parameters,
    /// protobuf framing aside).
    pub bytes_per_device: usize,
}

/// Receives progress while a simulation runs.
pub trait Observer {
    /// The simulation starts `rounds` training rounds (0 if unknown).
    fn start(&mut self, _rounds: u32) {}
    /// A round ended.
    fn round(&mut self, _row: &RoundRow) {}
    /// A phase begins (e.g. "centralized baseline").
    fn phase(&mut self, _name: &str) {}
}

/// An observer that ignores everything.
impl Observer for () {}

fn row(s: &RoundSummary, seconds: f64) -> RoundRow {
    RoundRow {
        round: s.round,
        participants: s.participants,
        seconds,
        hr_at_10: s.evaluation.hit_rate_full().unwrap_or(0.0),
        ndcg_at_10: s.evaluation.ndcg_full_mean().unwrap_or(0.0),
        completed: s.completed,
        abandon_reason: s.abandon_reason.clone(),
        secure_aggregation: s.secure_aggregation.clone(),
        privacy: s.privacy.as_deref().cloned(),
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
pub fn device_training(t: &fedrec_coordinator::config::TrainingConfig) -> TrainingConfig {
    TrainingConfig {
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
    coord: CoordinatorConfig,
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
    let Some(&first) = tracks.first() else {
        bail!(
            "no user of {} has a purchase at two different times: nothing to hold out",
            ds.name
        );
    };
    let mut cfg = cfg.clone();
    let search = if cfg.auto {
        let report = search::search(&protocol, &cfg, observer)?;
        let chosen = &report.chosen;
        if chosen.model == "ease" {
            cfg.coordinator = ease_recipe(chosen.regularization);
        } else {
            let c = &mut cfg.coordinator;
            c.model.factors = chosen.factors;
            c.training.confidence = chosen.confidence;
            c.training.regularization = chosen.regularization;
            c.rounds.rounds = chosen.rounds;
        }
        Some(report)
    } else {
        None
    };
    let cfg = &cfg;
    // One federated run per test cut, each evaluated on the tracks of its
    // cut; devices hold the cut's first track's event (discover, or next
    // purchase on the latest-time cut).
    let mut runs: Vec<CutRun> = Vec::new();
    let mut run_cuts: Vec<usize> = Vec::new();
    for &track in &tracks {
        let Some(ev) = protocol.evaluation(track, Stage::Test) else {
            continue;
        };
        if run_cuts.contains(&ev.cut) {
            continue;
        }
        run_cuts.push(ev.cut);
        let others: Vec<&Evaluation> = protocol
            .evaluations_of(ev.cut)
            .filter(|e| e.stage == Stage::Test && e.track != track)
            .collect();
        let kind = if runs.is_empty() {
            RunKind::Main
        } else {
            RunKind::Other
        };
        runs.push(run_cut(&protocol, ev, &others, cfg, observer, kind)?);
    }

    observer.phase("baselines");
    let mut baselines = tracks::baselines(&protocol, cfg.baselines, cfg.seed, &mut |p| {
        observer.phase(p)
    });
    let mut final_tracks = Vec::new();
    for &track in &tracks {
        let Some(ev) = protocol.evaluation(track, Stage::Test) else {
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
        .evaluation(first, Stage::Test)
        .context("first track")?;
    Ok(Report {
        search,
        secure_aggregation,
        privacy,
        download,
        config: SimConfig {
            coordinator: coord,
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
    coord.rounds.final_evaluation = true;
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
    coord
        .validate()
        .context("invalid coordinator configuration")?;
    let params = model.init_global(&mut ChaCha8Rng::seed_from_u64(cfg.seed));
    let core = RoundCore::new(coord.clone(), model.layout(), params)
        .context("cannot start the coordinator")?;

    observer.phase(&format!("federated training, {} cut", ev.track));
    observer.start(coord.rounds.rounds);
    let fed_start = Instant::now();
    let (rounds, final_counts, global, mut devices) = match cfg.transport {
        Transport::Inproc => run_inproc(core, devices, observer, cfg.attack)?,
        Transport::Grpc => run_grpc(core, devices, observer)?,
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
        });
    }

    observer.phase(&format!("centralized baseline, {} cut", ev.track));
    let cen_start = Instant::now();
    let evals: Vec<&Evaluation> = std::iter::once(ev).chain(others.iter().copied()).collect();
    let centralized = if coord.strategy.name == StrategyName::Ease {
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
    Ok(CutRun {
        rounds,
        federated,
        centralized,
        on_device,
        diversity,
        federated_seconds,
        centralized_seconds: cen_start.elapsed().as_secs_f64(),
        coord,
    })
}

/// The rounds, the final evaluation's counts, the final model as devices
/// decode it, and the devices.
type Outcome = (Vec<RoundRow>, EvalCounts, Vec<f32>, Vec<(usize, Device)>);

/// Drives the core directly. The clock is virtual and stands still while
/// devices train, so no deadline ever depends on the machine's speed.
fn run_inproc(
    mut core: RoundCore,
    mut devices: Vec<(usize, Device)>,
    observer: &mut dyn Observer,
    attack: Option<Attack>,
) -> anyhow::Result<Outcome> {
    let base = Instant::now();
    let mut clock = base;
    let mut pseudonyms: Vec<Pseudonym> = devices.iter().map(|_| core.join(clock, None)).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rows = Vec::new();
    let mut final_counts = EvalCounts::default();
    let mut round_start = Instant::now();
    loop {
        let mut tasks = Vec::new();
        let mut finished = false;
        for (i, p) in pseudonyms.iter_mut().enumerate() {
            match check_in(&mut core, clock, p)? {
                CheckIn::Task(task) => tasks.push((i, task)),
                CheckIn::Finished { .. } => finished = true,
                _ => {}
            }
        }
        if finished {
            break;
        }
        if tasks.iter().any(|(_, t)| t.secure_aggregation.is_some()) {
            // A secure round needs its whole cohort at once: devices that
            // checked in before it started get their tasks on a second pass.
            tasks.clear();
            for (i, p) in pseudonyms.iter_mut().enumerate() {
                if let CheckIn::Task(task) = check_in(&mut core, clock, p)? {
                    tasks.push((i, task));
                }
            }
        }
        if tasks.is_empty() {
            // Nothing to do until a timer fires: jump the virtual clock to it.
            match core.poll_timeout() {
                Some(t) if t > clock => clock = t,
                _ => clock += Duration::from_secs(1),
            }
        } else {
            run_cohort(
                &mut core,
                clock,
                &mut devices,
                &pseudonyms,
                &tasks,
                threads,
                attack,
            )?;
        }
        for event in core.poll(clock) {
            record_event(
                &event,
                &mut rows,
                &mut final_counts,
                &mut round_start,
                observer,
            );
        }
    }
    let global = core.model().download.decode();
    Ok((rows, final_counts, global, devices))
}

/// Checks a device in; a device whose session ended (the virtual clock of a
/// long simulation can pass `auth.session_ttl_secs`) joins again first, as
/// the SDK does when a check-in is refused `UNAUTHENTICATED`.
fn check_in(
    core: &mut RoundCore,
    clock: Instant,
    pseudonym: &mut Pseudonym,
) -> anyhow::Result<CheckIn> {
    match core.check_in(clock, pseudonym) {
        Err(CoordinatorError::SessionExpired) => {
            *pseudonym = core.join(clock, None);
            Ok(core.check_in(clock, pseudonym)?)
        }
        outcome => Ok(outcome?),
    }
}

/// Updates in flight per worker thread: the cohort is trained in batches of
/// `threads × IN_FLIGHT_PER_THREAD` devices, so memory holds that many
/// updates, not one per device of the cohort.
const IN_FLIGHT_PER_THREAD: usize = 4;

/// Trains or evaluates the cohort in parallel, batch by batch, and submits
/// the results in task order, so the sum is formed in the same order every
/// run. Each device receives its task as over gRPC: the coordinator's task
/// in its wire form, converted by the device ([`DeviceTask::try_from`]).
fn run_cohort(
    core: &mut RoundCore,
    clock: Instant,
    devices: &mut [(usize, Device)],
    pseudonyms: &[Pseudonym],
    tasks: &[(usize, fedrec_coordinator::round::Task)],
    threads: usize,
    attack: Option<Attack>,
) -> anyhow::Result<()> {
    // What every device of the cohort downloads: the same values as over
    // gRPC, in the configured encoding.
    let received = core.model().download.decode();
    let global = &received;
    let mut selected: Vec<(&mut Device, DeviceTask)> = Vec::with_capacity(tasks.len());
    {
        let mut it = devices.iter_mut().enumerate();
        for (i, task) in tasks {
            let (_, (_, d)) = it
                .by_ref()
                .find(|(j, _)| j == i)
                .context("task for an unknown device")?;
            let task = DeviceTask::try_from(&task_to_pb(task, clock))
                .context("the device refused its task")?;
            selected.push((d, task));
        }
    }
    if tasks.iter().any(|(_, t)| t.secure_aggregation.is_some()) {
        let seed = core.config().rounds.seed.unwrap_or_default();
        let cohort = selected
            .into_iter()
            .zip(tasks)
            .map(|(device, (i, task))| (pseudonyms[*i], task.clone(), device))
            .collect();
        secagg::drive_round(
            core,
            clock,
            cohort,
            seed,
            threads,
            IN_FLIGHT_PER_THREAD,
            |_, (device, task)| Ok(device.run_task(task, global)?.secure_input(task)?),
        )?;
        return Ok(());
    }
    let batch = threads * IN_FLIGHT_PER_THREAD;
    for (part, part_tasks) in selected.chunks_mut(batch).zip(tasks.chunks(batch)) {
        let chunk = part.len().div_ceil(threads).max(1);
        let results: Vec<anyhow::Result<TaskOutput>> = std::thread::scope(|s| {
            let handles: Vec<_> = part
                .chunks_mut(chunk)
                .map(|share| {
                    s.spawn(move || {
                        share
                            .iter_mut()
                            .map(|(device, task)| run_task(device, task, global))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("device thread panicked"))
                .collect()
        });
        let seed = core.config().rounds.seed.unwrap_or_default();
        for ((i, task), result) in part_tasks.iter().zip(results) {
            let mut result = result?;
            if let (Some(attack), TaskOutput::Update(update)) = (&attack, &mut result)
                && attack.applies(seed, *i)
            {
                attack.corrupt(&mut update.delta, seed ^ *i as u64, task.round);
            }
            submit(core, clock, pseudonyms[*i], task, result)?;
        }
    }
    Ok(())
}

/// Hands one device's result to the coordinator core.
fn submit(
    core: &mut RoundCore,
    clock: Instant,
    who: Pseudonym,
    task: &fedrec_coordinator::round::Task,
    result: TaskOutput,
) -> anyhow::Result<()> {
    match result {
        TaskOutput::Update(update) => {
            let header = UpdateHeader {
                pseudonym: who,
                round: task.round,
                model_version: task.model_version,
                num_examples: update.num_examples,
                num_values: update.delta.len() as u64,
                evaluation: update.evaluation,
            };
            let bytes = fedrec_proto::tensor::encode(&update.delta);
            core.submit_update(clock, header, &bytes)?;
        }
        TaskOutput::Evaluation(counts) => {
            core.submit_evaluation(
                clock,
                &who,
                task.round,
                task.model_version,
                counts.unwrap_or_default(),
            )?;
        }
        _ => bail!(
            "round {}: a task output the simulation does not know",
            task.round
        ),
    }
    Ok(())
}

/// The device's work on a plain round's task, and what its upload in the
/// task's encoding delivers to the coordinator.
fn run_task(device: &mut Device, task: &DeviceTask, global: &[f32]) -> anyhow::Result<TaskOutput> {
    let mut output = device.run_task(task, global)?;
    if let TaskOutput::Update(update) = &mut output
        && task.upload_encoding() != Encoding::F32
    {
        update.delta = EncodedModel::for_upload(&update.delta, task.upload_encoding()).decode();
    }
    Ok(output)
}

fn record_event(
    event: &fedrec_coordinator::round::Event,
    rows: &mut Vec<RoundRow>,
    final_counts: &mut EvalCounts,
    round_start: &mut Instant,
    observer: &mut dyn Observer,
) {
    use fedrec_coordinator::round::Event;
    match event {
        Event::RoundStarted { .. } => *round_start = Instant::now(),
        Event::RoundEnded(s) => record_summary(
            s,
            round_start.elapsed().as_secs_f64(),
            rows,
            final_counts,
            observer,
        ),
        _ => {}
    }
}

fn record_summary(
    s: &RoundSummary,
    seconds: f64,
    rows: &mut Vec<RoundRow>,
    final_counts: &mut EvalCounts,
    observer: &mut dyn Observer,
) {
    match s.kind {
        TaskKind::Evaluate => *final_counts = s.evaluation,
        _ => {
            let r = row(s, seconds);
            observer.round(&r);
            rows.push(r);
        }
    }
}

/// Serves the core on 127.0.0.1 (port 0) and runs every device as a
/// [`Participant`], over [`SIM_CONNECTIONS`] shared connections.
fn run_grpc(
    core: RoundCore,
    devices: Vec<(usize, Device)>,
    observer: &mut dyn Observer,
) -> anyhow::Result<Outcome> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let max_streams = (core.config().server.max_streams_per_connection as usize).max(1);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot bind 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let service = CoordinatorService::new(core, ServeOptions::default());
        let handle = service.handle();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(service.serve(listener, async {
            let _ = stop_rx.await;
        }));
        // The devices share SIM_CONNECTIONS HTTP/2 connections: one each
        // cost thousands of connections' buffers (7.4 GB for 6,040 devices
        // training every round), and the protocol is per request anyway.
        // A device has one request in flight at a time: enough connections
        // that none waits behind the others' long polls.
        let connections = SIM_CONNECTIONS
            .max(devices.len().div_ceil(max_streams))
            .min(devices.len());
        let channels = connect(&addr.to_string(), connections).await?;
        let mut participants = tokio::task::JoinSet::new();
        for (i, (user, device)) in devices.into_iter().enumerate() {
            let channel = channels[i % channels.len()].clone();
            participants.spawn(async move {
                let mut participant = Participant::join(channel, None).await?;
                let (device, _summary) = participant.run(device).await?;
                anyhow::Ok((user, device))
            });
        }
        // Report rounds as they end.
        let mut progress = handle.subscribe();
        let mut seen = 0usize;
        let mut rows = Vec::new();
        let mut final_counts = EvalCounts::default();
        let mut last = Instant::now();
        let mut returned = Vec::new();
        loop {
            tokio::select! {
                changed = progress.changed() => {
                    if changed.is_err() { break; }
                    let history = progress.borrow_and_update().history.clone();
                    for s in &history[seen..] {
                        record_summary(s, last.elapsed().as_secs_f64(), &mut rows, &mut final_counts, observer);
                        last = Instant::now();
                    }
                    seen = history.len();
                }
                joined = participants.join_next() => {
                    match joined {
                        Some(result) => returned.push(result.context("device task panicked")??),
                        None => break,
                    }
                }
            }
        }
        let history = handle.progress().history;
        for s in &history[seen..] {
            record_summary(s, last.elapsed().as_secs_f64(), &mut rows, &mut final_counts, observer);
        }
        let global = handle.model()?.download.decode();
        let _ = stop_tx.send(());
        server.await.context("coordinator task panicked")??;
        returned.sort_by_key(|(user, _)| *user);
        Ok((rows, final_counts, global, returned))
    })
}

/// HTTP/2 connections the simulated devices share, in a gRPC simulation
/// (more when `server.max_streams_per_connection` would otherwise be
/// exceeded) and in `fedrec bench round`.
pub const SIM_CONNECTIONS: usize = 16;

/// `n` HTTP/2 connections to the coordinator at `addr` (host:port), for
/// simulated devices to share.
pub async fn connect(addr: &str, n: usize) -> anyhow::Result<Vec<tonic::transport::Channel>> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(
            fedrec_proto::endpoint(format!("http://{addr}"))?
                .connect()
                .await
                .with_context(|| format!("cannot connect to {addr}"))?,
        );
    }
    Ok(channels)
}

/// The devices' model for a coordinator configuration: EASE under the
/// `ease` step, matrix factorization otherwise.
pub fn model_for(coord: &CoordinatorConfig, n_items: usize) -> anyhow::Result<Arc<dyn Model>> {
    Ok(if coord.strategy.name == StrategyName::Ease {
        Arc::new(fedrec_client::ease::Ease::new(n_items).context("invalid model configuration")?)
    } else {
        Arc::new(
            MatrixFactorization::new(n_items, coord.model.factors, coord.model.init_std)
                .context("invalid model configuration")?,
        )
    })
}

/// The federated EASE recipe: one round in which every device sends its
/// co-purchases (uniform weighting: the sum is EASE's Gram matrix) and the
/// coordinator's `ease` step solves it with λ = `lambda`.
pub fn ease_recipe(lambda: f32) -> CoordinatorConfig {
    use fedrec_coordinator::config::Weighting;
    let mut cfg = default_coordinator_config();
    cfg.rounds.rounds = 1;
    // Every device: the coordinator's sum must be the whole co-purchase
    // matrix (a simulation asks for all of its devices).
    cfg.rounds.clients_per_round = EASE_COHORT;
    cfg.strategy.name = StrategyName::Ease;
    cfg.strategy.weighting = Weighting::Uniform;
    cfg.strategy.ease_lambda = lambda;
    cfg
}

/// The cohort the EASE recipe asks for: more devices than any data set
/// here has, so that a simulation takes all of them.
pub const EASE_COHORT: usize = 1_000_000;

/// Default seed of simulations.
pub const DEFAULT_SEED: u64 = 42;
/// Default epochs of the centralized baseline: enough for SGD over all users
/// to converge on data of MovieLens-100K's size.
pub const DEFAULT_CENTRALIZED_EPOCHS: u32 = 40;
/// Default training rounds of a simulation.
pub const DEFAULT_ROUNDS: u32 = 100;
/// Default devices per round of a simulation.
pub const DEFAULT_CLIENTS_PER_ROUND: usize = 100;

/// Named starting configurations for `fedrec simulate --preset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// MovieLens-style ratings: the [`als_recipe`] with 50 rounds.
    #[value(help = "ratings such as MovieLens: ALS, 50 rounds, 32 factors")]
    Movielens,
    /// Purchase logs (Online Retail): the [`als_recipe`] with 40 rounds,
    /// 128 factors, confidence 2 and regularization 0.01.
    /// - 128 factors: a third of the held-out purchases are re-buys, and a
    ///   model must be able to reproduce each shopper's own basket to rank
    ///   them (centralized ALS at 64 factors: HR@10 / NDCG@10 0.258 / 0.161,
    ///   far below a tuned implicit ALS at 128 factors, 0.319 / 0.230).
    /// - confidence 2, regularization 0.01: purchases are not ratings (a
    ///   basket holds many items bought once, with no graded preference),
    ///   so a purchase is weighed only twice an item not bought; with a
    ///   larger catalogue and more users the loss needs less shrinkage.
    ///   Chosen on the centralized model, on the same split the `implicit`
    ///   peer is tuned on (its grid picks confidence 1, regularization
    ///   0.01): at 128 factors, the recipe's confidence 5 and
    ///   regularization 0.1 give 0.345 / 0.223 (NDCG@10 below the peer's),
    ///   confidence 1 gives 0.317 / 0.230 and confidence 2 gives 0.338 /
    ///   0.231 (regularization 0.01 and 0.1 give the same figures at
    ///   confidence 1).
    /// - 40 rounds: 1,000 of the 4,339 shoppers take part in a round, so
    ///   each takes part about 9 times; with the preconditioned step that
    ///   matches centralized ALS's 15 iterations (federated 0.338 / 0.233
    ///   against 0.338 / 0.231; FedAdam needed 120 rounds for 0.334 / 0.223).
    #[value(help = "purchase logs such as Online Retail: ALS, 40 rounds, 128 factors")]
    Retail,
    /// Any data: the [`als_recipe`] with [`search::AUTO_ROUNDS`] rounds,
    /// its factors, confidence and regularization chosen by federated
    /// evaluation on the devices' validation events ([`search`]). What
    /// `--data` gets when no preset is named.
    #[value(help = "any data: ALS, settings chosen on the devices' validation purchases")]
    Auto,
}

impl Preset {
    /// The preset's coordinator configuration and centralized iterations.
    pub fn config(self) -> (CoordinatorConfig, u32) {
        let mut cfg = als_recipe();
        match self {
            Preset::Movielens => {
                (cfg.rounds.rounds, cfg.model.factors) = (50, 32);
            }
            Preset::Retail => {
                (cfg.rounds.rounds, cfg.model.factors) = (40, 128);
                (cfg.training.confidence, cfg.training.regularization) = (2.0, 0.01);
            }
            Preset::Auto => cfg.rounds.rounds = search::AUTO_ROUNDS,
        }
        (cfg, ALS_CENTRALIZED_ITERATIONS)
    }
}

/// Alternating-least-squares iterations of the centralized baseline under
/// the ALS loss (ALS converges in about 10 to 15).
pub const ALS_CENTRALIZED_ITERATIONS: u32 = 15;

/// The recipe behind the presets, with the reason for each setting:
/// - `loss = als`: every item not bought is a weighted negative (no
///   sampling noise) and the private vector is solved exactly on the device,
///   as ALS's user step does; the device's update is the exact gradient of
///   its loss, so federated training optimizes the very objective of
///   centralized ALS.
/// - `confidence = 5`, `regularization = 0.1`: the middle of the usual
///   implicit-ALS ranges (alpha 1 to 40, lambda 0.01 to 1).
/// - `strategy = als`, `server_lr = 1`: the coordinator preconditions the
///   mean gradient by the cohort's curvature `2M + 2λ/N I` (`M` the mean of
///   the devices' `x xᵀ`, which each appends to its update), so an item
///   nobody in the cohort bought takes exactly ALS's item step, and a
///   bought one a damped step. FedAdam (`server_lr` 0.01, `tau` 1e-6)
///   stops short of centralized ALS in NDCG@10 (by 2-8% on MovieLens-100K
///   over two seeds and 3.7% on Online Retail after 120 rounds), because
///   its per-coordinate steps ignore how the k factors of an item interact;
///   the preconditioned step reaches centralized quality on both data sets
///   in fewer rounds (`docs/quality-experiments.md`).
/// - `weighting = uniform`: the mean of per-device gradients is the gradient
///   of the sum of the users' losses, the objective of centralized ALS.
/// - `schedule = cosine`: with a constant rate the model keeps jumping to
///   the optimum of each round's cohort, and the last cohort decides where
///   it stops; decaying the rate to 0 lets the final rounds average over
///   many cohorts.
/// - up to 1,000 devices per round, `init_std = 0.01`, `learning_rate = 1`
///   (the update is the gradient itself; the server step sets the size).
/// - `secure_aggregation.range = 64`, `bits = 22` (used when it is turned
///   on). Each device's values span a wide scale. MovieLens-100K, in
///   process: its gradients reach 149 in the first round and stay below
///   about 2 from round 30 on. Its `x xᵀ` has a trace `‖x‖²` of up to 349
///   in the first round and below 0.4 from round 10 on, so the late
///   entries are about 1e-3. The `als` step inverts the cohort's mean
///   `x xᵀ`, so those small entries must survive quantization. The old
///   setting (range 256, 20 bits, a step of 4.9e-4) rounded them away:
///   HR@10 0.139 against 0.152 plain. 22 bits at range 64 make the step
///   3.1e-5, which gave 0.159 / 0.078 with secure aggregation against
///   0.152 / 0.076 plain. Only the first rounds' largest values are
///   clipped. At 22 bits, a cohort holds at most 1,024 devices (the sum
///   must not wrap). A range of 16 clips the early `x xᵀ` so much that
///   the curvature is no longer positive definite, and every round is
///   abandoned.
pub fn als_recipe() -> CoordinatorConfig {
    use fedrec_coordinator::config::{Loss, Schedule, StrategyName, Weighting};
    let mut cfg = default_coordinator_config();
    cfg.rounds.clients_per_round = 1000;
    cfg.training.loss = Loss::Als;
    cfg.training.confidence = 5.0;
    cfg.training.regularization = 0.1;
    cfg.training.learning_rate = 1.0;
    cfg.strategy.name = StrategyName::Als;
    cfg.strategy.server_lr = 1.0;
    cfg.strategy.weighting = Weighting::Uniform;
    cfg.strategy.schedule = Schedule::Cosine;
    cfg.model.init_std = 0.01;
    cfg.secure_aggregation.range = ALS_SECAGG_RANGE;
    cfg.secure_aggregation.bits = ALS_SECAGG_BITS;
    cfg
}

/// Where the [`als_recipe`]'s server step cannot run, under differential
/// privacy (clipping an update would distort the `x xᵀ` it carries), the
/// recipe takes FedAdam with `server_lr` 0.01 and `tau` 1e-6: each item
/// then steps by about `server_lr` whatever its gradient's scale. It comes
/// within 2-8% of centralized ALS's NDCG@10 (without DP noise). `fedrec
/// simulate --dp` applies this unless `--strategy` says otherwise.
pub fn als_under_privacy(cfg: &mut CoordinatorConfig) {
    cfg.strategy.name = fedrec_coordinator::config::StrategyName::FedAdam;
    cfg.strategy.server_lr = 0.01;
    cfg.strategy.tau = 1e-6;
}

/// `secure_aggregation.range` of the [`als_recipe`].
pub const ALS_SECAGG_RANGE: f32 = 64.0;
/// `secure_aggregation.bits` of the [`als_recipe`].
pub const ALS_SECAGG_BITS: u32 = 22;

/// The coordinator configuration a simulation starts from: the coordinator's
/// defaults with a finite number of rounds, a larger cohort, and deadlines
/// generous enough that no healthy virtual device misses one.
pub fn default_coordinator_config() -> CoordinatorConfig {
    let mut cfg = CoordinatorConfig::default();
    cfg.rounds.rounds = DEFAULT_ROUNDS;
    cfg.rounds.clients_per_round = DEFAULT_CLIENTS_PER_ROUND;
    cfg.rounds.deadline_secs = 600.0;
    cfg.rounds.checkin_window_secs = 600.0;
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Interaction;

    /// Sessions expire without enrollment tokens too (issue 19, item 4).
    /// The virtual clock moves only to a timer while no device has work, so
    /// a simulation stays far below `auth.session_ttl_secs`; should it pass
    /// it, a device joins again, as the SDK's do, rather than failing the run.
    #[test]
    fn an_inproc_device_joins_again_when_its_session_expired() {
        let layout = fedrec_proto::Layout::new(vec![("b".into(), vec![1])]);
        let mut core = RoundCore::new(CoordinatorConfig::default(), layout, vec![0.0]).unwrap();
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
        for cfg in [secure, plain] {
            let layout = fedrec_proto::Layout::new(vec![("b".into(), vec![4])]);
            let mut core = RoundCore::new(cfg.clone(), layout, vec![0.0; 4]).unwrap();
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
                TrainingConfig {
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
}
