//! `fedrec` processes in tests: the data they read, `fedrec serve` started
//! on a free port, its lines awaited with a bounded timeout, and children
//! killed when a test ends early.

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use super::{TIMEOUT, stderr_lines as lines};

const BIN: &str = env!("CARGO_BIN_EXE_fedrec");

/// Asserts that a finished process succeeded, showing its stderr if not.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Generates 6 users × 40 items into `dir` with `fedrec gen-data`; returns
/// the file and the data set as the devices will load it.
pub fn gen_data(dir: &std::path::Path) -> (std::path::PathBuf, fedrec::data::Dataset) {
    gen_data_sized(dir, 6, 40)
}

/// Generates `users` × `items` into `dir` with `fedrec gen-data`.
pub fn gen_data_sized(
    dir: &std::path::Path,
    users: usize,
    items: usize,
) -> (std::path::PathBuf, fedrec::data::Dataset) {
    let data = dir.join("purchases.tsv");
    let out = Command::new(BIN)
        .args([
            "gen-data",
            "--users",
            &users.to_string(),
            "--items",
            &items.to_string(),
            "--out",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert_success(&out);
    let ds = fedrec::data::load(&data, &Default::default()).unwrap();
    (data, ds)
}

/// Waits (bounded) for a line containing `needle`; returns it.
pub fn expect_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line with {needle:?} in time"));
        if line.contains(needle) {
            return line;
        }
    }
}

/// A child process that is killed if the test ends early.
pub struct Killed(Option<Child>);

impl Killed {
    pub fn take(&mut self) -> Child {
        self.0.take().expect("the child is still there")
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `fedrec serve` on 127.0.0.1:0 with `args`; returns it, its
/// stderr lines, its address and the lines it printed before listening.
pub fn start_serve(args: &[&str]) -> (Killed, mpsc::Receiver<String>, String, Vec<String>) {
    let mut serve = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(&mut serve);
    let serve = Killed(Some(serve));
    let mut before = Vec::new();
    let listening = loop {
        let line = rx.recv_timeout(TIMEOUT).expect("coordinator starts");
        if line.contains("coordinator listening on ") {
            break line;
        }
        before.push(line);
    };
    let addr = listening
        .split("coordinator listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string();
    (serve, rx, addr, before)
}

/// Runs `fedrec` with `args` and `--report` into `dir`, which must
/// succeed; returns the report's JSON.
pub fn with_report(args: &[&str], dir: &std::path::Path) -> serde_json::Value {
    let report = dir.join("report.json");
    let out = Command::new(BIN)
        .args(args)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert_success(&out);
    serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap()
}

/// Runs `fedrec bench round` with `args`, which must succeed; returns the
/// JSON of its last line.
pub fn bench_round(args: &[&str]) -> serde_json::Value {
    let child = Command::new(BIN)
        .args(["bench", "round"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = super::wait_output(child, TIMEOUT);
    assert_success(&out);
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap()
}
