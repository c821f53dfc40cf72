//! Route discovery: asks RocketMQ nameservers (or brokers, which answer the same code) for a
//! topic's route with GET_ROUTEINFO_BY_TOPIC, as any client would.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::remoting::body::{ClusterInfo, JsonBody, TopicRouteData};
use crate::remoting::header::GetRouteInfoRequestHeader;
use crate::remoting::{RemotingCodec, RemotingCommand, RequestCode, ResponseCode};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("no nameserver answered ({0})")]
    Unreachable(String),
    #[error("nameserver {address} answered code {code}: {remark}")]
    Refused {
        address: String,
        code: i32,
        remark: String,
    },
    #[error("nameserver {address} sent a route body that does not parse: {reason}")]
    Body { address: String, reason: String },
}

/// A client of the configured nameservers, tried in order until one answers.
pub struct Discovery {
    nameservers: Vec<String>,
    timeout: Duration,
    opaque: AtomicI32,
}

impl Discovery {
    pub fn new(nameservers: Vec<String>, timeout: Duration) -> Self {
        Self {
            nameservers,
            timeout,
            opaque: AtomicI32::new(1),
        }
    }

    /// The topic's route, merged from every address that answers, or `None` when all that
    /// answered say the topic does not exist. Nameservers hold the same data, so merging costs
    /// nothing there; brokers (ours answer this code) each know only their own part.
    pub async fn topic_route(&self, topic: &str) -> Result<Option<TopicRouteData>, DiscoveryError> {
        let header = GetRouteInfoRequestHeader {
            topic: topic.to_owned(),
            accept_standard_json_only: Some(true),
            ..Default::default()
        };
        let answers = self
            .ask_all(|opaque| {
                RemotingCommand::request(RequestCode::GET_ROUTEINFO_BY_TOPIC, opaque)
                    .with_header(&header)
            })
            .await?;
        let mut merged: Option<TopicRouteData> = None;
        for (address, response) in answers {
            let code = response.response_code();
            if code == ResponseCode::TOPIC_NOT_EXIST {
                continue;
            }
            if code != ResponseCode::SUCCESS {
                return Err(DiscoveryError::Refused {
                    address,
                    code: code.0,
                    remark: response.remark.clone().unwrap_or_default(),
                });
            }
            let route = TopicRouteData::from_json(&response.body).map_err(|error| {
                DiscoveryError::Body {
                    address: address.clone(),
                    reason: error.to_string(),
                }
            })?;
            merged = Some(match merged {
                None => route,
                Some(mut into) => {
                    merge_route(&mut into, route);
                    into
                }
            });
        }
        Ok(merged)
    }

    /// The brokers of every cluster, merged from every address that answers.
    pub async fn cluster_info(&self) -> Result<ClusterInfo, DiscoveryError> {
        let answers = self
            .ask_all(|opaque| {
                RemotingCommand::request(RequestCode::GET_BROKER_CLUSTER_INFO, opaque)
            })
            .await?;
        let mut merged = ClusterInfo::default();
        for (address, response) in answers {
            let code = response.response_code();
            if code != ResponseCode::SUCCESS {
                return Err(DiscoveryError::Refused {
                    address,
                    code: code.0,
                    remark: response.remark.clone().unwrap_or_default(),
                });
            }
            let info =
                ClusterInfo::from_json(&response.body).map_err(|error| DiscoveryError::Body {
                    address: address.clone(),
                    reason: error.to_string(),
                })?;
            for (name, broker) in info.broker_addr_table {
                match merged.broker_addr_table.get_mut(&name) {
                    Some(known) => known.broker_addrs.extend(broker.broker_addrs),
                    None => {
                        merged.broker_addr_table.insert(name, broker);
                    }
                }
            }
            for (cluster, brokers) in info.cluster_addr_table {
                let known = merged.cluster_addr_table.entry(cluster).or_default();
                for broker in brokers {
                    if !known.contains(&broker) {
                        known.push(broker);
                    }
                }
            }
        }
        Ok(merged)
    }

    /// Sends one request to every address at once; the answers of those that answered, or an
    /// error naming each failure when none did.
    async fn ask_all(
        &self,
        request: impl Fn(i32) -> RemotingCommand,
    ) -> Result<Vec<(String, RemotingCommand)>, DiscoveryError> {
        let calls = self.nameservers.iter().map(|address| {
            let opaque = self.opaque.fetch_add(1, Ordering::Relaxed);
            let request = request(opaque);
            async move { (address.clone(), self.call(address, request).await) }
        });
        let mut answers = Vec::new();
        let mut failures = Vec::new();
        for (address, result) in futures::future::join_all(calls).await {
            match result {
                Ok(response) => answers.push((address, response)),
                Err(reason) => failures.push(format!("{address}: {reason}")),
            }
        }
        if answers.is_empty() {
            return Err(DiscoveryError::Unreachable(failures.join("; ")));
        }
        Ok(answers)
    }

    /// One request on a fresh connection, all of it within the timeout.
    async fn call(
        &self,
        address: &str,
        request: RemotingCommand,
    ) -> Result<RemotingCommand, String> {
        let exchange = async {
            let socket = TcpStream::connect(address)
                .await
                .map_err(|error| format!("connect: {error}"))?;
            let _ = socket.set_nodelay(true);
            let mut framed = Framed::new(socket, RemotingCodec::default());
            framed
                .send(&request)
                .await
                .map_err(|error| format!("send: {error}"))?;
            loop {
                match framed.next().await {
                    Some(Ok(response)) if response.opaque == request.opaque => return Ok(response),
                    // Anything else (a oneway notice) is not the answer.
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return Err(format!("read: {error}")),
                    None => return Err("closed before answering".to_owned()),
                }
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
    }
}

/// Adds `other`'s brokers and queues to `into`; the first answer wins where both know a broker.
fn merge_route(into: &mut TopicRouteData, other: TopicRouteData) {
    for broker in other.broker_datas {
        match into
            .broker_datas
            .iter_mut()
            .find(|known| known.broker_name == broker.broker_name)
        {
            Some(known) => {
                for (id, address) in broker.broker_addrs {
                    known.broker_addrs.entry(id).or_insert(address);
                }
            }
            None => into.broker_datas.push(broker),
        }
    }
    for queue in other.queue_datas {
        if !into
            .queue_datas
            .iter()
            .any(|known| known.broker_name == queue.broker_name)
        {
            into.queue_datas.push(queue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::body::{BrokerData, QueueData};

    fn part(broker: &str, address: &str, queues: i32) -> TopicRouteData {
        TopicRouteData {
            broker_datas: vec![BrokerData {
                broker_name: broker.into(),
                cluster: "C".into(),
                broker_addrs: [(0, address.to_owned())].into(),
                ..BrokerData::default()
            }],
            queue_datas: vec![QueueData {
                broker_name: broker.into(),
                read_queue_nums: queues,
                write_queue_nums: queues,
                perm: 6,
                ..QueueData::default()
            }],
            ..TopicRouteData::default()
        }
    }

    #[test]
    fn answers_of_several_brokers_merge_into_one_route() {
        let mut route = part("broker-a", "127.0.0.1:1", 4);
        merge_route(&mut route, part("broker-b", "127.0.0.1:2", 8));
        // A nameserver replica repeats what is known: nothing doubles.
        merge_route(&mut route, part("broker-a", "127.0.0.1:1", 4));
        assert_eq!(route.broker_datas.len(), 2);
        assert_eq!(route.queue_datas.len(), 2);
        assert_eq!(route.queue_datas[1].read_queue_nums, 8);
    }
}
