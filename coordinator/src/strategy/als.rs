//! `als`: fedrec's server step for the ALS loss, a Newton step on the item
//! embeddings.
//!
//! Each device sends, after its update (the negative gradient of its own
//! `L_u + λ‖x_u‖²` times its learning rate), the upper triangle of `x xᵀ`
//! for its private vector `x`. With `M` the cohort's mean `x xᵀ`, the
//! round's curvature is `H = lr (2M + 2λ/N I)`: the Hessian in `q_i` of the
//! cohort's mean loss, regularization share included (see
//! [`regularize_items`]), for an item nobody in the cohort bought, times
//! the devices' learning rate, so that `η = 1` is the exact Newton step for
//! such items, which is ALS's item step. A bought item's curvature is
//! higher by its buyers' confidence terms, so its step is damped rather
//! than exact. Each row `q_i` of the model's first tensor (items × k) moves
//! by `η H⁻¹ Δ_i`; every other parameter as under FedAvg.
//!
//! Every device's `x xᵀ` is positive semidefinite, so `H` is at least
//! `lr 2λ/N I`, which bounds every pivot of its Cholesky factor from below.
//! A pivot below half that bound cannot come from honest devices: some
//! update carried a malformed `x xᵀ`, or secure aggregation's range clipped
//! entries of one. The round is then abandoned with that reason (a
//! near-singular curvature would throw the items far). `H` is factored
//! once (faer's Cholesky), for the check and the step, which solves for
//! every row at once.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt;
use faer::{Mat, MatMut, Par};
use fedrec_proto::{Layout, symmetric};

use super::{Round, StepError};

/// The block the step preconditions: the first tensor's `(rows, k)`, or
/// why the model has none.
pub fn block(layout: &Layout) -> Result<(usize, usize), String> {
    match layout.tensors().first() {
        Some((_, shape)) if shape.len() == 2 && shape[1] > 0 => {
            Ok((shape[0] as usize, shape[1] as usize))
        }
        first => Err(format!(
            "strategy \"als\" steps the rows of the model's first tensor, which must be a \
             matrix (items × factors); this model's is {first:?}"
        )),
    }
}

/// Adds the item embeddings' part of the ALS objective to the round's mean
/// update: centralized ALS minimizes `Σ_u (L_u + λ‖x_u‖²) + λ Σ_i ‖q_i‖²`,
/// while each device sends the gradient of its own `L_u + λ‖x_u‖²` only
/// (the item term belongs to no user). Without `λ‖q_i‖²` the federated
/// objective is not bounded below in the scale of the items: scaling every
/// `q_i` up and the solved `x_u` down keeps the fit and shrinks the users'
/// penalty, so training would drift towards an under-regularized model. The
/// mean of the cohort's gradients estimates `1/N` of the sum over all `N`
/// joined devices, so the term's share is `2λ q / N` (exact under uniform
/// weighting). It depends on the global model and the number of joined
/// devices only, never on a device's data.
pub fn regularize_items(mean: &mut [f32], params: &[f32], round: &Round<'_>) {
    let t = round.training;
    if t.regularization == 0.0 || round.joined == 0 {
        return;
    }
    let c = t.learning_rate * 2.0 * t.regularization / round.joined as f32;
    for (d, p) in mean.iter_mut().zip(params) {
        *d -= c * p;
    }
}

/// The Newton step: `mean` is the model's mean update followed by the
/// cohort's mean `x xᵀ` (upper triangle), which becomes the curvature.
pub fn step(
    params: &[f32],
    mean: &mut [f32],
    (rows, k): (usize, usize),
    eta: f32,
    round: &Round<'_>,
) -> Result<Vec<f32>, StepError> {
    let t = round.training;
    let (delta, upper) = mean.split_at_mut(params.len());
    let ridge = 2.0 * t.regularization / round.joined.max(1) as f32;
    let mut at = 0;
    for r in 0..k {
        for c in r..k {
            let diagonal = if r == c { ridge } else { 0.0 };
            upper[at] = t.learning_rate * (2.0 * upper[at] + diagonal);
            at += 1;
        }
    }
    let floor = 0.5 * f64::from(t.learning_rate * ridge);
    let (h, smallest) = factor(&symmetric::from_upper(upper, k), k);
    // NaN (a non-finite x xᵀ) fails this check too.
    if smallest.is_nan() || smallest < floor {
        return Err(StepError::Curvature { smallest, floor });
    }
    if smallest <= 0.0 {
        return Err(StepError::Indefinite);
    }
    let mut x = params.to_vec();
    let block = rows * k;
    // The rows × k block, row-major, is H⁻¹'s k × rows right-hand side,
    // column-major: one solve for all rows.
    let mut z: Vec<f64> = delta[..block].iter().map(|&d| f64::from(d)).collect();
    llt::solve::solve_in_place(
        h.as_ref(),
        MatMut::from_column_major_slice_mut(&mut z, k, rows),
        Par::Seq,
        MemStack::new(&mut []),
    );
    let eta64 = f64::from(eta);
    for (xi, z) in x[..block].iter_mut().zip(&z) {
        *xi += (eta64 * z) as f32;
    }
    for (xi, d) in x[block..].iter_mut().zip(&delta[block..]) {
        *xi += eta * d;
    }
    Ok(x)
}

/// The lower Cholesky factor of the symmetric `h` (k × k, row-major; its
/// lower triangle is read) and its smallest pivot (the squared diagonal of
/// the factor): positive exactly when `h` is positive definite. When the
/// factorization stops at a pivot that is not positive (or NaN), that
/// pivot, recomputed from the columns factored before it; the factor is
/// then unusable and the caller refuses the step.
fn factor(h: &[f64], k: usize) -> (Mat<f64>, f64) {
    let mut l = Mat::<f64>::from_fn(k, k, |r, c| if r >= c { h[r * k + c] } else { 0.0 });
    let mut mem = MemBuffer::new(llt::factor::cholesky_in_place_scratch::<f64>(
        k,
        Par::Seq,
        Default::default(),
    ));
    match llt::factor::cholesky_in_place(
        l.as_mut(),
        Default::default(),
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    ) {
        Ok(_) => {
            let smallest = (0..k)
                .map(|j| l[(j, j)] * l[(j, j)])
                .fold(f64::INFINITY, f64::min);
            (l, smallest)
        }
        Err(llt::factor::LltError::NonPositivePivot { index: j }) => {
            let pivot = h[j * k + j] - (0..j).map(|p| l[(j, p)] * l[(j, p)]).sum::<f64>();
            // A NaN pivot stays NaN; any other is not positive.
            (
                l,
                if pivot.is_nan() {
                    pivot
                } else {
                    pivot.min(0.0)
                },
            )
        }
    }
}
