//! Secure aggregation: the coordinator learns the sum of a cohort's updates,
//! never one device's update, and a round still finishes when devices drop out.
//!
//! This module holds what devices and the coordinator share: the primitives
//! and the messages they exchange. The two state machines that drive a round
//! live in `fedrec_client::secagg` (one device) and
//! `fedrec_coordinator::secagg` (one round at the coordinator). Neither does
//! any I/O: inputs are method calls, outputs are return values.
//!
//! # The protocol
//!
//! SecAgg (Bonawitz et al., CCS 2017) with the SecAgg+ neighbour graph
//! (Bell et al., CCS 2020): each device shares its secrets with, and masks
//! against, only its `k` neighbours in a random regular graph, so work and
//! traffic per device grow with `k ≈ 2 log2 n` rather than the cohort size
//! `n`. Updates are quantized into the ring of integers modulo 2³²
//! ([`Quantizer`]).
//!
//! | step | device → coordinator | coordinator → device |
//! |---|---|---|
//! | 1. advertise keys | [`Advertisement`]: two fresh X25519 public keys `c` (share encryption) and `s` (pairwise masks), a hash commitment to its self-mask seed `b`, signed with its Ed25519 identity key | [`Roster`]: every participant, a public graph seed, and the advertisements of the recipient's neighbours |
//! | 2. share keys | [`ShareKeys`]: `t`-of-`k` Shamir shares of `b` and of the `s` secret key, one encrypted [`EncryptedShare`] per neighbour | [`ShareDelivery`]: the shares addressed to the recipient, from neighbours that completed step 2 |
//! | 3. masked input | [`MaskedInput`]: `y = x + PRG(b) + Σ ±PRG(s_ij)` over its neighbours `j` that completed step 2 | [`UnmaskRequest`]: which of its neighbours sent a masked input (survivors) and which did not (dropped) |
//! | 4. unmask | [`UnmaskResponse`]: its shares of the survivors' `b` and of the dropped neighbours' `s` secret keys | — |
//!
//! The coordinator adds the masked inputs as they arrive. Pairwise masks
//! between two survivors cancel in the sum; it removes each survivor's
//! self mask `PRG(b_i)` after reconstructing `b_i` from `t` shares, and the
//! masks a dropped device `j` shared with its surviving neighbours after
//! reconstructing `j`'s `s` secret key.
//!
//! # Why a single update stays hidden
//!
//! A survivor's masked input is hidden by its self mask and a dropped
//! device's never arrived; the coordinator could undo both masks of one
//! device only with `t` shares of each of its two secrets. An honest device
//! reveals, for each neighbour, at most one of the two shares it holds, and it
//! answers one unmask request only. With `2t > k` (enforced by
//! [`SecAggConfig::params`]) no coordinator can gather `t` shares of both
//! secrets of a device from its honest neighbours, whatever it tells them.
//! Corrupt neighbours colluding with the coordinator reveal both, so a
//! device's update stays hidden as long as fewer than `2t − k` of its
//! neighbours collude (`k / 3` with the default threshold of two thirds).
//!
//! What secure aggregation does not give: protection of the sum (combine it
//! with differential privacy for that), robustness against malicious devices
//! (a device can add any value in the ring, or mask inconsistently and spoil
//! the round), or authentication of devices beyond the identity keys the
//! caller trusts (without a PKI the coordinator can invent devices).
//!
//! # How the pieces fit
//!
//! - [`config`]: [`SecAggConfig`] (neighbours, threshold, quantization) and the
//!   per-round [`RoundParams`] both sides derive from it and the cohort size.
//! - [`quantize`]: [`Quantizer`], fixed-point encoding into `u32` and decoding
//!   of sums.
//! - [`graph`]: [`NeighbourGraph`], the seeded random `k`-regular graph.
//! - [`crypto`]: key pairs, key agreement, key derivation, share encryption,
//!   advertisement signatures and the self-mask commitment.
//! - [`shamir`]: `t`-of-`k` sharing of 32-byte secrets.
//! - [`prg`]: expansion of a 32-byte seed into a `u32` mask (the hot path).
//! - [`messages`]: the plain message structs of the table above.
//! - [`payload`]: what a device masks (its clipped update scaled by its
//!   weight, the weight, its evaluation counts) and how the sum is read.
//! - [`wire`]: their conversions to and from the protobuf messages of
//!   `fedrec.proto`.
//! - [`SecAggError`]: every way a message or a call can be refused.
//!
//! ```
//! use fedrec_proto::secagg::{Quantizer, SecAggConfig};
//!
//! let config = SecAggConfig::default();
//! let params = config.params(100).unwrap();
//! assert_eq!(params.neighbours, 14); // 2·⌈log2 100⌉
//! assert_eq!(params.threshold, 10); // ⌈14 · 2/3⌉
//!
//! let q: Quantizer = config.quantizer().unwrap();
//! let mut sum = vec![0_u32; 2];
//! q.add_quantized(&[0.25, -1.0], &mut sum).unwrap();
//! q.add_quantized(&[0.5, 3.0], &mut sum).unwrap(); // 3.0 is clipped to 1.0
//! let mut out = [0.0_f32; 2];
//! q.decode_sum(&sum, 2, &mut out).unwrap();
//! assert!((out[0] - 0.75).abs() <= 2.0 * q.max_error() as f32);
//! assert!(out[1].abs() <= 2.0 * q.max_error() as f32);
//! ```

pub mod config;
pub mod crypto;
mod error;
pub mod graph;
pub mod messages;
pub mod payload;
pub mod prg;
pub mod quantize;
pub mod shamir;
pub mod wire;

use std::fmt;

pub use config::{RoundParams, SecAggConfig};
pub use error::{AbandonReason, SecAggError, SecretKind};
pub use graph::NeighbourGraph;
pub use messages::{
    Advertisement, EncryptedShare, MaskedInput, RevealedShare, Roster, ShareDelivery, ShareKeys,
    UnmaskRequest, UnmaskResponse,
};
pub use quantize::Quantizer;
pub use shamir::SecretShare;

/// Identifies a device within one secure aggregation round.
///
/// Chosen by the coordinator (for example the device's position in the
/// cohort) and unique within the round. It is shown to the device's
/// neighbours, so it must not be a secret such as a bearer token. Parties are
/// ordered by id: the order fixes the graph and the sign of pairwise masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartyId(pub u64);

impl fmt::Display for PartyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The steps of a round, in order, and the two ways it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Step {
    /// 1: devices advertise their public keys.
    Advertise,
    /// 2: devices send encrypted shares of their secrets to their neighbours.
    ShareKeys,
    /// 3: devices send their masked inputs.
    MaskedInput,
    /// 4: survivors reveal the shares needed to remove the masks.
    Unmask,
    /// The round produced its sum (or, on a device, sent its last message).
    Finished,
    /// The coordinator gave up on the round; nothing was output.
    Abandoned,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Advertise => "advertise keys",
            Self::ShareKeys => "share keys",
            Self::MaskedInput => "masked input",
            Self::Unmask => "unmask",
            Self::Finished => "finished",
            Self::Abandoned => "abandoned",
        })
    }
}

/// A 32-byte seed or key, wiped from memory when dropped.
pub type Secret32 = zeroize::Zeroizing<[u8; 32]>;
