//! FedAvgM (Hsu et al. 2019): server momentum, `m = μ m + Δ`; `x += η m`.

use super::{StepError, check};

/// One step; `m` advances only when the parameters and `m` stay finite.
pub fn step(
    params: &[f32],
    mean: &[f32],
    eta: f32,
    momentum: f32,
    m: &mut Vec<f32>,
) -> Result<Vec<f32>, StepError> {
    let mut x = params.to_vec();
    let mut next = m.clone();
    for ((xi, mi), d) in x.iter_mut().zip(next.iter_mut()).zip(mean) {
        *mi = momentum * *mi + d;
        *xi += eta * *mi;
    }
    check(&x)?;
    check(&next)?;
    *m = next;
    Ok(x)
}
