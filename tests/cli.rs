//! The `fedrec` binary as a user runs it: a standalone coordinator, device
//! processes, Ctrl-C; and data errors that name the file and line.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_fedrec");
const TIMEOUT: Duration = Duration::from_secs(120);

use common::process::{assert_success, expect_line, gen_data, start_serve, with_report};

/// Waits for a child process with the bounded timeout.
fn wait(child: Child) -> std::process::Output {
    common::wait_output(child, TIMEOUT)
}

mod common;

#[test]
fn serve_and_three_client_processes_then_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ds) = gen_data(dir.path());
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[rounds]\nrounds = 5\nclients_per_round = 4\nmin_updates = 3\nseed = 1\n\n[model]\nitems = {}\nfactors = 8\n",
            ds.n_items()
        ),
    )
    .unwrap();

    // Flags override the file: 2 rounds of 3 devices.
    let config = config.to_str().unwrap();
    let (mut serve, rx, addr, _) = start_serve(&[
        "--rounds",
        "2",
        "--clients-per-round",
        "3",
        "--config",
        config,
    ]);

    // A list of coordinator URLs whose first is down (a port bound and
    // released): each device joins the second.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let clients: Vec<Child> = ds.user_ids[..3]
        .iter()
        .map(|user| {
            Command::new(BIN)
                .args([
                    "client",
                    "--factors",
                    "8",
                    "--coordinator",
                    &format!("http://{dead},http://{addr}"),
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
        assert!(err.contains(&format!("joined http://{addr} as")), "{err}");
        assert!(
            err.contains("done: 2 training rounds, 1 evaluations"),
            "{err}"
        );
    }

    // Ctrl-C: the coordinator stops cleanly.
    common::interrupt(serve.take(), TIMEOUT);
    // The process has exited: its stderr ends, and so does the reader.
    let rest: Vec<String> = rx.iter().collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("stopped after 2 training rounds and 1 evaluation round")),
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
        assert_success(&out);
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

/// `fedrec simulate --dp distributed` over gRPC with secure aggregation
/// and a budget: training stops at the round the budget allows, and the
/// report's privacy section says so with ε, δ, z, C, q and the mode.
#[test]
fn simulate_with_distributed_dp_stops_at_the_budget() {
    use fedrec_coordinator::privacy::RdpAccountant;
    let dir = tempfile::tempdir().unwrap();
    let (q, z, delta) = (0.25, 1.0, 1e-3);
    let budget = RdpAccountant::epsilon_for(q, z, 4, delta) * 1.0001;
    let json = with_report(
        &[
            "simulate",
            "--transport",
            "grpc",
            "--synthetic-users",
            "40",
            "--synthetic-items",
            "30",
            "--rounds",
            "10",
            "--clients-per-round",
            "10",
            "--min-updates",
            "4",
            "--centralized-epochs",
            "1",
            "--secure-aggregation",
            "--dp",
            "distributed",
            "--noise-multiplier",
            "1",
            "--clip",
            "0.5",
            "--sampling-rate",
            "0.25",
            "--delta",
            "0.001",
            "--epsilon-budget",
            &budget.to_string(),
            "--adaptive-clip",
        ],
        dir.path(),
    );
    let p = &json["privacy"];
    assert_eq!(p["mode"], "distributed", "{p}");
    assert_eq!(p["training_rounds"], 4, "{p}");
    assert_eq!(p["sampling_rate"], q);
    assert_eq!(p["noise_multiplier"], z);
    // Adaptive clipping moved the bound from 0.5, by the noisy fraction of
    // updates within it that the devices reported through secure aggregation.
    let clips: Vec<f64> = json["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["privacy"]["clip"].as_f64().unwrap())
        .collect();
    assert_eq!(clips[0], 0.5);
    assert!(clips.windows(2).any(|w| w[0] != w[1]), "{clips:?}");
    assert!(p["within_clip"].as_f64().unwrap().is_finite());
    assert_eq!(p["adaptive_clip"], true);
    assert_eq!(p["delta"], delta);
    let eps = p["epsilon"].as_f64().unwrap();
    let want = RdpAccountant::epsilon_for(q, z, 4, delta);
    assert!(
        (eps - want).abs() < 1e-9 && eps <= budget,
        "{eps} vs {want}"
    );
    assert_eq!(json["secure_aggregation"]["enabled"], true);
}

fn start_clients(addr: &str, data: &std::path::Path, users: &[String]) -> Vec<Child> {
    start_enrolled_clients(addr, data, users, None)
}

/// Client processes for `users`; with `tokens`, the i-th presents
/// `tokens/device-(i+1).token`. Their stderr is piped (a few lines).
fn start_enrolled_clients(
    addr: &str,
    data: &std::path::Path,
    users: &[String],
    tokens: Option<&std::path::Path>,
) -> Vec<Child> {
    users
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let mut command = Command::new(BIN);
            command
                .args(["client", "--factors", "8", "--coordinator"])
                .arg(format!("http://{addr}"))
                .args(["--user", user, "--data"])
                .arg(data);
            if let Some(dir) = tokens {
                command
                    .arg("--token-file")
                    .arg(dir.join(format!("device-{}.token", i + 1)));
            }
            command
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// A plain HTTP/1.1 GET, answered within the test timeout.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

/// A coordinator killed with SIGKILL in the middle of training resumes from
/// its checkpoint: no completed round is lost or applied twice, and the same
/// device processes (enrolled by token) reconnect and carry the training to
/// its end. They reach the coordinator through a forwarder standing in for
/// its stable address, since the restarted process listens on a new port.
#[test]
fn a_coordinator_killed_mid_run_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ds) = gen_data(dir.path());
    let tokens = dir.path().join("tokens");
    let out = wait(
        Command::new(BIN)
            .args(["tokens", "--devices", "3", "--out"])
            .arg(&tokens)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    assert!(out.status.success());
    let digests = tokens.join("enrollment-tokens.sha256");
    let text = std::fs::read_to_string(&digests).unwrap();
    let secret = std::fs::read_to_string(tokens.join("device-1.token")).unwrap();
    assert!(
        !text.contains(secret.trim()),
        "the coordinator's file holds no token"
    );
    let checkpoint = dir.path().join("coordinator.ckpt");
    let items = ds.n_items().to_string();
    let ck = checkpoint.to_str().unwrap();
    let args = [
        "--items",
        &items,
        "--factors",
        "8",
        "--rounds",
        "20",
        "--clients-per-round",
        "3",
        "--min-updates",
        "3",
        "--strategy",
        "fedadam",
        "--checkpoint",
        ck,
        "--enrollment-tokens",
        digests.to_str().unwrap(),
    ];
    let (mut serve, rx, addr, before) = start_serve(&args);
    assert!(
        before.iter().any(|l| l.contains("3 enrollment tokens")),
        "{before:?}"
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(common::Proxy::start(addr.parse().unwrap()));
    let proxy_addr = proxy.addr.to_string();
    let clients = start_enrolled_clients(&proxy_addr, &data, &ds.user_ids[..3], Some(&tokens));
    // A device without a token is refused with UNAUTHENTICATED.
    let intruder = wait(start_clients(&proxy_addr, &data, &ds.user_ids[3..4]).remove(0));
    assert!(!intruder.status.success());
    let said = String::from_utf8_lossy(&intruder.stderr);
    assert!(said.contains("enrollment token"), "{said}");
    expect_line(&rx, "round completed");
    // Every round needs all three devices: with one of them stopped, at
    // most the round it already took part in can still complete, so the
    // coordinator is killed in the middle of training.
    let signal = |sig: &str, child: &Child| {
        let status = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP", &clients[0]);
    // SIGKILL: no chance to clean up.
    let mut first = serve.take();
    first.kill().unwrap();
    let _ = wait(first);
    assert!(checkpoint.exists(), "a checkpoint was written");

    let with_metrics = [&args[..], &["--metrics-listen", "127.0.0.1:0"]].concat();
    let (mut serve, rx, addr, before) = start_serve(&with_metrics);
    let metrics_line = expect_line(&rx, "metrics on http://");
    let metrics_addr = metrics_line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap()
        .to_string();
    let resumed = before
        .iter()
        .find(|l| l.contains("resumed from"))
        .unwrap_or_else(|| panic!("the coordinator says it resumed: {before:?}"));
    // "resumed from PATH: N rounds ended, model version V"
    let numbers: Vec<u64> = resumed
        .rsplit(": ")
        .next()
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let (ended, version) = (numbers[0], numbers[1]);
    assert!((1..20).contains(&ended), "{resumed}");
    assert_eq!(
        version,
        ended + 1,
        "every ended round completed once: {resumed}"
    );
    proxy.redirect(addr.parse().unwrap());
    signal("-CONT", &clients[0]);
    // Every device carries training to its end. "done: … R refused, N
    // interrupted; M reconnects, …": the devices noticed the crash (a task
    // cut short or refused by the new coordinator, or check-ins retried).
    let mut noticed = 0;
    for client in clients {
        let out = wait(client);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        assert!(said.contains("completed 20 training rounds"), "{said}");
        noticed += ["refused", "interrupted", "reconnects"]
            .iter()
            .filter_map(|word| {
                let head = said.split(&format!(" {word}")).next()?;
                head.rsplit(' ').next()?.parse::<u32>().ok()
            })
            .sum::<u32>();
    }
    assert!(noticed >= 1, "no device noticed the crash");
    let finished = expect_line(&rx, "coordinator finished");
    assert!(
        finished.contains("completed 20 training rounds"),
        "{finished}"
    );
    // Prometheus metrics count the rounds from before the crash too.
    let metrics = http_get(&metrics_addr, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("fedrec_rounds_total{outcome=\"completed\"} 20"),
        "{metrics}"
    );
    assert!(metrics.contains("fedrec_model_version 21"), "{metrics}");
    assert!(
        metrics.contains("fedrec_round_duration_seconds_count 21"),
        "{metrics}"
    );
    assert!(http_get(&metrics_addr, "/other").starts_with("HTTP/1.1 404"));
    // SIGTERM, as a service manager sends: a clean stop.
    let serve = serve.take();
    let status = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = wait(serve);
    assert!(out.status.success());
    let rest: Vec<String> = rx.iter().collect();
    assert!(
        rest.iter().any(|l| l
            .contains("stopped after 20 training rounds and 1 evaluation round; model version 21")),
        "20 training rounds and the final evaluation, each once: {rest:?}"
    );
}

/// `fedrec bench round`: its own coordinator process, a few devices, and a
/// last line of JSON whose per-round times add up to the whole.
#[test]
fn bench_round_prints_consistent_json_last() {
    let v = common::process::bench_round(&["--clients", "3", "--dim", "640", "--rounds", "3"]);
    assert_eq!(v["clients"], 3);
    assert_eq!(v["dim"], 640);
    assert_eq!(v["rounds"], 3);
    assert!(v["coordinator_peak_rss_mb"].as_f64().unwrap() > 1.0);
    let each: Vec<f64> = v["sec_per_round_each"]
        .as_array()
        .expect("per-round times")
        .iter()
        .map(|s| s.as_f64().unwrap())
        .collect();
    assert_eq!(each.len(), 3, "{v}");
    assert!(each.iter().all(|s| *s > 0.0), "{v}");
    let mean = v["sec_per_round"].as_f64().unwrap();
    assert!((each.iter().sum::<f64>() / 3.0 - mean).abs() < 1e-9, "{v}");
    let after_first = v["sec_per_round_after_first"].as_f64().unwrap();
    assert!(
        (after_first - (each[1] + each[2]) / 2.0).abs() < 1e-9,
        "{v}"
    );
}

/// The README's population command, as written (from the repository's
/// root): a fleet of phones on the embedded default data, in process.
#[test]
fn the_readme_population_command_runs() {
    let readme = include_str!("../README.md");
    assert!(readme.contains("fedrec simulate --population populations/phones.toml"));
    let out = Command::new(BIN)
        .args(["simulate", "--population", "populations/phones.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("population (discover track, sync mode)") && stdout.contains("thrown away"),
        "{stdout}"
    );
}

/// The README's async `[rounds]` block is a valid configuration.
#[test]
fn the_readme_async_rounds_block_is_valid() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("```toml\n[rounds]\nmode = \"async\"")
        .expect("the README's async block")
        + "```toml\n".len();
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    let cfg = fedrec_coordinator::config::CoordinatorConfig::from_toml_str(block)
        .unwrap_or_else(|e| panic!("{e}\n{block}"));
    assert_eq!(
        cfg.rounds.mode,
        fedrec_coordinator::config::RoundsMode::Async
    );
}

/// `fedrec serve --preset auto`: the coordinator runs its
/// settings search against real device processes, which evaluate every
/// trial on their own validation purchase (counts only), then trains the
/// chosen settings; the devices follow the model's shape from trial to
/// trial. The search's report is saved beside the checkpoint, and a
/// restart takes the chosen settings from it instead of searching again.
#[test]
fn serve_chooses_its_settings_on_the_devices_validation_purchases() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ds) = gen_data(dir.path());
    let config = dir.path().join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[rounds]\nrounds = 3\nclients_per_round = 6\nmin_updates = 4\nseed = 1\n\n\
             [model]\nitems = {}\n\n\
             [search]\nrounds = 4\nfactors = [4, 8]\nconfidence = [2.0]\n\
             regularization = [0.1]\nease = false\n",
            ds.n_items()
        ),
    )
    .unwrap();
    let checkpoint = dir.path().join("coordinator.ckpt");
    // As the README writes it: `fedrec serve --preset auto` (the same as
    // `[model] preset = "auto"` in the file).
    let args = [
        "--preset",
        "auto",
        "--config",
        config.to_str().unwrap(),
        "--checkpoint",
        checkpoint.to_str().unwrap(),
    ];
    let (serve, rx, addr, before) = start_serve(&args);
    assert!(
        before
            .iter()
            .any(|l| l.contains("choosing the settings first, 4 trials")),
        "{before:?}"
    );
    // No --factors: each device takes the coordinator's shape.
    let clients: Vec<Child> = ds
        .user_ids
        .iter()
        .map(|user| {
            Command::new(BIN)
                .args(["client", "--coordinator", &format!("http://{addr}")])
                .args(["--user", user, "--data"])
                .arg(&data)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for trial in 1..=4 {
        let line = expect_line(&rx, &format!("settings search: trial {trial} of 4"));
        // "... (N devices with a validation purchase)"
        let devices: u64 = line
            .rsplit('(')
            .next()
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        assert!(devices >= 4, "the devices evaluated the trial: {line}");
    }
    let done = expect_line(&rx, "settings search done");
    assert!(done.contains("training ALS"), "{done}");
    for client in clients {
        let out = wait(client);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
    }
    expect_line(&rx, "coordinator finished");
    let saved = dir.path().join("coordinator.ckpt.search.json");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    let trials = report["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 4);
    assert!(
        trials
            .iter()
            .all(|t| t["validation"]["users"].as_u64() >= Some(4)),
        "{trials:?}"
    );
    let chosen = &report["chosen"];
    assert_eq!(chosen["model"], "als");
    assert!(
        done.contains(&format!("{} factors", chosen["factors"])),
        "{done}"
    );
    drop(serve);

    // A restart reads the chosen settings instead of searching again.
    let (again, _rx, _addr, before) = start_serve(&args);
    assert!(
        before
            .iter()
            .any(|l| l.contains("settings chosen by the search saved in")),
        "{before:?}"
    );
    assert!(
        before.iter().any(|l| l.contains("resumed from")),
        "{before:?}"
    );
    drop(again);
}

/// `fedrec store-import`: a `serve --checkpoint` file goes into a real
/// PostgreSQL (started for the test) bit for bit; importing it again is
/// harmless; flags that describe another model are refused before the
/// store is touched.
#[test]
fn a_checkpoint_is_imported_into_a_postgres_store() {
    use fedrec_client::model::{MatrixFactorization, Model};
    let Some(pg) = fedrec_store::testing::TestPostgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.ckpt");
    let layout = MatrixFactorization::new(10, 4, 0.1).unwrap().layout();
    let params: Vec<f32> = (0..layout.num_values())
        .map(|i| i as f32 * 0.25 - 3.0)
        .collect();
    fedrec_coordinator::checkpoint::Checkpoint {
        model_version: 3,
        last_round: 2,
        run_start: 0,
        training_rounds: 2,
        final_evaluation_done: false,
        training_stopped: None,
        history: Vec::new(),
        joined: vec!["00112233445566778899aabbccddeeff".to_owned()],
        privacy: None,
        params: params.clone(),
        m: Vec::new(),
        v: Vec::new(),
    }
    .write(&path)
    .unwrap();
    let import = |factors: &str| {
        Command::new(BIN)
            .args(["store-import", "--checkpoint"])
            .arg(&path)
            .args(["--items", "10", "--factors", factors, "--task", "shop"])
            .args(["--store", &pg.url()])
            .output()
            .unwrap()
    };
    let wrong = import("8");
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr);
    assert!(said.contains("holds a model of"), "{said}");
    for _ in 0..2 {
        let out = import("4");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        assert!(said.contains("model version 3"), "{said}");
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let model = runtime.block_on(async {
        let store = fedrec_store::Store::connect(&pg.url()).await.unwrap();
        store.latest("shop").await.unwrap().expect("imported")
    });
    assert_eq!(model.version, 3);
    assert_eq!(
        model.params.iter().map(|p| p.to_bits()).collect::<Vec<_>>(),
        params.iter().map(|p| p.to_bits()).collect::<Vec<_>>()
    );
}

/// `--held-out validation` trains without the test events and scores the
/// validation events (to choose settings); the tuned baselines, which
/// choose on validation, are refused with it.
#[test]
fn simulate_can_score_the_validation_events() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "simulate",
        "--transport",
        "inproc",
        "--synthetic-users",
        "60",
        "--synthetic-items",
        "30",
        "--rounds",
        "2",
        "--clients-per-round",
        "10",
        "--centralized-epochs",
        "1",
        "--held-out",
        "validation",
    ];
    let json = with_report(&args, dir.path());
    assert_eq!(json["config"]["held_out"], "validation");
    let track = &json["final"]["discover"];
    assert!(track["users"].as_u64().unwrap() > 0, "{track}");
    // The same run on the test events measures other events.
    let test = with_report(&args[..args.len() - 2], dir.path());
    assert_eq!(test["config"]["held_out"], "test");
    assert_ne!(
        test["final"]["discover"]["methods"], track["methods"],
        "validation and test figures differ"
    );
    let out = Command::new(BIN)
        .args(args)
        .args(["--baselines", "full"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--held-out validation"), "{err}");
}
