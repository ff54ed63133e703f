//! Reading interaction logs from disk: MovieLens, UCI Online Retail and
//! generic CSV/TSV files, plus format detection.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use csv::ByteRecord;

use super::dates::{parse_datetime, parse_time_any};
use super::{DataError, Dataset, Format, Interaction, LoadOptions};

/// File name endings that [`load()`] picks up inside a directory.
const DATA_EXTENSIONS: &[&str] = &[".csv", ".tsv", ".data", ".dat", ".txt"];

/// Longest first line [`detect_format`] looks at (bytes); longer lines are cut.
const MAX_DETECT_LINE: u64 = 1 << 20;

/// Skip reason: retail row without a customer.
const SKIP_NO_CUSTOMER: &str = "missing CustomerID";
/// Skip reason: retail row of a cancelled invoice (InvoiceNo starting with "C").
const SKIP_CANCELLED: &str = "cancelled invoice";
/// Skip reason: retail row with quantity <= 0.
const SKIP_NON_POSITIVE: &str = "non-positive quantity";
/// Skip reason: retail row without a StockCode.
const SKIP_NO_STOCK_CODE: &str = "missing StockCode";

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
///   interaction with quantity 1.0 and the timestamp column as time.
/// * Retail (UCI Online Retail): user = CustomerID (`17850.0` becomes
///   `17850`), item = StockCode, quantity = Quantity, time = InvoiceDate.
///   Rows are skipped and counted in [`Dataset::skipped`] under the first
///   reason that applies, checked in this order: `missing CustomerID`,
///   `cancelled invoice` (InvoiceNo starting with `C`), `non-positive
///   quantity`, `missing StockCode`.
/// * Columns: CSV/TSV with a header (delimiter tab, comma or semicolon, the
///   most frequent one in the header line); `opts.user_col` and
///   `opts.item_col` are required, `opts.time_col` optional (Unix seconds,
///   integer or float, or a date/time, see [`parse_time_any`]).
///   Rows with an empty user, item or time field are skipped and counted as
///   `missing <column>`. Quantity is 1.0.
///
/// Header names are matched exactly first, then ignoring ASCII case.
/// Blank lines are ignored everywhere.
///
/// # Errors
/// I/O errors (naming the path), malformed lines (naming the file and the
/// 1-based line), invalid UTF-8 in a field that is used, unknown or mixed
/// formats, missing columns, an empty directory or file, and a data set with
/// no interaction left after skipping.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Dataset, DataError> {
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
        match format {
            Format::MovieLens => read_movielens_lines(file, Separator::Tab, &mut builder)?,
            Format::MovieLensDat => {
                read_movielens_lines(file, Separator::DoubleColon, &mut builder)?
            }
            Format::MovieLensCsv => read_movielens_csv(file, &mut builder)?,
            Format::Retail => read_retail(file, &mut builder)?,
            Format::Columns => read_columns(file, opts, &mut builder)?,
        }
    }
    builder.finish()
}

/// Guesses the format of a file (or of the first data file of a directory,
/// as [`load()`] would list them) from its first non-empty line.
///
/// If `opts.format` is set it is returned unchanged. Otherwise the rules,
/// tried in this order, are:
/// 1. 4 tab-separated numeric fields → [`Format::MovieLens`];
/// 2. contains `::` and splits on it into 4 numeric fields → [`Format::MovieLensDat`];
/// 3. a header equal (case-insensitive, fields trimmed) to
///    `userId,movieId,rating,timestamp` → [`Format::MovieLensCsv`];
/// 4. a header containing `InvoiceNo`, `StockCode`, `Quantity`, `InvoiceDate`
///    and `CustomerID` (case-insensitive) → [`Format::Retail`];
/// 5. any other line, when `opts.user_col` and `opts.item_col` are both given
///    → [`Format::Columns`];
/// 6. otherwise an error quoting the line and suggesting `--format`,
///    `--user-col` and `--item-col`.
///
/// # Errors
/// I/O errors, an empty file or directory, invalid UTF-8 in the first line,
/// and an unrecognised first line (rule 6).
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
    let (_, line) = first_line(path)?;
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
    Err(DataError::UnknownFormat {
        path: path.to_path_buf(),
        first_line: shorten(line, 200),
    })
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
}

impl Builder {
    fn new(name: String) -> Self {
        Builder {
            name,
            users: Interner::default(),
            items: Interner::default(),
            interactions: Vec::new(),
            skipped: BTreeMap::new(),
        }
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
            timed: true,
            skipped: self.skipped,
        })
    }
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
fn read_retail(path: &Path, b: &mut Builder) -> Result<(), DataError> {
    let mut csv = CsvFile::open(path)?;
    let invoice = csv.column("InvoiceNo")?;
    let stock = csv.column("StockCode")?;
    let quantity = csv.column("Quantity")?;
    let date = csv.column("InvoiceDate")?;
    let customer = csv.column("CustomerID")?;
    // Consecutive rows usually share the invoice and so the date: cache it.
    let mut last_date = String::new();
    let mut last_time = 0i64;
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
        if d != last_date {
            last_time = parse_datetime(d).ok_or_else(|| {
                row.malformed(format!(
                    "InvoiceDate {d:?} is not a recognised date/time \
                     (expected e.g. 2010-12-01 08:26:00, 12/1/2010 8:26 or 2010-12-01T08:26:00Z)"
                ))
            })?;
            last_date.clear();
            last_date.push_str(d);
        }
        // Quantities beyond f32's exact range are clamped by the cast.
        b.push(path, normalise_customer(cust), item, last_time, q as f32)
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
        let t = match (time, &skip_time) {
            (Some((idx, name)), Some(skip)) => {
                let text = row.field(idx)?;
                if text.is_empty() {
                    b.skip(skip);
                    return Ok(());
                }
                parse_time_any(text).ok_or_else(|| {
                    row.malformed(format!(
                        "{name} {text:?} is neither Unix seconds nor a recognised date/time"
                    ))
                })?
            }
            _ => 0,
        };
        b.push(path, u, i, t, 1.0)
    })
}

/// A CSV/TSV file opened for reading records after its header.
struct CsvFile<'p> {
    path: &'p Path,
    reader: csv::Reader<File>,
    header: Vec<String>,
}

impl<'p> CsvFile<'p> {
    /// Opens `path`, detects the delimiter from the first non-empty line and
    /// reads the header.
    fn open(path: &'p Path) -> Result<Self, DataError> {
        let (_, first) = first_line(path)?;
        let delimiter = detect_delimiter(&first);
        let file = File::open(path).map_err(|source| io_err(path, source))?;
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(true)
            .flexible(true)
            .buffer_capacity(1 << 16)
            .from_reader(file);
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
    let file = File::open(path).map_err(|source| io_err(path, source))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut buf = Vec::with_capacity(256);
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| io_err(path, source))?;
        if n == 0 {
            return Ok(());
        }
        line_no += 1;
        let line = decode_line(path, line_no, &buf)?;
        if !line.trim().is_empty() {
            f(line_no, line)?;
        }
    }
}

/// The first non-blank line of a file (cut at [`MAX_DETECT_LINE`] bytes) and
/// its 1-based number.
fn first_line(path: &Path) -> Result<(u64, String), DataError> {
    let file = File::open(path).map_err(|source| io_err(path, source))?;
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_DETECT_LINE)
            .read_until(b'\n', &mut buf)
            .map_err(|source| io_err(path, source))?;
        if n == 0 {
            return Err(DataError::EmptyFile {
                path: path.to_path_buf(),
            });
        }
        line_no += 1;
        let line = match decode_line(path, line_no, &buf) {
            Ok(line) => line,
            // The cut may split a character: keep the valid prefix.
            Err(_) if buf.len() as u64 >= MAX_DETECT_LINE => {
                let valid = std::str::from_utf8(&buf).map_err(|e| e.valid_up_to());
                match valid {
                    Ok(s) => s,
                    Err(upto) => {
                        std::str::from_utf8(buf.get(..upto).unwrap_or_default()).unwrap_or_default()
                    }
                }
            }
            Err(e) => return Err(e),
        };
        if !line.trim().is_empty() {
            return Ok((line_no, line.to_owned()));
        }
    }
}

/// Decodes one raw line: strips `\n` / `\r\n` and, on line 1, a UTF-8 BOM.
fn decode_line<'b>(path: &Path, line_no: u64, raw: &'b [u8]) -> Result<&'b str, DataError> {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let raw = if line_no == 1 {
        raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw)
    } else {
        raw
    };
    std::str::from_utf8(raw).map_err(|e| DataError::InvalidUtf8 {
        path: path.to_path_buf(),
        line: line_no,
        detail: e.to_string(),
    })
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

/// Checks that a MovieLens id is an integer.
fn check_integer_id(text: &str, what: &str) -> Result<(), String> {
    if !text.is_empty() && text.bytes().all(|c| c.is_ascii_digit()) {
        Ok(())
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

fn io_err(path: &Path, source: std::io::Error) -> DataError {
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
