//! The shopper's controls: purchases left out of personalization and training.
//!
//! The shopper can exclude one [`Exclusion::Purchase`], an
//! [`Exclusion::Item`] (every purchase of it, past and future) or an
//! [`Exclusion::Tag`] (every purchase the app labelled so, past and future).
//! An excluded purchase is as if it had never been made: it does not shape
//! the private embedding, the updates sent for training, evaluations,
//! recommendations or explanations, and its item may be recommended like any
//! item not bought. It is still stored (and shown in the transparency
//! report), subject to retention, until retention or `forget_me` removes it.
//!
//! The exclusions are held in a cell that every copy of a device shares (like
//! the consent), so a change made while a training round runs on a copy
//! applies to that round: the copy reads them when it computes, and computes
//! again if they changed meanwhile (see [`crate::device::Device::history`]).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::store::{Purchase, PurchaseKey, Tag};

/// One thing the shopper excluded.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Exclusion {
    /// One stored purchase (see [`PurchaseKey`]). Dropped with the purchase
    /// when retention or `forget_me` removes it.
    Purchase(PurchaseKey),
    /// Every purchase of this item, past and future.
    Item(u32),
    /// Every purchase with this tag, past and future.
    Tag(Tag),
}

impl Exclusion {
    /// Every purchase tagged `tag`; [`crate::ClientError::InvalidTag`] for
    /// a malformed tag.
    pub fn tag(tag: &str) -> Result<Self, crate::ClientError> {
        Tag::new(tag).map(Self::Tag)
    }

    /// Whether this exclusion leaves `purchase` out.
    pub fn covers(&self, purchase: &Purchase) -> bool {
        match self {
            Self::Purchase(key) => *key == purchase.key(),
            Self::Item(item) => *item == purchase.item,
            Self::Tag(tag) => purchase.tag.as_ref() == Some(tag),
        }
    }
}

/// What the shopper excluded, in order: purchases, items, tags.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Exclusions(BTreeSet<Exclusion>);

impl Exclusions {
    /// Whether `purchase` is left out by any exclusion.
    pub fn excludes(&self, purchase: &Purchase) -> bool {
        !self.0.is_empty() && self.0.iter().any(|x| x.covers(purchase))
    }

    /// Whether `exclusion` is in force.
    pub fn contains(&self, exclusion: &Exclusion) -> bool {
        self.0.contains(exclusion)
    }

    /// Every exclusion, purchases first, then items, then tags.
    pub fn iter(&self) -> impl Iterator<Item = &Exclusion> {
        self.0.iter()
    }

    /// How many exclusions there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing is excluded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The exclusions shared by a device and its copies, with a count of
/// changes so a computation can tell whether they changed under it.
#[derive(Clone, Debug, Default)]
pub(crate) struct ExclusionCell(Arc<Mutex<Versioned>>);

#[derive(Debug, Default)]
struct Versioned {
    exclusions: Exclusions,
    /// Incremented by every change.
    version: u64,
}

impl ExclusionCell {
    fn lock(&self) -> std::sync::MutexGuard<'_, Versioned> {
        // Every change is a single set operation: a panic elsewhere cannot
        // leave the set half written.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The exclusions in force.
    pub(crate) fn get(&self) -> Exclusions {
        self.lock().exclusions.clone()
    }

    /// Runs `f` on the exclusions in force, returning its result and the version it saw.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&Exclusions) -> R) -> (R, u64) {
        let v = self.lock();
        (f(&v.exclusions), v.version)
    }

    /// The number of changes so far.
    pub(crate) fn version(&self) -> u64 {
        self.lock().version
    }

    /// Replaces the exclusions (a store being loaded).
    pub(crate) fn set(&self, exclusions: Exclusions) {
        let mut v = self.lock();
        v.exclusions = exclusions;
        v.version += 1;
    }

    /// Adds `exclusion`; whether it was new.
    pub(crate) fn insert(&self, exclusion: Exclusion) -> bool {
        let mut v = self.lock();
        let new = v.exclusions.0.insert(exclusion);
        v.version += u64::from(new);
        new
    }

    /// Removes `exclusion`; whether it was there.
    pub(crate) fn remove(&self, exclusion: &Exclusion) -> bool {
        let mut v = self.lock();
        let was = v.exclusions.0.remove(exclusion);
        v.version += u64::from(was);
        was
    }

    /// Drops the exclusions of single purchases for which `stored` is false
    /// (removed by retention or `forget_me`). Not while a copy of the device
    /// shares the cell: the copy may still hold such a purchase, and must
    /// keep leaving it out; the owner prunes again when the copy is back.
    pub(crate) fn prune_purchases(&self, stored: impl Fn(PurchaseKey) -> bool) {
        if Arc::strong_count(&self.0) > 1 {
            return;
        }
        let mut v = self.lock();
        let before = v.exclusions.len();
        v.exclusions.0.retain(|x| match x {
            Exclusion::Purchase(key) => stored(*key),
            _ => true,
        });
        if v.exclusions.len() < before {
            v.version += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_covers_what_it_names() {
        let gift = Tag::new("gift").unwrap();
        let p = Purchase::new(3, 100, 1.0).with_tag(gift.clone());
        assert!(Exclusion::Purchase(p.key()).covers(&p));
        assert!(!Exclusion::Purchase(PurchaseKey { item: 3, time: 101 }).covers(&p));
        assert!(Exclusion::Item(3).covers(&p));
        assert!(!Exclusion::Item(4).covers(&p));
        assert!(Exclusion::Tag(gift).covers(&p));
        assert!(!Exclusion::tag("medical").unwrap().covers(&p));
        assert!(
            !Exclusion::tag("gift")
                .unwrap()
                .covers(&Purchase::new(3, 5, 1.0))
        );
    }

    #[test]
    fn the_stored_form_is_plain_and_ordered() {
        let cell = ExclusionCell::default();
        assert!(cell.insert(Exclusion::tag("gift").unwrap()));
        assert!(cell.insert(Exclusion::Item(9)));
        assert!(cell.insert(Exclusion::Purchase(PurchaseKey { item: 2, time: 7 })));
        assert!(!cell.insert(Exclusion::Item(9)), "already there");
        assert_eq!(cell.version(), 3);
        let json = serde_json::to_string(&cell.get()).unwrap();
        assert_eq!(
            json,
            r#"[{"purchase":{"item":2,"time":7}},{"item":9},{"tag":"gift"}]"#
        );
        let back: Exclusions = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cell.get());
        let bad = r#"[{"tag":"no spaces"}]"#;
        assert!(serde_json::from_str::<Exclusions>(bad).is_err());
    }

    #[test]
    fn purchase_exclusions_are_pruned_only_when_no_copy_shares_them() {
        let cell = ExclusionCell::default();
        cell.insert(Exclusion::Purchase(PurchaseKey { item: 2, time: 7 }));
        cell.insert(Exclusion::Item(2));
        let copy = cell.clone();
        cell.prune_purchases(|_| false);
        assert_eq!(copy.get().len(), 2, "a copy is out: kept");
        drop(copy);
        cell.prune_purchases(|_| false);
        assert_eq!(cell.get().iter().collect::<Vec<_>>(), [&Exclusion::Item(2)]);
    }
}
