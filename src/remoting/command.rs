//! `RemotingCommand`: one request or response of the remoting protocol, independent of how its header
//! is serialized on the wire.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::code::{LanguageCode, RequestCode, ResponseCode, version};
use super::header::{CommandHeader, HeaderError};

/// Custom header fields. Values are always strings on the wire; a sorted map makes the emitted JSON
/// deterministic, which the Java side does not care about and humans reading captures do.
pub type ExtFields = BTreeMap<String, String>;

/// Flag bit 0: the command is a response.
pub const FLAG_RESPONSE: i32 = 1;
/// Flag bit 1: the request expects no response.
pub const FLAG_ONEWAY: i32 = 1 << 1;

/// How a frame's header is serialized (the high byte of the header-length word).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SerializeType {
    /// fastjson-compatible JSON, what Java peers send by default.
    #[default]
    Json,
    /// The compact `ROCKETMQ` binary layout.
    Binary,
}

impl SerializeType {
    /// The type byte of the frame.
    pub fn to_byte(self) -> u8 {
        match self {
            SerializeType::Json => 0,
            SerializeType::Binary => 1,
        }
    }

    /// The type for a frame's type byte, if it is one of the two known types.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(SerializeType::Json),
            1 => Some(SerializeType::Binary),
            _ => None,
        }
    }

    /// The name Java uses (`SerializeType` enum constant).
    pub fn name(self) -> &'static str {
        match self {
            SerializeType::Json => "JSON",
            SerializeType::Binary => "ROCKETMQ",
        }
    }
}

/// One remoting command: the decoded header plus the untouched body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotingCommand {
    /// Request code for requests, response code for responses.
    pub code: i32,
    pub language: LanguageCode,
    /// The sender's `MQVersion` ordinal.
    pub version: i32,
    /// Request id; a response carries the request's.
    pub opaque: i32,
    /// Bit field, see [`FLAG_RESPONSE`] and [`FLAG_ONEWAY`].
    pub flag: i32,
    pub remark: Option<String>,
    pub ext_fields: ExtFields,
    /// The frame body, shared with the receive buffer rather than copied.
    pub body: Bytes,
    /// The encoding the header arrived in, or is to be sent in.
    pub serialize_type: SerializeType,
}

impl Default for RemotingCommand {
    fn default() -> Self {
        Self {
            code: 0,
            language: LanguageCode::default(),
            version: version::CURRENT,
            opaque: 0,
            flag: 0,
            remark: None,
            ext_fields: ExtFields::new(),
            body: Bytes::new(),
            serialize_type: SerializeType::Json,
        }
    }
}

impl RemotingCommand {
    /// A new request with the given code and opaque.
    pub fn request(code: RequestCode, opaque: i32) -> Self {
        Self {
            code: code.0,
            opaque,
            ..Self::default()
        }
    }

    /// A new response to `request`: same opaque, the response bit set, JSON header.
    pub fn response_to(request: &RemotingCommand, code: ResponseCode) -> Self {
        Self {
            code: code.0,
            opaque: request.opaque,
            flag: FLAG_RESPONSE,
            ..Self::default()
        }
    }

    /// A response carrying an error remark.
    pub fn error_response(
        request: &RemotingCommand,
        code: ResponseCode,
        remark: impl Into<String>,
    ) -> Self {
        Self::response_to(request, code).with_remark(remark)
    }

    pub fn with_remark(mut self, remark: impl Into<String>) -> Self {
        self.remark = Some(remark.into());
        self
    }

    pub fn with_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Replaces the ext fields with those of a typed header; other ext fields are kept.
    pub fn with_header<H: CommandHeader>(mut self, header: &H) -> Self {
        self.set_header(header);
        self
    }

    /// Writes a typed header's fields into the ext fields.
    pub fn set_header<H: CommandHeader>(&mut self, header: &H) {
        header.write_ext_fields(&mut self.ext_fields);
    }

    /// Reads a typed header from the ext fields.
    pub fn decode_header<H: CommandHeader>(&self) -> Result<H, HeaderError> {
        H::from_ext_fields(&self.ext_fields)
    }

    pub fn is_response(&self) -> bool {
        self.flag & FLAG_RESPONSE != 0
    }

    pub fn is_oneway(&self) -> bool {
        self.flag & FLAG_ONEWAY != 0
    }

    pub fn set_oneway(&mut self, oneway: bool) {
        if oneway {
            self.flag |= FLAG_ONEWAY;
        } else {
            self.flag &= !FLAG_ONEWAY;
        }
    }

    /// The request code, meaningful only when this is a request.
    pub fn request_code(&self) -> RequestCode {
        RequestCode(self.code)
    }

    /// The response code, meaningful only when this is a response.
    pub fn response_code(&self) -> ResponseCode {
        ResponseCode(self.code)
    }

    /// The name of the code, read as a request or response code according to the flag.
    pub fn code_name(&self) -> Option<&'static str> {
        if self.is_response() {
            self.response_code().name()
        } else {
            self.request_code().name()
        }
    }

    /// One ext field by key.
    pub fn ext(&self, key: &str) -> Option<&str> {
        self.ext_fields.get(key).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_copies_opaque_and_sets_flag() {
        let mut request = RemotingCommand::request(RequestCode::HEART_BEAT, 77);
        request.set_oneway(true);
        assert!(request.is_oneway());
        request.set_oneway(false);
        assert!(!request.is_oneway());
        let response = RemotingCommand::error_response(&request, ResponseCode::SYSTEM_BUSY, "busy");
        assert_eq!(response.opaque, 77);
        assert!(response.is_response());
        assert_eq!(response.code_name(), Some("SYSTEM_BUSY"));
        assert_eq!(response.remark.as_deref(), Some("busy"));
    }
}
