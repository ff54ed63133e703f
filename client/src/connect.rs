//! How a device reaches its coordinator: plain `http://`, TLS over
//! `https://` with the CA that signed the coordinator's certificate, and
//! mutual TLS with the device's own certificate and key.
//!
//! A device may be given several coordinator endpoints (the replicas of a
//! replicated coordinator, which share the device's session): it joins the
//! first that answers and moves to the next, round robin, whenever the one
//! it uses cannot be reached, keeping its pseudonym (see
//! [`Participant::connect_any`](crate::participant::Participant::connect_any)).
//! The same options (TLS, token) apply to each.
//!
//! ```no_run
//! # async fn run() -> Result<(), fedrec_client::ClientError> {
//! use std::path::Path;
//! use fedrec_client::connect::ConnectOptions;
//! use fedrec_client::participant::Participant;
//! let tls = ConnectOptions::from_files(
//!     Some(Path::new("certs/ca.pem")),
//!     Some(Path::new("certs/device-1.pem")), // mutual TLS only
//!     Some(Path::new("certs/device-1.key")),
//! )?;
//! let participant = Participant::connect_with("https://localhost:50051", &tls).await?;
//! // Or the replicas of one coordinator, tried in turn:
//! let replicated = Participant::connect_with(
//!     "https://replica-1.example:50051,https://replica-2.example:50051",
//!     &tls,
//! )
//! .await?;
//! # Ok(()) }
//! ```

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::ClientError;

/// Transport security of a connection. The default is plain text, for
/// `http://` endpoints only.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    ca_pem: Option<Vec<u8>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    domain_name: Option<String>,
    enrollment_token: Option<String>,
    keepalive: Option<Duration>,
}

/// How long a coordinator may stay silent before a device gives up on the
/// connection, by default ([`ConnectOptions::keepalive`]).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(20);

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the device's private key.
        f.debug_struct("ConnectOptions")
            .field("ca", &self.ca_pem.is_some())
            .field("identity", &self.identity.is_some())
            .field("domain_name", &self.domain_name)
            .field("enrollment_token", &self.enrollment_token.is_some())
            .field("keepalive", &self.keepalive)
            .finish()
    }
}

impl ConnectOptions {
    /// Plain text (the default).
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the CA certificate(s) in `pem` to sign the coordinator's
    /// certificate; needed for `https://`. Default: none.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// Presents this certificate (chain, PEM) and private key (PEM) to the
    /// coordinator, for mutual TLS. Default: none.
    pub fn identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((cert.into(), key.into()));
        self
    }

    /// Checks the coordinator's certificate against this name instead of
    /// the endpoint's host. Default: the host.
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }

    /// Joins with this enrollment token, for a coordinator that admits
    /// enrolled devices only (`auth.enrollment_tokens`); the device joins
    /// with it again whenever its session expires. Default: none.
    pub fn enrollment_token(mut self, token: impl Into<String>) -> Self {
        self.enrollment_token = Some(token.into().trim().to_owned());
        self
    }

    /// How quickly a coordinator that went silent without closing its
    /// connections (a machine gone, a network partition) is noticed: the
    /// TCP connect times out after `after`, and while connected the device
    /// pings the coordinator (HTTP/2 PING) every `after` and drops the
    /// connection when a ping is not answered within `after`, failing the
    /// request in flight so that the device moves to its next endpoint.
    /// Default: [`DEFAULT_KEEPALIVE`].
    pub fn keepalive(mut self, after: Duration) -> Self {
        self.keepalive = Some(after);
        self
    }

    /// Reads the enrollment token from `path` (its first non-blank line);
    /// errors name the file.
    pub fn enrollment_token_file(self, path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ClientError::InvalidConfig(format!("enrollment token file {}: {e}", path.display()))
        })?;
        let Some(token) = text.lines().map(str::trim).find(|l| !l.is_empty()) else {
            return Err(ClientError::InvalidConfig(format!(
                "enrollment token file {} is empty",
                path.display()
            )));
        };
        Ok(self.enrollment_token(token))
    }

    /// The enrollment token, if any.
    pub(crate) fn token(&self) -> Option<&str> {
        self.enrollment_token.as_deref()
    }

    /// Options from PEM files: the CA certificate, and for mutual TLS the
    /// device's certificate and key (both or neither). Errors name the file.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let mut options = Self::new();
        if let Some(ca) = ca {
            options = options.ca_pem(read_pem(ca, "CERTIFICATE")?);
        }
        match (cert, key) {
            (Some(cert), Some(key)) => {
                options = options.identity_pem(
                    read_pem(cert, "CERTIFICATE")?,
                    read_pem(key, "PRIVATE KEY")?,
                );
            }
            (None, None) => {}
            _ => {
                return Err(ClientError::InvalidConfig(
                    "a device certificate and its key go together: give both or neither".to_owned(),
                ));
            }
        }
        Ok(options)
    }

    /// Whether these options ask for TLS.
    pub fn is_tls(&self) -> bool {
        self.ca_pem.is_some() || self.identity.is_some() || self.domain_name.is_some()
    }

    /// Turns a transport failure of the first request into what it likely
    /// means: over TLS, [`ClientError::TlsRefused`]; in plain text against
    /// a TLS port, [`ClientError::PlainTextToTls`].
    pub(crate) fn explain_refusal(&self, endpoint: &str, err: ClientError) -> ClientError {
        use tonic::Code;
        match err {
            ClientError::Rpc { status, .. }
                if endpoint.starts_with("https://")
                    && matches!(
                        status.code(),
                        Code::Unknown | Code::Cancelled | Code::Unavailable
                    )
                    && std::error::Error::source(&status).is_some() =>
            {
                ClientError::TlsRefused {
                    endpoint: endpoint.to_owned(),
                    status,
                }
            }
            ClientError::Rpc { status, .. }
                if endpoint.starts_with("http://")
                    && std::error::Error::source(&status).is_some()
                    && speaks_tls(&status) =>
            {
                ClientError::PlainTextToTls {
                    endpoint: endpoint.to_owned(),
                    https: endpoint.replacen("http://", "https://", 1),
                }
            }
            other => other,
        }
    }

    /// Opens a channel to `endpoint` with these options. `https://` needs a
    /// CA ([`ca_pem`](Self::ca_pem)); TLS options with an `http://` endpoint
    /// are refused rather than silently ignored.
    pub async fn channel(&self, endpoint: &str) -> Result<Channel, ClientError> {
        self.endpoint(endpoint)?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: endpoint.to_string(),
                source,
            })
    }

    /// `endpoint` configured with these options, not connected yet (the
    /// checks of [`channel`](Self::channel), without I/O).
    fn endpoint(&self, endpoint: &str) -> Result<Endpoint, ClientError> {
        let after = self.keepalive.unwrap_or(DEFAULT_KEEPALIVE);
        let ep = fedrec_proto::endpoint(endpoint.to_string())
            .map_err(|e| ClientError::InvalidConfig(format!("bad endpoint {endpoint:?}: {e}")))?
            .connect_timeout(after)
            .http2_keep_alive_interval(after)
            .keep_alive_timeout(after)
            .keep_alive_while_idle(true);
        let https = endpoint.starts_with("https://");
        if https {
            let Some(ca) = &self.ca_pem else {
                return Err(ClientError::InvalidConfig(format!(
                    "{endpoint} is https: give the CA certificate that signed the coordinator's \
                     certificate (--ca FILE)"
                )));
            };
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = &self.domain_name {
                tls = tls.domain_name(name.clone());
            }
            ep.tls_config(tls).map_err(|source| ClientError::Connect {
                endpoint: endpoint.to_string(),
                source,
            })
        } else if self.is_tls() {
            Err(ClientError::InvalidConfig(format!(
                "TLS options were given but {endpoint} is not https://: use https:// to connect \
                 over TLS"
            )))
        } else {
            Ok(ep)
        }
    }
}

/// The coordinator endpoints a device may use: the replicas of one
/// coordinator (a session is valid at each), or one load-balanced address.
/// It uses one at a time and moves to the next, round robin, when that one
/// cannot be reached ([`advance`](Self::advance), the one place that picks).
#[derive(Debug)]
pub(crate) struct Endpoints {
    /// Each URL with its endpoint, configured (TLS) and checked once.
    list: Vec<(String, Endpoint)>,
    /// The index of the one in use.
    current: usize,
}

impl Endpoints {
    /// The endpoints of `urls`, in order, with `options`; the first is in
    /// use. Every URL is checked here (a bad one, or `https://` without a
    /// CA, is a [`ClientError::InvalidConfig`] naming it), before any
    /// connection.
    pub(crate) fn new(
        urls: &[impl AsRef<str>],
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::InvalidConfig(
                "no coordinator endpoint given".to_owned(),
            ));
        }
        let list = urls
            .iter()
            .map(|url| {
                let url = url.as_ref().trim();
                if url.is_empty() {
                    return Err(ClientError::InvalidConfig(
                        "an empty coordinator endpoint in the list (two commas in a row, or one \
                         at an end?)"
                            .to_owned(),
                    ));
                }
                Ok((url.to_owned(), options.endpoint(url)?))
            })
            .collect::<Result<_, ClientError>>()?;
        Ok(Self { list, current: 0 })
    }

    /// The endpoints of a comma-separated list of URLs (see [`new`](Self::new)).
    pub(crate) fn parse(urls: &str, options: &ConnectOptions) -> Result<Self, ClientError> {
        Self::new(&urls.split(',').collect::<Vec<_>>(), options)
    }

    /// How many there are.
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// The URL of the one in use.
    pub(crate) fn url(&self) -> &str {
        &self.list[self.current].0
    }

    /// Moves to the next one, round robin.
    pub(crate) fn advance(&mut self) {
        self.current = (self.current + 1) % self.list.len();
    }

    /// Connects to the one in use now; the error names it.
    pub(crate) async fn connect(&self) -> Result<Channel, ClientError> {
        let (url, endpoint) = &self.list[self.current];
        endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: url.clone(),
                source,
            })
    }

    /// A channel to the one in use that connects at its first request: a
    /// replica that is down as well shows there, as an unreachable status.
    pub(crate) fn connect_lazy(&self) -> Channel {
        self.list[self.current].1.connect_lazy()
    }
}

fn read_pem(path: &Path, label: &str) -> Result<Vec<u8>, ClientError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ClientError::InvalidConfig(format!("cannot read {}: {e}", path.display())))?;
    if !fedrec_proto::has_pem_block(&bytes, label) {
        return Err(ClientError::InvalidConfig(format!(
            "{}: no PEM block \"-----BEGIN {label}-----\" in the file",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Whether a failed plain-text request met a TLS server: HTTP/2 reads the
/// TLS alert it answers with as a frame of impossible size, or the server
/// closes the connection at once: any transport failure after connecting.
fn speaks_tls(status: &tonic::Status) -> bool {
    let text = fedrec_proto::error_chain(status).to_ascii_lowercase();
    // Or it closes the connection at the first bytes it cannot read as TLS
    // (seen as a closed connection or a broken pipe). A connection that was
    // never made is something else.
    text.contains("frame_size_error")
        || !(text.contains("tcp connect") || text.contains("refused") || text.contains("dns"))
}
