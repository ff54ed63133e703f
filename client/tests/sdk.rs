//! The SDK's promises, end to end against a real coordinator on 127.0.0.1.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fedrec_client::consent::{Consent, ConsentCell};
use fedrec_client::device::Device;
use fedrec_client::eligibility::{Backoff, Eligibility, FnConditions, ParticipationPolicy};
use fedrec_client::exclusion::Exclusion;
use fedrec_client::model::{LocalTraining, MatrixFactorization, Model};
use fedrec_client::participant::Participant;
use fedrec_client::recommend::Basis;
use fedrec_client::store::{Purchase, Tag};
use fedrec_client::vault::StoreKey;
use fedrec_client::{BlockingClient, Client, ClientError};
use fedrec_proto::Layout;
use rand::Rng;

type Log = Arc<Mutex<Vec<&'static str>>>;

fn recorder(log: &Log) -> fedrec_client::participant::Recorder {
    let log = Arc::clone(log);
    Box::new(move |kind: &'static str, _: &[u8]| log.lock().unwrap().push(kind))
}

/// A purchase of `item` now.
fn purchase(item: u32) -> Purchase {
    let now = fedrec_client::clock::Clock::unix_now(&fedrec_client::clock::SystemClock::new());
    Purchase::new(item, now, 1.0)
}

async fn channel(running: &common::Running) -> tonic::transport::Channel {
    common::within(
        "connect",
        tonic::transport::Channel::from_shared(running.endpoint.clone())
            .unwrap()
            .connect(),
    )
    .await
    .unwrap()
}

/// Without federated consent the participant refuses before its first
/// check-in: nothing but the join request leaves the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_participant_refuses_without_federated_consent() {
    let model = common::model(30, 4);
    let running = common::start(common::config(1, 1), &model, 1).await;
    for level in [Consent::None, Consent::OnDevice] {
        let mut device = Device::new(Arc::clone(&model), 1);
        device.set_consent(level).unwrap();
        let log = Log::default();
        let mut p = Participant::join(channel(&running).await, Some(recorder(&log)))
            .await
            .unwrap();
        let err = common::within("run", p.run(device)).await.unwrap_err();
        assert!(
            matches!(err, ClientError::ConsentRequired { current, .. } if current == level),
            "{err}"
        );
        assert_eq!(*log.lock().unwrap(), vec!["JoinRequest"], "{level}");
    }
    assert_eq!(running.received("CheckIn"), (0, 0));
    running.stop().await;
}

/// A model that lowers the shopper's consent in the middle of local
/// training, as an app would from its settings screen.
#[derive(Debug)]
struct WithdrawsMidway {
    inner: MatrixFactorization,
    consent: OnceLock<ConsentCell>,
}

impl Model for WithdrawsMidway {
    fn items(&self) -> usize {
        self.inner.items()
    }
    fn layout(&self) -> Layout {
        self.inner.layout()
    }
    fn init_global(&self, rng: &mut dyn Rng) -> Vec<f32> {
        self.inner.init_global(rng)
    }
    fn init_private(&self, rng: &mut dyn Rng) -> Vec<f32> {
        self.inner.init_private(rng)
    }
    fn personalize(
        &self,
        global: &[f32],
        private: &mut [f32],
        history: &[u32],
        cfg: &LocalTraining,
        rng: &mut dyn Rng,
    ) {
        self.inner.personalize(global, private, history, cfg, rng);
    }
    fn train_in_place(
        &self,
        params: &mut [f32],
        anchor: Option<&[f32]>,
        private: &mut [f32],
        history: &[u32],
        cfg: &LocalTraining,
        rng: &mut dyn Rng,
    ) {
        self.inner
            .train_in_place(params, anchor, private, history, cfg, rng);
        if let Some(cell) = self.consent.get() {
            cell.set(fedrec_client::consent::ConsentRecord {
                level: Consent::OnDevice,
                set_at: Some(1),
            });
        }
    }
    fn score_all(&self, global: &[f32], private: &[f32], history: &[u32], out: &mut Vec<f32>) {
        self.inner.score_all(global, private, history, out);
    }
}

/// Consent lowered while the device trains: the update is never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_withdrawn_during_training_stops_the_update() {
    let model = Arc::new(WithdrawsMidway {
        inner: MatrixFactorization::new(30, 4, 0.1).unwrap(),
        consent: OnceLock::new(),
    });
    let dyn_model: Arc<dyn Model> = model.clone();
    let running = common::start(common::config(1, 1), &dyn_model, 1).await;
    let mut device = Device::new(Arc::clone(&dyn_model), 2);
    device.set_consent(Consent::Federated).unwrap();
    for i in [1, 2, 3] {
        device.record(purchase(i)).unwrap();
    }
    model.consent.set(device.consent_cell().clone()).unwrap();
    let log = Log::default();
    let mut p = Participant::join(channel(&running).await, Some(recorder(&log)))
        .await
        .unwrap();
    let err = common::within("run", p.run(device)).await.unwrap_err();
    assert!(matches!(err, ClientError::ConsentRequired { .. }), "{err}");
    let log = log.lock().unwrap().clone();
    assert!(
        log.contains(&"ModelRequest"),
        "the task was started: {log:?}"
    );
    assert!(!log.contains(&"UpdateChunk"), "an update left: {log:?}");
    assert_eq!(running.received("SubmitUpdate"), (0, 0));
    running.stop().await;
}

/// While the app's conditions do not hold, the device waits and sends
/// nothing; it checks in only once they hold. A device that stays
/// ineligible gives up when told to, without ever checking in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_checks_in_only_when_eligible() {
    let model = common::model(30, 4);
    let running = common::start(common::config(1, 1), &model, 1).await;

    let asked = Arc::new(AtomicU32::new(0));
    let eligible = Arc::new(AtomicBool::new(false));
    let (a, e) = (Arc::clone(&asked), Arc::clone(&eligible));
    let conditions = FnConditions(move || {
        if a.fetch_add(1, Ordering::SeqCst) >= 3 {
            e.store(true, Ordering::SeqCst);
            Eligibility::Eligible
        } else {
            Eligibility::NotNow("on battery".into())
        }
    });
    let mut device = Device::builder(Arc::clone(&model))
        .seed(3)
        .participation(ParticipationPolicy {
            conditions: Arc::new(conditions),
            backoff: Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(4),
            },
            ..ParticipationPolicy::default()
        })
        .in_memory()
        .unwrap();
    device.set_consent(Consent::Federated).unwrap();
    device.record(purchase(4)).unwrap();
    let checked_in_while_ineligible = Arc::new(AtomicBool::new(false));
    let (flag, e) = (
        Arc::clone(&checked_in_while_ineligible),
        Arc::clone(&eligible),
    );
    let rec: fedrec_client::participant::Recorder = Box::new(move |kind, _| {
        if kind == "CheckInRequest" && !e.load(Ordering::SeqCst) {
            flag.store(true, Ordering::SeqCst);
        }
    });
    let mut p = Participant::join(channel(&running).await, Some(rec))
        .await
        .unwrap();
    let (_, summary) = common::within("run", p.run(device)).await.unwrap();
    assert_eq!(summary.trained, 1);
    assert!(
        asked.load(Ordering::SeqCst) >= 4,
        "asked before each check-in"
    );
    assert!(!checked_in_while_ineligible.load(Ordering::SeqCst));

    // Never eligible: gives up, and sends no check-in at all.
    let never = FnConditions(|| Eligibility::NotNow("metered network".into()));
    let mut device = Device::builder(Arc::clone(&model))
        .participation(ParticipationPolicy {
            conditions: Arc::new(never),
            backoff: Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(2),
            },
            give_up_after: Some(Duration::from_millis(5)),
            ..ParticipationPolicy::default()
        })
        .in_memory()
        .unwrap();
    device.set_consent(Consent::Federated).unwrap();
    let log = Log::default();
    let mut p = Participant::join(channel(&running).await, Some(recorder(&log)))
        .await
        .unwrap();
    let (_, summary) = common::within("run", p.run(device)).await.unwrap();
    assert_eq!(summary.finished_reason, "not eligible: metered network");
    assert_eq!(*log.lock().unwrap(), vec!["JoinRequest"]);
    running.stop().await;
}

/// The transparency report's message counts and bytes equal what the
/// coordinator received, counted from the request bodies on the server;
/// and the report survives reopening the encrypted store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_bytes_equal_the_bytes_received() {
    let model = common::model(40, 4);
    let mut cfg = common::config(2, 1);
    cfg.rounds.evaluate = true;
    cfg.rounds.final_evaluation = true;
    let running = common::start(cfg, &model, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate().unwrap();
    let path = dir.path().join("device.store");
    let open = || {
        Client::builder(Arc::clone(&model))
            .store(&path, key.clone())
            .seed(4)
            .open()
            .unwrap()
    };
    let client = open();
    client.set_consent(Consent::Federated).unwrap();
    for item in [3, 5, 8, 13] {
        client.record(purchase(item)).unwrap();
    }
    common::within("connect", client.connect(&running.endpoint))
        .await
        .unwrap();
    common::within("model", client.refresh_model())
        .await
        .unwrap();
    let mut tasks = 0;
    loop {
        let s = common::within("participate", client.participate())
            .await
            .unwrap();
        tasks += s.trained + s.evaluated;
        if !s.finished_reason.is_empty() && s.trained + s.evaluated == 0 {
            break;
        }
    }
    assert_eq!(tasks, 3, "two training rounds and the final evaluation");
    let report = client.transparency_report(false);
    let kinds = |kind: &str| {
        let mut total = report.outside_rounds.get(kind).copied().unwrap_or_default();
        for r in &report.rounds {
            if let Some(m) = r.messages.get(kind) {
                total.count += m.count;
                total.bytes += m.bytes;
            }
        }
        (total.count, total.bytes)
    };
    for (method, kind) in [
        ("Join", "JoinRequest"),
        ("CheckIn", "CheckInRequest"),
        ("Status", "StatusRequest"),
        ("DownloadModel", "ModelRequest"),
        ("SubmitUpdate", "UpdateChunk"),
        ("SubmitEvaluation", "EvaluationReport"),
    ] {
        assert_eq!(kinds(kind), running.received(method), "{kind}");
        assert!(running.received(method).0 > 0, "{method} was used");
    }
    let received: u64 = running
        .counts
        .lock()
        .unwrap()
        .values()
        .map(|(_, b)| b)
        .sum();
    assert_eq!(report.total_bytes_sent, received);
    assert_eq!(report.rounds.len(), 3);
    assert_eq!(report.rounds[0].task, "train");
    assert_eq!(report.rounds[2].task, "evaluate");
    assert!(report.rounds[0].training.is_some());
    assert_eq!(report.privacy, None);
    let text = report.to_text();
    assert!(text.contains("Privacy budget: not reported"), "{text}");
    assert!(text.contains("4 purchases of 4 items"), "{text}");
    assert!(
        !text.contains("item 13"),
        "items listed without being asked for"
    );
    assert!(
        client
            .transparency_report(true)
            .to_text()
            .contains("item 13")
    );
    drop(client);
    let reopened = open();
    let again = reopened.transparency_report(false);
    assert_eq!(again.rounds, report.rounds);
    assert_eq!(again.total_bytes_sent, report.total_bytes_sent);
    running.stop().await;
}

/// A coordinator of one round for one device, and a client connected to it.
async fn connected() -> (common::Running, Client) {
    let model = common::model(40, 4);
    let running = common::start(common::config(1, 1), &model, 1).await;
    let client = Client::builder(Arc::clone(&model)).seed(5).open().unwrap();
    common::within("connect", client.connect(&running.endpoint))
        .await
        .unwrap();
    (running, client)
}

/// Refreshing the model again downloads it only when the coordinator has a
/// new version: the coordinator refuses a session's fifth download of one
/// version (`server.max_downloads_per_version`, issue 19 item 4), and an
/// app may refresh on every screen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshing_the_model_skips_a_version_already_held() {
    let (running, client) = connected().await;
    for _ in 0..6 {
        let version = common::within("model", client.refresh_model())
            .await
            .unwrap();
        assert_eq!(version, 1);
    }
    assert_eq!(running.received("Status").0, 6);
    assert_eq!(running.received("DownloadModel").0, 1);
    running.stop().await;
}

/// A model refresh whose session has expired (or was replaced by a newer
/// join with the same token) joins again and downloads: an app that only
/// shows recommendations never calls `participate`, which re-joins too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshing_the_model_joins_again_when_the_session_expired() {
    use std::sync::atomic::Ordering;
    let (running, client) = connected().await;
    running.refuse_downloads.store(1, Ordering::SeqCst);
    let version = common::within("model", client.refresh_model())
        .await
        .expect("the refresh joins again and downloads");
    assert_eq!(version, 1);
    assert_eq!(running.received("Join").0, 2, "joined again once");
    assert_eq!(running.received("DownloadModel").0, 1);
    let report = client.transparency_report(false);
    let joins = report.outside_rounds.get("JoinRequest").map(|m| m.count);
    assert_eq!(joins, Some(2), "the report lists both joins");
    running.stop().await;
}

/// A client built without a model learns its shape and the catalogue from
/// the coordinator at connect and keeps them in its store: reopened
/// offline, it records purchases and shows them to buy again, before any
/// model download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_shape_comes_from_the_coordinator_and_is_stored() {
    let model = common::model(40, 4);
    let ids: Vec<String> = (0..40).map(|i| format!("sku-{i}")).collect();
    let catalogue = fedrec_proto::catalogue::Catalogue::from_ids(ids).unwrap();
    let options = fedrec_coordinator::service::ServeOptions::default().with_catalogue(&catalogue);
    let running = common::start_with(common::config(1, 1), &model, 1, options).await;
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate().unwrap();
    let path = dir.path().join("device.store");
    let open = || {
        Client::builder_from_coordinator()
            .store(&path, key.clone())
            .seed(3)
            .open()
            .unwrap()
    };
    let client = open();
    client.set_consent(Consent::OnDevice).unwrap();
    assert!(
        matches!(client.record(purchase(3)), Err(ClientError::NoCatalogue)),
        "no purchase before the catalogue is known"
    );
    let rows = client.recommend(5).unwrap();
    assert!(
        rows.items.is_empty() && rows.buy_again.is_empty(),
        "{rows:?}"
    );
    assert!(client.catalogue().is_none());
    common::within("connect", client.connect(&running.endpoint))
        .await
        .unwrap();
    assert_eq!(client.with_device(|d| d.model().layout()), model.layout());
    assert_eq!(client.catalogue(), Some(catalogue.clone()));
    client.record(purchase(39)).unwrap();
    assert!(matches!(
        client.record(purchase(40)),
        Err(ClientError::UnknownItem {
            item: 40,
            items: 40
        })
    ));
    drop(client);
    running.stop().await;

    // Offline: the shape and catalogue come from the store.
    let again = open();
    assert_eq!(again.with_device(|d| d.model().layout()), model.layout());
    let stored = again.catalogue().expect("the catalogue is stored");
    assert_eq!(stored.index("sku-39"), Some(39));
    again.record(purchase(5)).unwrap();
    let rows = again.recommend(5).unwrap();
    assert_eq!(rows.basis, Basis::Personal);
    assert!(rows.items.is_empty(), "nothing to discover without a model");
    let mut bought = rows.buy_again.clone();
    bought.sort_unstable();
    assert_eq!(bought, vec![5, 39], "{rows:?}");
    assert_eq!(rows.blended, rows.buy_again);
    assert!(matches!(again.explain(5), Err(ClientError::NoModel)));
}

/// Consent levels through the app API: `None` stores nothing and
/// recommends popular items; `OnDevice` stores and personalizes but never
/// trains; lowering to `None` offers to erase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_levels_through_the_app_api() {
    let model = common::model(40, 4);
    let running = common::start(common::config(1, 1), &model, 1).await;
    let client = Client::builder(Arc::clone(&model)).seed(5).open().unwrap();
    assert_eq!(client.consent().level, Consent::None, "opt-in by default");
    let before = client.recommend(5).unwrap();
    assert_eq!(before.basis, Basis::PopularNoConsent);
    assert!(
        before.items.is_empty(),
        "nothing to discover before a model"
    );
    common::within("connect", client.connect(&running.endpoint))
        .await
        .unwrap();
    common::within("model", client.refresh_model())
        .await
        .unwrap();

    use fedrec_client::device::Recorded;
    assert_eq!(client.record(purchase(7)).unwrap(), Recorded::NotStored);
    assert_eq!(client.transparency_report(false).stored.purchases, 0);
    let recs = client.recommend(5).unwrap();
    assert_eq!(recs.basis, Basis::PopularNoConsent);

    client.set_consent(Consent::OnDevice).unwrap();
    assert_eq!(client.recommend(5).unwrap().basis, Basis::PopularColdStart);
    for i in [7, 9, 11] {
        assert_eq!(client.record(purchase(i)).unwrap(), Recorded::Stored);
    }
    let recs = client.recommend(5).unwrap();
    assert_eq!(recs.basis, Basis::Personal);
    assert!(recs.items.iter().all(|i| ![7, 9, 11].contains(i)));
    let err = common::within("participate", client.participate())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::ConsentRequired { .. }), "{err}");
    assert_eq!(running.received("CheckIn"), (0, 0));

    let change = client.set_consent(Consent::None).unwrap();
    assert!(change.offer_erase);
    assert_eq!(client.recommend(5).unwrap().basis, Basis::PopularNoConsent);
    client.forget_me().unwrap();
    assert_eq!(client.transparency_report(false).stored.purchases, 0);
    running.stop().await;
}

/// Under differential privacy the coordinator tells every device the
/// (ε, δ) spent once its round counts, and the device records it round by
/// round in its transparency report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_records_the_epsilon_of_every_round() {
    use fedrec_coordinator::config::{DpMode, Weighting};
    use fedrec_coordinator::privacy::RdpAccountant;

    let model = common::model(30, 4);
    let mut cfg = common::config(2, 1);
    cfg.strategy.weighting = Weighting::Uniform;
    cfg.privacy.mode = DpMode::Central;
    cfg.privacy.noise_multiplier = 1.3;
    cfg.privacy.sampling_rate = Some(1.0);
    cfg.privacy.delta = 1e-6;
    let running = common::start(cfg, &model, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let client = Client::builder(Arc::clone(&model))
        .store(
            dir.path().join("device.store"),
            StoreKey::generate().unwrap(),
        )
        .seed(9)
        .open()
        .unwrap();
    client.set_consent(Consent::Federated).unwrap();
    for item in [1, 4, 9] {
        client.record(purchase(item)).unwrap();
    }
    common::within("connect", client.connect(&running.endpoint))
        .await
        .unwrap();
    let mut trained = 0;
    loop {
        let s = common::within("participate", client.participate())
            .await
            .unwrap();
        trained += s.trained;
        if !s.finished_reason.is_empty() && s.trained + s.evaluated == 0 {
            break;
        }
    }
    assert_eq!(trained, 2);
    let report = client.transparency_report(false);
    let eps: Vec<f64> = report
        .rounds
        .iter()
        .filter(|r| r.task == "train")
        .map(|r| {
            r.privacy
                .expect("every training round reports its budget")
                .epsilon
        })
        .collect();
    assert_eq!(eps.len(), 2);
    for (i, e) in eps.iter().enumerate() {
        let want = RdpAccountant::epsilon_for(1.0, 1.3, i as u64 + 1, 1e-6);
        assert!((e - want).abs() < 1e-9, "round {}: {e} vs {want}", i + 1);
    }
    let latest = report.privacy.expect("latest budget");
    assert_eq!(
        latest.epsilon, eps[1],
        "the final evaluation spends nothing"
    );
    assert_eq!(latest.delta, 1e-6);
    assert!(report.to_text().contains("Privacy budget: ε = "));
    running.stop().await;
}

/// The shopper's controls through the app API: with a purchase, an item or
/// a tag excluded, the recommendations and explanations are those of a
/// shopper who never made the purchases left out; including it again gives
/// the original ones back; exclusions survive reopening the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusions_through_the_app_api() {
    let model = common::model(40, 4);
    let running = common::start(common::config(1, 1), &model, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let key = StoreKey::generate().unwrap();
    let path = dir.path().join("device.store");
    let client_with = |purchases: &[Purchase], store: bool| {
        let mut b = Client::builder(Arc::clone(&model)).seed(6);
        if store {
            b = b.store(&path, key.clone());
        }
        let client = b.open().unwrap();
        client.set_consent(Consent::OnDevice).unwrap();
        for p in purchases {
            client.record(p.clone()).unwrap();
        }
        client
    };
    let ready = |client: Client| async {
        common::within("connect", client.connect(&running.endpoint))
            .await
            .unwrap();
        common::within("model", client.refresh_model())
            .await
            .unwrap();
        client
    };
    // What the app shows: the list, and why its first item.
    let shown = |client: &Client| {
        let recs = client.recommend(10).unwrap();
        let why = client.explain(recs.items[0]).unwrap();
        (recs, why)
    };
    let gift = Tag::new("gift").unwrap();
    let all = [
        purchase(3),
        purchase(5),
        purchase(8).with_tag(gift.clone()),
        purchase(13),
        purchase(21).with_tag(gift.clone()),
    ];
    let client = ready(client_with(&all, true)).await;
    let original = shown(&client);
    for x in [
        Exclusion::Purchase(all[1].key()),
        Exclusion::Item(13),
        Exclusion::Tag(gift.clone()),
    ] {
        let kept: Vec<Purchase> = all.iter().filter(|p| !x.covers(p)).cloned().collect();
        let never_had = shown(&ready(client_with(&kept, false)).await);
        assert_ne!(never_had, original, "{x:?} makes a difference");
        assert!(client.exclude(x.clone()).unwrap());
        assert_eq!(shown(&client), never_had, "{x:?}");
        assert!(client.include(x.clone()).unwrap());
        assert_eq!(shown(&client), original, "{x:?} included again");
    }

    client.exclude(Exclusion::Tag(gift)).unwrap();
    let excluded = (client.exclusions(), shown(&client));
    let report = client.transparency_report(false);
    assert_eq!((report.stored.purchases, report.stored.not_used), (5, 2));
    assert!(report.to_text().contains("1 tag"), "{}", report.to_text());
    drop(client);
    let reopened = ready(client_with(&[], true)).await;
    assert_eq!(
        (reopened.exclusions(), shown(&reopened)),
        excluded,
        "in force after reopening"
    );
    running.stop().await;
}

/// The blocking facade passes the controls through, errors included.
#[test]
fn exclusions_through_the_blocking_api() {
    let model = common::model(20, 4);
    let app = BlockingClient::open(Client::builder(model).seed(7)).unwrap();
    app.set_consent(Consent::OnDevice).unwrap();
    let p = purchase(4).with_tag(Tag::new("medical").unwrap());
    app.record(p.clone()).unwrap();
    let err = app.exclude(Exclusion::Item(99)).unwrap_err();
    assert!(
        matches!(err, ClientError::UnknownItem { item: 99, .. }),
        "{err}"
    );
    let err = Exclusion::tag("medical records").unwrap_err();
    assert!(err.to_string().contains("\"medical records\""), "{err}");
    let mut wrong = p.key();
    wrong.time += 1;
    let err = app.exclude(Exclusion::Purchase(wrong)).unwrap_err();
    assert!(matches!(err, ClientError::UnknownPurchase { .. }), "{err}");
    assert!(app.exclude(Exclusion::Purchase(p.key())).unwrap());
    assert_eq!(app.exclusions().len(), 1);
    let text = app.transparency_report(true).to_text();
    assert!(text.contains("(excluded: not used)"), "{text}");
    assert!(app.include(Exclusion::Purchase(p.key())).unwrap());
    assert!(app.exclusions().is_empty());
    app.with_device(|d| assert_eq!(d.history(), [4]));
}

/// The device joins again whenever its session is refused, even several
/// times in a row before any check-in succeeds (issue 19, item 3: it used
/// to give up at the second refusal in a row), backing off between joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_joins_again_after_every_refused_session() {
    let model = common::model(30, 4);
    let mut cfg = common::config(1, 1);
    // The abandoned sessions stay joined: no final round with everyone.
    cfg.rounds.final_evaluation = false;
    let running = common::start(cfg, &model, 1).await;
    running
        .refuse_check_ins
        .store(3, std::sync::atomic::Ordering::SeqCst);
    let mut device = Device::new(Arc::clone(&model), 3);
    device.set_consent(Consent::Federated).unwrap();
    for i in [1, 2, 3] {
        device.record(purchase(i)).unwrap();
    }
    let mut p = Participant::join(channel(&running).await, None)
        .await
        .unwrap();
    let (_, summary) = common::within("run", p.run(device)).await.unwrap();
    assert_eq!((summary.rejoins, summary.trained), (3, 1), "{summary:?}");
    assert_eq!(running.received("Join").0, 4);
    running.stop().await;
}

/// After the coordinator's settings search changed the model's shape (a
/// trial of 4 factors, then a final run of 8), an app's model refresh takes
/// the new shape: the device's model and private embedding follow, and
/// recommendations work on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_refresh_follows_a_new_shape() {
    use fedrec_coordinator::round::RoundCore;
    let small = common::model(40, 4);
    let mut cfg = common::config(1, 1);
    cfg.rounds.final_evaluation = false;
    let running = common::start(cfg.clone(), &small, 1).await;
    running
        .handle
        .with_core(|core| {
            let placeholder = RoundCore::new(
                Default::default(),
                Layout::new(vec![("b".into(), vec![1])]),
                vec![0.0],
            )
            .unwrap();
            *core = std::mem::replace(core, placeholder).into_trial();
        })
        .unwrap();
    let client = Client::builder(Arc::clone(&small)).seed(5).open().unwrap();
    client.set_consent(Consent::Federated).unwrap();
    for item in 0..6 {
        client.record(purchase(item)).unwrap();
    }
    common::within("connect", client.connect(&running.endpoint))
        .await
        .unwrap();
    common::within("trial", client.participate()).await.unwrap();
    let mut rx = running.handle.subscribe();
    common::within("trial end", rx.wait_for(|p| p.status.between_runs))
        .await
        .unwrap();
    let large = common::model(40, 8);
    let params = {
        use rand::SeedableRng;
        large.init_global(&mut rand_chacha::ChaCha8Rng::seed_from_u64(2))
    };
    let valid = cfg.validated().unwrap();
    running
        .handle
        .with_core(|core| {
            core.start_run(
                std::time::Instant::now(),
                valid,
                large.layout(),
                params,
                false,
            )
        })
        .unwrap()
        .unwrap();
    let version = common::within("model", client.refresh_model())
        .await
        .unwrap();
    assert_eq!(version, 3, "the final run's first version");
    assert_eq!(client.with_device(|d| d.model().layout()), large.layout());
    assert_eq!(client.with_device(|d| d.private_embedding().len()), 8);
    assert_eq!(client.recommend(5).unwrap().items.len(), 5);
    running.stop().await;
}

/// An address where nothing listens (a port bound and released at once):
/// connections to it are refused.
async fn dead_endpoint() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

/// A device given several coordinator endpoints joins the first that
/// answers (issue 23, item 6), through the participant and the app API
/// (a comma-separated list); when none answers, the last one's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_joins_the_first_endpoint_that_answers() {
    use fedrec_client::connect::ConnectOptions;
    let model = common::model(30, 4);
    let running = common::start(common::config(1, 1), &model, 1).await;
    let (dead, also_dead) = (dead_endpoint().await, dead_endpoint().await);
    let p = common::within(
        "connect",
        Participant::connect_any(&[&dead, &running.endpoint], &ConnectOptions::new()),
    )
    .await
    .unwrap();
    assert_eq!(p.endpoint(), Some(running.endpoint.as_str()));

    let client = Client::builder(Arc::clone(&model)).seed(5).open().unwrap();
    let list = format!("{dead}, {}", running.endpoint);
    common::within("connect", client.connect(&list))
        .await
        .unwrap();
    let version = common::within("model", client.refresh_model())
        .await
        .unwrap();
    assert_eq!(version, 1);
    assert_eq!(running.received("Join").0, 2);

    let err = common::within(
        "connect",
        Participant::connect_with(&format!("{dead},{also_dead}"), &ConnectOptions::new()),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, ClientError::Connect { endpoint, .. } if *endpoint == also_dead),
        "{err}"
    );
    let err = Participant::connect_with(&format!("{dead},"), &ConnectOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::InvalidConfig(_)), "{err}");
    running.stop().await;
}

/// A device taking part at coordinator A, given [A, B], moves to B when A
/// stops in the middle of its rounds and finishes there. Two coordinators
/// in one process share no sessions, so B refuses the device's pseudonym
/// and it joins again (replicas sharing a store would take it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moves_to_the_next_endpoint_when_its_coordinator_stops() {
    use fedrec_client::connect::ConnectOptions;
    let model = common::model(30, 4);
    let mut cfg = common::config(1000, 1);
    // Check-ins in flight end soon, so that A stops soon.
    cfg.server.long_poll_secs = 0.5;
    let a = common::start(cfg, &model, 1).await;
    let b = common::start(common::config(2, 1), &model, 1).await;
    let mut device = Device::new(Arc::clone(&model), 3);
    device.set_consent(Consent::Federated).unwrap();
    for i in [1, 2, 3] {
        device.record(purchase(i)).unwrap();
    }
    let endpoints = [a.endpoint.clone(), b.endpoint.clone()];
    let mut p = common::within(
        "connect",
        Participant::connect_any(&endpoints, &ConnectOptions::new()),
    )
    .await
    .unwrap();
    assert_eq!(p.endpoint(), Some(a.endpoint.as_str()));
    let run = tokio::spawn(async move {
        let result = p.run(device).await;
        (p, result)
    });
    let mut progress = a.handle.subscribe();
    common::within(
        "a round at A",
        progress.wait_for(|p| p.history.iter().any(|s| s.completed)),
    )
    .await
    .unwrap();
    a.stop().await;
    let (p, result) = common::within("the device finishes at B", run)
        .await
        .unwrap();
    let (_, summary) = result.unwrap();
    assert!(summary.failovers >= 1, "{summary:?}");
    assert!(summary.rejoins >= 1, "B joins it again: {summary:?}");
    assert!(summary.trained >= 3, "{summary:?}");
    assert!(!summary.finished_reason.is_empty(), "{summary:?}");
    assert_eq!(p.endpoint(), Some(b.endpoint.as_str()));
    assert!(b.handle.progress().finished.is_some());
    b.stop().await;
}

/// A coordinator that stops answering without closing its connections (a
/// machine gone silent, a network partition) is noticed by the keepalive:
/// the device leaves it for the next endpoint instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_coordinator_is_left_for_the_next_endpoint() {
    use fedrec_client::connect::ConnectOptions;
    let model = common::model(30, 4);
    let b = common::start(common::config(1, 1), &model, 1).await;
    // Accepts connections, never reads or answers, never closes.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    let mut device = Device::new(Arc::clone(&model), 3);
    device.set_consent(Consent::Federated).unwrap();
    for i in [1, 2, 3] {
        device.record(purchase(i)).unwrap();
    }
    let options = ConnectOptions::new().keepalive(Duration::from_millis(300));
    let endpoints = [silent_url, b.endpoint.clone()];
    let mut p = common::within(
        "leaving the silent coordinator",
        Participant::connect_any(&endpoints, &options),
    )
    .await
    .unwrap();
    assert_eq!(p.endpoint(), Some(b.endpoint.as_str()));
    let (_, summary) = common::within("the device finishes at B", p.run(device))
        .await
        .unwrap();
    assert!(summary.trained >= 1, "{summary:?}");
    held.abort();
    b.stop().await;
}

/// An app's model refresh moves to the next endpoint when the coordinator
/// it joined has stopped, and joins again there if it must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_refresh_moves_to_the_next_endpoint() {
    use fedrec_client::connect::ConnectOptions;
    let model = common::model(40, 4);
    let a = common::start(common::config(1, 1), &model, 1).await;
    let b = common::start(common::config(1, 1), &model, 2).await;
    let client = Client::builder(Arc::clone(&model)).seed(5).open().unwrap();
    common::within(
        "connect",
        client.connect_any(&[&a.endpoint, &b.endpoint], &ConnectOptions::new()),
    )
    .await
    .unwrap();
    a.stop().await;
    let version = common::within("model", client.refresh_model())
        .await
        .unwrap();
    assert_eq!(version, 1);
    // B did not know the session: its first download was refused, the
    // second came after the device joined there.
    assert_eq!(b.received("Join").0, 1);
    assert_eq!(b.received("DownloadModel").0, 2);
    b.stop().await;
}
