//! Nothing personal is ever logged: every log line the SDK and the
//! coordinator write at the most verbose level, during rounds, recommendations
//! and forget-me, is captured and searched for the shopper's items and the
//! values of their private embedding.
//!
//! Its own test binary: it installs the process-wide log subscriber.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use fedrec_client::Client;
use fedrec_client::consent::Consent;
use fedrec_client::store::Purchase;

/// Collects everything written to it.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The catalogue is large enough for item ids of four digits, which no
/// count or round number in these logs reaches.
const ITEMS: usize = 5000;
const BOUGHT: [u32; 4] = [4093, 4721, 3307, 2861];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_item_or_embedding_value_is_ever_logged() {
    let capture = Capture::default();
    let sink = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter("fedrec_client=trace,fedrec_coordinator=trace,fedrec_proto=trace")
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .init();

    let model = common::model(ITEMS, 8);
    let mut cfg = common::config(2, 1);
    cfg.rounds.final_evaluation = true;
    let running = common::start(cfg, &model, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let client = Client::builder(Arc::clone(&model))
        .store(
            dir.path().join("store"),
            fedrec_client::vault::StoreKey::generate().unwrap(),
        )
        .seed(9)
        .open()
        .unwrap();
    client.set_consent(Consent::Federated).unwrap();
    let now = fedrec_client::clock::Clock::unix_now(&fedrec_client::clock::SystemClock::new());
    for item in BOUGHT {
        client.record(Purchase::new(item, now, 2.0)).unwrap();
    }
    common::within("connect", client.connect(&running.endpoint))
        .await
        .unwrap();
    let mut embeddings = Vec::new();
    for _ in 0..4 {
        let s = common::within("participate", client.participate())
            .await
            .unwrap();
        embeddings.extend(client.with_device(|d| d.private_embedding().to_vec()));
        if s.trained + s.evaluated == 0 {
            break;
        }
    }
    common::within("model", client.refresh_model())
        .await
        .unwrap();
    let recs = client.recommend(10).unwrap();
    client.explain(recs.items[0]).unwrap();
    embeddings.extend(client.with_device(|d| d.private_embedding().to_vec()));
    client.set_consent(Consent::OnDevice).unwrap();
    client.forget_me().unwrap();
    running.stop().await;

    let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("round completed") && text.contains("consent changed"),
        "the capture works: {text}"
    );
    // Whole tokens, so that a hex pseudonym or a port does not match by chance.
    let tokens: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
        .filter(|t| !t.is_empty())
        .collect();
    for item in BOUGHT.iter().chain(&recs.items) {
        let s = item.to_string();
        assert!(!tokens.contains(&s.as_str()), "item {item} was logged");
    }
    for v in embeddings {
        for s in [v.to_string(), format!("{v:?}")] {
            assert!(
                !tokens.contains(&s.as_str()),
                "embedding value {s} was logged"
            );
        }
    }
}
