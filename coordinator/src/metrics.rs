//! Prometheus metrics: [`render`] writes the coordinator's counters in the
//! text exposition format, and [`serve_metrics`] answers `GET /metrics` on
//! its own HTTP port (apart from the gRPC one, so that it can stay inside
//! the operator's network).
//!
//! Only counts and durations are exported, never pseudonyms, purchases or
//! updates.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::CoordinatorError;
use crate::round::{RoundCore, TaskKind};

/// Upper bounds of the round-duration histogram, in seconds.
const DURATION_BUCKETS: [f64; 9] = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0];

/// The metrics of `core`, with the service's byte counts, as Prometheus text.
pub fn render(core: &RoundCore, bytes_in: u64, bytes_out: u64) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let history = core.history();
    let training = || history.iter().filter(|s| s.kind == TaskKind::Train);
    let completed = training().filter(|s| s.completed).count();
    let abandoned = training().filter(|s| !s.completed).count();
    metric(
        "fedrec_rounds_total",
        "counter",
        "Training rounds ended, by outcome.",
        &[
            ("{outcome=\"completed\"}".into(), completed as f64),
            ("{outcome=\"abandoned\"}".into(), abandoned as f64),
        ],
    );
    let status = core.status();
    let last = history.last();
    metric(
        "fedrec_cohort_size",
        "gauge",
        "Devices selected for the open round (or the last one).",
        &[(
            String::new(),
            if status.selected > 0 {
                status.selected
            } else {
                last.map_or(0, |s| s.selected)
            } as f64,
        )],
    );
    let accepted: usize = training().map(|s| s.participants).sum();
    let dropped: usize = training()
        .map(|s| s.selected.saturating_sub(s.participants))
        .sum();
    metric(
        "fedrec_updates_accepted_total",
        "counter",
        "Updates accepted into training rounds.",
        &[(String::new(), accepted as f64)],
    );
    metric(
        "fedrec_dropouts_total",
        "counter",
        "Selected devices whose update did not count (late, silent or refused).",
        &[(String::new(), dropped as f64)],
    );
    let rejected: Vec<(String, f64)> = core
        .rejections()
        .iter()
        .map(|(reason, n)| (format!("{{reason=\"{reason}\"}}"), *n as f64))
        .collect();
    metric(
        "fedrec_requests_rejected_total",
        "counter",
        "Requests rejected, by reason.",
        &rejected,
    );
    metric(
        "fedrec_update_bytes_received_total",
        "counter",
        "Bytes of updates received (plain updates and masked inputs).",
        &[(String::new(), bytes_in as f64)],
    );
    metric(
        "fedrec_model_bytes_sent_total",
        "counter",
        "Bytes of model parameters sent.",
        &[(String::new(), bytes_out as f64)],
    );
    let mut buckets: Vec<(String, f64)> = DURATION_BUCKETS
        .iter()
        .map(|le| {
            let n = history.iter().filter(|s| s.seconds <= *le).count();
            (format!("_bucket{{le=\"{le}\"}}"), n as f64)
        })
        .collect();
    buckets.push(("_bucket{le=\"+Inf\"}".into(), history.len() as f64));
    buckets.push(("_sum".into(), history.iter().map(|s| s.seconds).sum()));
    buckets.push(("_count".into(), history.len() as f64));
    metric(
        "fedrec_round_duration_seconds",
        "histogram",
        "Round durations.",
        &buckets,
    );
    metric(
        "fedrec_devices_joined",
        "gauge",
        "Devices that joined.",
        &[(String::new(), status.joined as f64)],
    );
    metric(
        "fedrec_model_version",
        "gauge",
        "The global model's version.",
        &[(String::new(), status.model_version as f64)],
    );
    if let Some(privacy) = core.privacy() {
        metric(
            "fedrec_privacy_epsilon",
            "gauge",
            "Differential privacy: epsilon spent so far at the configured delta.",
            &[(String::new(), privacy.epsilon())],
        );
    }
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
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}
