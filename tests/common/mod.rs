//! Fixtures shared by the integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedrec::data::{Protocol, SyntheticConfig, synthetic};
use fedrec_client::model::{MatrixFactorization, Model};
use fedrec_coordinator::config::CoordinatorConfig;
use fedrec_coordinator::service::{CoordinatorService, ServeOptions, ServiceHandle};
use fedrec_proto::Layout;
use fedrec_proto::pb::coordinator_client::CoordinatorClient;
use rand::SeedableRng;
use tonic::transport::Channel;

pub mod process;

/// Upper bound for anything a test awaits.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Awaits `future`, failing the test with `what` if it takes longer than [`TIMEOUT`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(TIMEOUT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A small synthetic data set with planted taste clusters, and its split.
pub fn small_split(users: usize, items: usize, seed: u64) -> (fedrec::data::Dataset, Protocol) {
    let ds = synthetic(&SyntheticConfig {
        users,
        items,
        seed,
        ..SyntheticConfig::default()
    })
    .expect("valid synthetic config");
    let protocol = Protocol::new(&ds);
    (ds, protocol)
}

/// The devices of `protocol`'s first track (discover) at test time.
pub fn devices(
    model: &Arc<dyn Model>,
    protocol: &Protocol,
    seed: u64,
) -> Vec<(usize, fedrec_client::device::Device)> {
    let ev = protocol.evaluations.first().expect("a reported track");
    fedrec::sim::make_devices(model, protocol, ev, seed).expect("devices")
}

/// A matrix-factorization model over `items` items.
pub fn model(items: usize, factors: usize) -> Arc<dyn Model> {
    Arc::new(MatrixFactorization::new(items, factors, 0.1).expect("valid model"))
}

/// A coordinator serving `cfg` on 127.0.0.1 (port 0).
pub struct Running {
    pub addr: SocketAddr,
    pub handle: ServiceHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), fedrec_coordinator::CoordinatorError>>,
}

impl Running {
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A raw protocol client connected to the coordinator.
    pub async fn client(&self) -> CoordinatorClient<Channel> {
        within("connect", CoordinatorClient::connect(self.endpoint()))
            .await
            .expect("connect")
    }

    /// Stops the server at once, without a chance to finish anything (as a
    /// crash would, for a coordinator behind a [`Proxy`]).
    pub fn crash(self) {
        self.task.abort();
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        within("shutdown", self.task)
            .await
            .expect("server task")
            .expect("server ran cleanly");
    }
}

/// Starts a coordinator for `model` (initialised from `seed`) with `cfg`.
pub async fn start(cfg: CoordinatorConfig, model: &Arc<dyn Model>, seed: u64) -> Running {
    let params = model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    serve(cfg, model.layout(), params).await
}

/// Serves a coordinator with `cfg` and the given parameters on 127.0.0.1 (port 0).
pub async fn serve(cfg: CoordinatorConfig, layout: Layout, params: Vec<f32>) -> Running {
    serve_with(cfg, layout, params, ServeOptions::default()).await
}

/// [`serve`] with the adapter's options (TLS, chunk size, checkpoint).
pub async fn serve_with(
    cfg: CoordinatorConfig,
    layout: Layout,
    params: Vec<f32>,
    options: ServeOptions,
) -> Running {
    let cfg = cfg.validated().expect("a valid configuration");
    let start = fedrec_coordinator::bootstrap::prepare(cfg, layout, params, None, options)
        .expect("valid coordinator");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let service = CoordinatorService::new(start.core, start.options);
    let handle = service.handle();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(service.serve(listener, async {
        let _ = rx.await;
    }));
    Running {
        addr,
        handle,
        stop: Some(tx),
        task,
    }
}

/// A channel to `running`.
pub async fn channel(running: &Running) -> Channel {
    within(
        "connect",
        fedrec_proto::endpoint(running.endpoint())
            .expect("endpoint")
            .connect(),
    )
    .await
    .expect("connect")
}

/// A TCP forwarder on 127.0.0.1:0 standing in for a coordinator's stable
/// address: devices connect to it, and it forwards each connection to the
/// current backend. [`redirect`](Self::redirect) points it at a restarted
/// coordinator (which listens on a new port 0) and cuts every open
/// connection, as a crash would.
pub struct Proxy {
    pub addr: SocketAddr,
    backend: Arc<std::sync::Mutex<SocketAddr>>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(backend: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let backend = Arc::new(std::sync::Mutex::new(backend));
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (to, open) = (Arc::clone(&backend), Arc::clone(&connections));
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = *to.lock().unwrap();
                open.lock().unwrap().push(tokio::spawn(async move {
                    // A refused backend (down) drops the device's connection.
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                }));
            }
        });
        Self {
            addr,
            backend,
            connections,
            accept,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Forwards new connections to `backend`; cuts the open ones.
    pub fn redirect(&self, backend: SocketAddr) {
        *self.backend.lock().unwrap() = backend;
        self.cut();
    }

    fn cut(&self) {
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Reads a child process's stderr line by line on a thread.
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a child process without sleeping: a thread waits, and its
/// result is received with a bounded timeout.
pub fn wait_output(child: std::process::Child, timeout: Duration) -> std::process::Output {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(timeout)
        .expect("process ends in time")
        .expect("process output")
}

/// Ctrl-C for a child process (SIGINT): waits for it with a bounded timeout
/// and checks that it stopped cleanly.
pub fn interrupt(child: std::process::Child, timeout: Duration) -> std::process::Output {
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let out = wait_output(child, timeout);
    assert!(out.status.success(), "coordinator exit: {:?}", out.status);
    out
}
