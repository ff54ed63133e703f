//! Leave-one-out in time, per user, in three tracks.
//!
//! Purchase data are not ratings: shoppers buy the same items again, and a
//! basket holds many items at one time. A single "hold out the latest line"
//! protocol leaks on such data in two ways: the rest of the held-out basket
//! (lines with the same time) sits in training, and a held-out re-buy is the
//! only past item left among the candidates once training items are removed.
//! This module defines the protocol that removes both leaks.
//!
//! # The rules
//! Identical (user, item, time) rows are merged first (quantities summed;
//! the merged event takes the place of the last of them in the file). A
//! user's events are ordered by time, ties by file order. For each track the
//! held-out event has a time `t*`; the user's training data are their events
//! at **strictly earlier** times; the other events at `t*` and later are
//! dropped (and counted).
//! - [`Track::Discover`]: `t*` is the latest time at which the user bought
//!   an item not bought at an earlier time; the held-out item is such an
//!   item (the last such line at `t*`). Candidates: every item not in the
//!   user's training data (also ranked among 100 sampled candidates).
//! - [`Track::BuyAgain`]: `t*` is the user's latest time; the user
//!   qualifies only if some item bought at `t*` was bought earlier; that
//!   item is held out (the last such line). Candidates: every item.
//! - [`Track::NextPurchase`]: `t*` is the user's latest time; the last line
//!   at `t*` is held out. Candidates: every item.
//! - **Validation**: each track's rule applied again to the user's events
//!   before `t*` gives a validation event; settings are chosen on it, never
//!   on the test event.
//!
//! A user qualifies for a track only when the held-out event leaves some
//! training data (an event at an earlier time). Users without a qualifying
//! event are counted per track and keep all their training data in that
//! track's cut (their data at times they are evaluated on in no track of
//! the cut are not held out).
//!
//! # Cuts
//! A [`Cut`] is the training data a model is fitted on: per user, a prefix
//! of their events. Buy-again and next purchase share the latest-time cut;
//! discover has its own; each has a validation cut. Identical cuts (on data
//! where nobody re-buys, discover's cut is the latest-time cut) are kept
//! once, so each is trained once.
//!
//! Without a time column the line order of the file is the time (each line
//! its own moment; see [`Dataset::timed`]).

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

use super::Dataset;

/// One of the three evaluation tracks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Track {
    /// The latest first-time purchase, ranked against everything the user
    /// has not bought ("Recommended for you").
    Discover,
    /// The latest purchase when it is a re-buy, ranked against every item
    /// ("Buy it again").
    BuyAgain,
    /// The latest purchase, whatever it is, ranked against every item (the
    /// one list an app shows).
    NextPurchase,
}

impl Track {
    /// Every track, in report order.
    pub const ALL: [Track; 3] = [Track::Discover, Track::BuyAgain, Track::NextPurchase];

    /// Which track a cut's federated run holds out when the cut serves
    /// several: the latest-time cut trains for next purchase, the track
    /// every user has an event on.
    pub const TRAINING_ORDER: [Track; 3] = [Track::Discover, Track::NextPurchase, Track::BuyAgain];

    /// The track's name in reports and file names.
    pub fn name(self) -> &'static str {
        match self {
            Track::Discover => "discover",
            Track::BuyAgain => "buy-again",
            Track::NextPurchase => "next-purchase",
        }
    }

    /// Whether the user's training items are removed from the candidates
    /// (discover only: the others rank every item).
    pub fn excludes_history(self) -> bool {
        self == Track::Discover
    }

    /// Whether the track is also reported among 100 sampled candidates
    /// (discover only, for comparison with published tables).
    pub fn sampled(self) -> bool {
        self == Track::Discover
    }

    /// Which cut the track trains on.
    fn cut_kind(self) -> CutKind {
        match self {
            Track::Discover => CutKind::Discover,
            Track::BuyAgain | Track::NextPurchase => CutKind::Latest,
        }
    }
}

impl fmt::Display for Track {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Test or validation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The held-out event every figure is reported on.
    #[default]
    Test,
    /// The event before it, on which settings are chosen.
    Validation,
}

impl Stage {
    /// The stage's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Test => "test",
            Stage::Validation => "validation",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CutKind {
    Discover,
    Latest,
}

/// One purchase event of a user, after merging identical (user, item, time)
/// rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Event {
    /// Dense item index.
    pub item: u32,
    /// Unix seconds, or the position in the file when the data have no time.
    pub time: i64,
    /// Quantity (summed over merged rows).
    pub quantity: f32,
}

/// Every user's events in time order (ties in file order), identical
/// (user, item, time) rows merged.
#[derive(Clone, Debug, PartialEq)]
pub struct Histories {
    /// Per dense user.
    pub users: Vec<Vec<Event>>,
    /// Items in the catalogue.
    pub n_items: usize,
    /// Rows merged into an identical (user, item, time) row.
    pub merged_rows: u64,
}

impl Histories {
    /// Groups `ds`'s interactions by user, orders them in time and merges
    /// identical rows. Never panics: vectors cover every index that occurs.
    pub fn new(ds: &Dataset) -> Self {
        let n_users = ds
            .interactions
            .iter()
            .map(|x| x.user as usize + 1)
            .max()
            .unwrap_or(0)
            .max(ds.n_users());
        let n_items = ds
            .interactions
            .iter()
            .map(|x| x.item as usize + 1)
            .max()
            .unwrap_or(0)
            .max(ds.n_items());
        let mut users: Vec<Vec<Event>> = vec![Vec::new(); n_users];
        for x in &ds.interactions {
            users[x.user as usize].push(Event {
                item: x.item,
                time: x.time,
                quantity: x.quantity,
            });
        }
        let mut merged_rows = 0;
        for events in &mut users {
            // Stable: ties keep file order.
            events.sort_by_key(|e| e.time);
            merged_rows += merge_identical(events);
        }
        Self {
            users,
            n_items,
            merged_rows,
        }
    }

    /// Number of users.
    pub fn n_users(&self) -> usize {
        self.users.len()
    }
}

/// Merges events with the same item within each run of equal times into
/// the position of the last of them, summing quantities. Returns how many
/// rows were merged away.
fn merge_identical(events: &mut Vec<Event>) -> u64 {
    let before = events.len();
    let mut out: Vec<Event> = Vec::with_capacity(events.len());
    let mut start = 0;
    while start < events.len() {
        let time = events[start].time;
        let end = start
            + events[start..]
                .iter()
                .take_while(|e| e.time == time)
                .count();
        // Walk the run backwards so that each item keeps its last line.
        let mut run: Vec<Event> = Vec::with_capacity(end - start);
        for e in events[start..end].iter().rev() {
            match run.iter_mut().find(|r| r.item == e.item) {
                Some(r) => r.quantity += e.quantity,
                None => run.push(*e),
            }
        }
        out.extend(run.into_iter().rev());
        start = end;
    }
    *events = out;
    (before - events.len()) as u64
}

/// The training data one model is fitted on: per user, a prefix of their
/// events (all of them for a user held out nowhere in the cut).
#[derive(Clone, Debug, PartialEq)]
pub struct Cut {
    /// Per user: how many of their events (in time order) are training data.
    pub ends: Vec<usize>,
    /// Per user: the distinct training items, sorted ascending.
    pub items: Vec<Vec<u32>>,
    /// Items in the catalogue.
    pub n_items: usize,
}

impl Cut {
    fn new(histories: &Histories, ends: Vec<usize>) -> Self {
        let items = histories
            .users
            .iter()
            .zip(&ends)
            .map(|(events, &end)| {
                let mut items: Vec<u32> = events[..end].iter().map(|e| e.item).collect();
                items.sort_unstable();
                items.dedup();
                items
            })
            .collect();
        Self {
            ends,
            items,
            n_items: histories.n_items,
        }
    }

    /// `user`'s training events in time order.
    pub fn events<'h>(&self, histories: &'h Histories, user: usize) -> &'h [Event] {
        &histories.users[user][..self.ends[user]]
    }

    /// Number of users.
    pub fn n_users(&self) -> usize {
        self.items.len()
    }

    /// Distinct (user, item) pairs in training.
    pub fn n_pairs(&self) -> usize {
        self.items.iter().map(Vec::len).sum()
    }
}

/// One track at one stage: whom it evaluates, on which item, trained on
/// which cut.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// The track.
    pub track: Track,
    /// Test or validation.
    pub stage: Stage,
    /// Index of the training cut in [`Protocol::cuts`].
    pub cut: usize,
    /// Per user: the held-out item, `None` when the user does not qualify.
    pub targets: Vec<Option<u32>>,
    /// Users without a qualifying event.
    pub skipped_users: usize,
    /// Events at the held-out time and later, other than the held-out one,
    /// left out of this evaluation's training data.
    pub dropped_events: u64,
}

impl Evaluation {
    /// Users with a held-out item.
    pub fn n_users(&self) -> usize {
        self.targets.iter().flatten().count()
    }

    /// What `user`'s held-out item competes with is everything but this:
    /// their training items for discover, nothing otherwise.
    pub fn excluded<'c>(&self, cut: &'c Cut, user: usize) -> &'c [u32] {
        if self.track.excludes_history() {
            &cut.items[user]
        } else {
            &[]
        }
    }
}

/// The whole protocol for a data set: the histories, the distinct cuts and
/// every (track, stage) evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct Protocol {
    /// Every user's events.
    pub histories: Histories,
    /// The distinct training cuts (test cuts first).
    pub cuts: Vec<Cut>,
    /// The tracks reported, each at both stages.
    pub evaluations: Vec<Evaluation>,
}

/// Where a rule puts a user's held-out event: the index of the first event
/// at the held-out time (the training data are the events before it) and
/// the index of the held-out event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HeldOut {
    train_end: usize,
    event: usize,
}

/// The time each item was first bought within `events` (time-ordered).
fn first_times(events: &[Event]) -> HashMap<u32, i64> {
    let mut first = HashMap::with_capacity(events.len());
    for e in events {
        first.entry(e.item).or_insert(e.time);
    }
    first
}

/// Applies `track`'s rule to `events` (time-ordered, merged).
fn rule(track: Track, events: &[Event]) -> Option<HeldOut> {
    let last_time = events.last()?.time;
    // An item is new at time t when it was not bought at any time before t.
    let first = first_times(events);
    let first_time = |item: u32| first.get(&item).copied().unwrap_or(i64::MAX);
    let held = match track {
        Track::Discover => {
            // Scanning backwards, the first first-time purchase met is the
            // last such line at the latest such time t*.
            let event = (0..events.len())
                .rev()
                .find(|&i| first_time(events[i].item) == events[i].time)?;
            let time = events[event].time;
            HeldOut {
                train_end: events.partition_point(|e| e.time < time),
                event,
            }
        }
        Track::BuyAgain => {
            let train_end = events.partition_point(|e| e.time < last_time);
            let event = (train_end..events.len())
                .rev()
                .find(|&i| first_time(events[i].item) < last_time)?;
            HeldOut { train_end, event }
        }
        Track::NextPurchase => HeldOut {
            train_end: events.partition_point(|e| e.time < last_time),
            event: events.len() - 1,
        },
    };
    (held.train_end > 0).then_some(held)
}

impl Protocol {
    /// The three tracks on `ds`. Where no user bought any item at two
    /// different times, only discover is reported (buy-again has nobody and
    /// next purchase is discover's held-out event ranked among items the
    /// user already has).
    pub fn new(ds: &Dataset) -> Self {
        let histories = Histories::new(ds);
        let rebuys = histories.users.iter().any(|events| {
            let first = first_times(events);
            events
                .iter()
                .any(|e| first.get(&e.item).is_some_and(|&t| t < e.time))
        });
        let tracks: &[Track] = if rebuys {
            &Track::ALL
        } else {
            &[Track::Discover]
        };
        let mut cuts: Vec<Cut> = Vec::new();
        let mut evaluations = Vec::new();
        // Test stages first, so that the test cuts come first.
        for stage in [Stage::Test, Stage::Validation] {
            for &track in tracks {
                // The cut is fixed by its kind's own rule (buy-again shares
                // next purchase's latest-time cut), the target by the track's.
                let cut_rule = match track.cut_kind() {
                    CutKind::Discover => Track::Discover,
                    CutKind::Latest => Track::NextPurchase,
                };
                let n_users = histories.n_users();
                let mut ends = Vec::with_capacity(n_users);
                let mut targets = Vec::with_capacity(n_users);
                let mut dropped_events = 0u64;
                for events in &histories.users {
                    let test_end = rule(cut_rule, events).map_or(events.len(), |h| h.train_end);
                    let scope = match stage {
                        Stage::Test => events.as_slice(),
                        Stage::Validation => &events[..test_end],
                    };
                    let end = rule(cut_rule, scope).map_or(scope.len(), |h| h.train_end);
                    let target = rule(track, scope).map(|h| {
                        debug_assert_eq!(h.train_end, end, "a track's held-out time is its cut's");
                        dropped_events += (scope.len() - end - 1) as u64;
                        scope[h.event].item
                    });
                    ends.push(end);
                    targets.push(target);
                }
                let cut = match cuts.iter().position(|c| c.ends == ends) {
                    Some(i) => i,
                    None => {
                        cuts.push(Cut::new(&histories, ends));
                        cuts.len() - 1
                    }
                };
                evaluations.push(Evaluation {
                    track,
                    stage,
                    cut,
                    skipped_users: targets.iter().filter(|t| t.is_none()).count(),
                    targets,
                    dropped_events,
                });
            }
        }
        // A track nobody qualifies for at test is not reported.
        let reported: Vec<Track> = evaluations
            .iter()
            .filter(|e| e.stage == Stage::Test && e.n_users() > 0)
            .map(|e| e.track)
            .collect();
        evaluations.retain(|e| reported.contains(&e.track));
        Self {
            histories,
            cuts,
            evaluations,
        }
    }

    /// The evaluation of `track` at `stage`, if the track is reported.
    pub fn evaluation(&self, track: Track, stage: Stage) -> Option<&Evaluation> {
        self.evaluations
            .iter()
            .find(|e| e.track == track && e.stage == stage)
    }

    /// The tracks reported, in order.
    pub fn tracks(&self) -> Vec<Track> {
        let mut tracks: Vec<Track> = self
            .evaluations
            .iter()
            .filter(|e| e.stage == Stage::Test)
            .map(|e| e.track)
            .collect();
        tracks.dedup();
        tracks
    }

    /// The reported tracks in [`Track::TRAINING_ORDER`]: the first of each
    /// cut is the one its federated run holds out, and the very first is the
    /// main run's (and the settings search's).
    pub fn training_tracks(&self) -> Vec<Track> {
        let mut tracks = self.tracks();
        tracks.sort_by_key(|t| Track::TRAINING_ORDER.iter().position(|o| o == t));
        tracks
    }

    /// The evaluations that use cut `cut`.
    pub fn evaluations_of(&self, cut: usize) -> impl Iterator<Item = &Evaluation> {
        self.evaluations.iter().filter(move |e| e.cut == cut)
    }

    /// Indices of the cuts some reported evaluation uses, test cuts first.
    pub fn used_cuts(&self) -> Vec<usize> {
        let mut used: Vec<usize> = self.evaluations.iter().map(|e| e.cut).collect();
        used.sort_unstable();
        used.dedup();
        used
    }

    /// Items in the catalogue.
    pub fn n_items(&self) -> usize {
        self.histories.n_items
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Interaction;

    /// A data set of `(user, item, time)` rows in file order.
    fn log(rows: &[(u32, u32, i64)]) -> Dataset {
        log_q(
            &rows
                .iter()
                .map(|&(u, i, t)| (u, i, t, 1.0))
                .collect::<Vec<_>>(),
        )
    }

    fn log_q(rows: &[(u32, u32, i64, f32)]) -> Dataset {
        let users = rows.iter().map(|r| r.0 + 1).max().unwrap_or(0) as usize;
        let items = rows.iter().map(|r| r.1 + 1).max().unwrap_or(0) as usize;
        Dataset {
            name: "t".into(),
            user_ids: (0..users).map(|u| format!("u{u}")).collect(),
            item_ids: (0..items).map(|i| format!("i{i}")).collect(),
            interactions: rows
                .iter()
                .map(|&(user, item, time, quantity)| Interaction {
                    user,
                    item,
                    time,
                    quantity,
                })
                .collect(),
            ..Dataset::default()
        }
    }

    fn target(p: &Protocol, track: Track, stage: Stage, user: usize) -> Option<u32> {
        p.evaluation(track, stage).and_then(|e| e.targets[user])
    }

    fn train(p: &Protocol, track: Track, stage: Stage, user: usize) -> Vec<u32> {
        let e = p.evaluation(track, stage).expect("track reported");
        p.cuts[e.cut].items[user].clone()
    }

    #[test]
    fn a_basket_is_never_split_between_training_and_test() {
        // One invoice of three lines at time 20 after two earlier baskets:
        // the rest of the last basket must not be in training.
        let p = Protocol::new(&log(&[
            (0, 0, 10),
            (0, 1, 10),
            (0, 2, 15),
            (0, 3, 20),
            (0, 4, 20),
            (0, 5, 20),
        ]));
        assert_eq!(p.tracks(), vec![Track::Discover]);
        // The last line at the latest time is held out; the other two are dropped.
        assert_eq!(target(&p, Track::Discover, Stage::Test, 0), Some(5));
        assert_eq!(train(&p, Track::Discover, Stage::Test, 0), vec![0, 1, 2]);
        let test = p.evaluation(Track::Discover, Stage::Test).unwrap();
        assert_eq!(test.dropped_events, 2);
        // Validation: the same rule on the events before time 20.
        assert_eq!(target(&p, Track::Discover, Stage::Validation, 0), Some(2));
        assert_eq!(train(&p, Track::Discover, Stage::Validation, 0), vec![0, 1]);
    }

    #[test]
    fn ties_follow_file_order_and_times_sort_first() {
        // Rows out of time order in the file; equal times keep file order.
        let p = Protocol::new(&log(&[(0, 4, 50), (0, 1, 5), (0, 3, 50), (0, 2, 7)]));
        assert_eq!(target(&p, Track::Discover, Stage::Test, 0), Some(3));
        assert_eq!(train(&p, Track::Discover, Stage::Test, 0), vec![1, 2]);
        assert_eq!(target(&p, Track::Discover, Stage::Validation, 0), Some(2));
    }

    #[test]
    fn identical_rows_are_merged_with_their_quantities() {
        let p = Protocol::new(&log_q(&[
            (0, 1, 5, 2.0),
            (0, 2, 5, 1.0),
            (0, 1, 5, 3.0),
            (0, 3, 9, 1.0),
        ]));
        assert_eq!(p.histories.merged_rows, 1);
        let events = &p.histories.users[0];
        assert_eq!(events.len(), 3);
        // The merged event takes the place of its last line.
        assert_eq!((events[1].item, events[1].quantity), (1, 5.0));
        assert_eq!(events[0].item, 2);
    }

    #[test]
    fn rebuys_make_three_tracks_with_their_own_targets() {
        // user 0: buys 1 and 2, then 3, then re-buys 1 with a new 4 at the end.
        // user 1: no re-buy; user 2: a single basket (skipped everywhere).
        let p = Protocol::new(&log(&[
            (0, 1, 1),
            (0, 2, 1),
            (0, 3, 2),
            (0, 1, 3),
            (0, 4, 3),
            (1, 5, 1),
            (1, 6, 2),
            (1, 7, 3),
            (2, 1, 4),
            (2, 2, 4),
        ]));
        assert_eq!(p.tracks(), Track::ALL.to_vec());
        // Discover: the latest first-time purchase is 4 at time 3.
        assert_eq!(target(&p, Track::Discover, Stage::Test, 0), Some(4));
        // Buy-again: 1 was bought before time 3.
        assert_eq!(target(&p, Track::BuyAgain, Stage::Test, 0), Some(1));
        // Next purchase: the last line at time 3.
        assert_eq!(target(&p, Track::NextPurchase, Stage::Test, 0), Some(4));
        assert_eq!(train(&p, Track::BuyAgain, Stage::Test, 0), vec![1, 2, 3]);
        // User 1 never re-buys: no buy-again event, but discover and next.
        assert_eq!(target(&p, Track::BuyAgain, Stage::Test, 1), None);
        assert_eq!(target(&p, Track::NextPurchase, Stage::Test, 1), Some(7));
        // User 2 has one time only: skipped in every track, trains on all.
        for track in Track::ALL {
            assert_eq!(target(&p, track, Stage::Test, 2), None, "{track}");
            assert_eq!(train(&p, track, Stage::Test, 2), vec![1, 2]);
        }
        let skipped = |t| p.evaluation(t, Stage::Test).unwrap().skipped_users;
        assert_eq!(
            (
                skipped(Track::Discover),
                skipped(Track::BuyAgain),
                skipped(Track::NextPurchase)
            ),
            (1, 2, 1)
        );
        // Validation of buy-again: events before time 3 end with 3 at time
        // 2, not a re-buy: no validation event for user 0.
        assert_eq!(target(&p, Track::BuyAgain, Stage::Validation, 0), None);
        assert_eq!(
            target(&p, Track::NextPurchase, Stage::Validation, 0),
            Some(3)
        );
        assert_eq!(
            train(&p, Track::NextPurchase, Stage::Validation, 0),
            vec![1, 2]
        );
        // Buy-again and next purchase share their cuts; discover's differs
        // only where the latest time is not a first-time purchase.
        let cut = |t, s| p.evaluation(t, s).unwrap().cut;
        assert_eq!(
            cut(Track::BuyAgain, Stage::Test),
            cut(Track::NextPurchase, Stage::Test)
        );
        assert_eq!(
            cut(Track::BuyAgain, Stage::Validation),
            cut(Track::NextPurchase, Stage::Validation)
        );
    }

    #[test]
    fn discover_looks_back_past_a_last_basket_of_rebuys() {
        // The last basket only re-buys: discover's t* is the time before.
        let p = Protocol::new(&log(&[
            (0, 1, 1),
            (0, 2, 2),
            (0, 3, 2),
            (0, 1, 3),
            (0, 2, 3),
        ]));
        assert_eq!(target(&p, Track::Discover, Stage::Test, 0), Some(3));
        assert_eq!(train(&p, Track::Discover, Stage::Test, 0), vec![1]);
        let test = p.evaluation(Track::Discover, Stage::Test).unwrap();
        // Dropped: item 2 at time 2 and both re-buys at time 3.
        assert_eq!(test.dropped_events, 3);
        assert_eq!(target(&p, Track::BuyAgain, Stage::Test, 0), Some(2));
        // Discover's cut differs from the latest-time cut here.
        assert_ne!(
            p.evaluation(Track::Discover, Stage::Test).unwrap().cut,
            p.evaluation(Track::BuyAgain, Stage::Test).unwrap().cut
        );
        // Discover's validation: before time 2 only item 1 at time 1, which
        // leaves no training data: skipped.
        assert_eq!(target(&p, Track::Discover, Stage::Validation, 0), None);
    }

    #[test]
    fn without_rebuys_discover_alone_is_reported_and_trained_once() {
        let p = Protocol::new(&log(&[
            (0, 1, 1),
            (0, 2, 2),
            (0, 3, 3),
            (1, 1, 1),
            (1, 3, 2),
        ]));
        assert_eq!(p.tracks(), vec![Track::Discover]);
        assert_eq!(p.evaluation(Track::NextPurchase, Stage::Test), None);
        assert_eq!(p.used_cuts().len(), 2, "one test cut, one validation cut");
    }

    #[test]
    fn untimed_logs_use_line_order() {
        // Positions as times: every line its own moment. (User 1 re-buys
        // at the end, so that buy-again is reported.)
        let p = Protocol::new(&log(&[
            (0, 1, 0),
            (0, 2, 1),
            (0, 1, 2),
            (0, 3, 3),
            (1, 1, 4),
            (1, 1, 5),
        ]));
        assert_eq!(target(&p, Track::BuyAgain, Stage::Test, 1), Some(1));
        assert_eq!(target(&p, Track::NextPurchase, Stage::Test, 0), Some(3));
        assert_eq!(target(&p, Track::BuyAgain, Stage::Test, 0), None);
        assert_eq!(
            target(&p, Track::NextPurchase, Stage::Validation, 0),
            Some(1)
        );
        assert_eq!(target(&p, Track::BuyAgain, Stage::Validation, 0), Some(1));
        assert_eq!(train(&p, Track::BuyAgain, Stage::Validation, 0), vec![1, 2]);
    }
}
