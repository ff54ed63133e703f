//! Key agreement, key derivation, share encryption and the self-mask
//! commitment. Only audited RustCrypto and dalek primitives are used;
//! this module fixes how they are combined.
//!
//! - **Key agreement**: X25519. Each device makes two fresh key pairs per
//!   round, `c` (to encrypt shares) and `s` (for pairwise masks). A shared
//!   secret that is all zeros (the peer's key is a low-order point) is refused.
//! - **Key derivation**: HKDF-SHA256, salt [`PROTOCOL_LABEL`], with a distinct
//!   `info` per use, each binding the round and the parties:
//!   `label ‖ "/share-key" ‖ round ‖ sender ‖ recipient` for the key that
//!   encrypts the shares one device sends another (one key per direction),
//!   and `label ‖ "/mask-seed" ‖ round ‖ min(i, j) ‖ max(i, j)` for the seed of
//!   the pairwise mask (the same on both sides). Integers are big-endian.
//! - **Share encryption**: ChaCha20-Poly1305 with associated data
//!   `label ‖ "/share" ‖ round ‖ sender ‖ recipient`, so a share cannot be
//!   replayed to another recipient, as if from another sender, or into
//!   another round. The nonce is fixed (all zeros): each key encrypts exactly
//!   one message, since it is derived from fresh per-round keys and the
//!   ordered pair of parties.
//! - **Self-mask commitment**: `SHA-256(label ‖ "/self-mask" ‖ round ‖ party ‖ b)`,
//!   published in the signed advertisement so the coordinator can check the
//!   seed it reconstructs. `b` is 32 uniformly random bytes, so the hash
//!   reveals nothing usable about it.
//! - **Signatures**: Ed25519 over [`Advertisement::transcript`], verified
//!   with `verify_strict` (no malleable signatures, no weak keys).
//!
//! [`Advertisement::transcript`]: super::Advertisement::transcript

use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use hkdf::Hkdf;
use rand_core::CryptoRng;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

use super::{EncryptedShare, PartyId, SecAggError, Secret32, SecretShare};

/// Prefix of every label, salt, transcript and associated data of the
/// protocol (version 1).
pub const PROTOCOL_LABEL: &[u8] = b"fedrec/secagg/v1";

/// Plaintext of one encrypted share: the self-mask share then the mask-key
/// share.
const SHARE_PLAINTEXT_LEN: usize = 2 * SecretShare::LEN;

/// Length of an [`EncryptedShare`]'s ciphertext (plaintext plus a 16-byte
/// tag).
pub const SHARE_CIPHERTEXT_LEN: usize = SHARE_PLAINTEXT_LEN + 16;

/// A fresh Ed25519 identity key for a device.
pub fn generate_identity(rng: &mut impl CryptoRng) -> SigningKey {
    let mut bytes = Secret32::default();
    rng.fill_bytes(&mut bytes[..]);
    SigningKey::from_bytes(&bytes)
}

/// 32 fresh random bytes (a self-mask seed, a graph seed).
pub fn random_seed(rng: &mut impl CryptoRng) -> Secret32 {
    let mut seed = Secret32::default();
    rng.fill_bytes(&mut seed[..]);
    seed
}

/// An X25519 key pair; the secret is wiped when dropped.
pub struct KeyPair {
    secret: StaticSecret,
    public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh key pair.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        Self::from_secret(StaticSecret::random_from_rng(rng))
    }

    /// The key pair of a secret key given as bytes (a reconstructed one).
    pub fn from_secret_bytes(bytes: &[u8; 32]) -> Self {
        Self::from_secret(StaticSecret::from(*bytes))
    }

    fn from_secret(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    /// The public key.
    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    /// The secret key's bytes (to be secret-shared).
    pub fn secret_bytes(&self) -> Secret32 {
        Secret32::new(self.secret.to_bytes())
    }

    /// The X25519 shared secret with `peer`'s public key. Refused if `peer`'s
    /// key is a low-order point (the result would be all zeros).
    pub fn agree(&self, peer_public: &[u8; 32], peer: PartyId) -> Result<Secret32, SecAggError> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer_public));
        if !shared.was_contributory() {
            return Err(SecAggError::WeakKey { party: peer });
        }
        Ok(Secret32::new(shared.to_bytes()))
    }
}

/// Whether an X25519 public key is a low-order point, so that agreement with
/// it gives all zeros whatever the secret key. The coordinator can check this
/// without any secret.
///
/// X25519 clamps every scalar to a multiple of the cofactor 8, so the result
/// is zero for any scalar exactly when the point's order divides 8. The
/// u-coordinates of those points on the curve and its twist are 0, 1, −1 and
/// two points of order 8; with the non-canonical encodings `p` and `p + 1`
/// and the ignored top bit, that is the list below (libsodium's
/// `has_small_order`). A comparison instead of a scalar multiplication: the
/// coordinator checks two keys per device. The test checks the list against
/// an actual agreement.
pub fn is_weak_public_key(public: &[u8; 32]) -> bool {
    let mut key = *public;
    // X25519 ignores the top bit of the u-coordinate.
    key[31] &= 0x7f;
    LOW_ORDER.contains(&key)
}

/// The encodings (top bit clear) of the u-coordinates of low-order points.
const LOW_ORDER: [[u8; 32]; 7] = {
    let mut p_minus_1 = [0xff_u8; 32];
    p_minus_1[0] = 0xec;
    p_minus_1[31] = 0x7f;
    let mut p = p_minus_1;
    p[0] = 0xed;
    let mut p_plus_1 = p_minus_1;
    p_plus_1[0] = 0xee;
    let mut one = [0_u8; 32];
    one[0] = 1;
    [
        // 0 (order 2 on the curve, 4 with the point at infinity's encoding)
        [0; 32],
        // 1 (order 4)
        one,
        // 325606250916557431795983626356110631294008115727848805560023387167927233504 (order 8)
        [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ],
        // 39382357235489614581723060781553021112529911719440698176882885853963445705823 (order 8)
        [
            0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83,
            0xef, 0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd,
            0xd0, 0x9f, 0x11, 0x57,
        ],
        // p − 1 (order 2 on the twist)
        p_minus_1,
        // p ≡ 0
        p,
        // p + 1 ≡ 1
        p_plus_1,
    ]
};

/// HKDF-SHA256 of `shared` with `info = label ‖ use_label ‖ round ‖ a ‖ b`.
fn derive(shared: &[u8; 32], use_label: &[u8], round: u64, a: PartyId, b: PartyId) -> Secret32 {
    let info = [
        PROTOCOL_LABEL,
        use_label,
        &round.to_be_bytes(),
        &a.0.to_be_bytes(),
        &b.0.to_be_bytes(),
    ]
    .concat();
    let mut out = Secret32::default();
    Hkdf::<Sha256>::new(Some(PROTOCOL_LABEL), shared)
        .expand(&info, &mut out[..])
        // 32 bytes is far below HKDF-SHA256's limit of 255 · 32.
        .expect("HKDF can expand 32 bytes");
    out
}

/// The key encrypting the shares `sender` sends `recipient`, from their `c`
/// shared secret.
pub fn share_key(shared: &[u8; 32], round: u64, sender: PartyId, recipient: PartyId) -> Secret32 {
    derive(shared, b"/share-key", round, sender, recipient)
}

/// The seed of the pairwise mask of `a` and `b` (in either order), from
/// their `s` shared secret.
pub fn mask_seed(shared: &[u8; 32], round: u64, a: PartyId, b: PartyId) -> Secret32 {
    derive(shared, b"/mask-seed", round, a.min(b), a.max(b))
}

/// The commitment to `party`'s self-mask seed.
pub fn self_mask_commitment(round: u64, party: PartyId, seed: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(PROTOCOL_LABEL);
    h.update(b"/self-mask");
    h.update(round.to_be_bytes());
    h.update(party.0.to_be_bytes());
    h.update(seed);
    h.finalize().into()
}

/// Associated data of a share ciphertext.
fn share_aad(round: u64, sender: PartyId, recipient: PartyId) -> Vec<u8> {
    [
        PROTOCOL_LABEL,
        b"/share",
        &round.to_be_bytes(),
        &sender.0.to_be_bytes(),
        &recipient.0.to_be_bytes(),
    ]
    .concat()
}

/// Encrypts `sender`'s shares of its two secrets for `recipient` under `key`
/// (from [`share_key`]).
pub fn encrypt_shares(
    key: &[u8; 32],
    round: u64,
    sender: PartyId,
    recipient: PartyId,
    self_mask: &SecretShare,
    mask_key: &SecretShare,
) -> EncryptedShare {
    let mut plaintext = zeroize::Zeroizing::new([0_u8; SHARE_PLAINTEXT_LEN]);
    plaintext[..SecretShare::LEN].copy_from_slice(&self_mask.to_bytes()[..]);
    plaintext[SecretShare::LEN..].copy_from_slice(&mask_key.to_bytes()[..]);
    let aad = share_aad(round, sender, recipient);
    let ciphertext = ChaCha20Poly1305::new(key.into())
        .encrypt(
            &Default::default(),
            Payload {
                msg: &plaintext[..],
                aad: &aad,
            },
        )
        // Encryption fails only for messages longer than 256 GiB.
        .expect("a 66-byte message encrypts");
    EncryptedShare {
        sender,
        recipient,
        ciphertext,
    }
}

/// Decrypts an [`EncryptedShare`] of `round` under `key`: the sender's share
/// of its self-mask seed, then of its mask key.
pub fn decrypt_shares(
    key: &[u8; 32],
    round: u64,
    share: &EncryptedShare,
) -> Result<(SecretShare, SecretShare), SecAggError> {
    let failed = || SecAggError::Decryption {
        sender: share.sender,
        recipient: share.recipient,
    };
    if share.ciphertext.len() != SHARE_CIPHERTEXT_LEN {
        return Err(failed());
    }
    let aad = share_aad(round, share.sender, share.recipient);
    let plaintext = zeroize::Zeroizing::new(
        ChaCha20Poly1305::new(key.into())
            .decrypt(
                &Default::default(),
                Payload {
                    msg: &share.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| failed())?,
    );
    let (b, s) = plaintext.split_at(SecretShare::LEN);
    Ok((
        SecretShare::from_bytes(b).map_err(|_| failed())?,
        SecretShare::from_bytes(s).map_err(|_| failed())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn agreement_is_symmetric_and_derivations_are_separated() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let (a, b) = (KeyPair::generate(&mut rng), KeyPair::generate(&mut rng));
        let (pa, pb) = (PartyId(1), PartyId(2));
        let ab = a.agree(b.public(), pb).unwrap();
        let ba = b.agree(a.public(), pa).unwrap();
        assert_eq!(*ab, *ba);
        assert_eq!(*mask_seed(&ab, 7, pa, pb), *mask_seed(&ba, 7, pb, pa));
        assert_ne!(*mask_seed(&ab, 7, pa, pb), *mask_seed(&ab, 8, pa, pb));
        assert_ne!(*share_key(&ab, 7, pa, pb), *share_key(&ab, 7, pb, pa));
        assert_ne!(*share_key(&ab, 7, pa, pb), *mask_seed(&ab, 7, pa, pb));
        // A reconstructed secret key gives the same agreement.
        let again = KeyPair::from_secret_bytes(&a.secret_bytes());
        assert_eq!(again.public(), a.public());
        assert_eq!(*again.agree(b.public(), pb).unwrap(), *ab);
        // The identity point (and other low-order points) are refused.
        let err = a.agree(&[0; 32], PartyId(9)).unwrap_err();
        assert_eq!(err, SecAggError::WeakKey { party: PartyId(9) });
        let mut one = [0; 32];
        one[0] = 1;
        assert!(a.agree(&one, PartyId(9)).is_err());
        assert!(is_weak_public_key(&[0; 32]) && is_weak_public_key(&one));
        // The list agrees with an actual agreement, with and without the
        // ignored top bit, and near misses are not weak.
        let probe = |public: &[u8; 32]| {
            !StaticSecret::from([1_u8; 32])
                .diffie_hellman(&PublicKey::from(*public))
                .was_contributory()
        };
        for weak in LOW_ORDER {
            let mut high = weak;
            high[31] |= 0x80;
            assert!(probe(&weak) && probe(&high), "{weak:02x?}");
            assert!(is_weak_public_key(&weak) && is_weak_public_key(&high));
            let mut near = weak;
            near[5] ^= 1;
            assert!(!probe(&near) && !is_weak_public_key(&near), "{near:02x?}");
        }
        assert!(!is_weak_public_key(a.public()) && !is_weak_public_key(b.public()));
        assert!(!format!("{a:?}").contains("secret"));
    }

    #[test]
    fn shares_round_trip_and_are_bound_to_round_sender_and_recipient() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let key = random_seed(&mut rng);
        let b = SecretShare::new(3, [5; 32]).unwrap();
        let s = SecretShare::new(3, [6; 32]).unwrap();
        let (from, to) = (PartyId(4), PartyId(8));
        let enc = encrypt_shares(&key, 1, from, to, &b, &s);
        assert_eq!(enc.ciphertext.len(), SHARE_CIPHERTEXT_LEN);
        let (b2, s2) = decrypt_shares(&key, 1, &enc).unwrap();
        assert_eq!((b2, s2), (b, s));

        let expect_err = |share: &EncryptedShare, round: u64, key: &[u8; 32]| {
            let err = decrypt_shares(key, round, share).unwrap_err();
            assert_eq!(err.reason(), "decryption", "{err}");
        };
        expect_err(&enc, 2, &key);
        expect_err(
            &EncryptedShare {
                recipient: PartyId(9),
                ..enc.clone()
            },
            1,
            &key,
        );
        expect_err(
            &EncryptedShare {
                sender: PartyId(9),
                ..enc.clone()
            },
            1,
            &key,
        );
        for i in [0, 30, SHARE_CIPHERTEXT_LEN - 1] {
            let mut flipped = enc.clone();
            flipped.ciphertext[i] ^= 1;
            expect_err(&flipped, 1, &key);
        }
        let mut short = enc.clone();
        short.ciphertext.pop();
        expect_err(&short, 1, &key);
        expect_err(&enc, 1, &random_seed(&mut rng));
    }

    #[test]
    fn commitments_bind_round_party_and_seed() {
        let c = self_mask_commitment(1, PartyId(2), &[3; 32]);
        assert_ne!(c, self_mask_commitment(2, PartyId(2), &[3; 32]));
        assert_ne!(c, self_mask_commitment(1, PartyId(3), &[3; 32]));
        assert_ne!(c, self_mask_commitment(1, PartyId(2), &[4; 32]));
        assert_eq!(c, self_mask_commitment(1, PartyId(2), &[3; 32]));
    }
}
