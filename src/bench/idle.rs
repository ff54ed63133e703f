//! `fedrec bench idle`: what waiting devices cost a coordinator.
//!
//! A `fedrec serve` process (so that its memory is its own) with a small
//! model and a round that never starts; this process is the devices:
//! 1. `joined` devices join over a few connections and go quiet: the
//!    coordinator's memory per joined device (the device table);
//! 2. `connections` devices each open a connection of their own, join, and
//!    hold a check-in (a long poll): memory per connected, waiting device,
//!    and the coordinator's CPU while they wait.
//!
//! Memory is the resident set (VmRSS) before and after each step; the
//! allocator keeps freed pages, so it is an upper bound of what the step
//! holds.

use std::time::{Duration, Instant};

use anyhow::Context;
use fedrec_coordinator::config::CoordinatorConfig;
use fedrec_proto::PROTOCOL_VERSION;
use fedrec_proto::pb::{self, coordinator_client::CoordinatorClient};
use serde::Serialize;
use tokio::task::JoinSet;

use super::{ServeProcess, Wire};

/// How long the held check-ins get to arrive before the measurement.
const SETTLE: Duration = Duration::from_secs(2);

/// Requests in flight while joining or connecting.
const IN_FLIGHT: usize = 256;

/// What [`idle`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct IdleRow {
    /// Devices joined in step 1.
    pub joined: usize,
    /// Connections, each with a device holding a check-in, in step 2.
    pub connections: usize,
    /// The coordinator's resident memory at start, MB.
    pub base_rss_mb: f64,
    /// After step 1, MB.
    pub joined_rss_mb: f64,
    /// With every connection open and its check-in held, MB.
    pub connected_rss_mb: f64,
    /// Bytes per joined device (step 1).
    pub bytes_per_joined_device: f64,
    /// Bytes per connected device holding a check-in (step 2).
    pub bytes_per_connection: f64,
    /// Seconds step 1 took (joins per second = joined / this).
    pub join_secs: f64,
    /// The coordinator's CPU use while the connections waited, in cores.
    pub idle_cpu_cores: f64,
    /// Over how many seconds that was measured.
    pub idle_secs: f64,
}

/// Runs both steps against a coordinator started from `base`.
pub fn idle(
    base: CoordinatorConfig,
    joined: usize,
    connections: usize,
    wait: Duration,
) -> anyhow::Result<IdleRow> {
    let mut cfg = base;
    // The held check-ins outlast the measurement.
    cfg.server.long_poll_secs = cfg.server.long_poll_secs.max(wait.as_secs_f64() + 60.0);
    cfg.auth.session_ttl_secs = cfg
        .auth
        .session_ttl_secs
        .max(cfg.server.long_poll_secs + 60.0);
    cfg.server.max_connections = cfg.server.max_connections.max(connections + 16);
    // A round never starts: it would need every device and one more.
    let server = ServeProcess::start(cfg, joined + connections + 1, 1024, 1, Wire::default(), &[])?;
    let runtime = tokio::runtime::Runtime::new()?;
    let base_rss_mb = server.rss_mb()?;
    let addr = server.addr.clone();

    let start = Instant::now();
    runtime.block_on(join_quietly(&addr, joined))?;
    let join_secs = start.elapsed().as_secs_f64();
    let joined_rss_mb = server.rss_mb()?;

    let (connected_rss_mb, idle_cpu_cores) = runtime.block_on(async {
        let held = hold_check_ins(&addr, connections).await?;
        tokio::time::sleep(SETTLE).await;
        let cpu = server.cpu_secs()?;
        tokio::time::sleep(wait).await;
        let idle_cpu_cores = (server.cpu_secs()? - cpu) / wait.as_secs_f64();
        let rss = server.rss_mb()?;
        drop(held);
        anyhow::Ok((rss, idle_cpu_cores))
    })?;
    let per = |mb: f64, n: usize| mb * 1024.0 * 1024.0 / n.max(1) as f64;
    Ok(IdleRow {
        joined,
        connections,
        base_rss_mb,
        joined_rss_mb,
        connected_rss_mb,
        bytes_per_joined_device: per(joined_rss_mb - base_rss_mb, joined),
        bytes_per_connection: per(connected_rss_mb - joined_rss_mb, connections),
        join_secs,
        idle_cpu_cores,
        idle_secs: wait.as_secs_f64(),
    })
}

fn join_request() -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        ..Default::default()
    }
}

/// Joins `n` devices over a few shared connections; none checks in.
async fn join_quietly(addr: &str, n: usize) -> anyhow::Result<()> {
    let channels = crate::sim::connect(addr, crate::sim::SIM_CONNECTIONS).await?;
    let mut joins = JoinSet::new();
    for i in 0..n {
        if joins.len() >= IN_FLIGHT {
            joins.join_next().await.context("join task")???;
        }
        let mut client = CoordinatorClient::new(channels[i % channels.len()].clone());
        joins.spawn(async move { client.join(join_request()).await.map(drop) });
    }
    while let Some(done) = joins.join_next().await {
        done??;
    }
    Ok(())
}

/// Opens `n` connections, each with a device that joins and then holds a
/// check-in; returns once every device has joined (the check-ins reach the
/// coordinator within [`SETTLE`]; the tasks keep them).
async fn hold_check_ins(addr: &str, n: usize) -> anyhow::Result<JoinSet<anyhow::Result<()>>> {
    let (held_tx, mut held_rx) = tokio::sync::mpsc::channel::<()>(n.max(1));
    let mut devices = JoinSet::new();
    let endpoint = fedrec_proto::endpoint(format!("http://{addr}"))?;
    let opening = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    for _ in 0..n {
        let (endpoint, held_tx, opening) = (endpoint.clone(), held_tx.clone(), opening.clone());
        devices.spawn(async move {
            let permit = opening.acquire_owned().await?;
            let channel = endpoint.connect().await.context("cannot connect")?;
            let mut client = CoordinatorClient::new(channel);
            let pseudonym = client.join(join_request()).await?.into_inner().pseudonym;
            let check_in = client.check_in(pb::CheckInRequest { pseudonym });
            drop(permit);
            held_tx.send(()).await.ok();
            check_in.await?;
            anyhow::Ok(())
        });
    }
    drop(held_tx);
    for _ in 0..n {
        tokio::select! {
            held = held_rx.recv() => { held.context("a device stopped before holding its check-in")?; }
            Some(failed) = devices.join_next() => {
                failed??;
                anyhow::bail!("a device's check-in ended early");
            }
        }
    }
    Ok(devices)
}
