//! Device credentials: development certificates for TLS and mutual TLS
//! (`fedrec certs`), and enrollment tokens (`fedrec tokens`).
//!
//! A [`DevCa`] is a throwaway certificate authority made with `rcgen`: it
//! signs one server certificate for the coordinator (its names as subject
//! alternative names) and one client certificate per device. Everything is
//! ECDSA P-256 and written as PEM. For trying TLS and for tests only: a
//! deployment keeps its CA key offline and issues device certificates
//! through its own enrolment.
//!
//! ```
//! use fedrec::certs::{DevCa, Validity};
//! let ca = DevCa::new("fedrec test CA", Validity::days(1)).unwrap();
//! let server = ca.server(&["localhost".into(), "127.0.0.1".into()], Validity::days(1)).unwrap();
//! let device = ca.device("device-1", Validity::days(1)).unwrap();
//! assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
//! assert!(server.key_pem.contains("PRIVATE KEY"));
//! assert_ne!(device.cert_pem, server.cert_pem);
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Default validity of `fedrec certs`, in days.
pub const DEFAULT_DAYS: u32 = 30;
/// Default server names of `fedrec certs`.
pub const DEFAULT_SANS: [&str; 2] = ["localhost", "127.0.0.1"];
/// Default number of device certificates of `fedrec certs`.
pub const DEFAULT_DEVICES: usize = 3;

/// What can go wrong making or writing certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// rcgen refused the parameters (e.g. a name that is not a valid DNS name).
    #[error("cannot make the certificate {what}: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// A validity period that ends before it starts or before 1970.
    #[error("invalid validity period: {0}")]
    Validity(String),
    /// The operating system's random generator failed.
    #[error("cannot draw a random token: {0}")]
    Random(String),
    /// Writing a file failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before this time.
    pub not_before: SystemTime,
    /// Not valid after this time.
    pub not_after: SystemTime,
}

impl Validity {
    /// From one hour ago (for clocks slightly behind) to `days` days from now.
    pub fn days(days: u32) -> Self {
        let now = SystemTime::now();
        Self {
            not_before: now - Duration::from_secs(3600),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        }
    }

    fn apply(&self, params: &mut CertificateParams) -> Result<(), CertError> {
        let at = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| rcgen::date_time_ymd(1970, 1, 1) + d)
                .map_err(|_| CertError::Validity("times before 1970 are not supported".to_owned()))
        };
        if self.not_after <= self.not_before {
            return Err(CertError::Validity(
                "not_after must be later than not_before".to_owned(),
            ));
        }
        params.not_before = at(self.not_before)?;
        params.not_after = at(self.not_after)?;
        Ok(())
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    /// The certificate (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// Its private key (PKCS#8, `-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private key.
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// A development certificate authority.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

fn generate(what: &str) -> impl FnOnce(rcgen::Error) -> CertError {
    let what = what.to_owned();
    move |source| CertError::Generate { what, source }
}

impl DevCa {
    /// A new self-signed CA named `name` with a fresh key.
    pub fn new(name: &str, validity: Validity) -> Result<Self, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate(name))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity.apply(&mut params)?;
        let key = KeyPair::generate().map_err(generate(name))?;
        let cert = params.self_signed(&key).map_err(generate(name))?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        })
    }

    /// The CA certificate, PEM: what devices trust (`--ca`) and, under
    /// mutual TLS, what the coordinator checks devices against (`--client-ca`).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for the coordinator, valid for `names` (DNS
    /// names or IP addresses; devices must connect by one of them).
    pub fn server(&self, names: &[String], validity: Validity) -> Result<Issued, CertError> {
        let what = format!("for the server ({})", names.join(", "));
        let mut params = CertificateParams::new(names.to_vec()).map_err(generate(&what))?;
        let cn = names.first().map_or("fedrec coordinator", String::as_str);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, validity, &what)
    }

    /// A client certificate for a device, with `name` as its common name.
    pub fn device(&self, name: &str, validity: Validity) -> Result<Issued, CertError> {
        let what = format!("for device {name}");
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate(&what))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, validity, &what)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        validity: Validity,
        what: &str,
    ) -> Result<Issued, CertError> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        validity.apply(&mut params)?;
        let key = KeyPair::generate().map_err(generate(what))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate(what))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The files [`write_dev_pki`] wrote.
#[derive(Clone, Debug)]
pub struct DevPki {
    /// `ca.pem`: the CA certificate.
    pub ca: PathBuf,
    /// `server.pem`: the coordinator's certificate.
    pub server_cert: PathBuf,
    /// `server.key`: its private key.
    pub server_key: PathBuf,
    /// `device-N.pem` and `device-N.key`, from 1.
    pub devices: Vec<(PathBuf, PathBuf)>,
}

/// Makes a development CA, a server certificate for `names` and `devices`
/// device certificates, all valid for `days` days, and writes them as PEM
/// into `dir` (created if needed). The CA's private key is not kept: to
/// issue more certificates, run it again. Private keys are written readable
/// by their owner only (on Unix).
pub fn write_dev_pki(
    dir: &Path,
    names: &[String],
    devices: usize,
    days: u32,
) -> Result<DevPki, CertError> {
    let validity = Validity::days(days);
    let ca = DevCa::new("fedrec development CA", validity)?;
    let server = ca.server(names, validity)?;
    std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let pki = DevPki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        devices: (1..=devices)
            .map(|i| {
                (
                    dir.join(format!("device-{i}.pem")),
                    dir.join(format!("device-{i}.key")),
                )
            })
            .collect(),
    };
    write(&pki.ca, ca.cert_pem(), false)?;
    write(&pki.server_cert, &server.cert_pem, false)?;
    write(&pki.server_key, &server.key_pem, true)?;
    for (i, (cert, key)) in pki.devices.iter().enumerate() {
        let device = ca.device(&format!("device-{}", i + 1), validity)?;
        write(cert, &device.cert_pem, false)?;
        write(key, &device.key_pem, true)?;
    }
    Ok(pki)
}

/// Files written by [`write_tokens`].
#[derive(Clone, Debug)]
pub struct Tokens {
    /// The digests, for the coordinator (`auth.enrollment_tokens`).
    pub digests: PathBuf,
    /// One secret token per device.
    pub tokens: Vec<PathBuf>,
}

/// Writes `devices` fresh enrollment tokens (256 bits from the operating
/// system's generator, as hex) to `dir/device-N.token` (readable by the
/// owner only), and their SHA-256 digests to `dir/enrollment-tokens.sha256`.
pub fn write_tokens(dir: &Path, devices: usize) -> Result<Tokens, CertError> {
    use rand::TryRng;
    std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut written = Tokens {
        digests: dir.join("enrollment-tokens.sha256"),
        tokens: Vec::with_capacity(devices),
    };
    let mut digests =
        String::from("# SHA-256 digests of fedrec enrollment tokens, one per device\n");
    for i in 1..=devices {
        let mut bytes = [0_u8; 32];
        rand::rngs::SysRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| CertError::Random(e.to_string()))?;
        let token = fedrec_coordinator::auth::hex(&bytes);
        let path = dir.join(format!("device-{i}.token"));
        write(&path, &format!("{token}\n"), true)?;
        digests.push_str(&fedrec_coordinator::auth::digest(&token));
        digests.push('\n');
        written.tokens.push(path);
    }
    write(&written.digests, &digests, false)?;
    Ok(written)
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(err)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(err)
}
