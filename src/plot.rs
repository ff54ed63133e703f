//! `--plot FILE.svg`: federated HR@10 and NDCG@10 per round, with the
//! centralized and popularity baselines as horizontal lines.

use std::path::Path;

use plotters::prelude::*;

use crate::sim::{Report, RoundRow};

/// Reads one metric of a round.
type Metric = fn(&RoundRow) -> f64;

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the plot {path}: {message}")]
pub struct PlotError {
    /// The file.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// Draws two panels (HR@10 and NDCG@10 under full ranking against the round)
/// into an SVG file. Per-round values are those each cohort measured on the
/// model it received; the final federated value (every device) is marked at
/// the end.
pub fn write_svg(report: &Report, path: &Path) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let root = SVGBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!(
        "{} — {} devices, {} rounds",
        report.data.name,
        report.data.users,
        report.rounds.len()
    );
    let root = root
        .titled(&title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 2));
    let f = &report.final_;
    let series: [(&str, Metric, [f64; 3]); 2] = [
        (
            "HR@10",
            |r| r.hr_at_10,
            [
                f.federated().full.hr_at_10,
                f.centralized().full.hr_at_10,
                f.popularity().full.hr_at_10,
            ],
        ),
        (
            "NDCG@10",
            |r| r.ndcg_at_10,
            [
                f.federated().full.ndcg_at_10,
                f.centralized().full.ndcg_at_10,
                f.popularity().full.ndcg_at_10,
            ],
        ),
    ];
    let last = report.rounds.last().map_or(1, |r| r.round).max(1);
    for (panel, (metric, value, [fed, cen, pop])) in panels.iter().zip(series) {
        let top = report
            .rounds
            .iter()
            .map(value)
            .chain([fed, cen, pop])
            .fold(0.0_f64, f64::max)
            * 1.6; // headroom for the legend above the curves
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{metric} (full ranking)"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0u32..last, 0.0..top.max(0.01))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc(metric)
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(
                report.rounds.iter().map(|r| (r.round, value(r))),
                &BLUE,
            ))
            .map_err(|e| err(&e))?
            .label("federated (cohort, per round)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE));
        chart
            .draw_series([Circle::new((last, fed), 5, BLUE.filled())])
            .map_err(|e| err(&e))?
            .label(format!("federated, final (all devices): {fed:.3}"))
            .legend(|(x, y)| Circle::new((x + 9, y), 4, BLUE.filled()));
        for (name, v, color) in [("centralized", cen, RED), ("popularity", pop, BLACK)] {
            chart
                .draw_series(LineSeries::new([(0, v), (last, v)], color))
                .map_err(|e| err(&e))?
                .label(format!("{name}: {v:.3}"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
