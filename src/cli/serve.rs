//! `fedrec serve`: a standalone coordinator until Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use fedrec::sim;
use fedrec_coordinator::config::{CoordinatorConfig, ValidConfig};

use super::*;

#[derive(Args, Debug)]
pub(crate) struct ServeArgs {
    /// Coordinator configuration file (TOML). Without it: the defaults.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:50051 (overrides server.listen).
    #[arg(long)]
    pub(crate) listen: Option<String>,
    /// Items in the catalogue, whose ids are 1 to N as `fedrec gen-data` and
    /// MovieLens number them (overrides model.items).
    #[arg(long, value_name = "N")]
    pub(crate) items: Option<usize>,
    /// The catalogue as a file of item ids, one a line, in model order
    /// (for data whose ids are not 1 to N). Devices map their purchases into it.
    #[arg(long, value_name = "FILE", conflicts_with = "items")]
    pub(crate) catalogue: Option<PathBuf>,
    /// Save the coordinator's state to this file after every ended round,
    /// and resume from it when it exists (crash recovery).
    #[arg(long, value_name = "FILE")]
    pub(crate) checkpoint: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9090).
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_listen: Option<String>,
    /// Serve over TLS with this certificate (PEM; overrides tls.cert).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM; overrides tls.key).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only devices presenting a certificate signed by
    /// this CA (PEM; overrides tls.client_ca).
    #[arg(long, value_name = "FILE")]
    pub(crate) client_ca: Option<PathBuf>,
    /// Admit only devices that join with an enrollment token whose SHA-256
    /// digest is in FILE (written by `fedrec tokens`; overrides
    /// auth.enrollment_tokens).
    #[arg(long, value_name = "FILE")]
    pub(crate) enrollment_tokens: Option<PathBuf>,
    /// Seconds a session (pseudonym) lasts before the device joins again
    /// (overrides auth.session_ttl_secs).
    #[arg(long, value_name = "SECS")]
    pub(crate) session_ttl: Option<f64>,
    /// `auto`: choose the model's settings by federated evaluation on the
    /// devices' validation purchases before training (overrides
    /// model.preset; the search is `[search]` in the config).
    #[arg(long, value_parser = parse_name::<fedrec_coordinator::config::ModelPreset>)]
    pub(crate) preset: Option<fedrec_coordinator::config::ModelPreset>,
    /// Allow listening on a non-loopback address without TLS (pseudonyms and
    /// updates then cross the network in plain text).
    #[arg(long)]
    pub(crate) insecure: bool,
    /// Write the trained global model to FILE (safetensors: item ids,
    /// embeddings, biases) when training finishes and when stopped.
    #[arg(long, value_name = "FILE")]
    pub(crate) model_out: Option<PathBuf>,
    /// Run as one replica of a replicated coordinator whose state is in
    /// this PostgreSQL store (postgres://user:password@host:port/db;
    /// overrides cluster.store). Replicas of one task form one coordinator.
    /// Also read from the environment variable FEDREC_STORE, which keeps
    /// the password out of the process list (a Kubernetes Secret).
    #[arg(
        long,
        value_name = "URL",
        conflicts_with = "checkpoint",
        env = "FEDREC_STORE",
        hide_env_values = true
    )]
    pub(crate) store: Option<String>,
    /// With --store: this replica's name, unique among the task's replicas
    /// (overrides cluster.replica; default: the listen address).
    #[arg(long, value_name = "NAME")]
    pub(crate) replica: Option<String>,
    /// With --store: the URL devices use to reach this replica (overrides
    /// cluster.url).
    #[arg(long, value_name = "URL")]
    pub(crate) replica_url: Option<String>,
    /// With --store: the task, which the replicas of one coordinator share
    /// (overrides cluster.task).
    #[arg(long, value_name = "NAME")]
    pub(crate) task: Option<String>,
    #[command(flatten)]
    pub(crate) overrides: ConfigOverrides,
}

pub(crate) fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut cfg = coordinator_config(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        cfg.server.listen = listen;
    }
    if let Some(items) = args.items {
        cfg.model.items = Some(items);
    }
    if let Some(preset) = args.preset {
        cfg.model.preset = Some(preset);
    }
    args.overrides.apply(&mut cfg);
    if let Some(cert) = &args.tls_cert {
        cfg.tls.cert = Some(cert.clone());
    }
    if let Some(key) = &args.tls_key {
        cfg.tls.key = Some(key.clone());
    }
    if let Some(ca) = &args.client_ca {
        cfg.tls.client_ca = Some(ca.clone());
    }
    if let Some(file) = &args.enrollment_tokens {
        cfg.auth.enrollment_tokens = Some(file.clone());
    }
    if let Some(ttl) = args.session_ttl {
        cfg.auth.session_ttl_secs = ttl;
    }
    if let Some(store) = &args.store {
        cfg.cluster.store = Some(store.clone());
    }
    if let Some(name) = &args.replica {
        cfg.cluster.replica = Some(name.clone());
    }
    if let Some(url) = &args.replica_url {
        cfg.cluster.url = Some(url.clone());
    }
    if let Some(task) = &args.task {
        cfg.cluster.task = task.clone();
    }
    let replica = cfg.cluster.store.clone().map(|store| {
        let name = cfg
            .cluster
            .replica
            .clone()
            .unwrap_or_else(|| cfg.server.listen.clone());
        let scheme = if cfg.tls.cert.is_some() {
            "https"
        } else {
            "http"
        };
        let url = cfg
            .cluster
            .url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{}", cfg.server.listen));
        // Replicas of one seed draw different pseudonyms and cohorts.
        cfg.rounds.seed = cfg
            .rounds
            .seed
            .map(|s| fedrec::cluster::replica_seed(s, &name));
        fedrec::cluster::Replica {
            store,
            task: cfg.cluster.task.clone(),
            name,
            url,
        }
    });
    if replica.is_some() && args.checkpoint.is_some() {
        bail!(
            "--checkpoint and a store: a replica's state is in the store (import a \
             checkpoint first with `fedrec store-import`)"
        );
    }
    let addr: std::net::SocketAddr = cfg
        .server
        .listen
        .parse()
        .with_context(|| format!("bad listen address {:?}", cfg.server.listen))?;
    let Served {
        cfg,
        catalogue,
        model,
    } = serve_model(cfg, args.config.as_deref(), args.catalogue.as_deref())?;
    let (cfg, model, search) = super::auto::plan(
        cfg,
        model,
        catalogue.len(),
        args.config.as_deref(),
        args.checkpoint.as_deref(),
    )?;
    let params = super::auto::initial_params(&cfg, model.as_ref());
    let listen = cfg.server.listen.clone();
    let session_ttl = cfg.auth.session_ttl_secs;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut options =
        fedrec_coordinator::service::ServeOptions::default().with_catalogue(&catalogue);
    let followed = match &replica {
        Some(replica) => {
            options = options.with_sessions(fedrec::cluster::StoreSessions::new(replica.clone()));
            let layout = model.layout();
            Some(
                runtime
                    .block_on(fedrec::cluster::open(replica, &layout, &catalogue, &params))
                    .context("cannot start this replica")?,
            )
        }
        None => None,
    };
    let mut start = fedrec_coordinator::bootstrap::prepare(
        cfg,
        model.layout(),
        params,
        args.checkpoint.as_deref(),
        options,
    )?;
    if let (Some(state), Some(replica)) = (followed, &replica) {
        let (version, rounds) = (state.version, state.counters.last_round);
        start.core = start.core.into_replica();
        start.core.follow(state)?;
        eprintln!(
            "replica {} of task {:?}: model version {version}, {rounds} rounds ended in the store",
            replica.name, replica.task
        );
    }
    if fedrec_coordinator::bootstrap::check_transport(
        addr,
        start.options.tls.is_some(),
        args.insecure,
    )? {
        eprintln!("warning: --insecure: serving plain text on {addr}");
    }
    if let (Some(tokens), Some(path)) = (
        &start.options.tokens,
        &start.core.config().auth.enrollment_tokens,
    ) {
        eprintln!(
            "admitting enrolled devices only: {} enrollment tokens from {}, sessions of {session_ttl} s",
            tokens.len(),
            path.display(),
        );
    }
    if let (Some((rounds, version)), Some(path)) = (start.resumed, &args.checkpoint) {
        eprintln!(
            "resumed from {}: {rounds} rounds ended, model version {version}",
            path.display()
        );
    }
    let security = start.security;
    let (core, options) = (start.core, start.options);
    let core = match &search {
        Some(_) => core.into_trial(),
        None => core,
    };
    let encoding = core.config().download.encoding;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        eprintln!(
            "coordinator listening on {} over {security}, model downloads in {encoding} (Ctrl-C to stop)",
            listener.local_addr()?
        );
        let service = fedrec_coordinator::service::CoordinatorService::new(core, options);
        let handle = service.handle();
        let cluster = replica.map(|r| tokio::spawn(fedrec::cluster::run(r, handle.clone())));
        let saver = ModelSaver {
            path: args.model_out.clone(),
            catalogue: catalogue.clone(),
        };
        let reporter = tokio::spawn(report_rounds(
            handle.clone(),
            saver.clone(),
            args.checkpoint.clone(),
        ));
        let metrics = match &args.metrics_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?;
                eprintln!("metrics on http://{}/metrics", listener.local_addr()?);
                let handle = handle.clone();
                Some(tokio::spawn(fedrec_coordinator::metrics::serve_metrics(
                    listener,
                    move || handle.metrics(),
                    std::future::pending(),
                )))
            }
            None => None,
        };
        let mut searching = search.map(|s| tokio::spawn(s.drive(handle.clone())));
        let mut search_failed = None;
        service
            .serve(listener, async {
                let failed = async {
                    match searching.as_mut() {
                        Some(task) => match task.await {
                            Ok(Ok(_)) => std::future::pending().await,
                            Ok(Err(e)) => e,
                            Err(e) => anyhow::Error::new(e),
                        },
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = shutdown_signal() => eprintln!("shutting down"),
                    e = failed => {
                        eprintln!("the settings search failed, shutting down: {e:#}");
                        search_failed = Some(e);
                    }
                }
            })
            .await?;
        if let Some(e) = search_failed {
            return Err(e.context("the settings search failed"));
        }
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        reporter.abort();
        if let Some(cluster) = cluster {
            cluster.abort();
        }
        let p = handle.progress();
        let training = p
            .history
            .iter()
            .filter(|r| r.kind == fedrec_coordinator::round::TaskKind::Train)
            .count();
        let evaluations = p.history.len() - training;
        eprintln!(
            "stopped after {training} training rounds{}; model version {}",
            match evaluations {
                0 => String::new(),
                1 => " and 1 evaluation round".to_owned(),
                n => format!(" and {n} evaluation rounds"),
            },
            p.status.model_version
        );
        if let Some(path) = saver.save(&handle)? {
            eprintln!("model saved to {}", path.display());
        }
        anyhow::Ok(())
    })
}

/// What `serve` runs: the configuration, validated once (after the command
/// line's options and the catalogue's size are applied, before anything is
/// allocated for the model: `model.max_bytes`), the catalogue from
/// `--catalogue FILE` or `model.items` (ids 1 to N), and the model.
pub(crate) struct Served {
    pub(crate) cfg: ValidConfig,
    pub(crate) catalogue: fedrec_proto::catalogue::Catalogue,
    pub(crate) model: Arc<dyn fedrec_client::model::Model>,
}

/// [`Served`] from the configuration read from `config_file` (if any) with
/// the command line's options applied.
pub(crate) fn serve_model(
    mut cfg: CoordinatorConfig,
    config_file: Option<&Path>,
    catalogue_file: Option<&Path>,
) -> anyhow::Result<Served> {
    let listed = match catalogue_file {
        Some(path) => {
            let catalogue = read_catalogue(path)?;
            cfg.model.items = Some(catalogue.len());
            Some(catalogue)
        }
        None => None,
    };
    let Some(items) = cfg.model.items else {
        bail!(
            "the coordinator needs its catalogue: pass --items N (item ids 1 to N, as \
             `fedrec gen-data` writes them), --catalogue FILE (one item id a line), or \
             set model.items in the config"
        );
    };
    let cfg = cfg.validated_from(config_file)?;
    let catalogue = listed.unwrap_or_else(|| fedrec_proto::catalogue::Catalogue::numbered(items));
    let model = sim::model_for(&cfg, catalogue.len())?;
    Ok(Served {
        cfg,
        catalogue,
        model,
    })
}

/// Where `serve` writes the trained model, if anywhere.
#[derive(Clone)]
pub(crate) struct ModelSaver {
    pub(crate) path: Option<PathBuf>,
    pub(crate) catalogue: fedrec_proto::catalogue::Catalogue,
}

impl ModelSaver {
    /// Writes the current global model; returns where, if anywhere.
    pub(crate) fn save(
        &self,
        handle: &fedrec_coordinator::service::ServiceHandle,
    ) -> anyhow::Result<Option<&Path>> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let model = handle.model()?;
        fedrec::export::write_model(
            path,
            &model.layout,
            &model.params,
            &self.catalogue,
            model.version,
        )?;
        Ok(Some(path))
    }
}

/// Prints one line per ended round, and what to do once training has
/// finished (saving the model then, if asked to).
pub(crate) async fn report_rounds(
    handle: fedrec_coordinator::service::ServiceHandle,
    saver: ModelSaver,
    checkpoint: Option<PathBuf>,
) {
    use fedrec_coordinator::round::TaskKind;
    let mut rx = handle.subscribe();
    let mut shown = rx.borrow().history.len();
    let mut finished = rx.borrow().finished.is_some();
    loop {
        if rx.changed().await.is_err() {
            return;
        }
        let p = rx.borrow_and_update().clone();
        for r in p.history.iter().skip(shown) {
            let hr = r
                .evaluation
                .hit_rate_full()
                .map_or("no held-out purchases".to_owned(), |h| {
                    format!("HR@10 {h:.3}")
                });
            let what = match r.kind {
                TaskKind::Train => format!("round {}", r.round),
                _ => format!("round {} (evaluation)", r.round),
            };
            if r.completed {
                eprintln!(
                    "{what}: {} of {} devices accepted, {:.1} s, cohort {hr}",
                    r.participants, r.selected, r.seconds
                );
            } else {
                eprintln!(
                    "{what}: abandoned after {:.1} s: {}",
                    r.seconds,
                    r.abandon_reason.as_deref().unwrap_or("no reason given")
                );
            }
        }
        shown = p.history.len();
        if let (Some(reason), false) = (&p.finished, finished) {
            finished = true;
            let saved = match saver.save(&handle) {
                Ok(Some(path)) => format!("the model is saved to {}", path.display()),
                Ok(None) => match &checkpoint {
                    Some(file) => format!(
                        "the model is in {} (`fedrec export --checkpoint {}` writes it for \
                         serving)",
                        file.display(),
                        file.display()
                    ),
                    None => "the model is not saved: pass --model-out FILE next time".to_owned(),
                },
                Err(e) => format!("the model could not be saved: {e:#}"),
            };
            eprintln!(
                "training finished ({reason}), model version {}; {saved}. Devices that check \
                 in are told to stop; press Ctrl-C to stop the coordinator.",
                p.status.model_version
            );
        }
    }
}
