//! Starting a coordinator from its configuration: what `fedrec serve`, the
//! tests and the example share. [`prepare`] takes the validated
//! configuration, reads the enrollment tokens and the TLS files, applies the transport
//! policy (no plain text off loopback unless asked), and resumes from the
//! checkpoint when there is one, or starts afresh.
//!
//! ```
//! use fedrec_coordinator::bootstrap::{self, Start};
//! use fedrec_coordinator::config::ValidConfig;
//! use fedrec_coordinator::service::ServeOptions;
//! use fedrec_proto::Layout;
//!
//! let layout = Layout::new(vec![("item_bias".into(), vec![3])]);
//! let start = bootstrap::prepare(
//!     ValidConfig::default(),
//!     layout,
//!     vec![0.0; 3],
//!     None,
//!     ServeOptions::default(),
//! )
//! .unwrap();
//! assert_eq!(start.security, "plain text");
//! assert!(start.resumed.is_none());
//! ```

use std::net::SocketAddr;
use std::path::Path;

use fedrec_proto::Layout;

use crate::CoordinatorError;
use crate::auth::TokenSet;
use crate::checkpoint::Checkpoint;
use crate::config::ValidConfig;
use crate::round::RoundCore;
use crate::service::ServeOptions;

/// A coordinator ready to serve.
#[derive(Debug)]
pub struct Start {
    /// Its state: fresh, or resumed from the checkpoint.
    pub core: RoundCore,
    /// What the service needs beyond the core: TLS, tokens, checkpoint.
    pub options: ServeOptions,
    /// `"mutual TLS"`, `"TLS"` or `"plain text"`.
    pub security: &'static str,
    /// When resumed: rounds ended and the model version at the checkpoint.
    pub resumed: Option<(usize, u64)>,
}

/// Prepares a coordinator for `cfg` with the model `layout` and its initial
/// `params` (unused when resuming). `checkpoint`, when given, is where the
/// state is saved, and it is resumed from when the file exists. `options`
/// may carry what the configuration does not (a catalogue, a chunk size,
/// TLS or tokens made in memory); the configuration's TLS files and token
/// file are read into it when it has none.
///
/// # Errors
/// Unreadable tokens, TLS files or checkpoint; a
/// checkpoint of another model. The transport policy is checked on the
/// address actually bound, by [`check_transport`].
pub fn prepare(
    cfg: ValidConfig,
    layout: Layout,
    params: Vec<f32>,
    checkpoint: Option<&Path>,
    mut options: ServeOptions,
) -> Result<Start, CoordinatorError> {
    if options.tokens.is_none()
        && let Some(path) = &cfg.auth.enrollment_tokens
    {
        options = options.with_enrollment_tokens(TokenSet::load(path)?);
    }
    if options.tls.is_none()
        && let Some(tls) = crate::tls::server_tls_config(&cfg.tls)?
    {
        options = options.with_tls(tls);
    }
    let security = match (&options.tls, &cfg.tls.client_ca) {
        (Some(_), Some(_)) => "mutual TLS",
        (Some(_), None) => "TLS",
        (None, _) => "plain text",
    };
    let (core, resumed) =
        match checkpoint {
            Some(path) if path.exists() => {
                let saved = Checkpoint::read(path)?;
                let core = RoundCore::resume(cfg, layout, saved, std::time::Instant::now())
                    .map_err(|e| CoordinatorError::Resume {
                        path: path.to_owned(),
                        source: Box::new(e),
                    })?;
                let resumed = Some((core.history().len(), core.model().version));
                (core, resumed)
            }
            _ => (RoundCore::new(cfg, layout, params)?, None),
        };
    if let Some(path) = checkpoint {
        options = options.with_checkpoint(path);
    }
    Ok(Start {
        core,
        options,
        security,
        resumed,
    })
}

/// Refuses to serve plain text on `addr` unless it is a loopback address
/// or `insecure` is set: devices' pseudonyms and model updates would cross
/// the network unencrypted. Returns whether plain text is served off
/// loopback (the caller warns).
pub fn check_transport(
    addr: SocketAddr,
    tls: bool,
    insecure: bool,
) -> Result<bool, CoordinatorError> {
    if tls || addr.ip().is_loopback() {
        return Ok(false);
    }
    if insecure {
        return Ok(true);
    }
    Err(CoordinatorError::InvalidConfig(format!(
        "refusing to listen on {addr} without TLS: devices' pseudonyms and model updates \
         would cross the network in plain text. Give --tls-cert and --tls-key (or [tls] \
         in the config; `fedrec certs --out DIR` makes development ones), listen on a \
         loopback address, or pass --insecure to serve plain text anyway"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_refused_off_loopback_unless_insecure() {
        let lan: SocketAddr = "192.168.1.5:50051".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let err = check_transport(lan, false, false).unwrap_err().to_string();
        assert!(
            err.contains("without TLS") && err.contains("--insecure"),
            "{err}"
        );
        assert!(check_transport(lan, false, true).unwrap());
        assert!(!check_transport(lan, true, false).unwrap());
        assert!(!check_transport(local, false, false).unwrap());
    }

    #[test]
    fn a_checkpoint_is_resumed_when_it_exists() {
        let layout = Layout::new(vec![("b".into(), vec![2])]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.ckpt");
        let fresh = prepare(
            ValidConfig::default(),
            layout.clone(),
            vec![0.5, -0.5],
            Some(&path),
            ServeOptions::default(),
        )
        .unwrap();
        assert!(fresh.resumed.is_none());
        assert_eq!(fresh.options.checkpoint.as_deref(), Some(path.as_path()));
        fresh.core.checkpoint().write(&path).unwrap();
        let again = prepare(
            ValidConfig::default(),
            layout,
            vec![9.0, 9.0],
            Some(&path),
            ServeOptions::default(),
        )
        .unwrap();
        assert_eq!(again.resumed, Some((0, 1)));
        assert_eq!(
            again.core.model().params,
            vec![0.5, -0.5],
            "the saved model, not the new one"
        );
    }
}
