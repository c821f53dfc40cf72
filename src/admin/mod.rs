//! The admin HTTP endpoint (hyper, loopback by default): `/ready`, `/stats`, `/metrics`,
//! `/clusters` and `/config_dump`. It only reads the sidecar's counters and snapshots; nothing on
//! the request path waits for it.

mod prometheus;
mod views;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::log_throttle::LogThrottle;
use crate::proxy::Proxy;

/// Refused admin connections are logged at most once a second.
static REFUSED_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(1));

/// Serves until the task is dropped: through a graceful shutdown too, so `/ready` can say
/// "draining" while requests in flight finish. Dropping it closes its connections as well.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    let admin = &proxy.config.admin;
    let slots = Arc::new(Semaphore::new(admin.max_connections));
    let header_timeout = Duration::from_millis(admin.header_timeout_ms);
    let mut connections = JoinSet::new();
    loop {
        let accepted = listener.accept().await;
        while connections.try_join_next().is_some() {}
        let (socket, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Some(skipped) = REFUSED_LOG.allow() {
                warn!(%peer, limit = admin.max_connections, skipped, "admin connection refused: too many open");
            }
            continue;
        };
        let proxy = proxy.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&proxy, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            if let Err(error) = builder
                .serve_connection(TokioIo::new(socket), service)
                .await
            {
                debug!(%error, "admin connection ended with an error");
            }
            drop(slot);
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(error) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            error.to_string(),
        ),
    }
}

const PATHS: [&str; 6] = [
    "/ready",
    "/stats",
    "/metrics",
    "/clusters",
    "/config_dump",
    "/consumers",
];

/// Ready unless draining. With xDS, not ready before the first connection to the control plane
/// when there is no static route to fall back on; afterwards ready, with the connection state in
/// the body (known topics keep working through an outage, new ones wait for the control plane).
fn ready(proxy: &Proxy) -> Response<Full<Bytes>> {
    let Some(ondemand) = proxy.ondemand() else {
        return reply(StatusCode::OK, "text/plain", "ready\n");
    };
    let snapshot = ondemand.client_snapshot();
    let topics = snapshot
        .types
        .get(rocketmesh_xds::types::TOPIC_ROUTE)
        .map_or(0, |topics| topics.subscribed.len());
    if snapshot.connected {
        return reply(
            StatusCode::OK,
            "text/plain",
            format!(
                "ready\nxds: connected to {} ({topics} topics subscribed)\n",
                snapshot.address
            ),
        );
    }
    let never_connected = !snapshot.ever_connected;
    let reason = snapshot.last_error.unwrap_or_else(|| "connecting".into());
    if never_connected && proxy.current.load().routes.is_empty() {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!(
                "not ready\nxds: not connected to {} yet ({reason})\n",
                snapshot.address
            ),
        );
    }
    reply(
        StatusCode::OK,
        "text/plain",
        format!(
            "ready\nxds: disconnected from {} ({reason}); {topics} known topics are served, new topics wait for the control plane\n",
            snapshot.address
        ),
    )
}

fn respond(proxy: &Proxy, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if request.method() != Method::GET {
        return if PATHS.contains(&path) {
            reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n")
        } else {
            reply(StatusCode::NOT_FOUND, "text/plain", "not found\n")
        };
    }
    match path {
        "/ready" if proxy.draining.load(Ordering::Acquire) => {
            reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
        }
        "/ready" => ready(proxy),
        "/stats" => json(&views::stats(proxy)),
        "/clusters" => json(&views::clusters(proxy)),
        "/config_dump" => json(&views::config_dump(proxy)),
        "/consumers" => json(&proxy.pullpop.view()),
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            prometheus::render(proxy),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("not found; try {}\n", PATHS.join(", ")),
        ),
    }
}
