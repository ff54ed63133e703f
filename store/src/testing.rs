//! A throwaway PostgreSQL server for tests (feature `testing`).
//!
//! [`TestPostgres::start`] finds the server's binaries (`$FEDREC_PG_BINDIR`,
//! else `pg_config --bindir`), runs `initdb` on a fresh temporary directory,
//! starts the server with `pg_ctl -w` (which polls until it accepts
//! connections, bounded by [`START_TIMEOUT`]) on a free port of 127.0.0.1
//! with its unix socket inside the directory, and creates the database
//! [`DATABASE`]. Dropping it stops the server and removes the directory, so
//! tests in parallel each have their own.
//!
//! `initdb` refuses to run as root: as root, the directory is given to the
//! `postgres` user and the server's commands run as that user (`runuser`).
//! Authentication is `trust` on the socket and on 127.0.0.1 (the server
//! listens nowhere else), except for the role [`PASSWORD_ROLE`], which must
//! give its password, so that tests can see a login refused.
//!
//! Without PostgreSQL, [`TestPostgres::start_or_skip`] says so on stderr
//! and skips the test (so that `cargo test --workspace` passes on a machine
//! with only the Rust toolchain), except under `CI=true`, where it fails
//! saying to run `scripts/setup.sh`; [`TestPostgres::start`] always fails.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// The database [`TestPostgres::start`] creates.
pub const DATABASE: &str = "fedrec";

/// The role that logs in with a password over TCP (scram-sha-256); every
/// other role is trusted.
pub const PASSWORD_ROLE: &str = "fedrec_password";

/// Seconds `pg_ctl` waits for the server to start or stop.
pub const START_TIMEOUT: u32 = 60;

const SETUP_HINT: &str = "PostgreSQL is needed for the store's tests: run scripts/setup.sh";

/// A PostgreSQL server of its own in a temporary directory; stopped and
/// removed on drop.
#[derive(Debug)]
pub struct TestPostgres {
    dir: TempDir,
    bindir: PathBuf,
    port: u16,
    /// Running the server's commands as `postgres` (we are root).
    as_postgres: bool,
    running: bool,
}

impl TestPostgres {
    /// [`start`](Self::start), or `None` on a machine without PostgreSQL,
    /// having said so loudly on stderr (the caller returns: the test is
    /// skipped). Under `CI=true` a missing PostgreSQL fails instead.
    pub fn start_or_skip() -> Option<Self> {
        if !installed() && std::env::var("CI").as_deref() != Ok("true") {
            let test = std::thread::current().name().unwrap_or("a test").to_owned();
            eprintln!(
                "SKIPPED {test}: PostgreSQL is not installed here ({SETUP_HINT}; under CI=true \
                 this fails)"
            );
            return None;
        }
        Some(Self::start())
    }

    /// Creates and starts a server; see the module docs.
    ///
    /// # Panics
    ///
    /// When PostgreSQL is not installed (the message says to run
    /// `scripts/setup.sh`) or the server cannot be set up, with its log.
    pub fn start() -> Self {
        let bindir = bindir();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("fedrec-pg-")
            .tempdir()
            .expect("cannot create a temporary directory");
        if as_postgres {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .expect("cannot run chown");
            assert!(status.success(), "cannot give {:?} to postgres", dir.path());
        }
        let mut pg = Self {
            dir,
            bindir,
            port: 0,
            as_postgres,
            running: false,
        };
        let data = pg.data();
        pg.server_command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync"])
            .args(["-E", "UTF8", "--locale=C"])
            .run(&pg, "initdb");
        let mut conf = OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("initdb wrote postgresql.conf");
        write!(
            conf,
            "\n# fedrec_store::testing\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nfsync = off\nshared_buffers = 16MB\n\
             max_connections = 40\n",
            pg.dir.path().display()
        )
        .expect("cannot write postgresql.conf");
        fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\nhost all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n\
                 host all all 127.0.0.1/32 trust\n"
            ),
        )
        .expect("cannot write pg_hba.conf");

        // A port the OS says is free; another process may take it before
        // the server binds it, so try a few.
        for attempt in 1..=5 {
            pg.port = free_port();
            match pg.try_start() {
                Ok(()) => break,
                Err(e) if attempt == 5 => panic!("{e}"),
                Err(_) => continue,
            }
        }
        Command::new(pg.bindir.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg(DATABASE)
            .run(&pg, "createdb");
        pg
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for [`DATABASE`] as the superuser `postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", self.port)
    }

    /// Serves TLS too, with this certificate chain and key (PEM), and
    /// restarts; plain connections stay allowed.
    pub fn enable_tls(&mut self, cert_pem: &str, key_pem: &str) {
        let data = self.data();
        for (file, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(file);
            fs::write(&path, pem).expect("cannot write the server's TLS files");
            // PostgreSQL refuses a key others can read.
            fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("cannot restrict the key's permissions");
            if self.as_postgres {
                let status = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&path)
                    .status()
                    .expect("cannot run chown");
                assert!(status.success(), "cannot give {path:?} to postgres");
            }
        }
        let mut conf = OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("postgresql.conf");
        writeln!(
            conf,
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'"
        )
        .expect("cannot write postgresql.conf");
        self.stop();
        self.restart();
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`); the data stays.
    pub fn stop(&mut self) {
        self.pg_ctl(&["-m", "fast", "stop"])
            .expect("cannot stop PostgreSQL");
        self.running = false;
    }

    /// Starts the stopped server again on the same port.
    pub fn restart(&mut self) {
        self.try_start().unwrap_or_else(|e| panic!("{e}"));
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn try_start(&mut self) -> Result<(), String> {
        let port = format!("-p {}", self.port);
        self.pg_ctl(&["-o", &port, "start"])?;
        self.running = true;
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let log = self.dir.path().join("server.log");
        self.server_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(log)
            .args(["-w", "-t", &START_TIMEOUT.to_string()])
            .args(args)
            .try_run(self, "pg_ctl")
    }

    /// A command of the server's, as `postgres` when we are root.
    fn server_command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        // The server user may not be able to enter the test's directory.
        command.current_dir(self.dir.path());
        command
    }

    /// The last lines of the server's log, for failure messages.
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if self.running {
            // Best effort: the directory goes with the TempDir either way.
            let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
        }
    }
}

trait Run {
    fn try_run(&mut self, pg: &TestPostgres, what: &str) -> Result<(), String>;
    fn run(&mut self, pg: &TestPostgres, what: &str) {
        self.try_run(pg, what).unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Run for Command {
    /// Runs with its output in a file (never a pipe: `pg_ctl` leaves the
    /// server running behind it), which a failure shows with the log.
    fn try_run(&mut self, pg: &TestPostgres, what: &str) -> Result<(), String> {
        let out_path = pg.dir.path().join("command.out");
        let out = File::create(&out_path).expect("cannot create command.out");
        let status = self
            .stdout(out.try_clone().expect("cannot clone a file handle"))
            .stderr(out)
            .status()
            .map_err(|e| format!("cannot run {what} ({:?}): {e}", self.get_program()))?;
        if status.success() {
            return Ok(());
        }
        Err(format!(
            "{what} failed ({status}):\n{}\n--- server log ---\n{}",
            fs::read_to_string(&out_path).unwrap_or_default(),
            pg.log_tail()
        ))
    }
}

/// Whether PostgreSQL's server programs are here.
fn installed() -> bool {
    std::env::var_os("FEDREC_PG_BINDIR").is_some()
        || Command::new("pg_config")
            .arg("--bindir")
            .output()
            .is_ok_and(|out| {
                out.status.success()
                    && Path::new(String::from_utf8_lossy(&out.stdout).trim())
                        .join("initdb")
                        .exists()
            })
}

/// The directory of `initdb`, `pg_ctl` and `createdb`.
fn bindir() -> PathBuf {
    let dir = match std::env::var_os("FEDREC_PG_BINDIR") {
        Some(dir) => PathBuf::from(dir),
        None => match Command::new("pg_config").arg("--bindir").output() {
            Ok(out) if out.status.success() => {
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
            Ok(out) => panic!(
                "pg_config --bindir failed ({}): {SETUP_HINT}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                panic!("PostgreSQL is not installed (no pg_config on PATH). {SETUP_HINT}")
            }
            Err(e) => panic!("cannot run pg_config: {e}. {SETUP_HINT}"),
        },
    };
    for program in ["initdb", "pg_ctl", "createdb"] {
        assert!(
            Path::new(&dir).join(program).exists(),
            "no {program} in {} (the PostgreSQL server is not installed). {SETUP_HINT}",
            dir.display()
        );
    }
    dir
}

fn is_root() -> bool {
    let out = Command::new("id")
        .arg("-u")
        .output()
        .expect("cannot run id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind 127.0.0.1:0")
        .port()
}
