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

const ROUNDS: u32 = 2;
/// The whole script's bound (it takes about a second).
const SCRIPT_TIMEOUT_SECS: u32 = 120;

#[test]
fn python_plays_the_shop_app_story_against_a_coordinator() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let module = common::python_module(dir.path());
    // `timeout` bounds the script even if a call into the SDK hangs.
    let mut python = Command::new("timeout");
    python
        .arg(SCRIPT_TIMEOUT_SECS.to_string())
        .arg("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/story.py"))
        .env("PYTHONPATH", &module)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    common::play_story(dir.path(), ROUNDS, "story.py (python3)", python);
}
