//! What several commands share: the data and configuration flags, reports, Ctrl-C.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use fedrec::data::{self, Dataset, Format, LoadOptions, SyntheticConfig};
use fedrec_coordinator::config::{
    Aggregation, CoordinatorConfig, DpMode, Loss, RoundsMode, Schedule, StrategyName, Weighting,
};
use fedrec_proto::codec::Encoding;

/// Where interactions come from.
#[derive(Args, Debug, Clone)]
pub(crate) struct DataArgs {
    /// Interaction file or directory (MovieLens u.data / ratings.dat /
    /// ratings.csv, UCI Online Retail CSV, any CSV/TSV with --user-col and
    /// --item-col, or one line per user "<user> <item> <item> ..."). Without
    /// it: generated data (the embedded default).
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Force the format instead of detecting it: movielens, movielens-dat,
    /// movielens-csv, retail, columns, sequences.
    #[arg(long)]
    pub(crate) format: Option<Format>,
    /// Name of the user column (generic CSV/TSV).
    #[arg(long)]
    pub(crate) user_col: Option<String>,
    /// Name of the item column (generic CSV/TSV).
    #[arg(long)]
    pub(crate) item_col: Option<String>,
    /// Name of the time column (generic CSV/TSV; Unix seconds or a date/time).
    /// Without it, interactions are ordered by their position in the files.
    #[arg(long)]
    pub(crate) time_col: Option<String>,
    /// The strftime layout (chrono syntax) every time of --time-col (or
    /// retail's InvoiceDate) must match, e.g. --time-format '%d.%m.%Y %H:%M';
    /// a date-only layout gives midnight UTC. Without it: Unix seconds, ISO
    /// 8601, or day/month/year dates whose order is detected from the data.
    #[arg(long)]
    pub(crate) time_format: Option<String>,
    /// Users of the generated data set (without --data).
    #[arg(long, default_value_t = SyntheticConfig::default().users)]
    pub(crate) synthetic_users: usize,
    /// Items of the generated data set (without --data).
    #[arg(long, default_value_t = SyntheticConfig::default().items)]
    pub(crate) synthetic_items: usize,
    /// Mean purchases per user of the generated data set (without --data).
    #[arg(long, default_value_t = SyntheticConfig::default().mean_history)]
    pub(crate) synthetic_history: f64,
}

impl DataArgs {
    pub(crate) fn load(&self, seed: u64) -> anyhow::Result<Dataset> {
        match &self.data {
            Some(path) => {
                let opts = LoadOptions {
                    format: self.format,
                    user_col: self.user_col.clone(),
                    item_col: self.item_col.clone(),
                    time_col: self.time_col.clone(),
                    time_format: self.time_format.clone(),
                };
                Ok(data::load(path, &opts)?)
            }
            None => Ok(data::synthetic(&SyntheticConfig {
                users: self.synthetic_users,
                items: self.synthetic_items,
                mean_history: self.synthetic_history,
                seed,
                ..SyntheticConfig::default()
            })?),
        }
    }
}

/// Flags that override the coordinator configuration file.
#[derive(Args, Debug)]
pub(crate) struct ConfigOverrides {
    /// Training rounds [simulate's default: 100; serve's: the config's, 0 = forever].
    #[arg(long)]
    pub(crate) rounds: Option<u32>,
    /// Devices selected per round [simulate's default: 100; serve's: 10].
    #[arg(long)]
    pub(crate) clients_per_round: Option<usize>,
    /// Fewest updates a round needs (rounds.min_updates); under distributed
    /// DP, the noise of this many devices makes up the promised noise.
    #[arg(long)]
    pub(crate) min_updates: Option<usize>,
    /// Local epochs per round on each device.
    #[arg(long)]
    pub(crate) local_epochs: Option<u32>,
    /// Latent factors of the model.
    #[arg(long)]
    pub(crate) factors: Option<usize>,
    /// Local learning rate [default: 0.05].
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// L2 regularization.
    #[arg(long)]
    pub(crate) reg: Option<f32>,
    /// Server-side strategy: fedavg, fedavgm, fedadam, fedyogi, fedadagrad,
    /// als (the ALS loss's curvature-preconditioned step; needs --loss als).
    #[arg(long, value_parser = parse_name::<StrategyName>)]
    pub(crate) strategy: Option<StrategyName>,
    /// Server learning rate of the strategy.
    #[arg(long)]
    pub(crate) server_lr: Option<f32>,
    /// Training pace: sync (rounds) or async (buffered aggregation,
    /// FedBuff; see rounds.mode).
    #[arg(long, value_parser = parse_name::<RoundsMode>)]
    pub(crate) mode: Option<RoundsMode>,
    /// Async mode: accepted updates per server step (rounds.async_buffer).
    #[arg(long, value_name = "K")]
    pub(crate) async_buffer: Option<usize>,
    /// Async mode: most devices training at once (rounds.async_concurrency).
    #[arg(long, value_name = "N")]
    pub(crate) async_concurrency: Option<usize>,
    /// FedAdam, FedYogi, FedAdagrad: the adaptivity tau (added to the root
    /// of the second moment).
    #[arg(long)]
    pub(crate) tau: Option<f32>,
    /// FedProx proximal weight mu for local training (0 = off).
    #[arg(long)]
    pub(crate) proximal_mu: Option<f32>,
    /// Training objective on the devices: bpr or als.
    #[arg(long, value_parser = parse_name::<Loss>)]
    pub(crate) loss: Option<Loss>,
    /// Confidence of a purchase under the als loss.
    #[arg(long)]
    pub(crate) confidence: Option<f32>,
    /// Weight of each update in the round's mean: examples or uniform.
    #[arg(long, value_parser = parse_name::<Weighting>)]
    pub(crate) weighting: Option<Weighting>,
    /// Server learning-rate schedule over the rounds: constant or cosine.
    #[arg(long, value_parser = parse_name::<Schedule>)]
    pub(crate) schedule: Option<Schedule>,
    /// Run training rounds through secure aggregation (the coordinator
    /// learns only each cohort's sum); sets secure_aggregation.enabled.
    #[arg(long)]
    pub(crate) secure_aggregation: bool,
    /// Secure aggregation: clip update values to [-X, X] before quantizing.
    #[arg(long, value_name = "X")]
    pub(crate) secagg_range: Option<f32>,
    /// Secure aggregation: bits per quantized value.
    #[arg(long, value_name = "BITS")]
    pub(crate) secagg_bits: Option<u32>,
    /// Secure aggregation: neighbours per device (default 2·⌈log2 n⌉).
    #[arg(long, value_name = "K")]
    pub(crate) secagg_neighbours: Option<usize>,
    /// Secure aggregation: shares needed per secret, as a fraction of the
    /// neighbours, in (0.5, 1].
    #[arg(long, value_name = "FRACTION")]
    pub(crate) secagg_threshold: Option<f64>,
    /// User-level differential privacy (DP-FedAvg): central (the
    /// coordinator adds the noise) or distributed (devices add it before
    /// secure aggregation). Sets privacy.mode and, unless --weighting is
    /// given, uniform weighting.
    #[arg(long, value_name = "MODE", value_parser = parse_name::<DpMode>)]
    pub(crate) dp: Option<DpMode>,
    /// DP: noise multiplier z (noise std = z × clip).
    #[arg(long, value_name = "Z")]
    pub(crate) noise_multiplier: Option<f64>,
    /// DP: L2 bound C of each device's update (the start under --adaptive-clip).
    #[arg(long, value_name = "C")]
    pub(crate) clip: Option<f32>,
    /// DP: Poisson sampling rate q (simulate's default: clients per round
    /// over devices).
    #[arg(long, value_name = "Q")]
    pub(crate) sampling_rate: Option<f64>,
    /// DP: the largest epsilon training may spend; rounds past it are refused.
    #[arg(long, value_name = "EPSILON")]
    pub(crate) epsilon_budget: Option<f64>,
    /// DP: delta of the stated (epsilon, delta).
    #[arg(long, value_name = "DELTA")]
    pub(crate) delta: Option<f64>,
    /// DP: adapt the clipping bound to the median update norm (Andrew et al. 2021).
    #[arg(long)]
    pub(crate) adaptive_clip: bool,
    /// How updates are combined: mean, trimmed_mean or median (robust to
    /// broken or hostile devices; plain rounds only).
    #[arg(long, value_parser = parse_name::<Aggregation>)]
    pub(crate) aggregation: Option<Aggregation>,
    /// Under trimmed_mean: the fraction dropped at each end per coordinate.
    #[arg(long, value_name = "FRACTION")]
    pub(crate) trim_fraction: Option<f64>,
    /// Scale every plain update down to at most this L2 norm.
    #[arg(long, value_name = "C")]
    pub(crate) norm_bound: Option<f32>,
    /// Wire format of model downloads: f32 (exact), f16 (IEEE half) or q8
    /// (8-bit, per block of 256 values); sets download.encoding.
    #[arg(long, value_name = "ENCODING", value_parser = parse_name::<Encoding>)]
    pub(crate) download_encoding: Option<Encoding>,
    /// Wire format of updates in plain rounds: f32, f16 or q8 (as for
    /// downloads); sets upload.encoding.
    #[arg(long, value_name = "ENCODING", value_parser = parse_name::<Encoding>)]
    pub(crate) upload_encoding: Option<Encoding>,
}

impl ConfigOverrides {
    pub(crate) fn apply(&self, cfg: &mut CoordinatorConfig) {
        let r = &mut cfg.rounds;
        if let Some(v) = self.rounds {
            r.rounds = v;
        }
        if let Some(v) = self.clients_per_round {
            r.clients_per_round = v;
        }
        if let Some(v) = self.min_updates {
            r.min_updates = v;
        }
        let t = &mut cfg.training;
        if let Some(v) = self.local_epochs {
            t.local_epochs = v;
        }
        if let Some(v) = self.lr {
            t.learning_rate = v;
        }
        if let Some(v) = self.reg {
            t.regularization = v;
        }
        if let Some(v) = self.proximal_mu {
            t.proximal_mu = v;
        }
        if let Some(v) = self.loss {
            t.loss = v;
        }
        if let Some(v) = self.confidence {
            t.confidence = v;
        }
        if let Some(v) = self.weighting {
            cfg.strategy.weighting = v;
        }
        if let Some(v) = self.schedule {
            cfg.strategy.schedule = v;
        }
        if let Some(v) = self.factors {
            cfg.model.factors = v;
        }
        if let Some(v) = self.dp {
            cfg.privacy.mode = v;
            if self.weighting.is_none() && v != DpMode::Off {
                cfg.strategy.weighting = Weighting::Uniform;
            }
            if v != DpMode::Off && cfg.strategy.name == StrategyName::Als && self.strategy.is_none()
            {
                fedrec::sim::als_under_privacy(cfg);
                eprintln!(
                    "note: the als server step does not work under differential privacy; \
                     using fedadam (server_lr {}, tau {}) instead (--strategy to choose another)",
                    cfg.strategy.server_lr, cfg.strategy.tau
                );
            }
        }
        if let Some(v) = self.strategy {
            cfg.strategy.name = v;
        }
        if let Some(v) = self.mode {
            cfg.rounds.mode = v;
        }
        if let Some(v) = self.async_buffer {
            cfg.rounds.async_buffer = v;
        }
        if let Some(v) = self.async_concurrency {
            cfg.rounds.async_concurrency = v;
        }
        if let Some(v) = self.server_lr {
            cfg.strategy.server_lr = v;
        }
        if let Some(v) = self.tau {
            cfg.strategy.tau = v;
        }
        let sa = &mut cfg.secure_aggregation;
        if self.secure_aggregation {
            sa.enabled = true;
        }
        if let Some(v) = self.secagg_range {
            sa.range = v;
        }
        if let Some(v) = self.secagg_bits {
            sa.bits = v;
        }
        if let Some(v) = self.secagg_neighbours {
            sa.neighbours = Some(v);
        }
        if let Some(v) = self.secagg_threshold {
            sa.threshold = v;
        }
        let p = &mut cfg.privacy;
        if let Some(v) = self.noise_multiplier {
            p.noise_multiplier = v;
        }
        if let Some(v) = self.clip {
            p.clip = v;
        }
        if let Some(v) = self.sampling_rate {
            p.sampling_rate = Some(v);
        }
        if let Some(v) = self.epsilon_budget {
            p.epsilon_budget = Some(v);
        }
        if let Some(v) = self.delta {
            p.delta = v;
        }
        if self.adaptive_clip {
            p.adaptive_clip = true;
        }
        let st = &mut cfg.strategy;
        if let Some(v) = self.aggregation {
            st.aggregation = v;
        }
        if let Some(v) = self.trim_fraction {
            st.trim_fraction = v;
        }
        if let Some(v) = self.norm_bound {
            st.norm_bound = Some(v);
        }
        if let Some(v) = self.download_encoding {
            cfg.download.encoding = v;
        }
        if let Some(v) = self.upload_encoding {
            cfg.upload.encoding = v;
        }
    }
}

/// Parses a configuration enum by its name in the TOML file.
pub(crate) fn parse_name<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    use serde::de::value::{Error, StrDeserializer};
    T::deserialize(StrDeserializer::<Error>::new(s)).map_err(|e| e.to_string())
}

/// The configuration file, parsed but not yet validated (a command applies
/// its options first, then validates once), or the defaults.
pub(crate) fn coordinator_config(path: Option<&Path>) -> anyhow::Result<CoordinatorConfig> {
    Ok(match path {
        Some(p) => CoordinatorConfig::parse_file(p)?,
        None => CoordinatorConfig::default(),
    })
}

/// Writes `report` as JSON to `path`, if given.
pub(crate) fn write_report(
    path: Option<&Path>,
    report: &impl serde::Serialize,
) -> anyhow::Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(path, json)
        .with_context(|| format!("cannot write the report to {}", path.display()))?;
    eprintln!("report written to {}", path.display());
    Ok(())
}

/// Ctrl-C, or SIGTERM on Unix (what service managers send).
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                return;
            }
            Err(e) => eprintln!("cannot watch for SIGTERM ({e}); Ctrl-C still stops"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

pub(crate) fn skipped_note(ds: &Dataset) -> String {
    if ds.skipped.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = ds.skipped.iter().map(|(k, v)| format!("{v} {k}")).collect();
    format!(" (skipped rows: {})", parts.join(", "))
}

/// Reads a catalogue file: one item id a line, in model order; blank lines
/// and lines starting with `#` are skipped.
pub(crate) fn read_catalogue(path: &Path) -> anyhow::Result<fedrec_proto::catalogue::Catalogue> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the catalogue {}", path.display()))?;
    let ids: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    fedrec_proto::catalogue::Catalogue::from_ids(ids)
        .with_context(|| format!("{} is not a usable catalogue", path.display()))
}

/// "100 items, ids 1 to 100", or "3 items, ids 85123A, 71053, …".
pub(crate) fn describe_catalogue(c: &fedrec_proto::catalogue::Catalogue) -> String {
    if c.is_numbered() {
        return format!("{} items, ids 1 to {}", c.len(), c.len());
    }
    let first: Vec<String> = (0..c.len().min(3)).map(|i| c.id(i)).collect();
    let more = if c.len() > 3 { ", …" } else { "" };
    format!("{} items, ids {}{more}", c.len(), first.join(", "))
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use fedrec::sim;
    use fedrec_coordinator::config::StrategyName;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        overrides: ConfigOverrides,
    }

    fn apply(args: &[&str]) -> CoordinatorConfig {
        let flags = Flags::try_parse_from(std::iter::once("fedrec").chain(args.iter().copied()))
            .expect("flags parse");
        let mut cfg = sim::als_recipe();
        flags.overrides.apply(&mut cfg);
        cfg
    }

    #[test]
    fn dp_on_a_preset_takes_fedadam_unless_told_otherwise() {
        let dp = ["--dp", "central", "--sampling-rate", "0.1"];
        let cfg = apply(&dp);
        assert_eq!(cfg.strategy.name, StrategyName::FedAdam);
        assert_eq!(cfg.strategy.server_lr, 0.01);
        cfg.clone().validated().expect("a valid DP configuration");
        // Explicit flags win; `als` under DP is then refused, saying why.
        let cfg = apply(&[&dp[..], &["--server-lr", "0.02"]].concat());
        assert_eq!(cfg.strategy.server_lr, 0.02);
        let cfg = apply(&[&dp[..], &["--strategy", "als"]].concat());
        let err = cfg.validated().unwrap_err().to_string();
        assert!(err.contains("differential privacy"), "{err}");
        // Without DP the preset's own step stays.
        assert_eq!(apply(&[]).strategy.name, StrategyName::Als);
    }
}
