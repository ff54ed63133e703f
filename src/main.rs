//! The `fedrec` command line: simulate, serve, client, split, gen-data, bench.
//! This file parses and dispatches; each command is a module of [`cli`].

mod cli;

use clap::{Parser, Subcommand};

use cli::*;

/// Federated recommendation: devices train on their own purchases; a
/// coordinator combines only their model updates.
#[derive(Parser, Debug)]
#[command(
    name = "fedrec",
    version,
    about,
    after_help = "Logs go to stderr at the warn level; RUST_LOG=info (or debug) shows more."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Simulate federated training: one virtual device per user, a real
    /// coordinator, and a comparison with centralized and popularity baselines.
    Simulate(SimulateArgs),
    /// Run a standalone coordinator until Ctrl-C.
    Serve(ServeArgs),
    /// Run one device: take part in rounds with a coordinator using one
    /// user's history from a data file.
    Client(ClientArgs),
    /// Run many devices in one process, one per user of a data file (all,
    /// a range, or a share of them), against a coordinator or its replicas:
    /// to spread a simulation or a load test over processes and machines.
    Devices(DevicesArgs),
    /// Write the global model of a `serve --checkpoint` file for serving
    /// (safetensors: item ids, embeddings, biases).
    Export(ExportArgs),
    /// Import a `serve --checkpoint` file into a PostgreSQL store (the
    /// replicated coordinator's shared state; its schema is created or
    /// upgraded).
    StoreImport(StoreImportArgs),
    /// Write the leave-one-out split (training pairs, held-out items and the
    /// sampled candidates) for comparing external baselines on it.
    Split(SplitArgs),
    /// Fit the buy-again score's weights on a data set's validation re-buys
    /// and print them (how the SDK's default weights were made).
    FitRepeat(FitRepeatArgs),
    /// Write a synthetic data set in MovieLens u.data layout (user, item, 1, time;
    /// numeric ids from 1).
    GenData(GenDataArgs),
    /// Measure speed and memory next to their limits (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Write a development CA, a server certificate and device certificates
    /// (PEM) for trying TLS and mutual TLS, and print the commands to use them.
    Certs(CertsArgs),
    /// Write enrollment tokens for devices (one file each) and the file of
    /// their digests for the coordinator (--enrollment-tokens).
    Tokens(TokensArgs),
    /// Plan a differential-privacy budget: the epsilon of T rounds of
    /// DP-FedAvg (Poisson sampling rate q, noise multiplier z) at delta, or
    /// with --epsilon the noise multiplier that stays within it.
    Privacy(PrivacyArgs),
}

/// Runs the command; an error is printed for a person: what went wrong and
/// why, each cause once, without a backtrace.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `err` and its causes joined by ": ", a cause whose text the previous
/// one already holds left out (so that "No such file" appears once).
fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: log files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // One crypto backend for every TLS connection of the process (ring; the
    // build has no other). Fails only if one is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate(args) => simulate(args),
        Command::Serve(args) => serve(args),
        Command::Client(args) => client(args),
        Command::Devices(args) => devices(args),
        Command::Export(args) => export(args),
        Command::StoreImport(args) => store_import(args),
        Command::Split(args) => split(args),
        Command::FitRepeat(args) => fit_repeat(args),
        Command::GenData(args) => gen_data(args),
        Command::Bench(cmd) => bench(cmd),
        Command::Certs(args) => certs(args),
        Command::Tokens(args) => tokens(args),
        Command::Privacy(args) => privacy(args),
    }
}
