//! Parsing of the timestamps found in interaction logs.
//!
//! Times without a zone are taken as UTC. All results are Unix seconds.
//!
//! Two layers:
//! * stateless parsers for one value ([`parse_datetime`], [`parse_unix_seconds`],
//!   [`parse_time_any`]);
//! * what the loader uses for a whole load: [`parse_field_time`], which also
//!   reads dates written day and month first (`24-06-2014`, `6/24/2014`) and
//!   says when such a date is ambiguous, and [`DayMonthOrder`], which decides
//!   one order for the load from the dates that prove it and resolves the
//!   ambiguous ones read before. [`parse_with_format`] serves `--time-format`.

use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, NaiveDate, NaiveDateTime};

/// Year-first date-time layouts without a zone, tried in this order (all as
/// UTC). `%.f` accepts an absent fraction. These are never ambiguous.
const ISO_DATE_TIMES: &[&str] = &[
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
];

/// US month/day/year layouts of [`parse_datetime`], tried after
/// [`ISO_DATE_TIMES`]. `%m`, `%d` and `%H` also accept a single digit, so
/// `12/1/2010 8:26` (the UCI xlsx export) matches `%m/%d/%Y %H:%M`.
const US_DATE_TIMES: &[&str] = &["%m/%d/%Y %H:%M:%S", "%m/%d/%Y %H:%M"];

/// Date-only layouts (midnight UTC).
const NAIVE_DATES: &[&str] = &["%Y-%m-%d", "%m/%d/%Y"];

/// Parses a calendar date-time into Unix seconds.
///
/// Accepted: `2010-12-01 08:26:00`, `2010-12-01 08:26`, `12/1/2010 8:26`
/// (US month/day/year), ISO 8601 / RFC 3339 `2010-12-01T08:26:00` with an
/// optional fraction and optional `Z` or `+hh:mm` offset, and the bare dates
/// `2010-12-01` and `12/1/2010`. Times without an offset are UTC.
/// Returns `None` when none of these matches.
///
/// This reads one value on its own, so `/` dates are always month first;
/// [`crate::data::load()`] detects the day/month order of a whole load
/// instead.
pub fn parse_datetime(text: &str) -> Option<i64> {
    let s = text.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp());
    }
    for layout in ISO_DATE_TIMES.iter().chain(US_DATE_TIMES) {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, layout) {
            return Some(dt.and_utc().timestamp());
        }
    }
    for layout in NAIVE_DATES {
        if let Ok(d) = NaiveDate::parse_from_str(s, layout) {
            return d.and_hms_opt(0, 0, 0).map(|dt| dt.and_utc().timestamp());
        }
    }
    None
}

/// Parses Unix seconds written as an integer (`1700000000`) or a float
/// (`1700000000.5`, truncated towards minus infinity). Returns `None` for
/// anything else, including non-finite or out-of-range floats.
pub fn parse_unix_seconds(text: &str) -> Option<i64> {
    let s = text.trim();
    if let Ok(v) = s.parse::<i64>() {
        return Some(v);
    }
    let f = s.parse::<f64>().ok()?;
    // i64::MAX as f64 rounds up to 2^63, so the upper bound must be exclusive.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    if (-LIMIT..LIMIT).contains(&f) {
        // In range (NaN and infinities are not), so the cast does not saturate.
        Some(f.floor() as i64)
    } else {
        None
    }
}

/// Parses one time value on its own: Unix seconds (integer or float) or any
/// layout accepted by [`parse_datetime`].
pub fn parse_time_any(text: &str) -> Option<i64> {
    parse_unix_seconds(text).or_else(|| parse_datetime(text))
}

/// Parses `text` with exactly the strftime layout `format` (chrono syntax),
/// as `--time-format` asks: a layout with an offset (`%z`, `%:z`) gives that
/// instant, one without gives UTC, a date-only layout gives midnight UTC.
/// Returns `None` when `text` does not match.
pub(crate) fn parse_with_format(text: &str, format: &str) -> Option<i64> {
    let s = text.trim();
    if let Ok(dt) = DateTime::parse_from_str(s, format) {
        return Some(dt.timestamp());
    }
    if let Ok(dt) = NaiveDateTime::parse_from_str(s, format) {
        return Some(dt.and_utc().timestamp());
    }
    let d = NaiveDate::parse_from_str(s, format).ok()?;
    d.and_hms_opt(0, 0, 0).map(|dt| dt.and_utc().timestamp())
}

/// True when `format` is a strftime layout chrono can parse with (no unknown
/// `%` specifier, no trailing `%`).
pub(crate) fn is_valid_format(format: &str) -> bool {
    !format.is_empty() && !StrftimeItems::new(format).any(|item| matches!(item, Item::Error))
}

/// Which of the first two numbers of a date such as `24-06-2014` is the day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DayMonth {
    /// `day-month-year`, e.g. `24-06-2014`.
    DayFirst,
    /// `month-day-year`, e.g. `06-24-2014` (the US order).
    MonthFirst,
}

impl DayMonth {
    /// `"day"` or `"month"`: which number comes first.
    pub(crate) fn first(self) -> &'static str {
        match self {
            DayMonth::DayFirst => "day",
            DayMonth::MonthFirst => "month",
        }
    }
}

/// A time field as [`parse_field_time`] reads it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum FieldTime {
    /// Needs no day/month order: Unix seconds, a year-first date, or a
    /// day/month date whose day and month are equal.
    Exact(i64),
    /// A day/month date whose first number is above 12 (so it is day-first)
    /// or whose second is (month-first): it proves the order of the load.
    Proves(DayMonth, i64),
    /// A day/month date with both numbers at most 12 (and different).
    Ambiguous {
        /// The time if the load turns out day-first.
        day_first: i64,
        /// The time if the load turns out month-first.
        month_first: i64,
        /// The separator, `/`, `-` or `.`: a load whose dates all stay
        /// ambiguous is read month-first only if they all use `/`.
        slash: bool,
    },
}

/// Parses a time field of a loaded file.
///
/// Tried in this order: Unix seconds (integer or float; only if `unix`),
/// RFC 3339 and the year-first layouts of [`parse_datetime`] (with a 4-digit
/// year), then a date
/// with day and month first and a 4-digit year last, separated by `/`, `-`
/// or `.` (the same one twice), optionally followed by whitespace and a time
/// `H:MM` or `H:MM:SS` (fields of 1 or 2 digits, UTC). The last kind is
/// [`FieldTime::Proves`] or [`FieldTime::Ambiguous`] unless day and month are
/// equal. Returns `None` when nothing matches or the date does not exist.
pub(crate) fn parse_field_time(text: &str, unix: bool) -> Option<FieldTime> {
    let s = text.trim();
    if s.is_empty() {
        return None;
    }
    if unix && let Some(t) = parse_unix_seconds(s) {
        return Some(FieldTime::Exact(t));
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(FieldTime::Exact(dt.timestamp()));
    }
    // chrono's `%Y` takes any number of digits: insist on 4, so that
    // `24-06-14` is not the year 24.
    let year_first = s.as_bytes().get(..5).is_some_and(|head| {
        head.iter().take(4).all(u8::is_ascii_digit) && head.get(4) == Some(&b'-')
    });
    if year_first {
        for layout in ISO_DATE_TIMES {
            if let Ok(dt) = NaiveDateTime::parse_from_str(s, layout) {
                return Some(FieldTime::Exact(dt.and_utc().timestamp()));
            }
        }
        return NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|dt| FieldTime::Exact(dt.and_utc().timestamp()));
    }
    parse_day_month(s)
}

/// The `D?M?YYYY[ H:MM[:SS]]` family of [`parse_field_time`].
fn parse_day_month(s: &str) -> Option<FieldTime> {
    let (date, clock) = match s.split_once(char::is_whitespace) {
        Some((date, clock)) => (date, Some(clock.trim())),
        None => (s, None),
    };
    let sep = date.bytes().find(|b| !b.is_ascii_digit())?;
    if !matches!(sep, b'/' | b'-' | b'.') {
        return None;
    }
    let mut parts = date.split(char::from(sep));
    let a = small_number(parts.next()?, 2)?;
    let b = small_number(parts.next()?, 2)?;
    let year_text = parts.next()?;
    if parts.next().is_some() || year_text.len() != 4 {
        return None;
    }
    let year = i32::try_from(small_number(year_text, 4)?).ok()?;
    let seconds = match clock {
        None => 0,
        Some(clock) => clock_seconds(clock)?,
    };
    let at = |month: u32, day: u32| {
        NaiveDate::from_ymd_opt(year, month, day)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|dt| dt.and_utc().timestamp() + seconds)
    };
    match (a > 12, b > 12) {
        (true, true) => None,
        (true, false) => Some(FieldTime::Proves(DayMonth::DayFirst, at(b, a)?)),
        (false, true) => Some(FieldTime::Proves(DayMonth::MonthFirst, at(a, b)?)),
        (false, false) if a == b => Some(FieldTime::Exact(at(a, a)?)),
        (false, false) => Some(FieldTime::Ambiguous {
            day_first: at(b, a)?,
            month_first: at(a, b)?,
            slash: sep == b'/',
        }),
    }
}

/// `H:MM` or `H:MM:SS` (1 or 2 digits each) as seconds after midnight.
fn clock_seconds(clock: &str) -> Option<i64> {
    let mut parts = clock.split(':');
    let h = small_number(parts.next()?, 2)?;
    let m = small_number(parts.next()?, 2)?;
    let s = match parts.next() {
        Some(p) => small_number(p, 2)?,
        None => 0,
    };
    if parts.next().is_some() || h > 23 || m > 59 || s > 59 {
        return None;
    }
    Some(i64::from(h * 3600 + m * 60 + s))
}

/// A decimal number of 1 to `max_digits` ASCII digits.
fn small_number(text: &str, max_digits: usize) -> Option<u32> {
    if text.is_empty() || text.len() > max_digits || !text.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A date that proves the other day/month order than an earlier one did.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OrderConflict<L> {
    /// The order this date proves.
    pub(crate) found: DayMonth,
    /// Where the date that proved the other order is.
    pub(crate) earlier: L,
}

/// Decides the day/month order of one load and resolves its ambiguous dates.
///
/// The first date that proves an order ([`FieldTime::Proves`]) fixes it for
/// the load; a later date proving the other order is an error. Ambiguous
/// dates read before the order is known are kept on a side list (their row
/// and both candidate times, nothing else) and rewritten once it is; after
/// that, ambiguous dates are resolved as they come. If the order is still
/// unknown at the end ([`DayMonthOrder::finish`]), the ambiguous dates are read
/// month-first when they all use `/` (US dates, as [`parse_datetime`] reads
/// them), and refused otherwise.
///
/// `L` is how the caller names a place in its input (file, line, text); it is
/// only asked for when it may have to be reported.
#[derive(Debug)]
pub(crate) struct DayMonthOrder<L> {
    /// The order and the place of the date that proved it.
    known: Option<(DayMonth, L)>,
    /// Rows waiting for the order: (row, day-first time, month-first time).
    pending: Vec<(usize, i64, i64)>,
    /// The first pending date written with `-` or `.`.
    first_unsure: Option<L>,
}

impl<L: Clone> Default for DayMonthOrder<L> {
    fn default() -> Self {
        DayMonthOrder {
            known: None,
            pending: Vec::new(),
            first_unsure: None,
        }
    }
}

impl<L: Clone> DayMonthOrder<L> {
    /// The time to store now for row `row`, whose field read as `time`.
    ///
    /// `here` names the row's place (called at most once, and only when the
    /// place may be needed later). When this date decides the order, `fix`
    /// is called with each row of the side list and its final time. For an
    /// ambiguous date read before the order is known the month-first time is
    /// returned, to be fixed later.
    ///
    /// # Errors
    /// [`OrderConflict`] when `time` proves the other order than the one
    /// already known.
    pub(crate) fn time(
        &mut self,
        row: usize,
        time: FieldTime,
        here: impl FnOnce() -> L,
        mut fix: impl FnMut(usize, i64),
    ) -> Result<i64, OrderConflict<L>> {
        match time {
            FieldTime::Exact(t) => Ok(t),
            FieldTime::Proves(order, t) => match &self.known {
                Some((known, _)) if *known == order => Ok(t),
                Some((_, earlier)) => Err(OrderConflict {
                    found: order,
                    earlier: earlier.clone(),
                }),
                None => {
                    self.known = Some((order, here()));
                    for (row, day_first, month_first) in self.pending.drain(..) {
                        fix(row, pick(order, day_first, month_first));
                    }
                    self.pending = Vec::new();
                    self.first_unsure = None;
                    Ok(t)
                }
            },
            FieldTime::Ambiguous {
                day_first,
                month_first,
                slash,
            } => match &self.known {
                Some((order, _)) => Ok(pick(*order, day_first, month_first)),
                None => {
                    if !slash && self.first_unsure.is_none() {
                        self.first_unsure = Some(here());
                    }
                    self.pending.push((row, day_first, month_first));
                    Ok(month_first)
                }
            },
        }
    }

    /// Ends the load: if the order is still unknown, the ambiguous dates keep
    /// their month-first times when all were written with `/`.
    ///
    /// # Errors
    /// When the order is unknown and an ambiguous date was written with `-`
    /// or `.`: the place of the first such date.
    pub(crate) fn finish(self) -> Result<(), L> {
        match self.first_unsure {
            Some(first) if self.known.is_none() => Err(first),
            _ => Ok(()),
        }
    }
}

/// The candidate time of `order`.
fn pick(order: DayMonth, day_first: i64, month_first: i64) -> i64 {
    match order {
        DayMonth::DayFirst => day_first,
        DayMonth::MonthFirst => month_first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2010-12-01 08:26:00 UTC.
    const T: i64 = 1_291_191_960;

    #[test]
    fn retail_layouts() {
        assert_eq!(parse_datetime("2010-12-01 08:26:00"), Some(T));
        assert_eq!(parse_datetime("2010-12-01 08:26"), Some(T));
        assert_eq!(parse_datetime("12/1/2010 8:26"), Some(T));
        assert_eq!(parse_datetime("12/01/2010 08:26"), Some(T));
        assert_eq!(parse_datetime(" 2010-12-01 08:26:00 "), Some(T));
    }

    #[test]
    fn iso_layouts() {
        assert_eq!(parse_datetime("2010-12-01T08:26:00"), Some(T));
        assert_eq!(parse_datetime("2010-12-01T08:26:00Z"), Some(T));
        assert_eq!(parse_datetime("2010-12-01T08:26:00.250Z"), Some(T));
        assert_eq!(parse_datetime("2010-12-01T09:26:00+01:00"), Some(T));
        assert_eq!(parse_datetime("2010-12-01T08:26"), Some(T));
    }

    #[test]
    fn bare_dates() {
        assert_eq!(parse_datetime("2010-12-01"), Some(T - (8 * 60 + 26) * 60));
        assert_eq!(parse_datetime("1970-01-01"), Some(0));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "abc",
            "2010-13-01",
            "13/1/2010 8:26",
            "2010-12-01 25:00",
            "12/1/2010 8",
        ] {
            assert_eq!(parse_datetime(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn unix_seconds() {
        assert_eq!(parse_unix_seconds("881250949"), Some(881_250_949));
        assert_eq!(parse_unix_seconds("-5"), Some(-5));
        assert_eq!(parse_unix_seconds("1.9"), Some(1));
        assert_eq!(parse_unix_seconds("-1.5"), Some(-2));
        assert_eq!(parse_unix_seconds("nan"), None);
        assert_eq!(parse_unix_seconds("1e300"), None);
        assert_eq!(parse_unix_seconds("x"), None);
        assert_eq!(parse_time_any("2010-12-01 08:26"), Some(T));
        assert_eq!(parse_time_any("1291191960"), Some(T));
    }

    /// 2014-06-24 00:00:00 UTC.
    const JUNE24: i64 = 1_403_568_000;

    fn day(y: i32, m: u32, d: u32) -> i64 {
        NaiveDate::from_ymd_opt(y, m, d)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map_or(i64::MIN, |dt| dt.and_utc().timestamp())
    }

    #[test]
    fn field_time_day_month_family() {
        use DayMonth::{DayFirst, MonthFirst};
        use FieldTime::{Ambiguous, Exact, Proves};
        assert_eq!(day(2014, 6, 24), JUNE24);
        let cases: &[(&str, Option<FieldTime>)] = &[
            ("24-06-2014", Some(Proves(DayFirst, JUNE24))),
            ("24.6.2014", Some(Proves(DayFirst, JUNE24))),
            ("24/06/2014 10:15", Some(Proves(DayFirst, JUNE24 + 36_900))),
            (
                "06-24-2014 10:15:30",
                Some(Proves(MonthFirst, JUNE24 + 36_930)),
            ),
            ("6/24/2014  8:26", Some(Proves(MonthFirst, JUNE24 + 30_360))),
            ("05.05.2014", Some(Exact(day(2014, 5, 5)))),
            (
                "01-02-2014",
                Some(Ambiguous {
                    day_first: day(2014, 2, 1),
                    month_first: day(2014, 1, 2),
                    slash: false,
                }),
            ),
            (
                "12/1/2010 8:26",
                Some(Ambiguous {
                    day_first: day(2010, 1, 12) + 30_360,
                    month_first: T,
                    slash: true,
                }),
            ),
            // Year-first and Unix seconds are exact.
            ("2014-06-24", Some(Exact(JUNE24))),
            ("2014-06-24T00:00:00Z", Some(Exact(JUNE24))),
            ("1403568000", Some(Exact(JUNE24))),
            // Not dates.
            ("13-13-2014", None),
            ("31-02-2014", None),
            ("24-06-14", None),
            ("2014-06-24 10:15:00.5", Some(Exact(JUNE24 + 36_900))),
            ("2014-6-24", Some(Exact(JUNE24))),
            ("2014-06-24 10", None),
            ("24-06/2014", None),
            ("24_06_2014", None),
            ("24-06-2014 25:00", None),
            ("24-06-2014 10", None),
            ("24-06-2014 10:00:00:00", None),
            ("0-06-2014", None),
            ("124-06-2014", None),
            ("", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_field_time(text, true), *expected, "{text:?}");
        }
        // Retail reads no Unix seconds.
        assert_eq!(parse_field_time("1403568000", false), None);
        assert_eq!(parse_field_time("2010-12-01 08:26", false), Some(Exact(T)));
    }

    #[test]
    fn explicit_format() {
        assert_eq!(
            parse_with_format("24.06.2014 10:15", "%d.%m.%Y %H:%M"),
            Some(JUNE24 + 36_900)
        );
        assert_eq!(parse_with_format("24.06.2014", "%d.%m.%Y"), Some(JUNE24));
        assert_eq!(
            parse_with_format("24.06.2014 12:15 +0200", "%d.%m.%Y %H:%M %z"),
            Some(JUNE24 + 36_900)
        );
        // Exactly that layout: nothing else.
        assert_eq!(parse_with_format("2014-06-24", "%d.%m.%Y"), None);
        assert_eq!(parse_with_format("1403568000", "%d.%m.%Y"), None);
        assert_eq!(parse_with_format("24.06.2014 10:15", "%d.%m.%Y"), None);
        assert!(is_valid_format("%d.%m.%Y %H:%M"));
        assert!(is_valid_format("%Y%m%d"));
        assert!(!is_valid_format("%d.%m.%Y %Q"));
        assert!(!is_valid_format("%d.%m.%Y %"));
        assert!(!is_valid_format(""));
    }

    /// Feeds `times` as rows 0, 1, … (place = row index) and returns the
    /// stored times after `finish`, or the error described.
    fn resolve(times: &[FieldTime]) -> Result<Vec<i64>, String> {
        let mut order = DayMonthOrder::default();
        let mut stored = Vec::new();
        for (row, &t) in times.iter().enumerate() {
            let now = order
                .time(
                    row,
                    t,
                    || row,
                    |r, t| {
                        if let Some(x) = stored.get_mut(r) {
                            *x = t;
                        }
                    },
                )
                .map_err(|c| format!("{:?} after row {}", c.found, c.earlier))?;
            stored.push(now);
        }
        order
            .finish()
            .map_err(|first| format!("ambiguous from row {first}"))?;
        Ok(stored)
    }

    #[test]
    fn order_resolves_earlier_ambiguous_rows() {
        use DayMonth::{DayFirst, MonthFirst};
        let amb = |d, m, slash| FieldTime::Ambiguous {
            day_first: d,
            month_first: m,
            slash,
        };
        // Proof of day-first at row 2 rewrites rows 0 and 1; row 4 follows it.
        let rows = [
            amb(1, 2, false),
            FieldTime::Exact(7),
            amb(3, 4, false),
            FieldTime::Proves(DayFirst, 9),
            amb(5, 6, false),
        ];
        assert_eq!(resolve(&rows), Ok(vec![1, 7, 3, 9, 5]));
        let rows = [
            amb(1, 2, true),
            FieldTime::Proves(MonthFirst, 9),
            amb(3, 4, false),
        ];
        assert_eq!(resolve(&rows), Ok(vec![2, 9, 4]));
        // Nothing proves the order: `/` dates are month-first...
        assert_eq!(resolve(&[amb(1, 2, true), amb(3, 4, true)]), Ok(vec![2, 4]));
        // ...others are refused, naming the first `-`/`.` one.
        assert_eq!(
            resolve(&[amb(1, 2, true), amb(3, 4, false), amb(5, 6, false)]),
            Err("ambiguous from row 1".to_owned())
        );
        // A proof of the other order is an error naming the first proof.
        assert_eq!(
            resolve(&[
                amb(1, 2, false),
                FieldTime::Proves(DayFirst, 9),
                FieldTime::Proves(DayFirst, 10),
                FieldTime::Proves(MonthFirst, 11),
            ]),
            Err("MonthFirst after row 1".to_owned())
        );
    }

    #[test]
    fn order_keeps_only_ambiguous_rows_and_frees_them() {
        let mut order = DayMonthOrder::default();
        for row in 0..1000 {
            let t = if row % 10 == 0 {
                FieldTime::Ambiguous {
                    day_first: 0,
                    month_first: 1,
                    slash: true,
                }
            } else {
                FieldTime::Exact(2)
            };
            assert!(order.time(row, t, || (), |_, _| {}).is_ok());
        }
        assert_eq!(order.pending.len(), 100);
        let mut fixed = 0;
        let proof = FieldTime::Proves(DayMonth::DayFirst, 3);
        assert_eq!(order.time(1000, proof, || (), |_, _| fixed += 1), Ok(3));
        assert_eq!((fixed, order.pending.capacity()), (100, 0));
    }
}
