//! `fedrec simulate --population FILE.toml`: a fleet of phones on a virtual
//! clock. Each device has its own compute speed, network bandwidth, hours
//! of availability and chance of dropping out of a task; the coordinator
//! core runs unchanged (synchronous rounds or async mode) against the
//! simulated time, and the run reports, in simulated hours, the global
//! model's quality, the device-hours of training done and the share of
//! that work thrown away.
//!
//! # The model of a device (documented defaults in [`Population`])
//! - **Compute**: a task takes `compute.median_secs × s` seconds, `s`
//!   lognormal with median 1 and log-space spread `compute.sigma`. Phones'
//!   speed on the same ML work spans about an order of magnitude
//!   (Ignatov et al., "AI Benchmark: All About Deep Learning on
//!   Smartphones in 2019"; FedScale, Lai et al. 2022, draws client compute
//!   from those measurements): σ = 0.8 puts the 5th–95th percentile ratio
//!   at about 14×.
//! - **Network**: download and upload bandwidths, each lognormal around its
//!   median with spread `network.sigma` (FedScale's MobiPerf traces span
//!   orders of magnitude too); a task downloads the model in the configured
//!   download encoding and uploads its update in the upload encoding.
//! - **Availability**: a device is eligible (idle, charging, unmetered) on
//!   a night window of `availability.night_hours` from
//!   `availability.night_start_hour` in its own time zone (time zones
//!   uniform over the day), on each night with probability
//!   `availability.night_probability`, plus short random windows
//!   (`windows_per_day` a day on average, `window_minutes` long): the
//!   diurnal pattern Bonawitz et al. 2019 report for Gboard's fleet.
//! - **Drop-outs**: a task is abandoned at a uniform point with probability
//!   `dropout`, and always when the device's window closes before it ends.
//!
//! A device that is available checks in; with a task it trains on the
//! version it downloaded and submits when done (its update may then be
//! refused: round closed, too stale, task expired); without one it checks
//! in again after the coordinator's `retry_after` (at most
//! `check_in_minutes`), and meanwhile holds its check-in open as over gRPC
//! (a long poll): a task the coordinator hands it in that time (a free
//! async slot drawn for it, a round that selects it) starts at once.
//! Quality is the devices' own evaluation (each fits
//! its private vector to the current global model and ranks its held-out
//! purchase, as it does to show recommendations) every
//! `evaluate_every_minutes`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fedrec_client::device::Device;
use fedrec_client::ranking::EvalCounts;
use fedrec_client::recommend::Row;
use fedrec_client::task::{Task as DeviceTask, TaskOutput};
use fedrec_coordinator::round::{CheckIn, Pseudonym, RoundCore, Task};
use fedrec_coordinator::service::task_to_pb;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal, Poisson};
use serde::{Deserialize, Serialize};

use super::inproc::{came_too_late, record_event, run_task, submit};
use super::{Observer, RoundRow};
use crate::data::Evaluation;
use crate::eval;

/// The share of the centralized model's HR@10 whose first reaching is
/// reported as the time to quality.
pub const TARGET_FRACTION: f64 = 0.95;

/// A population file: the devices' speed, network, availability and
/// drop-outs, and how long to simulate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Population {
    /// Simulated hours. Default 48.
    pub hours: f64,
    /// Compute speed.
    pub compute: Compute,
    /// Bandwidth.
    pub network: Network,
    /// When devices may train.
    pub availability: Availability,
    /// Probability that a device abandons a task part-way. Default 0.05.
    pub dropout: f64,
    /// Longest wait between an idle, available device's check-ins. Default 10.
    pub check_in_minutes: f64,
    /// Simulated minutes between quality measurements. Default 60.
    pub evaluate_every_minutes: f64,
}

/// Per-task compute time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Compute {
    /// Median seconds of one training task. Default 20.
    pub median_secs: f64,
    /// Log-space standard deviation of devices' speed. Default 0.8.
    pub sigma: f64,
}

/// Per-device bandwidth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// Median download megabits per second. Default 20.
    pub download_mbps: f64,
    /// Median upload megabits per second. Default 5.
    pub upload_mbps: f64,
    /// Log-space standard deviation across devices. Default 1.0.
    pub sigma: f64,
}

/// Hours in which a device is eligible.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Availability {
    /// Local hour at which the night window starts. Default 23.
    pub night_start_hour: f64,
    /// Hours of the night window. Default 7.
    pub night_hours: f64,
    /// Probability that a device charges on a given night. Default 0.7.
    pub night_probability: f64,
    /// Short daytime windows a day, on average. Default 1.
    pub windows_per_day: f64,
    /// Minutes of a short window. Default 20.
    pub window_minutes: f64,
}

impl Default for Population {
    fn default() -> Self {
        Self {
            hours: 48.0,
            compute: Compute::default(),
            network: Network::default(),
            availability: Availability::default(),
            dropout: 0.05,
            check_in_minutes: 10.0,
            evaluate_every_minutes: 60.0,
        }
    }
}

impl Default for Compute {
    fn default() -> Self {
        Self {
            median_secs: 20.0,
            sigma: 0.8,
        }
    }
}

impl Default for Network {
    fn default() -> Self {
        Self {
            download_mbps: 20.0,
            upload_mbps: 5.0,
            sigma: 1.0,
        }
    }
}

impl Default for Availability {
    fn default() -> Self {
        Self {
            night_start_hour: 23.0,
            night_hours: 7.0,
            night_probability: 0.7,
            windows_per_day: 1.0,
            window_minutes: 20.0,
        }
    }
}

impl Population {
    /// Reads and checks a population file; errors name the file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the population file {}", path.display()))?;
        let population: Self =
            toml::from_str(&text).with_context(|| format!("population file {}", path.display()))?;
        population
            .check()
            .with_context(|| format!("population file {}", path.display()))?;
        Ok(population)
    }

    /// Checks every value's range.
    pub fn check(&self) -> anyhow::Result<()> {
        let positive = [
            ("hours", self.hours),
            ("compute.median_secs", self.compute.median_secs),
            ("network.download_mbps", self.network.download_mbps),
            ("network.upload_mbps", self.network.upload_mbps),
            ("check_in_minutes", self.check_in_minutes),
            ("evaluate_every_minutes", self.evaluate_every_minutes),
        ];
        for (name, v) in positive {
            anyhow::ensure!(
                v.is_finite() && v > 0.0,
                "{name} must be a positive number, got {v}"
            );
        }
        let a = &self.availability;
        let ranges = [
            ("compute.sigma", self.compute.sigma, 0.0, 5.0),
            ("network.sigma", self.network.sigma, 0.0, 5.0),
            ("dropout", self.dropout, 0.0, 1.0),
            (
                "availability.night_start_hour",
                a.night_start_hour,
                0.0,
                24.0,
            ),
            ("availability.night_hours", a.night_hours, 0.0, 24.0),
            (
                "availability.night_probability",
                a.night_probability,
                0.0,
                1.0,
            ),
            (
                "availability.windows_per_day",
                a.windows_per_day,
                0.0,
                1000.0,
            ),
            ("availability.window_minutes", a.window_minutes, 0.0, 1440.0),
        ];
        for (name, v, lo, hi) in ranges {
            anyhow::ensure!(
                v.is_finite() && (lo..=hi).contains(&v),
                "{name} must be between {lo} and {hi}, got {v}"
            );
        }
        Ok(())
    }
}

/// What a population run measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PopulationReport {
    /// The track its devices hold out (discover, or next purchase on the
    /// latest-time cut).
    pub track: String,
    /// `sync` or `async` (`rounds.mode`).
    pub mode: String,
    /// The population simulated.
    pub population: Population,
    /// Quality of the global model over simulated time.
    pub curve: Vec<QualityPoint>,
    /// Hours of device compute spent on tasks (finished or not).
    pub device_hours: f64,
    /// Share of those hours whose update was not applied: dropped,
    /// refused (late, too stale, expired) or never finished.
    pub thrown_away: f64,
    /// Tasks handed out, updates accepted, and refused by reason.
    pub tasks: u64,
    /// Updates the coordinator accepted.
    pub accepted: u64,
    /// Tasks abandoned on the device (drop-out or its window closed).
    pub dropped: u64,
    /// Updates the coordinator refused (round closed, too stale, expired).
    pub refused: u64,
    /// Simulated hours to reach `target_hr_at_10`, if reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hours_to_target: Option<f64>,
    /// 0.95 × the centralized model's HR@10 on the same track.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_hr_at_10: Option<f64>,
    /// Device tasks the simulator ran per wall-clock second.
    pub tasks_per_second: f64,
}

impl PopulationReport {
    /// Fills the target (`fraction` of `centralized_hr`) and the first
    /// simulated hour the curve reached it.
    pub fn set_target(&mut self, centralized_hr: f64, fraction: f64) {
        let target = centralized_hr * fraction;
        self.target_hr_at_10 = Some(target);
        self.hours_to_target = self
            .curve
            .iter()
            .find(|p| p.hr_at_10 >= target)
            .map(|p| p.hours);
    }
}

/// The global model's quality at one simulated time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QualityPoint {
    /// Simulated hours since the start.
    pub hours: f64,
    /// The model version then.
    pub model_version: u64,
    /// HR@10 over the devices' held-out purchases.
    pub hr_at_10: f64,
    /// NDCG@10 likewise.
    pub ndcg_at_10: f64,
    /// Distinct devices with an accepted update so far.
    pub contributors: u64,
}

/// One device's fixed traits.
#[derive(Clone, Debug)]
struct Traits {
    compute_secs: f64,
    download_bps: f64,
    upload_bps: f64,
    /// Sorted, disjoint `[start, end)` windows in simulated seconds.
    windows: Vec<(f64, f64)>,
}

impl Traits {
    fn draw(p: &Population, horizon: f64, rng: &mut ChaCha8Rng) -> Self {
        let lognormal = |sigma: f64| LogNormal::new(0.0, sigma).expect("checked sigma");
        let compute_secs = p.compute.median_secs * lognormal(p.compute.sigma).sample(rng);
        let net = lognormal(p.network.sigma);
        let download_bps = p.network.download_mbps * 1e6 * net.sample(rng);
        let upload_bps = p.network.upload_mbps * 1e6 * net.sample(rng);
        let a = &p.availability;
        let day = 24.0 * 3600.0;
        let zone = rand::RngExt::random_range(rng, 0.0..day);
        let mut windows = Vec::new();
        let days = (horizon / day).ceil() as i64 + 1;
        for d in -1..days {
            let start = d as f64 * day + a.night_start_hour * 3600.0 - zone;
            if rand::RngExt::random_bool(rng, a.night_probability) {
                windows.push((start, start + a.night_hours * 3600.0));
            }
            if a.windows_per_day > 0.0 {
                let n = Poisson::new(a.windows_per_day)
                    .expect("checked rate")
                    .sample(rng) as usize;
                for _ in 0..n {
                    let s = d as f64 * day + rand::RngExt::random_range(rng, 0.0..day);
                    windows.push((s, s + a.window_minutes * 60.0));
                }
            }
        }
        windows.retain(|&(s, e)| e > 0.0 && s < horizon && e > s);
        windows.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut merged: Vec<(f64, f64)> = Vec::with_capacity(windows.len());
        for (s, e) in windows {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s.max(0.0), e)),
            }
        }
        Self {
            compute_secs,
            download_bps,
            upload_bps,
            windows: merged,
        }
    }

    /// The window holding `t`, or the start of the next one.
    fn window_at(&self, t: f64) -> Result<f64, Option<f64>> {
        for &(s, e) in &self.windows {
            if t < s {
                return Err(Some(s));
            }
            if t < e {
                return Ok(e);
            }
        }
        Err(None)
    }
}

/// Something due at a simulated time (micro-seconds), in a fixed order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// The core's own timer (deadlines, windows).
    Poll,
    /// Measure quality.
    Evaluate,
    /// Device `i` checks in.
    CheckIn(usize),
    /// Device `i` finishes its task.
    Finish(usize),
    /// Device `i` abandons its task.
    Drop(usize),
}

/// A task on a device: what it trains on and how long it computes.
struct Busy {
    task: Task,
    compute_secs: f64,
}

/// What a worker returns: the device, and its task's output.
type Trained = (usize, Device, anyhow::Result<TaskOutput>);

/// The devices, trained off the event loop. A device's update depends only
/// on its own state, its task and the model version it downloaded, so it is
/// trained on rayon's pool as soon as its task starts (when the task will
/// not be dropped) and collected when the task ends in simulated time. A
/// device is away while it trains; whatever next uses it (its update's
/// submission, a quality measurement) waits for it first. Each device's
/// operations therefore happen in the same order on every run, whatever the
/// threads' timing: runs stay deterministic per seed.
struct Fleet {
    /// Each device's user, and the device when it is not training.
    home: Vec<(usize, Option<Device>)>,
    /// Outputs that came back before they were needed.
    back: Vec<Option<anyhow::Result<TaskOutput>>>,
    /// Whether each device has had an update applied.
    contributed: Vec<bool>,
    away: usize,
    tx: std::sync::mpsc::Sender<Trained>,
    rx: std::sync::mpsc::Receiver<Trained>,
}

impl Fleet {
    fn new(devices: Vec<(usize, Device)>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel();
        let back = devices.iter().map(|_| None).collect();
        Self {
            contributed: vec![false; devices.len()],
            home: devices.into_iter().map(|(u, d)| (u, Some(d))).collect(),
            back,
            away: 0,
            tx,
            rx,
        }
    }

    /// Trains device `i` on `task` and `global` on the pool.
    fn train(&mut self, i: usize, task: DeviceTask, global: Arc<Vec<f32>>) {
        let mut device = self.home[i]
            .1
            .take()
            .expect("a device trains one task at a time");
        self.away += 1;
        let tx = self.tx.clone();
        rayon::spawn(move || {
            // A panic becomes the task's error, so that the loop hears of it
            // (rayon would abort the process).
            let output = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_task(&mut device, &task, &global)
            }))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("device {i}'s training panicked")));
            // The loop holds the receiver until every device is back.
            let _ = tx.send((i, device, output));
        });
    }

    /// Waits for one device to come back.
    fn receive(&mut self) {
        // The fleet holds a sender itself: `recv` returns once a device is
        // back (each spawned task sends exactly once).
        let (j, device, output) = self.rx.recv().expect("the fleet holds a sender");
        self.home[j].1 = Some(device);
        self.back[j] = Some(output);
        self.away -= 1;
    }

    /// The output of device `i`'s task, once it is back.
    fn output(&mut self, i: usize) -> anyhow::Result<TaskOutput> {
        while self.back[i].is_none() {
            self.receive();
        }
        self.back[i].take().expect("just received")
    }

    /// Distinct devices with an update applied so far.
    fn contributors(&self) -> u64 {
        self.contributed.iter().filter(|&&c| c).count() as u64
    }

    /// Every device, back home; outputs not yet collected are discarded
    /// (tasks that end after the horizon).
    fn all_home(&mut self) -> &mut [(usize, Option<Device>)] {
        while self.away > 0 {
            self.receive();
        }
        &mut self.home
    }

    fn into_devices(mut self) -> Vec<(usize, Device)> {
        self.all_home();
        self.home
            .into_iter()
            .map(|(u, d)| (u, d.expect("every device is home")))
            .collect()
    }
}

/// Runs `devices` against `core` on the population's virtual clock.
/// Returns the round rows, the last quality measurement's counts, the final
/// model, the devices, and the population report.
pub(super) fn run_population(
    mut core: RoundCore,
    devices: Vec<(usize, Device)>,
    population: &Population,
    ev: &Evaluation,
    training: &fedrec_client::model::LocalTraining,
    seed: u64,
    observer: &mut dyn Observer,
) -> anyhow::Result<(super::inproc::Outcome, PopulationReport)> {
    let wall = Instant::now();
    let horizon = population.hours * 3600.0;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9091_1A7E);
    let traits: Vec<Traits> = devices
        .iter()
        .map(|_| Traits::draw(population, horizon, &mut rng))
        .collect();
    let base = Instant::now();
    let at = |t: f64| base + Duration::from_secs_f64(t.max(0.0));
    // Rounded up, so that a device woken at a window's start is inside it.
    let micros = |t: f64| (t.max(0.0) * 1e6).ceil() as u64;
    let mut queue: BinaryHeap<Reverse<(u64, Due)>> = BinaryHeap::new();
    let mut pseudonyms: Vec<Pseudonym> = devices.iter().map(|_| core.join(at(0.0), None)).collect();
    // A device told to wait holds its check-in open until its next one, as
    // over gRPC (`server.long_poll_secs`): a task handed to it meanwhile
    // (a free async slot drawn for it, a round that selects it) reaches it
    // at once.
    core.watch_handed();
    let mut device_of: HashMap<Pseudonym, usize> = pseudonyms
        .iter()
        .enumerate()
        .map(|(i, p)| (*p, i))
        .collect();
    let mut holding = vec![false; devices.len()];
    // Each device's one pending check-in: a wake replaces the one it held.
    let mut pending: Vec<Option<u64>> = vec![None; devices.len()];
    for (i, t) in traits.iter().enumerate() {
        let first = match t.window_at(0.0) {
            Ok(_) => Some(0.0),
            Err(next) => next,
        };
        if let Some(start) = first {
            check_in_at(&mut queue, &mut pending, i, micros(start));
        }
    }
    queue.push(Reverse((0, Due::Evaluate)));
    let mut busy: Vec<Option<Busy>> = devices.iter().map(|_| None).collect();
    let mut fleet = Fleet::new(devices);
    // The current version as devices decode it, decoded once per version.
    let mut decoded: Option<(u64, Arc<Vec<f32>>)> = None;
    let mut report = PopulationReport {
        track: ev.track.to_string(),
        mode: format!("{:?}", core.config().rounds.mode).to_lowercase(),
        population: population.clone(),
        ..PopulationReport::default()
    };
    let (mut wasted, mut spent) = (0.0f64, 0.0f64);
    let mut rows: Vec<RoundRow> = Vec::new();
    let mut last_counts = EvalCounts::default();
    let mut round_start = Instant::now();
    let mut next_poll: Option<u64> = None;
    let check_in_max = population.check_in_minutes * 60.0;
    let download_encoding = core.config().download.encoding;
    let mut t_end = horizon;
    while let Some(Reverse((when, due))) = queue.pop() {
        let t = when as f64 / 1e6;
        if t > horizon {
            break;
        }
        t_end = t;
        let now = at(t);
        match due {
            Due::Poll => next_poll = None,
            Due::Evaluate => {
                let global = received(&core, &mut decoded);
                let point = evaluate(&core, &global, &mut fleet, ev, training, seed, t)?;
                last_counts = point.1;
                report.curve.push(point.0);
                let next = t + population.evaluate_every_minutes * 60.0;
                queue.push(Reverse((micros(next), Due::Evaluate)));
            }
            Due::CheckIn(i) => {
                if pending[i] != Some(when) {
                    // Replaced by a later or an earlier check-in.
                } else if core.finished().is_some() || busy[i].is_some() {
                    pending[i] = None;
                } else {
                    pending[i] = None;
                    holding[i] = false;
                    match traits[i].window_at(t) {
                        Err(next) => {
                            if let Some(s) = next {
                                check_in_at(&mut queue, &mut pending, i, micros(s));
                            }
                        }
                        Ok(window_end) => {
                            let before = pseudonyms[i];
                            let outcome =
                                super::inproc::check_in(&mut core, now, &mut pseudonyms[i])?;
                            if pseudonyms[i] != before {
                                device_of.remove(&before);
                                device_of.insert(pseudonyms[i], i);
                            }
                            match outcome {
                                CheckIn::Task(task) => {
                                    report.tasks += 1;
                                    let tr = &traits[i];
                                    let values = core.model().params.len();
                                    let down = 8.0 * download_encoding.wire_bytes(values) as f64
                                        / tr.download_bps;
                                    let up = 8.0 * task.upload_encoding.wire_bytes(values) as f64
                                        / tr.upload_bps;
                                    let end = t + down + tr.compute_secs + up;
                                    let drop_at = if rand::RngExt::random_bool(
                                        &mut rng,
                                        population.dropout,
                                    ) {
                                        Some(rand::RngExt::random_range(&mut rng, t..end))
                                    } else {
                                        (end > window_end).then_some(window_end)
                                    };
                                    match drop_at {
                                        Some(d) => queue.push(Reverse((micros(d), Due::Drop(i)))),
                                        None => {
                                            // A task ending after the horizon is
                                            // never handed in: not trained.
                                            if end <= horizon {
                                                let device_task =
                                                    DeviceTask::try_from(&task_to_pb(&task, now))
                                                        .context("the device refused its task")?;
                                                let global = received(&core, &mut decoded);
                                                fleet.train(i, device_task, global);
                                            }
                                            queue.push(Reverse((micros(end), Due::Finish(i))));
                                        }
                                    }
                                    busy[i] = Some(Busy {
                                        task,
                                        compute_secs: tr.compute_secs,
                                    });
                                }
                                CheckIn::Wait { retry_after } => {
                                    holding[i] = true;
                                    let wait = retry_after.as_secs_f64().clamp(1.0, check_in_max);
                                    check_in_at(&mut queue, &mut pending, i, micros(t + wait));
                                }
                                _ => {}
                            }
                        }
                    }
                }
            }
            Due::Drop(i) => {
                if let Some(b) = busy[i].take() {
                    report.dropped += 1;
                    spent += b.compute_secs;
                    wasted += b.compute_secs;
                    check_in_at(&mut queue, &mut pending, i, micros(t + 1.0));
                }
            }
            Due::Finish(i) => {
                if let Some(b) = busy[i].take() {
                    spent += b.compute_secs;
                    let output = fleet.output(i)?;
                    match submit(&mut core, now, pseudonyms[i], &b.task, output) {
                        Ok(()) => {
                            report.accepted += 1;
                            fleet.contributed[i] = true;
                        }
                        Err(e) if came_too_late(&e) => {
                            report.refused += 1;
                            wasted += b.compute_secs;
                        }
                        Err(e) => return Err(e),
                    }
                    check_in_at(&mut queue, &mut pending, i, micros(t + 1.0));
                }
            }
        }
        for event in core.poll(now) {
            record_event(
                &event,
                &mut rows,
                &mut last_counts,
                &mut round_start,
                observer,
            );
        }
        for p in core.take_handed() {
            if let Some(&j) = device_of.get(&p)
                && std::mem::take(&mut holding[j])
            {
                check_in_at(&mut queue, &mut pending, j, when);
            }
        }
        if core.finished().is_some() {
            break;
        }
        t_end = horizon;
        if let Some(timer) = core.poll_timeout() {
            let tm = micros(timer.saturating_duration_since(base).as_secs_f64());
            if next_poll.is_none_or(|p| tm < p) && tm >= when {
                next_poll = Some(tm);
                queue.push(Reverse((tm.max(when + 1), Due::Poll)));
            }
        }
    }
    // Work still in progress at the end was not applied.
    for b in busy.iter().flatten() {
        spent += b.compute_secs;
        wasted += b.compute_secs;
    }
    let global = received(&core, &mut decoded);
    let final_point = evaluate(&core, &global, &mut fleet, ev, training, seed, t_end)?;
    last_counts = final_point.1;
    if report.curve.last().map(|p| p.hours) != Some(final_point.0.hours) {
        report.curve.push(final_point.0);
    }
    report.device_hours = spent / 3600.0;
    report.thrown_away = if spent > 0.0 { wasted / spent } else { 0.0 };
    report.tasks_per_second =
        (report.accepted + report.refused) as f64 / wall.elapsed().as_secs_f64();
    let global = Arc::unwrap_or_clone(global);
    Ok(((rows, last_counts, global, fleet.into_devices()), report))
}

/// Schedules device `i`'s check-in at `at` (microseconds), replacing the
/// one pending: a device has at most one check-in on its way.
fn check_in_at(
    queue: &mut BinaryHeap<Reverse<(u64, Due)>>,
    pending: &mut [Option<u64>],
    i: usize,
    at: u64,
) {
    pending[i] = Some(at);
    queue.push(Reverse((at, Due::CheckIn(i))));
}

/// The current model as a device decodes its download, from `cache` when
/// it holds this version.
fn received(core: &RoundCore, cache: &mut Option<(u64, Arc<Vec<f32>>)>) -> Arc<Vec<f32>> {
    let model = core.model();
    match cache {
        Some((version, global)) if *version == model.version => Arc::clone(global),
        _ => {
            let global = Arc::new(model.download.decode());
            *cache = Some((model.version, Arc::clone(&global)));
            global
        }
    }
}

/// Every device of `fleet`, once home, fits its private vector to the
/// current model and ranks its held-out purchase (in parallel); the counts,
/// summed in device order, as a point of the curve.
fn evaluate(
    core: &RoundCore,
    global: &[f32],
    fleet: &mut Fleet,
    ev: &Evaluation,
    training: &fedrec_client::model::LocalTraining,
    seed: u64,
    t: f64,
) -> anyhow::Result<(QualityPoint, EvalCounts)> {
    use rayon::prelude::*;
    let each: Vec<anyhow::Result<Option<EvalCounts>>> = fleet
        .all_home()
        .par_iter_mut()
        .map(|(user, device)| {
            let device = device.as_mut().expect("every device is home");
            let Some(held) = eval::held_out(ev, seed, *user) else {
                return Ok(None);
            };
            device.personalize(global, training)?;
            Ok(Some(
                device.evaluate_held_out(global, &held, Row::Discover)?.0,
            ))
        })
        .collect();
    let mut counts = EvalCounts::default();
    for c in each {
        if let Some(c) = c? {
            counts.add(&c);
        }
    }
    Ok((
        QualityPoint {
            hours: t / 3600.0,
            model_version: core.model().version,
            hr_at_10: counts.hit_rate_full().unwrap_or(0.0),
            ndcg_at_10: counts.ndcg_full_mean().unwrap_or(0.0),
            contributors: fleet.contributors(),
        },
        counts,
    ))
}

#[cfg(test)]
mod tests;
