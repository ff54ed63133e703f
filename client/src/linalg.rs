//! The k×k solves of ALS (k = the model's factors): Cholesky factorization
//! of a symmetric positive definite matrix and its solves, on faer.
//!
//! This is the device's one place for them; the matrices are ndarray arrays
//! everywhere else ([`crate::als`]) and cross into faer here, as views where
//! the layout allows. Measured against the hand-written Cholesky this
//! replaced (one factorization and one solve, release build, 2 cores):
//! about equal at k = 16 (1–3 µs), faster from k = 32 (32: 4.4 against
//! 7–15 µs; 64: 17 against 28–53 µs; 128: 65–90 against 180–216 µs).
//!
//! Every factorization runs single-threaded ([`Par::Seq`]): the callers
//! already run many solves in parallel, and k is small.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt;
use faer::{Mat, MatMut, Par};
use ndarray::{ArrayView1, ArrayView2, ArrayViewMut1};

/// The ridge added, relative to the largest diagonal value, when a matrix
/// is not numerically positive definite (its factorization meets a pivot
/// ≤ 0): the callers add a ridge λ, so this happens only with λ = 0 on a
/// degenerate model, and a solve must still give a finite answer. (The
/// hand-written Cholesky this replaced raised such pivots to 1e-12; faer's
/// own pivot regularization is meant for LDLᵀ and left a zero on the
/// diagonal of L in our test.)
const SINGULAR_RIDGE: f64 = 1e-12;

/// The lower Cholesky factor `L` of a symmetric positive definite `A = L Lᵀ`.
pub(crate) struct Cholesky {
    l: Mat<f64>,
}

impl Cholesky {
    /// Factors `a` (square; only its lower triangle is read). When `a` is
    /// not numerically positive definite, factors `a + ε I` instead, with
    /// ε = [`SINGULAR_RIDGE`] × (1 + its largest diagonal value), growing
    /// a thousandfold up to twice more if needed.
    pub(crate) fn new(a: ArrayView2<'_, f64>) -> Self {
        let n = a.nrows();
        debug_assert_eq!(n, a.ncols(), "a square matrix");
        let scale = 1.0 + a.diag().iter().fold(0.0_f64, |m, &d| m.max(d.abs()));
        let mut ridge = 0.0;
        let mut mem = MemBuffer::new(llt::factor::cholesky_in_place_scratch::<f64>(
            n,
            Par::Seq,
            Default::default(),
        ));
        for attempt in 0..4 {
            // Column-major in faer: copy the lower triangle element-wise.
            let mut l = Mat::<f64>::from_fn(n, n, |r, c| match r.cmp(&c) {
                std::cmp::Ordering::Greater => a[[r, c]],
                std::cmp::Ordering::Equal => a[[r, c]] + ridge,
                std::cmp::Ordering::Less => 0.0,
            });
            let factored = llt::factor::cholesky_in_place(
                l.as_mut(),
                Default::default(),
                Par::Seq,
                MemStack::new(&mut mem),
                Default::default(),
            );
            // After the last attempt (or with non-finite input, which no
            // ridge fixes) the factor's non-finite values carry over to
            // every solve, as the input's did.
            if factored.is_ok() || attempt == 3 {
                // The factorization leaves scratch above the diagonal.
                for c in 1..n {
                    for r in 0..c {
                        l[(r, c)] = 0.0;
                    }
                }
                return Self { l };
            }
            ridge = if ridge == 0.0 {
                SINGULAR_RIDGE * scale
            } else {
                ridge * 1e3
            };
        }
        unreachable!("the last attempt returns")
    }

    /// Solves `A x = b` in place (`b` becomes `x`).
    pub(crate) fn solve_in_place(&self, mut b: ArrayViewMut1<'_, f64>) {
        if let Some(contiguous) = b.as_slice_mut() {
            self.solve_slice(contiguous);
            return;
        }
        let mut owned = b.to_vec();
        self.solve_slice(&mut owned);
        b.assign(&ArrayView1::from(&owned[..]));
    }

    fn solve_slice(&self, b: &mut [f64]) {
        let n = b.len();
        let rhs = MatMut::from_column_major_slice_mut(b, n, 1);
        llt::solve::solve_in_place(self.l.as_ref(), rhs, Par::Seq, MemStack::new(&mut []));
    }

    /// The factor `L` (lower triangular), for tests.
    #[cfg(test)]
    fn factor(&self) -> faer::MatRef<'_, f64> {
        self.l.as_ref()
    }
}

/// Solves `a x = b` for a symmetric positive definite `a` (only its lower
/// triangle is read); `b` becomes `x`.
pub(crate) fn solve_spd(a: ArrayView2<'_, f64>, b: ArrayViewMut1<'_, f64>) {
    Cholesky::new(a).solve_in_place(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, array};

    #[test]
    fn a_known_system_is_solved() {
        // [[4, 2], [2, 3]] x = [2, 1] → x = [0.5, 0]; the factor is
        // [[2, 0], [1, √2]].
        let a = array![[4.0, 2.0], [2.0, 3.0]];
        let mut b = Array1::from(vec![2.0, 1.0]);
        let chol = Cholesky::new(a.view());
        chol.solve_in_place(b.view_mut());
        assert!((b[0] - 0.5).abs() < 1e-12 && b[1].abs() < 1e-12, "{b:?}");
        let l = chol.factor();
        assert!((l[(0, 0)] - 2.0).abs() < 1e-12 && (l[(1, 0)] - 1.0).abs() < 1e-12);
        assert!((l[(1, 1)] - 2.0_f64.sqrt()).abs() < 1e-12);
        // One factor, several right-hand sides: [[4,2],[2,3]] [1, 1] = [6, 5].
        let mut b = Array1::from(vec![6.0, 5.0]);
        chol.solve_in_place(b.view_mut());
        assert!((b[0] - 1.0).abs() < 1e-12 && (b[1] - 1.0).abs() < 1e-12);
        // A strided right-hand side (a column) is solved too.
        let mut cols = array![[6.0, 0.0], [5.0, 0.0]];
        solve_spd(a.view(), cols.column_mut(0));
        assert!((cols[[0, 0]] - 1.0).abs() < 1e-12 && (cols[[1, 0]] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_singular_matrix_still_gives_a_finite_answer() {
        // Rank one: the second pivot is 0, raised to the floor.
        let a = array![[1.0, 1.0], [1.0, 1.0]];
        let mut b = Array1::from(vec![1.0, 1.0]);
        solve_spd(a.view(), b.view_mut());
        assert!(b.iter().all(|v| v.is_finite()), "{b:?}");
    }
}
