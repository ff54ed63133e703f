//! TLS to PostgreSQL.
//!
//! A store URL with `sslmode=require` connects over TLS, and the server's
//! certificate is verified: against the CA certificates (PEM) in the file
//! the URL names with `sslrootcert=FILE`, or else against the public web
//! roots (Mozilla's, built in), which managed PostgreSQL services with
//! publicly trusted certificates use. Unlike libpq, `require` here never
//! accepts an unverified certificate. Without `sslmode=require` the
//! connection is plain TCP, as before: keep such a database on a private
//! network.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_postgres_rustls::MakeRustlsConnect;

use crate::StoreError;

/// `url` without its `sslrootcert` parameter (which tokio-postgres does not
/// know), and that parameter's file. Both the URL form (`?sslrootcert=…`)
/// and libpq's `key=value` form are understood.
pub(crate) fn take_root_cert(url: &str) -> (String, Option<PathBuf>) {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), None);
        };
        let mut root = None;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| match pair.strip_prefix("sslrootcert=") {
                Some(path) => {
                    root = Some(PathBuf::from(percent_decode(path)));
                    false
                }
                None => true,
            })
            .collect();
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (url, root)
    } else {
        let mut root = None;
        let kept: Vec<&str> = url
            .split_whitespace()
            .filter(|pair| match pair.strip_prefix("sslrootcert=") {
                Some(path) => {
                    root = Some(PathBuf::from(path));
                    false
                }
                None => true,
            })
            .collect();
        (kept.join(" "), root)
    }
}

/// `%XX` escapes decoded (a path in a URL may have them).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(Some(hi)), Some(Some(lo))) = (
                bytes.get(i + 1).map(|b| hex(*b)),
                bytes.get(i + 2).map(|b| hex(*b)),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A TLS connector that trusts the CA certificates in `root_cert` (PEM), or
/// the public web roots without one. Errors name the file.
pub(crate) fn connector(root_cert: Option<&Path>) -> Result<MakeRustlsConnect, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let invalid = |why: String| {
                StoreError::InvalidUrl(format!("sslrootcert {}: {why}", path.display()))
            };
            let pem = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| invalid(format!("not a CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(invalid("no CERTIFICATE block in the file".to_owned()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::InvalidUrl(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_certificate_is_taken_out_of_either_form() {
        let (url, root) =
            take_root_cert("postgres://u@h:5432/db?sslmode=require&sslrootcert=%2Fetc%2Fca.pem");
        assert_eq!(url, "postgres://u@h:5432/db?sslmode=require");
        assert_eq!(root, Some(PathBuf::from("/etc/ca.pem")));
        let (url, root) = take_root_cert("postgres://u@h/db?sslrootcert=ca.pem");
        assert_eq!(
            (url.as_str(), root),
            ("postgres://u@h/db", Some("ca.pem".into()))
        );
        let (url, root) = take_root_cert("host=h sslmode=require sslrootcert=/ca.pem user=u");
        assert_eq!(url, "host=h sslmode=require user=u");
        assert_eq!(root, Some(PathBuf::from("/ca.pem")));
        assert_eq!(take_root_cert("postgres://h/db").1, None);
    }

    #[test]
    fn a_root_file_without_certificates_is_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("fedrec-store-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "nothing here\n").unwrap();
        let err = connector(Some(&path)).err().expect("refused").to_string();
        assert!(
            err.contains("empty.pem") && err.contains("CERTIFICATE"),
            "{err}"
        );
        let err = connector(Some(&dir.join("missing.pem")))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
