//! `[tls]`, `[download]` and `[upload]`: how bytes travel.

use super::*;
use crate::CoordinatorError;

use std::path::PathBuf;

use fedrec_proto::codec::Encoding;
use serde::{Deserialize, Serialize};

/// `[download]`: the wire format of model downloads. Each model version is
/// encoded once in it and the same bytes go to every device. See
/// [`fedrec_proto::codec`] for each encoding's error bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadConfig {
    /// `"f32"` (exact, 4 bytes a value), `"f16"` (IEEE half, 2 bytes) or
    /// `"q8"` (8-bit linear quantization per block of 256 values, about
    /// 1.03 bytes). Default `"f32"`.
    pub encoding: Encoding,
}

/// `[upload]`: the wire format of updates in plain training rounds. The
/// task tells each device; the coordinator decodes every encoding (and f32
/// from devices that do not know the one asked for). The encoding's error
/// enters the cohort's mean update (see [`fedrec_proto::codec`]). Secure
/// aggregation quantizes masked inputs itself (`secure_aggregation.bits`),
/// so it needs `"f32"` here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadConfig {
    /// `"f32"` (exact), `"f16"` or `"q8"`, as for `[download]`. Default
    /// `"f32"`.
    pub encoding: Encoding,
}

/// `[tls]`: the coordinator's certificate and key (PEM files), and the CA
/// whose certificates devices must present (mutual TLS). Relative paths are
/// relative to the working directory. The files are read when the server
/// starts ([`crate::tls::server_tls_config`]); here only their combination
/// is checked.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM (leaf first). Default: unset (no TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1). Default: unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// CA certificate(s), PEM: when set, every device must present a
    /// certificate signed by one of them and valid now (mutual TLS), and a
    /// device without one is refused on its first request. It authenticates
    /// that a device holds a key the CA certified, not who the shopper is.
    /// Default: unset (devices are not authenticated by TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether the listener speaks TLS (a certificate is configured).
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

impl TlsConfig {
    /// Checks that the `[tls]` files come in a usable combination.
    pub(crate) fn validate(&self) -> Result<(), CoordinatorError> {
        let t = self;
        match (&t.cert, &t.key) {
            (Some(_), None) => Err(invalid(
                "tls.cert is set but tls.key is not: TLS needs both the certificate and its private key"
                    .to_owned(),
            )),
            (None, Some(_)) => Err(invalid(
                "tls.key is set but tls.cert is not: TLS needs both the certificate and its private key"
                    .to_owned(),
            )),
            (None, None) if t.client_ca.is_some() => Err(invalid(
                "tls.client_ca (mutual TLS) needs tls.cert and tls.key: devices can only present \
                 certificates over TLS"
                    .to_owned(),
            )),
            _ => Ok(()),
        }
    }
}
