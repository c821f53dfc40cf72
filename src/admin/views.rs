//! JSON views: `/stats`, `/clusters`, `/config_dump`.

use serde_json::{Map, Value, json};

use crate::proxy::Proxy;
use crate::proxy::stats::HistogramSnapshot;
use crate::remoting::{RequestCode, ResponseCode};

pub fn request_name(code: i32) -> String {
    RequestCode(code)
        .name()
        .map_or_else(|| code.to_string(), str::to_owned)
}

pub fn response_name(code: i32) -> String {
    ResponseCode(code)
        .name()
        .map_or_else(|| code.to_string(), str::to_owned)
}

fn latency(snapshot: &HistogramSnapshot) -> Value {
    let mean = if snapshot.count == 0 {
        0.0
    } else {
        snapshot.sum_ms / snapshot.count as f64
    };
    json!({
        "count": snapshot.count,
        "mean_ms": mean,
        "p50_ms_at_most": snapshot.quantile_ms(0.5),
        "p99_ms_at_most": snapshot.quantile_ms(0.99),
    })
}

pub fn stats(proxy: &Proxy) -> Value {
    let stats = &proxy.stats;
    let requests: Map<String, Value> = stats
        .requests_by_code()
        .into_iter()
        .map(|(code, count)| (request_name(code), json!(count)))
        .collect();
    let responses: Map<String, Value> = stats
        .responses_by_code()
        .into_iter()
        .map(|(code, count)| (response_name(code), json!(count)))
        .collect();
    let messages_in: Map<String, Value> = stats
        .messages_in_by_topic()
        .into_iter()
        .map(|(topic, count)| (topic, json!(count)))
        .collect();
    let messages_out: Vec<Value> = stats
        .messages_out_by_topic_group()
        .into_iter()
        .map(|((topic, group), count)| json!({"topic": topic, "group": group, "count": count}))
        .collect();
    let mut clusters = Map::new();
    for host in stats.hosts() {
        let in_flight = proxy
            .upstreams
            .existing(host.address)
            .map_or(0, |pool| pool.in_flight());
        let cluster = clusters
            .entry(host.cluster.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(hosts) = cluster {
            hosts.insert(
                host.address.to_string(),
                json!({
                    "broker_name": host.broker_name,
                    "requests": host.requests(),
                    "errors": host.errors(),
                    "in_flight": in_flight,
                    "latency": latency(&host.latency()),
                }),
            );
        }
    }
    json!({
        "requests_by_code": requests,
        "responses_by_code": responses,
        "decode_errors": stats.decode_errors(),
        "connections": { "active": stats.connections_active(), "total": stats.connections_total() },
        "requests_active": stats.requests_active(),
        "requests_pending": stats.requests_pending(),
        "messages_in": messages_in,
        "messages_out": messages_out,
        "clusters": clusters,
    })
}

pub fn clusters(proxy: &Proxy) -> Value {
    let table = proxy.routes.snapshot();
    let clusters: Vec<Value> = table
        .clusters()
        .map(|cluster| {
            let runtime = proxy.cluster(&cluster.name);
            let hosts: Vec<Value> = cluster
                .endpoints
                .iter()
                .map(|endpoint| {
                    let pool = proxy.upstreams.existing(endpoint.address);
                    let metadata = &endpoint.metadata;
                    let balance = runtime
                        .as_ref()
                        .and_then(|runtime| {
                            runtime
                                .balancer
                                .endpoints()
                                .into_iter()
                                .find(|view| view.key == endpoint.address)
                        });
                    json!({
                        "address": endpoint.address.to_string(),
                        "broker_name": metadata.broker_name,
                        "broker_id": metadata.broker_id,
                        "perm": metadata.perm,
                        "zone": metadata.zone,
                        "priority": metadata.priority,
                        "weight": metadata.weight,
                        "connectable": pool.as_ref().is_none_or(|pool| pool.healthy()),
                        "connected_once": pool.as_ref().is_some_and(|pool| pool.connects() > 0),
                        "consecutive_connect_failures": pool.as_ref().map_or(0, |pool| pool.consecutive_connect_failures()),
                        "in_flight": pool.as_ref().map_or(0, |pool| pool.in_flight()),
                        "current_weight": balance.as_ref().map(|view| view.current_weight),
                        "ejected": balance.as_ref().is_some_and(|view| view.ejected),
                        "ejections": balance.as_ref().map_or(0, |view| view.ejections),
                    })
                })
                .collect();
            let priorities: Vec<Value> = runtime
                .as_ref()
                .map(|runtime| runtime.balancer.priority_loads())
                .unwrap_or_default()
                .into_iter()
                .map(|(priority, health, load)| json!({"priority": priority, "health": health, "load": load}))
                .collect();
            json!({
                "name": cluster.name,
                "hosts": hosts,
                "priorities": priorities,
                "retries": runtime.as_ref().map_or(0, |runtime| runtime.retries()),
            })
        })
        .collect();
    json!({ "clusters": clusters })
}

/// The configuration in force, plus (with `xds`) what the xDS client holds: subscribed names
/// with versions, the last ACK or NACK per type, waiting requests and counters.
pub fn config_dump(proxy: &Proxy) -> Value {
    let mut dump = serde_json::to_value(&**proxy.current.load())
        .unwrap_or_else(|error| json!({ "error": error.to_string() }));
    if let (Some(ondemand), Value::Object(fields)) = (proxy.ondemand(), &mut dump) {
        let state = serde_json::to_value(ondemand.view())
            .unwrap_or_else(|error| json!({ "error": error.to_string() }));
        fields.insert("xds_state".into(), state);
    }
    dump
}
