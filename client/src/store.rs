//! The device's local purchase store.
//!
//! Only what training needs is kept: the item, the time and the quantity of
//! each purchase. There is no field for anything else.

use crate::error::ClientError;

/// One purchase as the device stores it.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
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
