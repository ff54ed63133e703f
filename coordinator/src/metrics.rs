//! Prometheus metrics: [`render`] writes the coordinator's counters in the
//! OpenMetrics text format (through `prometheus-client`), and
//! [`serve_metrics`] answers `GET /metrics` on its own HTTP port (apart
//! from the gRPC one, so that it can stay inside the operator's network).
//!
//! Only counts and durations are exported, never pseudonyms, purchases or
//! updates.

use std::convert::Infallible;
use std::future::Future;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::CoordinatorError;
use crate::round::{RoundCore, TaskKind};

/// Upper bounds of the round-duration histogram, in seconds.
const DURATION_BUCKETS: [f64; 9] = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0];

/// The media type of what [`render`] writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A metric's labels, e.g. `[("outcome", "completed")]`.
type Labels = Vec<(&'static str, String)>;

/// A counter holding `n`.
fn counter(n: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(n);
    c
}

/// A gauge holding `n`.
fn gauge(n: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(n).unwrap_or(i64::MAX));
    g
}

/// The metrics of `core`, with the service's byte counts, as OpenMetrics
/// text. The values are read from the core at each call (a fresh registry
/// each time): nothing is counted twice and nothing else keeps them.
/// Counters are registered without their `_total` suffix, which the
/// format adds to their samples (`fedrec_rounds_total{outcome="…"}`);
/// `prometheus-client` ends every help text with a period.
pub fn render(core: &RoundCore, bytes_in: u64, bytes_out: u64) -> String {
    let mut registry = Registry::default();
    let history = core.history();
    let training = || history.iter().filter(|s| s.kind == TaskKind::Train);
    let completed = training().filter(|s| s.completed).count();
    let abandoned = training().filter(|s| !s.completed).count();
    let rounds = Family::<Labels, Counter>::default();
    for (outcome, n) in [("completed", completed), ("abandoned", abandoned)] {
        rounds
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc_by(n as u64);
    }
    registry.register("fedrec_rounds", "Training rounds ended, by outcome", rounds);
    let status = core.status();
    let last = history.last();
    let cohort = if status.selected > 0 {
        status.selected
    } else {
        last.map_or(0, |s| s.selected)
    };
    registry.register(
        "fedrec_cohort_size",
        "Devices selected for the open round (or the last one)",
        gauge(cohort as u64),
    );
    let accepted: usize = training().map(|s| s.participants).sum();
    let dropped: usize = training()
        .map(|s| s.selected.saturating_sub(s.participants))
        .sum();
    registry.register(
        "fedrec_updates_accepted",
        "Updates accepted into training rounds",
        counter(accepted as u64),
    );
    registry.register(
        "fedrec_dropouts",
        "Selected devices whose update did not count (late, silent or refused)",
        counter(dropped as u64),
    );
    let rejected = Family::<Labels, Counter>::default();
    for (reason, n) in core.rejections() {
        rejected
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc_by(*n);
    }
    registry.register(
        "fedrec_requests_rejected",
        "Requests rejected, by reason",
        rejected,
    );
    registry.register(
        "fedrec_update_bytes_received",
        "Bytes of updates received (plain updates and masked inputs)",
        counter(bytes_in),
    );
    registry.register(
        "fedrec_model_bytes_sent",
        "Bytes of model parameters sent",
        counter(bytes_out),
    );
    let durations = Histogram::new(DURATION_BUCKETS);
    for s in history {
        durations.observe(s.seconds);
    }
    registry.register(
        "fedrec_round_duration_seconds",
        "Round durations",
        durations,
    );
    registry.register(
        "fedrec_devices_joined",
        "Devices that joined",
        gauge(status.joined as u64),
    );
    registry.register(
        "fedrec_model_version",
        "The global model's version",
        gauge(status.model_version),
    );
    if let Some(privacy) = core.privacy() {
        let epsilon = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        epsilon.set(privacy.epsilon());
        registry.register(
            "fedrec_privacy_epsilon",
            "Differential privacy: epsilon spent so far at the configured delta",
            epsilon,
        );
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    encode(&mut out, &registry).expect("formatting into a String");
    out
}

/// Answers `GET /metrics` on `listener` with what `render` returns (e.g.
/// [`ServiceHandle::metrics`](crate::service::ServiceHandle::metrics))
/// until `shutdown` completes; anything else gets 404.
pub async fn serve_metrics<R>(listener: TcpListener, render: R, shutdown: impl Future<Output = ()>)
where
    R: Fn() -> Result<String, CoordinatorError> + Clone + Send + Sync + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics connection not accepted");
                    continue;
                }
            },
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(render, request.uri().path())) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

fn answer(
    render: impl Fn() -> Result<String, CoordinatorError>,
    path: &str,
) -> Response<Full<Bytes>> {
    let (status, body) = match (path == "/metrics").then(render) {
        Some(Ok(text)) => (StatusCode::OK, text),
        Some(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        None => (
            StatusCode::NOT_FOUND,
            "not found; try /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(CONTENT_TYPE),
    );
    response
}
