//! `fedrec bench`: speed and memory next to their limits (see BENCHMARKS.md).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use fedrec::sim::{self};
use fedrec_proto::codec::Encoding;

use super::*;

#[derive(Subcommand, Debug)]
pub(crate) enum BenchCommand {
    /// Aggregation throughput for 100 and 1,000 updates of 118,592 and
    /// 1,000,000 values, next to a plain read-and-add pass.
    Aggregate,
    /// Rounds of FedAvg over loopback gRPC with a coordinator process and
    /// devices that train in no time; prints one JSON line last.
    Round(BenchRoundArgs),
    /// Local training time per device per round and peak memory, on
    /// generated data of MovieLens-1M's size under the movielens preset.
    Device(BenchDeviceArgs),
    /// Round time and coordinator memory with and without secure
    /// aggregation, in process (real coordinator core and device state
    /// machines, local training stubbed), for each cohort and update size.
    Secagg(SecaggBenchArgs),
    /// The coordinator's memory per joined device and per open connection
    /// holding a check-in, and its CPU while they wait (a `fedrec serve`
    /// process; this process is the devices). Needs `ulimit -n` above
    /// --connections in both.
    Idle(BenchIdleArgs),
    /// Joins and check-ins one coordinator answers per second, and with
    /// --store the load they put on PostgreSQL (a `fedrec serve` process,
    /// or replicas on the store; this process is the devices).
    Rates(BenchRatesArgs),
}

#[derive(Args, Debug)]
pub(crate) struct BenchRatesArgs {
    /// Devices that join, then check in over and over.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) devices: usize,
    /// Seconds of check-ins.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) secs: f64,
    /// Run the coordinator as replicas on this PostgreSQL store (a fresh
    /// task): the first for the joins and check-ins, a second for the
    /// devices' first check-ins elsewhere.
    #[arg(long, value_name = "URL")]
    pub(crate) store: Option<String>,
    /// Coordinator configuration to start from (its [server] limits).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct BenchIdleArgs {
    /// Devices that join over a few connections and go quiet.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) joined: usize,
    /// Devices on a connection of their own, each holding a check-in.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) connections: usize,
    /// Seconds over which the coordinator's CPU is measured while they wait.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) wait_secs: f64,
    /// Coordinator configuration to start from (its [server] limits).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct BenchRoundArgs {
    /// Devices per round (all connect before the timing starts).
    #[arg(long, default_value_t = 100)]
    pub(crate) clients: usize,
    /// Values in the model and in each update.
    #[arg(long, default_value_t = 118_592)]
    pub(crate) dim: usize,
    /// Timed rounds.
    #[arg(long, default_value_t = 5)]
    pub(crate) rounds: u32,
    /// Also time the same bytes through a plain tonic stream.
    #[arg(long)]
    pub(crate) loopback: bool,
    /// Wire format of the model download: f32, f16 or q8.
    #[arg(long, value_name = "ENCODING", default_value = "f32", value_parser = parse_name::<Encoding>)]
    pub(crate) download_encoding: Encoding,
    /// Wire format of the updates: f32, f16 or q8.
    #[arg(long, value_name = "ENCODING", default_value = "f32", value_parser = parse_name::<Encoding>)]
    pub(crate) upload_encoding: Encoding,
    /// Coordinator configuration to start from, e.g. for its [server] limits
    /// (the benchmark sets the listener, rounds, cohort, model size and wire
    /// formats). Default: the built-in defaults.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The single coordinator writes its checkpoint file after every round.
    #[arg(long, conflicts_with = "store")]
    pub(crate) checkpoint: bool,
    /// Run replicas on this PostgreSQL store instead (a fresh task each run;
    /// devices spread evenly over the replicas).
    #[arg(long, value_name = "URL")]
    pub(crate) store: Option<String>,
    /// Replicas to start with --store.
    #[arg(long, default_value_t = 1, requires = "store")]
    pub(crate) replicas: usize,
}

#[derive(Args, Debug)]
pub(crate) struct BenchDeviceArgs {
    /// Users of the generated data (MovieLens-1M: 6,040).
    #[arg(long, default_value_t = 6040)]
    pub(crate) users: usize,
    /// Items (MovieLens-1M: 3,706).
    #[arg(long, default_value_t = 3706)]
    pub(crate) items: usize,
    /// Mean interactions per user (MovieLens-1M: 165.6).
    #[arg(long, default_value_t = 165.6)]
    pub(crate) history: f64,
    /// Devices timed.
    #[arg(long, default_value_t = 200)]
    pub(crate) devices: usize,
}

#[derive(Args, Debug)]
pub(crate) struct SecaggBenchArgs {
    /// Cohort sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = fedrec::bench::secagg::DEFAULT_COHORTS)]
    pub(crate) cohorts: Vec<usize>,
    /// Update sizes (values), comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = fedrec::bench::secagg::DEFAULT_SIZES)]
    pub(crate) sizes: Vec<usize>,
    /// Threads simulating the devices (default: every core).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Seed of the stub updates, cohorts and keys.
    #[arg(long, default_value_t = sim::DEFAULT_SEED)]
    pub(crate) seed: u64,
    /// Rounds per configuration and protocol; the fastest is reported.
    #[arg(long, default_value_t = fedrec::bench::secagg::DEFAULT_REPEATS)]
    pub(crate) repeats: usize,
    /// Also write the rows as JSON here.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
}

pub(crate) fn bench(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Secagg(args) => bench_secagg(args)?,
        BenchCommand::Aggregate => {
            println!("| updates | values | aggregate GB/s | plain read-and-add GB/s | ratio |");
            println!("|---|---|---|---|---|");
            for values in [118_592, 1_000_000] {
                for updates in [100, 1000] {
                    let r = fedrec::bench::aggregate(updates, values)?;
                    println!(
                        "| {} | {} | {:.2} | {:.2} | {:.0}% |",
                        r.updates,
                        r.values,
                        r.aggregate_bytes_per_sec / 1e9,
                        r.plain_bytes_per_sec / 1e9,
                        100.0 * r.ratio()
                    );
                }
            }
        }
        BenchCommand::Idle(a) => {
            let base = coordinator_config(a.config.as_deref())?;
            let wait = std::time::Duration::try_from_secs_f64(a.wait_secs)
                .map_err(|_| anyhow::anyhow!("--wait-secs must be a positive number of seconds"))?;
            let row = fedrec::bench::idle::idle(base, a.joined, a.connections, wait)?;
            eprintln!(
                "coordinator: {:.0} MB at start; {} joined devices: +{:.0} MB ({:.0} bytes each, {:.0} joins/s); \
                 {} connections holding a check-in: +{:.0} MB ({:.0} bytes each), {:.3} cores while they waited",
                row.base_rss_mb,
                row.joined,
                row.joined_rss_mb - row.base_rss_mb,
                row.bytes_per_joined_device,
                row.joined as f64 / row.join_secs,
                row.connections,
                row.connected_rss_mb - row.joined_rss_mb,
                row.bytes_per_connection,
                row.idle_cpu_cores,
            );
            println!("{}", serde_json::to_string(&row)?);
        }
        BenchCommand::Rates(a) => {
            let base = coordinator_config(a.config.as_deref())?;
            let deployment = fedrec::bench::Deployment {
                store: a.store.clone(),
                replicas: 1,
                ..Default::default()
            };
            let row = fedrec::bench::rates::rates(base, a.devices, a.secs, &deployment)?;
            let load = |s: &fedrec::bench::rates::Step| match s.store_transactions_per_sec {
                Some(t) => format!(
                    " (store: {t:.0} transactions/s, {:.0} rows read/s, {:.0} rows written/s)",
                    s.store_rows_read_per_sec.unwrap_or_default(),
                    s.store_rows_written_per_sec.unwrap_or_default()
                ),
                None => String::new(),
            };
            eprintln!(
                "{} devices: {:.0} joins/s{}; {:.0} check-ins/s{} at {:.2} cores",
                row.devices,
                row.join.per_sec,
                load(&row.join),
                row.check_in.per_sec,
                load(&row.check_in),
                row.check_in_cpu_cores
            );
            if let Some(first) = &row.first_check_in_elsewhere {
                eprintln!(
                    "first check-ins at a second replica: {:.0}/s{}",
                    first.per_sec,
                    load(first)
                );
            }
            if let Some([one, two]) = row.store_idle_transactions_per_sec {
                eprintln!(
                    "the replicas' own loop: {one:.1} transactions/s (the leader), {two:.1} (a second replica)"
                );
            }
            println!("{}", serde_json::to_string(&row)?);
        }
        BenchCommand::Round(a) => {
            let base = coordinator_config(a.config.as_deref())?;
            let row = fedrec::bench::round(
                base,
                a.clients,
                a.dim,
                a.rounds,
                a.loopback,
                fedrec::bench::Wire {
                    download: a.download_encoding,
                    upload: a.upload_encoding,
                },
                &fedrec::bench::Deployment {
                    checkpoint: a.checkpoint,
                    store: a.store.clone(),
                    replicas: a.replicas,
                },
            )?;
            eprintln!(
                "{} devices x {} values, {} downloads of {} bytes, {} uploads: {:.3} s per round ({:.3} s after the first; {:.1} MB), {:.0} MB/s, coordinator peak {:.0} MB; join p50/p99 {:.1}/{:.1} ms, task after the round's first p50/p99 {:.1}/{:.1} ms{}",
                row.clients,
                row.dim,
                row.download_encoding,
                row.download_bytes_per_device,
                row.upload_encoding,
                row.sec_per_round,
                row.sec_per_round_after_first,
                row.bytes_per_round as f64 / 1e6,
                row.bytes_per_sec / 1e6,
                row.coordinator_peak_rss_mb,
                row.join_ms[0],
                row.join_ms[1],
                row.task_fanout_ms[0],
                row.task_fanout_ms[1],
                row.loopback_sec_per_round
                    .map(|l| format!("; plain tonic stream of the same bytes: {l:.3} s"))
                    .unwrap_or_default()
            );
            println!("{}", serde_json::to_string(&row)?);
        }
        BenchCommand::Device(a) => {
            let row = fedrec::bench::device(a.users, a.items, a.history, a.devices)?;
            eprintln!(
                "{} devices of {} timed: mean {:.2} ms, p50 {:.2} ms, p99 {:.2} ms per local training; {:.0} trainings a second on {} threads at once; model {} values; process peak {:.0} MB",
                row.devices,
                row.users,
                row.mean_ms,
                row.p50_ms,
                row.p99_ms,
                row.parallel_per_second,
                row.threads,
                row.model_values,
                row.process_peak_rss_mb
            );
            println!("{}", serde_json::to_string(&row)?);
        }
    }
    Ok(())
}

pub(crate) fn bench_secagg(args: SecaggBenchArgs) -> anyhow::Result<()> {
    let mut bench = fedrec::bench::secagg::SecAggBench {
        cohorts: args.cohorts,
        sizes: args.sizes,
        seed: args.seed,
        repeats: args.repeats,
        ..Default::default()
    };
    if let Some(threads) = args.threads {
        bench.threads = threads.max(1);
    }
    eprintln!(
        "secure aggregation benchmark: cohorts {:?}, update sizes {:?}, {} device threads",
        bench.cohorts, bench.sizes, bench.threads
    );
    let rows = fedrec::bench::secagg::secagg(&bench, |r| {
        eprintln!(
            "  {} devices x {} values: plain {:.1} ms, secure {:.1} ms ({:.2}x)",
            r.devices,
            r.values,
            r.plain_round_s() * 1e3,
            r.secure_round_s() * 1e3,
            r.ratio()
        );
    })?;
    println!("{}", fedrec::bench::secagg::secagg_table(&rows));
    println!(
        "Round time = the coordinator's time + one device's (devices run in parallel on their \
         own hardware); network transfer and local training are not included."
    );
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("rows written to {}", path.display());
    }
    Ok(())
}
