//! The coordinator over real loopback gRPC: a server on 127.0.0.1:0, devices
//! as generated tonic clients, shutdown through a oneshot. Every wait is
//! bounded by a timeout; nothing sleeps to wait.

mod common;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

use fedrec_coordinator::{CoordinatorConfig, DOWNLOAD_CHUNK_BYTES, RoundCore, ServeOptions};
use fedrec_proto::codec::{EncodedModel, Encoding, ModelAssembler, Q8_BLOCK};
use fedrec_proto::pb::coordinator_client::CoordinatorClient;
use fedrec_proto::pb::{self, check_in_response::Outcome, update_chunk::Part};
use fedrec_proto::{DEFAULT_CHUNK_BYTES, Layout, PROTOCOL_VERSION, tensor};

fn config(clients_per_round: usize, rounds: u32) -> CoordinatorConfig {
    let mut config = CoordinatorConfig::default();
    config.rounds.clients_per_round = clients_per_round;
    config.rounds.rounds = rounds;
    config.rounds.evaluate = false;
    config.rounds.final_evaluation = false;
    config.rounds.seed = Some(5);
    config
}

async fn join(client: &mut CoordinatorClient<Channel>) -> String {
    let response = client
        .join(pb::JoinRequest {
            protocol_version: PROTOCOL_VERSION,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.protocol_version, PROTOCOL_VERSION);
    // Sessions expire without enrollment tokens too (issue 19, item 4).
    assert!(response.session_ttl_secs > 0, "{response:?}");
    response.pseudonym
}

async fn check_in(
    mut client: CoordinatorClient<Channel>,
    pseudonym: String,
) -> Result<Outcome, tonic::Status> {
    let response = client.check_in(pb::CheckInRequest { pseudonym }).await?;
    Ok(response.into_inner().outcome.expect("check-in outcome"))
}

/// Checks `devices` in concurrently (long polls) and returns their tasks.
async fn tasks(client: &CoordinatorClient<Channel>, devices: &[String]) -> Vec<pb::Task> {
    let polls: Vec<_> = devices
        .iter()
        .map(|d| tokio::spawn(check_in(client.clone(), d.clone())))
        .collect();
    let mut tasks = Vec::new();
    for poll in polls {
        match common::within("check-in", poll).await.unwrap().unwrap() {
            Outcome::Task(task) => tasks.push(task),
            other => panic!("expected a task, got {other:?}"),
        }
    }
    tasks
}

async fn download(
    client: &mut CoordinatorClient<Channel>,
    pseudonym: &str,
    task: &pb::Task,
) -> Result<(Vec<pb::TensorSpec>, Vec<f32>, usize), tonic::Status> {
    let mut stream = client
        .download_model(pb::ModelRequest {
            pseudonym: pseudonym.to_owned(),
            round: task.round,
            model_version: task.model_version,
        })
        .await?
        .into_inner();
    let mut layout = Vec::new();
    let mut bytes = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = common::within("model chunk", stream.message()).await? {
        if chunks == 0 {
            layout = chunk.layout;
        } else {
            assert!(chunk.layout.is_empty(), "layout only in the first chunk");
        }
        assert_eq!(chunk.model_version, task.model_version);
        assert_eq!(
            chunk.offset as usize,
            bytes.len() / 4,
            "chunks arrive in order"
        );
        bytes.extend_from_slice(&chunk.values);
        chunks += 1;
    }
    Ok((layout, tensor::decode(&bytes).unwrap(), chunks))
}

fn header(
    pseudonym: &str,
    task: &pb::Task,
    num_examples: u64,
    num_values: u64,
) -> pb::UpdateHeader {
    pb::UpdateHeader {
        pseudonym: pseudonym.to_owned(),
        round: task.round,
        model_version: task.model_version,
        num_examples,
        num_values,
        evaluation: None,
    }
}

/// Uploads a header (if any) and then `values` in chunks.
async fn upload(
    client: &mut CoordinatorClient<Channel>,
    header: Option<pb::UpdateHeader>,
    values: Bytes,
) -> Result<pb::UpdateAck, tonic::Status> {
    let mut messages: Vec<pb::UpdateChunk> = header
        .map(|h| pb::UpdateChunk {
            part: Some(Part::Header(h)),
        })
        .into_iter()
        .collect();
    messages.extend(
        tensor::chunks(&values, DEFAULT_CHUNK_BYTES).map(|(_, chunk)| pb::UpdateChunk {
            part: Some(Part::Values(chunk)),
        }),
    );
    common::within("upload", client.submit_update(tokio_stream::iter(messages)))
        .await
        .map(tonic::Response::into_inner)
}

fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("request should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} should mention {needle:?}",
        status.message()
    );
}

#[tokio::test]
async fn full_round_with_a_large_model_in_chunks() {
    const ROWS: u64 = 500_000;
    let layout = Layout::new(vec![("item_factors".into(), vec![ROWS, 3])]);
    let n = layout.num_values();
    assert_eq!(n, 1_500_000);
    let params: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.25 - 100.0).collect();
    let server = common::serve(config(2, 1), layout.clone(), params.clone()).await;
    let mut progress = server.handle.subscribe();
    let mut client = server.client().await;
    let devices = vec![join(&mut client).await, join(&mut client).await];

    // Both long-poll; the second check-in fills the cohort and wakes the first.
    let tasks = tasks(&client, &devices).await;
    for task in &tasks {
        assert_eq!(
            (task.round, task.model_version, task.kind),
            (1, 1, pb::TaskKind::Train as i32)
        );
        assert!(task.deadline_ms > 0 && task.deadline_ms <= 60_000);
        let training = task.training.unwrap();
        assert_eq!(training.local_epochs, 5);
        assert!(!training.evaluate);
    }

    // A 6 MB model arrives in 256 KiB chunks and reassembles exactly.
    let (specs, values, chunks) = download(&mut client, &devices[0], &tasks[0]).await.unwrap();
    assert_eq!(Layout::from_pb(&specs), layout);
    assert_eq!(chunks, (n * 4).div_ceil(DOWNLOAD_CHUNK_BYTES));
    assert!(chunks > 4);
    assert_eq!(values, params);

    // Updates go up in chunks too: weights 1 and 3, mean (1·1 + 3·(-0.5)) / 4 = -0.125.
    let ack = upload(
        &mut client,
        Some(header(&devices[0], &tasks[0], 1, n as u64)),
        tensor::encode(&vec![1.0; n]),
    )
    .await
    .unwrap();
    assert_eq!((ack.round, ack.accepted), (1, 1));
    let ack = upload(
        &mut client,
        Some(header(&devices[1], &tasks[1], 3, n as u64)),
        tensor::encode(&vec![-0.5; n]),
    )
    .await
    .unwrap();
    assert_eq!((ack.round, ack.accepted), (1, 2));

    let reason = common::within("finish", server.handle.finished()).await;
    assert!(reason.contains("1 training rounds"), "{reason}");
    let latest = common::within("progress", progress.wait_for(|p| p.finished.is_some()))
        .await
        .unwrap()
        .clone();
    assert_eq!(latest.history.len(), 1);
    assert!(latest.history[0].completed);
    assert_eq!(latest.status.model_version, 2);

    let model = server.handle.model().unwrap();
    assert_eq!(model.version, 2);
    let expected: Vec<f32> = params.iter().map(|p| p - 0.125).collect();
    assert_eq!(model.params, expected);

    let status = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            status.round,
            status.model_version,
            status.finished,
            status.devices
        ),
        (1, 2, true, 2)
    );
    assert_eq!(status.rounds.len(), 1);
    let summary = &status.rounds[0];
    assert!(summary.completed);
    assert_eq!(
        (
            summary.participants,
            summary.selected,
            summary.model_version
        ),
        (2, 2, 2)
    );

    // The old version is gone; the new one downloads.
    let stale = download(&mut client, &devices[0], &tasks[0]).await;
    assert_status(stale, Code::FailedPrecondition, "current version is 2");
    let next = pb::Task {
        model_version: 2,
        ..tasks[0]
    };
    let (_, values, _) = download(&mut client, &devices[0], &next).await.unwrap();
    assert_eq!(values, expected);

    match common::within("check-in", check_in(client.clone(), devices[0].clone()))
        .await
        .unwrap()
    {
        Outcome::Finished(f) => assert!(f.reason.contains("training rounds")),
        other => panic!("expected Finished, got {other:?}"),
    }
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_get_the_right_status() {
    let layout = Layout::new(vec![("item_bias".into(), vec![4])]);
    let server = common::serve(config(2, 0), layout, vec![1.0, 2.0, 3.0, 4.0]).await;
    let mut client = server.client().await;

    let err = client
        .join(pb::JoinRequest {
            protocol_version: 99,
            ..Default::default()
        })
        .await;
    assert_status(err, Code::FailedPrecondition, "protocol version 99");
    let err = check_in(client.clone(), "not-a-pseudonym".to_owned()).await;
    assert_status(err, Code::Unauthenticated, "unknown pseudonym");
    let err = check_in(client.clone(), "0".repeat(32)).await;
    assert_status(err, Code::Unauthenticated, "unknown pseudonym");

    let devices = vec![join(&mut client).await, join(&mut client).await];
    let outsider = join(&mut client).await;
    let tasks = tasks(&client, &devices).await;
    let (a, b) = (&devices[0], &devices[1]);
    let task = tasks[0];
    let good = tensor::encode(&[1.0, 1.0, 1.0, 1.0]);

    let wrong_version = pb::Task {
        model_version: 5,
        ..task
    };
    assert_status(
        download(&mut client, a, &wrong_version).await,
        Code::FailedPrecondition,
        "model version 5",
    );
    assert_status(
        download(&mut client, "ff", &task).await,
        Code::Unauthenticated,
        "unknown pseudonym",
    );

    let cases: Vec<(Option<pb::UpdateHeader>, Bytes, Code, &str)> = vec![
        (
            Some(header(&outsider, &task, 1, 4)),
            good.clone(),
            Code::PermissionDenied,
            "not in the cohort of round 1",
        ),
        (
            Some(header("nobody", &task, 1, 4)),
            good.clone(),
            Code::Unauthenticated,
            "unknown pseudonym",
        ),
        (
            None,
            good.clone(),
            Code::InvalidArgument,
            "first message of an upload must be its header",
        ),
        (
            Some(header(a, &task, 1, 5)),
            good.clone(),
            Code::InvalidArgument,
            "announces 5 values, but the model has 4",
        ),
        (
            Some(pb::UpdateHeader {
                round: 2,
                ..header(a, &task, 1, 4)
            }),
            good.clone(),
            Code::FailedPrecondition,
            "update is for round 2, but round 1 is open",
        ),
        (
            Some(pb::UpdateHeader {
                model_version: 3,
                ..header(a, &task, 1, 4)
            }),
            good.clone(),
            Code::FailedPrecondition,
            "model version 3",
        ),
        (
            Some(header(a, &task, 0, 4)),
            good.clone(),
            Code::InvalidArgument,
            "num_examples must be >= 1, got 0",
        ),
        (
            Some(header(a, &task, 1, 4)),
            tensor::encode(&[1.0, f32::NAN, 1.0, 1.0]),
            Code::InvalidArgument,
            "index 1 is not finite (NaN)",
        ),
        (
            Some(header(a, &task, 1, 4)),
            tensor::encode(&[1.0, 1.0, 1.0, f32::INFINITY]),
            Code::InvalidArgument,
            "index 3 is not finite (inf)",
        ),
        (
            Some(header(a, &task, 1, 4)),
            good.slice(..15),
            Code::InvalidArgument,
            "15 bytes",
        ),
        (
            Some(header(a, &task, 1, 4)),
            good.slice(..12),
            Code::InvalidArgument,
            "expected 4 values, got 3",
        ),
        (
            Some(header(a, &task, 1, 4)),
            tensor::encode(&[1.0; 5]),
            Code::ResourceExhausted,
            "20 bytes received, at most 16 allowed",
        ),
    ];
    for (header, values, code, needle) in cases {
        assert_status(upload(&mut client, header, values).await, code, needle);
    }

    // An evaluation report is the wrong kind of result in a training round.
    let report = pb::EvaluationReport {
        pseudonym: b.clone(),
        round: 1,
        model_version: 1,
        counts: Some(pb::EvaluationCounts::default()),
    };
    assert_status(
        client.submit_evaluation(report.clone()).await,
        Code::FailedPrecondition,
        "training round",
    );
    let no_counts = pb::EvaluationReport {
        counts: None,
        ..report
    };
    assert_status(
        client.submit_evaluation(no_counts).await,
        Code::InvalidArgument,
        "without counts",
    );

    // After all that, good updates still count; a second one is a duplicate.
    assert_eq!(
        upload(&mut client, Some(header(a, &task, 1, 4)), good.clone())
            .await
            .unwrap()
            .accepted,
        1
    );
    assert_status(
        upload(&mut client, Some(header(a, &task, 1, 4)), good.clone()).await,
        Code::AlreadyExists,
        "already submitted for round 1",
    );
    let mut progress = server.handle.subscribe();
    upload(
        &mut client,
        Some(header(b, &tasks[1], 1, 4)),
        tensor::encode(&[3.0; 4]),
    )
    .await
    .unwrap();
    let history = common::within("round end", progress.wait_for(|p| !p.history.is_empty()))
        .await
        .unwrap()
        .history
        .clone();
    assert!(history[0].completed);
    let model = server.handle.model().unwrap();
    assert_eq!(model.params, vec![3.0, 4.0, 5.0, 6.0]);

    let rejections = server
        .handle
        .with_core(|core| core.rejections().clone())
        .unwrap();
    for (reason, count) in [
        ("protocol_version", 1),
        ("unknown_pseudonym", 4),
        ("wrong_model_version", 2),
        ("not_in_cohort", 1),
        ("malformed", 2),
        ("wrong_num_values", 1),
        ("wrong_round", 1),
        ("zero_examples", 1),
        ("not_finite", 2),
        ("misaligned", 1),
        ("wrong_length", 1),
        ("too_large", 1),
        ("wrong_task_kind", 1),
        ("duplicate", 1),
    ] {
        assert_eq!(
            rejections.get(reason),
            Some(&count),
            "{reason}: {rejections:?}"
        );
    }
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn check_in_long_poll_times_out_with_wait() {
    let mut config = config(2, 0);
    config.server.long_poll_secs = 0.2;
    let server = common::serve(config, Layout::new(vec![("b".into(), vec![1])]), vec![0.0]).await;
    let mut client = server.client().await;
    let device = join(&mut client).await;
    // A second device has joined but does not check in: the one waiting
    // cannot fill the cohort of 2, and the long poll ends in Wait.
    let _absent = join(&mut client).await;
    match common::within("long poll", check_in(client.clone(), device))
        .await
        .unwrap()
    {
        Outcome::Wait(wait) => assert_eq!(wait.retry_after_ms, 0),
        other => panic!("expected Wait, got {other:?}"),
    }
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn the_driver_ends_a_round_at_its_deadline_without_any_request() {
    let mut config = config(2, 0);
    config.rounds.deadline_secs = 0.3;
    let server = common::serve(
        config,
        Layout::new(vec![("b".into(), vec![2])]),
        vec![0.0, 0.0],
    )
    .await;
    let mut client = server.client().await;
    let devices = vec![join(&mut client).await, join(&mut client).await];
    let tasks = tasks(&client, &devices).await;
    let mut progress = server.handle.subscribe();
    upload(
        &mut client,
        Some(header(&devices[0], &tasks[0], 2, 2)),
        tensor::encode(&[0.5, -0.5]),
    )
    .await
    .unwrap();
    // The other device stays silent; the driver closes the round at its deadline.
    let history = common::within("deadline", progress.wait_for(|p| !p.history.is_empty()))
        .await
        .unwrap()
        .history
        .clone();
    assert!(history[0].completed);
    assert_eq!((history[0].selected, history[0].participants), (2, 1));
    assert_eq!(server.handle.model().unwrap().params, vec![0.5, -0.5]);
    // The silent device is now too late.
    assert_status(
        upload(
            &mut client,
            Some(header(&devices[1], &tasks[1], 1, 2)),
            tensor::encode(&[1.0, 1.0]),
        )
        .await,
        Code::FailedPrecondition,
        "round 1 is closed",
    );
    drop(client);
    server.stop().await;
}

#[tokio::test]
async fn serve_function_runs_until_shutdown() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let core = RoundCore::new(
        config(1, 0).validated().unwrap(),
        Layout::new(vec![("b".into(), vec![1])]),
        vec![0.0],
    )
    .unwrap();
    let (stop, signal) = oneshot::channel::<()>();
    let server = tokio::spawn(fedrec_coordinator::serve(
        listener,
        core,
        ServeOptions::default(),
        async {
            let _ = signal.await;
        },
    ));
    let mut client = common::within(
        "connect",
        CoordinatorClient::connect(format!("http://{addr}")),
    )
    .await
    .unwrap();
    let status = client
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status.round, status.model_version, status.finished),
        (0, 1, false)
    );
    drop(client);
    // The standard gRPC health service answers for the server and for the
    // coordinator service.
    let channel = common::within(
        "connect",
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "fedrec.v1.Coordinator"] {
        let answer = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
            .into_inner();
        assert_eq!(
            answer.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    drop(health);
    stop.send(()).unwrap();
    common::within("shutdown", server).await.unwrap().unwrap();
}

/// Joins beyond `server.joins_per_minute_per_source` from one address are
/// refused with RESOURCE_EXHAUSTED, a message naming the limit, and counted
/// (from loopback only with `server.join_limit_loopback`; the limiter's own
/// test covers other addresses and the loopback exemption).
#[tokio::test]
async fn joins_beyond_the_rate_limit_are_refused_and_counted() {
    let mut cfg = config(1, 0);
    cfg.server.joins_per_minute_per_source = 3;
    cfg.server.join_limit_loopback = true;
    let running = common::serve(cfg, Layout::new(vec![("b".into(), vec![1])]), vec![0.0]).await;
    let mut client = running.client().await;
    let request = || pb::JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        ..Default::default()
    };
    for _ in 0..3 {
        client.join(request()).await.unwrap();
    }
    let refused = client.join(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("3 per minute"), "{refused:?}");
    let metrics = running.handle.metrics().unwrap();
    assert!(
        metrics.contains("fedrec_requests_rejected_total{reason=\"join_rate_limited\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("fedrec_devices_joined 3"), "{metrics}");
    drop(client);
    running.stop().await;
}

/// Under `auth.enrollment_tokens`, a join without a token or with an
/// unknown one gets UNAUTHENTICATED and is counted by reason; a device
/// with a valid token joins and is told how long its session lasts. A
/// device of the SDK with its token joins through `connect_with`, which
/// ends the first session of that token (`session_replaced`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_need_an_enrolled_token_and_refusals_are_counted() {
    use fedrec_coordinator::auth::TokenSet;
    let mut cfg = config(1, 0);
    cfg.auth.enrollment_tokens = Some("enrollment-tokens.sha256".into());
    cfg.auth.session_ttl_secs = 600.0;
    let layout = Layout::new(vec![("b".into(), vec![1])]);
    let options =
        ServeOptions::default().with_enrollment_tokens(TokenSet::from_tokens(["device-secret"]));
    let running = common::serve_with(cfg.clone(), layout.clone(), vec![0.0], options).await;
    let mut client = running.client().await;
    let join = |token: &str| pb::JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        enrollment_token: token.to_owned(),
    };
    let missing = client.join(join("")).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(
        missing.message().contains("enrollment token"),
        "{missing:?}"
    );
    for _ in 0..2 {
        let unknown = client.join(join("guessed")).await.unwrap_err();
        assert_eq!(unknown.code(), Code::Unauthenticated);
        assert!(unknown.message().contains("not recognised"), "{unknown:?}");
    }
    let joined = client
        .join(join("device-secret"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(joined.session_ttl_secs, 600);
    let options = fedrec_client::connect::ConnectOptions::new().enrollment_token("device-secret");
    fedrec_client::participant::Participant::connect_with(&running.endpoint(), &options)
        .await
        .expect("an SDK device joins with its token");
    // That join with the same token replaced the first session
    // (auth.max_sessions_per_token = 1).
    let replaced = check_in(client.clone(), joined.pseudonym)
        .await
        .unwrap_err();
    assert_eq!(replaced.code(), Code::Unauthenticated);
    assert!(
        replaced.message().contains("replaced by a newer join"),
        "{replaced:?}"
    );
    let metrics = running.handle.metrics().unwrap();
    for expected in [
        "fedrec_requests_rejected_total{reason=\"missing_token\"} 1",
        "fedrec_requests_rejected_total{reason=\"unknown_token\"} 2",
        "fedrec_requests_rejected_total{reason=\"session_replaced\"} 1",
        "fedrec_devices_joined 1",
    ] {
        assert!(metrics.contains(expected), "{expected}: {metrics}");
    }
    running.stop().await;

    // A configuration that asks for tokens without the service being given
    // them refuses to serve rather than admitting everyone.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let core = RoundCore::new(cfg.validated().unwrap(), layout, vec![0.0]).unwrap();
    let service = fedrec_coordinator::CoordinatorService::new(core, ServeOptions::default());
    let err = common::within("serve", service.serve(listener, std::future::pending()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("auth.enrollment_tokens"), "{err}");
}

/// Upload slots are reserved before uploading: with one slot, a second
/// device's reservation waits (and answers "not granted" after the long
/// poll) while the first holds it; the first device's upload uses its
/// reservation, which frees the slot for the second. A header the round
/// would refuse is refused at reservation, before any value is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_slots_are_reserved_before_uploading() {
    let mut cfg = config(2, 1);
    cfg.server.max_concurrent_uploads = 1;
    cfg.server.long_poll_secs = 0.2;
    let values = 3;
    let running = common::serve(cfg, Layout::new(vec![("b".into(), vec![3])]), vec![0.0; 3]).await;
    let mut client = running.client().await;
    let devices = [join(&mut client).await, join(&mut client).await];
    let tasks = tasks(&client, &devices).await;
    assert_status(
        client
            .reserve_upload(header(&devices[0], &tasks[0], 1, 99))
            .await,
        Code::InvalidArgument,
        "values",
    );
    let first = header(&devices[0], &tasks[0], 1, values);
    let second = header(&devices[1], &tasks[1], 1, values);
    let granted = |r: Result<tonic::Response<pb::UploadReservation>, tonic::Status>| {
        r.expect("reservation").into_inner().granted
    };
    assert!(granted(client.reserve_upload(first.clone()).await));
    assert!(
        !granted(client.reserve_upload(second.clone()).await),
        "the only slot is held"
    );
    upload(&mut client, Some(first), tensor::encode(&[1.0; 3]))
        .await
        .expect("the first upload uses its slot");
    assert!(granted(client.reserve_upload(second.clone()).await));
    upload(&mut client, Some(second), tensor::encode(&[3.0; 3]))
        .await
        .expect("the second upload");
    let reason = common::within("the round ends", running.handle.finished()).await;
    assert!(reason.contains("completed 1 training rounds"), "{reason}");
    running.stop().await;
}

/// Stalled uploaders cannot hold the upload slots hostage (issue 19, item
/// 1): as many cohort members as there are slots reserve them, send their
/// header and stop. Each loses its slot once it falls behind
/// `server.upload_min_bytes_per_sec` (after `server.upload_grace_secs`),
/// refused as DEADLINE_EXCEEDED and counted as `upload_stalled`; the honest
/// devices, waiting for a slot meanwhile, upload, their updates are folded
/// in and the round completes. A device that reserves twice gets its one
/// slot again, not a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploaders_lose_their_slots_and_the_round_completes() {
    const STALLED: usize = 2;
    let mut cfg = config(2, 1);
    // Select the stalled devices and 2 honest ones; 2 updates complete the round.
    cfg.rounds.over_selection = 2.0;
    cfg.rounds.deadline_secs = 60.0;
    cfg.server.max_concurrent_uploads = STALLED;
    cfg.server.long_poll_secs = 0.5;
    cfg.server.upload_grace_secs = 0.3;
    cfg.server.upload_min_bytes_per_sec = 10_000_000;
    let running = common::serve(cfg, Layout::new(vec![("b".into(), vec![3])]), vec![0.0; 3]).await;
    let mut client = running.client().await;
    let mut devices = Vec::new();
    for _ in 0..4 {
        devices.push(join(&mut client).await);
    }
    let tasks = tasks(&client, &devices).await;
    let granted = |r: Result<tonic::Response<pb::UploadReservation>, tonic::Status>| {
        r.expect("reservation").into_inner().granted
    };
    let mut stalled = Vec::new();
    for i in 0..STALLED {
        let head = header(&devices[i], &tasks[i], 1, 3);
        assert!(granted(client.reserve_upload(head.clone()).await));
        assert!(
            granted(client.reserve_upload(head.clone()).await),
            "asking again gives the same slot"
        );
        // The header, then nothing more, with the stream left open.
        let messages = tokio_stream::iter(vec![pb::UpdateChunk {
            part: Some(Part::Header(head)),
        }])
        .chain(tokio_stream::pending());
        let mut client = client.clone();
        stalled.push(tokio::spawn(
            async move { client.submit_update(messages).await },
        ));
    }
    let honest: Vec<_> = (STALLED..4)
        .map(|i| {
            let mut client = client.clone();
            let chunks = vec![
                pb::UpdateChunk {
                    part: Some(Part::Header(header(&devices[i], &tasks[i], 1, 3))),
                },
                pb::UpdateChunk {
                    part: Some(Part::Values(tensor::encode(&[i as f32; 3]))),
                },
            ];
            tokio::spawn(async move {
                fedrec_proto::reserve_and_upload(&mut client, chunks, |_| {}).await
            })
        })
        .collect();
    for upload in honest {
        common::within("an honest upload", upload)
            .await
            .unwrap()
            .expect("the honest update is accepted");
    }
    for upload in stalled {
        assert_status(
            common::within("a stalled upload", upload).await.unwrap(),
            Code::DeadlineExceeded,
            "too slow",
        );
    }
    let reason = common::within("the round ends", running.handle.finished()).await;
    assert!(reason.contains("completed 1 training rounds"), "{reason}");
    // The honest updates 2 and 3, weight 1 each.
    assert_eq!(running.handle.model().unwrap().params, vec![2.5; 3]);
    let metrics = running.handle.metrics().unwrap();
    assert!(
        metrics.contains(r#"reason="upload_stalled"} 2"#),
        "{metrics}"
    );
    running.stop().await;
}

/// Downloads `task`'s model as a device decodes it, whatever the encoding;
/// returns the values and the bytes received (values and q8 block parameters).
async fn download_decoded(
    client: &mut CoordinatorClient<Channel>,
    pseudonym: &str,
    task: &pb::Task,
    layout: &Layout,
) -> (Vec<f32>, usize) {
    let mut stream = client
        .download_model(pb::ModelRequest {
            pseudonym: pseudonym.to_owned(),
            round: task.round,
            model_version: task.model_version,
        })
        .await
        .unwrap()
        .into_inner();
    let mut model = ModelAssembler::new(layout.clone());
    let mut bytes = 0;
    while let Some(chunk) = common::within("model chunk", stream.message())
        .await
        .unwrap()
    {
        bytes += chunk.values.len()
            + chunk
                .q8
                .as_ref()
                .map_or(0, |q| 4 * (q.min.len() + q.scale.len()));
        model.add(&chunk).unwrap();
    }
    (model.finish().unwrap(), bytes)
}

/// Checks that `decoded` is within `encoding`'s stated bound of `params`.
fn assert_within_bound(encoding: Encoding, params: &[f32], decoded: &[f32]) {
    if let Some(i) = encoding.first_beyond_bound(params, decoded, Q8_BLOCK) {
        panic!("{encoding}: {} arrived as {}", params[i], decoded[i]);
    }
}

/// Rounds complete with f16 and q8 downloads (chunked, the layout in the
/// first chunk): each version a device decodes is within the encoding's
/// bound of the coordinator's model and equal to what an in-process
/// simulation hands its devices; updates stay f32.
#[tokio::test]
async fn compressed_downloads_complete_rounds_within_the_bound() {
    let layout = Layout::new(vec![
        ("item_factors".into(), vec![20_000, 8]),
        ("item_bias".into(), vec![20_000]),
    ]);
    let n = layout.num_values();
    let params: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.4 + if i % 977 == 0 { 3.0 } else { 0.0 })
        .collect();
    for encoding in [Encoding::F16, Encoding::Q8] {
        let mut cfg = config(1, 2);
        cfg.download.encoding = encoding;
        // Small chunks: several per download.
        let options = ServeOptions::default().with_chunk_bytes(64 * 1024);
        let server = common::serve_with(cfg, layout.clone(), params.clone(), options).await;
        let mut client = server.client().await;
        let device = join(&mut client).await;
        for version in 1..=2 {
            let task = tasks(&client, std::slice::from_ref(&device)).await[0];
            assert_eq!(task.model_version, version);
            let (decoded, bytes) = download_decoded(&mut client, &device, &task, &layout).await;
            let model = server.handle.model().unwrap();
            assert_eq!(bytes, encoding.wire_bytes(n), "{encoding}");
            assert!(bytes * 2 <= n * 4, "{encoding}: {bytes} bytes");
            assert_within_bound(encoding, &model.params, &decoded);
            assert_eq!(decoded, model.download.decode(), "{encoding}");
            let ack = upload(
                &mut client,
                Some(header(&device, &task, 1, n as u64)),
                tensor::encode(&vec![0.01; n]),
            )
            .await
            .unwrap();
            assert_eq!((ack.round, ack.accepted), (version as u32, 1));
        }
        let reason = common::within("finish", server.handle.finished()).await;
        assert!(reason.contains("2 training rounds"), "{encoding}: {reason}");
        let model = server.handle.model().unwrap();
        assert_eq!(model.version, 3);
        // The update applied is the f32 one, exactly.
        let expected: Vec<f32> = params.iter().map(|p| p + 0.01 + 0.01).collect();
        for (got, want) in model.params.iter().zip(&expected) {
            assert!((got - want).abs() <= 1e-6, "{got} vs {want}");
        }
        drop(client);
        server.stop().await;
    }
}

/// Uploads `update` in `encoding` under `header`, as a device does (the
/// encoded runs of `EncodedModel::update_parts`, in small chunks).
async fn upload_encoded(
    client: &mut CoordinatorClient<Channel>,
    header: pb::UpdateHeader,
    update: &EncodedModel,
) -> Result<pb::UpdateAck, tonic::Status> {
    let messages = update.update_chunks(header, 16 * 1024);
    common::within("upload", client.submit_update(tokio_stream::iter(messages)))
        .await
        .map(tonic::Response::into_inner)
}

/// With `upload.encoding = "q8"` tasks ask for q8 updates; the coordinator
/// folds exactly what the devices encoded (q8 from one device, f32 from a
/// device that ignores the request), and refuses a malformed run with
/// INVALID_ARGUMENT and its reason, leaving the sum as it was: the device
/// can send again.
#[tokio::test]
async fn compressed_uploads_are_decoded_into_the_mean_and_bad_runs_refused() {
    let layout = Layout::new(vec![("item_factors".into(), vec![5_000, 8])]);
    let n = layout.num_values();
    let params = vec![0.5_f32; n];
    let mut cfg = config(3, 1);
    cfg.upload.encoding = Encoding::Q8;
    let server = common::serve(cfg, layout.clone(), params.clone()).await;
    let mut client = server.client().await;
    let devices = vec![
        join(&mut client).await,
        join(&mut client).await,
        join(&mut client).await,
    ];
    let tasks = tasks(&client, &devices).await;
    assert!(
        tasks
            .iter()
            .all(|t| t.upload_encoding == pb::ValueEncoding::Q8 as i32)
    );
    let a: Vec<f32> = (0..n)
        .map(|i| ((i * 31) % 200) as f32 * 1e-3 - 0.1)
        .collect();
    let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.01).sin() * 0.05).collect();
    let a_q8 = EncodedModel::for_upload(&a, Encoding::Q8);
    let ack = upload_encoded(
        &mut client,
        header(&devices[0], &tasks[0], 1, n as u64),
        &a_q8,
    )
    .await
    .unwrap();
    assert_eq!(ack.accepted, 1);

    // A run whose q8 blocks do not match its values: refused, not counted.
    let mut bad = a_q8.update_chunks(header(&devices[2], &tasks[2], 1, n as u64), 16 * 1024);
    for chunk in &mut bad {
        if let Some(Part::Encoded(run)) = &mut chunk.part {
            run.q8.as_mut().unwrap().min.pop();
        }
    }
    let refused = common::within("upload", client.submit_update(tokio_stream::iter(bad))).await;
    assert_status(refused, Code::InvalidArgument, "q8 chunk of");

    // An f32 update (a device that does not know q8) is accepted too.
    let b_f32 = EncodedModel::for_upload(&b, Encoding::F32);
    let ack = upload_encoded(
        &mut client,
        header(&devices[1], &tasks[1], 1, n as u64),
        &b_f32,
    )
    .await
    .unwrap();
    assert_eq!(ack.accepted, 2);
    let ack = upload_encoded(
        &mut client,
        header(&devices[2], &tasks[2], 1, n as u64),
        &a_q8,
    )
    .await
    .unwrap();
    assert_eq!(ack.accepted, 3);

    let reason = common::within("finish", server.handle.finished()).await;
    assert!(reason.contains("1 training rounds"), "{reason}");
    let model = server.handle.model().unwrap();
    let decoded = a_q8.decode();
    assert_ne!(decoded, a, "q8 is lossy");
    for ((got, p), (x, y)) in model.params.iter().zip(&params).zip(decoded.iter().zip(&b)) {
        let want = p + (2.0 * x + y) / 3.0;
        assert!((got - want).abs() <= 1e-6, "{got} vs {want}");
    }
    drop(client);
    server.stop().await;
}

/// A checkpoint path that cannot be written fails serving at start-up
/// (issue 19, item 9), not after the first round.
#[tokio::test]
async fn a_checkpoint_that_cannot_be_written_fails_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("coordinator.ckpt");
    let core = RoundCore::new(
        config(1, 1).validated().unwrap(),
        Layout::new(vec![("b".into(), vec![1])]),
        vec![0.0],
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = ServeOptions::default().with_checkpoint(&path);
    let err = common::within(
        "serving fails",
        fedrec_coordinator::serve(listener, core, options, std::future::pending()),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&path.display().to_string()) && err.contains("cannot create"),
        "{err}"
    );
}

/// A request that does not decode as its method's message is refused as
/// INVALID_ARGUMENT, saying so (issue 19, item 10; prost says INTERNAL).
#[tokio::test]
async fn undecodable_requests_are_invalid_argument() {
    let running = common::serve(
        config(1, 1),
        Layout::new(vec![("b".into(), vec![1])]),
        vec![0.0],
    )
    .await;
    let mut grpc = tonic::client::Grpc::new(common::channel(&running).await);
    grpc.ready().await.unwrap();
    // A string where Join expects its varint protocol version.
    let result: Result<tonic::Response<pb::JoinResponse>, _> = grpc
        .unary(
            tonic::Request::new(pb::CheckInRequest {
                pseudonym: "x".into(),
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static("/fedrec.v1.Coordinator/Join"),
            fedrec_proto::protobuf_codec::Codec::default(),
        )
        .await;
    assert_status(
        result,
        Code::InvalidArgument,
        "undecodable protobuf message",
    );
    running.stop().await;
}
