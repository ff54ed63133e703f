//! Transport security: devices over TLS and mutual TLS against a real
//! coordinator on 127.0.0.1, refusals (wrong CA, expired or missing device
//! certificate), and the `fedrec serve` / `fedrec certs` command lines.
//! Every test makes its own certificates with rcgen in memory or in a
//! temporary directory.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use fedrec::certs::{DevCa, Issued, Validity};
use fedrec_client::ClientError;
use fedrec_client::connect::ConnectOptions;
use fedrec_client::participant::Participant;
use fedrec_coordinator::config::TlsConfig;
use fedrec_coordinator::service::ServeOptions;

const BIN: &str = env!("CARGO_BIN_EXE_fedrec");

/// A CA, and a server certificate it signed for localhost and 127.0.0.1.
fn pki() -> (DevCa, Issued) {
    let ca = DevCa::new("test CA", Validity::days(1)).expect("CA");
    let server = ca
        .server(&["localhost".into(), "127.0.0.1".into()], Validity::days(1))
        .expect("server certificate");
    (ca, server)
}

/// Writes the server's files and returns the coordinator's TLS options
/// (mutual TLS when `client_ca` is given), built as `fedrec serve` does.
fn server_options(
    dir: &std::path::Path,
    server: &Issued,
    client_ca: Option<&DevCa>,
) -> ServeOptions {
    let cert = dir.join("server.pem");
    let key = dir.join("server.key");
    std::fs::write(&cert, &server.cert_pem).unwrap();
    std::fs::write(&key, &server.key_pem).unwrap();
    let client_ca = client_ca.map(|ca| {
        let path = dir.join("client-ca.pem");
        std::fs::write(&path, ca.cert_pem()).unwrap();
        path
    });
    let cfg = TlsConfig {
        cert: Some(cert),
        key: Some(key),
        client_ca,
    };
    let tls = fedrec_coordinator::tls::server_tls_config(&cfg)
        .expect("valid TLS files")
        .expect("TLS on");
    ServeOptions::default().with_tls(tls)
}

/// A coordinator of one round of one device (and its final evaluation)
/// with `options`, and that device.
async fn start(options: ServeOptions) -> (common::Running, fedrec_client::device::Device) {
    let (_ds, split) = common::small_split(4, 30, 3);
    let model = common::model(30, 4);
    let mut cfg = fedrec::sim::default_coordinator_config();
    cfg.rounds.rounds = 1;
    cfg.rounds.clients_per_round = 1;
    cfg.training.local_epochs = 1;
    let params = {
        use rand::SeedableRng;
        model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1))
    };
    let running = common::serve_with(cfg, model.layout(), params, options).await;
    let device =
        fedrec::sim::make_device(&model, &split, &split.evaluations[0], 0, 5).expect("device");
    (running, device)
}

fn https(running: &common::Running) -> String {
    format!("https://127.0.0.1:{}", running.addr.port())
}

/// Joins, trains one round and evaluates the final model, then stops.
async fn complete_a_round(
    running: common::Running,
    device: fedrec_client::device::Device,
    options: ConnectOptions,
) {
    let endpoint = https(&running);
    let mut participant = common::within("join", Participant::connect_with(&endpoint, &options))
        .await
        .expect("joins over TLS");
    let (_device, summary) = common::within("participate", participant.run(device))
        .await
        .expect("takes part");
    assert_eq!(summary.trained, 1, "{summary:?}");
    assert_eq!(
        running.handle.progress().history.len(),
        2,
        "a round and the final evaluation"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_completes_a_round_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, server) = pki();
    let (running, device) = start(server_options(dir.path(), &server, None)).await;

    // Plain text to a TLS listener gets nowhere.
    let plain = common::within(
        "plain join",
        Participant::connect(&format!("http://{}", running.addr)),
    )
    .await;
    assert!(plain.is_err(), "plain text is refused by a TLS listener");

    complete_a_round(running, device, ConnectOptions::new().ca_pem(ca.cert_pem())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_completes_a_round_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, server) = pki();
    let (running, device) = start(server_options(dir.path(), &server, Some(&ca))).await;
    let id = ca.device("device-1", Validity::days(1)).unwrap();
    let options = ConnectOptions::new()
        .ca_pem(ca.cert_pem())
        .identity_pem(id.cert_pem, id.key_pem);
    complete_a_round(running, device, options).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, server) = pki();
    let (running, _device) = start(server_options(dir.path(), &server, None)).await;
    let other = DevCa::new("another CA", Validity::days(1)).unwrap();
    let err = common::within(
        "join",
        Participant::connect_with(
            &https(&running),
            &ConnectOptions::new().ca_pem(other.cert_pem()),
        ),
    )
    .await
    .expect_err("a certificate from an untrusted CA is refused");
    let text = err.to_string();
    assert!(matches!(err, ClientError::Connect { .. }), "{text}");
    assert!(
        text.contains("invalid peer certificate") && text.contains("UnknownIssuer"),
        "the error says why: {text}"
    );
    assert_eq!(running.handle.progress().status.joined, 0);
    running.stop().await;
}

/// Under mutual TLS the handshake of TLS 1.3 completes on the device's
/// side before the coordinator checks the device's certificate, so the
/// refusal arrives on the first request (Join): `connect_with` fails there.
/// When the coordinator's TLS alert arrives in time, it names the reason
/// (`alert`).
async fn refused_under_mtls(alert: &str, options: impl FnOnce(&DevCa) -> ConnectOptions) {
    let dir = tempfile::tempdir().unwrap();
    let (ca, server) = pki();
    let (running, _device) = start(server_options(dir.path(), &server, Some(&ca))).await;
    let err = common::within(
        "join",
        Participant::connect_with(&https(&running), &options(&ca)),
    )
    .await
    .expect_err("refused");
    let text = err.to_string();
    assert!(matches!(err, ClientError::TlsRefused { .. }), "{text}");
    assert!(text.contains("mutual TLS"), "{text}");
    // The coordinator's alert names the reason when it reaches the device
    // before the connection closes (not always: it races the close).
    if text.contains("alert") {
        assert!(text.contains(alert), "{text}");
    }
    assert_eq!(running.handle.progress().status.joined, 0, "nobody joined");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_device_certificate_is_refused_under_mutual_tls() {
    refused_under_mtls("CertificateExpired", |ca| {
        let now = SystemTime::now();
        let day = Duration::from_secs(86_400);
        let expired = ca
            .device(
                "device-old",
                Validity {
                    not_before: now - 2 * day,
                    not_after: now - day,
                },
            )
            .unwrap();
        ConnectOptions::new()
            .ca_pem(ca.cert_pem())
            .identity_pem(expired.cert_pem, expired.key_pem)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_a_certificate_is_refused_under_mutual_tls() {
    refused_under_mtls("CertificateRequired", |ca| {
        ConnectOptions::new().ca_pem(ca.cert_pem())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_certificate_from_another_ca_is_refused_under_mutual_tls() {
    refused_under_mtls("UnknownCA", |ca| {
        let other = DevCa::new("another CA", Validity::days(1)).unwrap();
        let id = other.device("intruder", Validity::days(1)).unwrap();
        ConnectOptions::new()
            .ca_pem(ca.cert_pem())
            .identity_pem(id.cert_pem, id.key_pem)
    })
    .await;
}

/// Waits for a child process with the bounded timeout.
fn wait(child: Child) -> std::process::Output {
    common::wait_output(child, common::TIMEOUT)
}

#[test]
fn serve_refuses_a_non_loopback_address_without_tls() {
    let out = Command::new(BIN)
        .args(["serve", "--items", "10", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without TLS") && err.contains("--insecure"),
        "the error names --insecure: {err}"
    );
    // A TLS flag without its partner is refused by the command line itself.
    let out = Command::new(BIN)
        .args(["serve", "--items", "10", "--tls-cert", "server.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
}

#[test]
fn certs_then_serve_and_client_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = Command::new(BIN)
        .args(["certs", "--devices", "1", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains("--client-ca") && printed.contains("https://localhost:50051"),
        "prints the commands: {printed}"
    );
    for f in [
        "ca.pem",
        "server.pem",
        "server.key",
        "device-1.pem",
        "device-1.key",
    ] {
        assert!(certs.join(f).exists(), "{f} written");
    }

    let data = dir.path().join("purchases.tsv");
    let out = Command::new(BIN)
        .args(["gen-data", "--users", "4", "--items", "30", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success());
    let ds = fedrec::data::load(&data, &Default::default()).unwrap();

    let mut serve = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--rounds", "1"])
        .args([
            "--clients-per-round",
            "1",
            "--local-epochs",
            "1",
            "--factors",
            "4",
        ])
        .args(["--items", &ds.n_items().to_string(), "--tls-cert"])
        .arg(certs.join("server.pem"))
        .arg("--tls-key")
        .arg(certs.join("server.key"))
        .arg("--client-ca")
        .arg(certs.join("ca.pem"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = serve.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let listening = rx
        .recv_timeout(common::TIMEOUT)
        .expect("coordinator starts");
    assert!(listening.contains("over mutual TLS"), "{listening}");
    let port = listening
        .strip_prefix("coordinator listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("unexpected first line: {listening}"))
        .port();

    let client = Command::new(BIN)
        .args(["client", "--factors", "4", "--user", &ds.user_ids[0]])
        .args(["--coordinator", &format!("https://localhost:{port}")])
        .arg("--ca")
        .arg(certs.join("ca.pem"))
        .arg("--cert")
        .arg(certs.join("device-1.pem"))
        .arg("--key")
        .arg(certs.join("device-1.key"))
        .arg("--data")
        .arg(&data)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait(client);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "client failed: {err}");
    assert!(err.contains("done: 1 training rounds"), "{err}");

    common::interrupt(serve, common::TIMEOUT);
}
