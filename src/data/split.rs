//! Leave-one-out train/test split.

use super::Dataset;

/// A leave-one-out split of a [`Dataset`], indexed by dense user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    /// Per dense user: distinct training items (each user-item pair once),
    /// sorted ascending.
    pub train: Vec<Vec<u32>>,
    /// Per dense user: the held-out item (`None` for skipped users).
    pub test: Vec<Option<u32>>,
    /// Users skipped because they had fewer than 2 interactions.
    pub skipped_users: usize,
    /// Number of items (the data set's, or more if an interaction refers to
    /// a higher index).
    pub n_items: usize,
}

impl Split {
    /// Number of users (length of `train` and `test`).
    pub fn n_users(&self) -> usize {
        self.train.len()
    }

    /// Number of users with a held-out item.
    pub fn n_test_users(&self) -> usize {
        self.test.iter().filter(|t| t.is_some()).count()
    }
}

/// Holds out each user's latest interaction.
///
/// * The held-out interaction is the one with the greatest `time`; among
///   equal times, the one appearing later in `ds.interactions` counts as later.
/// * All other interactions of the user form `train`, deduplicated per item and
///   sorted, so a repeat purchase can put the held-out item in `train` too.
/// * Users with fewer than 2 interactions (counting interactions, not
///   distinct items) get `test = None` and are counted in `skipped_users`;
///   their `train` keeps their item (one, or none for a user without any
///   interaction), so they still contribute to training.
///
/// Never panics: vectors are sized to cover every index that occurs, even if
/// `user_ids` / `item_ids` are shorter than the interactions imply.
pub fn leave_one_out(ds: &Dataset) -> Split {
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

    // Per user: interaction count and position of the latest interaction.
    let mut count = vec![0usize; n_users];
    let mut latest: Vec<Option<usize>> = vec![None; n_users];
    for (pos, x) in ds.interactions.iter().enumerate() {
        let u = x.user as usize;
        if let Some(c) = count.get_mut(u) {
            *c += 1;
        }
        if let Some(slot) = latest.get_mut(u) {
            let later = match *slot {
                None => true,
                // `>=`: a tie goes to the later position.
                Some(prev) => ds.interactions.get(prev).is_none_or(|p| x.time >= p.time),
            };
            if later {
                *slot = Some(pos);
            }
        }
    }

    let mut train: Vec<Vec<u32>> = vec![Vec::new(); n_users];
    let mut test: Vec<Option<u32>> = vec![None; n_users];
    let mut skipped_users = 0usize;
    for u in 0..n_users {
        if count.get(u).copied().unwrap_or(0) < 2 {
            skipped_users += 1;
            if let Some(slot) = latest.get_mut(u) {
                *slot = None;
            }
        }
    }
    for (pos, x) in ds.interactions.iter().enumerate() {
        let u = x.user as usize;
        if latest.get(u).copied().flatten() == Some(pos) {
            if let Some(t) = test.get_mut(u) {
                *t = Some(x.item);
            }
        } else if let Some(items) = train.get_mut(u) {
            items.push(x.item);
        }
    }
    for items in &mut train {
        items.sort_unstable();
        items.dedup();
    }
    Split {
        train,
        test,
        skipped_users,
        n_items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Interaction;

    fn dataset(n_users: usize, n_items: usize, rows: &[(u32, u32, i64)]) -> Dataset {
        Dataset {
            name: "t".into(),
            user_ids: (0..n_users).map(|u| format!("u{u}")).collect(),
            item_ids: (0..n_items).map(|i| format!("i{i}")).collect(),
            interactions: rows
                .iter()
                .map(|&(user, item, time)| Interaction {
                    user,
                    item,
                    time,
                    quantity: 1.0,
                })
                .collect(),
            skipped: Default::default(),
            timed: true,
        }
    }

    #[test]
    fn latest_by_time_is_held_out() {
        // User 0's latest interaction (time 30) is in the middle of the file.
        let ds = dataset(1, 5, &[(0, 1, 10), (0, 2, 30), (0, 3, 20)]);
        let s = leave_one_out(&ds);
        assert_eq!(s.test, vec![Some(2)]);
        assert_eq!(s.train, vec![vec![1, 3]]);
        assert_eq!(
            (s.skipped_users, s.n_items, s.n_users(), s.n_test_users()),
            (0, 5, 1, 1)
        );
    }

    #[test]
    fn ties_go_to_the_later_row() {
        let ds = dataset(1, 5, &[(0, 4, 5), (0, 1, 50), (0, 3, 50), (0, 2, 7)]);
        let s = leave_one_out(&ds);
        assert_eq!(s.test, vec![Some(3)]);
        assert_eq!(s.train, vec![vec![1, 2, 4]]);
        // No times at all (time 0 everywhere): the last row is held out.
        let ds = dataset(1, 5, &[(0, 4, 0), (0, 1, 0), (0, 0, 0)]);
        assert_eq!(leave_one_out(&ds).test, vec![Some(0)]);
    }

    #[test]
    fn repeat_purchase_as_held_out_item_and_dedup() {
        let ds = dataset(
            1,
            4,
            &[(0, 2, 1), (0, 1, 2), (0, 2, 3), (0, 1, 4), (0, 2, 5)],
        );
        let s = leave_one_out(&ds);
        assert_eq!(s.test, vec![Some(2)]);
        assert_eq!(s.train, vec![vec![1, 2]]);
    }

    #[test]
    fn users_with_fewer_than_two_interactions_are_skipped() {
        // u0: one interaction; u1: two interactions of the same item (kept:
        // interactions are counted, not items); u2: none; u3: normal.
        let ds = dataset(
            4,
            3,
            &[(0, 0, 1), (1, 2, 1), (1, 2, 2), (3, 0, 1), (3, 1, 2)],
        );
        let s = leave_one_out(&ds);
        assert_eq!(s.skipped_users, 2);
        assert_eq!(s.test, vec![None, Some(2), None, Some(1)]);
        assert_eq!(s.train, vec![vec![0], vec![2], vec![], vec![0]]);
    }

    #[test]
    fn indices_beyond_the_id_lists_do_not_panic() {
        let ds = dataset(1, 1, &[(2, 5, 1), (2, 6, 2)]);
        let s = leave_one_out(&ds);
        assert_eq!((s.n_users(), s.n_items, s.skipped_users), (3, 7, 2));
        assert_eq!(s.test.get(2).copied().flatten(), Some(6));
    }

    #[test]
    fn synthetic_split_holds_out_every_user() {
        let ds = match crate::data::synthetic(&crate::data::SyntheticConfig::default()) {
            Ok(ds) => ds,
            Err(e) => panic!("{e}"),
        };
        let s = leave_one_out(&ds);
        assert_eq!(s.skipped_users, 0);
        assert_eq!(s.n_test_users(), ds.n_users());
        assert!(
            s.train
                .iter()
                .all(|t| !t.is_empty() && t.windows(2).all(|w| w[0] < w[1]))
        );
    }
}
