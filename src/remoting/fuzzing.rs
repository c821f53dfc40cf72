//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the corpus replay test, so both
//! exercise exactly the same code. Each feeds arbitrary bytes to one decoder and, when decoding
//! succeeds, checks that encoding the result and decoding it again gives the same value. A panic
//! here is a bug found; decoding errors are expected and ignored.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

use super::body::{
    BatchAckMessageRequestBody, ClusterInfo, ConsumerList, HeartbeatData, JsonBody, TopicRouteData,
};
use super::extra_info::{self, ExtraInfo, MsgOffsetEntry, OrderCountEntry, StartOffsetEntry};
use super::frame::{self, FrameLimits, RemotingCodec};
use super::message::{self, MessageRecord};
use super::{header_binary, header_json};

/// Frame stream: decode frames until the input runs out or an error; re-encode each frame.
pub fn frame_stream(data: &[u8]) {
    let limits = FrameLimits {
        max_frame: 1 << 20,
        ..FrameLimits::default()
    };
    let mut codec = RemotingCodec::new(limits);
    let mut buffer = BytesMut::from(data);
    while let Ok(Some(command)) = codec.decode(&mut buffer) {
        let mut encoded = BytesMut::new();
        if frame::encode_frame(&command, &limits, &mut encoded).is_err() {
            continue;
        }
        let again = codec.decode(&mut encoded);
        assert!(
            matches!(&again, Ok(Some(decoded)) if *decoded == command),
            "frame round trip changed {command:?} into {again:?}"
        );
    }
}

/// JSON header bytes.
pub fn json_header(data: &[u8]) {
    if let Ok(command) = header_json::decode(data) {
        let mut encoded = Vec::new();
        header_json::encode(&command, &mut encoded);
        let again = header_json::decode(&encoded).ok();
        assert_eq!(again.as_ref(), Some(&command), "JSON header round trip");
    }
}

/// Binary header bytes.
pub fn binary_header(data: &[u8]) {
    if let Ok(command) = header_binary::decode(data) {
        assert!(
            header_binary::fits(&command),
            "a decoded binary header always fits"
        );
        let mut encoded = Vec::new();
        header_binary::encode(&command, &mut encoded);
        let again = header_binary::decode(&encoded).ok();
        assert_eq!(again.as_ref(), Some(&command), "binary header round trip");
    }
}

/// Stored message records, as in a pull body.
pub fn message_records(data: &[u8]) {
    let data = Bytes::copy_from_slice(data);
    let _ = MessageRecord::decode(&data, true);
    if let Ok(records) = message::decode_records(&data, false) {
        let mut encoded = BytesMut::new();
        for record in &records {
            if record.encode(&mut encoded).is_err() {
                return;
            }
        }
        let again = message::decode_records(&encoded.freeze(), true).ok();
        assert_eq!(again.as_ref(), Some(&records), "record round trip");
    }
}

/// A SEND_BATCH_MESSAGE body.
pub fn batch_body(data: &[u8]) {
    let data = Bytes::copy_from_slice(data);
    if let Ok(entries) = message::decode_batch(&data) {
        let mut encoded = BytesMut::new();
        if message::encode_batch(&entries, &mut encoded).is_err() {
            return;
        }
        let again = message::decode_batch(&encoded.freeze()).ok();
        assert_eq!(again.as_ref(), Some(&entries), "batch round trip");
    }
}

/// Route, heartbeat, cluster, consumer-list and batch-ack JSON, standard or fastjson.
pub fn json_bodies(data: &[u8]) {
    body_round_trip::<TopicRouteData>(data);
    body_round_trip::<HeartbeatData>(data);
    body_round_trip::<ClusterInfo>(data);
    body_round_trip::<ConsumerList>(data);
    body_round_trip::<BatchAckMessageRequestBody>(data);
    if let Ok(batch) = BatchAckMessageRequestBody::from_json(data) {
        for ack in &batch.acks {
            if let Ok(offsets) = ack.offsets() {
                let mut rebuilt = ack.clone();
                assert!(
                    rebuilt.set_offsets(offsets.iter().copied()).is_ok(),
                    "decoded offsets are in range"
                );
                assert_eq!(
                    rebuilt.offsets().ok().as_ref(),
                    Some(&offsets),
                    "batch ack bits round trip"
                );
            }
        }
    }
    if let Ok(route) = TopicRouteData::from_json(data)
        && let Ok(fast) = route.to_fastjson()
    {
        assert_eq!(
            TopicRouteData::from_json(&fast).ok().as_ref(),
            Some(&route),
            "fastjson route"
        );
    }
}

fn body_round_trip<T: JsonBody + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(body) = T::from_json(data)
        && let Ok(json) = body.to_json()
    {
        assert_eq!(
            T::from_json(&json).ok().as_ref(),
            Some(&body),
            "JSON body round trip"
        );
    }
}

/// extraInfo handles and the pop info strings.
pub fn extra_info(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = text.parse::<ExtraInfo>() {
        assert_eq!(
            info.to_string().parse::<ExtraInfo>().ok().as_ref(),
            Some(&info),
            "extraInfo round trip"
        );
    }
    info_round_trip::<StartOffsetEntry>(text);
    info_round_trip::<MsgOffsetEntry>(text);
    info_round_trip::<OrderCountEntry>(text);
}

fn info_round_trip<T: extra_info::InfoItem + PartialEq + std::fmt::Debug>(text: &str) {
    if let Ok(items) = extra_info::parse_info::<T>(text) {
        let again = extra_info::parse_info::<T>(&extra_info::format_info(&items)).ok();
        assert_eq!(again.as_ref(), Some(&items), "info string round trip");
    }
}

/// A fuzz entry point.
pub type FuzzTarget = fn(&[u8]);

/// Every target by the name of its fuzz target and corpus directory.
pub const TARGETS: &[(&str, FuzzTarget)] = &[
    ("frame", frame_stream),
    ("json_header", json_header),
    ("binary_header", binary_header),
    ("message_record", message_records),
    ("batch_body", batch_body),
    ("json_body", json_bodies),
    ("extra_info", extra_info),
];
