//! Small dense linear algebra shared by devices and the coordinator: the
//! k×k systems of ALS (k = the number of factors, tens to a few hundred).
//!
//! Matrices are row-major `f64` slices. A symmetric matrix travels as its
//! upper triangle, row by row ([`upper_len`] values), which is how a device
//! sends its `x xᵀ` ([`push_outer_upper`]) and how the coordinator reads it
//! back ([`from_upper`]).

/// Values in the upper triangle (diagonal included) of a `k × k` matrix.
pub const fn upper_len(k: usize) -> usize {
    k * (k + 1) / 2
}

/// The `k` whose [`upper_len`] is `len`, if there is one.
pub fn factors_of_upper_len(len: usize) -> Option<usize> {
    // k ≈ √(2 len); check the neighbours of the rounded root exactly.
    let guess = ((2.0 * len as f64).sqrt()) as usize;
    (guess.saturating_sub(1)..=guess + 1).find(|&k| upper_len(k) == len)
}

/// Appends the upper triangle of `x xᵀ` to `out`, row by row.
pub fn push_outer_upper(x: &[f32], out: &mut Vec<f32>) {
    out.reserve(upper_len(x.len()));
    for (r, &xr) in x.iter().enumerate() {
        out.extend(x[r..].iter().map(|&xc| xr * xc));
    }
}

/// The full symmetric `k × k` matrix (row-major) from its upper triangle.
///
/// # Panics
///
/// When `upper` does not hold [`upper_len`]`(k)` values.
pub fn from_upper(upper: &[f32], k: usize) -> Vec<f64> {
    assert_eq!(
        upper.len(),
        upper_len(k),
        "not the upper triangle of {k}×{k}"
    );
    let mut a = vec![0.0; k * k];
    let mut values = upper.iter();
    for r in 0..k {
        for c in r..k {
            let v = f64::from(*values.next().expect("length checked"));
            a[r * k + c] = v;
            a[c * k + r] = v;
        }
    }
    a
}

/// Factors a symmetric positive definite `a` (n×n) in place into its lower
/// Cholesky factor `L` (`a = L Lᵀ`; the entries above the diagonal are left
/// as they were). Returns the smallest pivot (the squared diagonal of `L`
/// before clamping): positive exactly when `a` is positive definite, and at
/// least `r` when `a ⪰ r I`. A pivot below a tiny positive floor (through
/// rounding, when callers add a ridge, or because `a` was not definite) is
/// clamped to it.
pub fn cholesky(a: &mut [f64], n: usize) -> f64 {
    let mut smallest = f64::INFINITY;
    // Row by row: row j's entries before the diagonal are final when row
    // i > j needs them.
    for j in 0..n {
        let (done, rest) = a.split_at_mut(j * n);
        let row_j = &mut rest[..n];
        for i in 0..j {
            let row_i = &done[i * n..i * n + n];
            row_j[i] = (row_j[i] - dot(&row_j[..i], &row_i[..i])) / row_i[i];
        }
        let d = row_j[j] - dot(&row_j[..j], &row_j[..j]);
        // `min` would drop a NaN pivot; keep the first one so that callers
        // see it (no comparison with NaN holds).
        if !smallest.is_nan() && (d.is_nan() || d < smallest) {
            smallest = d;
        }
        row_j[j] = d.max(1e-12).sqrt();
    }
    smallest
}

/// Solves `L Lᵀ x = b` in place (`b` becomes `x`) with the factor that
/// [`cholesky`] left in `l`.
pub fn cholesky_solve_factored(l: &[f64], b: &mut [f64], n: usize) {
    for i in 0..n {
        b[i] = (b[i] - dot(&l[i * n..i * n + i], &b[..i])) / l[i * n + i];
    }
    for i in (0..n).rev() {
        let mut s = b[i];
        for p in i + 1..n {
            s -= l[p * n + i] * b[p];
        }
        b[i] = s / l[i * n + i];
    }
}

/// Solves `a x = b` for a symmetric positive definite `a` (n×n), which is
/// overwritten by its factor; `b` becomes `x`. The callers add a ridge, so
/// `a` is definite but for rounding, which [`cholesky`] clamps.
pub fn cholesky_solve(a: &mut [f64], b: &mut [f64], n: usize) {
    let _smallest_pivot = cholesky(a, n);
    cholesky_solve_factored(a, b, n);
}

/// `Σ x_i y_i` over four partial sums (so the compiler can vectorize it).
pub fn dot(x: &[f64], y: &[f64]) -> f64 {
    let mut acc = [0.0_f64; 4];
    let (xc, yc) = (x.chunks_exact(4), y.chunks_exact(4));
    let tail: f64 = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (xs, ys) in xc.zip(yc) {
        for l in 0..4 {
            acc[l] += xs[l] * ys[l];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_known_system() {
        // [[4, 2], [2, 3]] x = [2, 1] → x = [0.5, 0].
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        let mut b = vec![2.0, 1.0];
        cholesky_solve(&mut a, &mut b, 2);
        assert!((b[0] - 0.5).abs() < 1e-12 && b[1].abs() < 1e-12, "{b:?}");
        // The factor is [[2, 0], [1, √2]].
        assert!((a[0] - 2.0).abs() < 1e-12 && (a[2] - 1.0).abs() < 1e-12);
        assert!((a[3] - 2.0_f64.sqrt()).abs() < 1e-12);
        // One factor, several right-hand sides: [[4,2],[2,3]] [1, 1] = [6, 5].
        let mut b = vec![6.0, 5.0];
        cholesky_solve_factored(&a, &mut b, 2);
        assert!(
            (b[0] - 1.0).abs() < 1e-12 && (b[1] - 1.0).abs() < 1e-12,
            "{b:?}"
        );
        // [[1, 2], [2, 1]] has eigenvalues 3 and −1: not definite.
        assert!(cholesky(&mut [1.0, 2.0, 2.0, 1.0], 2) < 0.0);
        // Pivots of [[4, 2], [2, 3]]: 4 and 3 − 2²/4 = 2; its eigenvalues
        // are (7 ± √17)/2 ≥ 1.44, which bounds every pivot from below.
        assert_eq!(cholesky(&mut [4.0, 2.0, 2.0, 3.0], 2), 2.0);
        assert!(cholesky(&mut [f64::NAN, 0.0, 0.0, 1.0], 2).is_nan());
    }

    #[test]
    fn an_outer_product_round_trips_through_its_upper_triangle() {
        let x = [1.0_f32, -2.0, 3.0];
        let mut up = vec![7.0];
        push_outer_upper(&x, &mut up);
        assert_eq!(up, [7.0, 1.0, -2.0, 3.0, 4.0, -6.0, 9.0]);
        assert_eq!(
            from_upper(&up[1..], 3),
            [1.0, -2.0, 3.0, -2.0, 4.0, -6.0, 3.0, -6.0, 9.0]
        );
        for k in 0..300 {
            assert_eq!(factors_of_upper_len(upper_len(k)), Some(k));
        }
        assert_eq!(factors_of_upper_len(4), None);
    }
}
