//! The README's examples, run as written with the built `fedrec` binary.
//!
//! Each tested example is the first ```` ```sh ```` block after a line
//! `<!-- tested: NAME -->` in README.md. Its commands run with the README's
//! arguments, except that files under `/tmp/` go to a temporary directory
//! and the coordinator listens on port 0 (the devices get the port it
//! printed). The commands `fedrec certs` prints are run the same way.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_fedrec");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const TIMEOUT: Duration = Duration::from_secs(180);

mod common;

use common::stderr_lines as lines;

/// Waits for a child process with the bounded timeout.
fn wait(child: Child) -> std::process::Output {
    common::wait_output(child, TIMEOUT)
}

/// The commands of the README block tagged `name`, continuation lines
/// joined and comments removed.
fn readme_block(name: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let tag = format!("<!-- tested: {name} -->");
    let after = readme
        .split_once(&tag)
        .unwrap_or_else(|| panic!("README.md has no {tag}"))
        .1;
    let block = after
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .unwrap_or_else(|| panic!("no sh block after {tag}"))
        .0;
    let joined = block.replace("\\\n", " ");
    joined
        .lines()
        .map(|l| l.split(" #").next().unwrap_or("").trim().to_owned())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// Where the README's `/tmp/...` paths go in a test.
struct Paths {
    dir: tempfile::TempDir,
}

impl Paths {
    fn new() -> Self {
        Self {
            // Not under /tmp: the README's paths there are mapped into it.
            dir: tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
        }
    }

    /// `word` with `/tmp/` replaced by the test's directory and the port
    /// 50051 by `port`.
    fn map(&self, word: &str, port: Option<u16>) -> String {
        // A path already in the test's directory (which may itself be under
        // /tmp/, when the checkout is) stays as it is.
        let inside = word.starts_with(&*self.dir.path().to_string_lossy());
        let mut w = match word.strip_prefix("/tmp/").filter(|_| !inside) {
            Some(rest) => format!("{}/{rest}", self.dir.path().display()),
            None => word.to_owned(),
        };
        if let Some(port) = port {
            w = w.replace(":50051", &format!(":{port}"));
        }
        w
    }

    /// The command `line` (`fedrec ARGS…`) with mapped arguments.
    fn command(&self, line: &str, port: Option<u16>) -> Command {
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("fedrec"), "{line}");
        let mut command = Command::new(BIN);
        command
            .current_dir(ROOT)
            .args(words.map(|w| self.map(w, port)));
        command
    }
}

/// A process killed when dropped (a failed test leaves none behind).
struct Killed(Option<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running `fedrec serve` started from a README line on port 0.
struct Serve {
    process: Killed,
    lines: mpsc::Receiver<String>,
    port: u16,
}

impl Serve {
    fn start(paths: &Paths, line: &str) -> Self {
        let mut words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        match words.iter().position(|w| w == "--listen") {
            Some(i) => words[i + 1] = "127.0.0.1:0".into(),
            None => words.extend(["--listen".into(), "127.0.0.1:0".into()]),
        }
        let mut child = paths
            .command(&words.join(" "), None)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = lines(&mut child);
        let process = Killed(Some(child));
        let listening = loop {
            let line = lines.recv_timeout(TIMEOUT).expect("the coordinator starts");
            if line.contains("coordinator listening on ") {
                break line;
            }
        };
        let addr: std::net::SocketAddr = listening
            .split("coordinator listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {listening:?}"));
        Self {
            process,
            lines,
            port: addr.port(),
        }
    }

    /// Waits for a line containing `text`; returns the lines up to it.
    fn expect_line(&self, text: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(TIMEOUT)
                .unwrap_or_else(|_| panic!("no line with {text:?} in {seen:#?}"));
            let found = line.contains(text);
            seen.push(line);
            if found {
                return seen;
            }
        }
    }

    /// Ctrl-C; returns the lines printed after it.
    fn interrupt(mut self) -> Vec<String> {
        let child = self.process.0.take().unwrap();
        common::interrupt(child, TIMEOUT);
        self.lines.iter().collect()
    }
}

/// Runs a command to its end; asserts success; returns stdout and stderr.
fn run(mut command: Command) -> (String, String) {
    let out = wait(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{command:?} failed: {stderr}");
    (stdout, stderr)
}

/// Waits for every client; asserts each trained in at least one of the
/// coordinator's `rounds` rounds (devices that join while a round runs wait
/// for the next one) and evaluated the final model.
fn expect_clients(clients: Vec<Child>, rounds: u32) {
    for client in clients {
        let out = wait(client);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "client failed: {err}");
        let trained: u32 = err
            .split("done: ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no summary: {err}"));
        assert!((1..=rounds).contains(&trained), "{err}");
        assert!(err.contains("training rounds, 1 evaluations"), "{err}");
        assert!(
            err.contains(&format!("completed {rounds} training rounds")),
            "{err}"
        );
        assert!(err.contains("in the coordinator's catalogue"), "{err}");
    }
}

/// `line` with the client's default `--coordinator http://127.0.0.1:50051`
/// written out when it gives none (the port is then mapped like any other).
fn with_default_coordinator(line: &str) -> String {
    if line.contains("--coordinator") {
        line.to_owned()
    } else {
        format!("{line} --coordinator http://127.0.0.1:50051")
    }
}

/// The round count of the repository's coordinator.toml.
fn config_rounds() -> u32 {
    let text = std::fs::read_to_string(Path::new(ROOT).join("coordinator.toml")).unwrap();
    let value: toml::Value = toml::from_str(&text).unwrap();
    value["rounds"]["rounds"].as_integer().unwrap() as u32
}

#[test]
fn three_terminals_example_runs_as_written() {
    let block = readme_block("three-terminals");
    let [gen_data, serve, clients] = &block[..] else {
        panic!("expected gen-data, serve and a loop of clients: {block:#?}");
    };
    let paths = Paths::new();
    run(paths.command(gen_data, None));
    let serve = Serve::start(&paths, serve);
    // `for u in 1 2 3; do fedrec client … --user $u & done`
    let (users, command) = clients
        .strip_prefix("for u in ")
        .and_then(|rest| rest.split_once("; do "))
        .and_then(|(users, rest)| Some((users, rest.strip_suffix(" & done")?)))
        .unwrap_or_else(|| panic!("not a loop of clients: {clients}"));
    let children: Vec<Child> = users
        .split_whitespace()
        .map(|u| {
            paths
                .command(
                    &with_default_coordinator(&command.replace("$u", u)),
                    Some(serve.port),
                )
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let rounds = config_rounds();
    expect_clients(children, rounds);
    let seen = serve.expect_line("training finished");
    assert!(
        seen.iter()
            .any(|l| l.starts_with("round 1: ") && l.contains("devices accepted")),
        "{seen:#?}"
    );
    let after = serve.interrupt();
    assert!(
        after.iter().any(|l| l.contains(&format!(
            "stopped after {rounds} training rounds and 1 evaluation round"
        ))),
        "{after:#?}"
    );
}

/// Runs the TLS example's `serve` and `client` lines (from the README or
/// from `fedrec certs`' output) after `gen-data`.
fn tls_example(paths: &Paths, serve: &str, client: &str) {
    let serve = Serve::start(paths, serve);
    let child = paths
        .command(client, Some(serve.port))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    expect_clients(vec![child], config_rounds());
    serve.expect_line("training finished");
    serve.interrupt();
}

#[test]
fn tls_example_runs_as_written() {
    let paths = Paths::new();
    let data = readme_block("three-terminals");
    run(paths.command(&data[0], None));
    let block = readme_block("tls");
    let [certs, serve, client] = &block[..] else {
        panic!("expected certs, serve and client: {block:#?}");
    };
    run(paths.command(certs, None));
    tls_example(&paths, serve, client);
}

#[test]
fn the_commands_fedrec_certs_prints_run_as_printed() {
    let paths = Paths::new();
    let data = readme_block("three-terminals");
    run(paths.command(&data[0], None));
    let out: PathBuf = paths.dir.path().join("certs");
    let (stdout, _) = run({
        let mut c = Command::new(BIN);
        c.current_dir(ROOT).arg("certs").arg("--out").arg(&out);
        c
    });
    let printed: Vec<&str> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("fedrec "))
        .collect();
    let [serve, client] = &printed[..] else {
        panic!("expected a serve and a client command: {stdout}");
    };
    assert!(serve.starts_with("fedrec serve") && client.starts_with("fedrec client"));
    tls_example(&paths, serve, client);
}

/// Runs a command expected to fail; returns its stderr, checked to be
/// written for a person (one `error:` line, no backtrace, no Debug dump).
fn fails(mut command: Command) -> String {
    let out = wait(
        command
            .env("RUST_BACKTRACE", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert!(!out.status.success(), "{command:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    for dump in ["backtrace", "Caused by", "Status {", "Layout {", "Error {"] {
        assert!(!err.contains(dump), "{dump:?} in {err}");
    }
    assert!(err.starts_with("error: "), "{err}");
    err
}

#[test]
fn typical_mistakes_get_messages_for_people() {
    let paths = Paths::new();
    let readme = readme_block("three-terminals");
    run(paths.command(&readme[0], None));
    let client = "fedrec client --data /tmp/purchases.tsv";
    // A user id the data do not hold: what the ids look like.
    let err = fails(paths.command(&format!("{client} --user u0001"), None));
    assert!(
        err.contains("user ids are") && err.contains("to --user"),
        "{err}"
    );
    // A missing file: said once.
    let err = fails(paths.command("fedrec client --data /tmp/nothing.tsv --user 1", None));
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    // The TLS coordinator of the README, reached in plain text and without
    // a device certificate.
    let tls = readme_block("tls");
    run(paths.command(&tls[0], None));
    let serve = Serve::start(&paths, &tls[1]);
    let port = Some(serve.port);
    let err = fails(paths.command(
        &format!("{client} --user 1 --coordinator http://127.0.0.1:50051"),
        port,
    ));
    assert!(err.contains("https://127.0.0.1:"), "{err}");
    let err = fails(paths.command(
        &format!(
            "{client} --user 1 --coordinator https://localhost:50051 --ca /tmp/fedrec-certs/ca.pem"
        ),
        port,
    ));
    assert!(err.contains("--cert FILE --key FILE"), "{err}");
    serve.interrupt();
}

#[test]
fn serve_saves_the_model_and_export_writes_the_same_file() {
    let paths = Paths::new();
    let readme = readme_block("three-terminals");
    run(paths.command(&readme[0], None));
    let serve = Serve::start(
        &paths,
        "fedrec serve --items 100 --rounds 2 --clients-per-round 1 --factors 4 \
         --checkpoint /tmp/state.ckpt --model-out /tmp/model.safetensors",
    );
    let child = paths
        .command(
            &with_default_coordinator("fedrec client --data /tmp/purchases.tsv --user 1"),
            Some(serve.port),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    expect_clients(vec![child], 2);
    let seen = serve.expect_line("training finished");
    assert!(
        seen.last().unwrap().contains("model.safetensors"),
        "{seen:#?}"
    );
    serve.interrupt();
    let saved = std::fs::read(paths.dir.path().join("model.safetensors")).unwrap();
    let model = fedrec::export::decode_model(&saved).unwrap();
    let ids: Vec<String> = serde_json::from_str(&model.metadata["item_ids"]).unwrap();
    assert_eq!(ids.len(), 100);
    assert_eq!((ids[0].as_str(), ids[99].as_str()), ("1", "100"));
    assert_eq!(model.tensors["item_factors"].0, vec![100, 4]);
    assert_eq!(model.tensors["item_bias"].0, vec![100]);
    run(paths.command(
        "fedrec export --checkpoint /tmp/state.ckpt --items 100 --factors 4 \
         --out /tmp/exported.safetensors",
        None,
    ));
    let exported = std::fs::read(paths.dir.path().join("exported.safetensors")).unwrap();
    assert_eq!(exported, saved, "export writes what serve saved");
    python_snippet(&paths.dir.path().join("model.safetensors"));
}

/// Runs the README's Python snippet on `model` when python3 and numpy are
/// installed (skipped otherwise).
fn python_snippet(model: &Path) {
    let has_numpy = Command::new("python3")
        .args(["-c", "import numpy"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_numpy {
        eprintln!("python3 with numpy not found: the README's snippet is not run");
        return;
    }
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let snippet = readme
        .split_once("<!-- tested: python -->")
        .and_then(|(_, rest)| rest.split_once("```python\n"))
        .and_then(|(_, rest)| rest.split_once("\n```"))
        .expect("README has the tested python block")
        .0
        .replace("model.safetensors", &model.display().to_string());
    let out = Command::new("python3")
        .args(["-c", &snippet])
        .output()
        .unwrap();
    common::process::assert_success(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
}

/// The example app `client/examples/shop_app.rs`, built by `cargo test`
/// with the other examples (or here, when only this test program was built).
fn shop_app() -> PathBuf {
    let bin = Path::new(BIN).with_file_name("examples").join("shop_app");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "fedrec-client", "--example", "shop_app"])
            .current_dir(ROOT)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build --example shop_app failed");
    }
    bin
}

/// A transparency report with what may change from run to run masked:
/// dates, and the counts of the messages sent outside rounds (the app's
/// extra status and model requests depend on timing) and of the total.
fn masked(report: &str) -> String {
    report
        .lines()
        .map(|line| {
            let volatile = line.starts_with("Sent:") || line.starts_with("  outside rounds:");
            let mut out = String::with_capacity(line.len());
            let mut chars = line.chars().peekable();
            while let Some(c) = chars.next() {
                if c.is_ascii_digit() && volatile {
                    while chars.peek().is_some_and(char::is_ascii_digit) {
                        chars.next();
                    }
                    out.push('N');
                } else {
                    out.push(c);
                }
            }
            // Dates: 2026-11-29 -> DATE.
            let mut words: Vec<String> = Vec::new();
            for word in out.split(' ') {
                let date = word.trim_end_matches([')', ',', ':']);
                let is_date = date.len() == 10
                    && date.char_indices().all(|(i, c)| {
                        if i == 4 || i == 7 {
                            c == '-'
                        } else {
                            c.is_ascii_digit()
                        }
                    });
                words.push(if is_date {
                    word.replacen(date, "DATE", 1)
                } else {
                    word.to_owned()
                });
            }
            words.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The report as the README shows it: the first round's line, then "…"
/// for the others.
fn elided(report: &str) -> String {
    let mut out = Vec::new();
    let mut rounds = 0;
    for line in report.lines() {
        if line.starts_with("  round ") {
            rounds += 1;
            match rounds {
                1 => out.push(line.to_owned()),
                2 => out.push("  …".to_owned()),
                _ => {}
            }
        } else {
            out.push(line.to_owned());
        }
    }
    out.join("\n")
}

/// The README's sample transparency report is the one the example app
/// prints (dates and timing-dependent counts aside), so that it cannot go
/// stale. `FEDREC_BLESS=1 cargo test --test examples` rewrites the sample.
#[test]
fn the_readme_transparency_sample_is_what_the_example_prints() {
    let out = Command::new(shop_app()).output().expect("shop_app runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The report: its summary, a blank line, its details up to the next
    // blank line.
    let report = stdout
        .split_once("--- transparency report ---\n")
        .and_then(|(_, rest)| {
            let details = rest.find("\nDetails\n")?;
            let end = rest[details + 1..]
                .find("\n\n")
                .map_or(rest.len(), |e| details + 1 + e);
            Some(elided(&rest[..end]))
        })
        .expect("shop_app prints its transparency report");
    let path = Path::new(ROOT).join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let (before, rest) = readme
        .split_once("<!-- tested: transparency -->\n```\n")
        .expect("README has the tested transparency block");
    let (sample, after) = rest.split_once("\n```").expect("the block ends");
    if std::env::var_os("FEDREC_BLESS").is_some() {
        let updated = format!("{before}<!-- tested: transparency -->\n```\n{report}\n```{after}");
        std::fs::write(&path, updated).unwrap();
        return;
    }
    assert_eq!(
        masked(sample),
        masked(&report),
        "README.md's transparency sample differs from what client/examples/shop_app.rs prints; \
         FEDREC_BLESS=1 cargo test --test examples rewrites it"
    );
}
