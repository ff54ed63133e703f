//! The messages of a secure aggregation round, as plain structs.
//!
//! They carry bytes, not parsed keys: whoever receives one checks it (the
//! state machines do), and a refused message is a typed [`SecAggError`].
//! The transport maps them to its own encoding.

use ed25519_dalek::Signature;

use super::crypto::{PROTOCOL_LABEL, SigningKey, VerifyingKey};
use super::{PartyId, SecAggError, SecretShare};

/// Step 1, device → coordinator, and inside a [`Roster`]: a device's public
/// keys for one round, signed with its long-term Ed25519 identity key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advertisement {
    /// The round.
    pub round: u64,
    /// The device.
    pub party: PartyId,
    /// The device's Ed25519 verifying key. Whether it belongs to `party` is
    /// for the receiver to decide (see `SecAggClient::trust_identities` in
    /// `fedrec-client`).
    pub identity: [u8; 32],
    /// X25519 public key `c_pk`, for encrypting shares to this device.
    pub c_public: [u8; 32],
    /// X25519 public key `s_pk`, for pairwise masks with this device.
    pub s_public: [u8; 32],
    /// Commitment to the device's self-mask seed
    /// ([`crypto::self_mask_commitment`](super::crypto::self_mask_commitment)).
    pub self_mask_commitment: [u8; 32],
    /// Ed25519 signature over [`transcript`](Self::transcript).
    pub signature: [u8; 64],
}

impl Advertisement {
    /// An advertisement signed with `identity`.
    pub fn sign(
        round: u64,
        party: PartyId,
        identity: &SigningKey,
        c_public: [u8; 32],
        s_public: [u8; 32],
        self_mask_commitment: [u8; 32],
    ) -> Self {
        use ed25519_dalek::Signer;
        let mut adv = Self {
            round,
            party,
            identity: identity.verifying_key().to_bytes(),
            c_public,
            s_public,
            self_mask_commitment,
            signature: [0; 64],
        };
        adv.signature = identity.sign(&adv.transcript()).to_bytes();
        adv
    }

    /// The signed bytes: `label ‖ "/advertise" ‖ round ‖ party ‖ identity ‖
    /// c_pk ‖ s_pk ‖ commitment`, integers big-endian.
    pub fn transcript(&self) -> Vec<u8> {
        [
            PROTOCOL_LABEL,
            b"/advertise",
            &self.round.to_be_bytes(),
            &self.party.0.to_be_bytes(),
            &self.identity,
            &self.c_public,
            &self.s_public,
            &self.self_mask_commitment,
        ]
        .concat()
    }

    /// Checks the signature against the advertised identity key and returns
    /// that key.
    pub fn verify(&self) -> Result<VerifyingKey, SecAggError> {
        let bad = || SecAggError::BadSignature { party: self.party };
        let key = VerifyingKey::from_bytes(&self.identity).map_err(|_| bad())?;
        key.verify_strict(&self.transcript(), &Signature::from_bytes(&self.signature))
            .map_err(|_| bad())?;
        Ok(key)
    }
}

/// Coordinator → device after step 1: who takes part, the graph seed, and
/// the advertisements the recipient needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Roster {
    /// The round.
    pub round: u64,
    /// The public seed of the neighbour graph.
    pub graph_seed: [u8; 32],
    /// Every device that advertised, sorted by id.
    pub parties: Vec<PartyId>,
    /// The advertisements of the recipient and of its neighbours, sorted by
    /// party.
    pub advertisements: Vec<Advertisement>,
}

/// Shares of one device's two secrets, encrypted for one neighbour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncryptedShare {
    /// The device whose secrets are shared.
    pub sender: PartyId,
    /// The neighbour that can decrypt it.
    pub recipient: PartyId,
    /// ChaCha20-Poly1305 ciphertext of the two shares
    /// ([`crypto::encrypt_shares`](super::crypto::encrypt_shares)).
    pub ciphertext: Vec<u8>,
}

/// Step 2, device → coordinator: one [`EncryptedShare`] per neighbour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareKeys {
    /// The round.
    pub round: u64,
    /// The sending device.
    pub sender: PartyId,
    /// One per neighbour, each with `sender` as its sender.
    pub shares: Vec<EncryptedShare>,
}

/// Coordinator → device after step 2: the shares addressed to the recipient
/// by its neighbours that completed step 2. The recipient masks against
/// exactly these neighbours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareDelivery {
    /// The round.
    pub round: u64,
    /// The device they are addressed to.
    pub recipient: PartyId,
    /// The shares, each with `recipient` as its recipient.
    pub shares: Vec<EncryptedShare>,
}

/// Step 3, device → coordinator: the masked, quantized update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskedInput {
    /// The round.
    pub round: u64,
    /// The sending device.
    pub sender: PartyId,
    /// `q(x) + PRG(b) + Σ ±PRG(s_ij)` modulo 2³²: uniformly random to anyone
    /// without the seeds.
    pub values: Vec<u32>,
}

/// Coordinator → device after step 3: the recipient's neighbours it masked
/// against, split into those whose masked input arrived and those whose did
/// not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmaskRequest {
    /// The round.
    pub round: u64,
    /// The device asked.
    pub recipient: PartyId,
    /// Neighbours whose masked input arrived: reveal their self-mask shares.
    pub survivors: Vec<PartyId>,
    /// Neighbours whose masked input did not arrive: reveal their mask-key
    /// shares.
    pub dropped: Vec<PartyId>,
}

/// One revealed share of a neighbour's secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevealedShare {
    /// Whose secret it is a share of.
    pub owner: PartyId,
    /// The share.
    pub share: SecretShare,
}

/// Step 4, device → coordinator: the shares an [`UnmaskRequest`] asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnmaskResponse {
    /// The round.
    pub round: u64,
    /// The sending device.
    pub sender: PartyId,
    /// Shares of the survivors' self-mask seeds.
    pub self_mask_shares: Vec<RevealedShare>,
    /// Shares of the dropped neighbours' mask keys.
    pub mask_key_shares: Vec<RevealedShare>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::crypto::generate_identity;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn signatures_cover_every_field() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let id = generate_identity(&mut rng);
        let adv = Advertisement::sign(3, PartyId(4), &id, [1; 32], [2; 32], [3; 32]);
        assert_eq!(adv.verify().unwrap(), id.verifying_key());
        let other = generate_identity(&mut rng);
        let tampered: Vec<Advertisement> = vec![
            Advertisement {
                round: 4,
                ..adv.clone()
            },
            Advertisement {
                party: PartyId(5),
                ..adv.clone()
            },
            Advertisement {
                identity: other.verifying_key().to_bytes(),
                ..adv.clone()
            },
            Advertisement {
                c_public: [9; 32],
                ..adv.clone()
            },
            Advertisement {
                s_public: [9; 32],
                ..adv.clone()
            },
            Advertisement {
                self_mask_commitment: [9; 32],
                ..adv.clone()
            },
            Advertisement {
                identity: [0; 32],
                ..adv.clone()
            },
            {
                let mut a = adv.clone();
                a.signature[10] ^= 4;
                a
            },
        ];
        for t in tampered {
            let err = t.verify().unwrap_err();
            assert_eq!(err.reason(), "bad_signature", "{err}");
            assert!(
                err.to_string().contains(&format!("party {}", t.party)),
                "{err}"
            );
        }
    }
}
