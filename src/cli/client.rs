//! `fedrec client`: one device with one user's history.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use fedrec::data::{self, Dataset};
use fedrec::sim::{self};

use super::*;

#[derive(Args, Debug)]
pub(crate) struct ClientArgs {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// The coordinator's address: http://HOST:PORT, or https://HOST:PORT
    /// with --ca (HOST must be one of the names in its certificate). A
    /// comma-separated list (URL,URL,…) names the replicas of one
    /// coordinator: the device joins the first that answers and moves to
    /// the next whenever the one in use cannot be reached, keeping its
    /// session.
    #[arg(
        long,
        value_name = "URL[,URL…]",
        default_value = "http://127.0.0.1:50051"
    )]
    pub(crate) coordinator: String,
    /// TLS: the CA certificate (PEM) that signed the coordinator's certificate.
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// Mutual TLS: this device's certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub(crate) cert: Option<PathBuf>,
    /// Mutual TLS: this device's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub(crate) key: Option<PathBuf>,
    /// A file holding this device's enrollment token (for a coordinator
    /// started with --enrollment-tokens).
    #[arg(long, value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// The user (external id in the data) whose history this device holds.
    #[arg(long)]
    pub(crate) user: String,
    /// Latent factors to expect (checked against the coordinator's model;
    /// by default the device takes the coordinator's).
    #[arg(long)]
    pub(crate) factors: Option<usize>,
    /// Seed of the device's local randomness.
    #[arg(long, default_value_t = sim::DEFAULT_SEED)]
    pub(crate) seed: u64,
}

pub(crate) fn client(args: ClientArgs) -> anyhow::Result<()> {
    let ds = args.data.load(args.seed)?;
    let user = ds
        .user_ids
        .iter()
        .position(|u| *u == args.user)
        .ok_or_else(|| unknown_user(&args.user, &ds))?;
    // The device holds its first track's (discover's) held-out event, and
    // the purchases before it.
    let protocol = data::Protocol::new(&ds);
    let ev = protocol.evaluations.first().with_context(|| {
        format!(
            "no user of {} has purchases at two different times",
            ds.name
        )
    })?;
    let mut options = fedrec_client::connect::ConnectOptions::from_files(
        args.ca.as_deref(),
        args.cert.as_deref(),
        args.key.as_deref(),
    )?;
    if let Some(file) = &args.token_file {
        options = options.enrollment_token_file(file)?;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut participant =
            fedrec_client::participant::Participant::connect_with(&args.coordinator, &options)
                .await?;
        // The coordinator says which model it trains and over which items:
        // the device maps its purchases into that catalogue.
        let Some(catalogue) = participant.catalogue().cloned() else {
            bail!(
                "the coordinator at {} did not announce its catalogue (it is an older \
                 version of fedrec): run the same version of fedrec on both sides",
                participant.endpoint().unwrap_or(&args.coordinator)
            );
        };
        let model = fedrec_client::model::for_layout(participant.layout())?;
        if let Some(factors) = args.factors {
            let theirs = participant
                .layout()
                .tensors()
                .first()
                .and_then(|(_, s)| s.get(1));
            if theirs.is_some_and(|&k| k != factors as u64) {
                bail!(
                    "--factors {factors} differs from the coordinator's model ({}): leave \
                     out --factors, the device takes the coordinator's",
                    participant.layout()
                );
            }
        }
        let (device, unmapped) =
            sim::make_catalogue_device(&model, &protocol, ev, user, args.seed, |item| {
                catalogue.index(&ds.item_ids[item as usize])
            })?;
        let mapped = device.store().len();
        if mapped == 0 {
            bail!(
                "none of user {}'s purchases is in the coordinator's catalogue ({}): give the \
                 coordinator the catalogue of these data (serve --items N for ids 1 to N, or \
                 --catalogue FILE)",
                args.user,
                describe_catalogue(&catalogue)
            );
        }
        eprintln!(
            "joined {} as {}: {} purchases of user {} in the coordinator's catalogue ({})",
            participant.endpoint().unwrap_or(&args.coordinator),
            participant.pseudonym(),
            mapped,
            args.user,
            describe_catalogue(&catalogue),
        );
        if unmapped.purchases > 0 {
            eprintln!(
                "{} purchases of {} items the catalogue does not list stay on this device, \
                 unused{}",
                unmapped.purchases,
                unmapped.items,
                if unmapped.held_out {
                    " (so does the held-out purchase: this device evaluates nothing)"
                } else {
                    ""
                }
            );
        }
        let (_device, summary) = participant.run(device).await?;
        eprintln!(
            "done: {} training rounds, {} evaluations, {} refused, {} interrupted; {} reconnects, \
             {} failovers, {} joins again; {} bytes sent; coordinator: {}",
            summary.trained,
            summary.evaluated,
            summary.refused,
            summary.interrupted,
            summary.reconnects,
            summary.failovers,
            summary.rejoins,
            participant.sent().total_bytes(),
            summary.finished_reason
        );
        anyhow::Ok(())
    })
}

/// The error for a user id the data do not hold, showing what its ids look like.
pub(crate) fn unknown_user(user: &str, ds: &Dataset) -> anyhow::Error {
    let examples: Vec<&str> = ds.user_ids.iter().take(3).map(String::as_str).collect();
    let more = if ds.user_ids.len() > 3 { ", …" } else { "" };
    anyhow::anyhow!(
        "user {user:?} is not in {}: its {} user ids are {}{more}; pass one of them to --user",
        ds.name,
        ds.user_ids.len(),
        examples.join(", ")
    )
}
