//! Rényi-DP accounting for the Poisson-subsampled Gaussian mechanism.
//!
//! One round of user-level DP-FedAvg samples every device with probability
//! `q`, clips each update to norm `C` and adds Gaussian noise of standard
//! deviation `z·C` to the sum: the sampled Gaussian mechanism with noise
//! multiplier `z`. Its Rényi divergence of order `α` (Mironov, Talwar & Zhang
//! 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism") is
//! `log A_α / (α − 1)`, with `A_α` summed exactly for integer orders and by
//! the convergent two-sided series for fractional ones. Rounds compose by
//! adding RDP at each order, and the total converts to `(ε, δ)` by the
//! improved conversion (Canonne, Kamath & Steinke 2020, Prop. 12; Asoodeh et
//! al. 2020), minimized over the orders.
//!
//! The orders, the series and the conversion are those of Google's
//! `dp-accounting` `RdpAccountant`, and the tests check this module against
//! values that library computed (`rdp_reference.csv`, made by
//! `scripts/dp_reference.py`).

use serde::{Deserialize, Serialize};

/// Fractional orders 1.1 … 10.9, integers 11 … 63, then 128 … 1024: the
/// default orders of `dp-accounting`.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
        .collect()
}

/// The fractional series is abandoned (the order is left out, as
/// `dp-accounting` does) after this many terms.
const MAX_SERIES_TERMS: usize = 1000;

/// The privacy spent so far: RDP at each order, summed over rounds.
///
/// Serializable, so that a coordinator's checkpoint carries it: it is stored
/// as its [`MechanismLog`] of mechanisms (exact, readable), and the RDP is
/// recomputed on load.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "MechanismLog", into = "MechanismLog")]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
    ledger: MechanismLog,
}

/// Every mechanism composed so far: runs of rounds with the same rate and
/// noise multiplier.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MechanismLog {
    /// `(q, z, rounds)`, in the order they were composed.
    pub steps: Vec<(f64, f64, u64)>,
}

impl From<MechanismLog> for RdpAccountant {
    fn from(ledger: MechanismLog) -> Self {
        let mut acc = Self::new();
        for (q, z, rounds) in ledger.steps {
            acc.compose(q, z, rounds);
        }
        acc
    }
}

impl From<RdpAccountant> for MechanismLog {
    fn from(acc: RdpAccountant) -> Self {
        acc.ledger
    }
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// Nothing spent, at the [`default_orders`].
    pub fn new() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self {
            orders,
            rdp,
            ledger: MechanismLog::default(),
        }
    }

    /// Adds `rounds` rounds of the Gaussian mechanism with noise multiplier
    /// `z`, each over a Poisson sample of rate `q`.
    ///
    /// # Panics
    /// If `q` is outside `[0, 1]` or `z` is negative or not finite: the
    /// callers validate their configuration first.
    pub fn compose(&mut self, q: f64, z: f64, rounds: u64) {
        assert!((0.0..=1.0).contains(&q), "sampling rate {q} outside [0, 1]");
        assert!(
            z >= 0.0 && z.is_finite(),
            "noise multiplier {z} is not >= 0"
        );
        for (order, total) in self.orders.iter().zip(&mut self.rdp) {
            *total += rounds as f64 * rdp_sampled_gaussian(q, z, *order);
        }
        match self.ledger.steps.last_mut() {
            Some((lq, lz, n)) if *lq == q && *lz == z => *n += rounds,
            _ => self.ledger.steps.push((q, z, rounds)),
        }
    }

    /// What was composed so far.
    pub fn ledger(&self) -> &MechanismLog {
        &self.ledger
    }

    /// The smallest ε for which what was composed so far is (ε, δ)-DP.
    pub fn epsilon(&self, delta: f64) -> f64 {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }

    /// ε after `rounds` rounds of rate `q` and noise multiplier `z`, from
    /// nothing spent.
    pub fn epsilon_for(q: f64, z: f64, rounds: u64, delta: f64) -> f64 {
        let mut acc = Self::new();
        acc.compose(q, z, rounds);
        acc.epsilon(delta)
    }

    /// ε if `rounds` more rounds of rate `q` and noise `z` were added.
    pub fn epsilon_after(&self, q: f64, z: f64, rounds: u64, delta: f64) -> f64 {
        let mut next = self.clone();
        next.compose(q, z, rounds);
        next.epsilon(delta)
    }
}

/// The smallest noise multiplier (to 0.1% relative precision) for which
/// `rounds` rounds at sampling rate `q` stay within `(epsilon, delta)`; `None`
/// if even `z = 1e4` does not.
pub fn noise_multiplier_for(epsilon: f64, delta: f64, q: f64, rounds: u64) -> Option<f64> {
    let fits = |z: f64| RdpAccountant::epsilon_for(q, z, rounds, delta) <= epsilon;
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while !fits(hi) {
        lo = hi;
        hi *= 2.0;
        if hi > 1e4 {
            return None;
        }
    }
    while hi - lo > 1e-3 * hi {
        let mid = 0.5 * (lo + hi);
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi)
}

/// RDP of order `alpha` of one round of the Poisson-subsampled Gaussian
/// mechanism (rate `q`, noise multiplier `z`); infinite where it is unbounded
/// or the series did not converge.
pub fn rdp_sampled_gaussian(q: f64, z: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        0.0
    } else if z == 0.0 || alpha.is_infinite() {
        f64::INFINITY
    } else if q == 1.0 {
        alpha / (2.0 * z * z)
    } else if alpha.fract() == 0.0 {
        log_a_int(q, z, alpha as u64) / (alpha - 1.0)
    } else {
        log_a_frac(q, z, alpha) / (alpha - 1.0)
    }
}

/// Converts RDP at each order into the smallest ε at `delta` (0 if `delta`
/// is already implied by the KL bound; infinite if `delta` is 0 and anything
/// was spent).
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> f64 {
    if delta <= 0.0 {
        return if rdp.iter().all(|&r| r == 0.0) {
            0.0
        } else {
            f64::INFINITY
        };
    }
    orders
        .iter()
        .zip(rdp)
        .map(|(&a, &r)| {
            if r <= 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
                0.0
            } else if a > 1.01 {
                r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
            } else {
                f64::INFINITY
            }
        })
        .fold(f64::INFINITY, f64::min)
        .max(0.0)
}

/// `log(e^x + e^y)`.
fn log_add(x: f64, y: f64) -> f64 {
    let (lo, hi) = if x < y { (x, y) } else { (y, x) };
    if lo == f64::NEG_INFINITY {
        hi
    } else {
        (lo - hi).exp().ln_1p() + hi
    }
}

/// `log |C(n, k)|` for real `n` and `k` (the generalized binomial
/// coefficient, by log-gamma).
fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// `log erfc(x)`, accurate where `erfc` underflows.
fn log_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 1e-300 {
        r.ln()
    } else {
        // Asymptotic expansion of erfc for large x.
        let x2 = x * x;
        -0.5 * std::f64::consts::PI.ln() - x.ln() - x2 - 0.5 / x2 + 0.625 / (x2 * x2)
            - 37.0 / 24.0 / (x2 * x2 * x2)
            + 353.0 / 64.0 / (x2 * x2 * x2 * x2)
    }
}

/// `log A_α` for integer `α`: `Σ_k C(α,k) (1−q)^{α−k} q^k exp((k²−k)/2z²)`.
fn log_a_int(q: f64, z: f64, alpha: u64) -> f64 {
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let a = alpha as f64;
    (0..=alpha).fold(f64::NEG_INFINITY, |acc, i| {
        let i = i as f64;
        let term = log_comb(a, i) + i * log_q + (a - i) * log_1mq + (i * i - i) / (2.0 * z * z);
        log_add(acc, term)
    })
}

/// `log A_α` for fractional `α`: the two halves of the integral split at
/// `z0`, each a series summed until its terms fall 30 nats below the total.
fn log_a_frac(q: f64, z: f64, alpha: f64) -> f64 {
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let z0 = z * z * (1.0 / q - 1.0).ln() + 0.5;
    let scale = std::f64::consts::SQRT_2 * z;
    let (mut a0, mut a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last0, mut last1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for i in 0..MAX_SERIES_TERMS {
        let i = i as f64;
        let j = alpha - i;
        let coef = log_comb(alpha, i);
        let s0 = coef
            + i * log_q
            + j * log_1mq
            + (i * i - i) / (2.0 * z * z)
            + 0.5_f64.ln()
            + log_erfc((i - z0) / scale);
        let s1 = coef
            + j * log_q
            + i * log_1mq
            + (j * j - j) / (2.0 * z * z)
            + 0.5_f64.ln()
            + log_erfc((z0 - j) / scale);
        a0 = log_add(a0, s0);
        a1 = log_add(a1, s1);
        let total = log_add(a0, a1);
        if s0 < last0 && s1 < last1 && s0.max(s1) < total - 30.0 {
            return total;
        }
        (last0, last1) = (s0, s1);
    }
    f64::INFINITY
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (q, z, rounds, delta, epsilon) rows computed by `dp-accounting`.
    fn reference() -> Vec<(f64, f64, u64, f64, f64)> {
        include_str!("rdp_reference.csv")
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with('q'))
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let num = |i: usize| f[i].parse::<f64>().unwrap();
                (num(0), num(1), f[2].parse().unwrap(), num(3), num(4))
            })
            .collect()
    }

    #[test]
    fn agrees_with_dp_accounting_within_two_percent() {
        let rows = reference();
        assert!(rows.len() >= 300, "reference vectors missing");
        let mut worst = (0.0, None);
        for (q, z, t, delta, want) in rows {
            let got = RdpAccountant::epsilon_for(q, z, t, delta);
            let rel = if want == 0.0 {
                got
            } else {
                (got - want).abs() / want
            };
            if rel > worst.0 {
                worst = (rel, Some((q, z, t, delta, want, got)));
            }
        }
        eprintln!(
            "worst relative disagreement {:.2e} at {:?}",
            worst.0, worst.1
        );
        assert!(
            worst.0 <= 0.02,
            "worst disagreement {:.4}: {:?}",
            worst.0,
            worst.1
        );
    }

    #[test]
    fn epsilon_grows_with_rounds_and_rate_and_shrinks_with_noise() {
        let eps = |q, z, t| RdpAccountant::epsilon_for(q, z, t, 1e-5);
        for &(q, z) in &[(0.01, 1.0), (0.1, 2.0), (1.0, 5.0)] {
            assert!(eps(q, z, 10) < eps(q, z, 100));
            assert!(eps(q, z, 100) < eps(q, z, 1000));
        }
        assert!(eps(0.001, 1.0, 100) < eps(0.01, 1.0, 100));
        assert!(eps(0.01, 1.0, 100) < eps(0.1, 1.0, 100));
        assert!(eps(0.1, 0.7, 100) > eps(0.1, 1.0, 100));
        assert!(eps(0.1, 1.0, 100) > eps(0.1, 3.0, 100));
    }

    #[test]
    fn composing_rounds_one_at_a_time_equals_composing_them_at_once() {
        let mut stepwise = RdpAccountant::new();
        for _ in 0..50 {
            stepwise.compose(0.05, 1.2, 1);
        }
        let at_once = RdpAccountant::epsilon_for(0.05, 1.2, 50, 1e-6);
        assert!((stepwise.epsilon(1e-6) - at_once).abs() < 1e-9 * at_once);
        assert!(stepwise.epsilon_after(0.05, 1.2, 1, 1e-6) > stepwise.epsilon(1e-6));
    }

    #[test]
    fn full_participation_is_the_plain_gaussian_mechanism() {
        // q = 1: RDP(α) = α / 2z², so 10 rounds at z equal one round at z/√10.
        let a = RdpAccountant::epsilon_for(1.0, 3.0, 10, 1e-5);
        let b = RdpAccountant::epsilon_for(1.0, 3.0 / 10f64.sqrt(), 1, 1e-5);
        assert!((a - b).abs() < 1e-9);
        assert_eq!(RdpAccountant::epsilon_for(0.0, 1.0, 100, 1e-5), 0.0);
        assert_eq!(RdpAccountant::epsilon_for(0.1, 0.0, 1, 1e-5), f64::INFINITY);
    }

    #[test]
    fn noise_multiplier_for_inverts_epsilon() {
        let (q, t, delta) = (0.01, 1000, 1e-5);
        for target in [0.5, 2.0, 8.0] {
            let z = noise_multiplier_for(target, delta, q, t).unwrap();
            assert!(RdpAccountant::epsilon_for(q, z, t, delta) <= target);
            assert!(RdpAccountant::epsilon_for(q, z * 0.99, t, delta) > target);
        }
        assert_eq!(noise_multiplier_for(1e-9, 1e-12, 1.0, 1_000_000), None);
    }

    #[test]
    fn state_round_trips_through_serde() {
        let mut acc = RdpAccountant::new();
        acc.compose(0.02, 1.1, 17);
        acc.compose(0.02, 1.1, 3);
        acc.compose(0.5, 4.0, 1);
        assert_eq!(acc.ledger().steps, vec![(0.02, 1.1, 20), (0.5, 4.0, 1)]);
        let json = serde_json::to_string(&acc).unwrap();
        let back: RdpAccountant = serde_json::from_str(&json).unwrap();
        assert_eq!(back.ledger(), acc.ledger());
        assert_eq!(back.epsilon(1e-5), acc.epsilon(1e-5));
    }
}
