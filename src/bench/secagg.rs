//! `fedrec bench secagg`: the cost of a training round with and without
//! secure aggregation, for several cohort and update sizes.

use std::time::{Duration, Instant};

use anyhow::Context;
use fedrec_coordinator::config::{CoordinatorConfig, Weighting};
use fedrec_coordinator::round::{CheckIn, Event, Pseudonym, RoundCore, Task, UpdateHeader};
use fedrec_proto::secagg::payload;
use fedrec_proto::{Layout, tensor};
use serde::Serialize;

use crate::sim::secagg::{SecureTiming, drive_round};

/// Default cohort sizes of [`secagg`].
pub const DEFAULT_COHORTS: [usize; 3] = [10, 100, 500];
/// Default update sizes of [`secagg`]: MovieLens-1M's 3,706 items × 32
/// factors, and a larger catalogue.
pub const DEFAULT_SIZES: [usize; 2] = [118_592, 1_000_000];

/// One measured configuration: a round of `devices` devices with updates of
/// `values` values, plain and through secure aggregation.
#[derive(Clone, Debug, Serialize)]
pub struct SecAggRow {
    /// Devices in the cohort.
    pub devices: usize,
    /// Values per update.
    pub values: usize,
    /// Neighbours per device under secure aggregation.
    pub neighbours: usize,
    /// Plain round: time inside the coordinator core (checking and folding
    /// every update, applying the strategy), in seconds.
    pub plain_coordinator_s: f64,
    /// Plain round: one device's part (encoding its update), the mean.
    pub plain_device_s: f64,
    /// Secure round: time inside the coordinator core, unmasking included.
    pub secure_coordinator_s: f64,
    /// Of which the unmasking job (reconstruction and mask removal).
    pub secure_unmask_s: f64,
    /// The rest of the coordinator's time, per step (advertise: signature
    /// checks; share keys: rosters and routing; masked input: adding into
    /// the sum; unmask: checking revealed shares).
    pub secure_coordinator_steps_s: [f64; 4],
    /// Secure round: one device's time, the sum over the four steps of the
    /// mean device time (key generation; key agreement and share encryption;
    /// quantizing and masking; revealing shares). Devices run in parallel on
    /// their own hardware, so this is what a round waits for.
    pub secure_device_s: f64,
    /// Secure round: the sum over the steps of the slowest simulated
    /// device's time (includes the simulation host's scheduling noise).
    pub secure_device_max_s: f64,
    /// Secure round: CPU time of all devices together.
    pub secure_device_total_s: f64,
    /// Secure round: the mean device time in each step (advertise, share
    /// keys, mask, unmask).
    pub secure_device_steps_s: [f64; 4],
    /// Bytes the coordinator's secure aggregation state held at most.
    pub secure_state_bytes: usize,
    /// Bytes the plain aggregator holds (the running sum).
    pub plain_state_bytes: usize,
}

impl SecAggRow {
    /// Round time of the plain protocol when each device runs on its own
    /// hardware: the coordinator's time plus a device's.
    pub fn plain_round_s(&self) -> f64 {
        self.plain_coordinator_s + self.plain_device_s
    }

    /// Round time under secure aggregation, likewise.
    pub fn secure_round_s(&self) -> f64 {
        self.secure_coordinator_s + self.secure_device_s
    }

    /// How many times the plain round secure aggregation costs.
    pub fn ratio(&self) -> f64 {
        self.secure_round_s() / self.plain_round_s()
    }
}

/// What [`secagg`] measures.
#[derive(Clone, Debug)]
pub struct SecAggBench {
    /// Cohort sizes.
    pub cohorts: Vec<usize>,
    /// Update sizes (values).
    pub sizes: Vec<usize>,
    /// Threads simulating the devices.
    pub threads: usize,
    /// Seed of the stub updates, cohorts and keys.
    pub seed: u64,
    /// Rounds measured per configuration and protocol; the fastest counts
    /// (the others mostly measure other work on the host).
    pub repeats: usize,
}

impl Default for SecAggBench {
    fn default() -> Self {
        Self {
            cohorts: DEFAULT_COHORTS.to_vec(),
            sizes: DEFAULT_SIZES.to_vec(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            seed: crate::sim::DEFAULT_SEED,
            repeats: DEFAULT_REPEATS,
        }
    }
}

/// Default [`SecAggBench::repeats`].
pub const DEFAULT_REPEATS: usize = 5;

/// Updates in memory per device thread at a time.
const IN_FLIGHT_PER_THREAD: usize = 2;

/// A device's stub update (local training is not what is measured): values
/// in about `[-0.3, 0.3]`, like the default recipe's, from a cheap seeded
/// generator.
fn stub_update(values: usize, device: u64) -> Vec<f32> {
    let mut x = device.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..values)
        .map(|_| {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            (r as f32 / (1 << 24) as f32 - 0.5) * 0.6
        })
        .collect()
}

fn config(devices: usize, secure: bool, seed: u64) -> CoordinatorConfig {
    let mut cfg = CoordinatorConfig::default();
    cfg.rounds.rounds = 1;
    cfg.rounds.clients_per_round = devices;
    cfg.rounds.min_updates = devices.min(2);
    cfg.rounds.evaluate = false;
    cfg.rounds.final_evaluation = false;
    cfg.rounds.seed = Some(seed);
    cfg.rounds.deadline_secs = 3600.0;
    cfg.strategy.weighting = Weighting::Uniform;
    cfg.secure_aggregation.enabled = secure;
    cfg.secure_aggregation.step_secs = 3600.0;
    cfg
}

/// A coordinator core with its round open, the time it opened, and each
/// selected device's task.
type OpenRound = (RoundCore, Instant, Vec<(Pseudonym, Task)>);

/// A core with one open round of `devices` devices over `values` values.
fn open_round(devices: usize, values: usize, secure: bool, seed: u64) -> anyhow::Result<OpenRound> {
    let layout = Layout::new(vec![("update".into(), vec![values as u64])]);
    let mut core = RoundCore::new(
        config(devices, secure, seed).validated()?,
        layout,
        vec![0.0; values],
    )?;
    let now = Instant::now();
    let pseudonyms: Vec<Pseudonym> = (0..devices).map(|_| core.join(now, None)).collect();
    for p in &pseudonyms {
        core.check_in(now, p)?;
    }
    let mut tasks = Vec::with_capacity(devices);
    for p in &pseudonyms {
        match core.check_in(now, p)? {
            CheckIn::Task(task) => tasks.push((*p, task)),
            other => anyhow::bail!("expected a task, got {other:?}"),
        }
    }
    Ok((core, now, tasks))
}

/// Whether the round ended completed.
fn completed(core: &mut RoundCore, now: Instant) -> bool {
    core.poll(now)
        .iter()
        .any(|e| matches!(e, Event::RoundEnded(s) if s.completed))
}

/// One plain round: returns (coordinator time, slowest device's time).
fn plain_round(devices: usize, values: usize, seed: u64) -> anyhow::Result<(f64, f64)> {
    let (mut core, now, tasks) = open_round(devices, values, false, seed)?;
    let mut coordinator = Duration::ZERO;
    let mut device = Duration::ZERO;
    let count = tasks.len().max(1) as u32;
    for (i, (p, task)) in tasks.iter().enumerate() {
        let update = stub_update(values, seed ^ i as u64);
        let start = Instant::now();
        let bytes = tensor::encode(&update);
        device += start.elapsed();
        let header = UpdateHeader {
            pseudonym: *p,
            round: task.round,
            model_version: task.model_version,
            num_examples: 1,
            num_values: values as u64,
            evaluation: None,
        };
        let start = Instant::now();
        core.submit_update(now, header, &bytes)?;
        coordinator += start.elapsed();
    }
    let start = Instant::now();
    let done = completed(&mut core, now);
    coordinator += start.elapsed();
    anyhow::ensure!(done, "the plain round did not complete");
    Ok((coordinator.as_secs_f64(), (device / count).as_secs_f64()))
}

/// One secure round: the timing and the neighbours per device.
fn secure_round(
    devices: usize,
    values: usize,
    threads: usize,
    seed: u64,
) -> anyhow::Result<(SecureTiming, usize)> {
    let (mut core, now, tasks) = open_round(devices, values, true, seed)?;
    let range = core.config().secure_aggregation.range;
    let cohort = tasks
        .into_iter()
        .enumerate()
        .map(|(i, (p, t))| (p, t, i as u64))
        .collect();
    let timing = drive_round(
        &mut core,
        now,
        cohort,
        seed,
        threads,
        IN_FLIGHT_PER_THREAD,
        |_, i| {
            let update = stub_update(values, seed ^ *i);
            Ok(payload::encode(
                &update,
                1,
                None,
                payload::Weighting::Uniform,
                range,
                0.0,
            ))
        },
    )?;
    let summary = core
        .history()
        .last()
        .cloned()
        .context("the secure round did not end")?;
    anyhow::ensure!(
        summary.completed,
        "the secure round was abandoned: {:?}",
        summary.abandon_reason
    );
    let neighbours = summary.secure_aggregation.map_or(0, |s| s.neighbours);
    Ok((timing, neighbours))
}

/// Measures a plain and a secure round for every cohort and update size, in
/// process: the real coordinator core and the devices' real secure
/// aggregation state machines, with local training replaced by a stub.
/// `progress` sees each row as it is measured.
pub fn secagg(
    bench: &SecAggBench,
    mut progress: impl FnMut(&SecAggRow),
) -> anyhow::Result<Vec<SecAggRow>> {
    let mut rows = Vec::new();
    for &values in &bench.sizes {
        for &devices in &bench.cohorts {
            let mut plain = (f64::INFINITY, 0.0);
            let mut secure: Option<(SecureTiming, usize)> = None;
            for _ in 0..bench.repeats.max(1) {
                let p = plain_round(devices, values, bench.seed)?;
                if p.0 + p.1 < plain.0 + plain.1 {
                    plain = p;
                }
                let s = secure_round(devices, values, bench.threads, bench.seed)?;
                let time = |t: &SecureTiming| t.coordinator + t.device_mean_path();
                if secure
                    .as_ref()
                    .is_none_or(|best| time(&s.0) < time(&best.0))
                {
                    secure = Some(s);
                }
            }
            let (plain_coordinator_s, plain_device_s) = plain;
            let (timing, neighbours) = secure.context("at least one repeat")?;
            let row = SecAggRow {
                devices,
                values,
                neighbours,
                plain_coordinator_s,
                plain_device_s,
                secure_coordinator_s: timing.coordinator.as_secs_f64(),
                secure_unmask_s: timing.unmask.as_secs_f64(),
                secure_coordinator_steps_s: timing.coordinator_steps.map(|d| d.as_secs_f64()),
                secure_device_s: timing.device_mean_path().as_secs_f64(),
                secure_device_max_s: timing.device_critical_path().as_secs_f64(),
                secure_device_total_s: timing.device_total.iter().sum::<Duration>().as_secs_f64(),
                secure_device_steps_s: std::array::from_fn(|i| {
                    timing.device_total[i].as_secs_f64() / f64::from(timing.device_count[i].max(1))
                }),
                secure_state_bytes: timing.peak_state_bytes,
                plain_state_bytes: 4 * values,
            };
            progress(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The rows as a Markdown table.
pub fn secagg_table(rows: &[SecAggRow]) -> String {
    let mut out = String::from(
        "| devices | values | k | plain round (ms) | secure round (ms) | ratio | coordinator plain / secure (ms) | of which unmask (ms) | device path (ms) | all devices' CPU (s) | coordinator state plain / secure (MB) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let ms = |s: f64| s * 1e3;
    let mb = |b: usize| b as f64 / (1 << 20) as f64;
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} | {:.1} / {:.1} | {:.1} | {:.1} | {:.2} | {:.2} / {:.2} |\n",
            r.devices,
            r.values,
            r.neighbours,
            ms(r.plain_round_s()),
            ms(r.secure_round_s()),
            r.ratio(),
            ms(r.plain_coordinator_s),
            ms(r.secure_coordinator_s),
            ms(r.secure_unmask_s),
            ms(r.secure_device_s),
            r.secure_device_total_s,
            mb(r.plain_state_bytes),
            mb(r.secure_state_bytes),
        ));
    }
    out
}
