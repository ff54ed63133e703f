//! The secure aggregation messages on the wire: conversions between the
//! plain structs of [`messages`](super::messages) and their protobuf twins
//! in [`pb`], and the little-endian `u32` encoding of masked inputs.
//!
//! Parsing checks only the shape (fixed-length keys, signatures and shares,
//! whole `u32` values); whether a message makes sense is for the state
//! machines to decide. A shape error is [`SecAggError::Malformed`] naming
//! the field.
//!
//! ```
//! use fedrec_proto::secagg::{wire, EncryptedShare, PartyId};
//! let share = EncryptedShare { sender: PartyId(1), recipient: PartyId(2), ciphertext: vec![7; 82] };
//! let pb = fedrec_proto::pb::SecAggEncryptedShare::from(&share);
//! assert_eq!(EncryptedShare::try_from(pb).unwrap(), share);
//! let bytes = wire::encode_masked(&[1, u32::MAX]);
//! assert_eq!(wire::decode_masked(&bytes).unwrap(), vec![1, u32::MAX]);
//! ```

use bytes::Bytes;

use super::payload::Weighting;
use super::{
    Advertisement, EncryptedShare, PartyId, RevealedShare, Roster, SecAggConfig, SecAggError,
    SecretShare, ShareDelivery, UnmaskRequest,
};
use crate::pb;

/// `bytes` as a fixed-size array, or a [`SecAggError::Malformed`] naming `field`.
fn fixed<const N: usize>(field: &str, bytes: &[u8]) -> Result<[u8; N], SecAggError> {
    bytes.try_into().map_err(|_| {
        SecAggError::Malformed(format!("{field} must be {N} bytes, got {}", bytes.len()))
    })
}

fn parties(ids: &[u64]) -> Vec<PartyId> {
    ids.iter().copied().map(PartyId).collect()
}

fn ids(parties: &[PartyId]) -> Vec<u64> {
    parties.iter().map(|p| p.0).collect()
}

impl From<&Advertisement> for pb::SecAggAdvertisement {
    fn from(a: &Advertisement) -> Self {
        Self {
            round: a.round,
            party: a.party.0,
            identity: Bytes::copy_from_slice(&a.identity),
            c_public: Bytes::copy_from_slice(&a.c_public),
            s_public: Bytes::copy_from_slice(&a.s_public),
            self_mask_commitment: Bytes::copy_from_slice(&a.self_mask_commitment),
            signature: Bytes::copy_from_slice(&a.signature),
        }
    }
}

impl TryFrom<pb::SecAggAdvertisement> for Advertisement {
    type Error = SecAggError;

    fn try_from(a: pb::SecAggAdvertisement) -> Result<Self, Self::Error> {
        Ok(Self {
            round: a.round,
            party: PartyId(a.party),
            identity: fixed("advertisement identity key", &a.identity)?,
            c_public: fixed("advertisement c_public key", &a.c_public)?,
            s_public: fixed("advertisement s_public key", &a.s_public)?,
            self_mask_commitment: fixed(
                "advertisement self-mask commitment",
                &a.self_mask_commitment,
            )?,
            signature: fixed("advertisement signature", &a.signature)?,
        })
    }
}

impl From<&Roster> for pb::SecAggRoster {
    fn from(r: &Roster) -> Self {
        Self {
            round: r.round,
            graph_seed: Bytes::copy_from_slice(&r.graph_seed),
            parties: ids(&r.parties),
            advertisements: r.advertisements.iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::SecAggRoster> for Roster {
    type Error = SecAggError;

    fn try_from(r: pb::SecAggRoster) -> Result<Self, Self::Error> {
        Ok(Self {
            round: r.round,
            graph_seed: fixed("roster graph seed", &r.graph_seed)?,
            parties: parties(&r.parties),
            advertisements: r
                .advertisements
                .into_iter()
                .map(Advertisement::try_from)
                .collect::<Result<_, _>>()?,
        })
    }
}

impl From<&EncryptedShare> for pb::SecAggEncryptedShare {
    fn from(s: &EncryptedShare) -> Self {
        Self {
            sender: s.sender.0,
            recipient: s.recipient.0,
            ciphertext: Bytes::copy_from_slice(&s.ciphertext),
        }
    }
}

impl TryFrom<pb::SecAggEncryptedShare> for EncryptedShare {
    type Error = SecAggError;

    /// Any length is accepted here: the receiving state machine checks it
    /// (and names sender and recipient when refusing it).
    fn try_from(s: pb::SecAggEncryptedShare) -> Result<Self, Self::Error> {
        Ok(Self {
            sender: PartyId(s.sender),
            recipient: PartyId(s.recipient),
            ciphertext: s.ciphertext.to_vec(),
        })
    }
}

/// Encrypted shares from the wire.
pub fn shares_from_pb(shares: Vec<pb::SecAggEncryptedShare>) -> Vec<EncryptedShare> {
    shares
        .into_iter()
        .map(|s| EncryptedShare {
            sender: PartyId(s.sender),
            recipient: PartyId(s.recipient),
            ciphertext: s.ciphertext.to_vec(),
        })
        .collect()
}

impl From<&ShareDelivery> for pb::SecAggShareDelivery {
    fn from(d: &ShareDelivery) -> Self {
        Self {
            round: d.round,
            recipient: d.recipient.0,
            shares: d.shares.iter().map(Into::into).collect(),
        }
    }
}

impl From<pb::SecAggShareDelivery> for ShareDelivery {
    fn from(d: pb::SecAggShareDelivery) -> Self {
        Self {
            round: d.round,
            recipient: PartyId(d.recipient),
            shares: shares_from_pb(d.shares),
        }
    }
}

impl From<&UnmaskRequest> for pb::SecAggUnmaskRequest {
    fn from(r: &UnmaskRequest) -> Self {
        Self {
            round: r.round,
            recipient: r.recipient.0,
            survivors: ids(&r.survivors),
            dropped: ids(&r.dropped),
        }
    }
}

impl From<pb::SecAggUnmaskRequest> for UnmaskRequest {
    fn from(r: pb::SecAggUnmaskRequest) -> Self {
        Self {
            round: r.round,
            recipient: PartyId(r.recipient),
            survivors: parties(&r.survivors),
            dropped: parties(&r.dropped),
        }
    }
}

impl From<&RevealedShare> for pb::SecAggRevealedShare {
    fn from(r: &RevealedShare) -> Self {
        Self {
            owner: r.owner.0,
            share: Bytes::copy_from_slice(r.share.to_bytes().as_slice()),
        }
    }
}

impl TryFrom<pb::SecAggRevealedShare> for RevealedShare {
    type Error = SecAggError;

    fn try_from(r: pb::SecAggRevealedShare) -> Result<Self, Self::Error> {
        let share = SecretShare::from_bytes(&r.share).map_err(|e| {
            SecAggError::Malformed(format!("revealed share of party {}: {e}", r.owner))
        })?;
        Ok(Self {
            owner: PartyId(r.owner),
            share,
        })
    }
}

/// Revealed shares from the wire.
pub fn revealed_from_pb(
    shares: Vec<pb::SecAggRevealedShare>,
) -> Result<Vec<RevealedShare>, SecAggError> {
    shares.into_iter().map(RevealedShare::try_from).collect()
}

/// A device's secure aggregation task: its party, the protocol's
/// configuration and how it weighs its update.
pub fn task_to_pb(party: PartyId, config: &SecAggConfig, weighting: Weighting) -> pb::SecAggTask {
    let (weighting, max_examples) = match weighting {
        Weighting::Uniform => (pb::SecAggWeighting::Uniform, 0),
        Weighting::Examples { max_examples } => (pb::SecAggWeighting::Examples, max_examples),
    };
    pb::SecAggTask {
        party: party.0,
        neighbours: config
            .neighbours
            .map_or(0, |k| u32::try_from(k).unwrap_or(u32::MAX)),
        threshold: config.threshold,
        range: config.range,
        bits: config.bits,
        weighting: weighting as i32,
        max_examples,
    }
}

/// Parses and checks a secure aggregation task (a device must not run with
/// a configuration that would let the coordinator unmask it: see
/// [`SecAggConfig::validate`]).
pub fn task_from_pb(
    task: &pb::SecAggTask,
) -> Result<(PartyId, SecAggConfig, Weighting), SecAggError> {
    let config = SecAggConfig {
        neighbours: (task.neighbours > 0).then_some(task.neighbours as usize),
        threshold: task.threshold,
        range: task.range,
        bits: task.bits,
    };
    config.validate()?;
    let weighting = match task.weighting() {
        pb::SecAggWeighting::Uniform => Weighting::Uniform,
        pb::SecAggWeighting::Examples if task.max_examples >= 1 => Weighting::Examples {
            max_examples: task.max_examples,
        },
        pb::SecAggWeighting::Examples => {
            return Err(SecAggError::InvalidConfig(
                "max_examples must be >= 1 with examples weighting, got 0".into(),
            ));
        }
    };
    Ok((PartyId(task.party), config, weighting))
}

/// A masked input as little-endian `u32` bytes.
pub fn encode_masked(values: &[u32]) -> Bytes {
    let mut out = Vec::with_capacity(4 * values.len());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    Bytes::from(out)
}

/// Parses little-endian `u32` bytes; refuses a length that is not a
/// multiple of 4.
pub fn decode_masked(bytes: &[u8]) -> Result<Vec<u32>, SecAggError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(SecAggError::Malformed(format!(
            "masked values are 4-byte integers, got {} bytes",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::crypto::generate_identity;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn messages_round_trip_and_bad_lengths_are_named() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let id = generate_identity(&mut rng);
        let adv = Advertisement::sign(5, PartyId(2), &id, [1; 32], [2; 32], [3; 32]);
        let roster = Roster {
            round: 5,
            graph_seed: [9; 32],
            parties: vec![PartyId(1), PartyId(2)],
            advertisements: vec![adv.clone()],
        };
        let back = Roster::try_from(pb::SecAggRoster::from(&roster)).unwrap();
        assert_eq!(back, roster);
        back.advertisements[0].verify().unwrap();

        let mut bad = pb::SecAggAdvertisement::from(&adv);
        bad.signature = Bytes::from_static(&[0; 63]);
        let err = Advertisement::try_from(bad).unwrap_err();
        assert_eq!(err.reason(), "malformed");
        assert!(
            err.to_string()
                .contains("signature must be 64 bytes, got 63"),
            "{err}"
        );

        let request = UnmaskRequest {
            round: 5,
            recipient: PartyId(2),
            survivors: vec![PartyId(1)],
            dropped: vec![PartyId(4)],
        };
        assert_eq!(
            UnmaskRequest::from(pb::SecAggUnmaskRequest::from(&request)),
            request
        );
        let revealed = RevealedShare {
            owner: PartyId(1),
            share: SecretShare::new(3, [4; 32]).unwrap(),
        };
        let back = RevealedShare::try_from(pb::SecAggRevealedShare::from(&revealed)).unwrap();
        assert_eq!(back, revealed);
        let err = RevealedShare::try_from(pb::SecAggRevealedShare {
            owner: 1,
            share: Bytes::from_static(&[1; 10]),
        })
        .unwrap_err();
        assert!(err.to_string().contains("party 1"), "{err}");

        let config = SecAggConfig::default();
        let rule = Weighting::Examples { max_examples: 50 };
        let task = task_to_pb(PartyId(4), &config, rule);
        assert_eq!(
            task_from_pb(&task).unwrap(),
            (PartyId(4), config.clone(), rule)
        );
        let weak = pb::SecAggTask {
            threshold: 0.5,
            ..task
        };
        assert!(
            task_from_pb(&weak)
                .unwrap_err()
                .to_string()
                .contains("threshold")
        );
        let uncapped = pb::SecAggTask {
            max_examples: 0,
            ..task
        };
        assert!(task_from_pb(&uncapped).is_err());

        assert!(decode_masked(&[1, 2, 3]).is_err());
        let values = [0, 1, 0xdead_beef, u32::MAX];
        assert_eq!(decode_masked(&encode_masked(&values)).unwrap(), values);
    }
}
