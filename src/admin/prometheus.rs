//! `/metrics` in the Prometheus text format (0.0.4). RocketMQ's own names are used where the
//! meaning matches: `rocketmq_messages_in_total` / `rocketmq_messages_out_total` (the 5.x broker's
//! counters) and `rocketmq_send_cost_time` (the 5.x client's send histogram, in ms, with an extra
//! 800 ms bound); the rest are `rocketmesh_*`.

use std::fmt::Write;
use std::sync::Arc;

use super::views::{request_name, response_name};
use crate::proxy::Proxy;
use crate::proxy::stats::{HistogramSnapshot, HostStats, LATENCY_BOUNDS_MS};

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{key}=\"{}\"", escape(value)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, pairs: &[(&str, &str)], snapshot: &HistogramSnapshot) {
    for (bound, cumulative) in LATENCY_BOUNDS_MS.iter().zip(&snapshot.cumulative) {
        let bound = bound.to_string();
        let mut with_le = pairs.to_vec();
        with_le.push(("le", &bound));
        let _ = writeln!(out, "{name}_bucket{} {cumulative}", labels(&with_le));
    }
    let mut with_le = pairs.to_vec();
    with_le.push(("le", "+Inf"));
    let _ = writeln!(out, "{name}_bucket{} {}", labels(&with_le), snapshot.count);
    let _ = writeln!(out, "{name}_sum{} {}", labels(pairs), snapshot.sum_ms);
    let _ = writeln!(out, "{name}_count{} {}", labels(pairs), snapshot.count);
}

/// A family with one unlabelled sample.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// A counter family with one sample per code, labelled with the code and its name.
fn by_code(
    out: &mut String,
    name: &str,
    help: &str,
    counts: &[(i32, u64)],
    namer: fn(i32) -> String,
) {
    family(out, name, "counter", help);
    for (code, count) in counts {
        let code_text = code.to_string();
        let code_name = namer(*code);
        let _ = writeln!(
            out,
            "{name}{} {count}",
            labels(&[("code", &code_text), ("name", &code_name)])
        );
    }
}

/// A family with one sample per upstream endpoint.
fn per_host(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    hosts: &[(Arc<HostStats>, String)],
    value: impl Fn(&HostStats) -> u64,
) {
    family(out, name, kind, help);
    for (host, address) in hosts {
        let pairs = [
            ("cluster", host.cluster.as_str()),
            ("broker", host.broker_name.as_str()),
            ("host", address.as_str()),
        ];
        let _ = writeln!(out, "{name}{} {}", labels(&pairs), value(host));
    }
}

pub fn render(proxy: &Proxy) -> String {
    let stats = &proxy.stats;
    let mut out = String::new();
    let out = &mut out;

    by_code(
        out,
        "rocketmesh_requests_total",
        "Requests received from clients, by request code.",
        &stats.requests_by_code(),
        request_name,
    );
    by_code(
        out,
        "rocketmesh_responses_total",
        "Responses sent to clients, by response code.",
        &stats.responses_by_code(),
        response_name,
    );
    single(
        out,
        "rocketmesh_request_decode_errors_total",
        "counter",
        "Client frames that could not be decoded (each closed its connection).",
        stats.decode_errors(),
    );
    single(
        out,
        "rocketmesh_downstream_connections",
        "gauge",
        "Client connections open now.",
        stats.connections_active(),
    );
    single(
        out,
        "rocketmesh_downstream_connections_total",
        "counter",
        "Client connections accepted.",
        stats.connections_total(),
    );
    single(
        out,
        "rocketmesh_requests_active",
        "gauge",
        "Client requests being handled now.",
        stats.requests_active(),
    );
    single(
        out,
        "rocketmesh_requests_pending",
        "gauge",
        "Client requests waiting for a route now.",
        stats.requests_pending(),
    );

    let hosts: Vec<(Arc<HostStats>, String)> = stats
        .hosts()
        .into_iter()
        .map(|host| {
            let address = host.address.to_string();
            (host, address)
        })
        .collect();
    per_host(
        out,
        "rocketmesh_upstream_requests_total",
        "counter",
        "Requests sent to a broker endpoint.",
        &hosts,
        HostStats::requests,
    );
    per_host(
        out,
        "rocketmesh_upstream_errors_total",
        "counter",
        "Requests to a broker endpoint that got no response (connect failure, timeout, overload, closed connection).",
        &hosts,
        HostStats::errors,
    );
    per_host(
        out,
        "rocketmesh_upstream_in_flight",
        "gauge",
        "Requests to a broker endpoint awaiting their response now.",
        &hosts,
        |host| {
            proxy
                .upstreams
                .existing(host.address)
                .map_or(0, |pool| pool.in_flight() as u64)
        },
    );
    family(
        out,
        "rocketmesh_upstream_request_duration_milliseconds",
        "histogram",
        "Time from sending a request to a broker to its response, in ms.",
    );
    for (host, address) in &hosts {
        let pairs = [
            ("cluster", host.cluster.as_str()),
            ("broker", host.broker_name.as_str()),
            ("host", address.as_str()),
        ];
        histogram(
            out,
            "rocketmesh_upstream_request_duration_milliseconds",
            &pairs,
            &host.latency(),
        );
    }

    // One row per endpoint, then one family at a time: a family's samples must stay together.
    let table = proxy.routes.snapshot();
    let mut rows = Vec::new();
    for cluster in table.clusters() {
        let Some(runtime) = proxy.cluster(&cluster.name) else {
            continue;
        };
        for view in runtime.balancer.endpoints() {
            let broker = table
                .endpoint_at(view.key)
                .map(|e| e.metadata.broker_name.clone())
                .unwrap_or_default();
            let labels = labels(&[
                ("cluster", cluster.name.as_str()),
                ("broker", broker.as_str()),
                ("host", view.key.to_string().as_str()),
                ("priority", view.priority.to_string().as_str()),
            ]);
            rows.push((labels, view));
        }
    }
    family(
        out,
        "rocketmesh_endpoint_weight",
        "gauge",
        "The balancer's current weight of each endpoint (its configured weight when healthy).",
    );
    for (labels, view) in &rows {
        let _ = writeln!(
            out,
            "rocketmesh_endpoint_weight{labels} {}",
            view.current_weight
        );
    }
    family(
        out,
        "rocketmesh_endpoint_ejected",
        "gauge",
        "1 while the balancer has ejected the endpoint as an outlier.",
    );
    for (labels, view) in &rows {
        let _ = writeln!(
            out,
            "rocketmesh_endpoint_ejected{labels} {}",
            u8::from(view.ejected)
        );
    }
    family(
        out,
        "rocketmesh_endpoint_ejections",
        "gauge",
        "Ejections in a row of the endpoint (forgiven one per base ejection time in service).",
    );
    for (labels, view) in &rows {
        let _ = writeln!(
            out,
            "rocketmesh_endpoint_ejections{labels} {}",
            view.ejections
        );
    }
    family(
        out,
        "rocketmesh_send_retries_total",
        "counter",
        "Sends retried on another broker after a failure, by cluster.",
    );
    for cluster in table.clusters() {
        if let Some(runtime) = proxy.cluster(&cluster.name) {
            let _ = writeln!(
                out,
                "rocketmesh_send_retries_total{} {}",
                labels(&[("cluster", &cluster.name)]),
                runtime.retries()
            );
        }
    }

    family(
        out,
        "rocketmq_messages_in_total",
        "counter",
        "Messages sent through the sidecar and acknowledged by a broker, by topic.",
    );
    for (topic, count) in stats.messages_in_by_topic() {
        let _ = writeln!(
            out,
            "rocketmq_messages_in_total{} {count}",
            labels(&[("topic", &topic)])
        );
    }
    family(
        out,
        "rocketmq_messages_out_total",
        "counter",
        "Messages delivered to consumers through the sidecar (pull and pop), by topic and group.",
    );
    for ((topic, group), count) in stats.messages_out_by_topic_group() {
        let _ = writeln!(
            out,
            "rocketmq_messages_out_total{} {count}",
            labels(&[("topic", &topic), ("consumer_group", &group)])
        );
    }
    family(
        out,
        "rocketmq_send_cost_time",
        "histogram",
        "Time from receiving a send to the broker's acknowledgement, in ms, by topic.",
    );
    for (topic, snapshot) in stats.send_cost_by_topic() {
        histogram(
            out,
            "rocketmq_send_cost_time",
            &[("topic", &topic)],
            &snapshot,
        );
    }
    pull_to_pop(out, proxy);
    xds(out, proxy);
    std::mem::take(out)
}

/// Pull→POP: each group's mode, and each converted client's receipts.
/// The on-demand xDS client: connection, subscriptions, held requests and how they ended.
fn xds(out: &mut String, proxy: &Proxy) {
    let Some(ondemand) = proxy.ondemand() else {
        return;
    };
    let snapshot = ondemand.client_snapshot();
    let counters = ondemand.counters();
    single(
        out,
        "rocketmesh_xds_connected",
        "gauge",
        "1 while the stream to the xDS control plane is up.",
        u8::from(snapshot.connected),
    );
    family(
        out,
        "rocketmesh_xds_subscribed",
        "gauge",
        "Resource names subscribed now, by type.",
    );
    for (type_url, state) in &snapshot.types {
        let _ = writeln!(
            out,
            "rocketmesh_xds_subscribed{} {}",
            labels(&[("type", rocketmesh_xds::types::short_name(type_url))]),
            state.subscribed.len()
        );
    }
    let client = counters.client;
    for (name, help, value) in [
        (
            "rocketmesh_xds_subscriptions_total",
            "Names newly subscribed.",
            client.subscriptions,
        ),
        (
            "rocketmesh_xds_unsubscriptions_total",
            "Names unsubscribed (idle topics and the clusters only they named).",
            client.unsubscriptions,
        ),
        (
            "rocketmesh_xds_acks_total",
            "Responses acknowledged.",
            client.acks,
        ),
        (
            "rocketmesh_xds_nacks_total",
            "Responses rejected (the last good version stays).",
            client.nacks,
        ),
        (
            "rocketmesh_xds_reconnects_total",
            "Streams established after the first.",
            client.reconnects,
        ),
        (
            "rocketmesh_xds_connect_failures_total",
            "Failed attempts to reach the control plane.",
            client.connect_failures,
        ),
        (
            "rocketmesh_xds_requests_held_total",
            "Requests held until their topic's route arrived.",
            counters.held,
        ),
        (
            "rocketmesh_xds_route_timeouts_total",
            "Held requests answered TOPIC_NOT_EXIST because no route came in time.",
            counters.timeouts,
        ),
        (
            "rocketmesh_xds_route_absent_total",
            "Held requests answered TOPIC_NOT_EXIST because the control plane has no such topic (or cluster).",
            counters.absent,
        ),
        (
            "rocketmesh_xds_route_refused_total",
            "Held requests refused by a limit or a rejected resource.",
            counters.refused,
        ),
        (
            "rocketmesh_xds_topics_unsubscribed_total",
            "Topics given up after going idle.",
            counters.topics_unsubscribed,
        ),
    ] {
        single(out, name, "counter", help, value);
    }
    family(
        out,
        "rocketmesh_xds_hold_duration_milliseconds",
        "histogram",
        "How long a request waited for its topic's route, in ms.",
    );
    histogram(
        out,
        "rocketmesh_xds_hold_duration_milliseconds",
        &[],
        &counters.hold_time,
    );
}

fn pull_to_pop(out: &mut String, proxy: &Proxy) {
    use std::sync::atomic::Ordering::Relaxed;
    let engine = &proxy.pullpop;
    family(
        out,
        "rocketmesh_consumer_group_converted",
        "gauge",
        "1 when the group's pulls are served by POP, 0 when they are forwarded as pulls.",
    );
    for (group, mode) in engine.group_modes() {
        let converted = u8::from(mode == crate::proxy::pullpop::mode::Mode::Pop);
        let _ = writeln!(
            out,
            "rocketmesh_consumer_group_converted{} {converted}",
            labels(&[("consumer_group", &group)])
        );
    }
    single(
        out,
        "rocketmesh_pop_refusals_total",
        "counter",
        "(group, broker) pairs that fell back to PULL because the broker refused POP.",
        engine.pop_refusals(),
    );
    let series = engine.client_series();
    let gauge = |out: &mut String,
                 name: &str,
                 help: &str,
                 value: &dyn Fn(&crate::proxy::pullpop::ClientStats) -> i64| {
        family(out, name, "gauge", help);
        for (group, _, client, stats) in &series {
            let _ = writeln!(
                out,
                "{name}{} {}",
                labels(&[("consumer_group", group), ("client_id", client)]),
                value(stats)
            );
        }
    };
    gauge(
        out,
        "rocketmesh_pop_receipts_in_flight",
        "Receipts a converted client holds: delivered, not yet committed.",
        &|stats| stats.in_flight.load(Relaxed),
    );
    type Read = fn(&crate::proxy::pullpop::ClientStats) -> u64;
    let counters: [(&str, &str, Read); 10] = [
        (
            "rocketmesh_pop_filtered_total",
            "Popped messages the subscription rejects, acked without delivery.",
            |s| s.filtered.load(Relaxed),
        ),
        (
            "rocketmesh_pop_delivered_total",
            "Messages popped for a converted client's pulls.",
            |s| s.delivered.load(Relaxed),
        ),
        (
            "rocketmesh_pop_acked_total",
            "Receipts acked because the client committed past them.",
            |s| s.acked.load(Relaxed),
        ),
        (
            "rocketmesh_pop_ack_failures_total",
            "Acks the broker did not take: those messages come again.",
            |s| s.ack_failures.load(Relaxed),
        ),
        (
            "rocketmesh_pop_renewals_total",
            "Invisible-time renewals of receipts a live client still holds.",
            |s| s.renewals.load(Relaxed),
        ),
        (
            "rocketmesh_pop_renewal_failures_total",
            "Renewals the broker refused.",
            |s| s.renewal_failures.load(Relaxed),
        ),
        (
            "rocketmesh_pop_nacks_total",
            "Send-backs turned into invisible-time changes.",
            |s| s.nacks.load(Relaxed),
        ),
        (
            "rocketmesh_pop_released_total",
            "Receipts made visible again because the client let them go.",
            |s| s.released.load(Relaxed),
        ),
        (
            "rocketmesh_pop_lapsed_total",
            "Receipts whose invisible time ran out before the client committed.",
            |s| s.lapsed.load(Relaxed),
        ),
        (
            "rocketmesh_pop_dead_lettered_total",
            "Messages moved to the dead-letter topic past the max reconsume times.",
            |s| s.dead_lettered.load(Relaxed),
        ),
    ];
    for (name, help, value) in counters {
        family(out, name, "counter", help);
        for (group, _, client, stats) in &series {
            let _ = writeln!(
                out,
                "{name}{} {}",
                labels(&[("consumer_group", group), ("client_id", client)]),
                value(stats)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("topic", "a\"b\\c\nd")]),
            r#"{topic="a\"b\\c\nd"}"#
        );
    }
}
