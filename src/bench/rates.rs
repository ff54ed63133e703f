//! `fedrec bench rates`: how many joins and check-ins one coordinator (or
//! one replica on a PostgreSQL store) answers per second, and the load they
//! put on the store.
//!
//! The coordinator runs in its own process with a model of 1,024 values and
//! a round that never starts; this process is the devices, [`IN_FLIGHT`]
//! requests at a time over a few connections:
//! 1. `devices` devices join (each join writes its session to the store);
//! 2. for `secs` seconds they check in over and over (the check-in's long
//!    poll is 1 ms, so each answers "wait" at once);
//! 3. with a store, a second replica starts and every device checks in
//!    there once: a replica that has not seen a device looks its session up
//!    in the store (what a device moving between replicas, or a per-request
//!    load balancer, costs).
//!
//! With a store, its activity (PostgreSQL's `pg_stat_database`) is read
//! before and after each step, and while nothing happens (the replicas'
//! own loop: heartbeats, following the store, the leader's checks), which
//! is subtracted from the steps. PostgreSQL publishes a session's counts
//! about ten seconds after it goes idle, so each reading waits [`FLUSH`].

use std::time::{Duration, Instant};

use anyhow::Context;
use fedrec_coordinator::config::CoordinatorConfig;
use fedrec_proto::PROTOCOL_VERSION;
use fedrec_proto::pb::{self, coordinator_client::CoordinatorClient};
use fedrec_store::{DbActivity, Store};
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::{Deployment, ServeProcess, Wire};

/// Requests in flight at once.
const IN_FLIGHT: usize = 256;

/// How long PostgreSQL may take to publish a session's activity counts.
const FLUSH: Duration = Duration::from_secs(11);

/// One step's rate and, with a store, its load on it.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// Requests answered.
    pub requests: usize,
    /// Seconds the step took.
    pub secs: f64,
    /// Requests per second.
    pub per_sec: f64,
    /// Store transactions (statements, outside explicit transactions) per
    /// second beyond the replicas' own loop.
    pub store_transactions_per_sec: Option<f64>,
    /// Rows read per second, beyond the loop's.
    pub store_rows_read_per_sec: Option<f64>,
    /// Rows written per second, beyond the loop's.
    pub store_rows_written_per_sec: Option<f64>,
}

/// What [`rates`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct RatesRow {
    /// Devices.
    pub devices: usize,
    /// Whether the coordinator was a replica on a store.
    pub store: bool,
    /// Step 1.
    pub join: Step,
    /// Step 2.
    pub check_in: Step,
    /// Step 3 (with a store).
    pub first_check_in_elsewhere: Option<Step>,
    /// The replicas' own load on the store with nothing to do: transactions
    /// per second for one replica (the leader) and for the second.
    pub store_idle_transactions_per_sec: Option<[f64; 2]>,
    /// The coordinator's CPU during step 2, in cores.
    pub check_in_cpu_cores: f64,
}

/// Runs the steps against a coordinator started from `base`, in one process
/// or as replicas on `deployment.store`.
pub fn rates(
    base: CoordinatorConfig,
    devices: usize,
    secs: f64,
    deployment: &Deployment,
) -> anyhow::Result<RatesRow> {
    let mut cfg = base;
    cfg.server.long_poll_secs = 0.001;
    cfg.server.joins_per_minute_per_source = 0;
    let dir = tempfile::tempdir()?;
    let processes = Deployment {
        replicas: 2,
        ..deployment.clone()
    }
    .processes(dir.path());
    let start = |args: &[String]| {
        // A round never starts: it would need every device and one more.
        ServeProcess::start(cfg.clone(), devices + 1, 1024, 1, Wire::default(), args)
    };
    let first = start(&processes[0])?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let store = match &deployment.store {
            Some(url) => Some(Store::connect(url).await?),
            None => None,
        };
        let meter = Meter {
            store: store.as_ref(),
        };
        let idle_one = meter.idle().await?;
        let channels = crate::sim::connect(&first.addr, crate::sim::SIM_CONNECTIONS).await?;

        let before = meter.read().await?;
        let started = Instant::now();
        let pseudonyms = join(&channels, devices).await?;
        let join = meter.step(devices, started, before, idle_one).await?;

        let before = meter.read().await?;
        let cpu = first.cpu_secs()?;
        let started = Instant::now();
        let answered = check_in_for(&channels, &pseudonyms, Duration::from_secs_f64(secs)).await?;
        let check_in_cpu_cores = (first.cpu_secs()? - cpu) / started.elapsed().as_secs_f64();
        let check_in = meter.step(answered, started, before, idle_one).await?;

        let (first_check_in_elsewhere, idle) = match &store {
            Some(_) => {
                let second = start(&processes[1])?;
                let idle_two = meter.idle().await?;
                let channels =
                    crate::sim::connect(&second.addr, crate::sim::SIM_CONNECTIONS).await?;
                let before = meter.read().await?;
                let started = Instant::now();
                check_in_once(&channels, &pseudonyms).await?;
                let step = meter.step(devices, started, before, idle_two).await?;
                let loops = [
                    idle_one.transactions,
                    idle_two.transactions - idle_one.transactions,
                ];
                (Some(step), Some(loops))
            }
            None => (None, None),
        };
        anyhow::Ok(RatesRow {
            devices,
            store: store.is_some(),
            join,
            check_in,
            first_check_in_elsewhere,
            store_idle_transactions_per_sec: idle,
            check_in_cpu_cores,
        })
    })
}

/// Store activity per second, as floats.
#[derive(Clone, Copy, Debug, Default)]
struct PerSec {
    transactions: f64,
    rows_read: f64,
    rows_written: f64,
}

fn per_sec(a: DbActivity, secs: f64) -> PerSec {
    PerSec {
        transactions: a.transactions as f64 / secs,
        rows_read: a.rows_read as f64 / secs,
        rows_written: a.rows_written as f64 / secs,
    }
}

/// Reads the store's activity, if there is a store.
struct Meter<'a> {
    store: Option<&'a Store>,
}

impl Meter<'_> {
    /// The activity counters once everything before is published.
    async fn read(&self) -> anyhow::Result<Option<DbActivity>> {
        let Some(store) = self.store else {
            return Ok(None);
        };
        tokio::time::sleep(FLUSH).await;
        Ok(Some(store.activity().await?))
    }

    /// The background rate (the replicas' own loop) over 20 s.
    async fn idle(&self) -> anyhow::Result<PerSec> {
        let Some(store) = self.store else {
            return Ok(PerSec::default());
        };
        tokio::time::sleep(FLUSH).await;
        let a = store.activity().await?;
        let window = Duration::from_secs(20);
        tokio::time::sleep(window).await;
        let b = store.activity().await?;
        Ok(per_sec(b - a, window.as_secs_f64()))
    }

    /// A step of `requests` that began at `started` (with the counters
    /// `before`), its rate and its load beyond `idle`.
    async fn step(
        &self,
        requests: usize,
        started: Instant,
        before: Option<DbActivity>,
        idle: PerSec,
    ) -> anyhow::Result<Step> {
        let secs = started.elapsed().as_secs_f64();
        let after = self.read().await?;
        let load = match (before, after) {
            (Some(before), Some(after)) => {
                // Everything between the two readings, less the loop's.
                let window = started.elapsed().as_secs_f64();
                let total = after - before;
                let beyond = |count: i64, idle: f64| (count as f64 - idle * window) / secs;
                Some(PerSec {
                    transactions: beyond(total.transactions, idle.transactions),
                    rows_read: beyond(total.rows_read, idle.rows_read),
                    rows_written: beyond(total.rows_written, idle.rows_written),
                })
            }
            _ => None,
        };
        Ok(Step {
            requests,
            secs,
            per_sec: requests as f64 / secs,
            store_transactions_per_sec: load.map(|l| l.transactions),
            store_rows_read_per_sec: load.map(|l| l.rows_read),
            store_rows_written_per_sec: load.map(|l| l.rows_written),
        })
    }
}

/// Joins `n` devices; returns their pseudonyms.
async fn join(channels: &[Channel], n: usize) -> anyhow::Result<Vec<String>> {
    let mut joins = JoinSet::new();
    let mut pseudonyms = Vec::with_capacity(n);
    for i in 0..n {
        if joins.len() >= IN_FLIGHT {
            pseudonyms.push(joins.join_next().await.context("join task")???);
        }
        let mut client = CoordinatorClient::new(channels[i % channels.len()].clone());
        joins.spawn(async move {
            let request = pb::JoinRequest {
                protocol_version: PROTOCOL_VERSION,
                ..Default::default()
            };
            anyhow::Ok(client.join(request).await?.into_inner().pseudonym)
        });
    }
    while let Some(done) = joins.join_next().await {
        pseudonyms.push(done??);
    }
    Ok(pseudonyms)
}

/// Checks the devices in round robin, [`IN_FLIGHT`] at a time, for `run`;
/// returns the check-ins answered.
async fn check_in_for(
    channels: &[Channel],
    pseudonyms: &[String],
    run: Duration,
) -> anyhow::Result<usize> {
    let until = Instant::now() + run;
    let mut loops = JoinSet::new();
    for lane in 0..IN_FLIGHT.min(pseudonyms.len()) {
        let mut client = CoordinatorClient::new(channels[lane % channels.len()].clone());
        let mine: Vec<String> = pseudonyms
            .iter()
            .skip(lane)
            .step_by(IN_FLIGHT)
            .cloned()
            .collect();
        loops.spawn(async move {
            let mut answered = 0usize;
            for pseudonym in mine.iter().cycle() {
                if Instant::now() >= until {
                    break;
                }
                let request = pb::CheckInRequest {
                    pseudonym: pseudonym.clone(),
                };
                client.check_in(request).await?;
                answered += 1;
            }
            anyhow::Ok(answered)
        });
    }
    let mut answered = 0;
    while let Some(done) = loops.join_next().await {
        answered += done??;
    }
    Ok(answered)
}

/// Checks each device in once.
async fn check_in_once(channels: &[Channel], pseudonyms: &[String]) -> anyhow::Result<()> {
    let mut checks = JoinSet::new();
    for (i, pseudonym) in pseudonyms.iter().enumerate() {
        if checks.len() >= IN_FLIGHT {
            checks.join_next().await.context("check-in task")???;
        }
        let mut client = CoordinatorClient::new(channels[i % channels.len()].clone());
        let request = pb::CheckInRequest {
            pseudonym: pseudonym.clone(),
        };
        checks.spawn(async move { anyhow::Ok(client.check_in(request).await.map(drop)?) });
    }
    while let Some(done) = checks.join_next().await {
        done??;
    }
    Ok(())
}
