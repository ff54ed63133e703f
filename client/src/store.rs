//! The device's local purchase store.
//!
//! Only what training needs is kept: the item, the time and the quantity of
//! each purchase. There is no field for anything else, and a stored record
//! with any other field is refused when loaded.

use crate::error::ClientError;
use crate::retention::RetentionPolicy;

/// How far in the future (seconds, against the device's clock) a purchase
/// time may lie: a little clock skew, not a way around retention.
pub const MAX_FUTURE_SECS: i64 = 24 * 3600;

/// One purchase as the device stores it.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Purchase {
    /// Catalogue index of the item.
    pub item: u32,
    /// Unix seconds.
    pub time: i64,
    /// Quantity bought.
    pub quantity: f32,
}

/// The purchases recorded on this device, in recording order.
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

    /// All purchases, in recording order.
    pub fn purchases(&self) -> &[Purchase] {
        &self.purchases
    }

    /// Distinct items bought, sorted ascending.
    pub fn items(&self) -> &[u32] {
        &self.distinct
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
