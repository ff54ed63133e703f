//! The coordinator's connections under abuse (issue 19, item 5): idle
//! connections and silent TLS handshakes are closed, the number of open
//! connections is capped and refusals counted, and at the file-descriptor
//! limit the accept loop backs off and recovers. Every wait is bounded.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use fedrec_coordinator::{CoordinatorConfig, ServeOptions};
use fedrec_proto::pb::{self, check_in_response::Outcome};
use fedrec_proto::{Layout, PROTOCOL_VERSION};

fn config() -> CoordinatorConfig {
    let mut config = CoordinatorConfig::default();
    config.rounds.rounds = 0;
    config.rounds.clients_per_round = 5;
    config.rounds.evaluate = false;
    config.rounds.final_evaluation = false;
    config
}

fn layout() -> Layout {
    Layout::new(vec![("b".into(), vec![1])])
}

fn join_request() -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        ..Default::default()
    }
}

/// Reads from `stream` until the coordinator closes it (end of file or a
/// reset), failing the test if that takes longer than the common timeout.
async fn closed_by_peer(mut stream: TcpStream) {
    let mut buf = [0u8; 1024];
    common::within("the coordinator closes the connection", async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// A connection that sends nothing is closed after `server.idle_timeout_secs`;
/// a long poll longer than the idle timeout keeps its connection (a request
/// in flight is not idle), and the client's next request after its
/// connection was closed for idleness succeeds on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_not_during_a_long_poll() {
    let mut cfg = config();
    cfg.server.idle_timeout_secs = 0.5;
    cfg.server.long_poll_secs = 1.5;
    let running = common::serve(cfg, layout(), vec![0.0]).await;

    let silent = TcpStream::connect(running.addr).await.unwrap();
    closed_by_peer(silent).await;

    let mut client = running.client().await;
    let pseudonym = client
        .join(join_request())
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    // Five devices are wanted, one waits: the long poll (1.5 s, three idle
    // timeouts) ends with Wait, on a connection that stayed open.
    let outcome = common::within(
        "long poll",
        client.check_in(pb::CheckInRequest {
            pseudonym: pseudonym.clone(),
        }),
    )
    .await
    .expect("a long poll outlives the idle timeout")
    .into_inner()
    .outcome;
    assert!(matches!(outcome, Some(Outcome::Wait(_))), "{outcome:?}");
    // Idle again: the connection is closed; tonic reconnects on the next
    // call (a closed connection may fail one call while it notices).
    let mut joined = false;
    for _ in 0..3 {
        if common::within("join", client.join(join_request()))
            .await
            .is_ok()
        {
            joined = true;
            break;
        }
    }
    assert!(joined, "the client reconnects after an idle close");
    running.stop().await;
}

/// Beyond `server.max_connections` a connection is closed at once and
/// counted as `connection_limit`; when connections close, their slots are
/// free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_and_counted() {
    let mut cfg = config();
    cfg.server.max_connections = 2;
    let running = common::serve(cfg, layout(), vec![0.0]).await;
    let first = TcpStream::connect(running.addr).await.unwrap();
    let second = TcpStream::connect(running.addr).await.unwrap();
    let third = TcpStream::connect(running.addr).await.unwrap();
    closed_by_peer(third).await;
    let metrics = running.handle.metrics().unwrap();
    assert!(
        metrics.contains("fedrec_requests_rejected_total{reason=\"connection_limit\"} 1"),
        "{metrics}"
    );
    // Closing both: once the coordinator has closed its ends too, their
    // slots are free (a connection gives its slot back before its socket).
    for mut open in [first, second] {
        open.shutdown().await.unwrap();
        closed_by_peer(open).await;
    }
    let mut client = running.client().await;
    common::within("join", client.join(join_request()))
        .await
        .expect("closed connections free their slots");
    running.stop().await;
}

/// Over TLS, a client that connects and never starts its handshake is
/// dropped after `server.tls_handshake_secs`, long before the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_handshake_is_dropped() {
    use fedrec::certs::{DevCa, Validity};
    use fedrec_coordinator::config::TlsConfig;
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("test CA", Validity::days(1)).unwrap();
    let server = ca.server(&["127.0.0.1".into()], Validity::days(1)).unwrap();
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&cert, &server.cert_pem).unwrap();
    std::fs::write(&key, &server.key_pem).unwrap();
    let tls = fedrec_coordinator::tls::server_tls_config(&TlsConfig {
        cert: Some(cert),
        key: Some(key),
        client_ca: None,
    })
    .unwrap()
    .unwrap();
    let mut cfg = config();
    cfg.server.tls_handshake_secs = 0.5;
    let running = common::serve_with(
        cfg,
        layout(),
        vec![0.0],
        ServeOptions::default().with_tls(tls),
    )
    .await;
    let silent = TcpStream::connect(running.addr).await.unwrap();
    closed_by_peer(silent).await;
    running.stop().await;
}

/// `fedrec serve` with a file-descriptor limit of 64, flooded with more
/// connections than it can open: the accept loop backs off (its pause
/// doubles, as its log says) instead of spinning, and once the flood ends
/// a device joins.
#[test]
fn at_the_file_descriptor_limit_the_accept_loop_backs_off_and_recovers() {
    let mut serve = Command::new("sh")
        .args([
            "-c",
            "ulimit -n 64 && exec \"$0\" serve --items 10 --listen 127.0.0.1:0",
            env!("CARGO_BIN_EXE_fedrec"),
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::stderr_lines(&mut serve);
    let next = |what: &str| {
        lines
            .recv_timeout(common::TIMEOUT)
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    };
    let addr: std::net::SocketAddr = loop {
        let line = next("the coordinator to listen");
        if let Some(rest) = line.split("coordinator listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut flood = Vec::new();
        for _ in 0..100 {
            flood.push(TcpStream::connect(addr).await.unwrap());
        }
        // The pause starts at 10 ms and doubles: 80 ms means three
        // failed attempts in a row each waited.
        loop {
            let line = next("the accept loop to back off");
            if line.contains("backing off") && line.contains("pause_ms=80") {
                break;
            }
        }
        drop(flood);
        let mut joined = false;
        for _ in 0..100 {
            let attempt = async {
                let mut client = fedrec_proto::pb::coordinator_client::CoordinatorClient::connect(
                    format!("http://{addr}"),
                )
                .await
                .ok()?;
                client.join(join_request()).await.ok()
            };
            if common::within("join", attempt).await.is_some() {
                joined = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            joined,
            "the coordinator accepts again once descriptors are free"
        );
    });
    let _ = serve.kill();
    let _ = serve.wait();
}
