//! `fedrec export`: the global model of a checkpoint, for serving.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use super::*;

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    pub(crate) saved: SavedModelArgs,
    /// Where to write the model (safetensors).
    #[arg(long, value_name = "FILE")]
    pub(crate) out: PathBuf,
}

/// A `serve --checkpoint` file and what describes its model: the
/// configuration, catalogue and flags serve had.
#[derive(Args, Debug)]
pub(crate) struct SavedModelArgs {
    /// The checkpoint `fedrec serve --checkpoint FILE` wrote.
    #[arg(long, value_name = "FILE")]
    pub(crate) checkpoint: PathBuf,
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

/// A checkpoint read with its model's layout and catalogue.
pub(crate) struct SavedModel {
    pub(crate) checkpoint: fedrec_coordinator::checkpoint::Checkpoint,
    pub(crate) layout: fedrec_proto::Layout,
    pub(crate) catalogue: fedrec_proto::catalogue::Catalogue,
}

impl SavedModelArgs {
    /// Reads the checkpoint; refuses one whose model the flags do not describe.
    pub(crate) fn read(&self) -> anyhow::Result<SavedModel> {
        let mut cfg = coordinator_config(self.config.as_deref())?;
        if let Some(items) = self.items {
            cfg.model.items = Some(items);
        }
        self.overrides.apply(&mut cfg);
        let Served {
            catalogue, model, ..
        } = serve_model(cfg, self.config.as_deref(), self.catalogue.as_deref())?;
        let checkpoint = fedrec_coordinator::checkpoint::Checkpoint::read(&self.checkpoint)?;
        let layout = model.layout();
        if checkpoint.params.len() != layout.num_values() {
            bail!(
                "{} holds a model of {} values, but the flags describe {layout} ({} values): give \
                 the --config, --items (or --catalogue) and --factors that serve had",
                self.checkpoint.display(),
                checkpoint.params.len(),
                layout.num_values()
            );
        }
        Ok(SavedModel {
            checkpoint,
            layout,
            catalogue,
        })
    }
}

/// Writes the model of a `serve --checkpoint` file as safetensors.
pub(crate) fn export(args: ExportArgs) -> anyhow::Result<()> {
    let SavedModel {
        checkpoint,
        layout,
        catalogue,
    } = args.saved.read()?;
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

#[derive(Args, Debug)]
pub(crate) struct StoreImportArgs {
    #[command(flatten)]
    pub(crate) saved: SavedModelArgs,
    /// The PostgreSQL store, e.g. postgres://fedrec@db.internal/fedrec
    /// (its schema is created or upgraded); or the environment variable
    /// FEDREC_STORE, which keeps a password out of the process list.
    #[arg(long, value_name = "URL", env = "FEDREC_STORE", hide_env_values = true)]
    pub(crate) store: String,
    /// The task's name in the store (the replicas' cluster.task).
    #[arg(long, default_value = fedrec_coordinator::config::DEFAULT_TASK)]
    pub(crate) task: String,
}

/// Imports a `serve --checkpoint` file into a PostgreSQL store: the model
/// version, optimizer state, round history, privacy accountant and joined
/// devices, in one transaction.
pub(crate) fn store_import(args: StoreImportArgs) -> anyhow::Result<()> {
    let SavedModel {
        checkpoint, layout, ..
    } = args.saved.read()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut store = fedrec_store::Store::connect(&args.store).await?;
        store.open_task(&args.task, &layout).await?;
        store.import_checkpoint(&args.task, &checkpoint).await?;
        eprintln!(
            "imported {} into task {:?} of {}: model version {} ({layout}), {} rounds ended",
            args.saved.checkpoint.display(),
            args.task,
            store.target(),
            checkpoint.model_version,
            checkpoint.history.len()
        );
        anyhow::Ok(())
    })
}
