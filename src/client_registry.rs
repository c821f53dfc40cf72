//! Who is connected: producer and consumer groups from heartbeats, each client's connection, and
//! the group membership changes that clients must hear about (NOTIFY_CONSUMER_IDS_CHANGED).
//!
//! Shared by the bundled broker and the sidecar, which both answer for their own clients; neither
//! imports the other.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
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
pub type Outbound = mpsc::Sender<crate::remoting::raw::Outgoing>;

/// What one client registered over one connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registration {
    pub client_id: String,
    pub producer_groups: Vec<String>,
    pub consumer_groups: Vec<String>,
    /// Where the client's other live connections arrived (see [`ClientRegistry::connected`]).
    pub other_connections: Vec<Via>,
}

/// Which of a server's listeners a connection arrived on, when it has several (the sidecar's
/// per-broker listeners carry the broker name); `None` for the main one.
pub type Via = Option<Arc<str>>;

#[derive(Default)]
struct Member {
    /// A client may register over several connections (one per broker address it dials).
    connections: BTreeSet<ConnectionId>,
    data: ConsumerData,
}

#[derive(Default)]
struct ConsumerGroup {
    /// client id → its connections and latest registration
    members: BTreeMap<String, Member>,
}

#[derive(Default)]
struct Registry {
    connections: HashMap<ConnectionId, (Outbound, Via)>,
    /// (group, topic, queue) → the connection that pulled it last: who consumes what.
    pullers: HashMap<(String, String, i32), ConnectionId>,
    consumers: HashMap<String, ConsumerGroup>,
    /// group → client id → its connections
    producers: HashMap<String, BTreeMap<String, BTreeSet<ConnectionId>>>,
}

/// A server's view of its clients.
#[derive(Default)]
pub struct ClientRegistry {
    registry: Mutex<Registry>,
    next_opaque: AtomicI32,
    /// Groups whose members must not hear of membership changes (the sidecar's converted
    /// groups, whose members each see themselves alone).
    quiet: Mutex<BTreeSet<String>>,
}

impl ClientRegistry {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new connection, and the listener it arrived `via`.
    pub fn connected(&self, connection: ConnectionId, outbound: Outbound, via: Via) {
        self.lock().connections.insert(connection, (outbound, via));
    }

    /// Forgets everything registered over a closed connection and tells the remaining members of
    /// consumer groups that lost a member. A client that is still connected another way stays.
    pub fn disconnected(&self, connection: ConnectionId) {
        let changed = {
            let mut registry = self.lock();
            registry.connections.remove(&connection);
            registry.pullers.retain(|_, puller| *puller != connection);
            for members in registry.producers.values_mut() {
                members.retain(|_, connections| {
                    connections.remove(&connection);
                    !connections.is_empty()
                });
            }
            registry.producers.retain(|_, members| !members.is_empty());
            let mut changed = Vec::new();
            for (group, consumers) in &mut registry.consumers {
                let before = consumers.members.len();
                consumers.members.retain(|_, member| {
                    member.connections.remove(&connection);
                    !member.connections.is_empty()
                });
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
                    .entry(heartbeat.client_id.clone())
                    .or_default()
                    .insert(connection);
            }
            for consumer in &heartbeat.consumer_data_set {
                let group = registry
                    .consumers
                    .entry(consumer.group_name.clone())
                    .or_default();
                let member = match group.members.entry(heartbeat.client_id.clone()) {
                    Entry::Occupied(member) => member.into_mut(),
                    Entry::Vacant(vacant) => {
                        joined.push(consumer.group_name.clone());
                        vacant.insert(Member::default())
                    }
                };
                member.connections.insert(connection);
                member.data = consumer.clone();
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
            .find_map(|member| {
                member
                    .data
                    .subscription_data_set
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

    /// A live connection of a producer of `group`, for transaction checks; one that arrived
    /// `via` the given listener when there is one.
    pub fn producer_connection(&self, group: &str, prefer: Option<&str>) -> Option<Outbound> {
        let registry = self.lock();
        let live = registry
            .producers
            .get(group)?
            .values()
            .flatten()
            .filter_map(|connection| registry.connections.get(connection));
        let mut fallback = None;
        for (outbound, via) in live {
            if prefer.is_none() || via.as_deref() == prefer {
                return Some(outbound.clone());
            }
            fallback.get_or_insert(outbound);
        }
        fallback.cloned()
    }

    /// The registrations made over `connection`: client id, producer groups, consumer groups, and
    /// where the client is connected besides.
    pub fn registrations_of(&self, connection: ConnectionId) -> Vec<Registration> {
        let registry = self.lock();
        let mut found: BTreeMap<String, Registration> = BTreeMap::new();
        let mut others: BTreeMap<String, BTreeSet<ConnectionId>> = BTreeMap::new();
        fn note<'a>(
            found: &'a mut BTreeMap<String, Registration>,
            others: &mut BTreeMap<String, BTreeSet<ConnectionId>>,
            client_id: &str,
            connections: &BTreeSet<ConnectionId>,
            this: ConnectionId,
        ) -> &'a mut Registration {
            others
                .entry(client_id.to_owned())
                .or_default()
                .extend(connections.iter().filter(|other| **other != this));
            found
                .entry(client_id.to_owned())
                .or_insert_with(|| Registration {
                    client_id: client_id.to_owned(),
                    ..Registration::default()
                })
        }
        for (group, members) in &registry.producers {
            for (client_id, connections) in members
                .iter()
                .filter(|(_, connections)| connections.contains(&connection))
            {
                note(&mut found, &mut others, client_id, connections, connection)
                    .producer_groups
                    .push(group.clone());
            }
        }
        for (group, consumers) in &registry.consumers {
            for (client_id, member) in consumers
                .members
                .iter()
                .filter(|(_, member)| member.connections.contains(&connection))
            {
                note(
                    &mut found,
                    &mut others,
                    client_id,
                    &member.connections,
                    connection,
                )
                .consumer_groups
                .push(group.clone());
            }
        }
        for (client_id, registration) in &mut found {
            registration.other_connections = others
                .get(client_id)
                .into_iter()
                .flatten()
                .filter_map(|other| registry.connections.get(other))
                .map(|(_, via)| via.clone())
                .collect();
        }
        found.into_values().collect()
    }

    /// Stops (or resumes) NOTIFY_CONSUMER_IDS_CHANGED for `group`.
    pub fn set_quiet(&self, group: &str, quiet: bool) {
        let mut groups = self.quiet.lock().unwrap_or_else(PoisonError::into_inner);
        if quiet {
            groups.insert(group.to_owned());
        } else {
            groups.remove(group);
        }
    }

    /// The client id a connection registered with, from its consumer or producer heartbeats.
    pub fn client_id_of(&self, connection: ConnectionId) -> Option<String> {
        let registry = self.lock();
        registry
            .consumers
            .values()
            .flat_map(|group| group.members.iter())
            .find(|(_, member)| member.connections.contains(&connection))
            .map(|(client, _)| client.clone())
            .or_else(|| {
                registry
                    .producers
                    .values()
                    .flat_map(|members| members.iter())
                    .find(|(_, connections)| connections.contains(&connection))
                    .map(|(client, _)| client.clone())
            })
    }

    /// A member's latest heartbeat entry for `group`.
    pub fn consumer_data(&self, group: &str) -> Option<ConsumerData> {
        self.lock()
            .consumers
            .get(group)?
            .members
            .values()
            .next()
            .map(|member| member.data.clone())
    }

    /// The latest heartbeat entry of `client` for `group`.
    pub fn member_data(&self, group: &str, client: &str) -> Option<ConsumerData> {
        self.lock()
            .consumers
            .get(group)?
            .members
            .get(client)
            .map(|member| member.data.clone())
    }

    /// The consumer groups in which `client` subscribes to `topic`.
    pub fn groups_of(&self, client: &str, topic: &str) -> Vec<String> {
        self.lock()
            .consumers
            .iter()
            .filter(|(_, group)| {
                group.members.get(client).is_some_and(|member| {
                    member
                        .data
                        .subscription_data_set
                        .iter()
                        .any(|subscription| subscription.topic == topic)
                })
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Whether `client` still has a live connection registered.
    pub fn is_connected(&self, client: &str) -> bool {
        let registry = self.lock();
        registry
            .consumers
            .values()
            .any(|group| group.members.contains_key(client))
            || registry
                .producers
                .values()
                .any(|members| members.contains_key(client))
    }

    /// Sends NOTIFY_CONSUMER_IDS_CHANGED (oneway) to every member of `group`.
    pub fn notify_group(&self, group: &str) {
        if self
            .quiet
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(group)
        {
            return;
        }
        let targets: Vec<Outbound> = {
            let registry = self.lock();
            let Some(consumers) = registry.consumers.get(group) else {
                return;
            };
            // One notice per member, over any of its live connections.
            consumers
                .members
                .values()
                .filter_map(|member| {
                    member
                        .connections
                        .iter()
                        .find_map(|connection| registry.connections.get(connection))
                        .map(|(outbound, _)| outbound.clone())
                })
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
            let _ = target.try_send(request.into());
        }
    }
}
