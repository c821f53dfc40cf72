//! The RocketMQ remoting protocol: frames, headers (JSON and binary), codes, typed headers, message
//! records, JSON bodies and POP extraInfo strings. Pure codec: no I/O beyond the tokio codec traits,
//! nothing about routing or storage.

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

pub use code::{LanguageCode, RequestCode, ResponseCode};
pub use command::{ExtFields, FLAG_ONEWAY, FLAG_RESPONSE, RemotingCommand, SerializeType};
pub use frame::{CodecError, FrameLimits, RemotingCodec};
pub use header::{CommandHeader, HeaderError};
