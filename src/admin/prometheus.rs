//! `/metrics` in the Prometheus text format (0.0.4). RocketMQ's own names are used where the
//! meaning matches: `rocketmq_messages_in_total` / `rocketmq_messages_out_total` (the 5.x broker's
//! counters) and `rocketmq_send_cost_time` (the 5.x client's send histogram, in ms, with an extra
//! 800 ms bound); the rest are `rocketmesh_*`.

use std::fmt::Write;

use super::views::{request_name, response_name};
use crate::proxy::Proxy;
use crate::proxy::stats::{HistogramSnapshot, LATENCY_BOUNDS_MS};

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

pub fn render(proxy: &Proxy) -> String {
    let stats = &proxy.stats;
    let mut out = String::new();

    family(
        &mut out,
        "rocketmesh_requests_total",
        "counter",
        "Requests received from clients, by request code.",
    );
    for (code, count) in stats.requests_by_code() {
        let code_text = code.to_string();
        let name = request_name(code);
        let _ = writeln!(
            out,
            "rocketmesh_requests_total{} {count}",
            labels(&[("code", &code_text), ("name", &name)])
        );
    }
    family(
        &mut out,
        "rocketmesh_responses_total",
        "counter",
        "Responses sent to clients, by response code.",
    );
    for (code, count) in stats.responses_by_code() {
        let code_text = code.to_string();
        let name = response_name(code);
        let _ = writeln!(
            out,
            "rocketmesh_responses_total{} {count}",
            labels(&[("code", &code_text), ("name", &name)])
        );
    }
    family(
        &mut out,
        "rocketmesh_request_decode_errors_total",
        "counter",
        "Client frames that could not be decoded (each closed its connection).",
    );
    let _ = writeln!(
        out,
        "rocketmesh_request_decode_errors_total {}",
        stats.decode_errors()
    );
    family(
        &mut out,
        "rocketmesh_downstream_connections",
        "gauge",
        "Client connections open now.",
    );
    let _ = writeln!(
        out,
        "rocketmesh_downstream_connections {}",
        stats.connections_active()
    );
    family(
        &mut out,
        "rocketmesh_downstream_connections_total",
        "counter",
        "Client connections accepted.",
    );
    let _ = writeln!(
        out,
        "rocketmesh_downstream_connections_total {}",
        stats.connections_total()
    );
    family(
        &mut out,
        "rocketmesh_requests_active",
        "gauge",
        "Client requests being handled now.",
    );
    let _ = writeln!(
        out,
        "rocketmesh_requests_active {}",
        stats.requests_active()
    );
    family(
        &mut out,
        "rocketmesh_requests_pending",
        "gauge",
        "Client requests waiting for a route now.",
    );
    let _ = writeln!(
        out,
        "rocketmesh_requests_pending {}",
        stats.requests_pending()
    );

    let hosts = stats.hosts();
    family(
        &mut out,
        "rocketmesh_upstream_requests_total",
        "counter",
        "Requests sent to a broker endpoint.",
    );
    for host in &hosts {
        let address = host.address.to_string();
        let pairs = [
            ("cluster", host.cluster.as_str()),
            ("broker", host.broker_name.as_str()),
            ("host", address.as_str()),
        ];
        let _ = writeln!(
            out,
            "rocketmesh_upstream_requests_total{} {}",
            labels(&pairs),
            host.requests()
        );
    }
    family(
        &mut out,
        "rocketmesh_upstream_errors_total",
        "counter",
        "Requests to a broker endpoint that got no response (connect failure, timeout, overload, closed connection).",
    );
    for host in &hosts {
        let address = host.address.to_string();
        let pairs = [
            ("cluster", host.cluster.as_str()),
            ("broker", host.broker_name.as_str()),
            ("host", address.as_str()),
        ];
        let _ = writeln!(
            out,
            "rocketmesh_upstream_errors_total{} {}",
            labels(&pairs),
            host.errors()
        );
    }
    family(
        &mut out,
        "rocketmesh_upstream_in_flight",
        "gauge",
        "Requests to a broker endpoint awaiting their response now.",
    );
    for host in &hosts {
        let address = host.address.to_string();
        let pairs = [
            ("cluster", host.cluster.as_str()),
            ("broker", host.broker_name.as_str()),
            ("host", address.as_str()),
        ];
        let in_flight = proxy
            .upstreams
            .existing(host.address)
            .map_or(0, |pool| pool.in_flight());
        let _ = writeln!(
            out,
            "rocketmesh_upstream_in_flight{} {in_flight}",
            labels(&pairs)
        );
    }
    family(
        &mut out,
        "rocketmesh_upstream_request_duration_milliseconds",
        "histogram",
        "Time from sending a request to a broker to its response, in ms.",
    );
    for host in &hosts {
        let address = host.address.to_string();
        let pairs = [
            ("cluster", host.cluster.as_str()),
            ("broker", host.broker_name.as_str()),
            ("host", address.as_str()),
        ];
        histogram(
            &mut out,
            "rocketmesh_upstream_request_duration_milliseconds",
            &pairs,
            &host.latency(),
        );
    }

    family(
        &mut out,
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
        &mut out,
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
        &mut out,
        "rocketmq_send_cost_time",
        "histogram",
        "Time from receiving a send to the broker's acknowledgement, in ms, by topic.",
    );
    for (topic, snapshot) in stats.send_cost_by_topic() {
        histogram(
            &mut out,
            "rocketmq_send_cost_time",
            &[("topic", &topic)],
            &snapshot,
        );
    }
    out
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
