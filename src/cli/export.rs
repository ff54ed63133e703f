//! `fedrec export`: the global model of a checkpoint, for serving.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use super::*;

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// The checkpoint `fedrec serve --checkpoint FILE` wrote.
    #[arg(long, value_name = "FILE")]
    pub(crate) checkpoint: PathBuf,
    /// Where to write the model (safetensors).
    #[arg(long, value_name = "FILE")]
    pub(crate) out: PathBuf,
    /// The configuration file serve had.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// The --items serve had (item ids 1 to N).
    #[arg(long, value_name = "N")]
    pub(crate) items: Option<usize>,
    /// The --catalogue serve had.
    #[arg(long, value_name = "FILE", conflicts_with = "items")]
    pub(crate) catalogue: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) overrides: ConfigOverrides,
}

/// Writes the model of a `serve --checkpoint` file as safetensors.
pub(crate) fn export(args: ExportArgs) -> anyhow::Result<()> {
    let mut cfg = coordinator_config(args.config.as_deref())?;
    if let Some(items) = args.items {
        cfg.model.items = Some(items);
    }
    args.overrides.apply(&mut cfg);
    let Served {
        catalogue, model, ..
    } = serve_model(cfg, args.config.as_deref(), args.catalogue.as_deref())?;
    let checkpoint = fedrec_coordinator::checkpoint::Checkpoint::read(&args.checkpoint)?;
    let layout = model.layout();
    if checkpoint.params.len() != layout.num_values() {
        bail!(
            "{} holds a model of {} values, but the flags describe {layout} ({} values): give \
             export the --config, --items (or --catalogue) and --factors that serve had",
            args.checkpoint.display(),
            checkpoint.params.len(),
            layout.num_values()
        );
    }
    fedrec::export::write_model(
        &args.out,
        &layout,
        &checkpoint.params,
        &catalogue,
        checkpoint.model_version,
    )?;
    eprintln!(
        "wrote model version {} ({layout}; {} training rounds) to {}",
        checkpoint.model_version,
        checkpoint.training_rounds,
        args.out.display()
    );
    Ok(())
}
