//! Interaction data: loading real logs, generating synthetic ones, and the
//! leave-one-out split used for evaluation.
//!
//! * [`load()`] reads MovieLens (`u.data`, `ratings.dat`, `ratings.csv`), the UCI
//!   Online Retail CSV, any CSV/TSV with a header whose user and item
//!   columns are named in [`LoadOptions`], and one-line-per-user item
//!   sequences (`<user> <item> <item> …`, e.g. the Amazon review 5-core
//!   files); [`detect_format`] guesses the format from the first lines.
//! * [`synthetic()`] builds the project's default data set from a
//!   [`SyntheticConfig`], deterministically per seed: planted taste
//!   clusters, staples re-bought at a personal period, and baskets.
//! * [`Protocol`] holds out, per user and per [`Track`], one event in time
//!   (discover, buy-again, next purchase), with a validation event before it.
//!
//! # Time
//!
//! [`Interaction::time`] is Unix seconds when the source has times
//! ([`Dataset::timed`] is true). When it has none (a `columns` file without a
//! time column, a `sequences` file) the time is the interaction's position in
//! the load, so "latest" still means "last in the file". Text times are read
//! as Unix seconds, ISO 8601, or dates with day and month first and the year
//! last (`24-06-2014 10:15`, `6/24/2014`), whose order is decided once per
//! load from the data; [`LoadOptions::time_format`] fixes one layout instead.
//! See [`load()`] for the details.
//!
//! # Limits
//!
//! No line (nor CSV record) may be longer than [`MAX_LINE_BYTES`], so that
//! memory stays bounded whatever file is given.
//!
//! ```no_run
//! use std::path::Path;
//! use fedrec::data::{self, LoadOptions};
//!
//! // A directory of semicolon-separated exports with European dates.
//! let opts = LoadOptions {
//!     user_col: Some("customer".into()),
//!     item_col: Some("sku".into()),
//!     time_col: Some("ordered".into()),
//!     time_format: Some("%d.%m.%Y %H:%M".into()),
//!     ..LoadOptions::default()
//! };
//! let ds = data::load(Path::new("exports/"), &opts)?;
//! assert!(ds.timed);
//! let protocol = data::Protocol::new(&ds);
//! println!("{} users, tracks {:?}", ds.n_users(), protocol.tracks());
//! # Ok::<(), data::DataError>(())
//! ```

mod dates;
mod error;
mod load;
mod synthetic;
mod tracks;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

pub use dates::{parse_datetime, parse_time_any, parse_unix_seconds};
pub use error::DataError;
pub use load::{MAX_LINE_BYTES, detect_format, load};
pub use synthetic::{
    MIN_HISTORY, REPEAT_PROBABILITY, START_TIME, Staple, SyntheticConfig, SyntheticTruth,
    synthetic, synthetic_with_truth,
};
pub use tracks::{Cut, Evaluation, Event, Histories, Protocol, Stage, Track};

/// One interaction, with dense indices into [`Dataset::user_ids`] / [`Dataset::item_ids`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interaction {
    /// Dense user index (position in [`Dataset::user_ids`]).
    pub user: u32,
    /// Dense item index (position in [`Dataset::item_ids`]).
    pub item: u32,
    /// Unix seconds when [`Dataset::timed`]; otherwise the position of the
    /// interaction in the load (0, 1, 2, … over all files in load order).
    pub time: i64,
    /// Quantity (1.0 when the source has none; ratings are not quantities: 1.0).
    pub quantity: f32,
}

/// A loaded or generated interaction log with interned user and item ids.
///
/// Times are Unix seconds, or positions in the load when the source has no
/// time: see [`Dataset::timed`].
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
    /// `"cancelled invoice"`, `"non-positive quantity"`, `"user without items"`).
    pub skipped: BTreeMap<String, u64>,
    /// Whether [`Interaction::time`] holds Unix seconds from the source.
    ///
    /// True for MovieLens, Online Retail, a `columns` file with a time column
    /// and synthetic data. False when the source has no time (a `columns`
    /// file without `time_col`, the `sequences` format): then each
    /// interaction's time is its position in the load, counted from 0 over
    /// all files in load order (each line, and in a sequence each item, its
    /// own moment), so that ordering by time keeps the file order. Such times
    /// are not dates: do not show them as such.
    pub timed: bool,
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
    /// One line per user, `<user> <item> <item> …`, whitespace separated, the
    /// items in time order, no header and no times (e.g. the Amazon review
    /// 5-core files of S3-Rec / ICLRec).
    Sequences,
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
            Format::Sequences => "sequences",
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
    /// `columns`, `sequences` (case-insensitive, surrounding spaces ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "movielens" => Ok(Format::MovieLens),
            "movielens-dat" => Ok(Format::MovieLensDat),
            "movielens-csv" => Ok(Format::MovieLensCsv),
            "retail" => Ok(Format::Retail),
            "columns" => Ok(Format::Columns),
            "sequences" => Ok(Format::Sequences),
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
    /// Header name of the time column (`columns` format; optional). Without
    /// it the data set is untimed ([`Dataset::timed`] false).
    pub time_col: Option<String>,
    /// The one strftime layout (chrono syntax, e.g. `%d.%m.%Y %H:%M`) of
    /// every time of the load: the `time_col` of the `columns` format and
    /// Online Retail's `InvoiceDate`. A date-only layout gives midnight UTC;
    /// a layout without an offset, UTC. A time that does not match is an
    /// error. Default `None`: times are detected (see [`load()`]).
    pub time_format: Option<String>,
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
            Format::Sequences,
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
            "sequences",
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
