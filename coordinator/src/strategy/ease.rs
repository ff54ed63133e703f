//! `ease`: the closed form of EASE (Steck 2019) as a server step. The model
//! is the upper triangle of `P = (G + λI)⁻¹`, where `G` is the cohort's
//! summed co-purchase matrix (the mean update times the number of devices).

use super::StepError;

/// The side `n` of the symmetric matrix whose upper triangle has `values`
/// values, or why there is none.
pub fn size(values: usize) -> Result<usize, String> {
    // n(n+1)/2 = values
    let n = ((((8 * values + 1) as f64).sqrt() - 1.0) / 2.0).round() as usize;
    if n * (n + 1) / 2 == values && n > 0 {
        Ok(n)
    } else {
        Err(format!(
            "strategy \"ease\" needs a model that is the upper triangle of an items × items \
             matrix (the client's Ease model); {values} values are not n(n+1)/2 for any n"
        ))
    }
}

/// `P = (mean · devices + λ I)⁻¹`, upper triangle in and out, row by row.
pub fn step(mean: &[f32], devices: usize, lambda: f32) -> Result<Vec<f32>, StepError> {
    let n = size(mean.len()).map_err(|_| StepError::Indefinite)?;
    let scale = devices.max(1) as f32;
    let mut g = faer::Mat::<f32>::zeros(n, n);
    let mut at = 0;
    for r in 0..n {
        for c in r..n {
            let v = mean[at] * scale;
            g[(r, c)] = v;
            g[(c, r)] = v;
            at += 1;
        }
        g[(r, r)] += lambda;
    }
    let llt = g
        .llt(faer::Side::Lower)
        .map_err(|_| StepError::Indefinite)?;
    drop(g);
    let p = faer::linalg::solvers::DenseSolveCore::inverse(&llt);
    let mut out = Vec::with_capacity(mean.len());
    for r in 0..n {
        for c in r..n {
            out.push(p[(r, c)]);
        }
    }
    Ok(out)
}
