//! Who is connected: producer and consumer groups from heartbeats, each client's connection, and
//! the group membership changes that clients must hear about (NOTIFY_CONSUMER_IDS_CHANGED).
//!
//! Shared by the bundled broker and the sidecar, which both answer for their own clients; neither
//! imports the other.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc;

use crate::remoting::body::{
    ConsumerData, ConsumerList, HeartbeatData, JsonBody, SubscriptionData,
};
use crate::remoting::header::NotifyConsumerIdsChangedRequestHeader;
use crate::remoting::{RemotingCommand, RequestCode, ResponseCode};

/// Identifies one accepted connection.
pub type ConnectionId = u64;

/// A way to send a command down one client connection.
pub type Outbound = mpsc::Sender<RemotingCommand>;

/// What one client registered over one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registration {
    pub client_id: String,
    pub producer_groups: Vec<String>,
    pub consumer_groups: Vec<String>,
}

#[derive(Default)]
struct ConsumerGroup {
    /// client id → (connection, its registration)
    members: BTreeMap<String, (ConnectionId, ConsumerData)>,
}

#[derive(Default)]
struct Registry {
    connections: HashMap<ConnectionId, Outbound>,
    /// (group, topic, queue) → the connection that pulled it last: who consumes what.
    pullers: HashMap<(String, String, i32), ConnectionId>,
    consumers: HashMap<String, ConsumerGroup>,
    /// group → client id → connection
    producers: HashMap<String, BTreeMap<String, ConnectionId>>,
}

/// A server's view of its clients.
#[derive(Default)]
pub struct ClientRegistry {
    registry: Mutex<Registry>,
    next_opaque: AtomicI32,
}

impl ClientRegistry {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn connected(&self, connection: ConnectionId, outbound: Outbound) {
        self.lock().connections.insert(connection, outbound);
    }

    /// Forgets everything registered over a closed connection and tells the remaining members of
    /// affected consumer groups.
    pub fn disconnected(&self, connection: ConnectionId) {
        let changed = {
            let mut registry = self.lock();
            registry.connections.remove(&connection);
            registry.pullers.retain(|_, puller| *puller != connection);
            for members in registry.producers.values_mut() {
                members.retain(|_, conn| *conn != connection);
            }
            let mut changed = Vec::new();
            for (group, consumers) in &mut registry.consumers {
                let before = consumers.members.len();
                consumers.members.retain(|_, (conn, _)| *conn != connection);
                if consumers.members.len() != before {
                    changed.push(group.clone());
                }
            }
            registry
                .consumers
                .retain(|_, group| !group.members.is_empty());
            changed
        };
        for group in changed {
            self.notify_group(&group);
        }
    }

    /// Applies a heartbeat. Returns the consumer groups the client newly joined.
    pub fn heartbeat(&self, connection: ConnectionId, heartbeat: &HeartbeatData) -> Vec<String> {
        let mut joined = Vec::new();
        {
            let mut registry = self.lock();
            for producer in &heartbeat.producer_data_set {
                registry
                    .producers
                    .entry(producer.group_name.clone())
                    .or_default()
                    .insert(heartbeat.client_id.clone(), connection);
            }
            for consumer in &heartbeat.consumer_data_set {
                let group = registry
                    .consumers
                    .entry(consumer.group_name.clone())
                    .or_default();
                let previous = group
                    .members
                    .insert(heartbeat.client_id.clone(), (connection, consumer.clone()));
                if previous.is_none() {
                    joined.push(consumer.group_name.clone());
                }
            }
        }
        for group in &joined {
            self.notify_group(group);
        }
        joined
    }

    /// Removes a client from the groups named (UNREGISTER_CLIENT).
    pub fn unregister(
        &self,
        client_id: &str,
        producer_group: Option<&str>,
        consumer_group: Option<&str>,
    ) {
        let left = {
            let mut registry = self.lock();
            if let Some(group) = producer_group
                && let Some(members) = registry.producers.get_mut(group)
            {
                members.remove(client_id);
            }
            let mut left = None;
            if let Some(group) = consumer_group
                && let Some(consumers) = registry.consumers.get_mut(group)
                && consumers.members.remove(client_id).is_some()
            {
                left = Some(group.to_owned());
            }
            registry
                .consumers
                .retain(|_, group| !group.members.is_empty());
            left
        };
        if let Some(group) = left {
            self.notify_group(&group);
        }
    }

    /// Client ids of a consumer group, sorted.
    pub fn consumer_ids(&self, group: &str) -> Option<Vec<String>> {
        self.lock()
            .consumers
            .get(group)
            .map(|consumers| consumers.members.keys().cloned().collect())
    }

    /// The GET_CONSUMER_LIST_BY_GROUP answer for `group`, with Java's remark when it has no member.
    pub fn consumer_list_response(
        &self,
        request: &RemotingCommand,
        group: &str,
    ) -> RemotingCommand {
        let Some(consumer_id_list) = self.consumer_ids(group) else {
            return RemotingCommand::error_response(
                request,
                ResponseCode::SYSTEM_ERROR,
                format!("no consumer for this group, {group}"),
            );
        };
        match (ConsumerList { consumer_id_list }).to_json() {
            Ok(body) => {
                RemotingCommand::response_to(request, ResponseCode::SUCCESS).with_body(body)
            }
            Err(error) => RemotingCommand::error_response(
                request,
                ResponseCode::SYSTEM_ERROR,
                error.to_string(),
            ),
        }
    }

    /// The group's subscription to `topic`, from the most recent registration that has one.
    pub fn subscription(&self, group: &str, topic: &str) -> Option<SubscriptionData> {
        let registry = self.lock();
        registry
            .consumers
            .get(group)?
            .members
            .values()
            .find_map(|(_, data)| {
                data.subscription_data_set
                    .iter()
                    .find(|subscription| subscription.topic == topic)
                    .cloned()
            })
    }

    /// Notes that `connection` pulled a queue for a group.
    pub fn pulled(&self, connection: ConnectionId, group: &str, topic: &str, queue_id: i32) {
        self.lock()
            .pullers
            .insert((group.to_owned(), topic.to_owned(), queue_id), connection);
    }

    /// The connection that last pulled each queue of `topic` for `group`.
    pub fn pullers(&self, group: &str, topic: &str) -> BTreeMap<i32, ConnectionId> {
        self.lock()
            .pullers
            .iter()
            .filter(|((g, t, _), _)| g == group && t == topic)
            .map(|((_, _, queue), connection)| (*queue, *connection))
            .collect()
    }

    /// A live connection of a producer of `group`, for transaction checks.
    pub fn producer_connection(&self, group: &str) -> Option<Outbound> {
        let registry = self.lock();
        let connection = registry.producers.get(group)?.values().next()?;
        registry.connections.get(connection).cloned()
    }

    /// The registrations made over `connection`: client id, producer groups, consumer groups.
    pub fn registrations_of(&self, connection: ConnectionId) -> Vec<Registration> {
        let registry = self.lock();
        let mut found: BTreeMap<String, Registration> = BTreeMap::new();
        fn entry<'a>(
            found: &'a mut BTreeMap<String, Registration>,
            client_id: &str,
        ) -> &'a mut Registration {
            found
                .entry(client_id.to_owned())
                .or_insert_with(|| Registration {
                    client_id: client_id.to_owned(),
                    ..Registration::default()
                })
        }
        for (group, members) in &registry.producers {
            for (client_id, _) in members.iter().filter(|(_, conn)| **conn == connection) {
                entry(&mut found, client_id)
                    .producer_groups
                    .push(group.clone());
            }
        }
        for (group, consumers) in &registry.consumers {
            for (client_id, _) in consumers
                .members
                .iter()
                .filter(|(_, (conn, _))| *conn == connection)
            {
                entry(&mut found, client_id)
                    .consumer_groups
                    .push(group.clone());
            }
        }
        found.into_values().collect()
    }

    /// Sends NOTIFY_CONSUMER_IDS_CHANGED (oneway) to every member of `group`.
    pub fn notify_group(&self, group: &str) {
        let targets: Vec<Outbound> = {
            let registry = self.lock();
            let Some(consumers) = registry.consumers.get(group) else {
                return;
            };
            consumers
                .members
                .values()
                .filter_map(|(connection, _)| registry.connections.get(connection).cloned())
                .collect()
        };
        let header = NotifyConsumerIdsChangedRequestHeader {
            consumer_group: group.to_owned(),
            ..Default::default()
        };
        for target in targets {
            let opaque = self.next_opaque.fetch_add(1, Ordering::Relaxed);
            let mut request =
                RemotingCommand::request(RequestCode::NOTIFY_CONSUMER_IDS_CHANGED, opaque)
                    .with_header(&header);
            request.set_oneway(true);
            // A full queue means a slow client; it will rebalance on its own timer anyway.
            let _ = target.try_send(request);
        }
    }
}
