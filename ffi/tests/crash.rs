//! Crash safety from the app's side: a Python process using the bindings
//! is killed with SIGKILL while it records purchases in a loop, and while
//! it takes part in training rounds in a loop; the store then opens, and
//! holds the last state the child acknowledged or the one after (the write
//! in flight), never a damaged file. The kill lands wherever the child is:
//! most of a loop's time is inside `record()` (an encrypted write and two
//! fsyncs) or `participate()` (a round), so kills at a fixed count of
//! acknowledged calls hit them mid-call; each case repeats a few times.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::Coordinator;
use fedrec_ffi::{Consent, FedrecClient, OpenOptions};

/// Bound on waiting for the child's next line.
const LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the child's calls before the count it is killed at (a call
/// that makes no progress, e.g. a round without training, still prints).
const MAX_LINES: u32 = 100;
const KEY: [u8; 32] = {
    let mut key = [0; 32];
    let mut i = 0;
    while i < 32 {
        key[i] = i as u8;
        i += 1;
    }
    key
};

fn open(path: &Path) -> std::sync::Arc<FedrecClient> {
    FedrecClient::open(
        OpenOptions {
            store_path: path.to_string_lossy().into_owned(),
            store_key: KEY.to_vec(),
            diversity: 0.0,
            time_budget_ms: None,
            seed: Some(1),
        },
        None,
    )
    .unwrap_or_else(|e| panic!("the store opens after the kill: {e}"))
}

/// A store that knows the coordinator's catalogue, under `consent`.
fn prepared(path: &Path, endpoint: &str, consent: Consent) {
    let app = open(path);
    app.connect(endpoint.into(), None).expect("connect");
    app.set_consent(consent).expect("consent");
}

/// Runs `crash.py args…`, kills it once it has acknowledged `after` calls
/// (counting from `start`), and returns the last count it acknowledged.
fn kill_after(module: &Path, args: &[&str], prefix: &str, start: u64, after: u64) -> u64 {
    let mut child: Child = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/crash.py"))
        .args(args)
        .env("PYTHONPATH", module)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let count = |line: &str| -> u64 {
        line.strip_prefix(prefix)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected line from the child: {line:?}"))
    };
    let mut last = start;
    let mut lines = 0;
    while last < start + after {
        lines += 1;
        if lines > MAX_LINES {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no progress in {MAX_LINES} calls (at {last})");
        }
        match rx.recv_timeout(LINE_TIMEOUT) {
            Ok(line) => last = count(&line),
            Err(e) => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("child output");
                panic!(
                    "the child stopped answering ({e}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
    let status = child.wait().expect("child ends");
    assert!(!status.success(), "killed, not ended: {status}");
    reader.join().expect("reader");
    // Lines printed between the last one read and the kill.
    while let Ok(line) = rx.try_recv() {
        last = count(&line);
    }
    last
}

#[test]
fn a_kill_during_record_leaves_the_old_or_the_new_store() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let module = common::python_module(dir.path());
    let coordinator = Coordinator::start(1, None);
    let path = dir.path().join("shop.store");
    prepared(&path, &coordinator.endpoint, Consent::OnDevice);
    let store = path.to_string_lossy().into_owned();
    let mut acknowledged = 0;
    for _ in 0..3 {
        acknowledged = kill_after(&module, &["record", &store], "recorded ", acknowledged, 15);
        let stored = open(&path)
            .transparency_report(false)
            .expect("report")
            .stored
            .purchases;
        assert!(
            stored == acknowledged || stored == acknowledged + 1,
            "{acknowledged} purchases acknowledged, {stored} stored"
        );
        acknowledged = stored;
    }
    coordinator.stop();
}

#[test]
fn a_kill_during_participate_leaves_the_old_or_the_new_store() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let module = common::python_module(dir.path());
    // A child killed mid-task leaves its round waiting for it: a short
    // deadline abandons that round, and the next child gets the next one.
    let coordinator = Coordinator::start_with_deadline(1_000, None, 2.0);
    let path = dir.path().join("shop.store");
    prepared(&path, &coordinator.endpoint, Consent::Federated);
    {
        let app = open(&path);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs() as i64;
        for item in [3, 5, 8, 13] {
            let recorded = app
                .record(fedrec_ffi::Purchase {
                    item,
                    time: now - i64::from(item),
                    quantity: 1.0,
                    tag: None,
                })
                .expect("record");
            assert_eq!(recorded, fedrec_ffi::types::Recorded::Stored);
        }
    }
    let store = path.to_string_lossy().into_owned();
    let mut acknowledged = 0;
    for _ in 0..3 {
        acknowledged = kill_after(
            &module,
            &["participate", &store, &coordinator.endpoint],
            "rounds ",
            acknowledged,
            2,
        );
        let report = open(&path).transparency_report(false).expect("report");
        let rounds = report.rounds.len() as u64;
        assert!(
            rounds == acknowledged || rounds == acknowledged + 1,
            "{acknowledged} rounds acknowledged, {rounds} recorded"
        );
        assert_eq!(report.stored.purchases, 4, "the purchases are intact");
        acknowledged = rounds;
    }
    coordinator.stop();
}
