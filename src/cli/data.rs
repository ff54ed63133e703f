//! `fedrec split`, `fedrec fit-repeat` and `fedrec gen-data`: data for other tools.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use fedrec::data::{self, SyntheticConfig};
use fedrec::sim::{self};

use super::*;

#[derive(Args, Debug)]
pub(crate) struct FitRepeatArgs {
    #[command(flatten)]
    pub(crate) data: DataArgs,
}

#[derive(Args, Debug)]
pub(crate) struct SplitArgs {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Output directory: a folder per evaluation track (see docs/evaluation.md).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Evaluation seed (must equal the simulation's --seed to share candidates).
    #[arg(long, default_value_t = sim::DEFAULT_SEED)]
    pub(crate) seed: u64,
}

#[derive(Args, Debug)]
pub(crate) struct GenDataArgs {
    /// Output file.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Users.
    #[arg(long, default_value_t = SyntheticConfig::default().users)]
    pub(crate) users: usize,
    /// Items.
    #[arg(long, default_value_t = SyntheticConfig::default().items)]
    pub(crate) items: usize,
    /// Seed.
    #[arg(long, default_value_t = SyntheticConfig::default().seed)]
    pub(crate) seed: u64,
}

pub(crate) fn split(args: SplitArgs) -> anyhow::Result<()> {
    let ds = args.data.load(args.seed)?;
    let protocol = data::Protocol::new(&ds);
    fedrec::eval::write_split(&protocol, args.seed, &ds.name, ds.timed, &args.out)
        .with_context(|| format!("cannot write the split to {}", args.out.display()))?;
    let tracks: Vec<String> = protocol
        .tracks()
        .iter()
        .filter_map(|&t| {
            let test = protocol.evaluation(t, data::Stage::Test)?;
            let valid = protocol.evaluation(t, data::Stage::Validation)?;
            Some(format!(
                "{t}: {} test, {} validation users",
                test.n_users(),
                valid.n_users()
            ))
        })
        .collect();
    eprintln!(
        "wrote the split of {} ({} users; {}) to {}",
        ds.name,
        protocol.histories.n_users(),
        tracks.join("; "),
        args.out.display()
    );
    Ok(())
}

pub(crate) fn fit_repeat(args: FitRepeatArgs) -> anyhow::Result<()> {
    let ds = args.data.load(sim::DEFAULT_SEED)?;
    let protocol = data::Protocol::new(&ds);
    let (weights, n) = fedrec::eval::fit_repeat_weights(&protocol)
        .with_context(|| format!("{} has no buy-again validation event to fit on", ds.name))?;
    println!("fitted on {n} validation re-buys of {}:", ds.name);
    for (name, w) in fedrec_client::repeat::FEATURE_NAMES.iter().zip(weights) {
        println!("  {w:>8.3}  {name}");
    }
    println!("{weights:?}");
    let choices = fedrec::eval::repeat_choices(&protocol).unwrap_or_default();
    // The blend's temperatures, with discover scores from centralized ALS
    // (64 factors, confidence 2, regularization 0.01) on the validation cut.
    let model: Arc<dyn fedrec_client::model::Model> = Arc::new(
        fedrec_client::model::MatrixFactorization::new(protocol.n_items(), 64, 0.01)?,
    );
    let als = fedrec_client::model::LocalTraining {
        loss: fedrec_client::model::Loss::Als,
        confidence: 2.0,
        regularization: 0.01,
        ..fedrec_client::model::LocalTraining::default()
    };
    println!(
        "blend temperatures on next-purchase validation events (discover, buy-again: NDCG@10, HR@10):"
    );
    for (b, ndcg, hr) in fedrec::eval::fit_blend(&protocol, &model, &als, sim::DEFAULT_SEED) {
        println!(
            "  {:>5} {:>5}: {ndcg:.4} {hr:.4}",
            b.discover_temperature, b.rebuy_temperature
        );
    }
    for (name, w) in [
        ("fitted", weights),
        ("default", fedrec_client::repeat::DEFAULT_WEIGHTS),
    ] {
        println!(
            "{name}: validation NDCG@10 among past items {:.4}",
            fedrec::eval::choice_ndcg(&choices, &w)
        );
    }
    Ok(())
}

pub(crate) fn gen_data(args: GenDataArgs) -> anyhow::Result<()> {
    let ds = data::synthetic(&SyntheticConfig {
        users: args.users,
        items: args.items,
        seed: args.seed,
        ..SyntheticConfig::default()
    })?;
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for it in &ds.interactions {
        // Numeric ids from 1, as in MovieLens, so that the format is detected.
        writeln!(w, "{}\t{}\t1\t{}", it.user + 1, it.item + 1, it.time)?;
    }
    w.flush()?;
    eprintln!(
        "wrote {} interactions of {} users to {}",
        ds.interactions.len(),
        ds.n_users(),
        args.out.display()
    );
    Ok(())
}
