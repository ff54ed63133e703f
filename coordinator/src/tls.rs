//! Transport security: the `[tls]` section turned into tonic's rustls
//! server configuration (ring crypto).
//!
//! With `cert` and `key` the listener speaks TLS only; with `client_ca` as
//! well, every device must present a certificate signed by that CA and
//! valid now (mutual TLS). A device without one completes the handshake
//! and is refused on its first request.

use std::path::Path;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::CoordinatorError;
use crate::config::TlsConfig;

/// Reads the files named by `cfg` and checks that tonic (rustls) accepts
/// them; `None` when TLS is off. Every error names the file at fault.
pub fn server_tls_config(cfg: &TlsConfig) -> Result<Option<ServerTlsConfig>, CoordinatorError> {
    let (Some(cert_path), Some(key_path)) = (&cfg.cert, &cfg.key) else {
        return Ok(None);
    };
    let cert = read_pem(cert_path, "tls.cert", "CERTIFICATE")?;
    let key = read_pem(key_path, "tls.key", "PRIVATE KEY")?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca_path) = &cfg.client_ca {
        let ca = read_pem(ca_path, "tls.client_ca", "CERTIFICATE")?;
        tls = tls.client_ca_root(Certificate::from_pem(ca));
    }
    // Build the acceptor once here, so that a bad certificate or key is
    // reported at start-up with the files' names, not as a bare transport
    // error when serving begins.
    if let Err(e) = tonic::transport::Server::builder().tls_config(tls.clone()) {
        let mut files = format!("{} and {}", cert_path.display(), key_path.display());
        if let Some(ca) = &cfg.client_ca {
            files = format!("{files} (client CA {})", ca.display());
        }
        return Err(CoordinatorError::Tls {
            path: cert_path.clone(),
            message: format!("rustls refuses {files}: {}", fedrec_proto::error_chain(&e)),
        });
    }
    Ok(Some(tls))
}

/// Reads a PEM file and checks it holds a `label` block (`CERTIFICATE`,
/// or `PRIVATE KEY` for any of the key labels).
fn read_pem(path: &Path, option: &str, label: &str) -> Result<Vec<u8>, CoordinatorError> {
    let err = |message: String| CoordinatorError::Tls {
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("{option}: cannot read: {e}")))?;
    if !fedrec_proto::has_pem_block(&bytes, label) {
        return Err(err(format!(
            "{option}: no PEM block \"-----BEGIN {label}-----\" in the file"
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_wrong_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TlsConfig {
            cert: Some(dir.path().join("nope.pem")),
            key: Some(dir.path().join("nope.key")),
            client_ca: None,
        };
        let e = server_tls_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("nope.pem") && e.contains("tls.cert"), "{e}");

        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, "not a certificate").unwrap();
        let cfg = TlsConfig {
            cert: Some(cert),
            ..cfg
        };
        let e = server_tls_config(&cfg).unwrap_err().to_string();
        assert!(
            e.contains("cert.pem") && e.contains("BEGIN CERTIFICATE"),
            "{e}"
        );
    }

    #[test]
    fn a_certificate_needs_its_key_and_a_client_ca_needs_both() {
        use crate::config::CoordinatorConfig;
        let check = |tls: TlsConfig| {
            let cfg = CoordinatorConfig {
                tls,
                ..CoordinatorConfig::default()
            };
            cfg.validated().map(drop).map_err(|e| e.to_string())
        };
        let e = check(TlsConfig {
            cert: Some("server.pem".into()),
            ..TlsConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("tls.key"), "{e}");
        let e = check(TlsConfig {
            client_ca: Some("ca.pem".into()),
            ..TlsConfig::default()
        })
        .unwrap_err();
        assert!(e.contains("tls.client_ca"), "{e}");
        let e = CoordinatorConfig::from_toml_str("[tls]\nkey = \"server.key\"\n").unwrap_err();
        assert!(e.to_string().contains("tls.cert"), "{e}");
        check(TlsConfig {
            cert: Some("server.pem".into()),
            key: Some("server.key".into()),
            client_ca: Some("ca.pem".into()),
        })
        .expect("a complete [tls] is valid (files are read at start-up)");
    }

    #[test]
    fn off_without_a_certificate() {
        assert!(server_tls_config(&TlsConfig::default()).unwrap().is_none());
    }
}
