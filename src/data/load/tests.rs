//! Tests of loading and format detection, on fixtures written to temp dirs.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::{MAX_LINE_BYTES, detect_format, load, normalise_customer};
use crate::data::{DataError, Dataset, Format, Interaction, LoadOptions};

fn tmp() -> TempDir {
    match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    }
}

fn write(dir: &Path, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    if let Err(e) = std::fs::write(&path, content) {
        panic!("write {}: {e}", path.display());
    }
    path
}

fn ok(path: &Path, opts: &LoadOptions) -> Dataset {
    match load(path, opts) {
        Ok(ds) => ds,
        Err(e) => panic!("load {} failed: {e}", path.display()),
    }
}

fn err(path: &Path, opts: &LoadOptions) -> String {
    match load(path, opts) {
        Ok(ds) => panic!("load {} unexpectedly gave {ds:?}", path.display()),
        Err(e) => e.to_string(),
    }
}

fn detect(path: &Path, opts: &LoadOptions) -> Result<Format, String> {
    detect_format(path, opts).map_err(|e| e.to_string())
}

fn no_opts() -> LoadOptions {
    LoadOptions::default()
}

fn cols(user: &str, item: &str, time: Option<&str>) -> LoadOptions {
    LoadOptions {
        format: None,
        user_col: Some(user.into()),
        item_col: Some(item.into()),
        time_col: time.map(Into::into),
        time_format: None,
    }
}

fn ix(user: u32, item: u32, time: i64, quantity: f32) -> Interaction {
    Interaction {
        user,
        item,
        time,
        quantity,
    }
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// 2010-12-01 08:26:00 UTC.
const T0826: i64 = 1_291_191_960;

// ---------------------------------------------------------------- MovieLens

const U_DATA: &str = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n\n196\t302\t1\t878887116\n";

#[test]
fn movielens_u_data() {
    let d = tmp();
    let p = write(d.path(), "u.data", U_DATA);
    assert_eq!(detect(&p, &no_opts()), Ok(Format::MovieLens));
    let ds = ok(&p, &no_opts());
    assert_eq!(ds.name, "u.data");
    assert_eq!(ds.user_ids, strs(&["196", "186"]));
    assert_eq!(ds.item_ids, strs(&["242", "302"]));
    assert_eq!(
        ds.interactions,
        vec![
            ix(0, 0, 881_250_949, 1.0),
            ix(1, 1, 891_717_742, 1.0),
            ix(0, 1, 878_887_116, 1.0)
        ]
    );
    assert!(ds.skipped.is_empty());
}

#[test]
fn movielens_dat_with_crlf_and_bom() {
    let d = tmp();
    let p = write(
        d.path(),
        "ratings.dat",
        "\u{feff}1::1193::5::978300760\r\n1::661::3.5::978302109\r\n2::1193::4::978298413\r\n",
    );
    assert_eq!(detect(&p, &no_opts()), Ok(Format::MovieLensDat));
    let ds = ok(&p, &no_opts());
    assert_eq!(ds.user_ids, strs(&["1", "2"]));
    assert_eq!(ds.item_ids, strs(&["1193", "661"]));
    assert_eq!(
        ds.interactions,
        vec![
            ix(0, 0, 978_300_760, 1.0),
            ix(0, 1, 978_302_109, 1.0),
            ix(1, 0, 978_298_413, 1.0)
        ]
    );
}

#[test]
fn movielens_csv() {
    let d = tmp();
    let p = write(
        d.path(),
        "ratings.csv",
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.0,964981247\n5,1,4.0,847434962\n",
    );
    assert_eq!(detect(&p, &no_opts()), Ok(Format::MovieLensCsv));
    let ds = ok(&p, &no_opts());
    assert_eq!(ds.user_ids, strs(&["1", "5"]));
    assert_eq!(ds.item_ids, strs(&["1", "3"]));
    assert_eq!(
        ds.interactions,
        vec![
            ix(0, 0, 964_982_703, 1.0),
            ix(0, 1, 964_981_247, 1.0),
            ix(1, 0, 847_434_962, 1.0)
        ]
    );
}

#[test]
fn movielens_malformed_lines_name_file_and_line() {
    let d = tmp();
    let cases: &[(&str, &str, &str)] = &[
        (
            "u.data",
            "1\t2\t3\t4\n1\t2\t3\t5\n\n1\t2\t3\t6\n1\t2\t3\tabc\n",
            "u.data:5: timestamp \"abc\" is not an integer",
        ),
        (
            "u2.data",
            "1\t2\t3\t4\n1\t2\t3\n",
            "u2.data:2: expected 4 tab-separated fields, got 3",
        ),
        (
            "u3.data",
            "1\t2\t3\t4\nx\t2\t3\t4\n",
            "u3.data:2: user id \"x\" is not an integer",
        ),
        (
            "u5.data",
            "1\t2\t3\t4\n-1\t2\t3\t4\n",
            "u5.data:2: user id \"-1\" must be a non-negative integer",
        ),
        (
            "u6.data",
            "1\t2\t3\t4\n1\t-20\t3\t4\n",
            "u6.data:2: item id \"-20\" must be a non-negative integer",
        ),
        (
            "ratings2.dat",
            "1::2::3::4\n-7::2::3::4\n",
            "ratings2.dat:2: user id \"-7\" must be a non-negative integer",
        ),
        (
            "u7.data",
            "1\t2\t3\t4\n1\t-\t3\t4\n",
            "u7.data:2: item id \"-\" is not an integer",
        ),
        (
            "u4.data",
            "1\t2\t3\t4\n1\t2\tgood\t4\n",
            "u4.data:2: rating \"good\" is not a number",
        ),
        (
            "ratings.dat",
            "1::2::3::4\n1::2::3::4\n1::2::3\n",
            "ratings.dat:3: expected 4 fields separated by \"::\", got 3",
        ),
        (
            "ratings.csv",
            "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3,4.5\n",
            "ratings.csv:3: timestamp \"4.5\" is not an integer",
        ),
        (
            "r2.csv",
            "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3\n",
            "r2.csv:3: expected 4 fields as in the header, got 3",
        ),
    ];
    for (name, content, expected) in cases {
        let p = write(d.path(), name, content);
        let msg = err(&p, &no_opts());
        assert!(
            msg.ends_with(expected),
            "{msg:?} should end with {expected:?}"
        );
        assert!(msg.contains(&d.path().display().to_string()), "{msg}");
    }
}

// ---------------------------------------------------------------- Retail

/// Columns in a different order than UCI's, quoted descriptions with commas
/// (and one with a line break, so record and line numbers differ), every skip
/// reason, and the four accepted date layouts.
const RETAIL: &str = "\
InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536365,85123A,\"WHITE HANGING HEART, T-LIGHT HOLDER\",6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom
536365,71053,\"WHITE METAL
LANTERN, \"\"BIG\"\"\",6,2010-12-01 08:26,3.39,17850.0,United Kingdom
536366,22633,HAND WARMER,2,12/1/2010 8:28,1.85,,United Kingdom
C536379,D,Discount,-1,2010-12-01T09:41:00,27.5,14527.0,United Kingdom
536380,22961,JAM MAKING SET,0,2010-12-01 09:41,1.45,12345,France
536381,22139,\"RETROSPOT, TEA SET\",-3,2010-12-01 09:41,4.95,12345,France
536382,85123A,HEART,12,2010-12-01T09:45:00Z,2.55,12345,France
536383,,NO CODE,1,2010-12-01 09:45,2.55,12345,France
536384,71053,LANTERN,3,12/1/2010 10:03,3.39,17850,United Kingdom
";

#[test]
fn retail_parse_and_skip_counts() {
    let d = tmp();
    let p = write(d.path(), "online_retail.csv", RETAIL);
    assert_eq!(detect(&p, &no_opts()), Ok(Format::Retail));
    let ds = ok(&p, &no_opts());
    assert_eq!(ds.user_ids, strs(&["17850", "12345"]));
    assert_eq!(ds.item_ids, strs(&["85123A", "71053"]));
    assert_eq!(
        ds.interactions,
        vec![
            ix(0, 0, T0826, 6.0),
            ix(0, 1, T0826, 6.0),
            ix(1, 0, T0826 + 79 * 60, 12.0),
            ix(0, 1, T0826 + 97 * 60, 3.0),
        ]
    );
    let skipped: Vec<(&str, u64)> = ds.skipped.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(
        skipped,
        vec![
            ("cancelled invoice", 1),
            ("missing CustomerID", 1),
            ("missing StockCode", 1),
            ("non-positive quantity", 2),
        ]
    );
    assert_eq!(ds.n_skipped(), 5);
}

#[test]
fn retail_columns_found_by_name() {
    let d = tmp();
    let p = write(
        d.path(),
        "shuffled.csv",
        "Country;CustomerID;InvoiceDate;Quantity;StockCode;InvoiceNo\n\
         France;12345.0;2010-12-01T08:26:00+00:00;4;A1;1\n",
    );
    assert_eq!(detect(&p, &no_opts()), Ok(Format::Retail));
    let ds = ok(&p, &no_opts());
    assert_eq!(ds.user_ids, strs(&["12345"]));
    assert_eq!(ds.interactions, vec![ix(0, 0, T0826, 4.0)]);
}

#[test]
fn retail_malformed_lines_name_file_and_line() {
    let d = tmp();
    let head =
        "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n";
    let good = "1,A,\"multi\nline, desc\",1,2010-12-01 08:26,1.0,5.0,UK\n";
    let cases = [
        (
            "bad_qty.csv",
            format!("{head}{good}2,B,x,lots,2010-12-01 08:26,1.0,5.0,UK\n"),
            "bad_qty.csv:4: Quantity \"lots\" is not a number",
        ),
        (
            "bad_date.csv",
            format!("{head}{good}\n2,B,x,1,yesterday,1.0,5.0,UK\n"),
            "bad_date.csv:5: InvoiceDate \"yesterday\" is not a recognised date/time",
        ),
        (
            "short.csv",
            format!("{head}{good}2,B,x,1\n"),
            "short.csv:4: expected 8 fields as in the header, got 4",
        ),
    ];
    for (name, content, expected) in cases {
        let p = write(d.path(), name, content);
        let msg = err(&p, &no_opts());
        assert!(
            msg.contains(expected),
            "{msg:?} should contain {expected:?}"
        );
    }
}

#[test]
fn retail_all_skipped_is_an_empty_dataset_error() {
    let d = tmp();
    let p = write(
        d.path(),
        "none.csv",
        "InvoiceNo,StockCode,Quantity,InvoiceDate,CustomerID\nC1,A,-1,2010-12-01 08:26,5\n2,A,1,2010-12-01 08:26,\n",
    );
    let msg = err(&p, &no_opts());
    assert!(msg.contains("\"none.csv\" has no interactions"), "{msg}");
    assert!(
        msg.contains("cancelled invoice: 1, missing CustomerID: 1"),
        "{msg}"
    );
}

#[test]
fn customer_id_normalisation() {
    assert_eq!(normalise_customer("17850.0"), "17850");
    assert_eq!(normalise_customer("17850.00"), "17850");
    assert_eq!(normalise_customer("17850"), "17850");
    assert_eq!(normalise_customer("17850.5"), "17850.5");
    assert_eq!(normalise_customer("A17.0"), "A17.0");
    assert_eq!(normalise_customer(".0"), ".0");
}

// ---------------------------------------------------------------- Columns

#[test]
fn columns_tsv_csv_semicolon() {
    let d = tmp();
    let files = [
        (
            "events.tsv",
            "ts\tvisitor\tthing\textra\n1700000000\tv1\tp1\tx\n1700000100.7\tv2\tp1\ty\n2023-11-14\tv1\tp2\tz\n",
        ),
        (
            "events.csv",
            "visitor,thing,ts\nv1,p1,1700000000\nv2,p1,1700000100.7\n\"v1\",p2,2023-11-14\n",
        ),
        (
            "events.txt",
            "visitor;thing;ts\nv1;p1;1700000000\nv2;p1;1700000100.7\nv1;p2;2023-11-14 00:00:00\n",
        ),
    ];
    let opts = cols("visitor", "thing", Some("ts"));
    for (name, content) in files {
        let p = write(d.path(), name, content);
        assert_eq!(detect(&p, &opts), Ok(Format::Columns), "{name}");
        let ds = ok(&p, &opts);
        assert_eq!(ds.user_ids, strs(&["v1", "v2"]), "{name}");
        assert_eq!(ds.item_ids, strs(&["p1", "p2"]), "{name}");
        assert_eq!(
            ds.interactions,
            vec![
                ix(0, 0, 1_700_000_000, 1.0),
                ix(1, 0, 1_700_000_100, 1.0),
                ix(0, 1, 1_699_920_000, 1.0)
            ],
            "{name}"
        );
    }
}

#[test]
fn columns_without_time_and_case_insensitive_names() {
    let d = tmp();
    let p = write(
        d.path(),
        "a.csv",
        "User,Item\nu1,i1\n,i2\nu2,\nu2,i1\nu1,i2\n",
    );
    let ds = ok(&p, &cols("user", "item", None));
    // Untimed: the time is the position among the loaded interactions.
    assert!(!ds.timed);
    assert_eq!(
        ds.interactions,
        vec![ix(0, 0, 0, 1.0), ix(1, 0, 1, 1.0), ix(0, 1, 2, 1.0)]
    );
    assert_eq!(ds.skipped.get("missing user"), Some(&1));
    assert_eq!(ds.skipped.get("missing item"), Some(&1));
}

#[test]
fn columns_option_errors() {
    let d = tmp();
    let p = write(d.path(), "a.csv", "who,what,when\nu1,i1,5\n");
    let forced = |user: Option<&str>, item: Option<&str>, time: Option<&str>| LoadOptions {
        format: Some(Format::Columns),
        user_col: user.map(Into::into),
        item_col: item.map(Into::into),
        time_col: time.map(Into::into),
        time_format: None,
    };
    let msg = err(&p, &forced(None, Some("what"), None));
    assert!(msg.contains("needs the --user-col option"), "{msg}");
    let msg = err(&p, &forced(Some("who"), None, None));
    assert!(msg.contains("needs the --item-col option"), "{msg}");
    let msg = err(&p, &forced(Some("who"), Some("item"), None));
    assert!(msg.contains("no column \"item\""), "{msg}");
    assert!(msg.contains("\"who\", \"what\", \"when\""), "{msg}");
    let msg = err(&p, &forced(Some("who"), Some("what"), Some("time")));
    assert!(msg.contains("no column \"time\""), "{msg}");
    assert_eq!(
        ok(&p, &forced(Some("who"), Some("what"), Some("when"))).interactions,
        vec![ix(0, 0, 5, 1.0)]
    );
}

#[test]
fn columns_bad_time_names_line() {
    let d = tmp();
    let p = write(d.path(), "log.tsv", "u\ti\tt\n\n1\t2\t3\n1\t2\tsoon\n");
    let msg = err(&p, &cols("u", "i", Some("t")));
    assert!(
        msg.ends_with(
            "log.tsv:4: t \"soon\" is neither Unix seconds nor a recognised date/time \
             (pass --time-format for other layouts)"
        ),
        "{msg}"
    );
}

// ---------------------------------------------------------------- Time

/// 2014-06-24 00:00:00 UTC.
const JUNE24: i64 = 1_403_568_000;
const DAY: i64 = 86_400;

fn times(ds: &Dataset) -> Vec<i64> {
    ds.interactions.iter().map(|x| x.time).collect()
}

fn with_format(opts: LoadOptions, format: &str) -> LoadOptions {
    LoadOptions {
        time_format: Some(format.into()),
        ..opts
    }
}

#[test]
fn timed_flag_per_format() {
    let d = tmp();
    let p = write(d.path(), "u.data", U_DATA);
    assert!(ok(&p, &no_opts()).timed);
    let p = write(d.path(), "r.csv", RETAIL);
    assert!(ok(&p, &no_opts()).timed);
    let p = write(d.path(), "t.csv", "u,i,t\na,x,5\n");
    assert!(ok(&p, &cols("u", "i", Some("t"))).timed);
    assert!(!ok(&p, &cols("u", "i", None)).timed);
    let p = write(d.path(), "s.txt", "a x y\n");
    let seq = LoadOptions {
        format: Some(Format::Sequences),
        ..no_opts()
    };
    assert!(!ok(&p, &seq).timed);
}

#[test]
fn untimed_positions_run_over_all_files_in_load_order() {
    let d = tmp();
    write(d.path(), "b.csv", "u,i\nc,z\n,skipped\nd,z\n");
    write(d.path(), "a.csv", "u,i\na,x\nb,y\n");
    let ds = ok(d.path(), &cols("u", "i", None));
    assert_eq!(ds.user_ids, strs(&["a", "b", "c", "d"]));
    assert_eq!(times(&ds), vec![0, 1, 2, 3]);
}

#[test]
fn time_format_reads_exactly_that_layout() {
    let d = tmp();
    let p = write(
        d.path(),
        "eu.csv",
        "u;i;when\na;x;24.06.2014 10:15\nb;y;01.02.2014 00:00\n",
    );
    let opts = with_format(cols("u", "i", Some("when")), "%d.%m.%Y %H:%M");
    assert_eq!(detect(&p, &opts), Ok(Format::Columns));
    let ds = ok(&p, &opts);
    assert!(ds.timed);
    assert_eq!(times(&ds), vec![JUNE24 + 36_900, JUNE24 - 143 * DAY]);

    // Date-only layouts give midnight UTC.
    let p = write(d.path(), "dates.csv", "u,i,when\na,x,06/24/2014\n");
    let opts = with_format(cols("u", "i", Some("when")), "%m/%d/%Y");
    assert_eq!(times(&ok(&p, &opts)), vec![JUNE24]);

    // Every value must match, even one the automatic parser would read.
    let p = write(
        d.path(),
        "mixed.csv",
        "u,i,when\na,x,24.06.2014 10:15\n\nb,y,2014-06-24 10:15\n",
    );
    let opts = with_format(cols("u", "i", Some("when")), "%d.%m.%Y %H:%M");
    let msg = err(&p, &opts);
    assert!(
        msg.ends_with(
            "mixed.csv:4: time \"2014-06-24 10:15\" does not match --time-format \"%d.%m.%Y %H:%M\""
        ),
        "{msg}"
    );
}

#[test]
fn time_format_errors() {
    let d = tmp();
    let p = write(d.path(), "a.csv", "u,i,t\na,x,24.06.2014\n");
    let msg = err(&p, &with_format(cols("u", "i", Some("t")), "%d.%m.%Y %Q"));
    assert!(
        msg.contains("--time-format \"%d.%m.%Y %Q\" is not a valid strftime layout"),
        "{msg}"
    );
    let msg = err(&p, &with_format(cols("u", "i", None), "%d.%m.%Y"));
    assert!(
        msg.contains("--time-format does not apply") && msg.contains("--time-col"),
        "{msg}"
    );
    let p = write(d.path(), "u.data", U_DATA);
    let msg = err(&p, &with_format(no_opts(), "%d.%m.%Y"));
    assert!(
        msg.contains("--time-format does not apply") && msg.contains("movielens"),
        "{msg}"
    );
}

#[test]
fn retail_with_time_format_and_day_first_dates() {
    let d = tmp();
    let head = "InvoiceNo,StockCode,Quantity,InvoiceDate,CustomerID\n";
    let p = write(
        d.path(),
        "eu.csv",
        format!("{head}1,A,1,01.02.2014 08:00,5\n2,B,1,24.06.2014 10:15,5\n"),
    );
    // Detected: the second row proves day-first and fixes the first.
    assert_eq!(
        times(&ok(&p, &no_opts())),
        vec![JUNE24 - 143 * DAY + 8 * 3600, JUNE24 + 36_900]
    );
    let opts = with_format(no_opts(), "%d.%m.%Y %H:%M");
    assert_eq!(
        times(&ok(&p, &opts)),
        vec![JUNE24 - 143 * DAY + 8 * 3600, JUNE24 + 36_900]
    );
    let opts = with_format(no_opts(), "%Y-%m-%d %H:%M");
    let msg = err(&p, &opts);
    assert!(
        msg.ends_with(
            "eu.csv:2: time \"01.02.2014 08:00\" does not match --time-format \"%Y-%m-%d %H:%M\""
        ),
        "{msg}"
    );
}

/// A columns file with the given time values, one row each.
fn dated(dir: &Path, name: &str, dates: &[&str]) -> PathBuf {
    let mut content = String::from("user,item,date\n");
    for (n, date) in dates.iter().enumerate() {
        content.push_str(&format!("u{n},i{n},{date}\n"));
    }
    write(dir, name, content)
}

#[test]
fn day_first_dates_detected_from_the_data() {
    let d = tmp();
    let opts = cols("user", "item", Some("date"));
    // Refused before; day-first because 24 > 12.
    let p = dated(d.path(), "one.csv", &["24-06-2014"]);
    assert_eq!(times(&ok(&p, &opts)), vec![JUNE24]);
    // Ambiguous rows before the proof are resolved by it, those after too.
    let p = dated(
        d.path(),
        "later.csv",
        &[
            "01-02-2014",
            "03-04-2014 10:00",
            "2014-06-24",
            "13-02-2014",
            "05-06-2014",
        ],
    );
    assert_eq!(
        times(&ok(&p, &opts)),
        vec![
            JUNE24 - 143 * DAY,
            JUNE24 - 82 * DAY + 36_000,
            JUNE24,
            JUNE24 - 131 * DAY,
            JUNE24 - 19 * DAY,
        ]
    );
    // Month-first proven by 13 in second place.
    let p = dated(d.path(), "us.csv", &["06.01.2014", "06.24.2014 00:00:10"]);
    assert_eq!(times(&ok(&p, &opts)), vec![JUNE24 - 23 * DAY, JUNE24 + 10]);
    // Equal day and month need no order.
    let p = dated(d.path(), "same.csv", &["05-05-2014"]);
    assert_eq!(times(&ok(&p, &opts)), vec![JUNE24 - 50 * DAY]);
}

#[test]
fn day_month_order_is_shared_by_the_files_of_a_directory() {
    let d = tmp();
    dated(d.path(), "a.csv", &["01-02-2014", "03-04-2014"]);
    dated(d.path(), "b.csv", &["24-06-2014"]);
    let ds = ok(d.path(), &cols("user", "item", Some("date")));
    assert_eq!(
        times(&ds),
        vec![JUNE24 - 143 * DAY, JUNE24 - 82 * DAY, JUNE24]
    );
}

#[test]
fn both_orders_in_one_load_is_an_error() {
    let d = tmp();
    let p = dated(
        d.path(),
        "both.csv",
        &[
            "01/02/2014",
            "13/01/2014 10:00",
            "02/03/2014",
            "01/13/2014 10:00",
        ],
    );
    let msg = err(&p, &cols("user", "item", Some("date")));
    assert!(
        msg.contains("both.csv:5: date \"01/13/2014 10:00\" has its month first, but "),
        "{msg}"
    );
    assert!(
        msg.contains("both.csv:3 (\"13/01/2014 10:00\") has its day first"),
        "{msg}"
    );
    assert!(
        msg.contains("--time-format") && msg.contains("'%d/%m/%Y %H:%M'"),
        "{msg}"
    );
}

#[test]
fn an_ambiguous_load_keeps_us_slashes_and_refuses_dashes_and_dots() {
    let d = tmp();
    let opts = cols("user", "item", Some("date"));
    let p = dated(d.path(), "slash.csv", &["06/01/2014", "01/06/2014"]);
    assert_eq!(
        times(&ok(&p, &opts)),
        vec![JUNE24 - 23 * DAY, JUNE24 - 169 * DAY]
    );
    for (name, dates, layouts) in [
        (
            "dash.csv",
            ["06-01-2014", "01-06-2014"],
            "'%d-%m-%Y' or '%m-%d-%Y'",
        ),
        (
            "dot.csv",
            ["2014-01-01", "06.01.2014"],
            "'%d.%m.%Y' or '%m.%d.%Y'",
        ),
    ] {
        let p = dated(d.path(), name, &dates);
        let msg = err(&p, &opts);
        assert!(msg.contains("is ambiguous"), "{msg}");
        assert!(msg.contains("--time-format"), "{msg}");
        assert!(msg.contains(layouts), "{msg}");
        let line = if name == "dash.csv" { 2 } else { 3 };
        assert!(msg.contains(&format!("{name}:{line}: date ")), "{msg}");
    }
}

#[test]
fn retail_day_first_invoices_sharing_a_date() {
    let d = tmp();
    let head = "InvoiceNo,StockCode,Quantity,InvoiceDate,CustomerID\n";
    // Rows sharing one ambiguous InvoiceDate are all resolved.
    let p = write(
        d.path(),
        "r.csv",
        format!(
            "{head}1,A,1,01/02/2014 8:00,5\n1,B,1,01/02/2014 8:00,5\n\
             2,A,1,24/06/2014 0:00,6\n"
        ),
    );
    let feb1 = JUNE24 - 143 * DAY + 8 * 3600;
    assert_eq!(times(&ok(&p, &no_opts())), vec![feb1, feb1, JUNE24]);
    // Retail does not read Unix seconds (it never did).
    let p = write(d.path(), "unix.csv", format!("{head}1,A,1,1403568000,5\n"));
    let msg = err(&p, &no_opts());
    assert!(msg.contains("is not a recognised date/time"), "{msg}");
    // An empty InvoiceDate is an error, not time 0.
    let p = write(d.path(), "empty.csv", format!("{head}1,A,1,,5\n"));
    let msg = err(&p, &no_opts());
    assert!(msg.contains("empty.csv:2: InvoiceDate \"\""), "{msg}");
}

// ---------------------------------------------------------------- Sequences

const SEQUENCES: &str = "1 1 2 3 4 5\n2 4 5 6\n\n3 9 10 11 12 4 5\n4\n5\t4  7\n";

#[test]
fn sequences_detected_and_loaded() {
    let d = tmp();
    let p = write(d.path(), "Toys.txt", SEQUENCES);
    assert_eq!(detect(&p, &no_opts()), Ok(Format::Sequences));
    let ds = ok(&p, &no_opts());
    assert!(!ds.timed);
    assert_eq!(ds.user_ids, strs(&["1", "2", "3", "5"]));
    assert_eq!(
        ds.item_ids,
        strs(&["1", "2", "3", "4", "5", "6", "9", "10", "11", "12", "7"])
    );
    let rows: Vec<(u32, u32, i64)> = ds
        .interactions
        .iter()
        .map(|x| (x.user, x.item, x.time))
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, 0, 0),
            (0, 1, 1),
            (0, 2, 2),
            (0, 3, 3),
            (0, 4, 4),
            (1, 3, 5),
            (1, 4, 6),
            (1, 5, 7),
            (2, 6, 8),
            (2, 7, 9),
            (2, 8, 10),
            (2, 9, 11),
            (2, 3, 12),
            (2, 4, 13),
            (3, 3, 14),
            (3, 10, 15),
        ]
    );
    assert!(ds.interactions.iter().all(|x| x.quantity == 1.0));
    assert_eq!(ds.skipped.get("user without items"), Some(&1));
    // Each user's latest item is the last of its line.
    let protocol = crate::data::Protocol::new(&ds);
    let ev = protocol
        .evaluation(crate::data::Track::Discover, crate::data::Stage::Test)
        .expect("discover is always reported");
    assert_eq!(ev.targets, vec![Some(4), Some(5), Some(4), Some(10)]);
}

#[test]
fn sequences_detection_rules() {
    let d = tmp();
    let cases: &[(&str, &str, Option<Format>)] = &[
        // u.data is still MovieLens.
        ("u.data", U_DATA, Some(Format::MovieLens)),
        // Alphanumeric ids, a BOM and CRLF.
        (
            "asin.txt",
            "\u{feff}A1 B000X B000Y\r\nA2 B000Y B000Z B001\r\n",
            Some(Format::Sequences),
        ),
        // Lines of equal length: a table, not sequences.
        ("table.txt", "1 2 5 100\n1 3 4 101\n2 2 1 102\n", None),
        // A user repeated: not one line per user.
        ("repeat.txt", "1 2 3\n1 4\n", None),
        // Fewer than 3 tokens on the first line.
        ("pairs.txt", "1 2\n1 2 3\n", None),
        // A single line cannot show varying lengths.
        ("single.txt", "1 2 3 4\n", None),
        // CSV-like punctuation.
        ("commas.txt", "1 2 3\n2 3,4\n", None),
        // Only the first 20 lines are read.
        (
            "late.txt",
            &(0..30)
                .map(|u| match u {
                    0 => format!("{u} a b\n"),
                    25 => "0 a\n".to_owned(),
                    _ => format!("{u} a b c\n"),
                })
                .collect::<String>(),
            Some(Format::Sequences),
        ),
    ];
    for (name, content, expected) in cases {
        let p = write(d.path(), name, content);
        match expected {
            Some(f) => assert_eq!(detect(&p, &no_opts()), Ok(*f), "{name}"),
            None => {
                let msg = detect(&p, &no_opts()).err().unwrap_or_default();
                assert!(msg.contains("cannot recognise the format"), "{name}: {msg}");
                assert!(msg.contains("sequences"), "{name}: {msg}");
            }
        }
    }
    // Forced, a one-line file loads.
    let p = write(d.path(), "forced.txt", "u 1 2 3\n");
    let seq = LoadOptions {
        format: Some(Format::Sequences),
        ..no_opts()
    };
    assert_eq!(ok(&p, &seq).interactions.len(), 3);
    // --user-col/--item-col win over sequences.
    let p = write(d.path(), "cols.txt", SEQUENCES);
    assert_eq!(detect(&p, &cols("a", "b", None)), Ok(Format::Columns));
}

#[test]
fn sequences_directory_and_errors() {
    let d = tmp();
    write(d.path(), "a.txt", "u1 x y\nu2 y z w\n");
    write(d.path(), "b.txt", "u1 z\nu3 x\n");
    write(d.path(), "SOURCE.txt", "Dataset: test\n");
    let seq = LoadOptions {
        format: Some(Format::Sequences),
        ..no_opts()
    };
    let ds = ok(d.path(), &seq);
    assert_eq!(ds.user_ids, strs(&["u1", "u2", "u3"]));
    assert_eq!(times(&ds), (0..7).collect::<Vec<i64>>());
    // Only users, no items.
    let p = write(d.path(), "users.txt", "u1\nu2\n");
    let msg = err(&p, &seq);
    assert!(msg.contains("user without items: 2"), "{msg}");
    let p = write(d.path(), "bad.txt", b"u1 x\nu2 \xff\n");
    let msg = err(&p, &seq);
    assert!(msg.contains("bad.txt:2: invalid UTF-8"), "{msg}");
}

// ---------------------------------------------------------------- Detection

#[test]
fn detection_of_unknown_header_suggests_options() {
    let d = tmp();
    let p = write(d.path(), "mystery.csv", "a,b,c\n1,2,3\n");
    let msg = detect(&p, &no_opts()).err().unwrap_or_default();
    assert!(msg.contains("mystery.csv"), "{msg}");
    assert!(msg.contains("\"a,b,c\""), "{msg}");
    for hint in ["--format", "--user-col", "--item-col"] {
        assert!(msg.contains(hint), "{msg}");
    }
    // Only one of the two column options is not enough.
    let half = LoadOptions {
        user_col: Some("a".into()),
        ..no_opts()
    };
    assert!(detect(&p, &half).is_err());
    assert_eq!(detect(&p, &cols("a", "b", None)), Ok(Format::Columns));
    // An explicit format wins.
    let forced = LoadOptions {
        format: Some(Format::Retail),
        ..no_opts()
    };
    assert_eq!(detect(&p, &forced), Ok(Format::Retail));
}

#[test]
fn detection_skips_leading_blank_lines_and_checks_numbers() {
    let d = tmp();
    let p = write(d.path(), "x.data", "\n  \n1\t2\t3\t4\n");
    assert_eq!(detect(&p, &no_opts()), Ok(Format::MovieLens));
    let p = write(d.path(), "y.data", "a\tb\tc\td\n");
    assert!(detect(&p, &no_opts()).is_err());
    let p = write(d.path(), "z.dat", "1::2::3\n");
    assert!(detect(&p, &no_opts()).is_err());
    let p = write(
        d.path(),
        "h.csv",
        " UserID , MovieID , Rating , Timestamp \n1,2,3,4\n",
    );
    assert_eq!(detect(&p, &no_opts()), Ok(Format::MovieLensCsv));
}

#[test]
fn empty_file_and_missing_path() {
    let d = tmp();
    let p = write(d.path(), "empty.csv", "\n\n");
    let msg = err(&p, &no_opts());
    assert!(msg.contains("empty.csv is empty"), "{msg}");
    let missing = d.path().join("nope.csv");
    let msg = err(&missing, &no_opts());
    assert!(
        msg.starts_with("cannot read") && msg.contains("nope.csv"),
        "{msg}"
    );
    // An explicit header-less format on an empty file: no interactions.
    let forced = LoadOptions {
        format: Some(Format::MovieLens),
        ..no_opts()
    };
    assert!(err(&p, &forced).contains("has no interactions"));
}

// ---------------------------------------------------------------- Directories

#[test]
fn directory_load_in_name_order_with_shared_ids() {
    let d = tmp();
    write(d.path(), "b.data", "2\t20\t1\t200\n1\t10\t1\t201\n");
    write(d.path(), "a.data", "1\t10\t5\t100\n");
    write(d.path(), "SOURCE.txt", "not data\n");
    write(d.path(), "README.txt", "not data\n");
    write(d.path(), "README", "not data\n");
    write(d.path(), "notes.md", "not data\n");
    if let Err(e) = std::fs::create_dir(d.path().join("sub.csv")) {
        panic!("{e}");
    }
    assert_eq!(detect(d.path(), &no_opts()), Ok(Format::MovieLens));
    let ds = ok(d.path(), &no_opts());
    let dir_name = d
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    assert_eq!(Some(ds.name.clone()), dir_name);
    assert_eq!(ds.user_ids, strs(&["1", "2"]));
    assert_eq!(ds.item_ids, strs(&["10", "20"]));
    assert_eq!(
        ds.interactions,
        vec![ix(0, 0, 100, 1.0), ix(1, 1, 200, 1.0), ix(0, 0, 201, 1.0)]
    );
}

#[test]
fn directory_errors() {
    let d = tmp();
    write(d.path(), "SOURCE.txt", "x\n");
    let msg = err(d.path(), &no_opts());
    assert!(
        msg.contains(&d.path().display().to_string()) && msg.contains("holds no data file"),
        "{msg}"
    );
    assert!(matches!(
        detect_format(d.path(), &no_opts()),
        Err(DataError::EmptyDirectory { .. })
    ));

    write(d.path(), "a.data", "1\t10\t5\t100\n");
    write(d.path(), "b.dat", "1::10::5::100\n");
    let msg = err(d.path(), &no_opts());
    assert!(msg.contains("must share a format"), "{msg}");
    assert!(
        msg.contains("a.data is movielens") && msg.contains("b.dat is movielens-dat"),
        "{msg}"
    );
}

// ---------------------------------------------------------------- UTF-8

#[test]
fn invalid_utf8_is_an_error_not_a_panic() {
    let d = tmp();
    let p = write(
        d.path(),
        "u.data",
        b"1\t2\t3\t4\n1\t2\t3\t4\n\xff\xfe\t2\t3\t4\n",
    );
    let msg = err(&p, &no_opts());
    assert!(msg.contains("u.data:3: invalid UTF-8"), "{msg}");

    let p = write(d.path(), "first.data", b"\xff\t2\t3\t4\n");
    assert!(detect(&p, &no_opts()).is_err_and(|m| m.contains("first.data:1: invalid UTF-8")));

    let p = write(
        d.path(),
        "retail.csv",
        b"InvoiceNo,StockCode,Quantity,InvoiceDate,CustomerID\n1,A,1,2010-12-01 08:26,5\n2,B\xc3,1,2010-12-01 08:26,5\n",
    );
    let msg = err(&p, &no_opts());
    assert!(
        msg.contains("retail.csv:3: invalid UTF-8") && msg.contains("StockCode"),
        "{msg}"
    );

    // Invalid bytes in a column that is not used do not matter.
    let p = write(
        d.path(),
        "desc.csv",
        b"InvoiceNo,StockCode,Description,Quantity,InvoiceDate,CustomerID\n1,A,caf\xe9,1,2010-12-01 08:26,5\n",
    );
    assert_eq!(ok(&p, &no_opts()).interactions.len(), 1);

    // Random bytes never panic, whatever the format.
    let junk: Vec<u8> = (0..4000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let p = write(d.path(), "junk.csv", &junk);
    for format in [
        None,
        Some(Format::MovieLens),
        Some(Format::MovieLensDat),
        Some(Format::MovieLensCsv),
        Some(Format::Retail),
        Some(Format::Columns),
        Some(Format::Sequences),
    ] {
        let opts = LoadOptions {
            format,
            ..cols("a", "b", None)
        };
        assert!(load(&p, &opts).is_err());
    }
}

// ---------------------------------------------------------------- Limits

/// `prefix`, then a line of `len` copies of `fill`, then `suffix`.
fn long_file(dir: &Path, name: &str, prefix: &str, len: usize, fill: u8, suffix: &str) -> PathBuf {
    let mut content = Vec::with_capacity(prefix.len() + len + suffix.len());
    content.extend_from_slice(prefix.as_bytes());
    content.resize(prefix.len() + len, fill);
    content.extend_from_slice(suffix.as_bytes());
    write(dir, name, content)
}

fn forced(format: Format) -> LoadOptions {
    LoadOptions {
        format: Some(format),
        ..cols("a", "b", None)
    }
}

#[test]
fn every_format_refuses_a_line_over_the_limit() {
    let d = tmp();
    let too_long = MAX_LINE_BYTES + 1;
    let cases: [(&str, &str, LoadOptions); 8] = [
        ("u.data", "1\t2\t3\t4\n", forced(Format::MovieLens)),
        ("u.dat", "1::2::3::4\n", forced(Format::MovieLensDat)),
        (
            "ratings.csv",
            "userId,movieId,rating,timestamp\n",
            forced(Format::MovieLensCsv),
        ),
        (
            "retail.csv",
            "InvoiceNo,StockCode,Quantity,InvoiceDate,CustomerID\n",
            forced(Format::Retail),
        ),
        ("cols.csv", "a,b\n", forced(Format::Columns)),
        ("seq.txt", "u 1 2\n", forced(Format::Sequences)),
        // Detected from the first line, then the long second line.
        ("detected.data", "1\t2\t3\t4\n", no_opts()),
        ("detected.csv", "a,b\n", cols("a", "b", None)),
    ];
    for (name, first, opts) in cases {
        let p = long_file(d.path(), name, first, too_long, b'7', "\n1\n");
        let msg = err(&p, &opts);
        let expected = format!(
            "{name}:2: line is longer than {MAX_LINE_BYTES} bytes, the longest the loader accepts"
        );
        assert!(msg.contains(&expected), "{name}: {msg}");
    }
    // A long first line, detected or forced.
    let p = long_file(d.path(), "first.csv", "", too_long, b'x', "\n");
    for opts in [no_opts(), cols("a", "b", None), forced(Format::Columns)] {
        let msg = err(&p, &opts);
        assert!(msg.contains("first.csv:1: line is longer than"), "{msg}");
        assert!(detect(&p, &opts).is_err() || opts.format.is_some());
    }
    // Line 3 of the lines read to recognise sequences.
    let p = long_file(
        d.path(),
        "sniff.txt",
        "u1 a b\nu2 a\n",
        too_long,
        b'x',
        "\n",
    );
    let msg = detect(&p, &no_opts()).err().unwrap_or_default();
    assert!(msg.contains("sniff.txt:3: line is longer than"), "{msg}");
}

#[test]
fn a_line_at_the_limit_is_accepted() {
    let d = tmp();
    // A one-field CSV whose second line is MAX_LINE_BYTES long with its `\r`.
    let p = long_file(
        d.path(),
        "edge.csv",
        "u\r\n",
        MAX_LINE_BYTES - 1,
        b'i',
        "\r\n",
    );
    let opts = LoadOptions {
        format: Some(Format::Columns),
        ..cols("u", "u", None)
    };
    let ds = ok(&p, &opts);
    assert_eq!(
        ds.item_ids.first().map(String::len),
        Some(MAX_LINE_BYTES - 1)
    );
}

#[test]
fn a_csv_record_over_the_limit_across_lines_is_refused() {
    let d = tmp();
    // An unterminated quote: many short lines, one record.
    let mut content = String::from("a,b\nu,\"open\n");
    let line = "0123456789abcdef0123456789abcdef\n";
    while content.len() <= MAX_LINE_BYTES + (1 << 17) {
        content.push_str(line);
    }
    let p = write(d.path(), "quote.csv", content);
    let msg = err(&p, &cols("a", "b", None));
    assert!(
        msg.contains("quote.csv:2: CSV record starting on this line is longer than"),
        "{msg}"
    );
    assert!(msg.contains("quote left open"), "{msg}");
}

#[test]
fn a_long_sequence_fits() {
    let d = tmp();
    // 100,000 items of 10 characters: about 1.1 MB on one line.
    let mut line = String::from("user");
    for i in 0..100_000u32 {
        line.push_str(&format!(" item{i:06}"));
    }
    assert!(line.len() > 1_100_000 && line.len() < MAX_LINE_BYTES);
    let p = write(d.path(), "long.txt", format!("{line}\nother a b c\n"));
    let ds = ok(&p, &no_opts());
    assert_eq!((ds.n_users(), ds.n_items()), (2, 100_003));
    assert_eq!(ds.interactions.len(), 100_003);
}

/// `/dev/zero` has no line break: the loader stops after one line's worth.
#[cfg(target_os = "linux")]
#[test]
fn dev_zero_ends_with_the_line_limit() {
    let p = Path::new("/dev/zero");
    for opts in [forced(Format::MovieLens), no_opts(), {
        LoadOptions {
            format: Some(Format::Columns),
            ..cols("a", "b", None)
        }
    }] {
        let msg = err(p, &opts);
        assert!(
            msg.starts_with("/dev/zero:1: line is longer than"),
            "{opts:?}: {msg}"
        );
    }
}

// ---------------------------------------------------------------- Real data

/// Loads the real data sets when present; run with
/// `cargo test --release -- --ignored --nocapture real_data`.
#[test]
#[ignore]
fn real_data() {
    let ml = Path::new("/work/shared/data/ml-100k/u.data");
    if ml.exists() {
        let start = std::time::Instant::now();
        let ds = ok(ml, &no_opts());
        println!(
            "ml-100k: {} users, {} items, {} interactions in {:?}",
            ds.n_users(),
            ds.n_items(),
            ds.interactions.len(),
            start.elapsed()
        );
        assert_eq!(
            (ds.n_users(), ds.n_items(), ds.interactions.len()),
            (943, 1682, 100_000)
        );
        let dir = Path::new("/work/shared/data/ml-100k");
        assert_eq!(ok(dir, &no_opts()).interactions.len(), 100_000);
    }
    let amazon = Path::new("/work/shared/data/amazon-toys-5core");
    if amazon.exists() {
        let start = std::time::Instant::now();
        assert_eq!(detect(amazon, &no_opts()), Ok(Format::Sequences));
        let ds = ok(amazon, &no_opts());
        println!(
            "amazon-toys-5core: {} users, {} items, {} interactions in {:?}",
            ds.n_users(),
            ds.n_items(),
            ds.interactions.len(),
            start.elapsed()
        );
        assert!(!ds.timed);
        assert_eq!(
            (ds.n_users(), ds.n_items(), ds.interactions.len()),
            (19_412, 11_924, 167_597)
        );
    }
    let retail = Path::new("/work/shared/data/online-retail");
    if retail.exists() {
        let start = std::time::Instant::now();
        let ds = ok(retail, &no_opts());
        let elapsed = start.elapsed();
        println!(
            "online-retail: {} users, {} items, {} interactions, skipped {:?} in {elapsed:?}",
            ds.n_users(),
            ds.n_items(),
            ds.interactions.len(),
            ds.skipped
        );
        let protocol = crate::data::Protocol::new(&ds);
        for ev in &protocol.evaluations {
            println!(
                "online-retail {} {}: {} users, {} skipped",
                ev.track,
                ev.stage.name(),
                ev.n_users(),
                ev.skipped_users
            );
        }
    }
}
