//! `fedrec devices`: many simulated devices in one process, each holding
//! one user's history and speaking the real protocol to a coordinator
//! (single or replicated), so that a simulation or a load test can spread
//! its devices over several processes and machines.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use fedrec::sim;
use fedrec_client::connect::ConnectOptions;
use serde::Serialize;
use tokio::sync::Semaphore;

use super::*;

#[derive(Args, Debug)]
pub(crate) struct DevicesArgs {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
    /// Which of the data's users get a device here: `all`, `A..B` (the
    /// users at positions A to B-1 in the data's order, from 0) or `K/N`
    /// (the K-th of N equal shares, K from 1), so that several processes or
    /// machines split one fleet. Device i starts at the i-th URL of
    /// --coordinator (round robin), so a fleet spreads over the replicas.
    #[arg(long, default_value = "all", value_parser = UserRange::parse)]
    pub(crate) users: UserRange,
    /// Devices working on a task at once (download, training, upload);
    /// the others wait their turn, checked in.
    #[arg(long, default_value_t = sim::SIM_ACTIVE)]
    pub(crate) active: usize,
    /// Seconds over which the devices join, evenly spread (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) ramp_secs: f64,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) progress_secs: f64,
    /// Enrollment tokens, one per device: the device of the user at
    /// position P (from 0) joins with DIR/device-{P+1}.token, as `fedrec
    /// tokens --out DIR --devices N` writes them. (--token-file would give
    /// every device one token, whose sessions are limited.)
    #[arg(long, value_name = "DIR", conflicts_with = "token_file")]
    pub(crate) token_dir: Option<PathBuf>,
    /// Write every device's outcome and the totals to this file, as JSON.
    #[arg(long, value_name = "FILE")]
    pub(crate) report: Option<PathBuf>,
    /// Latent factors to expect (checked against the coordinator's model).
    #[arg(long)]
    pub(crate) factors: Option<usize>,
    /// Seed of the devices' local randomness.
    #[arg(long, default_value_t = sim::DEFAULT_SEED)]
    pub(crate) seed: u64,
}

/// Which users get a device (`--users`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum UserRange {
    All,
    /// Positions `.0` to `.1 - 1`.
    Span(usize, usize),
    /// The `.0`-th of `.1` equal shares (from 1).
    Share(usize, usize),
}

impl UserRange {
    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let number = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?} is not a whole number"))
        };
        let range = if text == "all" {
            Self::All
        } else if let Some((a, b)) = text.split_once("..") {
            Self::Span(number(a)?, number(b)?)
        } else if let Some((k, n)) = text.split_once('/') {
            Self::Share(number(k)?, number(n)?)
        } else {
            return Err(format!(
                "{text:?}: expected all, A..B (positions A to B-1) or K/N (the K-th of N shares)"
            ));
        };
        match range {
            Self::Span(a, b) if a >= b => Err(format!("{text}: an empty range")),
            Self::Share(k, n) if k == 0 || k > n => {
                Err(format!("{text}: K must be between 1 and N"))
            }
            ok => Ok(ok),
        }
    }

    /// The positions of `users` users this range takes.
    fn resolve(self, users: usize) -> anyhow::Result<Range<usize>> {
        match self {
            Self::All => Ok(0..users),
            Self::Span(a, b) if b > users => {
                bail!(
                    "--users {a}..{b}: the data have {users} users (positions 0 to {})",
                    users.max(1) - 1
                )
            }
            Self::Span(a, b) => Ok(a..b),
            Self::Share(k, n) => Ok(users * (k - 1) / n..users * k / n),
        }
    }
}

/// What one device did, for the report.
#[derive(Clone, Debug, Default, Serialize)]
struct DeviceReport {
    /// The user (external id) whose history the device held.
    user: String,
    /// The endpoint it ended at, and its pseudonym there.
    endpoint: Option<String>,
    pseudonym: Option<String>,
    /// Its purchases in the coordinator's catalogue.
    purchases: usize,
    trained: u32,
    evaluated: u32,
    refused: u32,
    interrupted: u32,
    reconnects: u32,
    failovers: u32,
    rejoins: u32,
    bytes_sent: usize,
    seconds: f64,
    /// Why the coordinator finished, when the device saw it finish.
    finished: Option<String>,
    /// Why the device failed, if it did.
    error: Option<String>,
}

/// The totals over the devices.
#[derive(Clone, Debug, Default, Serialize)]
struct Totals {
    devices: usize,
    finished: usize,
    failed: usize,
    trained: u64,
    evaluated: u64,
    refused: u64,
    interrupted: u64,
    failovers: u64,
    rejoins: u64,
    bytes_sent: u64,
    seconds: f64,
}

impl Totals {
    fn of(reports: &[DeviceReport], seconds: f64) -> Self {
        let sum = |f: fn(&DeviceReport) -> u32| reports.iter().map(|r| u64::from(f(r))).sum();
        Self {
            devices: reports.len(),
            finished: reports.iter().filter(|r| r.error.is_none()).count(),
            failed: reports.iter().filter(|r| r.error.is_some()).count(),
            trained: sum(|r| r.trained),
            evaluated: sum(|r| r.evaluated),
            refused: sum(|r| r.refused),
            interrupted: sum(|r| r.interrupted),
            failovers: sum(|r| r.failovers),
            rejoins: sum(|r| r.rejoins),
            bytes_sent: reports.iter().map(|r| r.bytes_sent as u64).sum(),
            seconds,
        }
    }
}

/// Live counts, for the progress lines.
#[derive(Debug, Default)]
struct Live {
    joined: AtomicUsize,
    done: AtomicUsize,
    failed: AtomicUsize,
}

pub(crate) fn devices(args: DevicesArgs) -> anyhow::Result<()> {
    let ds = args.data.load(args.seed)?;
    let range = args.users.resolve(ds.user_ids.len())?;
    let fleet = Arc::new(Fleet::new(ds, args.seed, args.factors)?);
    let options = args.connect.options()?;
    let urls: Vec<String> = args
        .connect
        .coordinator
        .split(',')
        .map(|u| u.trim().to_owned())
        .collect();
    if !(args.progress_secs > 0.0 && args.ramp_secs >= 0.0) {
        bail!("--progress-secs must be positive and --ramp-secs at least 0");
    }
    let n = range.len();
    if args.connect.token_file.is_some() && n > 1 {
        bail!(
            "--token-file gives all {n} devices one enrollment token, and a token holds at most \
             auth.max_sessions_per_token sessions (1 by default): the devices would end each \
             other's sessions. Give each its own with --token-dir DIR (`fedrec tokens --out DIR \
             --devices N` writes device-1.token …)"
        );
    }
    // Each device's options, its token read now: a missing one is an error
    // before any device starts.
    let per_device: Vec<ConnectOptions> = match &args.token_dir {
        Some(dir) => range
            .clone()
            .map(|user| {
                let file = dir.join(format!("device-{}.token", user + 1));
                options.clone().enrollment_token_file(&file)
            })
            .collect::<Result<_, _>>()?,
        None => vec![options; n],
    };
    eprintln!(
        "{n} devices (users {}..{} of {}) against {}",
        range.start,
        range.end,
        fleet.users().len(),
        urls.join(", ")
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let started = Instant::now();
    let reports = runtime.block_on(async {
        let permits = Arc::new(Semaphore::new(args.active.max(1)));
        let live = Arc::new(Live::default());
        let step = Duration::from_secs_f64(args.ramp_secs / n.max(1) as f64);
        let mut running = tokio::task::JoinSet::new();
        for ((i, user), options) in range.clone().enumerate().zip(per_device) {
            let mut mine = urls.clone();
            mine.rotate_left(i % urls.len());
            let device = Device {
                fleet: Arc::clone(&fleet),
                user,
                urls: mine.join(","),
                options,
                permits: Arc::clone(&permits),
                live: Arc::clone(&live),
            };
            running.spawn(async move {
                tokio::time::sleep(step * i as u32).await;
                device.run().await
            });
        }
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(args.progress_secs));
        ticker.tick().await;
        let mut reports = Vec::with_capacity(n);
        loop {
            tokio::select! {
                joined = running.join_next() => {
                    let Some(joined) = joined else { break };
                    let report = joined.context("a device's task panicked")?;
                    say(&report);
                    reports.push(report);
                }
                _ = ticker.tick() => eprintln!(
                    "{:.0} s: {} of {n} devices joined, {} done, {} failed",
                    started.elapsed().as_secs_f64(),
                    live.joined.load(Ordering::Relaxed),
                    live.done.load(Ordering::Relaxed),
                    live.failed.load(Ordering::Relaxed),
                ),
            }
        }
        anyhow::Ok(reports)
    })?;
    let totals = Totals::of(&reports, started.elapsed().as_secs_f64());
    eprintln!(
        "{} devices: {} finished, {} failed; {} training tasks, {} evaluations, {} refused, \
         {} interrupted; {} failovers, {} joins again; {} bytes sent in {:.2} s",
        totals.devices,
        totals.finished,
        totals.failed,
        totals.trained,
        totals.evaluated,
        totals.refused,
        totals.interrupted,
        totals.failovers,
        totals.rejoins,
        totals.bytes_sent,
        totals.seconds
    );
    if let Some(path) = &args.report {
        let json = serde_json::json!({ "totals": totals, "devices": reports });
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("cannot write the report {}", path.display()))?;
    }
    if totals.failed > 0 {
        let first = reports
            .iter()
            .find_map(|r| r.error.as_ref().map(|e| format!("user {}: {e}", r.user)))
            .unwrap_or_default();
        bail!(
            "{} of {} devices failed (first: {first})",
            totals.failed,
            totals.devices
        );
    }
    Ok(())
}

/// One device's line when it is done.
fn say(r: &DeviceReport) {
    match &r.error {
        Some(error) => eprintln!("user {}: failed: {error}", r.user),
        None => eprintln!(
            "user {}: {} training tasks, {} evaluations, {} refused, {} failovers, {} joins again \
             at {}",
            r.user,
            r.trained,
            r.evaluated,
            r.refused,
            r.failovers,
            r.rejoins,
            r.endpoint.as_deref().unwrap_or("?")
        ),
    }
}

/// One simulated device and what it needs.
struct Device {
    fleet: Arc<Fleet>,
    user: usize,
    urls: String,
    options: ConnectOptions,
    permits: Arc<Semaphore>,
    live: Arc<Live>,
}

impl Device {
    /// Joins and takes part until the coordinator finishes; never fails:
    /// an error is the report's.
    async fn run(self) -> DeviceReport {
        let started = Instant::now();
        let mut report = DeviceReport {
            user: self.fleet.users()[self.user].clone(),
            ..DeviceReport::default()
        };
        let outcome = async {
            let joined = self
                .fleet
                .join(self.user, &self.urls, &self.options)
                .await?;
            self.live.joined.fetch_add(1, Ordering::Relaxed);
            report.purchases = joined.mapped;
            let mut participant = joined
                .participant
                .with_work_limit(Arc::clone(&self.permits));
            let result = participant.run(joined.device).await;
            report.endpoint = participant.endpoint().map(str::to_owned);
            report.pseudonym = Some(participant.pseudonym().to_owned());
            report.bytes_sent = participant.sent().total_bytes();
            let (_, summary) = result?;
            anyhow::Ok(summary)
        }
        .await;
        report.seconds = started.elapsed().as_secs_f64();
        match outcome {
            Ok(s) => {
                self.live.done.fetch_add(1, Ordering::Relaxed);
                report.trained = s.trained;
                report.evaluated = s.evaluated;
                report.refused = s.refused;
                report.interrupted = s.interrupted;
                report.reconnects = s.reconnects;
                report.failovers = s.failovers;
                report.rejoins = s.rejoins;
                report.finished = Some(s.finished_reason);
            }
            Err(e) => {
                self.live.failed.fetch_add(1, Ordering::Relaxed);
                report.error = Some(format!("{e}"));
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ranges_split_a_fleet() {
        let all = UserRange::parse("all").unwrap();
        assert_eq!(all.resolve(7).unwrap(), 0..7);
        let span = UserRange::parse("2..5").unwrap();
        assert_eq!(span.resolve(7).unwrap(), 2..5);
        assert!(span.resolve(4).unwrap_err().to_string().contains("4 users"));
        // Shares cover every user once.
        let shares: Vec<Range<usize>> = (1..=3)
            .map(|k| UserRange::Share(k, 3).resolve(7).unwrap())
            .collect();
        assert_eq!(shares, vec![0..2, 2..4, 4..7]);
        for bad in ["5..5", "0/2", "3/2", "x..4", "half"] {
            assert!(UserRange::parse(bad).is_err(), "{bad}");
        }
    }
}
