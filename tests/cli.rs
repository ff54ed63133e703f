//! The `fedrec` binary as a user runs it: a standalone coordinator, device
//! processes, Ctrl-C; and data errors that name the file and line.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_fedrec");
const TIMEOUT: Duration = Duration::from_secs(120);

/// Waits for a child process without sleeping: a thread waits, we receive
/// its result with a bounded timeout.
fn wait(child: Child) -> std::process::Output {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(TIMEOUT)
        .expect("process ends in time")
        .expect("process output")
}

#[test]
fn serve_and_three_client_processes_then_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("purchases.tsv");
    let out = Command::new(BIN)
        .args(["gen-data", "--users", "6", "--items", "40", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ds = fedrec::data::load(&data, &Default::default()).unwrap();
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[rounds]\nrounds = 5\nclients_per_round = 4\nmin_updates = 3\nseed = 1\n\n[model]\nitems = {}\nfactors = 8\n",
            ds.n_items()
        ),
    )
    .unwrap();

    let mut serve = Command::new(BIN)
        // Flags override the file: 2 rounds of 3 devices.
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--rounds",
            "2",
            "--clients-per-round",
            "3",
            "--config",
        ])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the bound address from the coordinator's first line.
    let stderr = serve.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let listening = rx.recv_timeout(TIMEOUT).expect("coordinator starts");
    let addr = listening
        .strip_prefix("coordinator listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line: {listening}"))
        .to_string();

    let clients: Vec<Child> = ds.user_ids[..3]
        .iter()
        .map(|user| {
            Command::new(BIN)
                .args([
                    "client",
                    "--factors",
                    "8",
                    "--coordinator",
                    &format!("http://{addr}"),
                    "--user",
                    user,
                    "--data",
                ])
                .arg(&data)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for client in clients {
        let out = wait(client);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "client failed: {err}");
        assert!(
            err.contains("done: 2 training rounds, 1 evaluations"),
            "{err}"
        );
    }

    // Ctrl-C: the coordinator stops cleanly.
    let status = Command::new("kill")
        .args(["-INT", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = wait(serve);
    assert!(out.status.success(), "coordinator exit: {:?}", out.status);
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("stopped after 3 rounds")),
        "{rest:?}"
    );
}

#[test]
fn a_malformed_line_is_reported_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("u.data");
    std::fs::write(
        &data,
        "1\t10\t5\t881250949\n2\t20\t3\t881250950\n3\tX\t4\tnot-a-time\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["simulate", "--transport", "inproc", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("u.data:3"),
        "error names the file and line: {err}"
    );
}

/// The documented example configuration is valid.
#[test]
fn the_shipped_coordinator_toml_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/coordinator.toml");
    let cfg = fedrec_coordinator::config::CoordinatorConfig::from_file(path)
        .expect("coordinator.toml parses and validates");
    assert_eq!(cfg.model.items, Some(1682));
}

/// `fedrec privacy` prints epsilon for a noise multiplier, and the noise
/// multiplier for an epsilon, consistently with each other.
#[test]
fn privacy_plans_a_budget_both_ways() {
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("privacy")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let number = |text: &str, after: &str| -> f64 {
        let rest = &text[text.find(after).unwrap() + after.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let common = [
        "--sampling-rate",
        "0.01",
        "--rounds",
        "1000",
        "--delta",
        "1e-5",
    ];
    let eps_out = run(&[&common[..], &["--noise-multiplier", "1.1"]].concat());
    let eps = number(&eps_out, "epsilon = ");
    assert!(eps > 0.1 && eps < 10.0, "{eps_out}");
    let z_out = run(&[&common[..], &["--epsilon", &eps.to_string()]].concat());
    let z = number(&z_out, "noise multiplier = ");
    assert!((z - 1.1).abs() < 0.01, "{z_out}");

    let bad = Command::new(BIN)
        .args([
            "privacy",
            "--sampling-rate",
            "2",
            "--rounds",
            "1",
            "--delta",
            "1e-5",
            "--epsilon",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--sampling-rate must be in [0, 1]"));
}
