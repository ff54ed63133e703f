//! The final comparison of a simulation, per evaluation track: the
//! federated model (evaluated by the devices), fedrec's centralized model,
//! and the baselines of [`crate::baselines`], the tunable ones chosen on the
//! validation event.

use std::collections::BTreeMap;

use serde::Serialize;
use serde::ser::SerializeMap;

use crate::baselines::{Baseline, EASE_GRID, ITEM_KNN_GRID};
use crate::data::{Protocol, Stage, Track};
use crate::eval::{self, Metrics};

/// One method's result on one track.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MethodResult {
    /// The method (`federated`, `centralized`, `popularity`,
    /// `personal_frequency`, `recency`, `item_knn`, `ease`).
    pub method: String,
    /// The setting used (`k=50`), empty for methods without one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub setting: String,
    /// On the held-out event: the test event, or the validation event
    /// under `--held-out validation` (the report's `config.held_out` says
    /// which); `None` when the method could not run (see `note`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test: Option<Metrics>,
    /// The chosen setting's figures on the validation event, for methods
    /// tuned on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation: Option<Metrics>,
    /// Every setting tried, with its validation figures.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grid: Vec<GridRow>,
    /// Why the method did not run, or how it was run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl MethodResult {
    /// A method with a test result and nothing tuned.
    pub fn plain(method: &str, test: Metrics) -> Self {
        Self {
            method: method.to_owned(),
            setting: String::new(),
            test: Some(test),
            validation: None,
            grid: Vec::new(),
            note: None,
        }
    }
}

/// One setting of a tuned method on the validation event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GridRow {
    /// The setting.
    pub setting: String,
    /// Its validation figures (`None`: it could not run, see `note`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation: Option<Metrics>,
    /// Why it did not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Every method on one track.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrackReport {
    /// The track.
    #[serde(skip)]
    pub track: Track,
    /// Users with a held-out event.
    pub users: usize,
    /// Users without a qualifying event (they still train).
    pub skipped_users: usize,
    /// Events at or after the held-out time left out of training.
    pub dropped_events: u64,
    /// Users with a validation event.
    pub validation_users: usize,
    /// Every method, in report order (in JSON: an object keyed by method).
    #[serde(serialize_with = "by_method")]
    pub methods: Vec<MethodResult>,
}

/// The methods as a JSON object keyed by method name, in report order.
fn by_method<S: serde::Serializer>(methods: &[MethodResult], s: S) -> Result<S::Ok, S::Error> {
    let mut map = s.serialize_map(Some(methods.len()))?;
    for m in methods {
        map.serialize_entry(&m.method, m)?;
    }
    map.end()
}

impl TrackReport {
    /// The result of `method`, if it ran on this track.
    pub fn method(&self, method: &str) -> Option<&MethodResult> {
        self.methods.iter().find(|m| m.method == method)
    }

    /// The test figures of `method`, if it ran.
    pub fn test(&self, method: &str) -> Option<&Metrics> {
        self.method(method).and_then(|m| m.test.as_ref())
    }
}

/// Final figures of every method on every track, and the diversity knob's
/// trade-off.
#[derive(Clone, Debug)]
pub struct Final {
    /// One report per track, in [`Track::ALL`] order.
    pub tracks: Vec<TrackReport>,
    /// Coverage and diversity against the devices' diversity knob (on the
    /// first track's devices).
    pub diversity: crate::diversity::DiversityReport,
}

impl Final {
    /// The report of `track`, if it is reported.
    pub fn track(&self, track: Track) -> Option<&TrackReport> {
        self.tracks.iter().find(|t| t.track == track)
    }

    /// The first track's report (discover on every data set).
    pub fn main(&self) -> &TrackReport {
        // Every protocol reports discover or at least one track; `run`
        // refuses data without any evaluated user.
        &self.tracks[0]
    }

    /// The federated model's test figures on the first track.
    pub fn federated(&self) -> Metrics {
        self.main().test("federated").copied().unwrap_or_default()
    }

    /// The centralized model's test figures on the first track.
    pub fn centralized(&self) -> Metrics {
        self.main().test("centralized").copied().unwrap_or_default()
    }

    /// Popularity's test figures on the first track.
    pub fn popularity(&self) -> Metrics {
        self.main().test("popularity").copied().unwrap_or_default()
    }
}

impl Serialize for Final {
    /// `{"discover": {...}, "buy-again": {...}, "next-purchase": {...},
    /// "diversity": {...}}`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.tracks.len() + 1))?;
        for t in &self.tracks {
            map.serialize_entry(t.track.name(), t)?;
        }
        map.serialize_entry("diversity", &self.diversity)?;
        map.end()
    }
}

/// Which baselines a simulation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Baselines {
    /// Popularity, personal frequency, recency, and item-KNN and EASE each
    /// tuned on the validation event over its grid.
    Full,
    /// Popularity, personal frequency and recency only (fast on any
    /// catalogue).
    Quick,
}

impl Baselines {
    /// The default for a run: `Full` for the presets and for catalogues up
    /// to [`FULL_BASELINES_MAX_ITEMS`] items, where the grids take seconds;
    /// `Quick` beyond.
    pub fn default_for(preset: bool, items: usize) -> Self {
        if preset || items <= FULL_BASELINES_MAX_ITEMS {
            Baselines::Full
        } else {
            Baselines::Quick
        }
    }
}

/// Largest catalogue on which `fedrec simulate` runs the tuned baselines
/// without a preset or `--baselines full`.
pub const FULL_BASELINES_MAX_ITEMS: usize = 2_000;

/// The untuned rules, fitted on each test cut.
pub const RULES: [Baseline; 3] = [
    Baseline::Popularity,
    Baseline::PersonalFrequency,
    Baseline::Recency,
];

/// Runs the rules and (with [`Baselines::Full`]) the tuned item-item
/// baselines on every reported track, and returns their results per track.
/// `phase` is told what is being fitted.
pub fn baselines(
    protocol: &Protocol,
    which: Baselines,
    held_out: Stage,
    seed: u64,
    phase: &mut dyn FnMut(&str),
) -> BTreeMap<Track, Vec<MethodResult>> {
    let mut out: BTreeMap<Track, Vec<MethodResult>> = BTreeMap::new();
    for b in RULES {
        for cut in protocol.used_cuts() {
            let tests: Vec<_> = protocol
                .evaluations_of(cut)
                .filter(|e| {
                    e.stage == held_out && !(b.personal_only() && e.track == Track::Discover)
                })
                .collect();
            if tests.is_empty() {
                continue;
            }
            let Ok(fitted) = b.fit(&protocol.histories, &protocol.cuts[cut]) else {
                continue;
            };
            for ev in tests {
                let m = eval::evaluate(&protocol.cuts[cut], ev, seed, |u, o| fitted.score(u, o));
                out.entry(ev.track)
                    .or_default()
                    .push(MethodResult::plain(b.name(), m));
            }
        }
    }
    // The tuned baselines choose their setting on the validation events:
    // they have a figure on the test events only.
    if which == Baselines::Full && held_out == Stage::Test {
        let knn: Vec<Baseline> = ITEM_KNN_GRID
            .iter()
            .filter(|&&k| k < protocol.n_items())
            .map(|&k| Baseline::ItemKnn { k })
            .collect();
        let ease: Vec<Baseline> = EASE_GRID
            .iter()
            .map(|&lambda| Baseline::Ease { lambda })
            .collect();
        for grid in [knn, ease] {
            for (track, result) in tune(protocol, &grid, seed, phase) {
                out.entry(track).or_default().push(result);
            }
        }
    }
    out
}

/// Chooses a setting of `grid` per track on the validation event (by
/// NDCG@10, ties by HR@10, then the earlier setting), fits it on the test
/// cut and evaluates it on the test event.
pub fn tune(
    protocol: &Protocol,
    grid: &[Baseline],
    seed: u64,
    phase: &mut dyn FnMut(&str),
) -> Vec<(Track, MethodResult)> {
    let Some(name) = grid.first().map(Baseline::name) else {
        return Vec::new();
    };
    let tracks = protocol.tracks();
    // Validation figures per track and setting.
    let mut rows: BTreeMap<Track, Vec<(Baseline, GridRow)>> = BTreeMap::new();
    for cut in protocol.used_cuts() {
        let valids: Vec<_> = protocol
            .evaluations_of(cut)
            .filter(|e| e.stage == Stage::Validation && e.n_users() > 0)
            .collect();
        if valids.is_empty() {
            continue;
        }
        for &b in grid {
            phase(&format!("{name} {} on validation", b.setting()));
            let fitted = b.fit(&protocol.histories, &protocol.cuts[cut]);
            for ev in &valids {
                let row = match &fitted {
                    Ok(f) => GridRow {
                        setting: b.setting(),
                        validation: Some(eval::evaluate(&protocol.cuts[cut], ev, seed, |u, o| {
                            f.score(u, o)
                        })),
                        note: None,
                    },
                    Err(why) => GridRow {
                        setting: b.setting(),
                        validation: None,
                        note: Some(why.clone()),
                    },
                };
                rows.entry(ev.track).or_default().push((b, row));
            }
        }
    }
    let mut results = Vec::new();
    for track in tracks {
        let track_rows = rows.remove(&track).unwrap_or_default();
        let best = track_rows
            .iter()
            .filter_map(|(b, r)| r.validation.map(|m| (*b, m)))
            .fold(None::<(Baseline, Metrics)>, |best, (b, m)| match best {
                Some((_, bm))
                    if (bm.full.ndcg_at_10, bm.full.hr_at_10)
                        >= (m.full.ndcg_at_10, m.full.hr_at_10) =>
                {
                    best
                }
                _ => Some((b, m)),
            });
        let grid_rows: Vec<GridRow> = track_rows.into_iter().map(|(_, r)| r).collect();
        let mut result = MethodResult {
            method: name.to_owned(),
            setting: String::new(),
            test: None,
            validation: None,
            grid: grid_rows,
            note: None,
        };
        match best {
            None => {
                result.note = Some(
                    result
                        .grid
                        .iter()
                        .find_map(|r| r.note.clone())
                        .unwrap_or_else(|| "no validation event to choose a setting on".into()),
                );
            }
            Some((b, valid)) => {
                let Some(ev) = protocol.evaluation(track, Stage::Test) else {
                    continue;
                };
                phase(&format!("{name} {} on test", b.setting()));
                result.setting = b.setting();
                result.validation = Some(valid);
                match b.fit(&protocol.histories, &protocol.cuts[ev.cut]) {
                    Ok(f) => {
                        result.test =
                            Some(eval::evaluate(&protocol.cuts[ev.cut], ev, seed, |u, o| {
                                f.score(u, o)
                            }))
                    }
                    Err(why) => result.note = Some(why),
                }
            }
        }
        results.push((track, result));
    }
    results
}

/// What a track's held-out item competes with, for a person.
fn candidates(track: Track) -> &'static str {
    match track {
        Track::Discover => "the latest first-time purchase, among every item not bought before",
        Track::BuyAgain => "the latest purchase when it is a re-buy, among every item",
        Track::NextPurchase => "the latest purchase, among every item",
    }
}

/// Writes one table per track: every method's test figures, the tuned
/// ones with their setting (chosen on the validation event).
pub fn write_tables(out: &mut impl std::io::Write, f: &Final) -> std::io::Result<()> {
    for t in &f.tracks {
        writeln!(
            out,
            "\n{}: {} ({} users; {} skipped, {} later events dropped)",
            t.track,
            candidates(t.track),
            t.users,
            t.skipped_users,
            t.dropped_events
        )?;
        let sampled = t.track.sampled();
        write!(
            out,
            "{:<20} {:<14} {:>8} {:>9}",
            "method", "setting", "HR@10", "NDCG@10"
        )?;
        if sampled {
            write!(out, " {:>12} {:>13}", "HR@10 (100)", "NDCG@10 (100)")?;
        }
        writeln!(out, " {:>12}", "coverage@10")?;
        for m in &t.methods {
            write!(out, "{:<20} {:<14}", m.method, m.setting)?;
            match &m.test {
                Some(r) => {
                    write!(out, " {:>8.4} {:>9.4}", r.full.hr_at_10, r.full.ndcg_at_10)?;
                    if let Some(s) = r.sampled100.filter(|_| sampled) {
                        write!(out, " {:>12.4} {:>13.4}", s.hr_at_10, s.ndcg_at_10)?;
                    }
                    writeln!(out, " {:>12.3}", r.coverage_at_10)?;
                }
                None => writeln!(out, " {}", m.note.as_deref().unwrap_or("did not run"))?,
            }
        }
    }
    writeln!(
        out,
        "(HR/NDCG: full ranking; (100): among 100 sampled candidates; settings chosen on the validation event)"
    )
}
