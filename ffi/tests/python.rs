//! The generated Python module against real coordinators on 127.0.0.1
//! (port 0, one plain, one TLS): `story.py` plays the shop app
//! (recommendations before consent, consent, purchases, training rounds,
//! personal recommendations, an explanation, the transparency report,
//! forget-me) and the app's bad input (a key of the wrong length, a wrong
//! key, a corrupt and a foreign store file, a wrong CA, an unknown item, a
//! negative k), asserting each outcome. Needs `python3` (3.8 or newer;
//! UniFFI's Python bindings use only ctypes).

mod common;

use std::process::Command;

use common::{Coordinator, ITEMS, Pki};

const ROUNDS: u32 = 2;
/// The whole script's bound (it takes about a second).
const SCRIPT_TIMEOUT_SECS: u32 = 120;

#[test]
fn python_plays_the_shop_app_story_against_a_coordinator() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let module = common::python_module(dir.path());
    let stores = dir.path().join("stores");
    std::fs::create_dir(&stores).expect("stores directory");
    let pki = Pki::new(dir.path());
    let coordinator = Coordinator::start(ROUNDS, None);
    let tls = Coordinator::start(1, Some(&pki));

    // `timeout` bounds the script even if a call into the SDK hangs.
    let output = Command::new("timeout")
        .arg(SCRIPT_TIMEOUT_SECS.to_string())
        .arg("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/story.py"))
        .env("PYTHONPATH", &module)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("FEDREC_ENDPOINT", &coordinator.endpoint)
        .env("FEDREC_TLS_ENDPOINT", &tls.endpoint)
        .env("FEDREC_OTHER_CA", &pki.other_ca_pem)
        .env("FEDREC_DIR", &stores)
        .env("FEDREC_ITEMS", ITEMS.to_string())
        .output()
        .expect("python3 runs (is it installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("story: ok"),
        "story.py failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    coordinator.stop();
    tls.stop();
}
