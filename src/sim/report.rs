//! What a simulation reports: per round, privacy, secure aggregation, data,
//! timing, and the observer of its progress.

use fedrec_coordinator::config::{CoordinatorConfig, DpMode, SecureAggregationConfig};
use fedrec_coordinator::privacy::PrivacySummary;
use fedrec_coordinator::round::{RoundSummary, SecureSummary};
use fedrec_proto::codec::Encoding;
use serde::Serialize;

use super::*;

/// One row of the per-round report.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRow {
    /// Round number.
    pub round: u32,
    /// Devices whose update was accepted.
    pub participants: usize,
    /// Wall-clock seconds of the round.
    pub seconds: f64,
    /// HR@10 (full ranking) of the model the cohort received, measured by
    /// the cohort on its own held-out purchases.
    pub hr_at_10: f64,
    /// NDCG@10 (full ranking), likewise.
    pub ndcg_at_10: f64,
    /// Whether the round completed (false: abandoned, nothing applied).
    pub completed: bool,
    /// Why it was abandoned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abandon_reason: Option<String>,
    /// Devices left after each secure aggregation step, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecureSummary>,
    /// Differential privacy in the round (ε spent after it), when on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySummary>,
}

/// Differential privacy in the report.
#[derive(Clone, Debug, Serialize)]
pub struct PrivacyReport {
    /// "off", "central" or "distributed".
    pub mode: DpMode,
    /// The configured budget, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epsilon_budget: Option<f64>,
    /// Whether the clipping bound adapted.
    pub adaptive_clip: bool,
    /// After the last training round: ε, δ, z, C (the last round's), q and
    /// the expected cohort.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub last_round: Option<PrivacySummary>,
    /// Training rounds run (fewer than configured when the budget ran out).
    pub training_rounds: usize,
}

impl PrivacyReport {
    pub(super) fn new(config: &CoordinatorConfig, rows: &[RoundRow]) -> Self {
        let p = &config.privacy;
        Self {
            mode: p.mode,
            epsilon_budget: p.epsilon_budget,
            adaptive_clip: p.adaptive_clip && p.enabled(),
            last_round: rows.iter().rev().find_map(|r| r.privacy.clone()),
            training_rounds: rows.len(),
        }
    }
}

/// Secure aggregation in the report.
#[derive(Clone, Debug, Serialize)]
pub struct SecureReport {
    /// Whether training rounds ran through secure aggregation.
    pub enabled: bool,
    /// Its configuration, when enabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<SecureAggregationConfig>,
    /// Worst-case quantization error of one value of a round's mean update
    /// under uniform weighting, `range / (2^bits − 2)` (with example
    /// weighting, times the cohort size over its summed weight).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_error_per_value: Option<f64>,
    /// Per training round: devices left after each step, abandonments.
    pub rounds: Vec<SecureRoundRow>,
}

/// One training round's secure aggregation.
#[derive(Clone, Debug, Serialize)]
pub struct SecureRoundRow {
    /// Round number.
    pub round: u32,
    /// Devices left after each step.
    #[serde(flatten)]
    pub steps: SecureSummary,
    /// Why the round was abandoned, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abandon_reason: Option<String>,
}

impl SecureReport {
    pub(super) fn new(config: &CoordinatorConfig, rows: &[RoundRow]) -> Self {
        let sa = &config.secure_aggregation;
        Self {
            enabled: sa.enabled,
            config: sa.enabled.then(|| sa.clone()),
            max_error_per_value: sa
                .enabled
                .then(|| sa.protocol().quantizer().ok().map(|q| q.max_error()))
                .flatten(),
            rounds: rows
                .iter()
                .filter_map(|r| {
                    Some(SecureRoundRow {
                        round: r.round,
                        steps: r.secure_aggregation.clone()?,
                        abandon_reason: r.abandon_reason.clone(),
                    })
                })
                .collect(),
        }
    }
}

/// What the data looked like.
#[derive(Clone, Debug, Serialize)]
pub struct DataSummary {
    /// Data set name.
    pub name: String,
    /// Users (devices).
    pub users: usize,
    /// Items in the catalogue.
    pub items: usize,
    /// Interactions loaded.
    pub interactions: usize,
    /// Rows merged into an identical (user, item, time) row.
    pub merged_rows: u64,
    /// Users with a held-out item on the first track.
    pub test_users: usize,
    /// Users without a qualifying event on the first track.
    pub skipped_users: usize,
    /// Rows skipped while loading, by reason.
    pub skipped_rows: std::collections::BTreeMap<String, u64>,
}

/// Wall-clock timing.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    /// Whole simulation, baselines included.
    pub total_seconds: f64,
    /// Federated training and evaluation.
    pub federated_seconds: f64,
    /// Centralized baseline.
    pub centralized_seconds: f64,
    /// Devices that took part in the training rounds, summed over rounds.
    pub device_rounds: usize,
    /// `device_rounds` over the rounds' summed seconds (each round's
    /// download, local training, upload and aggregation; its evaluation
    /// too when rounds are evaluated; over gRPC the first round also
    /// includes the devices joining). 0 when no round ran.
    pub devices_per_second: f64,
    /// The process's peak resident memory (VmHWM) at the end, in MB
    /// (`None` off Linux).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_mb: Option<f64>,
}

/// The simulation's report (written as JSON by `--report`).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The configuration used.
    pub config: SimConfig,
    /// The data.
    pub data: DataSummary,
    /// The `--preset auto` search, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<search::SearchReport>,
    /// Population runs ([`super::population`]): one per training cut.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub population: Vec<super::population::PopulationReport>,
    /// Every round of the federated run on the first track's cut.
    pub rounds: Vec<RoundRow>,
    /// Every round of the federated run on the latest-time cut (trained for
    /// next purchase, evaluated on buy-again too), when it differs from the
    /// first track's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds_latest_cut: Vec<RoundRow>,
    /// Final metrics per track.
    #[serde(rename = "final")]
    pub final_: Final,
    /// Whether secure aggregation was on, and what it did per round.
    pub secure_aggregation: SecureReport,
    /// Differential privacy: the mode and the (ε, δ) spent.
    pub privacy: PrivacyReport,
    /// How the model travelled to the devices.
    pub download: DownloadReport,
    /// Timing.
    pub timing: Timing,
}

/// The model download in the report.
#[derive(Clone, Debug, Serialize)]
pub struct DownloadReport {
    /// The wire format (`[download] encoding`): f32, f16 or q8.
    pub encoding: Encoding,
    /// Values in the model.
    pub values: usize,
    /// Bytes of one device's download (values and q8 block parameters,
    /// protobuf framing aside).
    pub bytes_per_device: usize,
}

/// Receives progress while a simulation runs.
pub trait Observer {
    /// The simulation starts `rounds` training rounds (0 if unknown).
    fn start(&mut self, _rounds: u32) {}
    /// A round ended.
    fn round(&mut self, _row: &RoundRow) {}
    /// A phase begins (e.g. "centralized baseline").
    fn phase(&mut self, _name: &str) {}
}

/// An observer that ignores everything.
impl Observer for () {}

pub(super) fn row(s: &RoundSummary, seconds: f64) -> RoundRow {
    RoundRow {
        round: s.round,
        participants: s.participants,
        seconds,
        hr_at_10: s.evaluation.hit_rate_full().unwrap_or(0.0),
        ndcg_at_10: s.evaluation.ndcg_full_mean().unwrap_or(0.0),
        completed: s.completed,
        abandon_reason: s.abandon_reason.clone(),
        secure_aggregation: s.secure_aggregation.clone(),
        privacy: s.privacy.as_deref().cloned(),
    }
}
