//! The device's local purchase store.
//!
//! Only what training needs is kept: the item, the time and the quantity of
//! each purchase, and the app's [`Tag`] when it gave one (so the shopper can
//! exclude every purchase so tagged; see [`crate::exclusion`]). There is no
//! field for anything else, and a stored record with any other field is
//! refused when loaded.

use crate::error::ClientError;
use crate::exclusion::Exclusions;
use crate::retention::RetentionPolicy;

/// How far in the future (seconds, against the device's clock) a purchase
/// time may lie: a little clock skew, not a way around retention.
pub const MAX_FUTURE_SECS: i64 = 24 * 3600;

/// Longest [`Tag`], in characters.
pub const MAX_TAG_LEN: usize = 32;

/// One purchase as the device stores it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purchase {
    /// Catalogue index of the item.
    pub item: u32,
    /// Unix seconds.
    pub time: i64,
    /// Quantity bought.
    pub quantity: f32,
    /// The app's label for the purchase, if any (e.g. `gift`, `medical`):
    /// only the label is stored, so the shopper can exclude every purchase
    /// that carries it. Stores written before tags existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Tag>,
}

impl Purchase {
    /// An untagged purchase of `quantity` of `item` at `time` (Unix seconds).
    pub fn new(item: u32, time: i64, quantity: f32) -> Self {
        Self {
            item,
            time,
            quantity,
            tag: None,
        }
    }

    /// This purchase, labelled `tag`.
    pub fn with_tag(self, tag: Tag) -> Self {
        Self {
            tag: Some(tag),
            ..self
        }
    }

    /// What names this purchase for [`Exclusion::Purchase`](crate::exclusion::Exclusion::Purchase).
    pub fn key(&self) -> PurchaseKey {
        PurchaseKey {
            item: self.item,
            time: self.time,
        }
    }
}

/// One stored purchase, named by its item and time.
///
/// Why not a number assigned when it is recorded: the item and the time are
/// already stored, so nothing is added to the store; they stay the same
/// when retention drops other purchases and when the store is reopened; and
/// the app knows them without keeping anything (its own order history).
/// Purchases of the same item in the same second share a key: the store
/// cannot tell them apart by anything that matters, and they are excluded
/// together.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct PurchaseKey {
    /// Catalogue index of the item.
    pub item: u32,
    /// Unix seconds.
    pub time: i64,
}

/// A label the app gives purchases (`gift`, `medical`, ...), so the shopper
/// can exclude all of them at once.
///
/// 1 to [`MAX_TAG_LEN`] ASCII letters, digits, `-` or `_`, compared exactly
/// (`Gift` and `gift` differ). The SDK stores the label and nothing else
/// about it; what it means is the app's business.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);

impl Tag {
    /// `tag` as a tag; [`ClientError::InvalidTag`] unless it is 1 to
    /// [`MAX_TAG_LEN`] ASCII letters, digits, `-` or `_`.
    pub fn new(tag: impl Into<String>) -> Result<Self, ClientError> {
        let tag = tag.into();
        let valid = (1..=MAX_TAG_LEN).contains(&tag.len())
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            Ok(Self(tag))
        } else {
            Err(ClientError::InvalidTag { tag })
        }
    }

    /// The label.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Tag {
    type Error = ClientError;

    fn try_from(tag: String) -> Result<Self, ClientError> {
        Self::new(tag)
    }
}

impl std::str::FromStr for Tag {
    type Err = ClientError;

    fn from_str(tag: &str) -> Result<Self, ClientError> {
        Self::new(tag)
    }
}

impl From<Tag> for String {
    fn from(tag: Tag) -> Self {
        tag.0
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The purchases recorded on this device, in recording order.
///
/// It holds every stored purchase, excluded or not; what modelling uses is
/// [`history`](Self::history) (through [`crate::device::Device::history`]).
#[derive(Clone, Debug, Default)]
pub struct PurchaseStore {
    purchases: Vec<Purchase>,
    items: usize,
    /// Distinct items bought, sorted; kept in step with `purchases`.
    distinct: Vec<u32>,
}

impl PurchaseStore {
    /// An empty store for a catalogue of `items` items.
    pub fn new(items: usize) -> Self {
        Self {
            purchases: Vec::new(),
            items,
            distinct: Vec::new(),
        }
    }

    /// Records a purchase; rejects items outside the catalogue and
    /// non-positive or non-finite quantities.
    pub fn record(&mut self, purchase: Purchase) -> Result<(), ClientError> {
        if purchase.item as usize >= self.items {
            return Err(ClientError::UnknownItem {
                item: purchase.item,
                items: self.items,
            });
        }
        if !(purchase.quantity > 0.0 && purchase.quantity.is_finite()) {
            return Err(ClientError::InvalidConfig(format!(
                "quantity must be a positive number, got {}",
                purchase.quantity
            )));
        }
        if let Err(pos) = self.distinct.binary_search(&purchase.item) {
            self.distinct.insert(pos, purchase.item);
        }
        self.purchases.push(purchase);
        Ok(())
    }

    /// Drops what `policy` does not allow at `now` (Unix seconds): purchases
    /// older than its maximum age, then the oldest beyond its maximum count
    /// (ties: the earlier recorded). Returns how many were dropped.
    pub fn enforce(&mut self, policy: &RetentionPolicy, now: i64) -> usize {
        let before = self.purchases.len();
        if let Some(cutoff) = policy.cutoff(now) {
            self.purchases.retain(|p| p.time >= cutoff);
        }
        if let Some(max) = policy.max_events
            && self.purchases.len() > max
        {
            let excess = self.purchases.len() - max;
            let mut order: Vec<usize> = (0..self.purchases.len()).collect();
            order.sort_by_key(|&i| self.purchases[i].time);
            let mut keep = vec![true; self.purchases.len()];
            for &i in &order[..excess] {
                keep[i] = false;
            }
            let mut it = keep.iter();
            self.purchases.retain(|_| *it.next().unwrap_or(&true));
        }
        let dropped = before - self.purchases.len();
        if dropped > 0 {
            self.rebuild_distinct();
        }
        dropped
    }

    /// Erases every purchase.
    pub fn clear(&mut self) {
        self.purchases.clear();
        self.distinct.clear();
    }

    /// A store holding `purchases` (as loaded from a file), each checked as
    /// [`record`](Self::record) does.
    pub(crate) fn from_purchases(
        items: usize,
        purchases: Vec<Purchase>,
    ) -> Result<Self, ClientError> {
        let mut store = Self::new(items);
        for p in purchases {
            store.record(p)?;
        }
        Ok(store)
    }

    fn rebuild_distinct(&mut self) {
        self.distinct = self.purchases.iter().map(|p| p.item).collect();
        self.distinct.sort_unstable();
        self.distinct.dedup();
    }

    /// The earliest and latest purchase times, if any.
    pub fn time_range(&self) -> Option<(i64, i64)> {
        let min = self.purchases.iter().map(|p| p.time).min()?;
        let max = self.purchases.iter().map(|p| p.time).max()?;
        Some((min, max))
    }

    /// All stored purchases, excluded ones too, in recording order.
    pub fn purchases(&self) -> &[Purchase] {
        &self.purchases
    }

    /// Distinct items among all stored purchases, excluded ones too, sorted
    /// ascending. Modelling uses [`history`](Self::history) instead.
    pub fn items(&self) -> &[u32] {
        &self.distinct
    }

    /// The stored purchases that `exclusions` do not leave out, in
    /// recording order (what the buy-again row is ranked from).
    pub fn used(&self, exclusions: &Exclusions) -> Vec<Purchase> {
        self.purchases
            .iter()
            .filter(|p| !exclusions.excludes(p))
            .cloned()
            .collect()
    }

    /// The history models see: the distinct items of the stored purchases
    /// that `exclusions` do not leave out, sorted ascending.
    pub fn history(&self, exclusions: &Exclusions) -> Vec<u32> {
        if exclusions.is_empty() {
            return self.distinct.clone();
        }
        let mut items: Vec<u32> = self
            .purchases
            .iter()
            .filter(|p| !exclusions.excludes(p))
            .map(|p| p.item)
            .collect();
        items.sort_unstable();
        items.dedup();
        items
    }

    /// The device's own validation purchase, for the coordinator's settings
    /// search ([`Task::validation`](crate::task::Task::validation)): among
    /// the stored purchases that `exclusions` do not leave out, the most
    /// recent purchase of an item not bought before it (the "discover"
    /// question: which new item comes next). That is the item whose first
    /// purchase in use is the latest, named by that first purchase; equal
    /// times are broken by the smaller item index (whatever the recording
    /// order). An excluded purchase is never chosen, and does not count as
    /// an earlier purchase either: excluded purchases are as if never made.
    ///
    /// `None` with fewer than two distinct items in use: training without
    /// the item would leave nothing to train on.
    pub fn validation_purchase(&self, exclusions: &Exclusions) -> Option<PurchaseKey> {
        let mut first: std::collections::BTreeMap<u32, i64> = std::collections::BTreeMap::new();
        for p in self.purchases.iter().filter(|p| !exclusions.excludes(p)) {
            first
                .entry(p.item)
                .and_modify(|t| *t = (*t).min(p.time))
                .or_insert(p.time);
        }
        if first.len() < 2 {
            return None;
        }
        // The latest first purchase; on equal times, the smaller item.
        first
            .into_iter()
            .max_by_key(|&(item, time)| (time, std::cmp::Reverse(item)))
            .map(|(item, time)| PurchaseKey { item, time })
    }

    /// Whether a purchase named `key` is stored.
    pub fn contains(&self, key: PurchaseKey) -> bool {
        self.purchases.iter().any(|p| p.key() == key)
    }

    /// Number of purchases stored.
    pub fn len(&self) -> usize {
        self.purchases.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.purchases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(purchases: &[(u32, i64)]) -> PurchaseStore {
        let purchases = purchases
            .iter()
            .map(|&(item, time)| Purchase::new(item, time, 1.0))
            .collect();
        PurchaseStore::from_purchases(10, purchases).unwrap()
    }

    fn chosen(purchases: &[(u32, i64)]) -> Option<PurchaseKey> {
        store(purchases).validation_purchase(&Exclusions::default())
    }

    #[test]
    fn the_validation_purchase_is_the_latest_first_time_purchase() {
        // The latest purchase is a repeat of item 1: not a new item. Item 2's
        // first purchase (at 10) is the latest first purchase, whatever the
        // recording order.
        let key = PurchaseKey { item: 2, time: 10 };
        assert_eq!(chosen(&[(1, 0), (3, 5), (2, 10), (1, 20)]), Some(key));
        assert_eq!(chosen(&[(1, 20), (2, 10), (1, 0), (3, 5)]), Some(key));
        // A second purchase of item 2 later does not make its first later.
        assert_eq!(chosen(&[(1, 0), (3, 5), (2, 10), (2, 30)]), Some(key));
        // Equal times: the smaller item, whatever the recording order.
        let tie = Some(PurchaseKey { item: 4, time: 7 });
        assert_eq!(chosen(&[(1, 0), (6, 7), (4, 7)]), tie);
        assert_eq!(chosen(&[(4, 7), (1, 0), (6, 7)]), tie);
    }

    #[test]
    fn a_history_of_fewer_than_two_items_has_no_validation_purchase() {
        assert_eq!(chosen(&[]), None);
        assert_eq!(chosen(&[(3, 0), (3, 5), (3, 9)]), None);
        assert_eq!(
            chosen(&[(3, 0), (8, 9)]),
            Some(PurchaseKey { item: 8, time: 9 })
        );
    }
}
