//! Route discovery: asks RocketMQ nameservers (or brokers, which answer the same code) for a
//! topic's route with GET_ROUTEINFO_BY_TOPIC, as any client would.

use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::remoting::body::{JsonBody, TopicRouteData};
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

    /// The topic's route, or `None` when the nameserver says the topic does not exist.
    pub async fn topic_route(&self, topic: &str) -> Result<Option<TopicRouteData>, DiscoveryError> {
        let header = GetRouteInfoRequestHeader {
            topic: topic.to_owned(),
            accept_standard_json_only: Some(true),
            ..Default::default()
        };
        let mut failures = Vec::new();
        for address in &self.nameservers {
            let opaque = self.opaque.fetch_add(1, Ordering::Relaxed);
            let request = RemotingCommand::request(RequestCode::GET_ROUTEINFO_BY_TOPIC, opaque)
                .with_header(&header);
            let response = match self.call(address, request).await {
                Ok(response) => response,
                Err(reason) => {
                    failures.push(format!("{address}: {reason}"));
                    continue;
                }
            };
            let code = response.response_code();
            if code == ResponseCode::TOPIC_NOT_EXIST {
                return Ok(None);
            }
            if code != ResponseCode::SUCCESS {
                return Err(DiscoveryError::Refused {
                    address: address.clone(),
                    code: code.0,
                    remark: response.remark.clone().unwrap_or_default(),
                });
            }
            return TopicRouteData::from_json(&response.body)
                .map(Some)
                .map_err(|error| DiscoveryError::Body {
                    address: address.clone(),
                    reason: error.to_string(),
                });
        }
        Err(DiscoveryError::Unreachable(failures.join("; ")))
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
