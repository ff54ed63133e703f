//! `fedrec client`: one device with one user's history; and what it shares
//! with `fedrec devices` (many such devices in one process): how a device
//! reaches the coordinator, and how it is made from the data and joined.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::bail;
use clap::Args;
use fedrec::data::{self, Dataset, Protocol};
use fedrec::sim::{self, Unmapped};
use fedrec_client::connect::ConnectOptions;
use fedrec_client::device::Device;
use fedrec_client::model::Model;
use fedrec_client::participant::Participant;
use fedrec_proto::Layout;

use super::*;

/// How a device reaches the coordinator.
#[derive(Args, Debug)]
pub(crate) struct ConnectArgs {
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
    /// Mutual TLS: the device's certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "key")]
    pub(crate) cert: Option<PathBuf>,
    /// Mutual TLS: the device's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub(crate) key: Option<PathBuf>,
    /// A file holding the device's enrollment token (for a coordinator
    /// started with --enrollment-tokens).
    #[arg(long, value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,
}

impl ConnectArgs {
    /// The connection options these flags give (errors name the file).
    pub(crate) fn options(&self) -> anyhow::Result<ConnectOptions> {
        let mut options = ConnectOptions::from_files(
            self.ca.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
        )?;
        if let Some(file) = &self.token_file {
            options = options.enrollment_token_file(file)?;
        }
        Ok(options)
    }
}

#[derive(Args, Debug)]
pub(crate) struct ClientArgs {
    #[command(flatten)]
    pub(crate) data: DataArgs,
    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
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
    let fleet = Fleet::new(ds, args.seed, args.factors)?;
    let options = args.connect.options()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let joined = fleet
            .join(user, &args.connect.coordinator, &options)
            .await?;
        let Joined {
            mut participant,
            device,
            mapped,
            unmapped,
        } = joined;
        eprintln!(
            "joined {} as {}: {} purchases of user {} in the coordinator's catalogue ({})",
            participant.endpoint().unwrap_or(&args.connect.coordinator),
            participant.pseudonym(),
            mapped,
            args.user,
            participant
                .catalogue()
                .map(describe_catalogue)
                .unwrap_or_default(),
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

/// Simulated devices of one data set: each holds one user's purchases up
/// to the first track's (discover's) held-out event, and that event.
pub(crate) struct Fleet {
    ds: Dataset,
    /// The tracks; devices hold out the first's (discover's) event.
    protocol: Protocol,
    seed: u64,
    factors: Option<usize>,
    /// The model of the coordinator's layout, made once and shared by the
    /// devices (it holds no per-device state).
    model: Mutex<Option<(Layout, Arc<dyn Model>)>>,
}

/// A device joined to the coordinator, ready to take part.
pub(crate) struct Joined {
    pub(crate) participant: Participant,
    pub(crate) device: Device,
    /// The user's purchases in the coordinator's catalogue.
    pub(crate) mapped: usize,
    /// Those it does not list, left unused.
    pub(crate) unmapped: Unmapped,
}

impl Fleet {
    /// The devices of `ds`; `factors`, if given, is checked against the
    /// coordinator's model.
    pub(crate) fn new(ds: Dataset, seed: u64, factors: Option<usize>) -> anyhow::Result<Self> {
        let protocol = data::Protocol::new(&ds);
        if protocol.evaluations.is_empty() {
            bail!(
                "no user of {} has purchases at two different times",
                ds.name
            );
        }
        Ok(Self {
            ds,
            protocol,
            seed,
            factors,
            model: Mutex::new(None),
        })
    }

    /// The data's users.
    pub(crate) fn users(&self) -> &[String] {
        &self.ds.user_ids
    }

    /// The device of user `user` (an index into the data's users), joined
    /// to the coordinator at `urls` (a comma-separated list of replicas).
    pub(crate) async fn join(
        &self,
        user: usize,
        urls: &str,
        options: &ConnectOptions,
    ) -> anyhow::Result<Joined> {
        let participant = Participant::connect_with(urls, options).await?;
        // The coordinator says which model it trains and over which items:
        // the device maps its purchases into that catalogue.
        let Some(catalogue) = participant.catalogue().cloned() else {
            bail!(
                "the coordinator at {} did not announce its catalogue (it is an older \
                 version of fedrec): run the same version of fedrec on both sides",
                participant.endpoint().unwrap_or(urls)
            );
        };
        let model = self.model_for(participant.layout())?;
        let (device, unmapped) = sim::make_catalogue_device(
            &model,
            &self.protocol,
            &self.protocol.evaluations[0],
            user,
            self.seed,
            |item| catalogue.index(&self.ds.item_ids[item as usize]),
        )?;
        let mapped = device.store().len();
        if mapped == 0 {
            bail!(
                "none of user {}'s purchases is in the coordinator's catalogue ({}): give the \
                 coordinator the catalogue of these data (serve --items N for ids 1 to N, or \
                 --catalogue FILE)",
                self.ds.user_ids[user],
                describe_catalogue(&catalogue)
            );
        }
        Ok(Joined {
            participant,
            device,
            mapped,
            unmapped,
        })
    }

    /// The model of `layout`, made on first use; checks --factors.
    fn model_for(&self, layout: &Layout) -> anyhow::Result<Arc<dyn Model>> {
        let mut cached = self.model.lock().expect("not poisoned");
        if let Some((known, model)) = cached.as_ref()
            && known == layout
        {
            return Ok(Arc::clone(model));
        }
        if let Some(factors) = self.factors {
            let theirs = layout.tensors().first().and_then(|(_, s)| s.get(1));
            if theirs.is_some_and(|&k| k != factors as u64) {
                bail!(
                    "--factors {factors} differs from the coordinator's model ({layout}): leave \
                     out --factors, the device takes the coordinator's"
                );
            }
        }
        let model = fedrec_client::model::for_layout(layout)?;
        *cached = Some((layout.clone(), Arc::clone(&model)));
        Ok(model)
    }
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
