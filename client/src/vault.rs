//! The device's store file: encrypted at rest, written crash-safely.
//!
//! One file holds everything the device keeps (purchases, the private
//! embedding, consent, the transparency ledger). It is sealed with
//! ChaCha20-Poly1305 (RFC 8439) under a key derived from the app's 32-byte
//! [`StoreKey`], with a fresh random nonce from the operating system for
//! every write. The header is bound to the ciphertext as associated data:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `FEDRECST` |
//! | 8..10 | format version, little endian (1) |
//! | 10..12 | reserved, 0 |
//! | 12..24 | nonce |
//! | 24..40 | key check: HKDF-SHA256 of the key, so a wrong key is told apart from tampering |
//! | 40..48 | length of the ciphertext with its 16-byte tag, little endian |
//! | 48.. | ciphertext |
//!
//! Writes go to a temporary file in the same directory, which is flushed to
//! disk (`fsync`) and then renamed over the store (and the directory is
//! flushed), so a crash leaves either the old file or the new one, never a
//! mix. A file that is truncated, altered or sealed under another key is
//! reported as such and left untouched: nothing here ever replaces a store
//! it could not read.
//!
//! Keys come from the app (on a phone: the platform keystore). The SDK does
//! not derive keys from passphrases; an app that must should use a memory-hard
//! KDF such as Argon2id and pass the 32-byte result.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand::TryRng;
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::error::ClientError;

/// The first bytes of every store file.
pub const MAGIC: &[u8; 8] = b"FEDRECST";
/// The format version this SDK writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Length of the header (bound to the ciphertext as associated data).
pub const HEADER_LEN: usize = 48;
const TAG_LEN: usize = 16;
const CHECK_LEN: usize = 16;
const HKDF_SALT: &[u8] = b"fedrec device store";
const INFO_ENCRYPTION: &[u8] = b"fedrec store v1 encryption key";
const INFO_KEY_CHECK: &[u8] = b"fedrec store v1 key check";

/// The app's key for the store: 32 secret bytes. Wiped from memory when dropped.
#[derive(Clone)]
pub struct StoreKey(Zeroizing<[u8; 32]>);

impl StoreKey {
    /// A key from 32 bytes (e.g. from the platform keystore).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A fresh random key from the operating system (for apps that keep it
    /// in a keystore, and for tests).
    pub fn generate() -> Result<Self, ClientError> {
        let mut bytes = Zeroizing::new([0_u8; 32]);
        rand::rngs::SysRng
            .try_fill_bytes(bytes.as_mut())
            .map_err(|e| ClientError::Random(e.to_string()))?;
        Ok(Self(bytes))
    }
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreKey(<redacted>)")
    }
}

/// A store file and the key that opens it.
pub struct Vault {
    path: PathBuf,
    cipher: ChaCha20Poly1305,
    check: [u8; CHECK_LEN],
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("path", &self.path).finish()
    }
}

impl Vault {
    /// The store at `path` under `key`. Nothing is read or written yet.
    pub fn new(path: impl Into<PathBuf>, key: &StoreKey) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), key.0.as_ref());
        let mut enc = Zeroizing::new([0_u8; 32]);
        let mut check = [0_u8; CHECK_LEN];
        // Both lengths are far below HKDF-SHA256's limit of 255 × 32 bytes.
        hk.expand(INFO_ENCRYPTION, enc.as_mut())
            .expect("32 bytes is a valid HKDF output length");
        hk.expand(INFO_KEY_CHECK, &mut check)
            .expect("16 bytes is a valid HKDF output length");
        let cipher = ChaCha20Poly1305::new(&Key::from(*enc));
        Self {
            path: path.into(),
            cipher,
            check,
        }
    }

    /// The store file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and opens the store: `None` when there is no file yet.
    pub(crate) fn load(&self) -> Result<Option<Zeroizing<Vec<u8>>>, ClientError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(self.io(source)),
        };
        self.open(&bytes).map(Some)
    }

    /// Opens the sealed bytes of a store file.
    fn open(&self, bytes: &[u8]) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        let path = || self.path.clone();
        let found = bytes.len() as u64;
        let magic_len = bytes.len().min(MAGIC.len());
        if bytes[..magic_len] != MAGIC[..magic_len] {
            return Err(ClientError::StoreFormat {
                path: path(),
                detail: "not a fedrec store (bad magic)".into(),
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(ClientError::StoreTruncated {
                path: path(),
                expected: HEADER_LEN as u64,
                found,
            });
        }
        let (header, body) = bytes.split_at(HEADER_LEN);
        let version = u16::from_le_bytes([header[8], header[9]]);
        if version != FORMAT_VERSION || header[10..12] != [0, 0] {
            return Err(ClientError::StoreFormat {
                path: path(),
                detail: format!(
                    "unsupported format version {version} (this SDK reads {FORMAT_VERSION})"
                ),
            });
        }
        if !same(&header[24..40], &self.check) {
            return Err(ClientError::WrongKey { path: path() });
        }
        let mut len = [0_u8; 8];
        len.copy_from_slice(&header[40..48]);
        let ct_len = u64::from_le_bytes(len);
        let expected = (HEADER_LEN as u64).saturating_add(ct_len);
        if found < expected {
            return Err(ClientError::StoreTruncated {
                path: path(),
                expected,
                found,
            });
        }
        if found > expected || ct_len < TAG_LEN as u64 {
            return Err(ClientError::StoreTampered { path: path() });
        }
        let nonce = Nonce::try_from(&header[12..24]).expect("the nonce field is 12 bytes");
        self.cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: body,
                    aad: header,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| ClientError::StoreTampered { path: path() })
    }

    /// Seals `plaintext` and replaces the store with it, crash-safely.
    pub(crate) fn save(&self, plaintext: &[u8]) -> Result<(), ClientError> {
        let sealed = self.seal(plaintext)?;
        self.replace(&sealed)
    }

    fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, ClientError> {
        let mut nonce = [0_u8; 12];
        rand::rngs::SysRng
            .try_fill_bytes(&mut nonce)
            .map_err(|e| ClientError::Random(e.to_string()))?;
        let ct_len = (plaintext.len() + TAG_LEN) as u64;
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&self.check);
        out.extend_from_slice(&ct_len.to_le_bytes());
        let ct = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: &out,
                },
            )
            .map_err(|_| ClientError::StoreFormat {
                path: self.path.clone(),
                detail: "the state is too large to seal".into(),
            })?;
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Writes `bytes` to a temporary file beside the store, flushes it, and
    /// renames it over the store; then flushes the directory.
    fn replace(&self, bytes: &[u8]) -> Result<(), ClientError> {
        let tmp = self.temp_path();
        let result = (|| {
            let mut options = fs::OpenOptions::new();
            options.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut file = options.open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            drop(file);
            fs::rename(&tmp, &self.path)?;
            sync_dir(&self.path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(|e| self.io(e))
    }

    /// Deletes the store file (and a temporary file left by a crash): for
    /// an app that decides to start over after a damaged store or a lost
    /// key. The SDK never does this by itself.
    pub fn delete(&self) -> Result<(), ClientError> {
        for p in [self.path.clone(), self.temp_path()] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        sync_dir(&self.path).map_err(|e| self.io(e))
    }

    fn temp_path(&self) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        self.path.with_file_name(name)
    }

    fn io(&self, source: std::io::Error) -> ClientError {
        ClientError::StoreIo {
            path: self.path.clone(),
            source,
        }
    }
}

impl Drop for Vault {
    fn drop(&mut self) {
        self.check.zeroize();
    }
}

/// Flushes the directory holding `path`, so a rename in it is durable.
fn sync_dir(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Compares without an early exit.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> StoreKey {
        StoreKey::from_bytes([b; 32])
    }

    #[test]
    fn round_trips_and_uses_a_fresh_nonce_per_write() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::new(dir.path().join("s"), &key(1));
        assert!(vault.load().unwrap().is_none());
        vault.save(b"hello").unwrap();
        let first = fs::read(vault.path()).unwrap();
        vault.save(b"hello").unwrap();
        let second = fs::read(vault.path()).unwrap();
        assert_ne!(first[12..24], second[12..24], "nonce reused");
        assert_eq!(vault.load().unwrap().unwrap().as_slice(), b"hello");
        assert!(
            !first.windows(5).any(|w| w == b"hello"),
            "plaintext on disk"
        );
        assert!(!vault.temp_path().exists());
    }

    #[test]
    fn every_damage_is_named_and_the_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let vault = Vault::new(&path, &key(1));
        vault.save(b"some state").unwrap();
        let good = fs::read(&path).unwrap();
        let open = |bytes: &[u8]| {
            fs::write(&path, bytes).unwrap();
            let err = vault.load().unwrap_err();
            assert_eq!(
                fs::read(&path).unwrap(),
                bytes,
                "file changed by a failed open"
            );
            err
        };
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(open(&flipped), ClientError::StoreTampered { .. }));
        let mut header = good.clone();
        header[13] ^= 1; // the nonce, bound as associated data
        assert!(matches!(open(&header), ClientError::StoreTampered { .. }));
        assert!(matches!(
            open(&good[..good.len() - 3]),
            ClientError::StoreTruncated { .. }
        ));
        assert!(matches!(
            open(&good[..20]),
            ClientError::StoreTruncated { .. }
        ));
        assert!(matches!(
            open(b"garbage!garbage"),
            ClientError::StoreFormat { .. }
        ));
        let mut version = good.clone();
        version[8] = 9;
        assert!(matches!(open(&version), ClientError::StoreFormat { .. }));
        fs::write(&path, &good).unwrap();
        assert!(matches!(
            Vault::new(&path, &key(2)).load().unwrap_err(),
            ClientError::WrongKey { .. }
        ));
        assert_eq!(vault.load().unwrap().unwrap().as_slice(), b"some state");
    }

    #[test]
    fn a_crash_before_the_rename_keeps_the_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let vault = Vault::new(dir.path().join("s"), &key(3));
        vault.save(b"good").unwrap();
        // A crash mid-write leaves a partial temporary file behind.
        fs::write(vault.temp_path(), b"FEDRECST partial").unwrap();
        assert_eq!(vault.load().unwrap().unwrap().as_slice(), b"good");
        vault.save(b"newer").unwrap();
        assert_eq!(vault.load().unwrap().unwrap().as_slice(), b"newer");
    }
}
