//! `fedrec simulate --dp MODE --sweep-noise Z1,Z2,…`: the privacy–utility
//! trade-off. One simulation without differential privacy, then one per
//! noise multiplier (same data, split and seed), each reporting the ε it
//! spent and the quality the devices measured; as a table, JSON and a plot
//! of HR@10 and NDCG@10 against ε.

use std::fmt::Write as _;
use std::path::Path;

use fedrec_coordinator::config::DpMode;
use plotters::prelude::*;
use serde::Serialize;

use crate::data::Dataset;
use crate::eval::Metrics;
use crate::plot::PlotError;
use crate::sim::{self, Observer, SimConfig};

/// One simulation of the sweep.
#[derive(Clone, Debug, Serialize)]
pub struct TradeoffRow {
    /// The noise multiplier z; `None` for the run without DP.
    pub noise_multiplier: Option<f64>,
    /// ε spent at the end (infinite when z = 0); `None` without DP.
    pub epsilon: Option<f64>,
    /// The clipping bound of the last round.
    pub clip: Option<f32>,
    /// Training rounds run (fewer than configured if a budget stopped them).
    pub training_rounds: usize,
    /// The federated model's quality, measured by the devices.
    pub federated: Metrics,
    /// Wall-clock seconds of the simulation.
    pub seconds: f64,
}

/// The whole sweep.
#[derive(Clone, Debug, Serialize)]
pub struct Tradeoff {
    /// Data set name.
    pub data: String,
    /// Devices.
    pub users: usize,
    /// Central or distributed.
    pub mode: DpMode,
    /// δ of every ε.
    pub delta: f64,
    /// The sampling rate q.
    pub sampling_rate: Option<f64>,
    /// The centralized baseline (from the run without DP).
    pub centralized: Metrics,
    /// Popularity (from the run without DP): the floor any personal model
    /// should stay above.
    pub popularity: Metrics,
    /// The run without DP first, then one per noise multiplier.
    pub rows: Vec<TradeoffRow>,
    /// Every simulation's full report, in the same order.
    pub reports: Vec<sim::Report>,
}

/// Runs the sweep: `base` without DP, then with `base`'s privacy settings
/// and each noise multiplier of `noise`.
pub fn sweep(
    ds: &Dataset,
    base: &SimConfig,
    noise: &[f64],
    observer: &mut dyn Observer,
) -> anyhow::Result<Tradeoff> {
    let privacy = base.coordinator.privacy.clone();
    anyhow::ensure!(
        privacy.enabled(),
        "--sweep-noise needs --dp central or --dp distributed"
    );
    let mut configs = Vec::with_capacity(noise.len() + 1);
    let mut plain = base.clone();
    plain.coordinator.privacy.mode = DpMode::Off;
    configs.push((None, plain));
    for z in noise {
        let mut cfg = base.clone();
        // The baselines do not depend on the noise: run them once.
        cfg.baselines = crate::sim::Baselines::Quick;
        cfg.coordinator.privacy.noise_multiplier = *z;
        configs.push((Some(*z), cfg));
    }
    let mut rows = Vec::new();
    let mut reports = Vec::new();
    for (z, cfg) in configs {
        observer.phase(&match z {
            Some(z) => format!("noise multiplier {z}"),
            None => "without differential privacy".to_owned(),
        });
        let report = sim::run(ds, &cfg, observer)?;
        let last = report.privacy.last_round.as_ref();
        rows.push(TradeoffRow {
            noise_multiplier: z,
            epsilon: last.map(|p| p.epsilon),
            clip: last.map(|p| p.clip),
            training_rounds: report.privacy.training_rounds,
            federated: report.final_.federated(),
            seconds: report.timing.total_seconds,
        });
        reports.push(report);
    }
    let dp = reports.last().expect("at least the run without DP");
    Ok(Tradeoff {
        data: ds.name.clone(),
        users: dp.data.users,
        mode: privacy.mode,
        delta: privacy.delta,
        sampling_rate: dp.privacy.last_round.as_ref().map(|p| p.sampling_rate),
        centralized: reports[0].final_.centralized(),
        popularity: reports[0].final_.popularity(),
        rows,
        reports,
    })
}

/// The sweep as a text table.
pub fn table(t: &Tradeoff) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} — {} devices, differential privacy {} (delta {:e}, sampling rate {})",
        t.data,
        t.users,
        t.mode,
        t.delta,
        t.sampling_rate
            .map_or("-".to_owned(), |q| format!("{q:.4}"))
    );
    let _ = writeln!(
        out,
        "{:<13} {:>10} {:>8} {:>8} {:>9} {:>12} {:>13} {:>7}",
        "noise z", "epsilon", "clip", "HR@10", "NDCG@10", "HR@10 (100)", "NDCG@10 (100)", "rounds"
    );
    let row = |out: &mut String, label: &str, eps: &str, clip: &str, m: &Metrics, rounds: &str| {
        let sampled = m.sampled100.unwrap_or_default();
        let _ = writeln!(
            out,
            "{label:<13} {eps:>10} {clip:>8} {:>8.4} {:>9.4} {:>12.4} {:>13.4} {rounds:>7}",
            m.full.hr_at_10, m.full.ndcg_at_10, sampled.hr_at_10, sampled.ndcg_at_10,
        );
    };
    for r in &t.rows {
        row(
            &mut out,
            &r.noise_multiplier
                .map_or("without DP".to_owned(), |z| z.to_string()),
            &r.epsilon.map_or("-".to_owned(), |e| format!("{e:.3}")),
            &r.clip.map_or("-".to_owned(), |c| format!("{c:.3}")),
            &r.federated,
            &r.training_rounds.to_string(),
        );
    }
    row(&mut out, "centralized", "-", "-", &t.centralized, "");
    row(&mut out, "popularity", "-", "-", &t.popularity, "");
    let _ = writeln!(
        out,
        "(HR/NDCG: full ranking; (100): among 100 sampled candidates; epsilon at delta above)"
    );
    out
}

/// Reads one metric.
type Metric = fn(&Metrics) -> f64;

/// Draws HR@10 and NDCG@10 (full ranking) against ε, on a log scale, with
/// the runs without DP (federated and centralized) as horizontal lines.
/// Runs with an infinite ε (z = 0) are left out of the curve.
pub fn write_svg(t: &Tradeoff, path: &Path) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let points: Vec<(f64, f64, &Metrics)> = t
        .rows
        .iter()
        .filter_map(|r| {
            Some((
                r.epsilon.filter(|e| e.is_finite() && *e > 0.0)?,
                r.noise_multiplier?,
                &r.federated,
            ))
        })
        .collect();
    if points.is_empty() {
        return Err(err(&"no run with a finite epsilon to plot"));
    }
    let lo = points.iter().map(|p| p.0).fold(f64::INFINITY, f64::min) / 2.0;
    let hi = points.iter().map(|p| p.0).fold(0.0, f64::max) * 2.0;
    let root = SVGBackend::new(path, (1100, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!(
        "{} — {} devices, {} DP-FedAvg, delta {:e}",
        t.data, t.users, t.mode, t.delta
    );
    let root = root
        .titled(&title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let no_dp = &t.rows[0].federated;
    let series: [(&str, Metric); 2] = [
        ("HR@10", |m| m.full.hr_at_10),
        ("NDCG@10", |m| m.full.ndcg_at_10),
    ];
    for (panel, (name, value)) in root.split_evenly((1, 2)).iter().zip(series) {
        let top = points
            .iter()
            .map(|p| value(p.2))
            .chain([value(no_dp), value(&t.centralized)])
            .fold(0.0_f64, f64::max)
            * 1.5;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{name} (full ranking) against epsilon"),
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..top.max(0.01))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("epsilon (log scale)")
            .y_desc(name)
            .x_labels(8)
            .y_labels(6)
            .x_label_formatter(&|e| short_number(*e))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|(e, _, m)| (*e, value(m))),
                BLUE.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label("federated with DP")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|(e, _, m)| Circle::new((*e, value(m)), 4, BLUE.filled())),
            )
            .map_err(|e| err(&e))?;
        // Each point's noise multiplier, just above it.
        chart
            .draw_series(points.iter().map(|(e, z, m)| {
                EmptyElement::at((*e, value(m)))
                    + Text::new(format!("z={z}"), (-12, -18), ("sans-serif", 12))
            }))
            .map_err(|e| err(&e))?;
        for (label, v, color) in [
            ("federated without DP", value(no_dp), GREEN),
            ("centralized", value(&t.centralized), RED),
            ("popularity", value(&t.popularity), BLACK),
        ] {
            chart
                .draw_series(LineSeries::new([(lo, v), (hi, v)], color))
                .map_err(|e| err(&e))?
                .label(format!("{label}: {v:.3}"))
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

/// A tick label: a few significant digits, no float noise (0.3, 2, 15, 120).
fn short_number(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 1.0 {
        let s = format!("{x:.1}");
        s.trim_end_matches(".0").to_owned()
    } else {
        let s = format!("{x:.2}");
        s.trim_end_matches('0').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{SyntheticConfig, synthetic};
    use crate::sim::Transport;

    #[test]
    fn the_sweep_spends_less_epsilon_with_more_noise_and_plots_it() {
        let ds = synthetic(&SyntheticConfig {
            users: 120,
            items: 40,
            ..SyntheticConfig::default()
        })
        .unwrap();
        let mut coordinator = sim::default_coordinator_config();
        coordinator.rounds.rounds = 3;
        coordinator.rounds.clients_per_round = 30;
        coordinator.strategy.weighting = fedrec_coordinator::config::Weighting::Uniform;
        coordinator.privacy.mode = DpMode::Central;
        let cfg = SimConfig {
            coordinator,
            transport: Transport::Inproc,
            seed: 5,
            centralized_epochs: 1,
            baselines: crate::sim::Baselines::Quick,
            auto: false,
            attack: None,
            population: None,
            held_out: Default::default(),
        };
        let t = sweep(&ds, &cfg, &[0.5, 4.0], &mut ()).unwrap();
        assert_eq!(t.rows.len(), 3);
        assert_eq!(t.rows[0].epsilon, None, "the first run is without DP");
        let (e1, e2) = (t.rows[1].epsilon.unwrap(), t.rows[2].epsilon.unwrap());
        assert!(e1 > e2 && e2 > 0.0, "{e1} {e2}");
        assert_eq!(t.sampling_rate, Some(0.25));
        let text = table(&t);
        assert!(
            text.contains("without DP") && text.contains("popularity"),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tradeoff.svg");
        write_svg(&t, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("<svg") && svg.contains("against epsilon"));
        // Every point is labelled with its noise multiplier; popularity is drawn.
        assert!(svg.contains("z=0.5") && svg.contains("z=4"), "{svg}");
        assert!(svg.contains("popularity: "), "the popularity line's legend");
        assert_eq!(short_number(0.30000000000000004), "0.3");
        assert_eq!(short_number(12.0), "12");
        assert_eq!(short_number(2.5), "2.5");
        let mut plain = cfg.clone();
        plain.coordinator.privacy.mode = DpMode::Off;
        assert!(sweep(&ds, &plain, &[1.0], &mut ()).is_err());
    }
}
