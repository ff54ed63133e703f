//! Expansion of a 32-byte seed into a stream of `u32` values.
//!
//! A stream is a ChaCha keystream (the seed as key, an all-zero 96-bit
//! nonce, block counter from 0) read as little-endian `u32` words. Every seed
//! it is used with is fresh per round (a self-mask seed, a pairwise seed
//! derived from that round's keys, or a graph seed), so the fixed nonce never
//! repeats a (key, nonce) pair across different streams.
//!
//! - [`MaskPrg`], the masks: **ChaCha12**. Mask expansion is the hot path of
//!   secure aggregation (a device expands `k + 1` masks of the update's
//!   length, the coordinator one per survivor and a few per drop-out), and 12
//!   rounds run about 1.6 times as fast as 20. The margin stays wide: the best
//!   published attacks reach 7 rounds; ChaCha12 is the stream of Google's
//!   Adiantum disk encryption on Android and of `rand`'s `StdRng`, and
//!   Aumasson ("Too Much Crypto", 2019) argues that 8 rounds suffice.
//! - [`Prg`], everything else (the neighbour graph's shuffle): ChaCha20 as in
//!   RFC 8439, where speed does not matter.
//!
//! The keystream is generated a few KiB at a time into a stack buffer (the
//! cipher picks AVX2 or SSE2 at run time) and added to the target in place:
//! no allocation, no per-value calls.
//!
//! One seed yields at most 2³⁶ values (the 32-bit block counter's limit),
//! far beyond any update.

use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20::{ChaCha12, ChaCha20};
use rayon::prelude::*;

use super::Secret32;

/// Words generated per batch (16 KiB of keystream).
const BATCH: usize = 4096;

/// A seeded stream of `u32` values from the stream cipher `C`.
pub struct Stream<C> {
    cipher: C,
}

/// The general-purpose stream: ChaCha20 (RFC 8439).
pub type Prg = Stream<ChaCha20>;

/// The stream of masks: ChaCha12 (see the module docs).
pub type MaskPrg = Stream<ChaCha12>;

impl<C> std::fmt::Debug for Stream<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").finish_non_exhaustive()
    }
}

impl<C: KeyIvInit + StreamCipher + StreamCipherSeek> Stream<C> {
    /// The stream of `seed`.
    pub fn new(seed: &[u8; 32]) -> Self {
        Self {
            // Both ChaCha variants take a 32-byte key and a 12-byte nonce.
            cipher: C::new_from_slices(seed, &[0_u8; 12])
                .expect("ChaCha takes a 32-byte key and a 12-byte nonce"),
        }
    }

    /// The stream of `seed` from its `offset`-th value on (to expand one
    /// part of a mask without the values before it).
    pub fn at(seed: &[u8; 32], offset: usize) -> Self {
        let mut prg = Self::new(seed);
        // A position within 2^36 values (see the module docs) fits in u64.
        prg.cipher.seek(4 * offset as u64);
        prg
    }

    /// Overwrites `out` with the next `out.len()` values.
    pub fn fill(&mut self, out: &mut [u32]) {
        self.apply(out, |_, m| m);
    }

    /// Adds the next `acc.len()` values into `acc` (wrapping).
    pub fn add_to(&mut self, acc: &mut [u32]) {
        self.apply(acc, u32::wrapping_add);
    }

    /// Subtracts the next `acc.len()` values from `acc` (wrapping).
    pub fn sub_from(&mut self, acc: &mut [u32]) {
        self.apply(acc, u32::wrapping_sub);
    }

    /// The next value. Slower per value than the slice methods.
    pub fn next_u32(&mut self) -> u32 {
        let mut word = [0_u32];
        self.fill(&mut word);
        word[0]
    }

    /// A uniform value in `0..bound` (`bound > 0`), by rejection sampling.
    pub fn below(&mut self, bound: u32) -> u32 {
        assert!(bound > 0, "Prg::below needs a positive bound");
        // The largest multiple of `bound` that fits: values at or above it
        // would favour small results.
        let zone = u32::MAX - (u32::MAX - bound + 1) % bound;
        loop {
            let v = self.next_u32();
            if v <= zone {
                return v % bound;
            }
        }
    }

    /// Combines the next `acc.len()` keystream words into `acc` with `op`.
    #[inline]
    fn apply(&mut self, acc: &mut [u32], op: impl Fn(u32, u32) -> u32) {
        let mut buf = [0_u8; 4 * BATCH];
        for chunk in acc.chunks_mut(BATCH) {
            let bytes = &mut buf[..4 * chunk.len()];
            // Panics only past 2^36 values from one seed (see the module docs).
            self.cipher.write_keystream(bytes);
            for (a, w) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
                *a = op(*a, u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            }
        }
    }
}

/// Adds the mask of `seed` into `acc`.
pub fn add_mask(seed: &[u8; 32], acc: &mut [u32]) {
    MaskPrg::new(seed).add_to(acc);
}

/// Subtracts the mask of `seed` from `acc`.
pub fn sub_mask(seed: &[u8; 32], acc: &mut [u32]) {
    MaskPrg::new(seed).sub_from(acc);
}

/// Whether a mask is added or subtracted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sign {
    /// Added.
    Add,
    /// Subtracted.
    Sub,
}

/// Adds or subtracts the masks of every `(seed, sign)` into `acc`, splitting
/// `acc` into `threads` contiguous parts expanded in parallel on the rayon pool (each part's
/// stream starts at its offset). The result does not depend on `threads`.
pub fn apply_masks(masks: &[(Secret32, Sign)], acc: &mut [u32], threads: usize) {
    // Parts of whole 64-byte ChaCha blocks, so that no block is computed twice.
    let part = acc
        .len()
        .div_ceil(threads.max(1))
        .next_multiple_of(16)
        .max(16);
    let apply = |offset: usize, part: &mut [u32]| {
        for (seed, sign) in masks {
            let mut prg = MaskPrg::at(seed, offset);
            match sign {
                Sign::Add => prg.add_to(part),
                Sign::Sub => prg.sub_from(part),
            }
        }
    };
    if part >= acc.len() {
        apply(0, acc);
        return;
    }
    // Each part adds its own stretch of every stream (wrapping integer sums:
    // exact in any order), on rayon's pool.
    acc.par_chunks_mut(part)
        .enumerate()
        .for_each(|(i, chunk)| apply(i * part, chunk));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first four mask words of the all-zero seed: the bytes `9b f4 9a
    /// 6a 07 55 f9 53 81 1f ce 12 5f 26 83 d5` of test case 1 (all-zero key
    /// and IV, 12 rounds) of draft-strombergson-chacha-test-vectors (with a
    /// zero nonce and counter, the IETF and original layouts agree).
    const MASK_VECTOR: [u32; 4] = [0x6a9a_f49b, 0x53f9_5507, 0x12ce_1f81, 0xd583_265f];

    #[test]
    fn stream_is_the_rfc8439_keystream() {
        // RFC 8439 section 2.4.2 uses counter 1; with counter 0 and an
        // all-zero key and nonce, the first block is the test vector of
        // section A.1 (test vector #1).
        let mut prg = Prg::new(&[0; 32]);
        let mut words = [0_u32; 4];
        prg.fill(&mut words);
        assert_eq!(words, [0xade0_b876, 0x903d_f1a0, 0xe56a_5d40, 0x28bd_8653]);
    }

    #[test]
    fn masks_are_the_chacha12_keystream() {
        // A published vector, and the cipher crate's ChaCha12 directly.
        let mut words = [0_u32; 4];
        MaskPrg::new(&[0; 32]).fill(&mut words);
        assert_eq!(words, MASK_VECTOR);
        let mut direct = [0_u8; 16];
        ChaCha12::new(&[0_u8; 32].into(), &[0_u8; 12].into()).write_keystream(&mut direct);
        let direct: Vec<u32> = direct
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        assert_eq!(direct, words);
        let mut acc = [1_u32; 4];
        add_mask(&[0; 32], &mut acc);
        assert_eq!(acc, words.map(|w| w.wrapping_add(1)));
    }

    #[test]
    fn batches_and_slices_agree() {
        let seed = [7_u8; 32];
        let mut whole = vec![0_u32; 3 * BATCH + 17];
        MaskPrg::new(&seed).fill(&mut whole);
        // The same stream drawn in uneven pieces.
        let mut prg = MaskPrg::new(&seed);
        let mut pieces = Vec::new();
        for len in [1, 5, BATCH - 3, 2 * BATCH, 14] {
            let mut part = vec![0; len];
            prg.fill(&mut part);
            pieces.extend(part);
        }
        assert_eq!(pieces, whole);
        assert_eq!(MaskPrg::new(&seed).next_u32(), whole[0]);

        // Adding then subtracting restores the input; distinct seeds differ.
        let original: Vec<u32> = (0..whole.len() as u32).collect();
        let mut acc = original.clone();
        add_mask(&seed, &mut acc);
        assert_eq!(acc[3], original[3].wrapping_add(whole[3]));
        sub_mask(&seed, &mut acc);
        assert_eq!(acc, original);
        let mut other = vec![0_u32; 8];
        MaskPrg::new(&[8; 32]).fill(&mut other);
        assert_ne!(other[..], whole[..8]);
        let mut general = vec![0_u32; 8];
        Prg::new(&seed).fill(&mut general);
        assert_ne!(
            general[..],
            whole[..8],
            "masks and the graph use different ciphers"
        );
    }

    #[test]
    fn seeking_and_parallel_masks_match_the_stream() {
        let seed = [9_u8; 32];
        let mut whole = vec![0_u32; 2 * BATCH + 37];
        MaskPrg::new(&seed).fill(&mut whole);
        for offset in [0, 1, 15, 16, 17, BATCH + 5] {
            let mut tail = vec![0_u32; whole.len() - offset];
            MaskPrg::at(&seed, offset).fill(&mut tail);
            assert_eq!(tail, whole[offset..], "offset {offset}");
        }
        let seeds = [[1_u8; 32], [2; 32], [3; 32]];
        let masks = [
            (Secret32::new(seeds[0]), Sign::Add),
            (Secret32::new(seeds[1]), Sign::Sub),
            (Secret32::new(seeds[2]), Sign::Add),
        ];
        let original: Vec<u32> = (0..whole.len() as u32).map(|v| v.wrapping_mul(7)).collect();
        let mut expected = original.clone();
        add_mask(&seeds[0], &mut expected);
        sub_mask(&seeds[1], &mut expected);
        add_mask(&seeds[2], &mut expected);
        for threads in [1, 2, 3, 8, 1000] {
            let mut acc = original.clone();
            apply_masks(&masks, &mut acc, threads);
            assert_eq!(acc, expected, "{threads} threads");
        }
        let mut tiny = vec![5_u32; 3];
        apply_masks(&masks[..1], &mut tiny, 4);
        let mut t = vec![5_u32; 3];
        add_mask(&seeds[0], &mut t);
        assert_eq!(tiny, t);
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut prg = Prg::new(&[1; 32]);
        let mut counts = [0_u32; 7];
        for _ in 0..70_000 {
            counts[prg.below(7) as usize] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
        assert_eq!(prg.below(1), 0);
        let big = u32::MAX / 2 + 2;
        assert!((0..100).all(|_| prg.below(big) < big));
    }

    /// Throughput of mask expansion: `cargo test -p fedrec-proto --release
    /// prg_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark"]
    fn prg_throughput() {
        let mut acc = vec![0_u32; 1 << 22];
        let start = std::time::Instant::now();
        let reps = 16;
        for i in 0..reps {
            add_mask(&[i; 32], &mut acc);
        }
        let secs = start.elapsed().as_secs_f64();
        let bytes = (reps as usize * acc.len() * 4) as f64;
        println!(
            "add_mask: {:.0} MiB/s ({:.0} M values/s)",
            bytes / secs / (1 << 20) as f64,
            bytes / 4.0 / secs / 1e6
        );
        assert!(acc.iter().any(|v| *v != 0));
    }
}
