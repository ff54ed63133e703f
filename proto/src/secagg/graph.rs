//! The SecAgg+ neighbour graph: a random `k`-regular graph that every party
//! computes identically from the sorted participants and a public seed.
//!
//! Construction (a Harary graph over a random permutation, as in Bell et al.
//! 2020): the seed drives a Fisher–Yates shuffle that places the `n` parties
//! on a ring; each party is joined to the `⌊k/2⌋` nearest parties on either
//! side, and for odd `k` also to the party opposite it. Odd `k` needs an even
//! `n`; for odd `n` it is raised to `k + 1` ([`effective_degree`]). Every
//! party has exactly `k` neighbours, and neighbourhood is symmetric.
//!
//! The shuffle draws from [`Prg`] keyed with `SHA-256(label ‖ seed ‖ n)`, and
//! samples without bias, so the graph depends only on the seed and the
//! parties, on every platform and version of this crate that speaks protocol
//! version 1.

use sha2::{Digest, Sha256};

use super::crypto::PROTOCOL_LABEL;
use super::prg::Prg;
use super::{PartyId, SecAggError};

/// The default number of neighbours for `n` parties: `2 · ⌈log2 n⌉`, at most
/// `n − 1` (then rounded by [`effective_degree`]).
pub fn default_degree(n: usize) -> usize {
    if n < 2 {
        return 0;
    }
    let log2 = (usize::BITS - (n - 1).leading_zeros()) as usize;
    effective_degree(n, 2 * log2)
}

/// The degree the graph really has when `requested` neighbours are asked for
/// among `n` parties: at most `n − 1`, and even when `n` is odd.
pub fn effective_degree(n: usize, requested: usize) -> usize {
    let k = requested.min(n.saturating_sub(1));
    if k % 2 == 1 && n % 2 == 1 { k + 1 } else { k }
}

/// Neighbour lists of the parties of one round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighbourGraph {
    parties: Vec<PartyId>,
    degree: usize,
    /// Row `i` (`degree` entries, sorted) lists the indices of party `i`'s
    /// neighbours.
    adjacency: Vec<u32>,
}

impl NeighbourGraph {
    /// The graph of `parties` (strictly increasing ids, at least 2) with
    /// `degree` neighbours each (`1..n`, and even if `n` is odd: pass
    /// [`effective_degree`]), from the coordinator's public `seed`.
    pub fn new(parties: Vec<PartyId>, degree: usize, seed: &[u8; 32]) -> Result<Self, SecAggError> {
        let n = parties.len();
        if n < 2 {
            return Err(SecAggError::MalformedRoster(format!(
                "a round needs at least 2 parties, got {n}"
            )));
        }
        if n > u32::MAX as usize {
            return Err(SecAggError::MalformedRoster(format!(
                "{n} parties are too many"
            )));
        }
        if let Some(w) = parties.windows(2).find(|w| w[0] >= w[1]) {
            return Err(SecAggError::MalformedRoster(format!(
                "parties must be sorted and distinct, got {} before {}",
                w[0], w[1]
            )));
        }
        if degree == 0 || degree != effective_degree(n, degree) {
            return Err(SecAggError::InvalidConfig(format!(
                "a graph of {n} parties cannot have degree {degree}"
            )));
        }

        // Ring position -> party index.
        let mut ring: Vec<u32> = (0..n as u32).collect();
        let mut prg = Prg::new(&shuffle_key(seed, n));
        for i in (1..n).rev() {
            let j = prg.below(i as u32 + 1) as usize;
            ring.swap(i, j);
        }
        let mut position = vec![0_usize; n];
        for (pos, &party) in ring.iter().enumerate() {
            position[party as usize] = pos;
        }

        let half = degree / 2;
        let mut adjacency = Vec::with_capacity(n * degree);
        for &pos in &position {
            let start = adjacency.len();
            for off in 1..=half {
                adjacency.push(ring[(pos + off) % n]);
                adjacency.push(ring[(pos + n - off) % n]);
            }
            if degree % 2 == 1 {
                adjacency.push(ring[(pos + n / 2) % n]);
            }
            adjacency[start..].sort_unstable();
        }
        Ok(Self {
            parties,
            degree,
            adjacency,
        })
    }

    /// The parties, sorted.
    pub fn parties(&self) -> &[PartyId] {
        &self.parties
    }

    /// Number of parties.
    pub fn len(&self) -> usize {
        self.parties.len()
    }

    /// Always false: a graph has at least 2 parties.
    pub fn is_empty(&self) -> bool {
        self.parties.is_empty()
    }

    /// Neighbours per party.
    pub fn degree(&self) -> usize {
        self.degree
    }

    /// The position of `party` in [`parties`](Self::parties).
    pub fn index_of(&self, party: PartyId) -> Option<usize> {
        self.parties.binary_search(&party).ok()
    }

    /// The party at `index`. Panics if `index >= len()`.
    pub fn party(&self, index: usize) -> PartyId {
        self.parties[index]
    }

    /// Indices of the neighbours of the party at `index`, sorted (so also in
    /// party order). Panics if `index >= len()`.
    pub fn neighbours(&self, index: usize) -> &[u32] {
        &self.adjacency[index * self.degree..(index + 1) * self.degree]
    }

    /// The slot of `holder` in the sorted neighbour list of `owner`, or `None`
    /// if they are not neighbours.
    pub fn slot(&self, owner: usize, holder: usize) -> Option<usize> {
        self.neighbours(owner).binary_search(&(holder as u32)).ok()
    }

    /// Whether the parties at indices `a` and `b` are neighbours.
    pub fn are_neighbours(&self, a: usize, b: usize) -> bool {
        self.slot(a, b).is_some()
    }

    /// The evaluation point of the share of `owner`'s secrets that `holder`
    /// gets: its slot plus one. `None` if they are not neighbours.
    pub fn share_index(&self, owner: usize, holder: usize) -> Option<u8> {
        // A degree is at most 255 (the shares per secret), so slot + 1 fits.
        self.slot(owner, holder)
            .and_then(|s| u8::try_from(s + 1).ok())
    }
}

/// The key of the shuffle: the coordinator's seed, domain-separated and bound
/// to the number of parties.
fn shuffle_key(seed: &[u8; 32], n: usize) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(PROTOCOL_LABEL);
    h.update(b"/graph");
    h.update(seed);
    h.update((n as u64).to_be_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parties(n: u64) -> Vec<PartyId> {
        (0..n).map(|i| PartyId(10 + 3 * i)).collect()
    }

    #[test]
    fn degrees() {
        assert_eq!(default_degree(1), 0);
        assert_eq!(default_degree(2), 1);
        assert_eq!(default_degree(3), 2);
        assert_eq!(default_degree(4), 3);
        assert_eq!(default_degree(5), 4);
        assert_eq!(default_degree(10), 8);
        assert_eq!(default_degree(50), 12);
        assert_eq!(default_degree(100), 14);
        assert_eq!(default_degree(500), 18);
        assert_eq!(default_degree(1024), 20);
        assert_eq!(default_degree(1025), 22);
        assert_eq!(effective_degree(7, 3), 4);
        assert_eq!(effective_degree(8, 3), 3);
        assert_eq!(effective_degree(8, 30), 7);
        assert_eq!(effective_degree(9, 30), 8);
    }

    #[test]
    fn graphs_are_regular_symmetric_and_deterministic() {
        for n in [2_u64, 3, 4, 5, 8, 9, 10, 31, 50, 64, 101] {
            let n_us = n as usize;
            for k in [1, 2, 3, 4, 5, 8, 12, 100] {
                let k = effective_degree(n_us, k);
                let g = NeighbourGraph::new(parties(n), k, &[n as u8; 32]).unwrap();
                assert_eq!(g.degree(), k);
                for i in 0..n_us {
                    let row = g.neighbours(i);
                    assert_eq!(row.len(), k, "n {n} k {k}");
                    assert!(row.windows(2).all(|w| w[0] < w[1]), "sorted, no duplicates");
                    assert!(!row.contains(&(i as u32)), "no self loops");
                    for (slot, &j) in row.iter().enumerate() {
                        assert!(g.are_neighbours(j as usize, i), "symmetric");
                        assert_eq!(g.slot(i, j as usize), Some(slot));
                        assert_eq!(g.share_index(i, j as usize), Some(slot as u8 + 1));
                    }
                }
                let again = NeighbourGraph::new(parties(n), k, &[n as u8; 32]).unwrap();
                assert_eq!(g, again);
            }
        }
    }

    #[test]
    fn the_seed_changes_the_graph_and_the_graph_is_connected() {
        let a = NeighbourGraph::new(parties(200), 16, &[1; 32]).unwrap();
        let b = NeighbourGraph::new(parties(200), 16, &[2; 32]).unwrap();
        assert_ne!(a, b);
        // A Harary graph on a ring is connected.
        let mut seen = [false; 200];
        let mut stack = vec![0_usize];
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            stack.extend(a.neighbours(i).iter().map(|&j| j as usize));
        }
        assert!(seen.iter().all(|s| *s));
        // Neighbours are spread over the id space, not just the adjacent ids.
        let far = (0..200)
            .flat_map(|i| {
                a.neighbours(i)
                    .iter()
                    .map(move |&j| (j as i64 - i as i64).abs())
            })
            .filter(|d| *d > 20)
            .count();
        assert!(far > 200 * 16 / 2, "{far}");
        // The stream is pinned: this must not change within protocol version 1.
        assert_eq!(a.neighbours(0)[..4], [3, 4, 10, 16]);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let err = NeighbourGraph::new(vec![PartyId(1)], 1, &[0; 32]).unwrap_err();
        assert!(err.to_string().contains("at least 2"), "{err}");
        let err = NeighbourGraph::new(vec![PartyId(2), PartyId(1)], 1, &[0; 32]).unwrap_err();
        assert!(err.to_string().contains("sorted"), "{err}");
        let err = NeighbourGraph::new(vec![PartyId(1), PartyId(1)], 1, &[0; 32]).unwrap_err();
        assert_eq!(err.reason(), "malformed_roster");
        for (n, k) in [(5, 3), (5, 5), (4, 0)] {
            let err = NeighbourGraph::new(parties(n), k, &[0; 32]).unwrap_err();
            assert_eq!(err.reason(), "invalid_config", "{n} {k}");
        }
        let g = NeighbourGraph::new(parties(4), 2, &[0; 32]).unwrap();
        assert_eq!(g.index_of(PartyId(13)), Some(1));
        assert_eq!(g.index_of(PartyId(11)), None);
        assert_eq!(g.party(3), PartyId(19));
    }
}
