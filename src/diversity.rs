//! The filter-bubble trade-off: accuracy against catalogue coverage and
//! list diversity, for several settings of the devices' diversity knob.
//!
//! Computed on the final federated model, by the devices: each ranks its
//! own list with maximal marginal relevance at knob λ
//! ([`fedrec_client::recommend::diversify`]) and scores its held-out
//! purchase in it. Diversity@10 is the mean pairwise `1 − cosine
//! similarity` of the list's items' embeddings in the federated model (the
//! rows of `item_factors`). One more row shows the non-personal fallback
//! that devices use without consent or history: the global model's item
//! biases.

use std::io::Write;

use fedrec_client::device::Device;
use fedrec_client::ranking::K;
use fedrec_client::recommend::list_diversity;
use serde::Serialize;

use crate::eval::Coverage;

/// The knob values reported.
pub const KNOBS: [f32; 3] = [0.0, 0.25, 0.5];

/// One setting's results.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KnobRow {
    /// λ (0 = pure relevance); `None` for the popularity fallback.
    pub knob: Option<f32>,
    /// HR@10 of the held-out purchase in the list.
    pub hr_at_10: f64,
    /// NDCG@10 of the held-out purchase in the list.
    pub ndcg_at_10: f64,
    /// Fraction of the catalogue in at least one device's list.
    pub coverage_at_10: f64,
    /// Mean over devices of the list's intra-list diversity.
    pub diversity_at_10: f64,
}

/// The rows for every knob, then the popularity fallback.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DiversityReport {
    /// Which item vectors diversity is measured with.
    pub embedding: &'static str,
    /// One row per knob value, then the non-personal fallback.
    pub rows: Vec<KnobRow>,
}

/// Evaluates every device's lists on `global`.
pub fn evaluate(
    devices: &[(usize, Device)],
    global: &[f32],
    n_items: usize,
) -> anyhow::Result<DiversityReport> {
    let settings = KNOBS
        .iter()
        .map(|&k| (Some(k), k, false))
        .chain([(None, 0.0, true)]);
    let mut rows = Vec::new();
    for (knob, lambda, popular) in settings {
        let mut coverage = Coverage::new(n_items);
        let (mut hits, mut ndcg, mut tested, mut ild) = (0.0, 0.0, 0_u64, 0.0);
        for (_, device) in devices {
            let e = device.evaluate_list(global, K, lambda, popular)?;
            coverage.add(&e.items);
            ild += list_diversity(device.model().as_ref(), global, &e.items);
            if let Some((h, n)) = e.hit_ndcg {
                hits += h;
                ndcg += n;
                tested += 1;
            }
        }
        let per = |x: f64, n: f64| if n > 0.0 { x / n } else { 0.0 };
        rows.push(KnobRow {
            knob,
            hr_at_10: per(hits, tested as f64),
            ndcg_at_10: per(ndcg, tested as f64),
            coverage_at_10: coverage.covered() as f64 / n_items.max(1) as f64,
            diversity_at_10: per(ild, devices.len() as f64),
        });
    }
    Ok(DiversityReport {
        embedding: "federated item embeddings (item_factors rows), cosine",
        rows,
    })
}

/// Writes the rows as a table.
pub fn write_table(out: &mut impl Write, report: &DiversityReport) -> std::io::Result<()> {
    writeln!(
        out,
        "\ndiversity knob (maximal marginal relevance, federated model; diversity@10: mean pairwise 1 - cosine of item embeddings)"
    )?;
    writeln!(
        out,
        "{:<12} {:>8} {:>9} {:>12} {:>13}",
        "knob", "HR@10", "NDCG@10", "coverage@10", "diversity@10"
    )?;
    for r in &report.rows {
        let name = r.knob.map_or("fallback".to_owned(), |k| format!("{k:.2}"));
        writeln!(
            out,
            "{:<12} {:>8.4} {:>9.4} {:>12.3} {:>13.3}",
            name, r.hr_at_10, r.ndcg_at_10, r.coverage_at_10, r.diversity_at_10
        )?;
    }
    writeln!(
        out,
        "(fallback: the non-personal ranking from the global model alone: item biases, or embedding norms under the als loss)"
    )
}
