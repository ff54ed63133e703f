//! Interaction data: loading real logs, generating synthetic ones, and the
//! leave-one-out split used for evaluation.
//!
//! * [`load()`] reads MovieLens (`u.data`, `ratings.dat`, `ratings.csv`), the UCI
//!   Online Retail CSV, or any CSV/TSV with a header whose user and item
//!   columns are named in [`LoadOptions`]; [`detect_format`] guesses the format
//!   from the first line.
//! * [`synthetic()`] builds the project's default data set from a
//!   [`SyntheticConfig`], deterministically per seed: planted taste
//!   clusters, staples re-bought at a personal period, and baskets.
//! * [`leave_one_out`] holds out each user's latest interaction.

mod dates;
mod error;
mod load;
mod split;
mod synthetic;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

pub use dates::{parse_datetime, parse_time_any, parse_unix_seconds};
pub use error::DataError;
pub use load::{detect_format, load};
pub use split::{Split, leave_one_out};
pub use synthetic::{
    MIN_HISTORY, REPEAT_PROBABILITY, START_TIME, Staple, SyntheticConfig, SyntheticTruth,
    synthetic, synthetic_with_truth,
};

/// One interaction, with dense indices into [`Dataset::user_ids`] / [`Dataset::item_ids`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interaction {
    /// Dense user index (position in [`Dataset::user_ids`]).
    pub user: u32,
    /// Dense item index (position in [`Dataset::item_ids`]).
    pub item: u32,
    /// Unix seconds (0 when the source has no time).
    pub time: i64,
    /// Quantity (1.0 when the source has none; ratings are not quantities: 1.0).
    pub quantity: f32,
}

/// A loaded or generated interaction log with interned user and item ids.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    /// A short name: the file or directory name, or `"synthetic"`.
    pub name: String,
    /// External id of each dense user index, in order of first appearance.
    pub user_ids: Vec<String>,
    /// External id of each dense item index, in order of first appearance
    /// (for synthetic data: the whole catalogue in id order).
    pub item_ids: Vec<String>,
    /// The interactions, in file order.
    pub interactions: Vec<Interaction>,
    /// Rows skipped while loading: reason -> count (e.g. `"missing CustomerID"`,
    /// `"cancelled invoice"`, `"non-positive quantity"`).
    pub skipped: BTreeMap<String, u64>,
}

impl Dataset {
    /// Number of distinct users (length of [`Dataset::user_ids`]).
    pub fn n_users(&self) -> usize {
        self.user_ids.len()
    }

    /// Number of distinct items (length of [`Dataset::item_ids`]).
    pub fn n_items(&self) -> usize {
        self.item_ids.len()
    }

    /// Total number of skipped rows over all reasons.
    pub fn n_skipped(&self) -> u64 {
        self.skipped.values().sum()
    }
}

/// The on-disk layouts [`load()`] understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// MovieLens 100K `u.data`: `user\titem\trating\ttimestamp`, no header.
    MovieLens,
    /// MovieLens 1M/10M `ratings.dat`: `user::item::rating::timestamp`, no header.
    MovieLensDat,
    /// MovieLens `ratings.csv`: header `userId,movieId,rating,timestamp`.
    MovieLensCsv,
    /// UCI Online Retail CSV (`InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country`).
    Retail,
    /// Generic CSV/TSV with a header; the columns are named by [`LoadOptions`].
    Columns,
}

impl Format {
    /// The name accepted by [`Format::from_str`] (and by `--format`).
    pub fn name(self) -> &'static str {
        match self {
            Format::MovieLens => "movielens",
            Format::MovieLensDat => "movielens-dat",
            Format::MovieLensCsv => "movielens-csv",
            Format::Retail => "retail",
            Format::Columns => "columns",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = DataError;

    /// Accepts `movielens`, `movielens-dat`, `movielens-csv`, `retail`,
    /// `columns` (case-insensitive, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "movielens" => Ok(Format::MovieLens),
            "movielens-dat" => Ok(Format::MovieLensDat),
            "movielens-csv" => Ok(Format::MovieLensCsv),
            "retail" => Ok(Format::Retail),
            "columns" => Ok(Format::Columns),
            _ => Err(DataError::UnknownFormatName { name: s.to_owned() }),
        }
    }
}

/// How [`load()`] should read its input.
#[derive(Default, Clone, Debug)]
pub struct LoadOptions {
    /// The format; `None` detects it from each file's first line ([`detect_format`]).
    pub format: Option<Format>,
    /// Header name of the user column (`columns` format; required there).
    pub user_col: Option<String>,
    /// Header name of the item column (`columns` format; required there).
    pub item_col: Option<String>,
    /// Header name of the time column (`columns` format; optional, time 0 without it).
    pub time_col: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names_round_trip() {
        for f in [
            Format::MovieLens,
            Format::MovieLensDat,
            Format::MovieLensCsv,
            Format::Retail,
            Format::Columns,
        ] {
            assert_eq!(f.name().parse::<Format>().ok(), Some(f));
            assert_eq!(f.to_string(), f.name());
        }
        assert_eq!(" Retail ".parse::<Format>().ok(), Some(Format::Retail));
    }

    #[test]
    fn unknown_format_name_lists_accepted() {
        let msg = "parquet".parse::<Format>().err().map(|e| e.to_string());
        let msg = msg.unwrap_or_default();
        assert!(msg.contains("\"parquet\""), "{msg}");
        for name in [
            "movielens",
            "movielens-dat",
            "movielens-csv",
            "retail",
            "columns",
        ] {
            assert!(msg.contains(name), "{msg}");
        }
    }

    #[test]
    fn counts() {
        let ds = Dataset {
            user_ids: vec!["a".into(), "b".into()],
            item_ids: vec!["x".into()],
            skipped: [("r1".to_owned(), 2), ("r2".to_owned(), 3)].into(),
            ..Dataset::default()
        };
        assert_eq!((ds.n_users(), ds.n_items(), ds.n_skipped()), (2, 1, 5));
    }
}
