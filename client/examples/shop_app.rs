//! A shopping app embedding the fedrec SDK, end to end.
//!
//! It starts a coordinator in this process on 127.0.0.1 (port 0) with a few
//! other shoppers' devices, then plays the app: opens the encrypted store,
//! asks for recommendations before and after consent, records purchases
//! (one tagged as a gift, which the shopper then excludes), explains a
//! recommendation, takes part in training rounds, and prints the
//! transparency report a settings screen would show.
//!
//! Run it with `cargo run -p fedrec-client --example shop_app`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use fedrec_client::consent::Consent;
use fedrec_client::device::Device;
use fedrec_client::eligibility::{Eligibility, FnConditions};
use fedrec_client::exclusion::Exclusion;
use fedrec_client::model::{MatrixFactorization, Model};
use fedrec_client::participant::Participant;
use fedrec_client::store::{Purchase, Tag};
use fedrec_client::vault::StoreKey;
use fedrec_client::{BlockingClient, Client};
use rand::{RngExt, SeedableRng};

/// The shop's catalogue: 4 departments of 50 items.
const ITEMS: usize = 200;
const DEPARTMENT: u32 = 50;
/// Other shoppers taking part in training alongside the app's.
const NEIGHBOURS: usize = 11;
const ROUNDS: u32 = 10;

fn main() -> anyhow::Result<()> {
    let model: Arc<dyn Model> = Arc::new(MatrixFactorization::new(ITEMS, 16, 0.1)?);
    let now = fedrec_client::clock::Clock::unix_now(&fedrec_client::clock::SystemClock::new());

    // --- The shop's side: a coordinator and other shoppers' devices. -----
    let runtime = tokio::runtime::Runtime::new()?;
    let (endpoint, stop, server) = runtime.block_on(start_coordinator(&model))?;
    let neighbours = runtime.block_on(start_neighbours(&model, &endpoint, now))?;

    // --- The app. ----------------------------------------------------------
    // The key would come from the platform keystore; the file lives in the
    // app's private storage.
    let key = StoreKey::generate()?;
    let path = std::env::temp_dir().join(format!("fedrec-shop-app-{}.store", std::process::id()));
    // The app's conditions: train only while charging (flipped below).
    let charging = Arc::new(AtomicBool::new(false));
    let plugged = Arc::clone(&charging);
    let conditions = FnConditions(move || {
        if plugged.load(Ordering::SeqCst) {
            Eligibility::Eligible
        } else {
            Eligibility::NotNow("not charging".into())
        }
    });
    // The model's shape and the catalogue come from the coordinator at
    // connect (and are kept in the store for the next start).
    let app = BlockingClient::open(
        Client::builder_from_coordinator()
            .store(&path, key)
            .conditions(Arc::new(conditions))
            .time_budget(std::time::Duration::from_secs(2)),
    )?;
    app.connect(&endpoint)?;
    app.refresh_model()?;
    println!("consent: {} (the default)", app.consent().level);
    let recs = app.recommend(5)?;
    println!("recommended ({:?}): {:?}", recs.basis, recs.items);
    let kept = app.record(Purchase::new(7, now, 1.0))?;
    println!("a purchase without consent: {kept:?}");

    app.set_consent(Consent::OnDevice)?;
    // The shopper likes the second department (items 50..100).
    for (i, item) in [52, 57, 61, 66, 70, 78].into_iter().enumerate() {
        app.record(Purchase::new(item, now - 3600 * i as i64, 1.0))?;
    }
    // A present for someone else: the app tags it, the shopper excludes
    // gifts, and it shapes neither recommendations nor training.
    app.record(Purchase::new(12, now, 1.0).with_tag(Tag::new("gift")?))?;
    app.exclude(Exclusion::tag("gift")?)?;
    let recs = app.recommend(5)?;
    println!(
        "recommended ({:?}, untrained model): {:?}",
        recs.basis, recs.items
    );

    app.set_consent(Consent::Federated)?;
    // Not charging: the device does not check in; it would wait and retry.
    // Plugged in: one round per call (a background job would call it).
    charging.store(true, Ordering::SeqCst);
    let mut trained = 0;
    for _ in 0..ROUNDS {
        trained += app.participate()?.trained;
    }
    println!("took part in {trained} training rounds");
    app.refresh_model()?;
    let recs = app.recommend(5)?;
    println!("after training ({:?}):", recs.basis);
    println!("  recommended for you: {:?}", recs.items);
    println!("  buy it again:        {:?}", recs.buy_again);
    println!("  one list (blended):  {:?}", recs.blended);
    let why = app.explain(recs.items[0])?;
    println!("item {}: {}", why.item, why.text());
    if let Some(&again) = recs.buy_again.first() {
        println!("item {again}: {}", app.explain(again)?.text());
    }
    app.set_diversity(0.5)?;
    let recs = app.recommend(5)?;
    println!("diversified, knob 0.5: {:?}", recs.items);

    println!(
        "\n--- transparency report ---\n{}",
        app.transparency_report(false)
    );

    app.forget_me()?;
    println!(
        "after forget-me: {} purchases stored",
        app.transparency_report(false).stored.purchases
    );
    drop(app);
    std::fs::remove_file(&path)?;

    // --- Shut the shop down. ------------------------------------------------
    runtime.block_on(async {
        for n in neighbours {
            n.await??;
        }
        let _ = stop.send(());
        server.await??;
        anyhow::Ok(())
    })
}

type Server = tokio::task::JoinHandle<Result<(), fedrec_coordinator::CoordinatorError>>;

/// A coordinator on 127.0.0.1 (port 0): `ROUNDS` rounds in which every
/// device (the neighbours and the app) trains.
async fn start_coordinator(
    model: &Arc<dyn Model>,
) -> anyhow::Result<(String, tokio::sync::oneshot::Sender<()>, Server)> {
    let mut cfg = fedrec_coordinator::CoordinatorConfig::default();
    cfg.rounds.rounds = ROUNDS;
    cfg.rounds.clients_per_round = NEIGHBOURS + 1;
    cfg.rounds.min_updates = NEIGHBOURS + 1;
    cfg.rounds.over_selection = 1.0;
    cfg.rounds.final_evaluation = false;
    let params = model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
    let start = fedrec_coordinator::bootstrap::prepare(
        cfg.validated()?,
        model.layout(),
        params,
        None,
        Default::default(),
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let service = fedrec_coordinator::CoordinatorService::new(start.core, start.options);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service.serve(listener, async {
        let _ = stopped.await;
    }));
    Ok((endpoint, stop, server))
}

/// Other shoppers, each fond of one department, taking part until the
/// coordinator finishes.
async fn start_neighbours(
    model: &Arc<dyn Model>,
    endpoint: &str,
    now: i64,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let mut tasks = Vec::new();
    for n in 0..NEIGHBOURS {
        let mut device = Device::new(Arc::clone(model), n as u64);
        device.set_consent(Consent::Federated)?;
        let department = (n as u32 % 4) * DEPARTMENT;
        for _ in 0..12 {
            let item = department + rng.random_range(0..DEPARTMENT);
            device.record(Purchase::new(item, now, 1.0))?;
        }
        let mut participant = Participant::connect(endpoint).await?;
        tasks.push(tokio::spawn(async move {
            participant.run(device).await?;
            anyhow::Ok(())
        }));
    }
    Ok(tasks)
}
