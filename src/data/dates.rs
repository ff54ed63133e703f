//! Parsing of the timestamps found in interaction logs.
//!
//! Times without a zone are taken as UTC. All results are Unix seconds.

use chrono::{DateTime, NaiveDate, NaiveDateTime};

/// Date-time layouts without a zone, tried in this order (all as UTC).
///
/// `%m`, `%d` and `%H` also accept a single digit, so `12/1/2010 8:26`
/// (the UCI xlsx export, US month/day/year) matches `%m/%d/%Y %H:%M`.
/// `%.f` accepts an absent fraction.
const NAIVE_DATE_TIMES: &[&str] = &[
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%m/%d/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M",
];

/// Date-only layouts (midnight UTC).
const NAIVE_DATES: &[&str] = &["%Y-%m-%d", "%m/%d/%Y"];

/// Parses a calendar date-time into Unix seconds.
///
/// Accepted: `2010-12-01 08:26:00`, `2010-12-01 08:26`, `12/1/2010 8:26`
/// (US month/day/year), ISO 8601 / RFC 3339 `2010-12-01T08:26:00` with an
/// optional fraction and optional `Z` or `+hh:mm` offset, and the bare dates
/// `2010-12-01` and `12/1/2010`. Times without an offset are UTC.
/// Returns `None` when none of these matches.
pub fn parse_datetime(text: &str) -> Option<i64> {
    let s = text.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp());
    }
    for layout in NAIVE_DATE_TIMES {
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

/// Parses a time column of the generic `columns` format: Unix seconds
/// (integer or float) or any layout accepted by [`parse_datetime`].
pub fn parse_time_any(text: &str) -> Option<i64> {
    parse_unix_seconds(text).or_else(|| parse_datetime(text))
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
}
