//! fastjson's non-standard JSON dialect.
//!
//! fastjson writes map keys that are not strings without quotes: numbers (`{0:"127.0.0.1:10911"}`)
//! and even whole objects (`{{"brokerName":"b","queueId":0,"topic":"t"}:{...}}`). Java brokers and
//! nameservers send route and cluster bodies that way to clients older than version 401. Reading:
//! [`normalize`] rewrites such keys into quoted strings so that any JSON parser can take them.
//! Writing: [`write_with_bare_keys`] emits the dialect for those old clients.

use serde_json::Value;

/// Deepest nesting [`normalize`] accepts, the same as serde_json's own recursion limit.
pub const MAX_DEPTH: usize = 128;

/// Why a fastjson text could not be normalized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FastjsonError {
    #[error("JSON nested deeper than {MAX_DEPTH} levels at byte {offset}")]
    TooDeep { offset: usize },
    #[error("unbalanced JSON: unexpected {found:?} at byte {offset}")]
    Unbalanced { offset: usize, found: char },
    #[error("unterminated JSON string or object key starting at byte {offset}")]
    Unterminated { offset: usize },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Container {
    /// `expecting_key` is true right after `{` or `,` until the `:`.
    Object {
        expecting_key: bool,
    },
    Array,
}

/// Rewrites fastjson's bare map keys into quoted string keys; everything else is copied unchanged.
/// The output is standard JSON whenever the input was JSON apart from its keys.
pub fn normalize(input: &[u8]) -> Result<Vec<u8>, FastjsonError> {
    let mut out = Vec::with_capacity(input.len() + 16);
    let mut stack: Vec<Container> = Vec::new();
    let mut index = 0;
    while let Some(&byte) = input.get(index) {
        let expecting_key = matches!(
            stack.last(),
            Some(Container::Object {
                expecting_key: true
            })
        );
        match byte {
            b'"' => {
                let end = string_end(input, index)?;
                out.extend_from_slice(&input[index..end]);
                index = end;
                continue;
            }
            b'{' | b'[' if expecting_key => {
                // An object or array used as a map key becomes the string of its text.
                let end = balanced_end(input, index)?;
                let key = String::from_utf8_lossy(&input[index..end]);
                super::header_json::push_json_string(&mut out, &key);
                index = end;
                continue;
            }
            b'{' | b'[' => {
                if stack.len() >= MAX_DEPTH {
                    return Err(FastjsonError::TooDeep { offset: index });
                }
                stack.push(if byte == b'{' {
                    Container::Object {
                        expecting_key: true,
                    }
                } else {
                    Container::Array
                });
            }
            b'}' | b']' => {
                let expected = if byte == b'}' {
                    matches!(stack.last(), Some(Container::Object { .. }))
                } else {
                    matches!(stack.last(), Some(Container::Array))
                };
                if !expected {
                    return Err(FastjsonError::Unbalanced {
                        offset: index,
                        found: char::from(byte),
                    });
                }
                stack.pop();
            }
            b':' => {
                if let Some(Container::Object { expecting_key }) = stack.last_mut() {
                    *expecting_key = false;
                }
            }
            b',' => {
                if let Some(Container::Object { expecting_key }) = stack.last_mut() {
                    *expecting_key = true;
                }
            }
            byte if byte.is_ascii_whitespace() => {}
            _ if expecting_key => {
                let end = input[index..]
                    .iter()
                    .position(|&b| b == b':' || b.is_ascii_whitespace())
                    .map(|offset| index + offset)
                    .ok_or(FastjsonError::Unterminated { offset: index })?;
                let key = String::from_utf8_lossy(&input[index..end]);
                super::header_json::push_json_string(&mut out, &key);
                index = end;
                continue;
            }
            _ => {}
        }
        out.push(byte);
        index += 1;
    }
    Ok(out)
}

/// The index just past the string literal starting at `start`.
fn string_end(input: &[u8], start: usize) -> Result<usize, FastjsonError> {
    let mut index = start + 1;
    while let Some(&byte) = input.get(index) {
        match byte {
            b'\\' => index += 2,
            b'"' => return Ok(index + 1),
            _ => index += 1,
        }
    }
    Err(FastjsonError::Unterminated { offset: start })
}

/// The index just past the object or array starting at `start`, skipping strings.
fn balanced_end(input: &[u8], start: usize) -> Result<usize, FastjsonError> {
    let mut depth = 0usize;
    let mut index = start;
    while let Some(&byte) = input.get(index) {
        match byte {
            b'"' => {
                index = string_end(input, index)?;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Ok(index + 1);
                }
            }
            _ => {}
        }
        index += 1;
    }
    Err(FastjsonError::Unterminated { offset: start })
}

/// Writes `value` as compact JSON with sorted keys, leaving the integer keys of any object held under
/// one of `bare_key_fields` unquoted, as fastjson does for `Map<Long, String>` fields.
pub fn write_with_bare_keys(value: &Value, bare_key_fields: &[&str], out: &mut Vec<u8>) {
    write_value(value, bare_key_fields, false, out);
}

fn write_value(value: &Value, bare_key_fields: &[&str], bare_keys_here: bool, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (index, (key, child)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                if bare_keys_here && key.parse::<i64>().is_ok() {
                    out.extend_from_slice(key.as_bytes());
                } else {
                    super::header_json::push_json_string(out, key);
                }
                out.push(b':');
                write_value(
                    child,
                    bare_key_fields,
                    bare_key_fields.contains(&key.as_str()),
                    out,
                );
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_value(item, bare_key_fields, false, out);
            }
            out.push(b']');
        }
        Value::String(text) => super::header_json::push_json_string(out, text),
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_bare_numeric_and_object_keys() {
        let input = br#"{"brokerAddrs":{0:"127.0.0.1:10911", 1 :"127.0.0.1:10921"},"x":{{"q":1,"s":"}"}:{"v":[1,{2:3}]}}}"#;
        let normalized = normalize(input).expect("normalize");
        let value: Value = serde_json::from_slice(&normalized).expect("standard JSON");
        assert_eq!(value["brokerAddrs"]["0"], "127.0.0.1:10911");
        assert_eq!(value["brokerAddrs"]["1"], "127.0.0.1:10921");
        assert_eq!(value["x"][r#"{"q":1,"s":"}"}"#]["v"][1]["2"], 3);
    }

    #[test]
    fn leaves_standard_json_alone() {
        let input = br#"{"a":[1,"b:c",{"d":null}],"e":"\"{"}"#;
        assert_eq!(normalize(input).expect("normalize"), input.to_vec());
    }

    #[test]
    fn rejects_deep_and_broken_input() {
        let deep = "[".repeat(MAX_DEPTH + 1);
        assert!(matches!(
            normalize(deep.as_bytes()),
            Err(FastjsonError::TooDeep { .. })
        ));
        assert!(matches!(
            normalize(b"{\"a\":1]"),
            Err(FastjsonError::Unbalanced { .. })
        ));
        assert!(matches!(
            normalize(b"{\"a"),
            Err(FastjsonError::Unterminated { .. })
        ));
        assert!(matches!(
            normalize(b"{abc"),
            Err(FastjsonError::Unterminated { .. })
        ));
    }

    #[test]
    fn writes_bare_keys_only_where_asked() {
        let value: Value =
            serde_json::from_str(r#"{"brokerAddrs":{"0":"a"},"other":{"1":"b"}}"#).expect("json");
        let mut out = Vec::new();
        write_with_bare_keys(&value, &["brokerAddrs"], &mut out);
        assert_eq!(out, br#"{"brokerAddrs":{0:"a"},"other":{"1":"b"}}"#);
    }
}
