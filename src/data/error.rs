//! The error type of the data module.

use std::path::PathBuf;

/// Everything that can go wrong while loading, generating or checking a data set.
///
/// Messages always carry the offending value (path, line number, field text,
/// parameter value) so they can be shown to a user as they are.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file or directory could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file or directory that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A directory given to `load` holds no data file.
    #[error(
        "directory {} holds no data file (looked for *.csv, *.tsv, *.data, *.dat, *.txt other than SOURCE.txt and README*)",
        path.display()
    )]
    EmptyDirectory {
        /// The directory.
        path: PathBuf,
    },

    /// A file has no content at all (not even a header line).
    #[error("{} is empty", path.display())]
    EmptyFile {
        /// The empty file.
        path: PathBuf,
    },

    /// A line of a data file could not be understood.
    #[error("{}:{line}: {message}", path.display())]
    Malformed {
        /// The file holding the line.
        path: PathBuf,
        /// 1-based line number (for a CSV record spanning lines: its first line).
        line: u64,
        /// What is wrong, quoting the offending text.
        message: String,
    },

    /// A line of a data file is not valid UTF-8.
    #[error("{}:{line}: invalid UTF-8 ({detail})", path.display())]
    InvalidUtf8 {
        /// The file holding the line.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Which part of the line, and the decoder's message.
        detail: String,
    },

    /// A line, or a CSV record spanning several lines, is longer than the
    /// loader's limit ([`crate::data::MAX_LINE_BYTES`]); reading stops there
    /// instead of holding an unbounded line in memory.
    #[error(
        "{}:{line}: {} longer than {limit} bytes, the longest the loader accepts{}",
        path.display(),
        if *record { "CSV record starting on this line is" } else { "line is" },
        if *record { " (is a quote left open?)" } else { " (is this a text file of the expected format?)" }
    )]
    LineTooLong {
        /// The file.
        path: PathBuf,
        /// 1-based line: the long line, or the first line of the long record.
        line: u64,
        /// The limit in bytes, not counting the line break.
        limit: usize,
        /// True for a CSV record spanning lines, false for one physical line.
        record: bool,
    },

    /// `--time-format` is not a strftime layout chrono can parse with.
    #[error(
        "--time-format {format:?} is not a valid strftime layout (chrono syntax, e.g. '%d.%m.%Y %H:%M')"
    )]
    InvalidTimeFormat {
        /// The layout that was given.
        format: String,
    },

    /// `--time-format` was given for a file whose times are not parsed from text.
    #[error("--time-format does not apply to {}: {reason}", path.display())]
    TimeFormatUnused {
        /// The file.
        path: PathBuf,
        /// Why, e.g. `its format, movielens, stores Unix seconds`.
        reason: String,
    },

    /// The format of a file could not be recognised from its first line.
    #[error(
        "cannot recognise the format of {}: first line is {first_line:?}; \
         pass --format (movielens, movielens-dat, movielens-csv, retail, columns, sequences) \
         or, for a generic CSV/TSV with a header, --user-col and --item-col",
        path.display()
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// Its first non-empty line (shortened when long).
        first_line: String,
    },

    /// A format name (e.g. from `--format`) is not one of the accepted ones.
    #[error(
        "unknown format {name:?}; accepted values: movielens, movielens-dat, movielens-csv, retail, columns, sequences"
    )]
    UnknownFormatName {
        /// The name that was given.
        name: String,
    },

    /// The files of a directory do not all have the same format.
    #[error(
        "files of one directory must share a format: {} is {first_format}, but {} is {format}",
        first_path.display(),
        path.display()
    )]
    MixedFormats {
        /// The first file of the directory.
        first_path: PathBuf,
        /// Its format.
        first_format: String,
        /// The file whose format differs.
        path: PathBuf,
        /// That file's format.
        format: String,
    },

    /// The `columns` format was chosen but a required column option is absent.
    #[error(
        "format \"columns\" needs the {option} option to name a column of {}",
        path.display()
    )]
    MissingColumnOption {
        /// The missing option, e.g. `--user-col`.
        option: &'static str,
        /// The file being loaded.
        path: PathBuf,
    },

    /// A column named in the options (or required by the format) is not in the header.
    #[error("{}: no column {column:?} in the header; the columns are: {available}", path.display())]
    ColumnNotFound {
        /// The file.
        path: PathBuf,
        /// The column that was looked for.
        column: String,
        /// The header's columns, comma-separated and quoted.
        available: String,
    },

    /// More distinct users or items than a `u32` index can hold.
    #[error("{}: more than {} distinct {kind}", path.display(), u32::MAX)]
    TooManyIds {
        /// The file being loaded when the limit was hit.
        path: PathBuf,
        /// "users" or "items".
        kind: &'static str,
    },

    /// Nothing was left after loading and skipping.
    #[error("data set {name:?} has no interactions (rows skipped: {skipped})")]
    EmptyDataset {
        /// The data set's name.
        name: String,
        /// The skip counts by reason, rendered, or "none".
        skipped: String,
    },

    /// A parameter of the synthetic generator is out of range.
    #[error("{param} must be {requirement}, got {value}")]
    InvalidConfig {
        /// The parameter's name, e.g. `users`.
        param: &'static str,
        /// The rule it breaks, e.g. `>= 2`.
        requirement: String,
        /// The value that was given.
        value: String,
    },
}
