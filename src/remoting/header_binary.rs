//! The `ROCKETMQ` binary header (serialize type 1).
//!
//! Layout: code i16, language u8, version i16, opaque i32, flag i32, remark (i32 length + UTF-8),
//! ext fields (i32 total length, then entries of i16 key length + key, i32 value length + value).
//! A zero-length string means "none". Codes or versions outside i16 cannot be written; callers
//! check [`fits`] and fall back to JSON rather than truncate as Java does.

use super::code::LanguageCode;
use super::command::{ExtFields, RemotingCommand, SerializeType};

/// Why a binary header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BinaryHeaderError {
    #[error(
        "binary header truncated: {field} needs {needed} bytes at offset {offset}, {available} left"
    )]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("binary header: negative length {length} for {field} at offset {offset}")]
    NegativeLength {
        field: &'static str,
        offset: usize,
        length: i64,
    },
    #[error("binary header: {field} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str, offset: usize },
    #[error("binary header: {trailing} unexpected bytes after the ext fields")]
    TrailingBytes { trailing: usize },
}

/// Whether `command` can be written in binary without losing its code or version.
pub fn fits(command: &RemotingCommand) -> bool {
    i16::try_from(command.code).is_ok() && i16::try_from(command.version).is_ok()
}

/// Appends the binary header of `command` to `out`. The caller has checked [`fits`]; a value that
/// does not fit is clamped rather than wrapped, so it can never alias another code.
pub fn encode(command: &RemotingCommand, out: &mut Vec<u8>) {
    out.extend_from_slice(&clamp_i16(command.code).to_be_bytes());
    out.push(command.language.0);
    out.extend_from_slice(&clamp_i16(command.version).to_be_bytes());
    out.extend_from_slice(&command.opaque.to_be_bytes());
    out.extend_from_slice(&command.flag.to_be_bytes());
    let remark = command.remark.as_deref().unwrap_or("");
    push_len_i32(out, remark.len());
    out.extend_from_slice(remark.as_bytes());

    let ext_len_at = out.len();
    out.extend_from_slice(&[0; 4]);
    for (key, value) in &command.ext_fields {
        // Keys are field names; one that does not fit an i16 length cannot be expressed, so skip it.
        let Ok(key_len) = i16::try_from(key.len()) else {
            continue;
        };
        out.extend_from_slice(&key_len.to_be_bytes());
        out.extend_from_slice(key.as_bytes());
        push_len_i32(out, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    let ext_len = out.len() - ext_len_at - 4;
    let ext_len = i32::try_from(ext_len).unwrap_or(i32::MAX).to_be_bytes();
    out[ext_len_at..ext_len_at + 4].copy_from_slice(&ext_len);
}

fn clamp_i16(value: i32) -> i16 {
    i16::try_from(value).unwrap_or(if value < 0 { i16::MIN } else { i16::MAX })
}

fn push_len_i32(out: &mut Vec<u8>, len: usize) {
    out.extend_from_slice(&i32::try_from(len).unwrap_or(i32::MAX).to_be_bytes());
}

/// Decodes a binary header; the body is left empty for the caller to fill.
pub fn decode(header: &[u8]) -> Result<RemotingCommand, BinaryHeaderError> {
    let mut reader = Reader {
        data: header,
        offset: 0,
    };
    let code = i32::from(reader.i16("code")?);
    let language = LanguageCode(reader.u8("language")?);
    let version = i32::from(reader.i16("version")?);
    let opaque = reader.i32("opaque")?;
    let flag = reader.i32("flag")?;
    let remark_len = reader.length_i32("remark length")?;
    let remark = reader.string("remark", remark_len)?;

    let mut ext_fields = ExtFields::new();
    if reader.remaining() > 0 {
        let ext_len = reader.length_i32("ext fields length")?;
        let ext_bytes = reader.take("ext fields", ext_len)?;
        let base = reader.offset - ext_len;
        let mut entries = Reader {
            data: ext_bytes,
            offset: 0,
        };
        while entries.remaining() > 0 {
            let key_len = entries
                .length_i16("ext key length")
                .map_err(|e| e.shifted(base))?;
            let key = entries
                .string("ext key", key_len)
                .map_err(|e| e.shifted(base))?;
            let value_len = entries
                .length_i32("ext value length")
                .map_err(|e| e.shifted(base))?;
            let value = entries
                .string("ext value", value_len)
                .map_err(|e| e.shifted(base))?;
            // Zero-length strings decode to null in Java; a null key or value is an absent field.
            if let (Some(key), Some(value)) = (key, value) {
                ext_fields.insert(key, value);
            }
        }
    }
    if reader.remaining() > 0 {
        return Err(BinaryHeaderError::TrailingBytes {
            trailing: reader.remaining(),
        });
    }
    Ok(RemotingCommand {
        code,
        language,
        version,
        opaque,
        flag,
        remark,
        ext_fields,
        body: bytes::Bytes::new(),
        serialize_type: SerializeType::Binary,
    })
}

impl BinaryHeaderError {
    fn shifted(self, base: usize) -> Self {
        match self {
            Self::Truncated {
                field,
                offset,
                needed,
                available,
            } => Self::Truncated {
                field,
                offset: offset + base,
                needed,
                available,
            },
            Self::NegativeLength {
                field,
                offset,
                length,
            } => Self::NegativeLength {
                field,
                offset: offset + base,
                length,
            },
            Self::InvalidUtf8 { field, offset } => Self::InvalidUtf8 {
                field,
                offset: offset + base,
            },
            other => other,
        }
    }
}

/// A bounds-checked big-endian cursor.
struct Reader<'a> {
    data: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len() - self.offset
    }

    fn take(&mut self, field: &'static str, needed: usize) -> Result<&'a [u8], BinaryHeaderError> {
        let slice = self
            .data
            .get(self.offset..)
            .and_then(|rest| rest.get(..needed))
            .ok_or(BinaryHeaderError::Truncated {
                field,
                offset: self.offset,
                needed,
                available: self.remaining(),
            })?;
        self.offset += needed;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], BinaryHeaderError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(field, N)?);
        Ok(array)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, BinaryHeaderError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, BinaryHeaderError> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, BinaryHeaderError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    fn length_i32(&mut self, field: &'static str) -> Result<usize, BinaryHeaderError> {
        let offset = self.offset;
        let length = self.i32(field)?;
        usize::try_from(length).map_err(|_| BinaryHeaderError::NegativeLength {
            field,
            offset,
            length: i64::from(length),
        })
    }

    fn length_i16(&mut self, field: &'static str) -> Result<usize, BinaryHeaderError> {
        let offset = self.offset;
        let length = self.i16(field)?;
        usize::try_from(length).map_err(|_| BinaryHeaderError::NegativeLength {
            field,
            offset,
            length: i64::from(length),
        })
    }

    fn string(
        &mut self,
        field: &'static str,
        len: usize,
    ) -> Result<Option<String>, BinaryHeaderError> {
        let offset = self.offset;
        let bytes = self.take(field, len)?;
        if bytes.is_empty() {
            return Ok(None);
        }
        std::str::from_utf8(bytes)
            .map(|text| Some(text.to_owned()))
            .map_err(|_| BinaryHeaderError::InvalidUtf8 { field, offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::RequestCode;

    #[test]
    fn zero_length_strings_mean_none() {
        let mut command = RemotingCommand::request(RequestCode::HEART_BEAT, 1);
        command.remark = Some(String::new());
        command.ext_fields.insert("empty".into(), String::new());
        let mut out = Vec::new();
        encode(&command, &mut out);
        let decoded = decode(&out).expect("decode");
        assert_eq!(decoded.remark, None);
        assert!(decoded.ext_fields.is_empty());
    }

    #[test]
    fn pop_codes_do_not_fit() {
        let command = RemotingCommand::request(RequestCode::POP_MESSAGE, 1);
        assert!(!fits(&command));
        assert!(fits(&RemotingCommand::request(
            RequestCode::SEND_MESSAGE_V2,
            1
        )));
    }

    #[test]
    fn bad_lengths_are_typed_errors() {
        let mut out = Vec::new();
        encode(
            &RemotingCommand::request(RequestCode::HEART_BEAT, 1),
            &mut out,
        );
        // remark length field sits at offset 13
        let mut negative = out.clone();
        negative[13..17].copy_from_slice(&(-5i32).to_be_bytes());
        assert!(matches!(
            decode(&negative),
            Err(BinaryHeaderError::NegativeLength { .. })
        ));
        let mut too_long = out.clone();
        too_long[13..17].copy_from_slice(&1000i32.to_be_bytes());
        assert!(matches!(
            decode(&too_long),
            Err(BinaryHeaderError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&out[..10]),
            Err(BinaryHeaderError::Truncated { .. })
        ));
    }
}
