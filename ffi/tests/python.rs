//! The generated Python module against a real coordinator on 127.0.0.1
//! (port 0): `story.py` plays the shop app (recommendations before consent,
//! consent, purchases, training rounds, personal recommendations, an
//! explanation, the transparency report, forget-me) and the app's bad
//! input, asserting each outcome. Needs `python3` (3.8 or newer; UniFFI's
//! Python bindings use only ctypes).

mod common;

use std::process::Command;
use std::sync::Arc;

use fedrec_client::model::{MatrixFactorization, Model};
use rand::SeedableRng;

const ITEMS: usize = 60;
const FACTORS: usize = 8;
const ROUNDS: u32 = 2;
/// The whole script's bound (it takes about a second).
const SCRIPT_TIMEOUT_SECS: u32 = 120;

#[test]
fn python_plays_the_shop_app_story_against_a_coordinator() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let module = dir.path().join("python");
    common::generate(&[uniffi::TargetLanguage::Python], &module);
    std::fs::copy(
        common::library(),
        module.join(common::library().file_name().expect("file name")),
    )
    .expect("library beside the module");
    let stores = dir.path().join("stores");
    std::fs::create_dir(&stores).expect("stores directory");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (endpoint, stop, server) = runtime.block_on(start_coordinator());

    // `timeout` bounds the script even if a call into the SDK hangs.
    let output = Command::new("timeout")
        .arg(SCRIPT_TIMEOUT_SECS.to_string())
        .arg("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/story.py"))
        .env("PYTHONPATH", &module)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("FEDREC_ENDPOINT", &endpoint)
        .env("FEDREC_DIR", &stores)
        .env("FEDREC_ITEMS", ITEMS.to_string())
        .env("FEDREC_FACTORS", FACTORS.to_string())
        .output()
        .expect("python3 runs (is it installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("story: ok"),
        "story.py failed ({}):\n{stdout}\n{stderr}",
        output.status
    );

    let _ = stop.send(());
    runtime
        .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(30), server).await })
        .expect("coordinator stops in time")
        .expect("server task")
        .expect("server ran cleanly");
}

type Server = tokio::task::JoinHandle<Result<(), fedrec_coordinator::CoordinatorError>>;

/// A coordinator of `ROUNDS` rounds, each of one device (the app's).
async fn start_coordinator() -> (String, tokio::sync::oneshot::Sender<()>, Server) {
    let model: Arc<dyn Model> =
        Arc::new(MatrixFactorization::new(ITEMS, FACTORS, 0.1).expect("valid model"));
    let mut cfg = fedrec_coordinator::CoordinatorConfig::default();
    cfg.rounds.rounds = ROUNDS;
    cfg.rounds.clients_per_round = 1;
    cfg.rounds.min_updates = 1;
    cfg.rounds.over_selection = 1.0;
    cfg.rounds.final_evaluation = false;
    cfg.rounds.deadline_secs = 60.0;
    cfg.rounds.checkin_window_secs = 60.0;
    cfg.rounds.seed = Some(1);
    let params = model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
    let start = fedrec_coordinator::bootstrap::prepare(
        cfg.validated().expect("a valid configuration"),
        model.layout(),
        params,
        None,
        Default::default(),
    )
    .expect("valid coordinator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("address"));
    let service = fedrec_coordinator::CoordinatorService::new(start.core, start.options);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service.serve(listener, async {
        let _ = stopped.await;
    }));
    (endpoint, stop, server)
}
