//! `fedrec serve` with `[model] preset = "auto"`: the coordinator chooses
//! its settings by the search of `[search]` (the simulation's successive
//! halving, [`sim::search::Halving`]) against the real devices, then trains
//! the chosen ones.
//!
//! Each trial is a run of the coordinator ([`RoundCore::start_run`]): its
//! tasks carry `validation`, so every device trains without its own
//! validation purchase (the latest purchase of an item it had not bought
//! before) and, in the trial's evaluation round, ranks that purchase and
//! sends counts only. The coordinator ranks the trials by the summed
//! NDCG@10 (ties: HR@10) and trains the best one, with the operator's
//! `[rounds]` cohort, deadlines and the rest of the file as written:
//! `[training]` and `[strategy]` are the ALS recipe's (or federated EASE's).
//!
//! Trials are not checkpointed. With `--checkpoint FILE` the search's
//! report is saved to `FILE.search.json` when it ends, and a restart reads
//! the chosen settings from it instead of searching again; a restart during
//! the search runs it again from the start.
//!
//! [`RoundCore::start_run`]: fedrec_coordinator::round::RoundCore::start_run

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use fedrec::eval::{Metrics, Ranking};
use fedrec::sim::{
    self,
    search::{Halving, SearchReport, TrialSettings},
};
use fedrec_client::model::Model;
use fedrec_coordinator::config::{CoordinatorConfig, ModelPreset, ValidConfig};
use fedrec_coordinator::round::TaskKind;
use fedrec_coordinator::service::ServiceHandle;
use fedrec_proto::Layout;

/// A settings search to run: the schedule, and how to make each trial's
/// configuration.
pub(crate) struct Search {
    halving: Halving,
    /// The operator's configuration with the ALS recipe's sections.
    base: CoordinatorConfig,
    config_file: Option<PathBuf>,
    items: usize,
    /// Where the report is saved (beside the checkpoint), if anywhere.
    saved: Option<PathBuf>,
    planned: usize,
}

/// What `serve` runs under `[model] preset = "auto"`: the first trial's
/// configuration and model, and the search to drive; or, when an earlier
/// search's report is saved beside `checkpoint`, the settings it chose (no
/// search). Without the preset: `cfg` and `model` unchanged.
pub(crate) fn plan(
    cfg: ValidConfig,
    model: Arc<dyn Model>,
    items: usize,
    config_file: Option<&Path>,
    checkpoint: Option<&Path>,
) -> anyhow::Result<(ValidConfig, Arc<dyn Model>, Option<Search>)> {
    if cfg.model.preset != Some(ModelPreset::Auto) {
        return Ok((cfg, model, None));
    }
    let mut base = cfg.into_inner();
    let als = sim::als_recipe();
    base.training = als.training;
    base.strategy = als.strategy;
    base.model.init_std = als.model.init_std;
    base.secure_aggregation.range = als.secure_aggregation.range;
    base.secure_aggregation.bits = als.secure_aggregation.bits;
    let saved = checkpoint.map(|c| {
        let mut name = c.as_os_str().to_owned();
        name.push(".search.json");
        PathBuf::from(name)
    });
    if let Some(path) = saved.as_deref().filter(|p| p.exists()) {
        let chosen = read_chosen(path)?;
        let cfg = configure(&base, &chosen, false, config_file)?;
        eprintln!(
            "settings chosen by the search saved in {}: {}",
            path.display(),
            chosen
        );
        let model = sim::model_for(&cfg, items)?;
        return Ok((cfg, model, None));
    }
    if let Some(c) = checkpoint.filter(|c| c.exists()) {
        bail!(
            "{} was saved without a settings search (no {} beside it): remove model.preset = \
             \"auto\" to resume it, or start afresh without it",
            c.display(),
            saved.as_deref().unwrap_or(c).display()
        );
    }
    let ease = sim::search::ease_lambdas(&base.search, items);
    let halving = Halving::new(&base.search, ease);
    // Every setting of the first stage and every EASE trial must make a
    // valid configuration: found now, not hours into the search.
    for t in halving.candidates() {
        configure(&base, &t, true, config_file)?;
    }
    let planned = halving.planned_trials();
    let first = halving.next().context("the search space is empty")?;
    let cfg = configure(&base, &first, true, config_file)?;
    let model = sim::model_for(&cfg, items)?;
    let stages: Vec<String> = halving
        .stage_rounds()
        .iter()
        .map(ToString::to_string)
        .collect();
    eprintln!(
        "model.preset = \"auto\": choosing the settings first, {planned} trials (ALS stages of \
         {} rounds{}), each ending with an evaluation on the devices' validation purchases",
        stages.join(", "),
        if ease.is_empty() {
            String::new()
        } else {
            ", then federated EASE".to_owned()
        }
    );
    Ok((
        cfg,
        model,
        Some(Search {
            halving,
            base,
            config_file: config_file.map(Path::to_owned),
            items,
            saved,
            planned,
        }),
    ))
}

/// The configuration of `t`: a trial (ending with an evaluation round) or
/// the final run.
fn configure(
    base: &CoordinatorConfig,
    t: &TrialSettings,
    trial: bool,
    config_file: Option<&Path>,
) -> anyhow::Result<ValidConfig> {
    let mut cfg = base.clone();
    t.apply(&mut cfg);
    if trial {
        cfg.rounds.final_evaluation = true;
    }
    cfg.validated_from(config_file)
        .with_context(|| format!("the search's trial {}", t))
}

fn read_chosen(path: &Path) -> anyhow::Result<TrialSettings> {
    #[derive(serde::Deserialize)]
    struct Saved {
        chosen: TrialSettings,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let saved: Saved = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a saved settings search", path.display()))?;
    Ok(saved.chosen)
}

/// The initial parameters of `model` under `cfg` (seeded by `model.seed`).
pub(crate) fn initial_params(cfg: &ValidConfig, model: &dyn Model) -> Vec<f32> {
    use rand::SeedableRng;
    model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(cfg.model.seed))
}

impl Search {
    /// Runs the search on the coordinator behind `handle`, whose current
    /// run is the first trial: at the end of each trial records its
    /// validation figures and starts the next trial, then the final run
    /// with the chosen settings. Returns the search's report.
    pub(crate) async fn drive(mut self, handle: ServiceHandle) -> anyhow::Result<SearchReport> {
        let start = Instant::now();
        let mut rx = handle.subscribe();
        let mut run_start = rx.borrow().history.len();
        let mut done = 0;
        loop {
            done += 1;
            let p = rx
                .wait_for(|p| p.status.between_runs)
                .await
                .context("the coordinator stopped")?
                .clone();
            let rounds = &p.history[run_start..];
            run_start = p.history.len();
            let counts = rounds
                .iter()
                .rev()
                .find(|r| r.kind == TaskKind::Evaluate)
                .map(|r| r.evaluation)
                .unwrap_or_default();
            let validation = Metrics {
                full: Ranking {
                    hr_at_10: counts.hit_rate_full().unwrap_or(0.0),
                    ndcg_at_10: counts.ndcg_full_mean().unwrap_or(0.0),
                },
                users: counts.users,
                ..Metrics::default()
            };
            let ran = self.halving.next().context("no trial was running")?;
            self.halving.record(
                validation,
                rounds
                    .iter()
                    .filter(|r| r.kind == TaskKind::Train)
                    .map(|r| r.participants)
                    .sum(),
            );
            eprintln!(
                "settings search: trial {done} of {}, {}: validation HR@10 {:.4}, NDCG@10 {:.4} \
                 ({} devices with a validation purchase)",
                self.planned,
                ran,
                validation.full.hr_at_10,
                validation.full.ndcg_at_10,
                counts.users
            );
            let (next, trial, report) = match self.halving.next() {
                Some(next) => (next, true, None),
                None => {
                    let report = self.halving.finish(start.elapsed().as_secs_f64())?;
                    (report.chosen.settings, false, Some(report))
                }
            };
            let cfg = configure(&self.base, &next, trial, self.config_file.as_deref())?;
            let model = sim::model_for(&cfg, self.items)?;
            let params = initial_params(&cfg, model.as_ref());
            let layout: Layout = model.layout();
            if let Some(report) = &report {
                let c = &report.chosen;
                eprintln!(
                    "settings search done in {:.0} s ({} device tasks): training {} (validation \
                     NDCG@10 {:.4})",
                    report.seconds, report.device_rounds, c.settings, c.validation.full.ndcg_at_10
                );
                if let Some(path) = &self.saved {
                    fedrec::export::write_atomically(path, &serde_json::to_vec_pretty(report)?)
                        .with_context(|| format!("cannot save the search to {}", path.display()))?;
                }
            }
            handle.with_core(|core| {
                core.start_run(std::time::Instant::now(), cfg, layout, params, trial)
            })??;
            if let Some(report) = report {
                return Ok(report);
            }
        }
    }
}
