//! The store against a real PostgreSQL: each test starts its own server
//! ([`TestPostgres`]) in a temporary directory on a free port.

use fedrec_coordinator::history::TaskKind;
use fedrec_coordinator::privacy::accountant::MechanismLog;
use fedrec_proto::{EvalCounts, Layout};
use fedrec_store::migrate::{MIGRATIONS, SCHEMA_VERSION};
use fedrec_store::testing::{PASSWORD_ROLE, TestPostgres};
use fedrec_store::{Checkpoint, NewVersion, PrivacyState, RoundSummary, Store, StoreError};

fn layout() -> Layout {
    Layout::new(vec![
        ("item_factors".to_owned(), vec![3, 2]),
        ("item_bias".to_owned(), vec![3]),
    ])
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
    let pg = TestPostgres::start();
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
    let pg = TestPostgres::start();
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
    let pg = TestPostgres::start();
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
    let pg = TestPostgres::start();
    let mut store = Store::connect(&pg.url()).await.unwrap();
    store.open_task("shop", &layout()).await.unwrap();
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
    let pg = TestPostgres::start();
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
    let pg = TestPostgres::start();
    let mut store = Store::connect(&pg.url()).await.unwrap();
    store.open_task("shop", &layout()).await.unwrap();
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
    let mut pg = TestPostgres::start();
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
    let pg = TestPostgres::start();
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
    let pg = TestPostgres::start();
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
    let pg = TestPostgres::start();
    let mut store = Store::connect(&pg.url()).await.unwrap();
    store.open_task("shop", &layout()).await.unwrap();
    let share = |replica: &str, scale: f32| Partial {
        replica: replica.to_owned(),
        weighted_sum: odd_params()
            .iter()
            .map(|_| scale)
            .chain([scale * 2.0])
            .collect(),
        weight: f64::from(scale) * 3.0,
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
/// a version-1 store (version 2's table and row taken away again) with a
/// task in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_schema_is_upgraded_and_keeps_its_data() {
    let pg = TestPostgres::start();
    let mut store = Store::connect(&pg.url()).await.unwrap();
    store.open_task("shop", &layout()).await.unwrap();
    drop(store);
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute("DROP TABLE partial_sum; DELETE FROM schema_version WHERE version = 2")
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
    assert_eq!(SCHEMA_VERSION, 2);
    store.open_task("shop", &layout()).await.unwrap();
    let share = fedrec_store::Partial {
        replica: "a".to_owned(),
        weighted_sum: vec![0.0; 9],
        weight: 1.0,
        accepted: 1,
        evaluation: EvalCounts::default(),
    };
    assert!(store.put_partial("shop", 1, 1, &share).await.unwrap());
}
