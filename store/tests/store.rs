//! The store against a real PostgreSQL: each test starts its own server
//! ([`TestPostgres`]) in a temporary directory on a free port.

use fedrec_coordinator::history::TaskKind;
use fedrec_coordinator::privacy::accountant::MechanismLog;
use fedrec_proto::{EvalCounts, Layout};
use fedrec_store::migrate::{MIGRATIONS, SCHEMA_VERSION};
use fedrec_store::testing::{PASSWORD_ROLE, TestPostgres};
use fedrec_store::{
    Checkpoint, EndRound, NewModel, NewVersion, PrivacyState, ReplicaBeat, RoundOrder,
    RoundSummary, RunState, Share, Store, StoreError,
};

fn layout() -> Layout {
    Layout::new(vec![
        ("item_factors".to_owned(), vec![3, 2]),
        ("item_bias".to_owned(), vec![3]),
    ])
}

/// A fresh server and a connection to it with the task "shop" of
/// [`layout`]; `None` when the test skips (no PostgreSQL here).
async fn shop() -> Option<(TestPostgres, Store)> {
    let pg = TestPostgres::start_or_skip()?;
    let mut store = Store::connect(&pg.url()).await.unwrap();
    store.open_task("shop", &layout()).await.unwrap();
    Some((pg, store))
}

/// Nine values whose bits a lossy path would change: -0, NaN with a
/// payload, a subnormal, the extremes.
fn odd_params() -> Vec<f32> {
    vec![
        -0.0,
        f32::from_bits(0x7fc0_1234),
        f32::from_bits(1),
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        1.0 / 3.0,
        -2.5,
        7.0,
    ]
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn summary(round: u32, model_version: u64) -> RoundSummary {
    RoundSummary {
        round,
        kind: TaskKind::Train,
        completed: true,
        abandon_reason: None,
        model_version,
        selected: 10,
        participants: 8,
        seconds: 1.25,
        evaluation: EvalCounts {
            users: 3,
            hits_full: 1.0,
            ndcg_full: 0.1,
            hits_sampled: 2.0,
            ndcg_sampled: 0.7,
        },
        secure_aggregation: None,
        privacy: None,
    }
}

fn privacy(rounds: u64) -> PrivacyState {
    PrivacyState {
        ledger: MechanismLog {
            steps: vec![(0.1, 1.1, rounds)],
        },
        clip: 0.75,
    }
}

fn checkpoint(model_version: u64) -> Checkpoint {
    Checkpoint {
        model_version,
        last_round: 2,
        run_start: 0,
        training_rounds: 2,
        final_evaluation_done: false,
        training_stopped: None,
        history: vec![summary(1, 1), summary(2, model_version)],
        joined: vec!["00112233445566778899aabbccddeeff".to_owned()],
        privacy: Some(privacy(2)),
        params: odd_params(),
        m: vec![0.5; 9],
        v: vec![0.25; 9],
    }
}

async fn count(pg: &TestPostgres, sql: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn migrations_apply_from_empty_and_are_idempotent() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let store = Store::connect(&pg.url()).await.unwrap();
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    let tables = count(
        &pg,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename IN \
         ('task', 'model_version', 'round_summary', 'privacy_state', 'run_state', 'session')",
    )
    .await;
    assert_eq!(tables, 6);
    drop(store);
    let store = Store::connect(&pg.url()).await.unwrap();
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    let rows = count(&pg, "SELECT count(*) FROM schema_version").await;
    assert_eq!(rows, MIGRATIONS.len() as i64);
}

#[tokio::test]
async fn concurrent_replicas_migrate_once() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let url = pg.url();
    let (a, b, c) = tokio::join!(
        Store::connect(&url),
        Store::connect(&url),
        Store::connect(&url)
    );
    for store in [a, b, c] {
        assert_eq!(
            store.unwrap().schema_version().await.unwrap(),
            SCHEMA_VERSION
        );
    }
    let rows = count(&pg, "SELECT count(*) FROM schema_version").await;
    assert_eq!(rows, MIGRATIONS.len() as i64);
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    drop(Store::connect(&pg.url()).await.unwrap());
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .execute(
            "INSERT INTO schema_version (version, name) VALUES ($1, 'from the future')",
            &[&(SCHEMA_VERSION + 1)],
        )
        .await
        .unwrap();
    let err = Store::connect(&pg.url()).await.unwrap_err();
    assert!(matches!(err, StoreError::SchemaTooNew { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "the store's schema is version {}, this fedrec knows up to {SCHEMA_VERSION}: \
             upgrade fedrec",
            SCHEMA_VERSION + 1
        )
    );
}

#[tokio::test]
async fn a_task_of_another_shape_is_refused() {
    let Some((_pg, mut store)) = shop().await else {
        return;
    };
    store.open_task("shop", &layout()).await.unwrap();
    assert_eq!(store.latest("shop").await.unwrap(), None);

    let other = Layout::new(vec![("item_factors".to_owned(), vec![3, 4])]);
    let err = store.open_task("shop", &other).await.unwrap_err();
    assert!(matches!(err, StoreError::TaskShape { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&layout().to_string()), "{message}");
    assert!(message.contains(&other.to_string()), "{message}");
    // Another task name holds another shape.
    store.open_task("books", &other).await.unwrap();
}

#[tokio::test]
async fn a_checkpoint_import_round_trips_bit_for_bit() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let mut store = Store::connect(&pg.url()).await.unwrap();
    let ck = checkpoint(2);
    let err = store.import_checkpoint("shop", &ck).await.unwrap_err();
    assert!(matches!(err, StoreError::UnknownTask(_)), "{err:?}");

    store.open_task("shop", &layout()).await.unwrap();
    store.import_checkpoint("shop", &ck).await.unwrap();
    let model = store.latest("shop").await.unwrap().unwrap();
    assert_eq!(model.version, 2);
    assert_eq!(bits(&model.params), bits(&ck.params));
    assert_eq!(bits(&model.m), bits(&ck.m));
    assert_eq!(bits(&model.v), bits(&ck.v));
    assert_eq!(store.history("shop").await.unwrap(), ck.history);
    assert_eq!(store.privacy("shop").await.unwrap(), ck.privacy);
    assert_eq!(count(&pg, "SELECT count(*) FROM session").await, 1);

    // Again: the same state, nothing doubled.
    store.import_checkpoint("shop", &ck).await.unwrap();
    assert_eq!(store.history("shop").await.unwrap(), ck.history);
    assert_eq!(count(&pg, "SELECT count(*) FROM session").await, 1);

    // An older checkpoint is refused and changes nothing.
    let mut old = checkpoint(1);
    old.params = vec![0.0; 9];
    let err = store.import_checkpoint("shop", &old).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NewerInStore { stored: 2, .. }),
        "{err:?}"
    );
    let model = store.latest("shop").await.unwrap().unwrap();
    assert_eq!(bits(&model.params), bits(&ck.params));

    // A model of another size is refused.
    let mut wrong = checkpoint(3);
    wrong.params.pop();
    let err = store.import_checkpoint("shop", &wrong).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::ParamsLength {
                expected: 9,
                got: 8,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_stale_commit_is_refused_and_changes_nothing() {
    let Some((pg, mut store)) = shop().await else {
        return;
    };
    let first = odd_params();
    store
        .commit_version(
            "shop",
            &NewVersion {
                previous: None,
                version: 1,
                params: &first,
                m: &[],
                v: &[],
                summary: Some(&summary(1, 1)),
                privacy: Some(&privacy(1)),
            },
        )
        .await
        .unwrap();

    let second = vec![2.0; 9];
    let stale = vec![3.0; 9];
    let (summary2, privacy2) = (summary(2, 2), privacy(2));
    let moments = vec![0.5; 9];
    let commit = |previous, version, params| NewVersion {
        previous,
        version,
        params,
        m: &moments,
        v: &moments,
        summary: Some(&summary2),
        privacy: Some(&privacy2),
    };
    // Two replicas race to commit round 2 on top of version 1: one wins.
    let mut other = Store::connect(&pg.url()).await.unwrap();
    let (mine, theirs) = (commit(Some(1), 2, &second), commit(Some(1), 2, &stale));
    let (a, b) = tokio::join!(
        store.commit_version("shop", &mine),
        other.commit_version("shop", &theirs),
    );
    assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
    let winner = if a.is_ok() { &second } else { &stale };
    let loser = a.err().or(b.err()).unwrap();
    assert!(
        matches!(
            loser,
            StoreError::StaleVersion {
                expected: Some(1),
                found: Some(2),
                ..
            }
        ),
        "{loser:?}"
    );

    for previous in [Some(1), None] {
        let err = store
            .commit_version("shop", &commit(previous, 3, &stale))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::StaleVersion { .. }), "{err:?}");
    }
    let model = store.latest("shop").await.unwrap().unwrap();
    assert_eq!(model.version, 2);
    assert_eq!(bits(&model.params), bits(winner));
    assert_eq!(
        (model.m.clone(), model.v.clone()),
        (moments.clone(), moments.clone())
    );
    assert_eq!(
        store.history("shop").await.unwrap(),
        vec![summary(1, 1), summary(2, 2)]
    );
    assert_eq!(store.privacy("shop").await.unwrap(), Some(privacy(2)));
    assert_eq!(count(&pg, "SELECT count(*) FROM model_version").await, 2);

    let err = store
        .commit_version("shop", &commit(Some(2), 2, &stale))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidVersion(_)), "{err:?}");
}

#[tokio::test]
async fn data_survives_a_server_restart() {
    let Some(mut pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let mut store = Store::connect(&pg.url()).await.unwrap();
    store.open_task("shop", &layout()).await.unwrap();
    let ck = checkpoint(5);
    store.import_checkpoint("shop", &ck).await.unwrap();
    drop(store);

    pg.stop();
    let err = Store::connect(&pg.url()).await.unwrap_err();
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err:?}");
    pg.restart();

    let mut store = Store::connect(&pg.url()).await.unwrap();
    store.open_task("shop", &layout()).await.unwrap();
    let model = store.latest("shop").await.unwrap().unwrap();
    assert_eq!(model.version, 5);
    assert_eq!(bits(&model.params), bits(&ck.params));
    assert_eq!(store.history("shop").await.unwrap(), ck.history);
}

#[tokio::test]
async fn connection_errors_say_what_failed_without_the_password() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let port = pg.port();

    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD 'right-horse'"
        ))
        .await
        .unwrap();

    let secret = "correct-horse-battery";
    let err = Store::connect(&format!(
        "postgres://{PASSWORD_ROLE}:{secret}@127.0.0.1:{port}/fedrec"
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Auth { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("password authentication failed"),
        "{message}"
    );
    assert!(
        message.contains(&format!("{PASSWORD_ROLE}@127.0.0.1:{port}/fedrec")),
        "{message}"
    );
    assert!(!message.contains(secret) && !format!("{err:?}").contains(secret));

    let err = Store::connect(&format!("postgres://postgres@127.0.0.1:{port}/nowhere"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Connect { .. }), "{err:?}");
    assert!(
        err.to_string().contains("\"nowhere\" does not exist"),
        "{err}"
    );

    // A port nothing listens on (the server's own, once stopped).
    drop(pg);
    let err = Store::connect(&format!(
        "postgres://postgres:{secret}@127.0.0.1:{port}/fedrec"
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Unreachable { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with("cannot reach PostgreSQL at postgres@127.0.0.1:"),
        "{message}"
    );
    assert!(!message.contains(secret) && !format!("{err:?}").contains(secret));

    let err = Store::connect("postgres://a:b@host:notaport/x")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidUrl(_)), "{err:?}");
}

/// One connection leads a task at a time; tasks lead apart; a resignation
/// or the end of the leader's connection (a replica killed) hands the
/// lease to a waiting follower, with no expiry to wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_a_task_until_it_resigns_or_its_connection_ends() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let url = pg.url();
    let mut a = Store::connect(&url).await.unwrap();
    let mut b = Store::connect(&url).await.unwrap();
    assert!(a.try_lead("shop").await.unwrap());
    assert!(a.try_lead("shop").await.unwrap(), "a leader leads again");
    assert!(!b.try_lead("shop").await.unwrap(), "one leader per task");
    assert!(b.try_lead("other").await.unwrap(), "tasks lead apart");
    assert!(a.leads("shop") && !b.leads("shop"));
    a.resign("shop").await.unwrap();
    assert!(!a.leads("shop"));
    assert!(
        b.try_lead("shop").await.unwrap(),
        "taken after a resignation"
    );
    assert!(!a.try_lead("shop").await.unwrap());
    // A follower waits; the leader's connection ends without resigning.
    let follower = tokio::spawn(async move {
        a.lead("shop").await.unwrap();
        a
    });
    drop(b);
    let a = tokio::time::timeout(std::time::Duration::from_secs(60), follower)
        .await
        .expect("the follower leads once the leader's connection is gone")
        .unwrap();
    assert!(a.leads("shop"));
    let mut c = Store::connect(&url).await.unwrap();
    assert!(!c.try_lead("shop").await.unwrap());
}

/// Each replica commits its share of a round once (a retry changes
/// nothing); the leader reads every share of the round on its model
/// version, and none of another version's; a share that cannot be
/// combined is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_commit_their_share_of_a_round_once() {
    use fedrec_store::Partial;
    let Some((_pg, mut store)) = shop().await else {
        return;
    };
    let share = |replica: &str, scale: f32| Partial {
        replica: replica.to_owned(),
        weighted_sum: odd_params()
            .iter()
            .map(|_| scale)
            .chain([scale * 2.0])
            .collect(),
        weight: f64::from(scale) * 3.0,
        within_clip: 0.0,
        selected: 3,
        accepted: 3,
        evaluation: EvalCounts {
            users: 2,
            hits_full: 1.0,
            ndcg_full: 0.5,
            ..EvalCounts::default()
        },
    };
    let (b, a) = (share("replica-b", 2.0), share("replica-a", 1.0));
    assert!(store.put_partial("shop", 4, 7, &b).await.unwrap());
    assert!(store.put_partial("shop", 4, 7, &a).await.unwrap());
    let retry = Partial {
        weight: 99.0,
        ..a.clone()
    };
    assert!(
        !store.put_partial("shop", 4, 7, &retry).await.unwrap(),
        "a replica's share counts once"
    );
    // Another version's round 4 is another round.
    assert!(store.put_partial("shop", 4, 8, &a).await.unwrap());
    let shares = store.partials("shop", 4, 7).await.unwrap();
    assert_eq!(shares, vec![a.clone(), b], "by replica, as committed");
    assert!(store.partials("shop", 5, 7).await.unwrap().is_empty());
    let short = Partial {
        weighted_sum: vec![1.0],
        ..a.clone()
    };
    let err = store.put_partial("shop", 5, 7, &short).await.unwrap_err();
    assert!(
        err.to_string().contains("1 values for a model of 9"),
        "{err}"
    );
    let nan = Partial {
        weighted_sum: vec![f32::NAN; 9],
        ..a
    };
    assert!(store.put_partial("shop", 5, 7, &nan).await.is_err());
    assert!(store.partials("shop", 5, 7).await.unwrap().is_empty());
}

/// A store of an older schema is upgraded on connect, its data kept: here
/// a version-1 store (the tables and rows of versions 2 to 4 taken away)
/// with a task in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_schema_is_upgraded_and_keeps_its_data() {
    let Some((pg, store)) = shop().await else {
        return;
    };
    drop(store);
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "DROP TABLE partial_sum, round_order, replica; \
             ALTER TABLE task DROP COLUMN catalogue; ALTER TABLE session DROP COLUMN replaced; \
             DELETE FROM schema_version WHERE version >= 2",
        )
        .await
        .unwrap();
    assert_eq!(
        fedrec_store::migrate::schema_version(&client)
            .await
            .unwrap(),
        1
    );
    let mut store = Store::connect(&pg.url()).await.unwrap();
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(SCHEMA_VERSION, 4);
    store.open_task("shop", &layout()).await.unwrap();
    let share = fedrec_store::Partial {
        replica: "a".to_owned(),
        weighted_sum: vec![0.0; 9],
        weight: 1.0,
        within_clip: 0.0,
        selected: 3,
        accepted: 1,
        evaluation: EvalCounts::default(),
    };
    assert!(store.put_partial("shop", 1, 1, &share).await.unwrap());
    store.heartbeat("shop", &beat("a", 1)).await.unwrap();
}

/// A version-2 store (the tables, columns and rows of versions 3 and 4
/// taken away) is upgraded to the newest on connect, its partial sums kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_store_is_upgraded_to_the_newest() {
    let Some((pg, mut store)) = shop().await else {
        return;
    };
    let share = fedrec_store::Partial {
        replica: "a".to_owned(),
        weighted_sum: vec![0.0; 9],
        weight: 1.0,
        within_clip: 0.0,
        selected: 0, // the column's default: version 2 kept no count
        accepted: 1,
        evaluation: EvalCounts::default(),
    };
    assert!(store.put_partial("shop", 1, 1, &share).await.unwrap());
    drop(store);
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "DROP TABLE round_order, replica; ALTER TABLE task DROP COLUMN catalogue; \
             ALTER TABLE partial_sum DROP COLUMN within_clip, DROP COLUMN selected; \
             ALTER TABLE session DROP COLUMN replaced; \
             DELETE FROM schema_version WHERE version >= 3",
        )
        .await
        .unwrap();
    assert_eq!(
        fedrec_store::migrate::schema_version(&client)
            .await
            .unwrap(),
        2
    );
    let mut store = Store::connect(&pg.url()).await.unwrap();
    assert_eq!(store.schema_version().await.unwrap(), 4);
    let names: Vec<String> = client
        .query("SELECT name FROM schema_version ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        names,
        ["init", "partial_sum", "cluster", "cluster_privacy_tokens"]
    );
    assert_eq!(store.partials("shop", 1, 1).await.unwrap(), vec![share]);
    store.open_task("shop", &layout()).await.unwrap();
    store
        .commit_version(
            "shop",
            &NewVersion {
                previous: None,
                version: 1,
                params: &[0.0; 9],
                m: &[],
                v: &[],
                summary: None,
                privacy: None,
            },
        )
        .await
        .unwrap();
    assert!(store.open_round("shop", &order(1, 1), None).await.unwrap());
}

fn beat(name: &str, waiting: u64) -> ReplicaBeat {
    ReplicaBeat {
        name: name.to_owned(),
        url: format!("http://{name}.internal:7070"),
        waiting,
        joined: waiting * 2,
    }
}

/// A deadline the store keeps exactly (it keeps microseconds).
fn deadline() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_900_000_000_123_456)
}

fn order(round: u32, model_version: u64) -> RoundOrder {
    RoundOrder {
        round,
        model_version,
        kind: TaskKind::Train,
        deadline: deadline(),
        shares: [
            ("replica-a".to_owned(), Share { take: 5, needed: 4 }),
            ("replica-b".to_owned(), Share { take: 3, needed: 2 }),
        ]
        .into_iter()
        .collect(),
        privacy: None,
    }
}

fn run(last_round: u32) -> RunState {
    RunState {
        last_round,
        run_start: 0,
        training_rounds: last_round,
        final_evaluation_done: false,
        training_stopped: None,
    }
}

/// A task at model version 1, no round ended yet.
async fn task_at_version_1(pg: &TestPostgres) -> Store {
    let mut store = Store::connect(&pg.url()).await.unwrap();
    store.open_task("shop", &layout()).await.unwrap();
    store
        .commit_version(
            "shop",
            &NewVersion {
                previous: None,
                version: 1,
                params: &odd_params(),
                m: &[],
                v: &[],
                summary: None,
                privacy: None,
            },
        )
        .await
        .unwrap();
    store
}

/// A round ends once: its end writes the model, the summary, the counters
/// and the privacy state together; the same end again (a retry, a deposed
/// leader) fails with StaleRound and writes nothing; a stale previous
/// version is refused too. Old partial sums and orders are cleared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_ends_exactly_once() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let mut store = task_at_version_1(&pg).await;
    assert_eq!(store.run_state("shop").await.unwrap(), None);
    // Leftovers of old rounds, to be cleared by round 6's end; round 1's
    // partial sums stay until then.
    let share = fedrec_store::Partial {
        replica: "a".to_owned(),
        weighted_sum: vec![0.0; 9],
        weight: 1.0,
        within_clip: 0.0,
        selected: 3,
        accepted: 1,
        evaluation: EvalCounts::default(),
    };
    assert!(store.put_partial("shop", 1, 1, &share).await.unwrap());
    assert!(store.open_round("shop", &order(1, 1), None).await.unwrap());

    let params = vec![2.0; 9];
    let moments = vec![0.5; 9];
    let (summary1, privacy1, run1) = (summary(1, 2), privacy(1), run(1));
    let end1 = EndRound {
        round: 1,
        previous: Some(1),
        model: Some(NewModel {
            version: 2,
            params: &params,
            m: &moments,
            v: &moments,
        }),
        summary: &summary1,
        run: &run1,
        privacy: Some(&privacy1),
    };
    store.end_round("shop", &end1).await.unwrap();
    let model = store.latest("shop").await.unwrap().unwrap();
    assert_eq!((model.version, model.params), (2, params.clone()));
    assert_eq!(store.history("shop").await.unwrap(), vec![summary(1, 2)]);
    assert_eq!(store.run_state("shop").await.unwrap(), Some(run(1)));
    assert_eq!(store.privacy("shop").await.unwrap(), Some(privacy(1)));
    assert_eq!(
        count(&pg, "SELECT model_version FROM run_state").await,
        2,
        "the counters are as of the new version"
    );

    // The same end again: refused, nothing written.
    let err = store.end_round("shop", &end1).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::StaleRound {
                round: 1,
                last: 1,
                ..
            }
        ),
        "{err:?}"
    );
    // Even with the right previous version and a new model.
    let again = EndRound {
        previous: Some(2),
        model: Some(NewModel {
            version: 3,
            params: &[9.0; 9],
            m: &[],
            v: &[],
        }),
        ..end1
    };
    let err = store.end_round("shop", &again).await.unwrap_err();
    assert!(matches!(err, StoreError::StaleRound { .. }), "{err:?}");
    // Round 2 on a stale previous version.
    let (summary2, run2) = (summary(2, 3), run(2));
    let stale = EndRound {
        round: 2,
        previous: Some(1),
        summary: &summary2,
        run: &run2,
        ..again
    };
    let err = store.end_round("shop", &stale).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::StaleVersion {
                expected: Some(1),
                found: Some(2),
                ..
            }
        ),
        "{err:?}"
    );
    // A new model that does not follow the previous version.
    let backwards = EndRound {
        round: 2,
        previous: Some(2),
        model: Some(NewModel {
            version: 2,
            params: &[9.0; 9],
            m: &[],
            v: &[],
        }),
        ..stale
    };
    let err = store.end_round("shop", &backwards).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidVersion(_)), "{err:?}");
    let model = store.latest("shop").await.unwrap().unwrap();
    assert_eq!((model.version, model.params), (2, params.clone()));
    assert_eq!(store.history("shop").await.unwrap(), vec![summary(1, 2)]);
    assert_eq!(store.run_state("shop").await.unwrap(), Some(run(1)));
    assert_eq!(count(&pg, "SELECT count(*) FROM model_version").await, 2);

    // Rounds 2..=6 end without models; round 6's end clears round 1's
    // partial sums and order (kept while within 5 rounds).
    for round in 2..=6 {
        assert_eq!(count(&pg, "SELECT count(*) FROM partial_sum").await, 1);
        assert_eq!(count(&pg, "SELECT count(*) FROM round_order").await, 1);
        let (summary, run) = (summary(round, 2), run(round));
        store
            .end_round(
                "shop",
                &EndRound {
                    round,
                    previous: Some(2),
                    model: None,
                    summary: &summary,
                    run: &run,
                    privacy: None,
                },
            )
            .await
            .unwrap();
    }
    assert_eq!(count(&pg, "SELECT count(*) FROM partial_sum").await, 0);
    assert_eq!(count(&pg, "SELECT count(*) FROM round_order").await, 0);
    assert_eq!(store.run_state("shop").await.unwrap(), Some(run(6)));
}

/// An abandoned round (no model) moves the counters on and joins the
/// history, without a new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_round_ends_without_a_new_version() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let mut store = task_at_version_1(&pg).await;
    let mut abandoned = summary(1, 1);
    abandoned.completed = false;
    abandoned.abandon_reason = Some("too few updates".to_owned());
    let state = RunState {
        training_stopped: Some("budget spent".to_owned()),
        ..run(1)
    };
    store
        .end_round(
            "shop",
            &EndRound {
                round: 1,
                previous: Some(1),
                model: None,
                summary: &abandoned,
                run: &state,
                privacy: Some(&privacy(1)),
            },
        )
        .await
        .unwrap();
    let model = store.latest("shop").await.unwrap().unwrap();
    assert_eq!(model.version, 1);
    assert_eq!(bits(&model.params), bits(&odd_params()));
    assert_eq!(store.history("shop").await.unwrap(), vec![abandoned]);
    assert_eq!(store.run_state("shop").await.unwrap(), Some(state));
    assert_eq!(store.privacy("shop").await.unwrap(), Some(privacy(1)));
    assert_eq!(count(&pg, "SELECT count(*) FROM model_version").await, 1);
    assert_eq!(count(&pg, "SELECT model_version FROM run_state").await, 1);

    // A task with no model at all cannot end a round.
    store.open_task("empty", &layout()).await.unwrap();
    let (summary1, run1) = (summary(1, 0), run(1));
    let err = store
        .end_round(
            "empty",
            &EndRound {
                round: 1,
                previous: None,
                model: None,
                summary: &summary1,
                run: &run1,
                privacy: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NoModel(_)), "{err:?}");
    assert!(store.history("empty").await.unwrap().is_empty());
}

/// The run state a checkpoint import writes reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_checkpoint_has_its_run_state() {
    let Some((_pg, mut store)) = shop().await else {
        return;
    };
    let mut ck = checkpoint(2);
    ck.training_stopped = Some("converged".to_owned());
    store.import_checkpoint("shop", &ck).await.unwrap();
    assert_eq!(
        store.run_state("shop").await.unwrap(),
        Some(RunState {
            last_round: 2,
            run_start: 0,
            training_rounds: 2,
            final_evaluation_done: false,
            training_stopped: Some("converged".to_owned()),
        })
    );
    // Round 3 follows the imported round 2.
    assert!(!store.open_round("shop", &order(2, 2), None).await.unwrap());
    assert!(store.open_round("shop", &order(3, 2), None).await.unwrap());
}

/// A round opens once, on the current model, right after the last ended
/// round; it stays open until its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_opens_once_on_the_current_model() {
    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let mut store = task_at_version_1(&pg).await;
    assert_eq!(store.open_order("shop").await.unwrap(), None);
    assert!(
        !store.open_round("shop", &order(2, 1), None).await.unwrap(),
        "round 1 first"
    );
    assert!(!store.open_round("shop", &order(0, 1), None).await.unwrap());
    assert!(
        !store.open_round("shop", &order(1, 0), None).await.unwrap(),
        "a stale model"
    );
    assert!(
        !store.open_round("shop", &order(1, 2), None).await.unwrap(),
        "a future model"
    );
    assert_eq!(store.open_order("shop").await.unwrap(), None);

    let mut first = order(1, 1);
    first.kind = TaskKind::Evaluate;
    assert!(store.open_round("shop", &first, None).await.unwrap());
    let other = order(1, 1);
    assert!(
        !store.open_round("shop", &other, None).await.unwrap(),
        "one order per round"
    );
    assert_eq!(store.open_order("shop").await.unwrap(), Some(first.clone()));
    assert_eq!(count(&pg, "SELECT count(*) FROM round_order").await, 1);

    // Two leaders race to open round 1 of another task: one wins.
    let mut other_store = Store::connect(&pg.url()).await.unwrap();
    store.open_task("books", &layout()).await.unwrap();
    store
        .commit_version(
            "books",
            &NewVersion {
                previous: None,
                version: 1,
                params: &[0.0; 9],
                m: &[],
                v: &[],
                summary: None,
                privacy: None,
            },
        )
        .await
        .unwrap();
    let books = order(1, 1);
    let (a, b) = tokio::join!(
        store.open_round("books", &books, None),
        other_store.open_round("books", &books, None),
    );
    assert!(a.unwrap() != b.unwrap(), "exactly one opens it");

    // The round's end closes the order; round 2 opens on the new model.
    let (summary1, run1) = (summary(1, 2), run(1));
    let params = vec![1.0; 9];
    store
        .end_round(
            "shop",
            &EndRound {
                round: 1,
                previous: Some(1),
                model: Some(NewModel {
                    version: 2,
                    params: &params,
                    m: &[],
                    v: &[],
                }),
                summary: &summary1,
                run: &run1,
                privacy: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(store.open_order("shop").await.unwrap(), None);
    assert!(
        !store.open_round("shop", &order(1, 2), None).await.unwrap(),
        "ended"
    );
    assert!(
        !store.open_round("shop", &order(2, 1), None).await.unwrap(),
        "stale model"
    );
    assert!(store.open_round("shop", &order(2, 2), None).await.unwrap());
    assert_eq!(store.open_order("shop").await.unwrap(), Some(order(2, 2)));

    let err = store
        .open_round("nowhere", &order(1, 1), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownTask(_)), "{err:?}");
}

/// Heartbeats replace each other; the replicas seen within the window
/// come back by name, the silent ones do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_heartbeat_and_the_silent_drop_out() {
    use std::time::Duration;
    let Some((pg, mut store)) = shop().await else {
        return;
    };
    store.open_task("books", &layout()).await.unwrap();
    let minute = Duration::from_secs(60);
    assert!(store.replicas("shop", minute).await.unwrap().is_empty());
    store
        .heartbeat("shop", &beat("replica-b", 3))
        .await
        .unwrap();
    store
        .heartbeat("shop", &beat("replica-a", 1))
        .await
        .unwrap();
    store
        .heartbeat("shop", &beat("replica-a", 7))
        .await
        .unwrap();
    store
        .heartbeat("books", &beat("replica-c", 1))
        .await
        .unwrap();
    assert_eq!(
        store.replicas("shop", minute).await.unwrap(),
        vec![beat("replica-a", 7), beat("replica-b", 3)]
    );

    // replica-b last beat two minutes ago.
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .execute(
            "UPDATE replica SET seen = now() - interval '2 minutes' WHERE name = 'replica-b'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        store.replicas("shop", minute).await.unwrap(),
        vec![beat("replica-a", 7)]
    );
    assert_eq!(
        store
            .replicas("shop", Duration::from_secs(180))
            .await
            .unwrap()
            .len(),
        2
    );
    // It beats again: back.
    store
        .heartbeat("shop", &beat("replica-b", 0))
        .await
        .unwrap();
    assert_eq!(store.replicas("shop", minute).await.unwrap().len(), 2);

    let err = store
        .heartbeat("nowhere", &beat("replica-a", 1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownTask(_)), "{err:?}");
}

/// Sessions: found while they last, with their remaining time; renewed in
/// place; gone once expired or ended; imported ones have no expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_last_their_ttl() {
    use std::time::Duration;
    let Some((pg, mut store)) = shop().await else {
        return;
    };
    let hour = Duration::from_secs(3600);
    assert_eq!(store.session("shop", "d1").await.unwrap(), None);
    store
        .put_session("shop", "d1", Some(("digest", 1)), hour)
        .await
        .unwrap();
    let remaining = store.session("shop", "d1").await.unwrap().unwrap().unwrap();
    assert!(
        remaining <= hour && remaining > hour - Duration::from_secs(60),
        "{remaining:?}"
    );
    assert_eq!(store.session("books", "d1").await.unwrap(), None);

    // Renewed without the token: shorter, the token kept.
    store
        .put_session("shop", "d1", None, Duration::from_secs(60))
        .await
        .unwrap();
    let remaining = store.session("shop", "d1").await.unwrap().unwrap().unwrap();
    assert!(remaining <= Duration::from_secs(60), "{remaining:?}");
    assert_eq!(
        count(
            &pg,
            "SELECT count(*) FROM session WHERE token = 'digest' AND pseudonym = 'd1'"
        )
        .await,
        1
    );

    // A ttl of zero has expired at once.
    store
        .put_session("shop", "d2", None, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(store.session("shop", "d2").await.unwrap(), None);

    store.end_session("shop", "d1").await.unwrap();
    assert_eq!(store.session("shop", "d1").await.unwrap(), None);
    store.end_session("shop", "d1").await.unwrap();

    // An imported session has no expiry.
    let ck = checkpoint(1);
    store.import_checkpoint("shop", &ck).await.unwrap();
    assert_eq!(
        store.session("shop", &ck.joined[0]).await.unwrap(),
        Some(None)
    );

    let err = store
        .put_session("nowhere", "d1", None, hour)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownTask(_)), "{err:?}");
}

/// The first catalogue recorded for a task stays: the same ids pass, other
/// ids (or another order) are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_keeps_its_catalogue() {
    let Some((_pg, store)) = shop().await else {
        return;
    };
    let ids = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    store
        .check_catalogue("shop", &ids(&["a", "b", "c"]))
        .await
        .unwrap();
    store
        .check_catalogue("shop", &ids(&["a", "b", "c"]))
        .await
        .unwrap();
    for other in [ids(&["a", "c", "b"]), ids(&["a", "b", "d"])] {
        let err = store.check_catalogue("shop", &other).await.unwrap_err();
        assert!(matches!(err, StoreError::TaskCatalogue(_)), "{err:?}");
    }
    let err = store
        .check_catalogue("nowhere", &ids(&["a"]))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::UnknownTask(_)), "{err:?}");
}

/// Under differential privacy a round's order carries the round's privacy
/// and counts it: the accountant's state is written with the order, in one
/// transaction, and not when the order is refused. Shares carry their
/// count within the clipping bound. Training stopped without a round (the
/// budget) is recorded on the current counters only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_round_is_counted_with_its_order() {
    use fedrec_coordinator::config::{DpMode, PrivacyConfig};
    use fedrec_coordinator::privacy::Mechanism;

    let Some(pg) = TestPostgres::start_or_skip() else {
        return;
    };
    let mut store = task_at_version_1(&pg).await;
    let config = PrivacyConfig {
        mode: DpMode::Central,
        noise_multiplier: 1.0,
        clip: 0.5,
        sampling_rate: Some(0.5),
        adaptive_clip: true,
        ..PrivacyConfig::default()
    };
    let mut mechanism = Mechanism::new(config, 2, Some(1));
    let mut ordered = order(1, 1);
    ordered.privacy = Some(mechanism.start_round(10).unwrap());
    let counted = PrivacyState {
        ledger: mechanism.accountant().ledger().clone(),
        clip: mechanism.clip(),
    };
    assert!(
        store
            .open_round("shop", &ordered, Some(&counted))
            .await
            .unwrap()
    );
    assert_eq!(
        store.open_order("shop").await.unwrap(),
        Some(ordered.clone())
    );
    assert_eq!(store.privacy("shop").await.unwrap(), Some(counted.clone()));
    assert!(
        !store
            .open_round("shop", &ordered, Some(&privacy(9)))
            .await
            .unwrap(),
        "one order per round"
    );
    assert_eq!(store.privacy("shop").await.unwrap(), Some(counted));

    let share = fedrec_store::Partial {
        replica: "replica-a".to_owned(),
        weighted_sum: vec![0.5; 9],
        weight: 3.0,
        within_clip: 2.5,
        selected: 3,
        accepted: 3,
        evaluation: EvalCounts::default(),
    };
    assert!(store.put_partial("shop", 1, 1, &share).await.unwrap());
    assert_eq!(store.partials("shop", 1, 1).await.unwrap(), vec![share]);

    let mut stopped = run(0);
    stopped.training_stopped = Some("privacy budget".to_owned());
    let err = store.put_run_state("shop", &run(3)).await.unwrap_err();
    assert!(matches!(err, StoreError::StaleRound { .. }), "{err:?}");
    assert_eq!(store.run_state("shop").await.unwrap(), None);
    store.put_run_state("shop", &stopped).await.unwrap();
    assert_eq!(store.run_state("shop").await.unwrap(), Some(stopped));
}

/// A token's session limit counts its sessions wherever they joined: a
/// join beyond it ends the token's oldest live sessions, which the
/// replicas can look up; other tokens' and token-less sessions are
/// untouched. The sweep deletes ended sessions and silent replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_keeps_its_session_limit_and_the_sweep_clears_the_ended() {
    use std::time::Duration;

    let Some((_pg, store)) = shop().await else {
        return;
    };
    let hour = Duration::from_secs(3600);
    let join = |pseudonym: &'static str, token: &'static str, max: u32| {
        let store = &store;
        async move {
            store
                .put_session("shop", pseudonym, Some((token, max)), hour)
                .await
                .unwrap()
        }
    };
    assert!(join("a1", "token-a", 2).await.is_empty());
    assert!(join("b1", "token-b", 2).await.is_empty());
    store
        .put_session("shop", "plain", None, hour)
        .await
        .unwrap();
    assert!(join("a2", "token-a", 2).await.is_empty());
    assert_eq!(join("a3", "token-a", 2).await, ["a1"]);
    assert_eq!(store.session("shop", "a1").await.unwrap(), None);
    assert!(store.session("shop", "a2").await.unwrap().is_some());
    assert!(store.session("shop", "b1").await.unwrap().is_some());
    assert_eq!(join("a4", "token-a", 1).await.len(), 2, "a2 and a3 go");
    let mut replaced = store.replaced_sessions("shop", hour).await.unwrap();
    replaced.sort();
    assert_eq!(replaced, ["a1", "a2", "a3"]);
    assert!(store.session("shop", "plain").await.unwrap().is_some());

    store.heartbeat("shop", &beat("gone", 0)).await.unwrap();
    let (sessions, replicas) = store.sweep("shop", Duration::ZERO).await.unwrap();
    assert_eq!((sessions, replicas), (3, 1));
    assert!(
        store
            .replaced_sessions("shop", hour)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.session("shop", "a4").await.unwrap().is_some());
}
