//! The RocketMQ remoting protocol: frames, headers (JSON and binary), codes, typed headers, message
//! records, JSON bodies and POP extraInfo strings. Pure codec: no I/O beyond the tokio codec traits,
//! nothing about routing or storage.
//!
//! ```
//! use bytes::BytesMut;
//! use rocketmesh::remoting::header::GetRouteInfoRequestHeader;
//! use rocketmesh::remoting::{RemotingCodec, RemotingCommand, RequestCode, ResponseCode, SerializeType};
//! use tokio_util::codec::{Decoder, Encoder};
//!
//! let header = GetRouteInfoRequestHeader { topic: "TopicTest".into(), ..Default::default() };
//! let mut request = RemotingCommand::request(RequestCode::GET_ROUTEINFO_BY_TOPIC, 7).with_header(&header);
//! request.serialize_type = SerializeType::Binary;
//!
//! let mut codec = RemotingCodec::default();
//! let mut wire = BytesMut::new();
//! codec.encode(&request, &mut wire)?;
//! let decoded = codec.decode(&mut wire)?.expect("one whole frame");
//! assert_eq!(decoded.decode_header::<GetRouteInfoRequestHeader>()?.topic, "TopicTest");
//!
//! let response = RemotingCommand::error_response(&decoded, ResponseCode::TOPIC_NOT_EXIST, "no route");
//! assert!(response.is_response() && response.opaque == 7);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod body;
pub mod code;
pub mod command;
pub mod extra_info;
pub mod fastjson;
pub mod frame;
pub mod fuzzing;
pub mod header;
pub mod header_binary;
pub mod header_json;
pub mod message;
pub mod raw;

pub use code::{LanguageCode, RequestCode, ResponseCode};
pub use command::{ExtFields, FLAG_ONEWAY, FLAG_RESPONSE, RemotingCommand, SerializeType};
pub use frame::{CodecError, FrameLimits, RemotingCodec};
pub use header::{CommandHeader, HeaderError};
