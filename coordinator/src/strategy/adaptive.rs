//! The adaptive server optimizers of Reddi et al. 2021 (Algorithm 2):
//! FedAdagrad, FedAdam and FedYogi, which differ only in how the second
//! moment `v` follows `Δ²` (see the table in [`super`]).

use super::{StepError, check};
use crate::config::{StrategyConfig, StrategyName};

/// One step; `m` and `v` advance only when the parameters and both moments
/// stay finite.
pub fn step(
    params: &[f32],
    mean: &[f32],
    eta: f32,
    c: &StrategyConfig,
    m: &mut Vec<f32>,
    v: &mut Vec<f32>,
) -> Result<Vec<f32>, StepError> {
    let mut x = params.to_vec();
    let mut m_next = m.clone();
    let mut v_next = v.clone();
    for (((xi, mi), vi), &d) in x
        .iter_mut()
        .zip(m_next.iter_mut())
        .zip(v_next.iter_mut())
        .zip(mean)
    {
        let d2 = d * d;
        *vi = match c.name {
            StrategyName::FedAdagrad => *vi + d2,
            StrategyName::FedAdam => c.beta2 * *vi + (1.0 - c.beta2) * d2,
            _ => *vi - (1.0 - c.beta2) * d2 * sign(*vi - d2),
        };
        *mi = c.beta1 * *mi + (1.0 - c.beta1) * d;
        *xi += eta * *mi / (vi.sqrt() + c.tau);
    }
    check(&x)?;
    check(&m_next)?;
    check(&v_next)?;
    *m = m_next;
    *v = v_next;
    Ok(x)
}

/// The sign function with `sign(0) = 0` (unlike `f32::signum`).
fn sign(value: f32) -> f32 {
    if value > 0.0 {
        1.0
    } else if value < 0.0 {
        -1.0
    } else {
        0.0
    }
}
