//! Fixtures of the bindings' tests: the built library and the bindings
//! generated from it, as `scripts/bindings.sh` generates them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The shared library cargo built for these tests (`libfedrec_ffi.so`),
/// found next to the test binary (`target/<profile>/deps/`) or one level up.
pub fn library() -> PathBuf {
    let name = format!(
        "{}fedrec_ffi{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps directory");
    [deps, deps.parent().expect("profile directory")]
        .iter()
        .map(|dir| dir.join(&name))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{name} not found next to {}", exe.display()))
}

/// Generates the bindings for `languages` into `out` from [`library`].
pub fn generate(languages: &[uniffi::TargetLanguage], out: &Path) {
    let utf8 = |p: &Path| p.to_str().expect("UTF-8 path").to_owned().into();
    uniffi::generate(uniffi::GenerateOptions {
        languages: languages.to_vec(),
        source: utf8(&library()),
        out_dir: utf8(out),
        config_override: None,
        format: false,
        crate_filter: None,
        metadata_no_deps: true,
    })
    .expect("bindings generated");
}

/// The generated Python module with a copy of the library beside it, in
/// `dir/python`.
pub fn python_module(dir: &Path) -> PathBuf {
    let module = dir.join("python");
    generate(&[uniffi::TargetLanguage::Python], &module);
    std::fs::copy(
        library(),
        module.join(library().file_name().expect("file name")),
    )
    .expect("library beside the module");
    module
}

/// Items in the test coordinators' catalogue (numbered "1" to `ITEMS`).
pub const ITEMS: usize = 60;
/// Factors of their model.
pub const FACTORS: usize = 8;

/// A coordinator served on 127.0.0.1, port 0, from a runtime of its own.
pub struct Coordinator {
    /// `http://127.0.0.1:PORT`, or `https://` when serving TLS.
    pub endpoint: String,
    runtime: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), fedrec_coordinator::CoordinatorError>>>,
}

/// A CA and a server certificate for 127.0.0.1 it signed (PEM), and a CA
/// that signed nothing the coordinator holds (a wrong CA for the device).
pub struct Pki {
    /// The coordinator's certificate and key files.
    pub cert: PathBuf,
    /// The coordinator's key file.
    pub key: PathBuf,
    /// A CA that did not sign the coordinator's certificate.
    pub other_ca_pem: String,
}

impl Pki {
    /// Writes the coordinator's files into `dir`; the certificates are made
    /// with rcgen, as the workspace's TLS tests make theirs.
    pub fn new(dir: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            let key = KeyPair::generate().expect("CA key");
            let cert = params.self_signed(&key).expect("CA certificate");
            (Issuer::new(params, key), cert.pem())
        };
        let (issuer, _ca_pem) = ca("test CA");
        let (_other, other_ca_pem) = ca("another CA");
        let params = CertificateParams::new(vec!["127.0.0.1".into()]).expect("server params");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &issuer).expect("server certificate");
        let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        Self {
            cert: cert_path,
            key: key_path,
            other_ca_pem,
        }
    }
}

impl Coordinator {
    /// A coordinator of `rounds` rounds, each of one device, over TLS with
    /// `pki`'s certificate when given. It announces a numbered catalogue
    /// of [`ITEMS`] items and a model of [`ITEMS`] × [`FACTORS`].
    pub fn start(rounds: u32, pki: Option<&Pki>) -> Self {
        Self::start_with_deadline(rounds, pki, 60.0)
    }

    /// [`start`](Self::start) with rounds that end `deadline_secs` after
    /// they start: a test that kills devices mid-round sets it short, so
    /// that the round of a dead device is abandoned and the next selects a
    /// live one.
    pub fn start_with_deadline(rounds: u32, pki: Option<&Pki>, deadline_secs: f64) -> Self {
        use fedrec_client::model::{MatrixFactorization, Model};
        use rand::SeedableRng;
        let model = MatrixFactorization::new(ITEMS, FACTORS, 0.1).expect("valid model");
        let mut cfg = fedrec_coordinator::CoordinatorConfig::default();
        cfg.rounds.rounds = rounds;
        cfg.rounds.clients_per_round = 1;
        cfg.rounds.min_updates = 1;
        cfg.rounds.over_selection = 1.0;
        cfg.rounds.final_evaluation = false;
        cfg.rounds.deadline_secs = deadline_secs;
        cfg.rounds.checkin_window_secs = 60.0;
        cfg.rounds.seed = Some(1);
        let mut options = fedrec_coordinator::ServeOptions::default()
            .with_catalogue(&fedrec_proto::catalogue::Catalogue::numbered(ITEMS));
        let scheme = match pki {
            Some(pki) => {
                let tls = fedrec_coordinator::tls::server_tls_config(
                    &fedrec_coordinator::config::TlsConfig {
                        cert: Some(pki.cert.clone()),
                        key: Some(pki.key.clone()),
                        client_ca: None,
                    },
                )
                .expect("valid TLS files")
                .expect("TLS on");
                options = options.with_tls(tls);
                "https"
            }
            None => "http",
        };
        let params = model.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
        let cfg = cfg.validated().expect("a valid configuration");
        let start =
            fedrec_coordinator::bootstrap::prepare(cfg, model.layout(), params, None, options)
                .expect("valid coordinator");
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let endpoint = format!("{scheme}://{}", listener.local_addr().expect("address"));
        let service = fedrec_coordinator::CoordinatorService::new(start.core, start.options);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = runtime.spawn(service.serve(listener, async {
            let _ = stopped.await;
        }));
        Self {
            endpoint,
            runtime,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// Stops the coordinator and asserts it ran cleanly.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let server = self.server.take().expect("a running server");
        self.runtime
            .block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(30), server).await
            })
            .expect("coordinator stops in time")
            .expect("server task")
            .expect("server ran cleanly");
    }
}

/// Plays an app's shop story: `app` (the program, with its own arguments)
/// runs against a plain coordinator of `rounds` rounds and a TLS one, with
/// the endpoints, the other CA, a stores directory under `dir` and the
/// catalogue's size in its environment, and must print `story: ok`.
pub fn play_story(dir: &Path, rounds: u32, name: &str, mut app: std::process::Command) {
    let stores = dir.join("stores");
    std::fs::create_dir(&stores).expect("stores directory");
    let pki = Pki::new(dir);
    let coordinator = Coordinator::start(rounds, None);
    let tls = Coordinator::start(1, Some(&pki));
    let output = app
        .env("FEDREC_ENDPOINT", &coordinator.endpoint)
        .env("FEDREC_TLS_ENDPOINT", &tls.endpoint)
        .env("FEDREC_OTHER_CA", &pki.other_ca_pem)
        .env("FEDREC_DIR", &stores)
        .env("FEDREC_ITEMS", ITEMS.to_string())
        .output()
        .unwrap_or_else(|e| panic!("{name} runs: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("story: ok"),
        "{name} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    coordinator.stop();
    tls.stop();
}
