//! A replicated coordinator as operators run it: `fedrec serve --store`
//! replicas on one PostgreSQL (started by the test on a free port), device
//! processes given every replica's URL, and failures: a replica killed, the
//! leader killed, the store restarted, a replica of another model refused.
//!
//! On a machine without PostgreSQL these tests say so and skip; under
//! `CI=true` they fail instead (see `fedrec_store::testing`).

use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::process::{Killed, gen_data_sized, start_serve};
use fedrec_store::testing::TestPostgres;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_fedrec");
const TIMEOUT: Duration = common::TIMEOUT;

/// One replica: its process, and its name.
struct Replica {
    process: Killed,
    url: String,
}

/// Starts `n` replicas `r1`… of the task in `store` with `config`; their
/// stderr lines arrive tagged with the replica's index on one channel.
fn start_replicas(
    n: usize,
    store: &str,
    config: &std::path::Path,
) -> (Vec<Replica>, mpsc::Receiver<(usize, String)>) {
    let (tx, rx) = mpsc::channel();
    let replicas = (0..n)
        .map(|i| {
            let name = format!("r{}", i + 1);
            let args = [
                "--store",
                store,
                "--replica",
                &name,
                "--config",
                config.to_str().unwrap(),
            ];
            let (process, lines, addr, _) = start_serve(&args);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in lines {
                    if tx.send((i, line)).is_err() {
                        break;
                    }
                }
            });
            Replica {
                process,
                url: format!("http://{addr}"),
            }
        })
        .collect();
    (replicas, rx)
}

/// Waits (bounded) for a line containing `needle` from a replica in
/// `from`; returns that replica's index and the line. Notes the leader on
/// the way.
fn expect_from(
    rx: &mpsc::Receiver<(usize, String)>,
    from: &[usize],
    needle: &str,
    leader: &mut Option<usize>,
) -> (usize, String) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let (i, line) = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line with {needle:?} in time"));
        if line.contains("leading the task") {
            *leader = Some(i);
        }
        if from.contains(&i) && line.contains(needle) {
            return (i, line);
        }
    }
}

/// Device processes for `users`, each given every replica's URL (in a
/// different order, so that they spread over the replicas).
fn start_devices(replicas: &[Replica], data: &std::path::Path, users: &[String]) -> Vec<Child> {
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    start_devices_at(&urls, data, users)
}

/// Device processes for `users`, the i-th given `urls` rotated by i.
fn start_devices_at(urls: &[String], data: &std::path::Path, users: &[String]) -> Vec<Child> {
    users
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let mut urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            let n = urls.len();
            urls.rotate_left(i % n);
            Command::new(BIN)
                .args(["client", "--coordinator", &urls.join(",")])
                .args(["--user", user, "--data"])
                .arg(data)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn config(dir: &std::path::Path, rounds: u32, devices: usize, items: usize) -> std::path::PathBuf {
    config_with(dir, rounds, devices, items, "")
}

/// A coordinator.toml in `dir` for `rounds` rounds of `devices` devices on
/// `items` items, with `extra` appended.
fn config_with(
    dir: &std::path::Path,
    rounds: u32,
    devices: usize,
    items: usize,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join("coordinator.toml");
    std::fs::write(
        &path,
        format!(
            "[rounds]\nrounds = {rounds}\nclients_per_round = {devices}\nmin_updates = 2\n\
             deadline_secs = 6\nseed = 5\n\n[model]\nitems = {items}\nfactors = 8\n{extra}"
        ),
    )
    .unwrap();
    path
}

/// Runs `fedrec serve` on a free port with `args`, which must refuse to
/// start; returns what it said.
fn refused(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The store's account of the run: every round ended once, in order, and
/// the model version is the completed training rounds + 1.
fn check_store(store: &str, rounds: u32) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (history, model) = runtime.block_on(async {
        let store = fedrec_store::Store::connect(store).await.unwrap();
        let history = store.history("fedrec").await.unwrap();
        let model = store.latest("fedrec").await.unwrap().expect("a model");
        (history, model)
    });
    let numbers: Vec<u32> = history.iter().map(|r| r.round).collect();
    assert!(
        numbers.windows(2).all(|w| w[0] + 1 == w[1]),
        "each round ended once, in order: {numbers:?}"
    );
    let completed = history
        .iter()
        .filter(|r| r.completed && r.kind == fedrec_coordinator::round::TaskKind::Train)
        .count() as u64;
    assert!(completed >= 1, "{history:?}");
    assert_eq!(model.version, completed + 1, "{history:?}");
    let trained = history
        .iter()
        .filter(|r| r.kind == fedrec_coordinator::round::TaskKind::Train)
        .count() as u32;
    assert_eq!(trained, rounds, "{history:?}");
    assert!(model.params.iter().all(|v| v.is_finite()));
}

/// Waits for the devices; each must succeed. Returns what each said.
fn wait_devices(devices: Vec<Child>) -> Vec<String> {
    devices
        .into_iter()
        .map(|device| {
            let out = common::wait_output(device, TIMEOUT);
            let said = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "a device failed: {said}");
            said
        })
        .collect()
}

/// The number before `what` in a device's last line ("2 failovers").
fn count(said: &str, what: &str) -> u64 {
    said.split(what)
        .next()
        .and_then(|before| before.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {what:?} in {said:?}"))
}

/// Three replicas train nine devices; a replica that is not the leader is
/// killed (SIGKILL) mid-run, then the leader: the devices move to the
/// remaining replica keeping their sessions, another replica takes the
/// lead, training finishes, and no round is applied twice.
#[test]
fn replicas_survive_the_loss_of_a_replica_and_of_the_leader() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (data, ds) = gen_data_sized(dir.path(), 9, 40);
    let rounds = 12;
    let config = config(dir.path(), rounds, 9, ds.n_items());
    let (mut replicas, rx) = start_replicas(3, &pg.url(), &config);
    let devices = start_devices(&replicas, &data, &ds.user_ids);
    let mut leader = None;
    let all = [0, 1, 2];
    expect_from(&rx, &all, "round 2:", &mut leader);
    let first = leader.expect("a replica leads by the second round");
    let lost = (first + 1) % 3;
    let _ = replicas[lost].process.take().kill();
    let alive: Vec<usize> = all.iter().copied().filter(|i| *i != lost).collect();
    expect_from(&rx, &alive, "round 5:", &mut leader);
    let _ = replicas[first].process.take().kill();
    let last = (first + 2) % 3;
    leader = None;
    expect_from(&rx, &[last], "leading the task", &mut leader);
    expect_from(&rx, &[last], "training finished", &mut leader);
    let said = wait_devices(devices);
    // The lost replicas' devices moved on, and kept their sessions.
    assert!(
        said.iter()
            .any(|s| count(s, " failovers") >= 1 && count(s, " joins again") == 0),
        "{said:?}"
    );
    check_store(&pg.url(), rounds);
}

/// Two replicas ride out a restart of PostgreSQL mid-run (they retry with
/// back-off, and rounds go on after it), and a replica started for a model
/// of another shape, or over another catalogue, is refused with a message
/// saying so.
#[test]
fn replicas_ride_out_a_store_restart_and_refuse_another_model() {
    let Some(mut pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (data, ds) = gen_data_sized(dir.path(), 6, 40);
    let rounds = 8;
    let config = config(dir.path(), rounds, 6, ds.n_items());
    let (replicas, rx) = start_replicas(2, &pg.url(), &config);
    let devices = start_devices(&replicas, &data, &ds.user_ids);
    let mut leader = None;
    expect_from(&rx, &[0, 1], "round 2:", &mut leader);
    pg.stop();
    expect_from(&rx, &[0, 1], "store unavailable", &mut leader);
    pg.restart();
    expect_from(&rx, &[0, 1], "training finished", &mut leader);
    wait_devices(devices);
    check_store(&pg.url(), rounds);

    let config_arg = config.to_str().unwrap();
    let said = refused(&[
        "--factors",
        "16",
        "--store",
        &pg.url(),
        "--config",
        config_arg,
    ]);
    assert!(said.contains("in the store has the model shape"), "{said}");

    // The same shape over other item ids.
    let catalogue = dir.path().join("catalogue.txt");
    let ids: Vec<String> = (101..101 + ds.n_items()).map(|i| i.to_string()).collect();
    std::fs::write(&catalogue, ids.join("\n")).unwrap();
    let catalogue = catalogue.to_str().unwrap();
    let said = refused(&[
        "--catalogue",
        catalogue,
        "--store",
        &pg.url(),
        "--config",
        config_arg,
    ]);
    assert!(said.contains("has another catalogue"), "{said}");
    drop(replicas);
}

/// The HR@10 of the final evaluation round, from its line ("... cohort
/// HR@10 0.556").
fn final_hit_rate(line: &str) -> f64 {
    line.rsplit("HR@10 ")
        .next()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no HR@10 in {line:?}"))
}

/// With the same seed and devices, three replicas train to the quality of
/// one process, in plain and in secure mode (secure aggregation over each
/// replica's sub-cohort).
#[test]
fn three_replicas_reach_the_quality_of_one_process() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (data, ds) = gen_data_sized(dir.path(), 12, 40);
    let rounds = 4;
    let evaluation = format!("round {} (evaluation)", rounds + 1);
    for (task, secure) in [
        ("plain", ""),
        ("secure", "\n[secure_aggregation]\nenabled = true\n"),
    ] {
        let extra = format!("{secure}\n[cluster]\ntask = \"{task}\"\n");
        let config = config_with(dir.path(), rounds, 12, ds.n_items(), &extra);

        let (single, rx, addr, _) = start_serve(&["--config", config.to_str().unwrap()]);
        let devices = start_devices_at(&[format!("http://{addr}")], &data, &ds.user_ids);
        let alone = final_hit_rate(&common::process::expect_line(&rx, &evaluation));
        wait_devices(devices);
        drop(single);

        let (replicas, rx) = start_replicas(3, &pg.url(), &config);
        let devices = start_devices(&replicas, &data, &ds.user_ids);
        let (_, line) = expect_from(&rx, &[0, 1, 2], &evaluation, &mut None);
        let together = final_hit_rate(&line);
        wait_devices(devices);
        drop(replicas);
        assert!(
            (together - alone).abs() <= 0.05 * alone,
            "{task}: three replicas HR@10 {together}, one process {alone}"
        );
    }
}

/// Three replicas train under differential privacy, central (with
/// adaptive clipping) and distributed (over secure sub-cohorts): every
/// waiting device is sampled with q wherever it waits, every training
/// round is counted once, and the ε the store states is the accountant's
/// for the rounds run, as one coordinator would state it.
#[test]
fn replicas_train_under_differential_privacy() {
    use fedrec_coordinator::privacy::RdpAccountant;

    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (data, ds) = gen_data_sized(dir.path(), 12, 40);
    let (rounds, z, delta) = (3, 0.5, 1e-3);
    let evaluation = format!("round {} (evaluation)", rounds + 1);
    for (task, q, extra) in [
        ("central", 0.9, "mode = \"central\"\nadaptive_clip = true\n"),
        (
            "distributed",
            1.0,
            "mode = \"distributed\"\n\n[secure_aggregation]\nenabled = true\n",
        ),
    ] {
        let extra = format!(
            "\n[strategy]\nweighting = \"uniform\"\n\n[cluster]\ntask = \"{task}\"\n\n\
             [privacy]\nnoise_multiplier = {z}\nclip = 1.0\nsampling_rate = {q}\n\
             delta = {delta}\n{extra}"
        );
        let config = config_with(dir.path(), rounds, 12, ds.n_items(), &extra);
        let (replicas, rx) = start_replicas(3, &pg.url(), &config);
        let devices = start_devices(&replicas, &data, &ds.user_ids);
        expect_from(&rx, &[0, 1, 2], &evaluation, &mut None);
        wait_devices(devices);
        drop(replicas);

        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (history, state) = runtime.block_on(async {
            let store = fedrec_store::Store::connect(&pg.url()).await.unwrap();
            let history = store.history(task).await.unwrap();
            (history, store.privacy(task).await.unwrap())
        });
        let state = state.expect("the accountant's state is in the store");
        let stated = RdpAccountant::from(state.ledger).epsilon(delta);
        let want = RdpAccountant::epsilon_for(q, z, u64::from(rounds), delta);
        assert!(
            (stated - want).abs() < 1e-9,
            "{task}: ε {stated}, want {want}"
        );
        let trained: Vec<_> = history
            .iter()
            .filter(|r| r.kind == fedrec_coordinator::round::TaskKind::Train)
            .collect();
        assert_eq!(trained.len(), rounds as usize, "{task}: {history:?}");
        assert!(trained.iter().any(|r| r.completed), "{task}: {history:?}");
        for (i, round) in trained.iter().enumerate() {
            let p = round.privacy.as_ref().expect("a DP round's summary");
            let after = RdpAccountant::epsilon_for(q, z, i as u64 + 1, delta);
            assert!((p.epsilon - after).abs() < 1e-9, "{task}: {p:?}");
            assert_eq!(p.sampling_rate, q);
            // q × the devices waiting anywhere when the round was planned.
            assert!(
                p.expected_cohort > 0.0 && p.expected_cohort <= q * 12.0,
                "{task}: {p:?}"
            );
        }
        if task == "central" {
            assert!(
                trained
                    .iter()
                    .all(|r| r.privacy.as_ref().is_some_and(|p| p.within_clip.is_some())),
                "adaptive clipping counted the shares: {history:?}"
            );
        }
    }
    // A replica without differential privacy cannot join a task trained
    // under it: the stated ε would no longer hold.
    let plain = config_with(
        dir.path(),
        rounds,
        12,
        ds.n_items(),
        "\n[cluster]\ntask = \"central\"\n",
    );
    let said = refused(&["--store", &pg.url(), "--config", plain.to_str().unwrap()]);
    assert!(said.contains("under differential privacy"), "{said}");
}

/// Under enrollment tokens, `auth.max_sessions_per_token` holds across
/// replicas: a join with a token at one replica ends the token's older
/// session held at another, which is told `session_replaced` there; the
/// newer session is served at either replica.
#[test]
fn a_token_session_limit_holds_across_replicas() {
    use fedrec_proto::pb::{self, coordinator_client::CoordinatorClient};

    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.sha256");
    let digest = fedrec_coordinator::auth::digest("device-secret");
    std::fs::write(&tokens, format!("{digest}\n")).unwrap();
    let extra = format!(
        "\n[auth]\nenrollment_tokens = {:?}\nmax_sessions_per_token = 1\n\
         session_ttl_secs = 600\n\n[server]\nlong_poll_secs = 1\n\n\
         [cluster]\ntask = \"tokens\"\n",
        tokens.to_str().unwrap()
    );
    let config = config_with(dir.path(), 1, 4, 20, &extra);
    let (replicas, _lines) = start_replicas(2, &pg.url(), &config);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let refused = runtime.block_on(async {
        let mut r1 = CoordinatorClient::connect(replicas[0].url.clone())
            .await
            .unwrap();
        let mut r2 = CoordinatorClient::connect(replicas[1].url.clone())
            .await
            .unwrap();
        let join = pb::JoinRequest {
            protocol_version: fedrec_proto::PROTOCOL_VERSION,
            enrollment_token: "device-secret".to_owned(),
        };
        let first = r1.join(join.clone()).await.unwrap().into_inner().pseudonym;
        let second = r2.join(join).await.unwrap().into_inner().pseudonym;
        let check_in = |pseudonym: &str| pb::CheckInRequest {
            pseudonym: pseudonym.to_owned(),
        };
        r1.check_in(check_in(&second))
            .await
            .expect("the newer session is served at the other replica");
        tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Err(status) = r1.check_in(check_in(&first)).await {
                    break status;
                }
            }
        })
        .await
        .expect("the older session is ended at its replica in time")
    });
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("replaced by a newer join"),
        "{refused:?}"
    );
    drop(replicas);
}

/// `fedrec bench round --store URL --replicas 2`: replicas on the test's
/// PostgreSQL, devices spread over them, the same JSON as one process's.
#[test]
fn bench_round_runs_on_replicas() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let url = pg.url();
    let v = common::process::bench_round(&[
        "--clients",
        "4",
        "--dim",
        "640",
        "--rounds",
        "2",
        "--store",
        &url,
        "--replicas",
        "2",
    ]);
    assert_eq!(v["clients"], 4, "{v}");
    let each = v["sec_per_round_each"].as_array().expect("per-round times");
    assert_eq!(each.len(), 2, "{v}");
    assert!(each.iter().all(|s| s.as_f64().unwrap() > 0.0), "{v}");
}

/// A store URL with `sslmode=require` reaches PostgreSQL over TLS, the
/// server's certificate verified against `sslrootcert`, and replicas train
/// on it; a certificate another CA signed is refused with a message.
#[test]
fn replicas_reach_their_store_over_tls() {
    use fedrec::certs::{DevCa, Validity};
    use fedrec_store::Store;

    let Some(mut pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("fedrec test store CA", Validity::days(1)).unwrap();
    let names = ["127.0.0.1".to_owned(), "localhost".to_owned()];
    let server = ca.server(&names, Validity::days(1)).unwrap();
    pg.enable_tls(&server.cert_pem, &server.key_pem);
    let with_root = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        format!(
            "{}?sslmode=require&sslrootcert={}",
            pg.url(),
            path.display()
        )
    };
    let url = with_root("store-ca.pem", ca.cert_pem());
    let other = DevCa::new("another CA", Validity::days(1)).unwrap();
    let untrusted = with_root("other-ca.pem", other.cert_pem());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = Store::connect(&url).await.unwrap();
        assert!(store.encrypted().await.unwrap());
        assert!(store.target().ends_with("over TLS"), "{}", store.target());
        let plain = Store::connect(&pg.url()).await.unwrap();
        assert!(!plain.encrypted().await.unwrap());
        let err = Store::connect(&untrusted).await.unwrap_err().to_string();
        assert!(err.contains("certificate"), "{err}");
    });

    let (data, ds) = gen_data_sized(dir.path(), 4, 40);
    let config = config(dir.path(), 1, 4, ds.n_items());
    let (replicas, rx) = start_replicas(2, &url, &config);
    let devices = start_devices(&replicas, &data, &ds.user_ids);
    expect_from(&rx, &[0, 1], "training finished", &mut None);
    wait_devices(devices);
    drop(replicas);
    check_store(&url, 1);
}
