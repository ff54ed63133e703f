//! Offline evaluation on the three tracks of [`crate::data::Protocol`]: the
//! metrics every method is reported with, the centralized baseline, and the
//! split written for external baselines.
//!
//! Every method ranks each user's held-out item with the same candidates
//! (the track's exclusion rule and, for discover, the same 99 sampled items
//! under [`candidate_seed`]), so the numbers are comparable.

use std::path::Path;
use std::sync::Arc;

use fedrec_client::model::{LocalTraining, Model};
use fedrec_client::ranking::{self, EvalCounts, HeldOut, K};
use fedrec_client::repeat;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::data::{Cut, Evaluation, Protocol, Stage};

/// HR@10 and NDCG@10 under one candidate protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Ranking {
    /// Hit rate at 10.
    pub hr_at_10: f64,
    /// NDCG at 10.
    pub ndcg_at_10: f64,
}

/// The metrics reported for each method on one track.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Full ranking: the held-out item against every candidate of its track.
    pub full: Ranking,
    /// The held-out item among 100 candidates (99 sampled items the user
    /// did not train on); discover only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampled100: Option<Ranking>,
    /// Fraction of the catalogue that appears in at least one user's top 10.
    pub coverage_at_10: f64,
    /// Users evaluated.
    pub users: u64,
}

impl Metrics {
    /// Metrics from summed counts and the number of distinct recommended
    /// items; `sampled`: whether the sampled protocol was counted.
    pub fn from_counts(c: &EvalCounts, covered: usize, n_items: usize, sampled: bool) -> Self {
        Self {
            full: Ranking {
                hr_at_10: c.hit_rate_full().unwrap_or(0.0),
                ndcg_at_10: c.ndcg_full_mean().unwrap_or(0.0),
            },
            sampled100: sampled.then(|| Ranking {
                hr_at_10: c.hit_rate_sampled().unwrap_or(0.0),
                ndcg_at_10: c.ndcg_sampled_mean().unwrap_or(0.0),
            }),
            coverage_at_10: covered as f64 / n_items.max(1) as f64,
            users: c.users,
        }
    }
}

/// The seed of user `user`'s 99 sampled candidates at `stage` under
/// evaluation seed `seed`.
pub fn candidate_seed(seed: u64, stage: Stage, user: usize) -> u64 {
    let salt = match stage {
        Stage::Test => 0,
        Stage::Validation => 0x05EE_D0F7_A11D,
    };
    (seed ^ salt).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (user as u64).wrapping_add(1)
}

/// What `user`'s held-out item in `ev` competes with, as a device holds it.
pub fn held_out(ev: &Evaluation, seed: u64, user: usize) -> Option<HeldOut> {
    Some(HeldOut {
        item: ev.targets[user]?,
        exclude_history: ev.track.excludes_history(),
        candidate_seed: ev
            .track
            .sampled()
            .then(|| candidate_seed(seed, ev.stage, user)),
    })
}

/// Tracks which items appear in users' top-10 lists.
#[derive(Clone, Debug)]
pub struct Coverage {
    seen: Vec<bool>,
}

impl Coverage {
    /// Empty coverage over `n_items` items.
    pub fn new(n_items: usize) -> Self {
        Self {
            seen: vec![false; n_items],
        }
    }

    /// Marks a top-10 list.
    pub fn add(&mut self, items: &[u32]) {
        for &i in items {
            if let Some(s) = self.seen.get_mut(i as usize) {
                *s = true;
            }
        }
    }

    /// Distinct items seen.
    pub fn covered(&self) -> usize {
        self.seen.iter().filter(|s| **s).count()
    }
}

/// Evaluates a scorer on every user with a held-out item in `ev` (trained
/// on `cut`, which must be `ev`'s). `score(user, out)` fills `out` with a
/// score per item; users are scored in parallel.
pub fn evaluate(
    cut: &Cut,
    ev: &Evaluation,
    seed: u64,
    score: impl Fn(usize, &mut Vec<f32>) + Sync,
) -> Metrics {
    let users: Vec<usize> = (0..ev.targets.len())
        .filter(|&u| ev.targets[u].is_some())
        .collect();
    let per_user: Vec<(EvalCounts, Vec<u32>)> = users
        .par_iter()
        .map_init(Vec::new, |scores, &user| {
            score(user, scores);
            let held = held_out(ev, seed, user).expect("filtered on targets");
            let excluded = ev.excluded(cut, user);
            let mut rng = held.candidate_seed.map(ChaCha8Rng::seed_from_u64);
            let counts = ranking::evaluate_user(
                scores,
                excluded,
                &cut.items[user],
                held.item,
                rng.as_mut().map(|r| r as &mut dyn rand::Rng),
            );
            (counts, ranking::top_k(scores, excluded, K))
        })
        .collect();
    let mut counts = EvalCounts::default();
    let mut coverage = Coverage::new(cut.n_items);
    for (c, top) in &per_user {
        counts.add(c);
        coverage.add(top);
    }
    Metrics::from_counts(&counts, coverage.covered(), cut.n_items, ev.track.sampled())
}

/// The centralized baseline: the same model trained on all users' data of
/// `cut` in one process ([`Model::fit_centralized`]: SGD passes for BPR,
/// alternating least squares for the ALS loss). Returns the global
/// parameters and every user's embedding.
pub fn train_centralized(
    model: &Arc<dyn Model>,
    cut: &Cut,
    cfg: &LocalTraining,
    epochs: u32,
    seed: u64,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut params = model.init_global(&mut rng);
    let mut users: Vec<Vec<f32>> = (0..cut.n_users())
        .map(|_| model.init_private(&mut rng))
        .collect();
    model.fit_centralized(&mut params, &mut users, &cut.items, cfg, epochs, &mut rng);
    (params, users)
}

/// Writes the protocol's splits for external baselines (e.g.
/// `scripts/implicit_peer.py`), one directory per reported track:
/// - `train.tsv` and `valid_train.tsv`: `user<TAB>item<TAB>count<TAB>last`,
///   the test and validation cuts' training data, each user-item pair once
///   with its number of purchase events and the time of the last one (Unix
///   seconds, or the position in the file for data without times);
/// - `test.tsv` and `valid.tsv`: `user<TAB>held_out`, and for discover
///   `<TAB>c1,…,c99`, the sampled candidates every method here uses under
///   `seed`;
/// - `meta.json`: the track, whether training items are excluded, whether
///   it is sampled, the users evaluated and skipped.
///
/// `DIR/meta.json` names the data, its size and the tracks;
/// `DIR/events.tsv` holds every user's events (`user<TAB>item<TAB>time<TAB>
/// quantity`, identical rows merged, in time order, ties in file order):
/// each cut's training data are a prefix of a user's events. Indices are
/// dense, from 0.
pub fn write_split(
    protocol: &Protocol,
    seed: u64,
    name: &str,
    timed: bool,
    dir: &Path,
) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tracks = protocol.tracks();
    for &track in &tracks {
        let tdir = dir.join(track.name());
        std::fs::create_dir_all(&tdir)?;
        let mut meta = serde_json::json!({
            "track": track.name(),
            "exclude_train": track.excludes_history(),
            "sampled": track.sampled(),
        });
        for (stage, train_file, test_file) in [
            (Stage::Test, "train.tsv", "test.tsv"),
            (Stage::Validation, "valid_train.tsv", "valid.tsv"),
        ] {
            let Some(ev) = protocol.evaluation(track, stage) else {
                continue;
            };
            let cut = &protocol.cuts[ev.cut];
            let mut train = std::io::BufWriter::new(std::fs::File::create(tdir.join(train_file))?);
            for user in 0..cut.n_users() {
                let mut counts: Vec<(u32, u32, i64)> = Vec::new();
                for e in cut.events(&protocol.histories, user) {
                    match counts.binary_search_by_key(&e.item, |c| c.0) {
                        Ok(at) => {
                            counts[at].1 += 1;
                            counts[at].2 = counts[at].2.max(e.time);
                        }
                        Err(at) => counts.insert(at, (e.item, 1, e.time)),
                    }
                }
                for (item, count, last) in counts {
                    writeln!(train, "{user}\t{item}\t{count}\t{last}")?;
                }
            }
            train.flush()?;
            let mut test = std::io::BufWriter::new(std::fs::File::create(tdir.join(test_file))?);
            for user in 0..ev.targets.len() {
                let Some(held) = held_out(ev, seed, user) else {
                    continue;
                };
                write!(test, "{user}\t{}", held.item)?;
                if let Some(cseed) = held.candidate_seed {
                    let mut rng = ChaCha8Rng::seed_from_u64(cseed);
                    let cands = ranking::sample_candidates(
                        cut.n_items,
                        &cut.items[user],
                        held.item,
                        &mut rng,
                    );
                    let cands: Vec<String> = cands.iter().map(ToString::to_string).collect();
                    write!(test, "\t{}", cands.join(","))?;
                }
                writeln!(test)?;
            }
            test.flush()?;
            let key = match stage {
                Stage::Test => "test",
                Stage::Validation => "valid",
            };
            meta[format!("{key}_users")] = ev.n_users().into();
            meta[format!("{key}_skipped_users")] = ev.skipped_users.into();
            meta[format!("{key}_dropped_events")] = ev.dropped_events.into();
        }
        std::fs::write(tdir.join("meta.json"), meta.to_string())?;
    }
    // Every user's merged events in time order, for baselines that need
    // sequences, counts or times (the cuts are prefixes of them).
    let mut events = std::io::BufWriter::new(std::fs::File::create(dir.join("events.tsv"))?);
    for (user, evs) in protocol.histories.users.iter().enumerate() {
        for e in evs {
            writeln!(events, "{user}\t{}\t{}\t{}", e.item, e.time, e.quantity)?;
        }
    }
    events.flush()?;
    let meta = serde_json::json!({
        "data": name,
        "users": protocol.histories.n_users(),
        "items": protocol.n_items(),
        "seed": seed,
        "timed": timed,
        "tracks": tracks.iter().map(|t| t.name()).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("meta.json"), meta.to_string())
}

/// Fits the buy-again score's weights ([`fedrec_client::repeat`]) on the
/// validation events of `protocol`'s buy-again track: each user's
/// validation re-buy is one choice among the items they bought before it,
/// with popularity percentiles from the validation cut's purchase counts
/// (a device uses its global model's popularity instead). Starts from zero
/// with [`fedrec_client::repeat::FIT_L2`]. `None` without buy-again
/// validation events. This is how [`fedrec_client::repeat::DEFAULT_WEIGHTS`]
/// were made (on Online Retail).
pub fn fit_repeat_weights(protocol: &Protocol) -> Option<([f32; repeat::FEATURES], usize)> {
    let choices = repeat_choices(protocol)?;
    let n = choices.len();
    (n > 0).then(|| {
        (
            repeat::adapt(
                &choices,
                &[0.0; repeat::FEATURES],
                repeat::FIT_L2,
                repeat::FIT_STEPS,
            ),
            n,
        )
    })
}

/// Chooses the blend's temperatures ([`repeat::Blend`]) on the validation
/// events of `protocol`'s next-purchase track: a centralized ALS model
/// (`model`, fitted on the validation cut with `cfg`) gives the discover
/// scores a device would have, and each device's buy-again scores and
/// re-buy share are computed as on the device. Returns every pair of
/// [`repeat::Blend::GRID`] temperatures with its validation NDCG@10 and
/// HR@10, best first; empty without next-purchase validation events.
pub fn fit_blend(
    protocol: &Protocol,
    model: &Arc<dyn Model>,
    cfg: &LocalTraining,
    seed: u64,
) -> Vec<(repeat::Blend, f64, f64)> {
    let Some(ev) = protocol.evaluation(crate::data::Track::NextPurchase, Stage::Validation) else {
        return Vec::new();
    };
    let cut = &protocol.cuts[ev.cut];
    let (params, users) = train_centralized(
        model,
        cut,
        cfg,
        crate::sim::ALS_CENTRALIZED_ITERATIONS,
        seed,
    );
    let mut pop = Vec::new();
    model.popularity(&params, &mut pop);
    let pct = repeat::percentiles(&pop);
    let grid: Vec<repeat::Blend> = repeat::Blend::GRID
        .iter()
        .flat_map(|&d| {
            repeat::Blend::GRID.iter().map(move |&r| repeat::Blend {
                discover_temperature: d,
                rebuy_temperature: r,
            })
        })
        .collect();
    let targets: Vec<(usize, u32)> = ev
        .targets
        .iter()
        .enumerate()
        .filter_map(|(u, t)| Some((u, (*t)?)))
        .collect();
    let per_user: Vec<Vec<(f64, f64)>> = targets
        .par_iter()
        .map(|&(user, target)| {
            let events = &protocol.histories.users[user];
            let now = events[cut.ends[user]].time.saturating_add(1);
            let purchases: Vec<fedrec_client::store::Purchase> = cut
                .events(&protocol.histories, user)
                .iter()
                .map(|e| fedrec_client::store::Purchase::new(e.item, e.time, e.quantity))
                .collect();
            let history = repeat::History::new(&purchases, now);
            let weights = repeat::device_weights(&purchases, now, &pct);
            let rebuy = repeat::buy_again(&history, now, &pct, &weights);
            let r = history.repeat_share(&purchases, now);
            let mut discover = Vec::new();
            model.score_all(&params, &users[user], &cut.items[user], &mut discover);
            grid.iter()
                .map(|b| {
                    let scores = repeat::blend(&rebuy, &discover, r, b);
                    let rank = ranking::full_rank(&scores, &[], target);
                    (ranking::ndcg_at(rank, K), ranking::hit_at(rank, K))
                })
                .collect()
        })
        .collect();
    let n = per_user.len().max(1) as f64;
    let mut out: Vec<(repeat::Blend, f64, f64)> = grid
        .iter()
        .enumerate()
        .map(|(g, b)| {
            let ndcg = per_user.iter().map(|u| u[g].0).sum::<f64>() / n;
            let hr = per_user.iter().map(|u| u[g].1).sum::<f64>() / n;
            (*b, ndcg, hr)
        })
        .collect();
    out.sort_by(|a, b| {
        (b.1, b.2)
            .partial_cmp(&(a.1, a.2))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    out
}

/// NDCG@10 of the chosen item among each choice's candidates under
/// `weights` (ties: the earlier candidate first).
pub fn choice_ndcg(choices: &[repeat::Choice], weights: &[f32; repeat::FEATURES]) -> f64 {
    let total: f64 = choices
        .iter()
        .map(|c| {
            let s: Vec<f32> = c.candidates.iter().map(|f| f.score(weights)).collect();
            let t = s[c.chosen];
            let rank = s
                .iter()
                .enumerate()
                .filter(|&(j, &v)| v > t || (v == t && j < c.chosen))
                .count();
            ranking::ndcg_at(rank, K)
        })
        .sum();
    total / choices.len().max(1) as f64
}

/// The validation re-buys of `protocol`'s buy-again track as choices among
/// each user's past items (see [`fit_repeat_weights`]).
pub fn repeat_choices(protocol: &Protocol) -> Option<Vec<repeat::Choice>> {
    let ev = protocol.evaluation(crate::data::Track::BuyAgain, Stage::Validation)?;
    let cut = &protocol.cuts[ev.cut];
    let pct = repeat::percentiles(&crate::baselines::popularity_order(cut));
    let mut choices = Vec::new();
    for (user, target) in ev.targets.iter().enumerate() {
        let Some(target) = *target else { continue };
        let events = &protocol.histories.users[user];
        let now = events[cut.ends[user]].time;
        let purchases: Vec<fedrec_client::store::Purchase> = cut
            .events(&protocol.histories, user)
            .iter()
            .map(|e| fedrec_client::store::Purchase::new(e.item, e.time, e.quantity))
            .collect();
        let history = repeat::History::new(&purchases, now);
        let Some(chosen) = history.items.iter().position(|p| p.item == target) else {
            continue;
        };
        let candidates = history
            .items
            .iter()
            .map(|p| history.features(p, now, pct[p.item as usize]))
            .collect();
        choices.push(repeat::Choice { candidates, chosen });
    }
    Some(choices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baselines::Baseline;
    use crate::data::{SyntheticConfig, Track, synthetic};
    use fedrec_client::model::MatrixFactorization;

    fn small() -> Protocol {
        let ds = synthetic(&SyntheticConfig {
            users: 300,
            items: 200,
            ..Default::default()
        })
        .unwrap();
        Protocol::new(&ds)
    }

    #[test]
    fn centralized_beats_popularity_on_planted_clusters() {
        let p = small();
        let ev = p.evaluation(Track::Discover, Stage::Test).unwrap();
        let cut = &p.cuts[ev.cut];
        let model: Arc<dyn Model> = Arc::new(MatrixFactorization::new(200, 16, 0.1).unwrap());
        let pop = Baseline::Popularity.fit(&p.histories, cut).unwrap();
        let pop = evaluate(cut, ev, 1, |u, out| pop.score(u, out));
        let (params, users) = train_centralized(&model, cut, &LocalTraining::default(), 20, 1);
        let cen = evaluate(cut, ev, 1, |u, out| {
            model.score_all(&params, &users[u], &cut.items[u], out)
        });
        assert!(pop.full.hr_at_10 > 0.0);
        assert!(
            cen.full.hr_at_10 > pop.full.hr_at_10,
            "centralized {cen:?} vs popularity {pop:?}"
        );
        assert!(cen.coverage_at_10 > pop.coverage_at_10);
        assert!(cen.sampled100.is_some());
    }

    #[test]
    fn written_split_has_the_evaluation_candidates() {
        let p = small();
        let dir = tempfile::tempdir().unwrap();
        write_split(&p, 3, "synthetic", true, dir.path()).unwrap();
        let ev = p.evaluation(Track::Discover, Stage::Test).unwrap();
        let cut = &p.cuts[ev.cut];
        let d = dir.path().join("discover");
        let train = std::fs::read_to_string(d.join("train.tsv")).unwrap();
        assert_eq!(train.lines().count(), cut.n_pairs());
        let test = std::fs::read_to_string(d.join("test.tsv")).unwrap();
        assert_eq!(test.lines().count(), ev.n_users());
        // The candidates written are those the evaluation ranks against:
        // ranking with scores that favour exactly them puts the target last.
        for line in test.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let (user, target): (usize, u32) = (f[0].parse().unwrap(), f[1].parse().unwrap());
            let cands: Vec<usize> = f[2].split(',').map(|c| c.parse().unwrap()).collect();
            assert!(cands.len() <= 99);
            let mut scores = vec![0.0_f32; cut.n_items];
            for &c in &cands {
                scores[c] = 1.0;
            }
            let mut rng = ChaCha8Rng::seed_from_u64(candidate_seed(3, Stage::Test, user));
            assert_eq!(
                ranking::sampled_rank(&scores, &cut.items[user], target, &mut rng),
                cands.len()
            );
        }
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("meta.json")).unwrap())
                .unwrap();
        let tracks: Vec<String> = p.tracks().iter().map(|t| t.name().to_owned()).collect();
        assert_eq!(meta["tracks"], serde_json::json!(tracks));
        for t in &tracks {
            assert!(dir.path().join(t).join("valid.tsv").is_file(), "{t}");
        }
    }
}
