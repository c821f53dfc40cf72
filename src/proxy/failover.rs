//! Each cluster's live balancing state: the balancer over its endpoints (kept across route-table
//! swaps), the retry budget, and the health checks that bring down endpoints back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::{debug, info};

use super::Proxy;
use super::config::BalancerSettings;
use super::routes::{Cluster, Endpoint, RouteAction};
use super::striped::Striped;
use super::upstream::UpstreamError;
use crate::balance::{Balancer, EndpointSpec, Outcome, Picked, SystemClock, ThreadRandom};
use crate::remoting::body::{HeartbeatData, JsonBody};
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};

/// Retries always allowed on top of the budget's share, so a quiet cluster can still fail over.
const RETRY_FLOOR: u64 = 10;

pub struct ClusterRuntime {
    pub name: String,
    pub balancer: Balancer<SocketAddr>,
    pub settings: BalancerSettings,
    /// Sends begun, per serving thread (each send counts one; only a retry reads them).
    sends: Striped<AtomicU64>,
    retries: AtomicU64,
}

fn specs(cluster: &Cluster) -> Vec<EndpointSpec<SocketAddr>> {
    cluster
        .endpoints
        .iter()
        .map(|endpoint| EndpointSpec {
            key: endpoint.address,
            max_weight: f64::from(endpoint.metadata.weight),
            min_weight: 0.0,
            priority: endpoint.metadata.priority,
            zone: endpoint.metadata.zone.clone(),
        })
        .collect()
}

impl ClusterRuntime {
    pub fn new(cluster: &Cluster) -> Self {
        let balancer = Balancer::new(
            cluster.balancer.to_balancer_config(),
            Arc::new(SystemClock::default()),
        );
        balancer.update(specs(cluster));
        Self {
            name: cluster.name.clone(),
            balancer,
            settings: cluster.balancer.clone(),
            sends: Striped::default(),
            retries: AtomicU64::new(0),
        }
    }

    /// Applies a new definition of the cluster; endpoints that stay keep their weights.
    pub fn update(&self, cluster: &Cluster) {
        let result = self.balancer.update(specs(cluster));
        if !result.added.is_empty() || !result.removed.is_empty() || !result.changed.is_empty() {
            info!(cluster = %self.name, added = ?result.added, removed = ?result.removed, changed = ?result.changed, "cluster endpoints updated");
        }
    }

    /// An endpoint of the route that passes `usable` and was not `tried`, chosen by the balancer.
    /// Endpoints that are not `connectable` (in reconnect backoff) are skipped while another
    /// candidate is, and chosen only when nothing else is left.
    pub fn pick(
        &self,
        cluster: &Cluster,
        action: &RouteAction,
        usable: impl Fn(&Endpoint) -> bool,
        connectable: impl Fn(SocketAddr) -> bool,
        tried: &[SocketAddr],
    ) -> Option<(Arc<Endpoint>, Picked<SocketAddr>)> {
        let allowed = |endpoint: &Arc<Endpoint>| {
            usable(endpoint)
                && !tried.contains(&endpoint.address)
                && action.endpoints().any(|e| Arc::ptr_eq(e, endpoint))
        };
        // The common case: every endpoint may take it, and nothing is to be excluded.
        if cluster
            .endpoints
            .iter()
            .all(|endpoint| allowed(endpoint) && connectable(endpoint.address))
        {
            let picked = self.balancer.pick_excluding(&mut ThreadRandom, &[])?;
            return self.endpoint_for(cluster, picked);
        }
        let mut exclude: Vec<SocketAddr> = cluster
            .endpoints
            .iter()
            .filter(|endpoint| !allowed(endpoint))
            .map(|endpoint| endpoint.address)
            .collect();
        let excluded = exclude.len();
        let backing_off: Vec<SocketAddr> = cluster
            .endpoints
            .iter()
            .filter(|endpoint| allowed(endpoint) && !connectable(endpoint.address))
            .map(|endpoint| endpoint.address)
            .collect();
        exclude.extend(backing_off);
        let picked = self
            .balancer
            .pick_excluding(&mut ThreadRandom, &exclude)
            .or_else(|| {
                let backing_off = exclude.len() > excluded;
                backing_off
                    .then(|| {
                        self.balancer
                            .pick_excluding(&mut ThreadRandom, &exclude[..excluded])
                    })
                    .flatten()
            })?;
        self.endpoint_for(cluster, picked)
    }

    /// The endpoint the balancer picked; `None` (and the pick given back) if the cluster no
    /// longer has it.
    fn endpoint_for(
        &self,
        cluster: &Cluster,
        picked: Picked<SocketAddr>,
    ) -> Option<(Arc<Endpoint>, Picked<SocketAddr>)> {
        let endpoint = cluster
            .endpoints
            .iter()
            .find(|endpoint| endpoint.address == picked.key)
            .cloned();
        match endpoint {
            Some(endpoint) => Some((endpoint, picked)),
            None => {
                self.balancer.report(picked, Outcome::Success);
                None
            }
        }
    }

    pub fn record_send(&self) {
        let stripe = self.sends.local();
        stripe.add(stripe.value, 1);
    }

    /// Whether retry number `attempt` (1 for the first retry) fits the per-request cap and the
    /// cluster's budget; counts it if so.
    pub fn may_retry(&self, attempt: u32) -> bool {
        if attempt > self.settings.max_retries {
            return false;
        }
        let sends: u64 = self
            .sends
            .all()
            .map(|sends| sends.load(Ordering::Relaxed))
            .sum();
        let allowed = (sends as f64 * self.settings.retry_budget) as u64 + RETRY_FLOOR;
        self.retries
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |retries| {
                (retries < allowed).then_some(retries + 1)
            })
            .is_ok()
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }
}

/// A response in either form, for its code.
pub trait Coded {
    fn code(&self) -> i32;
}

impl Coded for RemotingCommand {
    fn code(&self) -> i32 {
        self.code
    }
}

impl Coded for crate::remoting::raw::Outgoing {
    fn code(&self) -> i32 {
        crate::remoting::raw::Outgoing::code(self)
    }
}

/// How an attempt counts for the balancer: no answer, SYSTEM_BUSY and SERVICE_NOT_AVAILABLE are
/// failures; any other answer means the broker is alive and serving.
pub fn outcome_of<R: Coded>(result: &Result<Option<R>, UpstreamError>) -> Outcome {
    match result {
        Err(_) => Outcome::Failure,
        Ok(Some(response))
            if response.code() == ResponseCode::SYSTEM_BUSY.0
                || response.code() == ResponseCode::SERVICE_NOT_AVAILABLE.0 =>
        {
            Outcome::Failure
        }
        Ok(_) => Outcome::Success,
    }
}

/// Probes endpoints at their minimum weight with a real request (a heartbeat) at each cluster's
/// interval; each answer is a passing check. Also repairs group totals.
pub async fn health_checks(proxy: Arc<Proxy>) {
    let probe_body = HeartbeatData {
        client_id: format!("rocketmesh-health-check@{}", std::process::id()),
        ..HeartbeatData::default()
    }
    .to_json()
    .unwrap_or_default();
    loop {
        // The shortest interval of the clusters in force (a reload may change them).
        let interval = proxy
            .routes
            .snapshot()
            .clusters()
            .map(|cluster| cluster.balancer.health_check_interval_ms)
            .min()
            .unwrap_or(1_000)
            .max(10);
        tokio::time::sleep(Duration::from_millis(interval)).await;
        let table = proxy.routes.snapshot();
        for cluster in table.clusters() {
            let Some(runtime) = proxy.cluster(&cluster.name) else {
                continue;
            };
            runtime.balancer.resync();
            for address in runtime.balancer.check_candidates() {
                let Some(endpoint) = table.endpoint_at(address) else {
                    continue;
                };
                let probe = RemotingCommand::request(RequestCode::HEART_BEAT, 0)
                    .with_body(probe_body.clone());
                let pool = proxy.pool(&endpoint);
                let passed = pool
                    .call(probe, endpoint.connect_timeout + endpoint.request_timeout)
                    .await
                    .is_ok();
                debug!(cluster = %cluster.name, %address, passed, "health check");
                runtime.balancer.check_result(&address, passed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::SidecarConfig;
    use crate::proxy::routes::RouteTable;

    #[test]
    fn endpoints_in_backoff_are_skipped_while_another_can_serve() {
        let config = SidecarConfig::parse(
            r#"
listeners: [{ address: "127.0.0.1:0" }]
routes: [{ match: { topic: { prefix: "" } }, route: { cluster: c } }]
clusters:
  - name: c
    endpoints:
      - { address: "127.0.0.1:1", metadata: { broker_name: a, cluster_name: C } }
      - { address: "127.0.0.1:2", metadata: { broker_name: b, cluster_name: C } }
"#,
        )
        .expect("config");
        let table = RouteTable::from_config(&config).expect("table");
        let action = table.lookup("T", 10).expect("route");
        let runtime = ClusterRuntime::new(&action.cluster);
        let backing_off: SocketAddr = "127.0.0.1:1".parse().expect("address");
        for _ in 0..200 {
            let (endpoint, picked) = runtime
                .pick(
                    &action.cluster,
                    &action,
                    |_| true,
                    |a| a != backing_off,
                    &[],
                )
                .expect("a pick");
            assert_ne!(endpoint.address, backing_off);
            runtime.balancer.report(picked, Outcome::Success);
        }
        // With nothing else left, an endpoint in backoff is still tried.
        let (endpoint, _) = runtime
            .pick(
                &action.cluster,
                &action,
                |_| true,
                |a| a != backing_off,
                &["127.0.0.1:2".parse().expect("address")],
            )
            .expect("a pick");
        assert_eq!(endpoint.address, backing_off);
        assert!(
            runtime
                .pick(&action.cluster, &action, |_| true, |_| false, &[])
                .is_some(),
            "every endpoint in backoff: one is still tried"
        );
    }
}
