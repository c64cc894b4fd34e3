//! The admin HTTP listener (axum): `GET /metrics` in the Prometheus /
//! OpenMetrics text format. On its own address (default 127.0.0.1:7879),
//! apart from the client protocol. docs/ADMIN.md lists what it serves.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::{metrics, Broker};

/// The OpenMetrics text content type that `prometheus-client` writes.
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn router(broker: Arc<Broker>) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(broker)
}

async fn scrape(State(broker): State<Arc<Broker>>) -> impl IntoResponse {
    // Reading every partition's state takes locks briefly: off the workers.
    let text = tokio::task::spawn_blocking(move || metrics::render(&broker))
        .await
        .unwrap_or_else(|e| format!("# the scrape failed: {e}\n"));
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text)
}

/// Serves the admin routes on `listener` until `shutdown` completes.
pub async fn serve(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(broker))
        .with_graceful_shutdown(shutdown)
        .await
}
