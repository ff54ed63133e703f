//! Reading interaction logs from disk: MovieLens, UCI Online Retail,
//! generic CSV/TSV files and one-line-per-user sequences, plus format
//! detection.
//!
//! Every read goes through [`Bounded`], which stops at the first line (or CSV
//! record) longer than [`MAX_LINE_BYTES`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use csv::ByteRecord;

use super::dates::{
    DayMonth, DayMonthOrder, FieldTime, OrderConflict, is_valid_format, parse_field_time,
    parse_with_format,
};
use super::{DataError, Dataset, Format, Interaction, LoadOptions};

/// The longest line [`load()`] and [`detect_format`] accept, in bytes, not
/// counting its final `\n` (a `\r` before it counts); a CSV record spanning
/// several lines (a quoted field with line breaks) may not be longer either
/// (give or take the csv reader's 64 KiB buffer).
///
/// 4 MiB is far above any real CSV row, and leaves room for a `sequences`
/// line of over 350,000 items of 10 characters. It bounds the memory one
/// line can take, so that a file without line breaks (`/dev/zero`, a binary
/// file given by mistake) is refused after 4 MiB instead of being read whole.
pub const MAX_LINE_BYTES: usize = 4 << 20;

/// File name endings that [`load()`] picks up inside a directory.
const DATA_EXTENSIONS: &[&str] = &[".csv", ".tsv", ".data", ".dat", ".txt"];

/// Non-blank lines [`detect_format`] reads at most to recognise
/// [`Format::Sequences`].
const SNIFF_LINES: usize = 20;

/// Read buffer of the csv reader; it also bounds how far [`Bounded`] can be
/// ahead of the record being parsed.
const CSV_BUFFER: usize = 1 << 16;

/// Skip reason: retail row without a customer.
const SKIP_NO_CUSTOMER: &str = "missing CustomerID";
/// Skip reason: retail row of a cancelled invoice (InvoiceNo starting with "C").
const SKIP_CANCELLED: &str = "cancelled invoice";
/// Skip reason: retail row with quantity <= 0.
const SKIP_NON_POSITIVE: &str = "non-positive quantity";
/// Skip reason: retail row without a StockCode.
const SKIP_NO_STOCK_CODE: &str = "missing StockCode";
/// Skip reason: sequence line with a user and no item.
const SKIP_NO_ITEMS: &str = "user without items";

/// Loads a data set from a file or a directory.
///
/// * A file is read in the format `opts.format`, or the one [`detect_format`]
///   finds.
/// * A directory contributes every regular file whose name ends in `.csv`,
///   `.tsv`, `.data`, `.dat` or `.txt`, except `SOURCE.txt` and `README*`,
///   in name order, as one data set (shared user/item ids). Without an
///   explicit format, all files must be detected as the same format.
///
/// Formats:
/// * MovieLens (`u.data`, `ratings.dat`, `ratings.csv`): every rating is one
///   interaction with quantity 1.0 and the timestamp column as time. Ids of
///   `u.data` and `ratings.dat` must be non-negative integers.
/// * Retail (UCI Online Retail): user = CustomerID (`17850.0` becomes
///   `17850`), item = StockCode, quantity = Quantity, time = InvoiceDate
///   (a date/time as below, not Unix seconds). Rows are skipped and counted
///   in [`Dataset::skipped`] under the first reason that applies, checked in
///   this order: `missing CustomerID`, `cancelled invoice` (InvoiceNo
///   starting with `C`), `non-positive quantity`, `missing StockCode`.
/// * Columns: CSV/TSV with a header (delimiter tab, comma or semicolon, the
///   most frequent one in the header line); `opts.user_col` and
///   `opts.item_col` are required, `opts.time_col` optional (Unix seconds,
///   integer or float, or a date/time as below). Rows with an empty user,
///   item or time field are skipped and counted as `missing <column>`.
///   Quantity is 1.0.
/// * Sequences: one line per user, `<user> <item> <item> …` separated by
///   whitespace, items in time order. Every item is one interaction with
///   quantity 1.0; a line with a user and no item is skipped and counted as
///   `user without items`.
///
/// Time: [`Dataset::timed`] is false for sequences and for columns without
/// `opts.time_col`; then each interaction's time is its position in the load
/// (0, 1, 2, … over all files in load order). Otherwise times are Unix
/// seconds. Text times (columns, retail) are read, without
/// `opts.time_format`, as:
/// * Unix seconds (columns only), RFC 3339 / ISO 8601 (`2010-12-01T08:26:00Z`,
///   `2010-12-01 08:26:00`, `2010-12-01`);
/// * dates with day and month first and a 4-digit year last, separated by
///   `/`, `-` or `.`, optionally followed by a time `H:MM[:SS]`
///   (`24-06-2014`, `6/24/2014 8:26`, `24.06.2014 08:26:00`). The order is
///   decided per load: a date whose first number is above 12 proves
///   day-first, one whose second number is above 12 proves month-first;
///   dates of both kinds in one load are an error. Dates with both numbers
///   at most 12 follow the order the load proves, even when the proof comes
///   later. If nothing proves it, `/` dates are read month-first (US
///   `12/1/2010`), and `-` or `.` dates are refused as ambiguous.
///
/// With `opts.time_format`, every time must match exactly that strftime
/// layout instead (a date-only layout gives midnight UTC); it is an error
/// for formats and files without text times.
///
/// Header names are matched exactly first, then ignoring ASCII case.
/// Blank lines are ignored everywhere. No line, and no CSV record, may be
/// longer than [`MAX_LINE_BYTES`].
///
/// # Errors
/// I/O errors (naming the path), malformed lines (naming the file and the
/// 1-based line), lines longer than [`MAX_LINE_BYTES`], invalid UTF-8 in a
/// field that is used, unknown or mixed formats, missing columns, times that
/// cannot be read or whose day/month order conflicts or stays ambiguous, an
/// invalid or inapplicable `opts.time_format`, an empty directory or file,
/// and a data set with no interaction left after skipping.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Dataset, DataError> {
    if let Some(format) = &opts.time_format
        && !is_valid_format(format)
    {
        return Err(DataError::InvalidTimeFormat {
            format: format.clone(),
        });
    }
    let meta = fs::metadata(path).map_err(|source| io_err(path, source))?;
    let files = if meta.is_dir() {
        data_files(path)?
    } else {
        vec![path.to_path_buf()]
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());

    let mut builder = Builder::new(name);
    let mut first: Option<(&Path, Format)> = None;
    for file in &files {
        let format = match opts.format {
            Some(f) => f,
            None => detect_file(file, opts)?,
        };
        match first {
            None => first = Some((file, format)),
            Some((first_path, first_format)) if first_format != format => {
                return Err(DataError::MixedFormats {
                    first_path: first_path.to_path_buf(),
                    first_format: first_format.to_string(),
                    path: file.clone(),
                    format: format.to_string(),
                });
            }
            Some(_) => {}
        }
        check_time_format(file, format, opts)?;
        // All files share the format, so every file sets the same value.
        builder.timed = match format {
            Format::Columns => opts.time_col.is_some(),
            Format::Sequences => false,
            _ => true,
        };
        match format {
            Format::MovieLens => read_movielens_lines(file, Separator::Tab, &mut builder)?,
            Format::MovieLensDat => {
                read_movielens_lines(file, Separator::DoubleColon, &mut builder)?
            }
            Format::MovieLensCsv => read_movielens_csv(file, &mut builder)?,
            Format::Retail => read_retail(file, opts, &mut builder)?,
            Format::Columns => read_columns(file, opts, &mut builder)?,
            Format::Sequences => read_sequences(file, &mut builder)?,
        }
    }
    builder.finish()
}

/// Refuses `opts.time_format` for a file whose times are not read from text.
fn check_time_format(path: &Path, format: Format, opts: &LoadOptions) -> Result<(), DataError> {
    if opts.time_format.is_none() {
        return Ok(());
    }
    let reason = match format {
        Format::Retail => return Ok(()),
        Format::Columns if opts.time_col.is_some() => return Ok(()),
        Format::Columns => "it is read without a time column (give --time-col)".to_owned(),
        Format::Sequences => "its format, sequences, has no times".to_owned(),
        other => format!("its format, {other}, stores Unix seconds"),
    };
    Err(DataError::TimeFormatUnused {
        path: path.to_path_buf(),
        reason,
    })
}

/// Guesses the format of a file (or of the first data file of a directory,
/// as [`load()`] would list them) from its first non-empty lines.
///
/// If `opts.format` is set it is returned unchanged. Otherwise the rules,
/// tried in this order on the first non-blank line, are:
/// 1. 4 tab-separated numeric fields → [`Format::MovieLens`];
/// 2. contains `::` and splits on it into 4 numeric fields → [`Format::MovieLensDat`];
/// 3. a header equal (case-insensitive, fields trimmed) to
///    `userId,movieId,rating,timestamp` → [`Format::MovieLensCsv`];
/// 4. a header containing `InvoiceNo`, `StockCode`, `Quantity`, `InvoiceDate`
///    and `CustomerID` (case-insensitive) → [`Format::Retail`];
/// 5. any other line, when `opts.user_col` and `opts.item_col` are both given
///    → [`Format::Columns`];
/// 6. [`Format::Sequences`] when the first non-blank line has 3 or more
///    whitespace-separated tokens and the first up to 20 non-blank lines
///    * contain no `,`, `;`, `"` or `::` (so they are not CSV),
///    * start with distinct tokens (one line per user),
///    * and do not all have the same number of tokens (a table of fixed
///      width, such as `user item rating time` separated by spaces, is not a
///      sequence file). A sequence file that fails this test (a single line,
///      or lines of equal length) needs `--format sequences`;
/// 7. otherwise an error quoting the line and suggesting `--format`,
///    `--user-col` and `--item-col`.
///
/// # Errors
/// I/O errors, an empty file or directory, invalid UTF-8 in the first line,
/// a line longer than [`MAX_LINE_BYTES`] among those read, and an
/// unrecognised file (rule 7).
pub fn detect_format(path: &Path, opts: &LoadOptions) -> Result<Format, DataError> {
    if let Some(f) = opts.format {
        return Ok(f);
    }
    let meta = fs::metadata(path).map_err(|source| io_err(path, source))?;
    if meta.is_dir() {
        let files = data_files(path)?;
        match files.first() {
            Some(first) => detect_file(first, opts),
            None => Err(DataError::EmptyDirectory {
                path: path.to_path_buf(),
            }),
        }
    } else {
        detect_file(path, opts)
    }
}

/// [`detect_format`] for one regular file, ignoring `opts.format`.
fn detect_file(path: &Path, opts: &LoadOptions) -> Result<Format, DataError> {
    let mut lines = Lines::open(path)?;
    let (_, line) = first_line(&mut lines)?;
    let line = line.trim();

    let tab_fields: Vec<&str> = line.split('\t').collect();
    if tab_fields.len() == 4 && tab_fields.iter().all(|f| is_number(f)) {
        return Ok(Format::MovieLens);
    }
    if line.contains("::") {
        let fields: Vec<&str> = line.split("::").collect();
        if fields.len() == 4 && fields.iter().all(|f| is_number(f)) {
            return Ok(Format::MovieLensDat);
        }
    }

    let header = split_header(line, detect_delimiter(line));
    let lower: Vec<String> = header.iter().map(|h| h.to_ascii_lowercase()).collect();
    if lower == ["userid", "movieid", "rating", "timestamp"] {
        return Ok(Format::MovieLensCsv);
    }
    let retail = [
        "invoiceno",
        "stockcode",
        "quantity",
        "invoicedate",
        "customerid",
    ];
    if retail.iter().all(|r| lower.iter().any(|h| h == r)) {
        return Ok(Format::Retail);
    }
    if opts.user_col.is_some() && opts.item_col.is_some() {
        return Ok(Format::Columns);
    }
    if looks_like_sequences(line, &mut lines)? {
        return Ok(Format::Sequences);
    }
    Err(DataError::UnknownFormat {
        path: path.to_path_buf(),
        first_line: shorten(line, 200),
    })
}

/// Rule 6 of [`detect_format`]: `first` is the first non-blank line, `rest`
/// the reader positioned after it.
fn looks_like_sequences(first: &str, rest: &mut Lines<'_>) -> Result<bool, DataError> {
    /// Not CSV nor `ratings.dat`.
    fn plain(line: &str) -> bool {
        !line.contains([',', ';', '"']) && !line.contains("::")
    }
    let mut tokens = first.split_whitespace();
    let Some(user) = tokens.next() else {
        return Ok(false);
    };
    let width = 1 + tokens.count();
    if width < 3 || !plain(first) {
        return Ok(false);
    }
    let mut users = HashSet::from([user.to_owned()]);
    let mut varying = false;
    while users.len() < SNIFF_LINES {
        let Some((_, raw)) = rest.next_line()? else {
            break;
        };
        // Bad UTF-8 after the first line: not for detection to report.
        let Ok(line) = std::str::from_utf8(raw) else {
            return Ok(false);
        };
        let mut tokens = line.split_whitespace();
        let Some(user) = tokens.next() else {
            continue;
        };
        if !plain(line) || !users.insert(user.to_owned()) {
            return Ok(false);
        }
        varying |= 1 + tokens.count() != width;
    }
    Ok(varying)
}

/// Lists the data files of a directory, sorted by name.
fn data_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let entries = fs::read_dir(dir).map_err(|source| io_err(dir, source))?;
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| io_err(dir, source))?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let lower = file_name.to_ascii_lowercase();
        if !DATA_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
            || lower == "source.txt"
            || lower.starts_with("readme")
        {
            continue;
        }
        let path = entry.path();
        // fs::metadata follows symlinks, so a link to a regular file counts.
        let meta = fs::metadata(&path).map_err(|source| io_err(&path, source))?;
        if meta.is_file() {
            files.push((file_name, path));
        }
    }
    if files.is_empty() {
        return Err(DataError::EmptyDirectory {
            path: dir.to_path_buf(),
        });
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// Accumulates interactions and interned ids while files are read.
struct Builder {
    name: String,
    users: Interner,
    items: Interner,
    interactions: Vec<Interaction>,
    skipped: BTreeMap<String, u64>,
    /// Becomes [`Dataset::timed`].
    timed: bool,
    /// The day/month order of the load's dates.
    order: DayMonthOrder<Place>,
}

/// Where a time was read, for the errors of [`DayMonthOrder`].
#[derive(Clone, Debug)]
struct Place {
    path: PathBuf,
    /// 1-based line.
    line: u64,
    /// The time field as written.
    text: String,
}

impl Builder {
    fn new(name: String) -> Self {
        Builder {
            name,
            users: Interner::default(),
            items: Interner::default(),
            interactions: Vec::new(),
            skipped: BTreeMap::new(),
            timed: true,
            order: DayMonthOrder::default(),
        }
    }

    /// Adds one interaction whose time was read from text; `here` names the
    /// field's place (asked for only when it may be reported).
    fn push_time(
        &mut self,
        path: &Path,
        user: &str,
        item: &str,
        time: FieldTime,
        quantity: f32,
        here: impl Fn() -> Place,
    ) -> Result<(), DataError> {
        let row = self.interactions.len();
        let interactions = &mut self.interactions;
        let time = self
            .order
            .time(row, time, &here, |row, time| {
                if let Some(x) = interactions.get_mut(row) {
                    x.time = time;
                }
            })
            .map_err(|conflict| conflict_error(conflict, here()))?;
        self.push(path, user, item, time, quantity)
    }

    /// Adds one interaction of an untimed source: its time is its position
    /// in the load.
    fn push_untimed(
        &mut self,
        path: &Path,
        user: &str,
        item: &str,
        quantity: f32,
    ) -> Result<(), DataError> {
        // A Vec never holds more than isize::MAX elements.
        let position = i64::try_from(self.interactions.len()).unwrap_or(i64::MAX);
        self.push(path, user, item, position, quantity)
    }

    /// Adds one interaction, interning its ids.
    fn push(
        &mut self,
        path: &Path,
        user: &str,
        item: &str,
        time: i64,
        quantity: f32,
    ) -> Result<(), DataError> {
        let too_many = |kind| DataError::TooManyIds {
            path: path.to_path_buf(),
            kind,
        };
        let user = self.users.intern(user).ok_or_else(|| too_many("users"))?;
        let item = self.items.intern(item).ok_or_else(|| too_many("items"))?;
        self.interactions.push(Interaction {
            user,
            item,
            time,
            quantity,
        });
        Ok(())
    }

    /// Counts one skipped row under `reason`.
    fn skip(&mut self, reason: &str) {
        match self.skipped.get_mut(reason) {
            Some(n) => *n += 1,
            None => {
                self.skipped.insert(reason.to_owned(), 1);
            }
        }
    }

    fn finish(self) -> Result<Dataset, DataError> {
        self.order.finish().map_err(ambiguous_error)?;
        if self.interactions.is_empty() {
            let skipped = if self.skipped.is_empty() {
                "none".to_owned()
            } else {
                self.skipped
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(DataError::EmptyDataset {
                name: self.name,
                skipped,
            });
        }
        Ok(Dataset {
            name: self.name,
            user_ids: self.users.ids,
            item_ids: self.items.ids,
            interactions: self.interactions,
            skipped: self.skipped,
            timed: self.timed,
        })
    }
}

/// The error for a date (at `here`) whose day/month order conflicts with an
/// earlier date's.
fn conflict_error(conflict: OrderConflict<Place>, here: Place) -> DataError {
    let OrderConflict { found, earlier } = conflict;
    let other = match found {
        DayMonth::DayFirst => DayMonth::MonthFirst,
        DayMonth::MonthFirst => DayMonth::DayFirst,
    };
    DataError::Malformed {
        message: format!(
            "date {:?} has its {} first, but {}:{} ({:?}) has its {} first; \
             the dates of one load must share one order: pass --time-format \
             with the layout of the data (e.g. {})",
            here.text,
            found.first(),
            earlier.path.display(),
            earlier.line,
            earlier.text,
            other.first(),
            example_layouts(&here.text),
        ),
        path: here.path,
        line: here.line,
    }
}

/// The error for a load whose day/month dates are all ambiguous and not all
/// written with `/`; `first` is the first written with `-` or `.`.
fn ambiguous_error(first: Place) -> DataError {
    DataError::Malformed {
        message: format!(
            "date {:?} is ambiguous, as are all dates of this load: no day or month \
             is above 12 to tell day-first from month-first; pass --time-format \
             (e.g. {})",
            first.text,
            example_layouts(&first.text),
        ),
        path: first.path,
        line: first.line,
    }
}

/// `'%d-%m-%Y' or '%m-%d-%Y'` with the separator and clock of `date`, for
/// error messages.
fn example_layouts(date: &str) -> String {
    let sep = date
        .trim()
        .chars()
        .find(|c| !c.is_ascii_digit())
        .filter(|c| matches!(c, '/' | '-' | '.'))
        .unwrap_or('-');
    let clock = match date.matches(':').count() {
        0 => "",
        1 => " %H:%M",
        _ => " %H:%M:%S",
    };
    format!("'%d{sep}%m{sep}%Y{clock}' or '%m{sep}%d{sep}%Y{clock}'")
}

/// Maps external ids to dense `u32` indices in order of first appearance.
#[derive(Default)]
struct Interner {
    map: HashMap<String, u32>,
    ids: Vec<String>,
}

impl Interner {
    /// The index of `id`, assigning the next one if it is new; `None` once
    /// the `u32` range is exhausted.
    fn intern(&mut self, id: &str) -> Option<u32> {
        if let Some(&i) = self.map.get(id) {
            return Some(i);
        }
        let i = u32::try_from(self.ids.len()).ok()?;
        self.map.insert(id.to_owned(), i);
        self.ids.push(id.to_owned());
        Some(i)
    }
}

/// Field separator of the header-less MovieLens formats.
#[derive(Clone, Copy)]
enum Separator {
    /// `u.data`.
    Tab,
    /// `ratings.dat`.
    DoubleColon,
}

/// Reads `u.data` or `ratings.dat`.
fn read_movielens_lines(path: &Path, sep: Separator, b: &mut Builder) -> Result<(), DataError> {
    for_each_line(path, |line_no, line| {
        let malformed = |message: String| DataError::Malformed {
            path: path.to_path_buf(),
            line: line_no,
            message,
        };
        let (fields, n) = match sep {
            Separator::Tab => split4(line.split('\t')),
            Separator::DoubleColon => split4(line.split("::")),
        };
        if n != 4 {
            return Err(malformed(match sep {
                Separator::Tab => format!("expected 4 tab-separated fields, got {n}"),
                Separator::DoubleColon => {
                    format!("expected 4 fields separated by \"::\", got {n}")
                }
            }));
        }
        let [user, item, rating, ts] = fields.map(str::trim);
        check_integer_id(user, "user id").map_err(&malformed)?;
        check_integer_id(item, "item id").map_err(&malformed)?;
        check_rating(rating).map_err(&malformed)?;
        let time = parse_integer_timestamp(ts, "timestamp").map_err(&malformed)?;
        b.push(path, user, item, time, 1.0)
    })
}

/// The first 4 items of `parts` and how many there were in all.
fn split4<'a>(parts: impl Iterator<Item = &'a str>) -> ([&'a str; 4], usize) {
    let mut fields = [""; 4];
    let mut n = 0usize;
    for part in parts {
        if let Some(slot) = fields.get_mut(n) {
            *slot = part;
        }
        n += 1;
    }
    (fields, n)
}

/// Reads a MovieLens `ratings.csv` (`userId,movieId,rating,timestamp`).
fn read_movielens_csv(path: &Path, b: &mut Builder) -> Result<(), DataError> {
    let mut csv = CsvFile::open(path)?;
    let user = csv.column("userId")?;
    let item = csv.column("movieId")?;
    let rating = csv.column("rating")?;
    let ts = csv.column("timestamp")?;
    csv.for_each_record(|row| {
        let u = row.field(user)?;
        let i = row.field(item)?;
        if u.is_empty() {
            return Err(row.malformed("userId is empty".to_owned()));
        }
        if i.is_empty() {
            return Err(row.malformed("movieId is empty".to_owned()));
        }
        check_rating(row.field(rating)?).map_err(|m| row.malformed(m))?;
        let time =
            parse_integer_timestamp(row.field(ts)?, "timestamp").map_err(|m| row.malformed(m))?;
        b.push(path, u, i, time, 1.0)
    })
}

/// Reads the UCI Online Retail CSV.
fn read_retail(path: &Path, opts: &LoadOptions, b: &mut Builder) -> Result<(), DataError> {
    let mut csv = CsvFile::open(path)?;
    let invoice = csv.column("InvoiceNo")?;
    let stock = csv.column("StockCode")?;
    let quantity = csv.column("Quantity")?;
    let date = csv.column("InvoiceDate")?;
    let customer = csv.column("CustomerID")?;
    // Consecutive rows usually share the invoice and so the date: cache it.
    let mut last_date = String::new();
    let mut last_time = FieldTime::Exact(0);
    csv.for_each_record(|row| {
        let cust = row.field(customer)?;
        if cust.is_empty() {
            b.skip(SKIP_NO_CUSTOMER);
            return Ok(());
        }
        let inv = row.field(invoice)?;
        if inv.starts_with(['C', 'c']) {
            b.skip(SKIP_CANCELLED);
            return Ok(());
        }
        let q_text = row.field(quantity)?;
        let q: f64 = q_text
            .parse()
            .ok()
            .filter(|q: &f64| !q.is_nan())
            .ok_or_else(|| row.malformed(format!("Quantity {q_text:?} is not a number")))?;
        if q <= 0.0 {
            b.skip(SKIP_NON_POSITIVE);
            return Ok(());
        }
        let item = row.field(stock)?;
        if item.is_empty() {
            b.skip(SKIP_NO_STOCK_CODE);
            return Ok(());
        }
        let d = row.field(date)?;
        if d != last_date || last_date.is_empty() {
            last_time = match &opts.time_format {
                Some(format) => {
                    FieldTime::Exact(parse_with_format(d, format).ok_or_else(|| {
                        row.malformed(format!(
                            "time {d:?} does not match --time-format {format:?}"
                        ))
                    })?)
                }
                None => parse_field_time(d, false).ok_or_else(|| {
                    row.malformed(format!(
                        "InvoiceDate {d:?} is not a recognised date/time (expected e.g. \
                         2010-12-01 08:26:00, 12/1/2010 8:26, 1.12.2010 08:26 or \
                         2010-12-01T08:26:00Z; pass --time-format for other layouts)"
                    ))
                })?,
            };
            last_date.clear();
            last_date.push_str(d);
        }
        // Quantities beyond f32's exact range are clamped by the cast.
        let quantity = q as f32;
        b.push_time(
            path,
            normalise_customer(cust),
            item,
            last_time,
            quantity,
            || row.place(d),
        )
    })
}

/// Reads a generic CSV/TSV with the columns named in `opts`.
fn read_columns(path: &Path, opts: &LoadOptions, b: &mut Builder) -> Result<(), DataError> {
    let missing = |option| DataError::MissingColumnOption {
        option,
        path: path.to_path_buf(),
    };
    let user_name = opts
        .user_col
        .as_deref()
        .ok_or_else(|| missing("--user-col"))?;
    let item_name = opts
        .item_col
        .as_deref()
        .ok_or_else(|| missing("--item-col"))?;
    let mut csv = CsvFile::open(path)?;
    let user = csv.column(user_name)?;
    let item = csv.column(item_name)?;
    let time = match opts.time_col.as_deref() {
        Some(name) => Some((csv.column(name)?, name)),
        None => None,
    };
    let skip_user = format!("missing {user_name}");
    let skip_item = format!("missing {item_name}");
    let skip_time = time.map(|(_, name)| format!("missing {name}"));
    csv.for_each_record(|row| {
        let u = row.field(user)?;
        if u.is_empty() {
            b.skip(&skip_user);
            return Ok(());
        }
        let i = row.field(item)?;
        if i.is_empty() {
            b.skip(&skip_item);
            return Ok(());
        }
        let (Some((idx, name)), Some(skip)) = (time, &skip_time) else {
            return b.push_untimed(path, u, i, 1.0);
        };
        let text = row.field(idx)?;
        if text.is_empty() {
            b.skip(skip);
            return Ok(());
        }
        let t = match &opts.time_format {
            Some(format) => FieldTime::Exact(parse_with_format(text, format).ok_or_else(|| {
                row.malformed(format!(
                    "time {text:?} does not match --time-format {format:?}"
                ))
            })?),
            None => parse_field_time(text, true).ok_or_else(|| {
                row.malformed(format!(
                    "{name} {text:?} is neither Unix seconds nor a recognised date/time \
                     (pass --time-format for other layouts)"
                ))
            })?,
        };
        b.push_time(path, u, i, t, 1.0, || row.place(text))
    })
}

/// Reads one-line-per-user sequences: `<user> <item> <item> …`.
fn read_sequences(path: &Path, b: &mut Builder) -> Result<(), DataError> {
    for_each_line(path, |_, line| {
        let mut tokens = line.split_whitespace();
        let Some(user) = tokens.next() else {
            return Ok(());
        };
        let mut items = 0usize;
        for item in tokens {
            b.push_untimed(path, user, item, 1.0)?;
            items += 1;
        }
        if items == 0 {
            b.skip(SKIP_NO_ITEMS);
        }
        Ok(())
    })
}

/// A CSV/TSV file opened for reading records after its header.
struct CsvFile<'p> {
    path: &'p Path,
    reader: csv::Reader<Bounded<File>>,
    header: Vec<String>,
}

impl<'p> CsvFile<'p> {
    /// Opens `path`, detects the delimiter from the first non-empty line and
    /// reads the header.
    fn open(path: &'p Path) -> Result<Self, DataError> {
        let (_, first) = first_line(&mut Lines::open(path)?)?;
        let delimiter = detect_delimiter(&first);
        let file = File::open(path).map_err(|source| io_err(path, source))?;
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(true)
            .flexible(true)
            .buffer_capacity(CSV_BUFFER)
            .from_reader(Bounded::records(file));
        let raw = reader.byte_headers().map_err(|e| csv_err(path, e))?;
        let mut header = Vec::with_capacity(raw.len());
        for (i, h) in raw.iter().enumerate() {
            let h = std::str::from_utf8(h).map_err(|e| DataError::InvalidUtf8 {
                path: path.to_path_buf(),
                line: raw
                    .position()
                    .map_or(1, |p| record_line(path, p.line(), p.byte())),
                detail: format!("header field {}: {e}", i + 1),
            })?;
            header.push(h.trim_start_matches('\u{feff}').trim().to_owned());
        }
        if header.is_empty() {
            return Err(DataError::EmptyFile {
                path: path.to_path_buf(),
            });
        }
        let next = reader.position().clone();
        reader.get_mut().record_starts(next.byte(), next.line());
        Ok(CsvFile {
            path,
            reader,
            header,
        })
    }

    /// Index of the column called `name`: exact match first, then ignoring
    /// ASCII case.
    fn column(&self, name: &str) -> Result<usize, DataError> {
        let wanted = name.trim();
        self.header
            .iter()
            .position(|h| h == wanted)
            .or_else(|| {
                self.header
                    .iter()
                    .position(|h| h.eq_ignore_ascii_case(wanted))
            })
            .ok_or_else(|| DataError::ColumnNotFound {
                path: self.path.to_path_buf(),
                column: name.to_owned(),
                available: self
                    .header
                    .iter()
                    .map(|h| format!("{h:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Calls `f` on each record after the header; records whose field count
    /// differs from the header's are errors.
    fn for_each_record(
        &mut self,
        mut f: impl FnMut(&Row<'_>) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        let mut record = ByteRecord::new();
        let width = self.header.len();
        loop {
            match self.reader.read_byte_record(&mut record) {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => return Err(csv_err(self.path, e)),
            }
            let next = self.reader.position().clone();
            self.reader
                .get_mut()
                .record_starts(next.byte(), next.line());
            let row = Row {
                path: self.path,
                line: record.position().map_or(0, |p| p.line()),
                byte: record.position().map_or(0, |p| p.byte()),
                record: &record,
                header: &self.header,
            };
            if record.len() != width {
                // A line of only spaces reads as one blank field: ignore it.
                if record.len() == 1 && record.get(0).is_some_and(|f| f.trim_ascii().is_empty()) {
                    continue;
                }
                return Err(row.malformed(format!(
                    "expected {width} fields as in the header, got {}",
                    record.len()
                )));
            }
            f(&row)?;
        }
    }
}

/// One CSV record with what is needed to report errors about it.
struct Row<'a> {
    path: &'a Path,
    /// Line where the csv reader's position says the record starts (before
    /// any blank lines the reader skipped, see [`record_line`]).
    line: u64,
    /// Byte offset matching `line`.
    byte: u64,
    record: &'a ByteRecord,
    header: &'a [String],
}

impl Row<'_> {
    /// The trimmed text of field `idx`.
    fn field(&self, idx: usize) -> Result<&str, DataError> {
        let name = self.header.get(idx).map_or("?", String::as_str);
        let bytes = self
            .record
            .get(idx)
            .ok_or_else(|| self.malformed(format!("missing field {name:?}")))?;
        std::str::from_utf8(bytes)
            .map(str::trim)
            .map_err(|e| DataError::InvalidUtf8 {
                path: self.path.to_path_buf(),
                line: record_line(self.path, self.line, self.byte),
                detail: format!("field {name:?}: {e}"),
            })
    }

    /// The [`Place`] of this row's time field `text`.
    fn place(&self, text: &str) -> Place {
        Place {
            path: self.path.to_path_buf(),
            line: record_line(self.path, self.line, self.byte),
            text: text.to_owned(),
        }
    }

    /// A [`DataError::Malformed`] for this row.
    fn malformed(&self, message: String) -> DataError {
        DataError::Malformed {
            path: self.path.to_path_buf(),
            line: record_line(self.path, self.line, self.byte),
            message,
        }
    }
}

/// The true 1-based line of a CSV record, for error messages.
///
/// The csv crate positions a record at the end of the previous one, so blank
/// lines it skipped in between are not counted: re-read the file from that
/// byte and add the line breaks before the record's first character. Only
/// called when reporting an error; falls back to `line` if the file cannot be
/// re-read.
fn record_line(path: &Path, line: u64, byte: u64) -> u64 {
    use std::io::{Seek, SeekFrom};
    let Ok(mut file) = File::open(path) else {
        return line;
    };
    if file.seek(SeekFrom::Start(byte)).is_err() {
        return line;
    }
    let mut extra = 0u64;
    for b in BufReader::new(file).bytes() {
        match b {
            Ok(b'\n') => extra += 1,
            Ok(b'\r') => {}
            _ => break,
        }
    }
    line + extra
}

/// Calls `f(line_number, line)` on each non-blank line of a text file, with
/// the line ending (and a leading BOM) removed.
fn for_each_line(
    path: &Path,
    mut f: impl FnMut(u64, &str) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut lines = Lines::open(path)?;
    while let Some((line_no, raw)) = lines.next_line()? {
        let line = utf8(path, line_no, raw)?;
        if !line.trim().is_empty() {
            f(line_no, line)?;
        }
    }
    Ok(())
}

/// The first non-blank line of a file and its 1-based number.
fn first_line(lines: &mut Lines<'_>) -> Result<(u64, String), DataError> {
    let path = lines.path;
    while let Some((line_no, raw)) = lines.next_line()? {
        let line = utf8(path, line_no, raw)?;
        if !line.trim().is_empty() {
            return Ok((line_no, line.to_owned()));
        }
    }
    Err(DataError::EmptyFile {
        path: path.to_path_buf(),
    })
}

/// The lines of a text file, each at most [`MAX_LINE_BYTES`] long.
struct Lines<'p> {
    path: &'p Path,
    reader: BufReader<Bounded<File>>,
    buf: Vec<u8>,
    line_no: u64,
}

impl<'p> Lines<'p> {
    fn open(path: &'p Path) -> Result<Self, DataError> {
        let file = File::open(path).map_err(|source| io_err(path, source))?;
        Ok(Lines {
            path,
            reader: BufReader::with_capacity(1 << 16, Bounded::lines(file)),
            buf: Vec::with_capacity(256),
            line_no: 0,
        })
    }

    /// The next line's 1-based number and bytes, without `\n` / `\r\n` and,
    /// on line 1, a UTF-8 BOM; `None` at the end of the file.
    fn next_line(&mut self) -> Result<Option<(u64, &[u8])>, DataError> {
        self.buf.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(|source| io_err(self.path, source))?;
        if n == 0 {
            return Ok(None);
        }
        self.line_no += 1;
        let raw = self.buf.as_slice();
        let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let raw = if self.line_no == 1 {
            raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw)
        } else {
            raw
        };
        Ok(Some((self.line_no, raw)))
    }
}

/// Decodes one line as UTF-8.
fn utf8<'b>(path: &Path, line_no: u64, raw: &'b [u8]) -> Result<&'b str, DataError> {
    std::str::from_utf8(raw).map_err(|e| DataError::InvalidUtf8 {
        path: path.to_path_buf(),
        line: line_no,
        detail: e.to_string(),
    })
}

/// A reader that fails once a line, or the CSV record being parsed, grows
/// past [`MAX_LINE_BYTES`], so that no read path holds more than that (plus
/// one read buffer) of a single line in memory.
///
/// It counts the bytes it hands out: since the last `\n` (the line), and,
/// for a csv reader, since the start of the record being parsed, which the
/// reader reports after each record ([`Bounded::record_starts`]). The error
/// is an [`io::Error`] carrying a [`TooLong`], turned into
/// [`DataError::LineTooLong`] by [`io_err`].
struct Bounded<R> {
    inner: R,
    /// 1-based number of the line being read.
    line: u64,
    /// Bytes of that line handed out so far, without its `\n`.
    line_len: u64,
    /// Bytes handed out so far.
    offset: u64,
    /// Start of the CSV record being parsed (byte offset, line as the csv
    /// reader counts it); `None` when not reading CSV.
    record: Option<(u64, u64)>,
}

/// The payload of the [`io::Error`] of [`Bounded`].
#[derive(Debug)]
struct TooLong {
    /// The long line, or the csv reader's line of the long record.
    line: u64,
    /// For a record: its byte offset (to correct `line`, see [`record_line`]).
    record_byte: Option<u64>,
}

impl std::fmt::Display for TooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {} longer than {MAX_LINE_BYTES} bytes", self.line)
    }
}

impl std::error::Error for TooLong {}

impl<R> Bounded<R> {
    /// For line-by-line reading.
    fn lines(inner: R) -> Self {
        Bounded {
            inner,
            line: 1,
            line_len: 0,
            offset: 0,
            record: None,
        }
    }

    /// For a csv reader, which must call [`Bounded::record_starts`] after
    /// each record.
    fn records(inner: R) -> Self {
        Bounded {
            record: Some((0, 1)),
            ..Bounded::lines(inner)
        }
    }

    /// The csv reader's position after a record: where the next one starts.
    fn record_starts(&mut self, byte: u64, line: u64) {
        self.record = Some((byte, line));
    }

    fn too_long(line: u64, record_byte: Option<u64>) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, TooLong { line, record_byte })
    }

    /// Accounts for `data`, just handed out.
    fn account(&mut self, data: &[u8]) -> io::Result<()> {
        const LIMIT: u64 = MAX_LINE_BYTES as u64;
        let len = data.len() as u64;
        match data.iter().position(|&b| b == b'\n') {
            None => {
                self.line_len += len;
                if self.line_len > LIMIT {
                    return Err(Self::too_long(self.line, None));
                }
            }
            Some(first) => {
                if self.line_len + first as u64 > LIMIT {
                    return Err(Self::too_long(self.line, None));
                }
                if len > LIMIT {
                    // Only a buffer larger than the limit can hold a whole
                    // long line between two line breaks: look at each one.
                    for (i, segment) in data.split(|&b| b == b'\n').enumerate().skip(1) {
                        if segment.len() as u64 > LIMIT {
                            return Err(Self::too_long(self.line + i as u64, None));
                        }
                    }
                }
                let breaks = data.iter().filter(|&&b| b == b'\n').count() as u64;
                let last = data.iter().rposition(|&b| b == b'\n').unwrap_or(first);
                self.line += breaks;
                self.line_len = len - 1 - last as u64;
            }
        }
        self.offset += len;
        if let Some((byte, line)) = self.record
            && self.offset.saturating_sub(byte) > LIMIT + CSV_BUFFER as u64
        {
            return Err(Self::too_long(line, Some(byte)));
        }
        Ok(())
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.account(buf.get(..n).unwrap_or_default())?;
        Ok(n)
    }
}

/// The most frequent of tab, comma and semicolon in a header line (ties in
/// that order; comma when none occurs).
fn detect_delimiter(header: &str) -> u8 {
    let mut best = (b',', 0usize);
    for d in [b'\t', b',', b';'] {
        let count = header.bytes().filter(|&c| c == d).count();
        if count > best.1 {
            best = (d, count);
        }
    }
    best.0
}

/// Splits a header line for detection: fields trimmed, surrounding quotes removed.
fn split_header(line: &str, delimiter: u8) -> Vec<String> {
    line.split(char::from(delimiter))
        .map(|f| {
            let f = f.trim();
            let f = f
                .strip_prefix('"')
                .and_then(|g| g.strip_suffix('"'))
                .unwrap_or(f);
            f.trim().to_owned()
        })
        .collect()
}

/// True for a finite decimal number.
fn is_number(s: &str) -> bool {
    s.trim().parse::<f64>().is_ok_and(f64::is_finite)
}

/// `17850.0` → `17850` (the UCI export stores CustomerID as a float); other
/// ids are returned unchanged.
fn normalise_customer(id: &str) -> &str {
    match id.split_once('.') {
        Some((int, frac))
            if !int.is_empty()
                && int.bytes().all(|c| c.is_ascii_digit())
                && frac.bytes().all(|c| c == b'0') =>
        {
            int
        }
        _ => id,
    }
}

/// Checks that a MovieLens id is a non-negative integer.
fn check_integer_id(text: &str, what: &str) -> Result<(), String> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if digits(text) {
        Ok(())
    } else if text.strip_prefix('-').is_some_and(digits) {
        Err(format!("{what} {text:?} must be a non-negative integer"))
    } else {
        Err(format!("{what} {text:?} is not an integer"))
    }
}

/// Checks that a rating is a finite number.
fn check_rating(text: &str) -> Result<(), String> {
    if is_number(text) {
        Ok(())
    } else {
        Err(format!("rating {text:?} is not a number"))
    }
}

/// Parses an integer Unix timestamp.
fn parse_integer_timestamp(text: &str, what: &str) -> Result<i64, String> {
    text.parse::<i64>()
        .map_err(|_| format!("{what} {text:?} is not an integer"))
}

/// Shortens `s` to at most `max` characters, marking the cut with `…`.
fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", s.get(..cut).unwrap_or(s)),
        None => s.to_owned(),
    }
}

/// An I/O error reading `path`; the [`TooLong`] error of [`Bounded`]
/// becomes [`DataError::LineTooLong`].
fn io_err(path: &Path, source: io::Error) -> DataError {
    if let Some(t) = source.get_ref().and_then(|e| e.downcast_ref::<TooLong>()) {
        return DataError::LineTooLong {
            path: path.to_path_buf(),
            line: match t.record_byte {
                Some(byte) => record_line(path, t.line, byte),
                None => t.line,
            },
            limit: MAX_LINE_BYTES,
            record: t.record_byte.is_some(),
        };
    }
    DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Converts a csv crate error, keeping its line number.
fn csv_err(path: &Path, e: csv::Error) -> DataError {
    let line = e.position().map_or(0, |p| p.line());
    let message = e.to_string();
    match e.into_kind() {
        csv::ErrorKind::Io(source) => io_err(path, source),
        _ => DataError::Malformed {
            path: path.to_path_buf(),
            line,
            message,
        },
    }
}

#[cfg(test)]
mod tests;
