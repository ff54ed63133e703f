//! The coordinator's catalogue: which item each row of the global model is.
//!
//! A device does not size its model from the items it happens to have seen:
//! the coordinator announces its catalogue when the device joins, and the
//! device maps its purchases' item ids into it. An item the catalogue does
//! not list stays on the device, unused for training.
//!
//! ```
//! use fedrec_proto::catalogue::Catalogue;
//! let numbered = Catalogue::numbered(3);
//! assert_eq!(numbered.index("2"), Some(1));
//! assert_eq!(numbered.index("4"), None);
//! let named = Catalogue::from_ids(vec!["85123A".into(), "71053".into()]).unwrap();
//! assert_eq!(named.index("71053"), Some(1));
//! assert_eq!(named.id(0), "85123A");
//! ```

use std::collections::HashMap;

use crate::pb;

/// The items of the global model, in model order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Catalogue {
    items: usize,
    /// The ids and their index; `None`: the ids are "1" to `items`.
    named: Option<Named>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Named {
    ids: Vec<String>,
    index: HashMap<String, u32>,
}

/// A catalogue that cannot be used; the message says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("catalogue: {0}")]
pub struct CatalogueError(pub String);

impl Catalogue {
    /// `items` items whose ids are "1" to `items` (how `fedrec gen-data`
    /// and MovieLens number them).
    pub fn numbered(items: usize) -> Self {
        Self { items, named: None }
    }

    /// The items `ids`, in model order.
    ///
    /// # Errors
    /// An empty list, an empty id, an id listed twice, or more than
    /// `u32::MAX` items.
    pub fn from_ids(ids: Vec<String>) -> Result<Self, CatalogueError> {
        if ids.is_empty() {
            return Err(CatalogueError("it lists no item".into()));
        }
        if u32::try_from(ids.len()).is_err() {
            return Err(CatalogueError(format!(
                "{} items is more than a model can hold",
                ids.len()
            )));
        }
        let mut index = HashMap::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            if id.is_empty() {
                return Err(CatalogueError(format!("item {} has an empty id", i + 1)));
            }
            // In range: checked above.
            if index.insert(id.clone(), i as u32).is_some() {
                return Err(CatalogueError(format!("item id {id:?} is listed twice")));
            }
        }
        Ok(Self {
            items: ids.len(),
            named: Some(Named { ids, index }),
        })
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items
    }

    /// Whether the catalogue has no item.
    pub fn is_empty(&self) -> bool {
        self.items == 0
    }

    /// The model index of the item `id`, if the catalogue lists it.
    pub fn index(&self, id: &str) -> Option<u32> {
        match &self.named {
            Some(named) => named.index.get(id).copied(),
            None => {
                // Only canonical decimal numbers: "01" is not item 1.
                if id.starts_with('0') || id.starts_with('+') {
                    return None;
                }
                let n: u64 = id.parse().ok()?;
                (1..=self.items as u64)
                    .contains(&n)
                    .then(|| u32::try_from(n - 1).ok())
                    .flatten()
            }
        }
    }

    /// The id of the item at model index `index` (`index < len()`).
    pub fn id(&self, index: usize) -> String {
        match &self.named {
            Some(named) => named.ids[index].clone(),
            None => (index + 1).to_string(),
        }
    }

    /// Every id, in model order.
    pub fn ids(&self) -> Vec<String> {
        (0..self.items).map(|i| self.id(i)).collect()
    }

    /// Whether the ids are the numbers "1" to `len()`.
    pub fn is_numbered(&self) -> bool {
        self.named.is_none()
    }

    /// The catalogue as a protobuf message.
    pub fn to_pb(&self) -> pb::Catalogue {
        pb::Catalogue {
            items: self.items as u64,
            item_ids: self
                .named
                .as_ref()
                .map(|n| n.ids.clone())
                .unwrap_or_default(),
        }
    }
}

impl TryFrom<&pb::Catalogue> for Catalogue {
    type Error = CatalogueError;

    fn try_from(c: &pb::Catalogue) -> Result<Self, CatalogueError> {
        if c.item_ids.is_empty() {
            let items = usize::try_from(c.items)
                .ok()
                .filter(|&n| n > 0 && u32::try_from(n).is_ok())
                .ok_or_else(|| CatalogueError(format!("{} items is not a catalogue", c.items)))?;
            return Ok(Self::numbered(items));
        }
        if c.items != c.item_ids.len() as u64 {
            return Err(CatalogueError(format!(
                "it announces {} items but lists {} ids",
                c.items,
                c.item_ids.len()
            )));
        }
        Self::from_ids(c.item_ids.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_ids_are_one_to_n_in_canonical_form() {
        let c = Catalogue::numbered(100);
        assert_eq!(c.index("1"), Some(0));
        assert_eq!(c.index("100"), Some(99));
        assert_eq!(c.index("0"), None);
        assert_eq!(c.index("101"), None);
        assert_eq!(c.index("01"), None);
        assert_eq!(c.index("x"), None);
        assert_eq!(c.id(99), "100");
    }

    #[test]
    fn round_trips_through_protobuf_and_refuses_bad_lists() {
        for c in [
            Catalogue::numbered(7),
            Catalogue::from_ids(vec!["a".into(), "b".into()]).unwrap(),
        ] {
            assert_eq!(Catalogue::try_from(&c.to_pb()).unwrap(), c);
        }
        let err = Catalogue::from_ids(vec!["a".into(), "a".into()]).unwrap_err();
        assert!(err.to_string().contains("\"a\" is listed twice"), "{err}");
        let err = Catalogue::try_from(&pb::Catalogue {
            items: 3,
            item_ids: vec!["a".into()],
        })
        .unwrap_err();
        assert!(err.to_string().contains("3 items but lists 1"), "{err}");
        assert!(Catalogue::try_from(&pb::Catalogue::default()).is_err());
    }
}
