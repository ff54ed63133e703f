//! The gRPC transport: a real coordinator service on 127.0.0.1 and the
//! devices as participants over loopback.

use std::time::Instant;

use anyhow::Context;
use fedrec_client::device::Device;
use fedrec_client::participant::Participant;
use fedrec_client::ranking::EvalCounts;
use fedrec_coordinator::round::RoundCore;
use fedrec_coordinator::service::{CoordinatorService, ServeOptions};

use super::*;

/// Serves the core on 127.0.0.1 (port 0) and runs every device as a
/// [`Participant`], over [`SIM_CONNECTIONS`] shared connections.
pub(super) fn run_grpc(
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
        // At most SIM_ACTIVE devices hold a model, a training and an update
        // at once: every device of a large cohort otherwise holds its
        // encoded update while it waits for an upload slot (6,040 devices
        // peaked at 3.2 GB).
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(SIM_ACTIVE));
        let mut participants = tokio::task::JoinSet::new();
        for (i, (user, device)) in devices.into_iter().enumerate() {
            let channel = channels[i % channels.len()].clone();
            let permits = std::sync::Arc::clone(&permits);
            participants.spawn(async move {
                let mut participant = Participant::join(channel, None)
                    .await?
                    .with_work_limit(permits);
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

/// Devices of a gRPC simulation working on a task at once (from download
/// to the end of the upload); the others wait before downloading.
pub const SIM_ACTIVE: usize = 256;

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
