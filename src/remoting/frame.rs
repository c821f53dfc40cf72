//! Frame codec for tokio: `len:i32 | type:u8 headerLen:u24 | header | body`, big-endian, where `len`
//! counts everything after itself.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::command::{RemotingCommand, SerializeType};
use super::header_binary::{self, BinaryHeaderError};
use super::header_json::{self, JsonHeaderError};

/// Java's default `com.rocketmq.remoting.frameMaxLength`: 16 MiB, counting the length prefix.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;
/// The header length is a 24-bit field.
pub const MAX_HEADER_FIELD: usize = 0x00FF_FFFF;
const LENGTH_PREFIX: usize = 4;
const HEADER_WORD: usize = 4;
/// Room reserved ahead of bytes that have not arrived yet, at least; beyond it the room grows
/// with the bytes already received (doubling), never with the length announced.
const MIN_RESERVE_HINT: usize = 4 * 1024;
/// Most room reserved ahead at once.
const MAX_RESERVE_HINT: usize = 64 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame length {length} is below the minimum of 4")]
    FrameTooShort { length: i64 },
    #[error("frame of {size} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { size: usize, max: usize },
    #[error("header length {header} does not fit in the frame's {available} bytes")]
    HeaderLongerThanFrame { header: usize, available: usize },
    #[error("header of {size} bytes exceeds the limit of {max} bytes")]
    HeaderTooLarge { size: usize, max: usize },
    #[error("truncated frame: the stream ended after {have} of its {need} bytes")]
    Truncated { have: usize, need: usize },
    #[error("unknown serialize type {0}")]
    UnknownSerializeType(u8),
    #[error(transparent)]
    Json(#[from] JsonHeaderError),
    #[error(transparent)]
    Binary(#[from] BinaryHeaderError),
}

impl CodecError {
    /// Whether the connection ended (reset, broken pipe, closed mid-frame) rather than sent bad
    /// bytes: worth a quiet log, not a warning about malformed input.
    pub fn is_closed_connection(&self) -> bool {
        matches!(self, CodecError::Io(_) | CodecError::Truncated { .. })
    }

    /// Whether the stream position is lost: after such an error no further frame can be found, so
    /// the connection must close. Other errors consumed exactly one bad frame.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            CodecError::Io(_)
                | CodecError::FrameTooShort { .. }
                | CodecError::FrameTooLarge { .. }
                | CodecError::Truncated { .. }
        )
    }
}

/// Limits applied while decoding and encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest whole frame including its 4-byte length prefix.
    pub max_frame: usize,
    /// Largest header; never more than the 24-bit field allows.
    pub max_header: usize,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            max_header: MAX_HEADER_FIELD,
        }
    }
}

/// Encodes and decodes [`RemotingCommand`]s on a byte stream.
#[derive(Debug, Clone, Default)]
pub struct RemotingCodec {
    limits: FrameLimits,
}

impl RemotingCodec {
    pub fn new(limits: FrameLimits) -> Self {
        Self { limits }
    }

    pub fn limits(&self) -> FrameLimits {
        self.limits
    }
}

/// Splits one complete frame off the front of `src` if it is all there.
///
/// Returns the frame without its length prefix. A length that is negative, too small or over the limit
/// is an error that leaves `src` untouched.
pub fn split_frame(src: &mut BytesMut, limits: &FrameLimits) -> Result<Option<Bytes>, CodecError> {
    let Some(prefix) = src.get(..LENGTH_PREFIX) else {
        return Ok(None);
    };
    let length = i32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    let length = match usize::try_from(length) {
        Ok(length) if length >= HEADER_WORD => length,
        _ => {
            return Err(CodecError::FrameTooShort {
                length: i64::from(length),
            });
        }
    };
    let size = length + LENGTH_PREFIX;
    if size > limits.max_frame {
        return Err(CodecError::FrameTooLarge {
            size,
            max: limits.max_frame,
        });
    }
    if src.len() < size {
        // A hint only, capped: memory follows the bytes that arrive, not the length announced.
        let ahead = src.len().clamp(MIN_RESERVE_HINT, MAX_RESERVE_HINT);
        src.reserve((size - src.len()).min(ahead));
        return Ok(None);
    }
    src.advance(LENGTH_PREFIX);
    Ok(Some(src.split_to(length).freeze()))
}

/// Decodes one frame (without its length prefix) into a command. The body shares `frame`'s memory.
pub fn decode_frame(frame: Bytes, limits: &FrameLimits) -> Result<RemotingCommand, CodecError> {
    let word = frame.get(..HEADER_WORD).ok_or(CodecError::FrameTooShort {
        length: frame.len() as i64,
    })?;
    let word = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
    let type_byte = (word >> 24) as u8;
    let header_len = (word & MAX_HEADER_FIELD as u32) as usize;
    let available = frame.len() - HEADER_WORD;
    if header_len > available {
        return Err(CodecError::HeaderLongerThanFrame {
            header: header_len,
            available,
        });
    }
    if header_len > limits.max_header {
        return Err(CodecError::HeaderTooLarge {
            size: header_len,
            max: limits.max_header,
        });
    }
    let serialize_type =
        SerializeType::from_byte(type_byte).ok_or(CodecError::UnknownSerializeType(type_byte))?;
    let header = &frame[HEADER_WORD..HEADER_WORD + header_len];
    let mut command = match serialize_type {
        SerializeType::Json => header_json::decode(header)?,
        SerializeType::Binary => header_binary::decode(header)?,
    };
    command.body = frame.slice(HEADER_WORD + header_len..);
    Ok(command)
}

/// Writes `command` as one frame into `dst`. A command asking for a binary header that cannot hold
/// its code (the POP family) is written with a JSON header instead.
pub fn encode_frame(
    command: &RemotingCommand,
    limits: &FrameLimits,
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    let mut header = Vec::with_capacity(256);
    let serialize_type = match command.serialize_type {
        SerializeType::Binary if header_binary::fits(command) => {
            header_binary::encode(command, &mut header);
            SerializeType::Binary
        }
        _ => {
            header_json::encode(command, &mut header);
            SerializeType::Json
        }
    };
    if header.len() > limits.max_header.min(MAX_HEADER_FIELD) {
        return Err(CodecError::HeaderTooLarge {
            size: header.len(),
            max: limits.max_header.min(MAX_HEADER_FIELD),
        });
    }
    let size = LENGTH_PREFIX + HEADER_WORD + header.len() + command.body.len();
    if size > limits.max_frame || size - LENGTH_PREFIX > i32::MAX as usize {
        return Err(CodecError::FrameTooLarge {
            size,
            max: limits.max_frame,
        });
    }
    dst.reserve(size);
    dst.put_u32((size - LENGTH_PREFIX) as u32);
    dst.put_u32((u32::from(serialize_type.to_byte()) << 24) | header.len() as u32);
    dst.extend_from_slice(&header);
    dst.extend_from_slice(&command.body);
    Ok(())
}

impl Decoder for RemotingCodec {
    type Item = RemotingCommand;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RemotingCommand>, CodecError> {
        match split_frame(src, &self.limits)? {
            Some(frame) => decode_frame(frame, &self.limits).map(Some),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<RemotingCommand>, CodecError> {
        match self.decode(src)? {
            Some(command) => Ok(Some(command)),
            None if src.is_empty() => Ok(None),
            None => {
                let need = src
                    .get(..LENGTH_PREFIX)
                    .and_then(|p| {
                        usize::try_from(i32::from_be_bytes([p[0], p[1], p[2], p[3]])).ok()
                    })
                    .map_or(LENGTH_PREFIX, |length| length.saturating_add(LENGTH_PREFIX));
                Err(CodecError::Truncated {
                    have: src.len(),
                    need,
                })
            }
        }
    }
}

impl Encoder<RemotingCommand> for RemotingCodec {
    type Error = CodecError;

    fn encode(&mut self, item: RemotingCommand, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_frame(&item, &self.limits, dst)
    }
}

impl Encoder<&RemotingCommand> for RemotingCodec {
    type Error = CodecError;

    fn encode(&mut self, item: &RemotingCommand, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_frame(item, &self.limits, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::{LanguageCode, RequestCode};

    fn hex_bytes(text: &str) -> Vec<u8> {
        let compact: String = text.split_whitespace().collect();
        hex::decode(compact).expect("valid hex")
    }

    /// The GET_ROUTEINFO_BY_TOPIC example frame of the wire reference (§1.4).
    #[test]
    fn reference_binary_frame_decodes_to_documented_fields() {
        let bytes = hex_bytes(
            "0000002d 01000029 0069 00 01df 00000007 00000000 00000000 00000014 0005 746f706963 00000009 546f70696354657374",
        );
        let mut buf = BytesMut::from(&bytes[..]);
        let command = RemotingCodec::default()
            .decode(&mut buf)
            .expect("decode")
            .expect("complete frame");
        assert!(buf.is_empty());
        assert_eq!(command.serialize_type, SerializeType::Binary);
        assert_eq!(command.request_code(), RequestCode::GET_ROUTEINFO_BY_TOPIC);
        assert_eq!(command.language, LanguageCode::JAVA);
        assert_eq!(command.version, 479);
        assert_eq!(command.opaque, 7);
        assert_eq!(command.flag, 0);
        assert_eq!(command.remark, None);
        assert_eq!(command.ext("topic"), Some("TopicTest"));
        assert!(command.body.is_empty());

        let mut again = BytesMut::new();
        RemotingCodec::default()
            .encode(&command, &mut again)
            .expect("encode");
        assert_eq!(
            &again[..],
            &bytes[..],
            "binary re-encoding is byte-identical"
        );
    }

    #[test]
    fn pop_in_binary_falls_back_to_json() {
        let mut command = RemotingCommand::request(RequestCode::POP_MESSAGE, 3);
        command.serialize_type = SerializeType::Binary;
        let mut buf = BytesMut::new();
        RemotingCodec::default()
            .encode(&command, &mut buf)
            .expect("encode");
        assert_eq!(buf[4], 0, "JSON type byte");
        let decoded = RemotingCodec::default()
            .decode(&mut buf)
            .expect("decode")
            .expect("frame");
        assert_eq!(decoded.code, 200050);
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut full = BytesMut::new();
        let command = RemotingCommand::request(RequestCode::HEART_BEAT, 9).with_body(&b"{}"[..]);
        RemotingCodec::default()
            .encode(&command, &mut full)
            .expect("encode");
        let mut codec = RemotingCodec::default();
        let mut partial = BytesMut::new();
        for (index, byte) in full.iter().enumerate() {
            partial.put_u8(*byte);
            let result = codec.decode(&mut partial).expect("no error");
            assert_eq!(result.is_some(), index == full.len() - 1);
        }
    }
}
