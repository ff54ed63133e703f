//! `fedrec devices`: a fleet split over two processes against one
//! coordinator, and a fleet that cannot reach its coordinator.

use std::process::{Command, Stdio};

use common::process::{expect_line, gen_data_sized, start_serve};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_fedrec");

fn devices(url: &str, data: &std::path::Path, users: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["devices", "--coordinator", url, "--users", users, "--data"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// Two `fedrec devices` processes, each with half of the users, train with
/// one coordinator to the end; each reports every one of its devices, and
/// the halves make the whole fleet.
#[test]
fn two_processes_of_devices_train_with_one_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ds) = gen_data_sized(dir.path(), 12, 40);
    let (_serve, lines, addr, _) = start_serve(&[
        "--items",
        "40",
        "--rounds",
        "2",
        "--clients-per-round",
        "12",
        "--min-updates",
        "2",
        "--factors",
        "8",
    ]);
    let url = format!("http://{addr}");
    let halves: Vec<_> = ["1/2", "2/2"]
        .iter()
        .enumerate()
        .map(|(i, users)| {
            let report = dir.path().join(format!("devices-{i}.json"));
            let child = devices(&url, &data, users)
                .arg("--report")
                .arg(&report)
                .spawn()
                .unwrap();
            (child, report)
        })
        .collect();
    expect_line(&lines, "training finished");
    let mut users = Vec::new();
    for (child, report) in halves {
        let out = common::wait_output(child, common::TIMEOUT);
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        assert!(said.contains("6 devices: 6 finished, 0 failed"), "{said}");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(json["totals"]["failed"], 0, "{json}");
        let devices = json["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 6, "{json}");
        for device in devices {
            assert!(device["trained"].as_u64().unwrap() >= 1, "{device}");
            assert!(device["finished"].is_string(), "{device}");
            users.push(device["user"].as_str().unwrap().to_owned());
        }
    }
    users.sort();
    let mut all = ds.user_ids.clone();
    all.sort();
    assert_eq!(users, all, "the two halves are the whole fleet, once");
}

/// Devices that cannot reach their coordinator fail, each says why, and
/// the process exits non-zero with the count.
#[test]
fn devices_that_cannot_reach_the_coordinator_fail_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = gen_data_sized(dir.path(), 4, 40);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let child = devices(&url, &data, "0..2").spawn().unwrap();
    let out = common::wait_output(child, common::TIMEOUT);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("2 of 2 devices failed"), "{said}");
    assert!(said.contains("cannot connect"), "{said}");
}

/// One enrollment token for a whole fleet is refused (the devices would
/// end each other's sessions); a per-device token that is missing is named
/// before any device starts.
#[test]
fn devices_need_a_token_each() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = gen_data_sized(dir.path(), 4, 40);
    let token = dir.path().join("one.token");
    std::fs::write(&token, "secret\n").unwrap();
    let url = "http://127.0.0.1:9";
    let out = devices(url, &data, "0..2")
        .arg("--token-file")
        .arg(&token)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("--token-dir"), "{said}");

    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    std::fs::write(tokens.join("device-1.token"), "secret-1\n").unwrap();
    let out = devices(url, &data, "0..2")
        .arg("--token-dir")
        .arg(&tokens)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("device-2.token"), "{said}");
}
