//! Encode and decode of a SEND_MESSAGE_V2 request with a 1 KiB body, JSON and binary headers; and
//! the sidecar's relay of it: the old way (decode, set queue id, `bname` and opaque, encode) next
//! to the new (scan the header bytes, splice the changed fields, write).

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rocketmesh::remoting::frame::{FrameLimits, decode_frame, encode_frame};
use rocketmesh::remoting::header::SendMessageRequestHeaderV2;
use rocketmesh::remoting::raw::{RawCommand, RawHead};
use rocketmesh::remoting::{RemotingCodec, RemotingCommand, RequestCode, SerializeType};
use std::hint::black_box;
use tokio_util::codec::{Decoder, Encoder};

fn send_v2(serialize_type: SerializeType) -> RemotingCommand {
    let header = SendMessageRequestHeaderV2 {
        producer_group: "please_rename_unique_group_name".into(),
        topic: "TopicTest".into(),
        default_topic: "TBW102".into(),
        default_topic_queue_nums: 4,
        queue_id: 3,
        sys_flag: 0,
        born_timestamp: 1_763_700_000_000,
        flag: 0,
        properties: Some(
            "TAGS\u{1}TagA\u{2}WAIT\u{1}true\u{2}UNIQ_KEY\u{1}7F00000100002A9F0000000000001234\u{2}KEYS\u{1}order-42\u{2}"
                .into(),
        ),
        reconsume_times: Some(0),
        unit_mode: Some(false),
        max_reconsume_times: None,
        batch: Some(false),
        broker_name: Some("broker-a".into()),
    };
    let mut command = RemotingCommand::request(RequestCode::SEND_MESSAGE_V2, 1234)
        .with_header(&header)
        .with_body(Bytes::from(vec![b'x'; 1024]));
    command.serialize_type = serialize_type;
    command
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("send_message_v2_1KiB");
    group.throughput(Throughput::Elements(1));
    for (name, serialize_type) in [
        ("json", SerializeType::Json),
        ("binary", SerializeType::Binary),
    ] {
        let command = send_v2(serialize_type);
        let mut codec = RemotingCodec::default();
        let mut encoded = BytesMut::new();
        codec.encode(&command, &mut encoded).expect("encode");
        let encoded = encoded.freeze();

        group.bench_with_input(BenchmarkId::new("encode", name), &command, |b, command| {
            let mut out = BytesMut::with_capacity(4096);
            b.iter(|| {
                out.clear();
                codec.encode(black_box(command), &mut out).expect("encode");
                black_box(out.len())
            })
        });
        group.bench_with_input(BenchmarkId::new("decode", name), &encoded, |b, encoded| {
            b.iter(|| {
                let mut buffer = BytesMut::from(&encoded[..]);
                black_box(codec.decode(&mut buffer).expect("decode"))
            })
        });
        group.bench_with_input(
            BenchmarkId::new("decode_typed_header", name),
            &encoded,
            |b, encoded| {
                b.iter(|| {
                    let mut buffer = BytesMut::from(&encoded[..]);
                    let command = codec.decode(&mut buffer).expect("decode").expect("frame");
                    black_box(
                        command
                            .decode_header::<SendMessageRequestHeaderV2>()
                            .expect("header"),
                    )
                })
            },
        );
        // The relay of one send: request in, routed copy out, with queue id, bname and opaque set.
        let frame = encoded.slice(4..);
        let limits = FrameLimits::default();
        group.bench_with_input(
            BenchmarkId::new("relay_decode_encode", name),
            &frame,
            |b, frame| {
                let mut out = BytesMut::with_capacity(4096);
                b.iter(|| {
                    out.clear();
                    let mut command =
                        decode_frame(black_box(frame).clone(), &limits).expect("decode");
                    command.ext_fields.insert("e".into(), "1".into());
                    command.ext_fields.insert("n".into(), "broker-b".into());
                    command.opaque = 77;
                    encode_frame(&command, &limits, &mut out).expect("encode");
                    black_box(out.len())
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("relay_scan_splice", name),
            &frame,
            |b, frame| {
                let mut out = BytesMut::with_capacity(4096);
                b.iter(|| {
                    out.clear();
                    let raw = RawCommand::scan(black_box(frame), &limits).expect("scan");
                    let topic = raw.ext("b").expect("plain").expect("topic");
                    black_box(topic);
                    let routed = raw.rewritten(77, &[("e", "1"), ("n", "broker-b")]);
                    routed.encode(&limits, &mut out).expect("encode");
                    black_box(out.len())
                })
            },
        );
        // What a client lane does: scan, then write the routed copy straight into its buffer.
        group.bench_with_input(
            BenchmarkId::new("relay_scan_write_in_place", name),
            &frame,
            |b, frame| {
                let mut out = BytesMut::with_capacity(4096);
                let mut scratch = Vec::new();
                b.iter(|| {
                    out.clear();
                    let raw = RawCommand::scan(black_box(frame), &limits).expect("scan");
                    let topic = raw.ext("b").expect("plain").expect("topic");
                    black_box(topic);
                    raw.write_relayed(
                        77,
                        &[("e", "1"), ("n", "broker-b")],
                        &limits,
                        &mut scratch,
                        &mut out,
                    )
                    .expect("write");
                    black_box(out.len())
                })
            },
        );
        // And its response: restore the client's opaque.
        group.bench_with_input(
            BenchmarkId::new("response_opaque_decode_encode", name),
            &frame,
            |b, frame| {
                let mut out = BytesMut::with_capacity(4096);
                b.iter(|| {
                    out.clear();
                    let mut command =
                        decode_frame(black_box(frame).clone(), &limits).expect("decode");
                    command.opaque = 77;
                    encode_frame(&command, &limits, &mut out).expect("encode");
                    black_box(out.len())
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("response_opaque_scan_splice", name),
            &frame,
            |b, frame| {
                let mut out = BytesMut::with_capacity(4096);
                b.iter(|| {
                    out.clear();
                    let raw = RawCommand::scan(black_box(frame), &limits).expect("scan");
                    raw.with_opaque(77)
                        .encode(&limits, &mut out)
                        .expect("encode");
                    black_box(out.len())
                })
            },
        );
        // A client lane reads only the answer's top level and splices the opaque as it writes.
        group.bench_with_input(
            BenchmarkId::new("response_opaque_head_write", name),
            &frame,
            |b, frame| {
                let mut out = BytesMut::with_capacity(4096);
                b.iter(|| {
                    out.clear();
                    let head = RawHead::scan(black_box(frame), &limits).expect("scan");
                    head.write_with_opaque(77, &limits, &mut out)
                        .expect("write");
                    black_box(out.len())
                })
            },
        );
    }
    group.finish();
}

/// The headers the load tool's sends and the bundled broker's answers carry, as captured on the
/// wire: the sidecar scans one of each per message.
const SEND_HEADER: &str = r#"{"code":310,"extFields":{"a":"bench_producer","b":"AbTopic","c":"TBW102","d":"4","e":"1","f":"0","g":"1796586999283","h":"0","i":"WAIT\u0001true\u0002"},"flag":0,"language":"JAVA","opaque":2,"serializeTypeCurrentRPC":"JSON","version":479}"#;
const ANSWER_HEADER: &str = r#"{"code":0,"extFields":{"MSG_REGION":"DefaultRegion","TRACE_ON":"true","msgId":"7F00000100004D620000000000000000","queueId":"1","queueOffset":"0","transactionId":"7F0000015C28304D23671E075DF40001"},"flag":1,"language":"JAVA","opaque":2,"serializeTypeCurrentRPC":"JSON","version":479}"#;

fn json_frame(header: &str) -> Bytes {
    let mut frame = (header.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(header.as_bytes());
    frame.extend_from_slice(&[b'x'; 1024]);
    Bytes::from(frame)
}

fn scans(c: &mut Criterion) {
    let mut group = c.benchmark_group("scan_captured_headers");
    group.throughput(Throughput::Elements(1));
    let limits = FrameLimits::default();
    let send = json_frame(SEND_HEADER);
    let answer = json_frame(ANSWER_HEADER);
    group.bench_function("send_request_scan", |b| {
        b.iter(|| black_box(RawCommand::scan(black_box(&send), &limits).expect("scan")))
    });
    group.bench_function("send_answer_head_scan", |b| {
        b.iter(|| black_box(RawHead::scan(black_box(&answer), &limits).expect("scan")))
    });
    group.finish();
}

criterion_group!(benches, codec, scans);
criterion_main!(benches);
