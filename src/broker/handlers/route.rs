//! The nameserver codes the broker answers for itself, and topic creation.

use std::collections::BTreeMap;

use super::bad_request;
use crate::broker::state::BrokerState;
use crate::broker::store::TopicConfig;
use crate::remoting::body::{BrokerData, ClusterInfo, QueueData, TopicRouteData};
use crate::remoting::header::{CreateTopicRequestHeader, GetRouteInfoRequestHeader};
use crate::remoting::{RemotingCommand, ResponseCode};

fn broker_data(state: &BrokerState) -> BrokerData {
    BrokerData {
        broker_addrs: BTreeMap::from([(0, state.config.advertised())]),
        broker_name: state.config.broker_name.clone(),
        cluster: state.config.cluster.clone(),
        enable_acting_master: false,
        zone_name: None,
    }
}

pub fn topic_route(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let header = match request.decode_header::<GetRouteInfoRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    if let Err(response) = super::check_topic(request, &header.topic) {
        return response;
    }
    let Some(topic) = state.metadata.topic(&header.topic) else {
        return RemotingCommand::error_response(
            request,
            ResponseCode::TOPIC_NOT_EXIST,
            format!(
                "No topic route info in name server for the topic: {}",
                header.topic
            ),
        );
    };
    let route = TopicRouteData {
        broker_datas: vec![broker_data(state)],
        queue_datas: vec![QueueData {
            broker_name: state.config.broker_name.clone(),
            perm: topic.perm,
            read_queue_nums: topic.read_queue_nums,
            topic_sys_flag: topic.topic_sys_flag,
            write_queue_nums: topic.write_queue_nums,
        }],
        ..TopicRouteData::default()
    };
    match route.to_json_for_client(
        request.version,
        header.accept_standard_json_only.unwrap_or(false),
    ) {
        Ok(body) => RemotingCommand::response_to(request, ResponseCode::SUCCESS).with_body(body),
        Err(error) => {
            RemotingCommand::error_response(request, ResponseCode::SYSTEM_ERROR, error.to_string())
        }
    }
}

pub fn cluster_info(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let info = ClusterInfo {
        broker_addr_table: BTreeMap::from([(state.config.broker_name.clone(), broker_data(state))]),
        cluster_addr_table: BTreeMap::from([(
            state.config.cluster.clone(),
            vec![state.config.broker_name.clone()],
        )]),
    };
    match info.to_fastjson() {
        Ok(body) => RemotingCommand::response_to(request, ResponseCode::SUCCESS).with_body(body),
        Err(error) => {
            RemotingCommand::error_response(request, ResponseCode::SYSTEM_ERROR, error.to_string())
        }
    }
}

pub fn create_topic(state: &BrokerState, request: &RemotingCommand) -> RemotingCommand {
    let header = match request.decode_header::<CreateTopicRequestHeader>() {
        Ok(header) => header,
        Err(error) => return bad_request(request, error),
    };
    if let Err(response) = super::check_client_topic(request, &header.topic) {
        return response;
    }
    if !(1..=1024).contains(&header.read_queue_nums)
        || !(1..=1024).contains(&header.write_queue_nums)
    {
        return RemotingCommand::error_response(
            request,
            ResponseCode::INVALID_PARAMETER,
            "queue counts must be between 1 and 1024",
        );
    }
    let stored = state.metadata.put_topic(TopicConfig {
        topic_name: header.topic,
        read_queue_nums: header.read_queue_nums,
        write_queue_nums: header.write_queue_nums,
        perm: header.perm,
        topic_filter_type: header.topic_filter_type,
        topic_sys_flag: header.topic_sys_flag.unwrap_or(0),
        order: header.order,
        attributes: BTreeMap::new(),
    });
    if let Err(error) = stored {
        return super::store_failure(request, error);
    }
    match state.metadata.persist() {
        Ok(()) => RemotingCommand::response_to(request, ResponseCode::SUCCESS),
        Err(error) => super::store_failure(request, error),
    }
}
