//! Choosing an endpoint for a send or a pop: healthy endpoints first, then the best (lowest)
//! priority among them, then smooth weighted round robin by configured weight, so traffic splits
//! exactly as the weights say. The full failover balancer (dynamic weights, panic threshold,
//! outlier ejection) replaces this in `src/balance/`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use super::routes::Endpoint;

#[derive(Default)]
pub struct WeightedPicker {
    /// Smooth WRR running weights, by endpoint.
    current: Mutex<HashMap<SocketAddr, i64>>,
}

impl WeightedPicker {
    /// Picks one of `candidates`; `healthy` says which are usable now. Unhealthy endpoints are only
    /// chosen when no candidate is healthy, so a request still gets a real error from a broker.
    pub fn pick(
        &self,
        candidates: &[Arc<Endpoint>],
        healthy: impl Fn(&Endpoint) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let usable: Vec<&Arc<Endpoint>> = candidates.iter().filter(|e| healthy(e)).collect();
        let pool: Vec<&Arc<Endpoint>> = if usable.is_empty() {
            candidates.iter().collect()
        } else {
            usable
        };
        let best = pool.iter().map(|e| e.metadata.priority).min()?;
        let group: Vec<&Arc<Endpoint>> = pool
            .into_iter()
            .filter(|e| e.metadata.priority == best)
            .collect();
        let total: i64 = group.iter().map(|e| i64::from(e.metadata.weight)).sum();
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let mut chosen: Option<(&Arc<Endpoint>, i64)> = None;
        for endpoint in group {
            let running = current.entry(endpoint.address).or_insert(0);
            *running += i64::from(endpoint.metadata.weight);
            if chosen.is_none_or(|(_, best)| *running > best) {
                chosen = Some((endpoint, *running));
            }
        }
        let (endpoint, _) = chosen?;
        if let Some(running) = current.get_mut(&endpoint.address) {
            *running -= total;
        }
        Some(endpoint.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::config::EndpointMetadata;
    use std::time::Duration;

    fn endpoint(port: u16, weight: u32, priority: u32) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            cluster: "c".into(),
            metadata: EndpointMetadata {
                broker_name: format!("b{port}"),
                broker_id: 0,
                perm: 6,
                read_queue_num: 4,
                write_queue_num: 4,
                cluster_name: "C".into(),
                zone: None,
                priority,
                weight,
            },
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            pool_size: 1,
            max_in_flight: 1,
        })
    }

    #[test]
    fn picks_follow_weights_exactly_within_the_best_priority() {
        let picker = WeightedPicker::default();
        let endpoints = vec![
            endpoint(1, 300, 0),
            endpoint(2, 100, 0),
            endpoint(3, 1000, 1),
        ];
        let mut counts = HashMap::new();
        for _ in 0..400 {
            let chosen = picker.pick(&endpoints, |_| true).expect("pick");
            *counts.entry(chosen.address.port()).or_insert(0) += 1;
        }
        assert_eq!(counts.get(&1), Some(&300));
        assert_eq!(counts.get(&2), Some(&100));
        assert_eq!(
            counts.get(&3),
            None,
            "priority 1 only serves when priority 0 cannot"
        );
        let only_backup = picker
            .pick(&endpoints, |e| e.metadata.priority == 1)
            .expect("pick");
        assert_eq!(only_backup.address.port(), 3);
        let nothing_healthy = picker.pick(&endpoints, |_| false).expect("pick");
        assert_eq!(nothing_healthy.metadata.priority, 0);
        assert!(picker.pick(&[], |_| true).is_none());
    }
}
