//! FedAvg (McMahan et al. 2017) as a server step: `x += η Δ`.

/// `params + eta · mean`.
pub fn step(params: &[f32], mean: &[f32], eta: f32) -> Vec<f32> {
    params.iter().zip(mean).map(|(x, d)| x + eta * d).collect()
}
