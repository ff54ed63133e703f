//! Devices over real loopback gRPC: what they send, and drop-outs.

mod common;

use std::sync::{Arc, Mutex};

use fedrec_client::participant::Participant;
use fedrec_proto::codec::Encoding;
use fedrec_proto::pb;
use prost::Message;

type Recorded = Arc<Mutex<Vec<(&'static str, Vec<u8>)>>>;

/// Every message a device sends is recorded; none may carry the device's
/// purchases (item ids), its user id, or its private embedding, and every
/// update has the same size whatever the history (dense).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_carries_purchases_or_the_private_embedding() {
    what_devices_send(Encoding::F32).await;
}

/// The same with compressed uploads (`upload.encoding = "q8"`): devices
/// send q8 updates, of the q8 size, and the rounds complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_uploads_carry_no_purchases_and_shrink_updates() {
    what_devices_send(Encoding::Q8).await;
}

async fn what_devices_send(upload: Encoding) {
    let (ds, split) = common::small_split(20, 60, 4);
    let model = common::model(ds.n_items(), 8);
    let mut cfg = fedrec::sim::default_coordinator_config();
    cfg.rounds.rounds = 3;
    cfg.rounds.clients_per_round = 10;
    cfg.upload.encoding = upload;
    let running = common::start(cfg, &model, 1).await;
    let devices = common::devices(&model, &split, 7);
    let num_values = model.layout().num_values();
    let mut tasks = tokio::task::JoinSet::new();
    for (user, device) in devices {
        let channel = common::channel(&running).await;
        let log: Recorded = Arc::default();
        let sink = Arc::clone(&log);
        let recorder = Box::new(move |kind: &'static str, bytes: &[u8]| {
            sink.lock().unwrap().push((kind, bytes.to_vec()));
        });
        tasks.spawn(async move {
            let mut p = Participant::join(channel, Some(recorder))
                .await
                .expect("join");
            let (device, summary) = p.run(device).await.expect("participate");
            (user, device, summary, log)
        });
    }
    let mut trained = 0;
    while let Some(joined) = tokio::time::timeout(common::TIMEOUT, tasks.join_next())
        .await
        .expect("devices finish")
    {
        let (user, device, summary, log) = joined.expect("device task");
        trained += summary.trained;
        let log = log.lock().unwrap();
        assert!(!log.is_empty());
        // Secrets of this device, as they could appear on the wire.
        let mut secrets: Vec<Vec<u8>> = Vec::new();
        for &item in device.store().items() {
            secrets.push(ds.item_ids[item as usize].as_bytes().to_vec());
        }
        secrets.push(ds.user_ids[user].as_bytes().to_vec());
        let p = device.private_embedding();
        for pair in p.windows(2) {
            let mut b = pair[0].to_le_bytes().to_vec();
            b.extend_from_slice(&pair[1].to_le_bytes());
            secrets.push(b);
        }
        let mut update_bytes_per_round: std::collections::BTreeMap<u32, usize> = Default::default();
        let mut round = 0;
        for (kind, bytes) in log.iter() {
            for s in &secrets {
                assert!(
                    !bytes.windows(s.len()).any(|w| w == s.as_slice()),
                    "{kind} carries a secret of user {user}"
                );
            }
            // Every message decodes as one of the protocol's request types.
            match *kind {
                "JoinRequest" => drop(pb::JoinRequest::decode(bytes.as_slice()).unwrap()),
                "CheckInRequest" => drop(pb::CheckInRequest::decode(bytes.as_slice()).unwrap()),
                "ModelRequest" => drop(pb::ModelRequest::decode(bytes.as_slice()).unwrap()),
                "EvaluationReport" => drop(pb::EvaluationReport::decode(bytes.as_slice()).unwrap()),
                "UploadReservation" => drop(pb::UpdateHeader::decode(bytes.as_slice()).unwrap()),
                "UpdateChunk" => match pb::UpdateChunk::decode(bytes.as_slice()).unwrap().part {
                    Some(pb::update_chunk::Part::Header(h)) => round = h.round,
                    Some(pb::update_chunk::Part::Values(v)) => {
                        assert_eq!(upload, Encoding::F32, "f32 updates travel as plain values");
                        *update_bytes_per_round.entry(round).or_default() += v.len()
                    }
                    Some(pb::update_chunk::Part::Encoded(run)) => {
                        assert_eq!(run.encoding, upload.to_pb() as i32);
                        let q8 = run.q8.map_or(0, |q| 4 * (q.min.len() + q.scale.len()));
                        *update_bytes_per_round.entry(round).or_default() += run.values.len() + q8
                    }
                    None => panic!("empty update chunk"),
                },
                other => panic!("unexpected message kind {other}"),
            }
        }
        for (round, bytes) in update_bytes_per_round {
            assert_eq!(
                bytes,
                upload.upload_wire_bytes(num_values),
                "round {round}: updates are dense, whatever was bought"
            );
        }
    }
    assert_eq!(trained, 30, "3 rounds of 10 devices");
    running.stop().await;
}

/// A selected device that disappears mid-round does not stall the round:
/// it completes at its deadline with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_dropping_out_does_not_stall_the_round() {
    let (ds, split) = common::small_split(3, 40, 8);
    let model = common::model(ds.n_items(), 8);
    let mut cfg = fedrec::sim::default_coordinator_config();
    cfg.rounds.rounds = 1;
    cfg.rounds.clients_per_round = 4;
    cfg.rounds.min_updates = 3;
    cfg.rounds.deadline_secs = 2.0;
    cfg.rounds.final_evaluation = false;
    let running = common::start(cfg, &model, 1).await;

    // The device that will vanish: joins, gets its task, then goes away.
    let mut raw = pb::coordinator_client::CoordinatorClient::new(common::channel(&running).await);
    let pseudonym = raw
        .join(pb::JoinRequest {
            protocol_version: fedrec_proto::PROTOCOL_VERSION,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    let vanishing = tokio::spawn(async move {
        loop {
            let resp = raw
                .check_in(pb::CheckInRequest {
                    pseudonym: pseudonym.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if let Some(pb::check_in_response::Outcome::Task(task)) = resp.outcome {
                return task.round; // and never submits: the connection is dropped here
            }
        }
    });

    let mut tasks = tokio::task::JoinSet::new();
    for (_, device) in common::devices(&model, &split, 3) {
        let channel = common::channel(&running).await;
        tasks.spawn(async move {
            let mut p = Participant::join(channel, None).await.expect("join");
            p.run(device).await.expect("participate").1
        });
    }
    assert_eq!(
        tokio::time::timeout(common::TIMEOUT, vanishing)
            .await
            .unwrap()
            .unwrap(),
        1
    );
    while let Some(done) = tokio::time::timeout(common::TIMEOUT, tasks.join_next())
        .await
        .expect("devices finish")
    {
        assert_eq!(done.unwrap().trained, 1);
    }
    let history = running.handle.progress().history;
    assert_eq!(history.len(), 1);
    assert!(
        history[0].completed,
        "round completes without the silent device: {:?}",
        history[0]
    );
    assert_eq!((history[0].selected, history[0].participants), (4, 3));
    running.stop().await;
}

/// A coordinator that crashes and comes back without the devices' sessions
/// (no checkpoint): the same device tasks reconnect, find their pseudonyms
/// unknown, join again and take part in every round of the new coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_reconnect_and_join_again_after_a_coordinator_restart() {
    use fedrec_coordinator::round::TaskKind;
    let (_, split) = common::small_split(3, 40, 11);
    let model = common::model(40, 4);
    let mut cfg = fedrec::sim::default_coordinator_config();
    cfg.rounds.rounds = 3;
    cfg.rounds.clients_per_round = 3;
    cfg.rounds.min_updates = 3;
    let first = common::start(cfg.clone(), &model, 1).await;
    let proxy = common::Proxy::start(first.addr).await;
    let mut tasks = tokio::task::JoinSet::new();
    for (_, device) in common::devices(&model, &split, 3) {
        let endpoint = proxy.endpoint();
        tasks.spawn(async move {
            let mut p = Participant::connect(&endpoint).await.expect("join");
            p.run(device).await.expect("participate").1
        });
    }
    let mut progress = first.handle.subscribe();
    common::within(
        "the first round",
        progress.wait_for(|p| p.history.iter().any(|s| s.completed)),
    )
    .await
    .expect("progress");
    first.crash();
    let second = common::start(cfg, &model, 1).await;
    proxy.redirect(second.addr);
    while let Some(done) = common::within("devices finish", tasks.join_next()).await {
        let summary = done.expect("device task");
        assert!(summary.rejoins >= 1, "{summary:?}");
        // The first coordinator's first round (its acknowledgement may
        // have been cut by the crash: then the task counts as interrupted),
        // then all three of the second's (each needs every device).
        assert!(summary.trained >= 3, "{summary:?}");
        assert!(summary.trained + summary.interrupted >= 4, "{summary:?}");
        assert!(!summary.finished_reason.is_empty(), "{summary:?}");
    }
    let progress = second.handle.progress();
    let trained = progress
        .history
        .iter()
        .filter(|s| s.kind == TaskKind::Train && s.completed)
        .count();
    assert_eq!(trained, 3, "{:?}", progress.history);
    assert!(progress.finished.is_some());
    second.stop().await;
}
