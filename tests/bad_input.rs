//! Malformed input of every kind gives a typed error, never a panic, and never loses the frames that
//! came before it.

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rocketmesh::remoting::body::{BodyError, HeartbeatData, JsonBody, TopicRouteData};
use rocketmesh::remoting::frame::{CodecError, FrameLimits};
use rocketmesh::remoting::header_binary::BinaryHeaderError;
use rocketmesh::remoting::message::{self, MessageRecord, RecordError};
use rocketmesh::remoting::{RemotingCodec, RemotingCommand, RequestCode, SerializeType};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{Decoder, Encoder, FramedRead};

fn frame_of(command: &RemotingCommand) -> Vec<u8> {
    let mut out = BytesMut::new();
    RemotingCodec::default()
        .encode(command, &mut out)
        .expect("encode");
    out.to_vec()
}

fn heartbeat() -> RemotingCommand {
    RemotingCommand::request(RequestCode::HEART_BEAT, 1).with_body(&br#"{"clientID":"c"}"#[..])
}

/// A frame with the given type byte and raw header, built by hand.
fn raw_frame(type_byte: u8, header: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&((4 + header.len() + body.len()) as i32).to_be_bytes());
    out.extend_from_slice(&((u32::from(type_byte) << 24) | header.len() as u32).to_be_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(body);
    out
}

fn decode_all(bytes: &[u8]) -> Result<Vec<RemotingCommand>, CodecError> {
    let mut codec = RemotingCodec::default();
    let mut buffer = BytesMut::from(bytes);
    let mut commands = Vec::new();
    while let Some(command) = codec.decode_eof(&mut buffer)? {
        commands.push(command);
    }
    Ok(commands)
}

#[test]
fn truncated_frames_wait_then_fail_at_end_of_stream() {
    let frame = frame_of(&heartbeat());
    for cut in 1..frame.len() {
        let mut codec = RemotingCodec::default();
        let mut buffer = BytesMut::from(&frame[..cut]);
        assert!(
            codec
                .decode(&mut buffer)
                .expect("incomplete is not an error")
                .is_none()
        );
        let error = codec
            .decode_eof(&mut buffer)
            .expect_err("end of stream inside a frame");
        assert!(
            matches!(error, CodecError::Truncated { have, .. } if have == cut),
            "{error}"
        );
    }
}

#[test]
fn header_longer_than_frame() {
    let mut frame = frame_of(&heartbeat());
    let header_len = u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) & 0xFF_FFFF;
    frame[4..8].copy_from_slice(&(header_len + 1000).to_be_bytes());
    assert!(matches!(
        decode_all(&frame),
        Err(CodecError::HeaderLongerThanFrame { .. })
    ));
}

#[test]
fn frames_over_the_limit_and_negative_lengths() {
    let mut codec = RemotingCodec::new(FrameLimits {
        max_frame: 64,
        ..FrameLimits::default()
    });
    let big =
        frame_of(&RemotingCommand::request(RequestCode::SEND_MESSAGE, 1).with_body(vec![0u8; 100]));
    let error = codec
        .decode(&mut BytesMut::from(&big[..]))
        .expect_err("too large");
    assert!(matches!(error, CodecError::FrameTooLarge { max: 64, .. }) && error.is_fatal());
    // Encoding refuses too, rather than writing a frame the peer must reject.
    let too_big = RemotingCommand::request(RequestCode::SEND_MESSAGE, 1).with_body(vec![0u8; 100]);
    assert!(matches!(
        codec.encode(too_big, &mut BytesMut::new()),
        Err(CodecError::FrameTooLarge { .. })
    ));
    for length in [-1i32, i32::MIN, 0, 3] {
        let error = decode_all(&length.to_be_bytes()).expect_err("bad length");
        assert!(
            matches!(error, CodecError::FrameTooShort { .. }),
            "{length}: {error}"
        );
    }
    assert!(matches!(
        decode_all(&raw_frame(7, b"{}", b"")),
        Err(CodecError::UnknownSerializeType(7))
    ));
}

#[test]
fn invalid_utf8_everywhere() {
    assert!(matches!(
        decode_all(&raw_frame(0, b"{\"remark\":\"\xff\xfe\"}", b"")),
        Err(CodecError::Json(_))
    ));
    // Binary header: remark of 2 bytes that are not UTF-8.
    let mut binary = vec![0, 34, 0, 1, 223, 0, 0, 0, 1, 0, 0, 0, 0];
    binary.extend_from_slice(&2i32.to_be_bytes());
    binary.extend_from_slice(b"\xc3\x28");
    binary.extend_from_slice(&0i32.to_be_bytes());
    assert!(matches!(
        decode_all(&raw_frame(1, &binary, b"")),
        Err(CodecError::Binary(BinaryHeaderError::InvalidUtf8 {
            field: "remark",
            ..
        }))
    ));
    let mut record = BytesMut::new();
    MessageRecord {
        topic: "abc".into(),
        ..MessageRecord::default()
    }
    .encode(&mut record)
    .expect("encode");
    let topic_at = record.len() - 2 - 3;
    record[topic_at] = 0xff;
    assert!(matches!(
        MessageRecord::decode(&record.freeze(), false),
        Err(RecordError::InvalidUtf8 { field: "topic", .. })
    ));
    assert!(TopicRouteData::from_json(b"{\"brokerDatas\":[{\"brokerName\":\"\xff\"}]}").is_err());
}

#[test]
fn deeply_nested_json() {
    let deep_header = format!(
        r#"{{"extFields":{{"a":{}{}}}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert!(matches!(
        decode_all(&raw_frame(0, deep_header.as_bytes(), b"")),
        Err(CodecError::Json(_))
    ));
    let deep_body = format!(
        r#"{{"clientID":{}{}}}"#,
        "{\"a\":".repeat(100_000),
        "}".repeat(100_000)
    );
    assert!(matches!(
        HeartbeatData::from_json(deep_body.as_bytes()),
        Err(BodyError::Fastjson(_))
    ));
}

#[test]
fn negative_lengths_inside_records_and_batches() {
    let mut out = BytesMut::new();
    let record = MessageRecord {
        topic: "T".into(),
        body: Bytes::from_static(b"x"),
        ..MessageRecord::default()
    };
    record.encode(&mut out).expect("encode");
    let good = out.to_vec();
    let cases: [(&str, usize, &[u8]); 4] = [
        ("total size", 0, &(-8i32).to_be_bytes()),
        ("body length", 84, &(-1i32).to_be_bytes()),
        ("topic length", 89, &[0x80]),
        ("properties length", 91, &(-2i16).to_be_bytes()),
    ];
    for (field, at, bytes) in cases {
        let mut bad = good.clone();
        bad[at..at + bytes.len()].copy_from_slice(bytes);
        let error = message::decode_records(&Bytes::from(bad), false).expect_err(field);
        assert!(
            matches!(error, RecordError::NegativeLength { field: f, .. } if f == field),
            "{field}: {error}"
        );
    }
    let mut batch = Vec::new();
    batch.extend_from_slice(&30i32.to_be_bytes());
    batch.extend_from_slice(&[0; 12]);
    batch.extend_from_slice(&(-5i32).to_be_bytes());
    assert!(matches!(
        message::decode_batch(&Bytes::from(batch)),
        Err(RecordError::NegativeLength {
            field: "body length",
            ..
        })
    ));
}

/// On a socket, the frames before a malformed one arrive intact and the error is the next item.
#[tokio::test]
async fn frames_before_a_bad_one_are_delivered() {
    let (mut writer, reader) = tokio::io::duplex(1024);
    let mut stream = FramedRead::new(reader, RemotingCodec::default());
    let mut binary = heartbeat();
    binary.serialize_type = SerializeType::Binary;
    let mut bytes = frame_of(&heartbeat());
    bytes.extend(frame_of(&binary));
    bytes.extend(raw_frame(0, b"{\"code\":", b""));
    let writing = tokio::spawn(async move {
        writer.write_all(&bytes).await.expect("write");
    });
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
        .await
        .expect("in time");
    assert_eq!(first.and_then(Result::ok).map(|c| c.code), Some(34));
    let second = stream
        .next()
        .await
        .and_then(Result::ok)
        .expect("binary frame");
    assert_eq!(second.serialize_type, SerializeType::Binary);
    assert!(matches!(
        stream.next().await,
        Some(Err(CodecError::Json(_)))
    ));
    writing.await.expect("writer");
}
