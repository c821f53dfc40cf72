//! The JSON header (serialize type 0), as fastjson writes and reads it.
//!
//! Encoding emits exactly what a Java peer emits: keys sorted, nulls omitted, `language` by name,
//! `serializeTypeCurrentRPC`, ext field values as strings. Decoding is as lenient as the Java broker:
//! missing fields take defaults, unknown keys are ignored, ext values may be numbers, booleans or
//! null, and `language` may be a name or a number.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::code::LanguageCode;
use super::command::{ExtFields, RemotingCommand, SerializeType};

/// Why a JSON header could not be read.
#[derive(Debug, thiserror::Error)]
#[error("invalid JSON header: {0}")]
pub struct JsonHeaderError(#[from] serde_json::Error);

impl JsonHeaderError {
    fn not_an_object() -> Self {
        Self(<serde_json::Error as de::Error>::custom(
            "the header is not a JSON object",
        ))
    }
}

/// Appends the JSON header of `command` to `out`.
pub fn encode(command: &RemotingCommand, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"code\":");
    push_int(out, i64::from(command.code));
    if !command.ext_fields.is_empty() {
        out.extend_from_slice(b",\"extFields\":{");
        for (index, (key, value)) in command.ext_fields.iter().enumerate() {
            if index > 0 {
                out.push(b',');
            }
            push_json_string(out, key);
            out.push(b':');
            push_json_string(out, value);
        }
        out.push(b'}');
    }
    out.extend_from_slice(b",\"flag\":");
    push_int(out, i64::from(command.flag));
    out.extend_from_slice(b",\"language\":");
    match command.language.name() {
        Some(name) => push_json_string(out, name),
        // fastjson reads an enum from its ordinal too, so an unnamed language survives as a number.
        None => push_int(out, i64::from(command.language.0)),
    }
    out.extend_from_slice(b",\"opaque\":");
    push_int(out, i64::from(command.opaque));
    if let Some(remark) = &command.remark {
        out.extend_from_slice(b",\"remark\":");
        push_json_string(out, remark);
    }
    out.extend_from_slice(b",\"serializeTypeCurrentRPC\":\"JSON\",\"version\":");
    push_int(out, i64::from(command.version));
    out.push(b'}');
}

/// Decodes a JSON header; the body is left empty for the caller to fill.
pub fn decode(header: &[u8]) -> Result<RemotingCommand, JsonHeaderError> {
    // serde would also read a struct from an array; a header is only ever an object.
    if header.iter().find(|byte| !byte.is_ascii_whitespace()) != Some(&b'{') {
        return Err(JsonHeaderError::not_an_object());
    }
    let parsed: WireHeader = serde_json::from_slice(header)?;
    Ok(RemotingCommand {
        code: parsed.code,
        language: parsed.language,
        version: parsed.version,
        opaque: parsed.opaque,
        flag: parsed.flag,
        remark: parsed.remark,
        ext_fields: parsed.ext_fields,
        body: bytes::Bytes::new(),
        serialize_type: SerializeType::Json,
    })
}

fn push_int(out: &mut Vec<u8>, value: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// Writes `text` as a JSON string literal, escaping what JSON requires.
pub(crate) fn push_json_string(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        let escape: Option<&[u8]> = match byte {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x00..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..index]);
        match escape {
            Some(escaped) => out.extend_from_slice(escaped),
            None => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ]),
        }
        start = index + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[derive(Deserialize)]
struct WireHeader {
    #[serde(default, deserialize_with = "lenient_i32")]
    code: i32,
    #[serde(default, deserialize_with = "lenient_language")]
    language: LanguageCode,
    #[serde(default, deserialize_with = "lenient_i32")]
    version: i32,
    #[serde(default, deserialize_with = "lenient_i32")]
    opaque: i32,
    #[serde(default, deserialize_with = "lenient_i32")]
    flag: i32,
    #[serde(default, deserialize_with = "lenient_opt_string")]
    remark: Option<String>,
    #[serde(default, rename = "extFields", deserialize_with = "lenient_ext_fields")]
    ext_fields: ExtFields,
}

/// A JSON scalar read as Java would read it into a `String` field: numbers and booleans become their
/// text, null becomes `None`, and nested values their JSON text.
struct LenientString(Option<String>);

impl<'de> Deserialize<'de> for LenientString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LenientVisitor;
        impl<'de> Visitor<'de> for LenientVisitor {
            type Value = LenientString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number, boolean or null")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(LenientString(Some(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(LenientString(Some(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(LenientString(Some(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(LenientString(Some(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(LenientString(Some(v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(LenientString(Some(v.to_string())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(LenientString(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(LenientString(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let value =
                    serde_json::Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(LenientString(Some(value.to_string())))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                let value =
                    serde_json::Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(LenientString(Some(value.to_string())))
            }
        }
        deserializer.deserialize_any(LenientVisitor)
    }
}

fn lenient_opt_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    Ok(LenientString::deserialize(deserializer)?.0)
}

fn lenient_ext_fields<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ExtFields, D::Error> {
    struct ExtVisitor;
    impl<'de> Visitor<'de> for ExtVisitor {
        type Value = ExtFields;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of ext fields or null")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(ExtFields::new())
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(ExtFields::new())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut fields = ExtFields::new();
            while let Some(key) = map.next_key::<String>()? {
                // A null value is an absent field, as in Java's `HashMap.get`.
                if let LenientString(Some(value)) = map.next_value()? {
                    fields.insert(key, value);
                }
            }
            Ok(fields)
        }
    }
    deserializer.deserialize_any(ExtVisitor)
}

fn lenient_i32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i32, D::Error> {
    struct IntVisitor;
    impl<'de> Visitor<'de> for IntVisitor {
        type Value = i32;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a 32-bit integer")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i32, E> {
            i32::try_from(v).map_err(|_| E::custom(format_args!("{v} does not fit in 32 bits")))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i32, E> {
            i32::try_from(v).map_err(|_| E::custom(format_args!("{v} does not fit in 32 bits")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<i32, E> {
            v.trim()
                .parse()
                .map_err(|_| E::custom(format_args!("{v:?} is not an integer")))
        }
        fn visit_unit<E: de::Error>(self) -> Result<i32, E> {
            Ok(0)
        }
    }
    deserializer.deserialize_any(IntVisitor)
}

fn lenient_language<'de, D: Deserializer<'de>>(deserializer: D) -> Result<LanguageCode, D::Error> {
    struct LanguageVisitor;
    impl<'de> Visitor<'de> for LanguageVisitor {
        type Value = LanguageCode;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a language name or number")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<LanguageCode, E> {
            Ok(LanguageCode::from_name(v).unwrap_or(LanguageCode::OTHER))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<LanguageCode, E> {
            Ok(u8::try_from(v)
                .map(LanguageCode)
                .unwrap_or(LanguageCode::OTHER))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<LanguageCode, E> {
            Ok(u8::try_from(v)
                .map(LanguageCode)
                .unwrap_or(LanguageCode::OTHER))
        }
        fn visit_unit<E: de::Error>(self) -> Result<LanguageCode, E> {
            Ok(LanguageCode::default())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<LanguageCode, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(LanguageCode::OTHER)
        }
    }
    deserializer.deserialize_any(LanguageVisitor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_what_java_emits() {
        let mut command =
            RemotingCommand::request(super::super::RequestCode::GET_ROUTEINFO_BY_TOPIC, 0);
        command.version = 453;
        command
            .ext_fields
            .insert("topic".into(), "TeZ_Test_Lng".into());
        let mut out = Vec::new();
        encode(&command, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).ok(),
            Some(
                r#"{"code":105,"extFields":{"topic":"TeZ_Test_Lng"},"flag":0,"language":"JAVA","opaque":0,"serializeTypeCurrentRPC":"JSON","version":453}"#
            )
        );
    }

    #[test]
    fn escapes_control_characters_like_fastjson() {
        let mut out = Vec::new();
        push_json_string(&mut out, "TAGS\u{1}a\u{2}\"\\\n");
        assert_eq!(out, br#""TAGS\u0001a\u0002\"\\\n""#);
    }

    #[test]
    fn decodes_leniently() {
        let header = br#"{"code":"310","extFields":{"a":"g","d":4,"k":false,"x":null,"o":{"n":1}},
            "language":12,"opaque":5,"remark":"","unknown":[1,{"deep":true}],"flag":0}"#;
        let command = decode(header).expect("lenient decode");
        assert_eq!(command.code, 310);
        assert_eq!(command.language, LanguageCode::RUST);
        assert_eq!(command.version, 0);
        assert_eq!(command.remark.as_deref(), Some(""));
        assert_eq!(command.ext("d"), Some("4"));
        assert_eq!(command.ext("k"), Some("false"));
        assert_eq!(command.ext("x"), None);
        assert_eq!(command.ext("o"), Some(r#"{"n":1}"#));
        let by_name = decode(br#"{"code":0,"language":"NODE_JS","extFields":null,"remark":null}"#)
            .expect("decode");
        assert_eq!(by_name.language, LanguageCode::NODE_JS);
        assert!(by_name.ext_fields.is_empty());
        assert!(by_name.remark.is_none());
    }

    #[test]
    fn rejects_garbage_with_an_error() {
        assert!(decode(b"[1,2]").is_err());
        assert!(decode(b"{\"code\":99999999999}").is_err());
        // Deep nesting where a value is read hits serde_json's recursion limit: an error, no overflow.
        let deep = format!(
            "{{\"extFields\":{{\"k\":{}{}}}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(decode(deep.as_bytes()).is_err());
        // Under an unknown key it is skipped without recursion, as Java ignores unknown keys.
        let ignored = format!(
            "{{\"code\":1,\"x\":{}{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert_eq!(decode(ignored.as_bytes()).map(|c| c.code).ok(), Some(1));
    }
}
