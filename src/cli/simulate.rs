//! `fedrec simulate`: federated training of a data set, with baselines and a progress bar.

use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use fedrec::sim::{self, Observer, Report, RoundRow, SimConfig, Transport};
use indicatif::{ProgressBar, ProgressStyle};

use super::*;

#[derive(Args, Debug)]
pub(crate) struct SimulateArgs {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Coordinator configuration file (TOML); the flags below override it.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) overrides: ConfigOverrides,
    /// Epochs of the centralized baseline (ALS iterations under the als
    /// loss). Default: 40, or the preset's.
    #[arg(long)]
    pub(crate) centralized_epochs: Option<u32>,
    /// Start from a named configuration that reaches centralized quality on
    /// that kind of data (movielens, retail); --config cannot be combined
    /// with it, the flags above still override it.
    #[arg(long, value_enum, conflicts_with = "config")]
    pub(crate) preset: Option<sim::Preset>,
    /// Seed of everything random.
    #[arg(long, default_value_t = sim::DEFAULT_SEED)]
    pub(crate) seed: u64,
    /// Which baselines run beside fedrec: full (popularity, personal
    /// frequency, recency, and item-KNN and EASE tuned on the validation
    /// event) or quick (the first three). Default: full with a preset or up
    /// to 2,000 items, quick otherwise.
    #[arg(long, value_enum)]
    pub(crate) baselines: Option<sim::Baselines>,
    /// grpc: real gRPC over loopback; inproc: the same core without sockets.
    #[arg(long, value_enum, default_value_t = Transport::Grpc)]
    pub(crate) transport: Transport,
    /// Write the JSON report here.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
    /// Draw HR@10 and NDCG@10 per round, with the baselines, into this SVG
    /// file (with --sweep-noise: against epsilon).
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// With --dp: the privacy-utility trade-off. Runs once without DP, then
    /// once per noise multiplier listed, and prints (--report: JSON, --plot:
    /// SVG) HR@10 and NDCG@10 against the epsilon each spent.
    #[arg(long, value_name = "Z1,Z2,…", value_delimiter = ',', requires = "dp")]
    pub(crate) sweep_noise: Option<Vec<f64>>,
    /// Make some devices misbehave (in-process plain rounds): scale (their
    /// update times 100) or noise (standard normal values).
    #[arg(long, value_enum, requires = "attack_fraction")]
    pub(crate) attack: Option<sim::AttackKind>,
    /// The fraction of devices that misbehave under --attack.
    #[arg(long, value_name = "FRACTION")]
    pub(crate) attack_fraction: Option<f64>,
    /// Simulate a fleet of phones (speed, bandwidth, hours of availability,
    /// drop-outs) on a virtual clock, in process, and report quality over
    /// simulated hours (see populations/phones.toml).
    #[arg(long, value_name = "FILE.toml")]
    pub(crate) population: Option<PathBuf>,
    /// The events the devices hold out and the report scores: test, or
    /// validation (the event before it, trained without the test events) to
    /// choose settings without looking at the test events.
    #[arg(long, value_enum, default_value_t = fedrec::data::Stage::Test)]
    pub(crate) held_out: fedrec::data::Stage,
}

pub(crate) fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    // Real data without a named configuration: settings chosen on the
    // validation events (the generated default keeps its fast recipe).
    let preset = match (&args.config, args.preset, &args.data.data) {
        (None, None, Some(_)) => Some(sim::Preset::Auto),
        (_, preset, _) => preset,
    };
    let auto = preset == Some(sim::Preset::Auto);
    if auto {
        let o = &args.overrides;
        for (flag, given) in [
            ("--factors", o.factors.is_some()),
            ("--confidence", o.confidence.is_some()),
            ("--reg", o.reg.is_some()),
        ] {
            if given {
                bail!(
                    "{flag} is chosen by --preset auto (the default with --data); \
                     name another preset (--preset movielens or retail) or --config to set it"
                );
            }
        }
    }
    let (mut coord, centralized_epochs) = match (&args.config, preset) {
        (Some(p), _) => (
            coordinator_config(Some(p))?,
            sim::DEFAULT_CENTRALIZED_EPOCHS,
        ),
        (None, Some(preset)) => preset.config(),
        (None, None) => (
            sim::default_coordinator_config(),
            sim::DEFAULT_CENTRALIZED_EPOCHS,
        ),
    };
    args.overrides.apply(&mut coord);
    if coord.rounds.rounds == 0 {
        bail!("a simulation needs a finite number of rounds (rounds.rounds = 0 means forever)");
    }
    let ds = args.data.load(args.seed)?;
    eprintln!(
        "data: {} — {} users, {} items, {} interactions{}",
        ds.name,
        ds.n_users(),
        ds.n_items(),
        ds.interactions.len(),
        skipped_note(&ds)
    );
    let cfg = SimConfig {
        coordinator: coord,
        transport: args.transport,
        seed: args.seed,
        centralized_epochs: args.centralized_epochs.unwrap_or(centralized_epochs),
        baselines: args.baselines.unwrap_or_else(|| {
            if args.held_out == fedrec::data::Stage::Validation {
                sim::Baselines::Quick
            } else {
                sim::Baselines::default_for(preset.is_some(), ds.n_items())
            }
        }),
        auto,
        attack: args.attack.map(|kind| sim::Attack {
            kind,
            fraction: args.attack_fraction.unwrap_or(0.1),
        }),
        population: args
            .population
            .as_deref()
            .map(sim::population::Population::from_file)
            .transpose()?,
        held_out: args.held_out,
    };
    if cfg.held_out == fedrec::data::Stage::Validation && cfg.baselines == sim::Baselines::Full {
        bail!(
            "--held-out validation scores the quick baselines only (the full ones are tuned on \
             the validation events): leave out --baselines full"
        );
    }
    if cfg.attack.is_some() && cfg.transport != Transport::Inproc {
        bail!("--attack is simulated in process only: add --transport inproc");
    }
    let mut bar = Bar::default();
    if let Some(noise) = &args.sweep_noise {
        let tradeoff = fedrec::tradeoff::sweep(&ds, &cfg, noise, &mut bar)?;
        bar.finish();
        println!("{}", fedrec::tradeoff::table(&tradeoff));
        write_report(args.report.as_deref(), &tradeoff)?;
        if let Some(path) = &args.plot {
            fedrec::tradeoff::write_svg(&tradeoff, path)?;
            eprintln!("plot written to {}", path.display());
        }
        return Ok(());
    }
    let report = sim::run(&ds, &cfg, &mut bar)?;
    bar.finish();
    print_table(&report);
    write_report(args.report.as_deref(), &report)?;
    if let Some(path) = &args.plot {
        fedrec::plot::write_svg(&report, path)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// A progress bar over rounds.
#[derive(Default)]
pub(crate) struct Bar {
    pub(crate) bar: Option<ProgressBar>,
}

impl Observer for Bar {
    fn start(&mut self, rounds: u32) {
        let bar = ProgressBar::new(rounds.into());
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed} {msg}")
                .expect("static template is valid")
                .progress_chars("=> "),
        );
        bar.set_prefix("federated");
        bar.set_message(format!("0/{rounds} rounds"));
        self.bar = Some(bar);
    }

    fn round(&mut self, row: &RoundRow) {
        if let Some(bar) = &self.bar {
            // The count is in the message, so that one redraw shows the
            // round's number and its figures together.
            bar.inc(1);
            bar.set_message(format!(
                "{}/{} rounds; round {}: {} devices, cohort HR@10 {:.3}{}",
                bar.position(),
                bar.length().unwrap_or_default(),
                row.round,
                row.participants,
                row.hr_at_10,
                if row.completed { "" } else { " (abandoned)" }
            ));
        }
    }

    fn phase(&mut self, name: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{name}…"));
        }
    }
}

impl Bar {
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

pub(crate) fn print_table(report: &Report) {
    let f = &report.final_;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{}{} — {} users ({} evaluated), {} items, {} rounds, {:.1}s ({:.0} devices per second in the rounds){}",
        // A blank line after the progress bar on a terminal; none in a file.
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            "\n"
        } else {
            ""
        },
        report.data.name,
        report.data.users,
        report.data.test_users,
        report.data.items,
        report.rounds.len(),
        report.timing.total_seconds,
        report.timing.devices_per_second,
        report
            .timing
            .peak_rss_mb
            .map_or(String::new(), |mb| format!(", peak memory {mb:.0} MB"))
    );
    let _ = sim::tracks::write_tables(&mut out, f);
    if let Some(p) = &report.privacy.last_round {
        let _ = writeln!(
            out,
            "differential privacy ({}): epsilon = {:.3} at delta = {:e} after {} training rounds \
             (noise multiplier {}, clip {:.4}, sampling rate {:.4})",
            p.mode,
            p.epsilon,
            p.delta,
            report.privacy.training_rounds,
            p.noise_multiplier,
            p.clip,
            p.sampling_rate
        );
    }
    let _ = fedrec::diversity::write_table(&mut out, &f.diversity);
    for p in &report.population {
        let last = p.curve.last();
        let _ = writeln!(
            out,
            "population ({} track, {} mode): {:.1} simulated hours; {} tasks, {} updates applied, \
             {} dropped, {} refused; {} devices contributed; {:.1} device-hours, {:.0}% thrown away; HR@10 {:.4}, NDCG@10 \
             {:.4} at the end; {} ({:.0} device tasks per second)",
            p.track,
            p.mode,
            last.map_or(0.0, |q| q.hours),
            p.tasks,
            p.accepted,
            p.dropped,
            p.refused,
            last.map_or(0, |q| q.contributors),
            p.device_hours,
            100.0 * p.thrown_away,
            last.map_or(0.0, |q| q.hr_at_10),
            last.map_or(0.0, |q| q.ndcg_at_10),
            match (p.hours_to_target, p.target_hr_at_10) {
                (Some(h), Some(t)) => format!("0.95x centralized HR@10 ({t:.4}) after {h:.1} h"),
                (None, Some(t)) => format!("0.95x centralized HR@10 ({t:.4}) not reached"),
                _ => "no centralized target".to_owned(),
            },
            p.tasks_per_second
        );
    }
}
