//! The harness HTTP API (HTTP/1.1, JSON): read resources, streams and logs; put and delete
//! resources; set faults; close streams. Meant for loopback.
//!
//! - `GET /resources` — type URL → name → version
//! - `PUT|DELETE /resources/clusters/{name}` — body: [`ClusterSpec`] (Cluster + endpoints)
//! - `PUT|DELETE /resources/topics/{name}` — body: [`TopicRouteSpec`]
//! - `GET /streams`, `GET /streams/{id}`, `GET /streams/{id}/log`, `GET /metrics`
//! - `GET|PUT|DELETE /faults` — PUT body: one [`Fault`] or a list; replaces the fault set
//! - `POST /streams/{id}/close`, `POST /nodes/{node}/close`

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::harness::{Fault, Harness};
use crate::spec::{ClusterSpec, TopicRouteSpec};
use crate::store::Store;
use crate::types;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What the API reads and changes.
#[derive(Debug, Clone)]
pub struct Admin {
    pub store: Arc<Store>,
    pub harness: Arc<Harness>,
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve_admin(listener: TcpListener, admin: Admin, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection error");
            }
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn json<T: Serialize>(status: StatusCode, body: &T) -> Reply {
    match serde_json::to_vec_pretty(body) {
        Ok(bytes) => {
            let mut resp = Response::new(Full::new(Bytes::from(bytes)));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()).into_reply(),
    }
}

/// A 4xx/5xx answer, turned into a JSON `{"error": ...}` reply at the end of a request.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn into_reply(self) -> Reply {
        let body = serde_json::json!({ "error": self.message }).to_string();
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = self.status;
        resp
    }
}

fn error(status: StatusCode, message: &str) -> ApiError {
    ApiError {
        status,
        message: message.to_owned(),
    }
}

/// Decodes `%XX` escapes in a path segment (topics such as `%RETRY%group` need them).
fn percent_decode(s: &str) -> Result<String, ApiError> {
    let bad = || {
        error(
            StatusCode::BAD_REQUEST,
            &format!("bad percent-encoding in {s:?}"),
        )
    };
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next().ok_or_else(bad)?, bytes.next().ok_or_else(bad)?];
            let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

async fn read_json<T: for<'de> Deserialize<'de>>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("body over {MAX_BODY_BYTES} bytes"),
                )
            } else {
                error(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}"))
            }
        })?;
    serde_json::from_slice(&body.to_bytes())
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}")))
}

/// Puts the path's name into the body's `field`, refusing a body that names something else.
fn named(
    mut body: serde_json::Value,
    field: &str,
    name: &str,
) -> Result<serde_json::Value, ApiError> {
    let obj = body
        .as_object_mut()
        .ok_or_else(|| error(StatusCode::BAD_REQUEST, "body must be a JSON object"))?;
    match obj.get(field).and_then(|v| v.as_str()) {
        Some(n) if n != name => Err(error(
            StatusCode::BAD_REQUEST,
            &format!("body {field} {n:?} differs from path {name:?}"),
        )),
        _ => {
            obj.insert(field.to_owned(), name.into());
            Ok(body)
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Faults {
    One(Fault),
    Many(Vec<Fault>),
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Reply {
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        let result = match (&method, segments.as_slice()) {
            (&Method::GET, ["resources"]) => Ok(json(StatusCode::OK, &self.store.versions())),
            (&Method::PUT, ["resources", "clusters", name]) => self.put_cluster(req, name).await,
            (&Method::DELETE, ["resources", "clusters", name]) => {
                self.delete(&[types::CLUSTER, types::CLUSTER_LOAD_ASSIGNMENT], name)
            }
            (&Method::PUT, ["resources", "topics", name]) => self.put_topic(req, name).await,
            (&Method::DELETE, ["resources", "topics", name]) => {
                self.delete(&[types::TOPIC_ROUTE], name)
            }
            (&Method::GET, ["streams"]) => Ok(json(StatusCode::OK, &self.harness.stream_infos())),
            (&Method::GET, ["streams", id]) => self.stream_id(id).and_then(|id| {
                let info = self.harness.stream_info(id).ok_or_else(|| no_stream(id))?;
                Ok(json(StatusCode::OK, &info))
            }),
            (&Method::GET, ["streams", id, "log"]) => self.stream_id(id).and_then(|id| {
                let log = self.harness.stream_log(id).ok_or_else(|| no_stream(id))?;
                Ok(json(StatusCode::OK, &log))
            }),
            (&Method::POST, ["streams", id, "close"]) => self.stream_id(id).and_then(|id| {
                if self.harness.close_stream(id) {
                    Ok(json(StatusCode::OK, &serde_json::json!({ "closed": 1 })))
                } else {
                    Err(error(
                        StatusCode::NOT_FOUND,
                        &format!("no open stream {id}"),
                    ))
                }
            }),
            (&Method::POST, ["nodes", node, "close"]) => percent_decode(node).map(|node| {
                json(
                    StatusCode::OK,
                    &serde_json::json!({ "closed": self.harness.close_node(&node) }),
                )
            }),
            (&Method::GET, ["metrics"]) => Ok(json(StatusCode::OK, &self.harness.metrics())),
            (&Method::GET, ["faults"]) => Ok(json(StatusCode::OK, &self.harness.faults())),
            (&Method::PUT, ["faults"]) => match read_json::<Faults>(req).await {
                Ok(Faults::One(f)) => Ok(self.set_faults(vec![f])),
                Ok(Faults::Many(fs)) => Ok(self.set_faults(fs)),
                Err(e) => Err(e),
            },
            (&Method::DELETE, ["faults"]) => Ok(self.set_faults(Vec::new())),
            (_, ["resources" | "streams" | "faults" | "metrics" | "nodes", ..]) => Err(error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{method} {path} is not supported"),
            )),
            _ => Err(error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: {path}"),
            )),
        };
        result.unwrap_or_else(ApiError::into_reply)
    }

    fn stream_id(&self, id: &str) -> Result<u64, ApiError> {
        id.parse().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                &format!("stream id {id:?} is not a number"),
            )
        })
    }

    async fn put_cluster(&self, req: Request<Incoming>, name: &str) -> Result<Reply, ApiError> {
        let name = percent_decode(name)?;
        let body = named(read_json(req).await?, "name", &name)?;
        let spec: ClusterSpec = serde_json::from_value(body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad cluster: {e}")))?;
        let built = spec
            .build()
            .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()))?;
        let versions = serde_json::json!({
            "cluster": built.cluster.version, "endpoints": built.load_assignment.version,
        });
        let changed = self
            .store
            .upsert_many([built.cluster, built.load_assignment]);
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "name": name, "changed": changed, "versions": versions }),
        ))
    }

    async fn put_topic(&self, req: Request<Incoming>, name: &str) -> Result<Reply, ApiError> {
        let name = percent_decode(name)?;
        let body = named(read_json(req).await?, "topic", &name)?;
        let spec: TopicRouteSpec = serde_json::from_value(body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad topic route: {e}")))?;
        let built = spec
            .build()
            .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()))?;
        let version = built.version.clone();
        let changed = self.store.upsert(built);
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "name": name, "changed": changed, "version": version }),
        ))
    }

    fn delete(&self, type_urls: &[&str], name: &str) -> Result<Reply, ApiError> {
        let name = percent_decode(name)?;
        let deleted = type_urls
            .iter()
            .filter(|t| self.store.delete(t, &name))
            .count();
        if deleted == 0 {
            return Err(error(
                StatusCode::NOT_FOUND,
                &format!("no resource {name:?}"),
            ));
        }
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "name": name, "deleted": deleted }),
        ))
    }

    fn set_faults(&self, faults: Vec<Fault>) -> Reply {
        let old = self.harness.set_faults(faults);
        // Names whose answer the old or new faults change are re-examined by every stream.
        let mut touched: Vec<String> = old
            .into_iter()
            .chain(self.harness.faults())
            .map(|f| f.type_url)
            .collect();
        touched.sort();
        touched.dedup();
        for type_url in touched {
            self.store.notify_type(&type_url);
        }
        json(StatusCode::OK, &self.harness.faults())
    }
}

fn no_stream(id: u64) -> ApiError {
    error(StatusCode::NOT_FOUND, &format!("no stream {id}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::{Duration, timeout};

    async fn start() -> (
        std::net::SocketAddr,
        Admin,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let admin = Admin {
            store: Arc::new(Store::new()),
            harness: Arc::new(Harness::default()),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve_admin(listener, admin.clone(), async {
            let _ = rx.await;
        }));
        (addr, admin, tx)
    }

    /// A bare HTTP/1.1 exchange: (status, body).
    async fn call(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, String) {
        timeout(Duration::from_secs(5), async {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!(
                "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            let status = out[9..12].parse().unwrap();
            let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
            (status, body)
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn resources_can_be_put_read_and_deleted() {
        let (addr, admin, _stop) = start().await;
        let cluster = r#"{"endpoints":[{"address":"10.0.0.1:10911","broker_name":"broker-a","broker_id":0}],"lb_policy":"random"}"#;
        let (status, body) = call(addr, "PUT", "/resources/clusters/topic-a", cluster).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"changed\": 2"), "{body}");
        let (_, body) = call(addr, "PUT", "/resources/clusters/topic-a", cluster).await;
        assert!(
            body.contains("\"changed\": 0"),
            "identical content is a no-op: {body}"
        );
        let (status, _) = call(
            addr,
            "PUT",
            "/resources/topics/%25RETRY%25g",
            r#"{"cluster":"topic-a"}"#,
        )
        .await;
        assert_eq!(status, 200);
        assert!(admin.store.get(types::TOPIC_ROUTE, "%RETRY%g").is_some());
        let (status, body) = call(addr, "GET", "/resources", "").await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v[types::CLUSTER]["topic-a"].is_string());
        assert!(v[types::CLUSTER_LOAD_ASSIGNMENT]["topic-a"].is_string());
        assert_eq!(
            call(addr, "DELETE", "/resources/clusters/topic-a", "")
                .await
                .0,
            200
        );
        assert_eq!(
            call(addr, "DELETE", "/resources/clusters/topic-a", "")
                .await
                .0,
            404
        );
    }

    #[tokio::test]
    async fn errors_are_clear_4xx() {
        let (addr, _admin, _stop) = start().await;
        let (status, body) = call(addr, "PUT", "/resources/clusters/a", "{").await;
        assert_eq!(status, 400);
        assert!(body.contains("bad JSON"), "{body}");
        let (status, body) = call(addr, "PUT", "/resources/clusters/a", r#"{"name":"b"}"#).await;
        assert_eq!(status, 400);
        assert!(body.contains("differs from path"), "{body}");
        let (status, body) = call(
            addr,
            "PUT",
            "/resources/clusters/a",
            r#"{"lb_policy":"fastest"}"#,
        )
        .await;
        assert_eq!(status, 400);
        assert!(body.contains("unknown variant"), "{body}");
        let (status, body) = call(
            addr,
            "PUT",
            "/resources/clusters/a",
            r#"{"endpoints":[{"address":"nohost"}]}"#,
        )
        .await;
        assert_eq!(status, 422);
        assert!(body.contains("bad address"), "{body}");
        let big = format!("{{\"x\":\"{}\"}}", "y".repeat(MAX_BODY_BYTES));
        assert_eq!(call(addr, "PUT", "/resources/topics/t", &big).await.0, 413);
        assert_eq!(call(addr, "GET", "/nope", "").await.0, 404);
        assert_eq!(call(addr, "PATCH", "/resources", "").await.0, 405);
        assert_eq!(call(addr, "GET", "/streams/x/log", "").await.0, 400);
        assert_eq!(call(addr, "GET", "/streams/7/log", "").await.0, 404);
        assert_eq!(call(addr, "POST", "/streams/7/close", "").await.0, 404);
    }

    #[tokio::test]
    async fn faults_streams_and_metrics() {
        let (addr, admin, _stop) = start().await;
        let (status, body) = call(
            addr,
            "PUT",
            "/faults",
            r#"{"type":"clusters","name":"a","invalid":true}"#,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(admin.harness.is_invalid(types::CLUSTER, "a"));
        let (status, _) = call(
            addr,
            "PUT",
            "/faults",
            r#"[{"type":"topics","delay_ms":5},{"type":"topics","drop":true}]"#,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(admin.harness.faults().len(), 2);
        assert_eq!(
            call(addr, "PUT", "/faults", r#"{"type":"topics","explode":1}"#)
                .await
                .0,
            400
        );
        assert_eq!(call(addr, "DELETE", "/faults", "").await.0, 200);
        assert!(admin.harness.faults().is_empty());
        let (id, _rx) = admin.harness.open_stream();
        admin.harness.set_node(id, "n1");
        let (_, body) = call(addr, "GET", "/streams", "").await;
        assert!(body.contains("\"node\": \"n1\""), "{body}");
        assert_eq!(
            call(addr, "GET", &format!("/streams/{id}/log"), "").await.0,
            200
        );
        let (_, body) = call(addr, "POST", "/nodes/n1/close", "").await;
        assert!(body.contains("\"closed\": 1"), "{body}");
        let (status, body) = call(addr, "GET", "/metrics", "").await;
        assert_eq!(status, 200);
        assert!(body.contains("push_latency_us_max"));
    }
}
