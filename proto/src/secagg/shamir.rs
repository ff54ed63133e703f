//! `t`-of-`k` Shamir secret sharing of 32-byte secrets.
//!
//! Each byte of the secret is shared independently over GF(2⁸) by the
//! [blahaj](https://docs.rs/blahaj) crate (a maintained fork of `sharks`):
//! a random polynomial of degree `t − 1` per byte, evaluated at the points
//! `1..=k`. Any `t` shares give the secret back; `t − 1` shares are
//! independent of it. At most 255 shares per secret, which bounds the number
//! of neighbours.
//!
//! In secure aggregation the share with evaluation point `s + 1` goes to the
//! neighbour in slot `s` of the owner's sorted neighbour list
//! ([`NeighbourGraph::share_index`](super::NeighbourGraph::share_index)), so
//! every party can check which share a holder must have.

use std::fmt;

use blahaj::{Share, Sharks};
use rand_core::CryptoRng;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::{SecAggError, Secret32};

/// The most shares a secret can be split into.
pub const MAX_SHARES: usize = 255;

/// One share of a 32-byte secret: the evaluation point and the 32 values
/// there. Wiped from memory when dropped; `Debug` shows the index only.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct SecretShare {
    index: u8,
    value: [u8; 32],
}

impl fmt::Debug for SecretShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretShare")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl SecretShare {
    /// Length of [`to_bytes`](Self::to_bytes).
    pub const LEN: usize = 33;

    /// A share with evaluation point `index` (never 0: the secret itself sits
    /// there).
    pub fn new(index: u8, value: [u8; 32]) -> Result<Self, SecAggError> {
        if index == 0 {
            return Err(SecAggError::Shamir("share index 0 is not allowed".into()));
        }
        Ok(Self { index, value })
    }

    /// The evaluation point, in `1..=255`.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The share's values.
    pub fn value(&self) -> &[u8; 32] {
        &self.value
    }

    /// The index followed by the 32 values.
    pub fn to_bytes(&self) -> zeroize::Zeroizing<[u8; Self::LEN]> {
        let mut out = zeroize::Zeroizing::new([0_u8; Self::LEN]);
        out[0] = self.index;
        out[1..].copy_from_slice(&self.value);
        out
    }

    /// Parses [`to_bytes`](Self::to_bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SecAggError> {
        let Some((&index, value)) = bytes.split_first() else {
            return Err(SecAggError::Shamir("empty share".into()));
        };
        let value: [u8; 32] = value.try_into().map_err(|_| {
            SecAggError::Shamir(format!(
                "a share is {} bytes, got {}",
                Self::LEN,
                bytes.len()
            ))
        })?;
        Self::new(index, value)
    }
}

/// Splits `secret` into `shares` shares (evaluation points `1..=shares`), any
/// `threshold` of which reconstruct it.
///
/// Needs `1 <= threshold <= shares <= 255`.
pub fn split(
    secret: &[u8; 32],
    threshold: usize,
    shares: usize,
    rng: &mut impl CryptoRng,
) -> Result<Vec<SecretShare>, SecAggError> {
    if !(1 <= threshold && threshold <= shares && shares <= MAX_SHARES) {
        return Err(SecAggError::Shamir(format!(
            "need 1 <= threshold <= shares <= {MAX_SHARES}, got threshold {threshold} and {shares} shares"
        )));
    }
    // `threshold <= 255` was just checked.
    let dealer = Sharks(threshold as u8).dealer_rng(secret, rng);
    dealer
        .take(shares)
        .map(|share| {
            let bytes = zeroize::Zeroizing::new(Vec::from(&share));
            SecretShare::from_bytes(&bytes)
        })
        .collect()
}

/// Reconstructs a secret from at least `threshold` shares with distinct
/// indices; uses the first `threshold` of them.
///
/// Shares of another secret, or altered ones, give a wrong secret, not an
/// error: check the result against a commitment when that matters.
pub fn combine(shares: &[SecretShare], threshold: usize) -> Result<Secret32, SecAggError> {
    if threshold == 0 || threshold > MAX_SHARES {
        return Err(SecAggError::Shamir(format!(
            "threshold must be in 1..={MAX_SHARES}, got {threshold}"
        )));
    }
    if shares.len() < threshold {
        return Err(SecAggError::Shamir(format!(
            "{threshold} shares are needed, got {}",
            shares.len()
        )));
    }
    let used = &shares[..threshold];
    let mut seen = [false; 256];
    for s in used {
        if std::mem::replace(&mut seen[usize::from(s.index)], true) {
            return Err(SecAggError::Shamir(format!(
                "two shares have index {}",
                s.index
            )));
        }
    }
    let parsed = used
        .iter()
        .map(|s| Share::try_from(&s.to_bytes()[..]))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SecAggError::Shamir(e.into()))?;
    let secret = zeroize::Zeroizing::new(
        Sharks(threshold as u8)
            .recover(&parsed)
            .map_err(|e| SecAggError::Shamir(e.into()))?,
    );
    let mut out = Secret32::default();
    out.copy_from_slice(secret.get(..32).ok_or_else(|| {
        SecAggError::Shamir(format!("recovered {} bytes, expected 32", secret.len()))
    })?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::{Rng, SeedableRng};

    fn secret(rng: &mut ChaCha20Rng) -> [u8; 32] {
        let mut s = [0; 32];
        rng.fill_bytes(&mut s);
        s
    }

    /// All `r`-element subsets of `0..n`.
    fn subsets(n: usize, r: usize) -> Vec<Vec<usize>> {
        if r == 0 {
            return vec![vec![]];
        }
        if n < r {
            return vec![];
        }
        let mut with: Vec<Vec<usize>> = subsets(n - 1, r - 1);
        for s in &mut with {
            s.push(n - 1);
        }
        with.extend(subsets(n - 1, r));
        with
    }

    #[test]
    fn any_threshold_shares_reconstruct() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        for (t, k) in [(1, 1), (1, 2), (2, 3), (3, 5), (4, 7), (5, 8)] {
            let s = secret(&mut rng);
            let shares = split(&s, t, k, &mut rng).unwrap();
            assert_eq!(shares.len(), k);
            assert!(
                shares
                    .iter()
                    .enumerate()
                    .all(|(i, sh)| usize::from(sh.index()) == i + 1)
            );
            for subset in subsets(k, t) {
                let picked: Vec<SecretShare> = subset.iter().map(|&i| shares[i].clone()).collect();
                assert_eq!(*combine(&picked, t).unwrap(), s, "t {t} k {k} {subset:?}");
            }
            // More than t shares: the first t are used.
            assert_eq!(*combine(&shares, t).unwrap(), s);
        }
        let s = secret(&mut rng);
        let shares = split(&s, 170, 255, &mut rng).unwrap();
        assert_eq!(*combine(&shares[85..], 170).unwrap(), s);
    }

    #[test]
    fn fewer_than_threshold_shares_do_not() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let s = secret(&mut rng);
        let shares = split(&s, 4, 6, &mut rng).unwrap();
        let err = combine(&shares[..3], 4).unwrap_err();
        assert!(
            err.to_string().contains("4 shares are needed, got 3"),
            "{err}"
        );
        // Interpolating t − 1 shares as if the threshold were t − 1 gives
        // something unrelated to the secret.
        for subset in subsets(6, 3) {
            let picked: Vec<SecretShare> = subset.iter().map(|&i| shares[i].clone()).collect();
            assert_ne!(*combine(&picked, 3).unwrap(), s);
        }
        // t − 1 shares are consistent with every secret: for each candidate
        // first byte there is a sharing that agrees with them.
        let t = 2;
        let s = secret(&mut rng);
        let shares = split(&s, t, 3, &mut rng).unwrap();
        let mut reachable = [false; 256];
        for _ in 0..4000 {
            let other = secret(&mut rng);
            let again = split(&other, t, 3, &mut rng).unwrap();
            if again[0].value()[0] == shares[0].value()[0] {
                reachable[usize::from(other[0])] = true;
            }
        }
        assert!(reachable.iter().filter(|r| **r).count() > 5);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let s = secret(&mut rng);
        for (t, k) in [(0, 3), (4, 3), (2, 256)] {
            assert_eq!(split(&s, t, k, &mut rng).unwrap_err().reason(), "shamir");
        }
        let shares = split(&s, 2, 3, &mut rng).unwrap();
        let dup = [shares[0].clone(), shares[0].clone()];
        let err = combine(&dup, 2).unwrap_err();
        assert!(err.to_string().contains("two shares have index 1"), "{err}");
        assert!(combine(&shares, 0).is_err());
        assert!(SecretShare::new(0, [0; 32]).is_err());
        assert!(SecretShare::from_bytes(&[1; 32]).is_err());
        let bytes = shares[1].to_bytes();
        assert_eq!(SecretShare::from_bytes(&bytes[..]).unwrap(), shares[1]);
        assert!(!format!("{:?}", shares[1]).contains("value"));
    }
}
