//! How a symmetric matrix travels: as its upper triangle, row by row
//! ([`upper_len`] values), which is how a device sends the `x xᵀ` of its
//! private vector under the ALS loss ([`push_outer_upper`]) and how the
//! coordinator reads it back ([`from_upper`], row-major `f64`). The solves
//! with these matrices belong to each side (faer's Cholesky in both).

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

#[cfg(test)]
mod tests {
    use super::*;

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
