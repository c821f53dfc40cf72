//! Requests brokers send toward clients, relayed to the right client connection:
//! CHECK_TRANSACTION_STATE to a live producer of the half message's group, and
//! NOTIFY_CONSUMER_IDS_CHANGED to the sidecar's members of the group.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Proxy;
use super::upstream::Inbound;
use crate::remoting::RequestCode;
use crate::remoting::header::NotifyConsumerIdsChangedRequestHeader;
use crate::remoting::message::{MessageRecord, property};

/// How long the sidecar remembers which broker asked about a transaction.
const CHECK_MEMORY: Duration = Duration::from_secs(60);
/// Transaction checks remembered at most; beyond this, answers must name their broker.
const MAX_CHECKS: usize = 65_536;

/// Which broker asked about which transaction, so that the producer's answer (an END_TRANSACTION
/// that may not name its broker) goes back to the broker that asked.
#[derive(Default)]
pub struct PendingChecks {
    by_message: Mutex<HashMap<String, (SocketAddr, Instant)>>,
}

impl PendingChecks {
    pub fn remember(&self, message_id: &str, broker: SocketAddr) {
        let mut checks = self
            .by_message
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if checks.len() >= MAX_CHECKS {
            checks.retain(|_, (_, at)| now.duration_since(*at) < CHECK_MEMORY);
        }
        if checks.len() < MAX_CHECKS {
            checks.insert(message_id.to_owned(), (broker, now));
        }
    }

    pub fn broker_of(&self, message_id: &str) -> Option<SocketAddr> {
        let checks = self
            .by_message
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        checks
            .get(message_id)
            .filter(|(_, at)| at.elapsed() < CHECK_MEMORY)
            .map(|(broker, _)| *broker)
    }
}

/// Relays until every upstream connection (the senders) is gone.
pub async fn run(proxy: Arc<Proxy>, mut inbound: mpsc::Receiver<Inbound>) {
    let next_opaque = AtomicI32::new(1);
    while let Some(Inbound { from, request }) = inbound.recv().await {
        match request.request_code() {
            RequestCode::CHECK_TRANSACTION_STATE => {
                let group =
                    MessageRecord::decode(&request.body, false)
                        .ok()
                        .and_then(|(record, _)| {
                            record.properties.get(property::PRODUCER_GROUP).cloned()
                        });
                let Some(group) = group else {
                    warn!(%from, "transaction check without a producer group dropped");
                    continue;
                };
                // The producer's connection to this broker's own listener, when it has one: its
                // answer (END_TRANSACTION) then arrives there and goes back to this broker.
                let asking = proxy
                    .routes
                    .snapshot()
                    .endpoint_at(from)
                    .map(|endpoint| endpoint.metadata.broker_name.clone());
                let Some(producer) = proxy.clients.producer_connection(&group, asking.as_deref())
                else {
                    debug!(%from, %group, "transaction check dropped: no producer of the group is connected");
                    continue;
                };
                if let Some(id) = request.ext("msgId").or(request.ext("transactionId")) {
                    proxy.checks.remember(id, from);
                }
                let mut relayed = request;
                relayed.opaque = next_opaque.fetch_add(1, Ordering::Relaxed);
                if producer.try_send(relayed.into()).is_err() {
                    debug!(%group, "transaction check dropped: the producer's connection is busy");
                }
            }
            RequestCode::NOTIFY_CONSUMER_IDS_CHANGED => {
                match request.decode_header::<NotifyConsumerIdsChangedRequestHeader>() {
                    Ok(header) => proxy.clients.notify_group(&header.consumer_group),
                    Err(error) => warn!(%from, %error, "invalid consumer change notice dropped"),
                }
            }
            code => {
                // Admin requests (consumer running info, direct consumption) are not relayed yet.
                debug!(%from, code = code.0, "broker request not relayed");
            }
        }
    }
}
