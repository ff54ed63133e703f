//! Crash recovery: the coordinator's durable state, saved whole after every
//! round that ends and read back by [`RoundCore::resume`](crate::RoundCore::resume).
//!
//! What is saved: the global model and its version, the round counters, the
//! history of ended rounds, the optimizer's moments, the privacy accountant's
//! ledger and clipping bound, and the joined pseudonyms (so devices carry on
//! with their credentials). What is not: the open round, which a restart
//! abandons (its devices check in again and the round is run anew), so no
//! round is applied twice and none that completed is lost.
//!
//! **Format and why files.** The state is one record replaced whole after
//! each round, so write-fsync-rename gives exactly the atomicity needed:
//! the new file is written beside the old one, flushed to disk, renamed over
//! it, and the directory is flushed, so a crash at any moment leaves either
//! the old or the new checkpoint, never a mix. An embedded database would add
//! a dependency and a page cache for a single value. The file is a magic
//! line, a JSON header (readable with `head -c`), the tensors as
//! little-endian `f32`, and a SHA-256 of everything before it, checked on
//! reading so that a damaged file is refused rather than resumed from.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use fedrec_proto::tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::history::RoundSummary;
use crate::privacy::accountant::MechanismLog;

/// The file's first bytes, with the format version.
const MAGIC: &[u8; 12] = b"FEDRECCKPT1\n";

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint {path}: {message}")]
pub struct CheckpointError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

/// The privacy mechanism's durable state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyState {
    /// Every (q, z, rounds) composed.
    pub ledger: MechanismLog,
    /// The clipping bound for the next round.
    pub clip: f32,
}

/// The coordinator's state after its last ended round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The global model's version.
    pub model_version: u64,
    /// Number of the last round started (all of them ended).
    pub last_round: u32,
    /// The last round before the current run (a settings search's trials
    /// run before the final run); 0 without a search.
    #[serde(default)]
    pub run_start: u32,
    /// Training rounds counted (completed or abandoned).
    pub training_rounds: u32,
    /// Whether the final evaluation ran.
    pub final_evaluation_done: bool,
    /// Why training stopped early (the privacy budget), if it did.
    pub training_stopped: Option<String>,
    /// Every ended round, oldest first.
    pub history: Vec<RoundSummary>,
    /// Joined devices' pseudonyms, as hex.
    pub joined: Vec<String>,
    /// Differential privacy's state, when enabled.
    pub privacy: Option<PrivacyState>,
    /// The global model's parameters.
    #[serde(skip)]
    pub params: Vec<f32>,
    /// The optimizer's first moments.
    #[serde(skip)]
    pub m: Vec<f32>,
    /// The optimizer's second moments.
    #[serde(skip)]
    pub v: Vec<f32>,
}

/// The JSON header as written: the record (its tensors are skipped by
/// serde) plus the tensors' lengths.
#[derive(Serialize)]
struct HeaderOut<'a> {
    #[serde(flatten)]
    state: &'a Checkpoint,
    params_len: usize,
    m_len: usize,
    v_len: usize,
}

/// The JSON header as read back.
#[derive(Deserialize)]
struct Header {
    #[serde(flatten)]
    state: Checkpoint,
    params_len: usize,
    m_len: usize,
    v_len: usize,
}

impl Checkpoint {
    /// Writes the checkpoint atomically to `path` (see the module docs).
    pub fn write(&self, path: &Path) -> Result<(), CheckpointError> {
        let fail = |message: String| CheckpointError {
            path: path.to_owned(),
            message,
        };
        let header = serde_json::to_vec(&HeaderOut {
            state: self,
            params_len: self.params.len(),
            m_len: self.m.len(),
            v_len: self.v.len(),
        })
        .map_err(|e| fail(e.to_string()))?;
        let mut bytes = Vec::with_capacity(
            MAGIC.len()
                + 8
                + header.len()
                + 4 * (self.params.len() + self.m.len() + self.v.len())
                + 32,
        );
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&header);
        for t in [&self.params, &self.m, &self.v] {
            bytes.extend_from_slice(&tensor::encode(t));
        }
        let digest = Sha256::digest(&bytes);
        bytes.extend_from_slice(&digest);

        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| fail("the path names no file".to_owned()))?;
        let mut tmp_name = name.to_owned();
        tmp_name.push(".tmp");
        let tmp = dir.join(tmp_name);
        let io = |what: &str, e: std::io::Error| fail(format!("{what}: {e}"));
        let mut file = File::create(&tmp).map_err(|e| io("cannot create the temporary file", e))?;
        file.write_all(&bytes).map_err(|e| io("cannot write", e))?;
        file.sync_all().map_err(|e| io("cannot flush to disk", e))?;
        drop(file);
        fs::rename(&tmp, path).map_err(|e| io("cannot rename into place", e))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot flush the directory", e))?;
        Ok(())
    }

    /// Reads a checkpoint written by [`write`](Self::write); refuses a file
    /// that is truncated, altered or of another format.
    pub fn read(path: &Path) -> Result<Self, CheckpointError> {
        let fail = |message: String| CheckpointError {
            path: path.to_owned(),
            message,
        };
        let bytes = fs::read(path).map_err(|e| fail(e.to_string()))?;
        if bytes.len() < MAGIC.len() + 8 + 32 || &bytes[..MAGIC.len()] != MAGIC {
            return Err(fail(
                "not a fedrec checkpoint (or of another version)".to_owned(),
            ));
        }
        let (body, digest) = bytes.split_at(bytes.len() - 32);
        if Sha256::digest(body).as_slice() != digest {
            return Err(fail(
                "the checksum does not match: the file is damaged".to_owned(),
            ));
        }
        let rest = &body[MAGIC.len()..];
        let header_len = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")) as usize;
        let rest = &rest[8..];
        let header_bytes = rest
            .get(..header_len)
            .ok_or_else(|| fail("the header is truncated".to_owned()))?;
        let header: Header =
            serde_json::from_slice(header_bytes).map_err(|e| fail(format!("header: {e}")))?;
        let mut tensors = &rest[header_len..];
        let mut take = |len: usize, name: &str| -> Result<Vec<f32>, CheckpointError> {
            let n = len
                .checked_mul(4)
                .filter(|n| *n <= tensors.len())
                .ok_or_else(|| fail(format!("{name} is truncated")))?;
            let values = tensor::decode(&tensors[..n]).map_err(|e| fail(format!("{name}: {e}")))?;
            tensors = &tensors[n..];
            Ok(values)
        };
        let params = take(header.params_len, "the model")?;
        let m = take(header.m_len, "the first moments")?;
        let v = take(header.v_len, "the second moments")?;
        if !tensors.is_empty() {
            return Err(fail(format!("{} unexpected trailing bytes", tensors.len())));
        }
        Ok(Self {
            params,
            m,
            v,
            ..header.state
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            model_version: 7,
            last_round: 6,
            run_start: 0,
            training_rounds: 6,
            final_evaluation_done: false,
            training_stopped: None,
            history: Vec::new(),
            joined: vec!["00112233445566778899aabbccddeeff".to_owned()],
            privacy: Some(PrivacyState {
                ledger: MechanismLog {
                    steps: vec![(0.1, 1.2, 6)],
                },
                clip: 0.7,
            }),
            params: vec![1.0, -2.5, 3.25],
            m: vec![0.5; 3],
            v: vec![0.25; 3],
        }
    }

    #[test]
    fn round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coordinator.ckpt");
        let ck = sample();
        ck.write(&path).unwrap();
        assert_eq!(Checkpoint::read(&path).unwrap(), ck);
        assert!(!dir.path().join("coordinator.ckpt.tmp").exists());

        let good = fs::read(&path).unwrap();
        let mut flipped = good.clone();
        let i = good.len() - 40;
        flipped[i] ^= 1;
        fs::write(&path, &flipped).unwrap();
        let err = Checkpoint::read(&path).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
        fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(Checkpoint::read(&path).is_err());
        fs::write(&path, b"hello").unwrap();
        let err = Checkpoint::read(&path).unwrap_err().to_string();
        assert!(err.contains("not a fedrec checkpoint"), "{err}");
    }
}
