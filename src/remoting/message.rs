//! Message records: the stored record (pull, pop, view and query bodies), the properties string, the
//! batch body of SEND_BATCH_MESSAGE, and the two message id formats.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};

/// Stored record magic, version 1 (1-byte topic length).
pub const MAGIC_V1: i32 = 0xDAA3_20A7_u32 as i32;
/// Stored record magic, version 2 (2-byte topic length), used for topics longer than 127 bytes.
pub const MAGIC_V2: i32 = 0xDAA3_20AB_u32 as i32;
/// Marks the unused end of a commit-log file.
pub const MAGIC_BLANK: i32 = 0xCBD4_3194_u32 as i32;

/// `MessageSysFlag` bits.
pub mod sys_flag {
    pub const COMPRESSED: i32 = 0x1;
    pub const MULTI_TAGS: i32 = 0x2;
    pub const TRANSACTION_PREPARED: i32 = 0x4;
    pub const TRANSACTION_COMMIT: i32 = 0x8;
    pub const TRANSACTION_ROLLBACK: i32 = 0xC;
    pub const BORN_HOST_V6: i32 = 0x10;
    pub const STORE_HOST_V6: i32 = 0x20;
    pub const NEED_UNWRAP: i32 = 0x40;
    pub const INNER_BATCH: i32 = 0x80;
    pub const COMPRESSION_TYPE_MASK: i32 = 0x700;
}

/// Message property keys the codec itself relies on.
pub mod property {
    pub const TAGS: &str = "TAGS";
    pub const KEYS: &str = "KEYS";
    pub const UNIQ_KEY: &str = "UNIQ_KEY";
    pub const WAIT: &str = "WAIT";
    pub const DELAY: &str = "DELAY";
    pub const CLUSTER: &str = "CLUSTER";
    pub const POP_CK: &str = "POP_CK";
    pub const PRODUCER_GROUP: &str = "PGROUP";
}

const NAME_VALUE_SEPARATOR: char = '\u{1}';
const PROPERTY_SEPARATOR: char = '\u{2}';
const MAX_PROPERTIES_LEN: usize = i16::MAX as usize;

/// Why a record, batch or id could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record truncated: {field} needs {needed} bytes at offset {offset}, {available} left")]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("negative length {length} for {field} at offset {offset}")]
    NegativeLength {
        field: &'static str,
        offset: usize,
        length: i64,
    },
    #[error(
        "record at offset {offset} declares total size {declared} but its fields take {actual}"
    )]
    SizeMismatch {
        offset: usize,
        declared: usize,
        actual: usize,
    },
    #[error("unknown record magic {magic:#010x} at offset {offset}")]
    BadMagic { offset: usize, magic: u32 },
    #[error("body CRC mismatch at offset {offset}: stored {stored}, computed {computed}")]
    BodyCrc {
        offset: usize,
        stored: i32,
        computed: i32,
    },
    #[error("{field} at offset {offset} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str, offset: usize },
    #[error("{field} of {len} bytes exceeds the format's limit of {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("invalid message id {id:?}: {reason}")]
    BadMessageId { id: String, reason: &'static str },
}

/// Message properties, sorted by name.
pub type Properties = BTreeMap<String, String>;

/// Parses a properties string (`name \x01 value \x02` repeated). Malformed pairs are skipped, as Java
/// skips them.
pub fn parse_properties(text: &str) -> Properties {
    text.split(PROPERTY_SEPARATOR)
        .filter_map(|pair| pair.split_once(NAME_VALUE_SEPARATOR))
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

/// Formats properties; every pair, the last included, ends with `\x02`.
pub fn format_properties(properties: &Properties) -> String {
    let mut text = String::new();
    for (name, value) in properties {
        text.push_str(name);
        text.push(NAME_VALUE_SEPARATOR);
        text.push_str(value);
        text.push(PROPERTY_SEPARATOR);
    }
    text
}

/// Java's `String.hashCode`, which consume queues store as the tag code.
pub fn java_string_hash(text: &str) -> i32 {
    text.encode_utf16().fold(0i32, |hash, unit| {
        hash.wrapping_mul(31).wrapping_add(i32::from(unit))
    })
}

/// One stored message as it sits in the commit log and travels in pull and pop bodies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    /// Written as [`MAGIC_V2`] when true or when the topic is longer than 127 bytes.
    pub v2: bool,
    pub queue_id: i32,
    pub flag: i32,
    pub queue_offset: i64,
    pub physical_offset: i64,
    /// The host-v6 bits are derived from the addresses when encoding.
    pub sys_flag: i32,
    pub born_timestamp: i64,
    pub born_host: SocketAddr,
    pub store_timestamp: i64,
    pub store_host: SocketAddr,
    pub reconsume_times: i32,
    pub prepared_transaction_offset: i64,
    pub body: Bytes,
    pub topic: String,
    pub properties: Properties,
}

impl Default for MessageRecord {
    fn default() -> Self {
        let unspecified = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
        Self {
            v2: false,
            queue_id: 0,
            flag: 0,
            queue_offset: 0,
            physical_offset: 0,
            sys_flag: 0,
            born_timestamp: 0,
            born_host: unspecified,
            store_timestamp: 0,
            store_host: unspecified,
            reconsume_times: 0,
            prepared_transaction_offset: 0,
            body: Bytes::new(),
            topic: String::new(),
            properties: Properties::new(),
        }
    }
}

/// `CRC32(body) & 0x7FFFFFFF`, as `UtilAll.crc32`.
pub fn body_crc(body: &[u8]) -> i32 {
    (crc32fast::hash(body) & 0x7FFF_FFFF) as i32
}

impl MessageRecord {
    pub fn tags(&self) -> Option<&str> {
        self.properties.get(property::TAGS).map(String::as_str)
    }

    pub fn keys(&self) -> Option<&str> {
        self.properties.get(property::KEYS).map(String::as_str)
    }

    pub fn uniq_key(&self) -> Option<&str> {
        self.properties.get(property::UNIQ_KEY).map(String::as_str)
    }

    /// The offset message id: store host and commit-log offset.
    pub fn offset_msg_id(&self) -> String {
        OffsetMessageId {
            store_host: self.store_host,
            commit_log_offset: self.physical_offset,
        }
        .to_string()
    }

    /// Whether the encoded record uses magic V2 (asked for, or forced by a long topic).
    pub fn uses_v2(&self) -> bool {
        self.v2 || self.topic.len() > i8::MAX as usize
    }

    /// The sys flag as written: the host-v6 bits follow the addresses.
    pub fn effective_sys_flag(&self) -> i32 {
        let mut flag = self.sys_flag & !(sys_flag::BORN_HOST_V6 | sys_flag::STORE_HOST_V6);
        if self.born_host.is_ipv6() {
            flag |= sys_flag::BORN_HOST_V6;
        }
        if self.store_host.is_ipv6() {
            flag |= sys_flag::STORE_HOST_V6;
        }
        flag
    }

    /// Appends the encoded record to `out`.
    pub fn encode(&self, out: &mut BytesMut) -> Result<(), RecordError> {
        let properties = format_properties(&self.properties);
        if properties.len() > MAX_PROPERTIES_LEN {
            return Err(RecordError::TooLong {
                field: "properties",
                len: properties.len(),
                max: MAX_PROPERTIES_LEN,
            });
        }
        let v2 = self.uses_v2();
        let topic_max = if v2 {
            i16::MAX as usize
        } else {
            i8::MAX as usize
        };
        if self.topic.len() > topic_max {
            return Err(RecordError::TooLong {
                field: "topic",
                len: self.topic.len(),
                max: topic_max,
            });
        }
        let body_len = i32::try_from(self.body.len()).map_err(|_| RecordError::TooLong {
            field: "body",
            len: self.body.len(),
            max: i32::MAX as usize,
        })?;
        let host_len = |host: &SocketAddr| if host.is_ipv6() { 20 } else { 8 };
        let total = 4
            + 4
            + 4
            + 4
            + 4
            + 8
            + 8
            + 4
            + 8
            + host_len(&self.born_host)
            + 8
            + host_len(&self.store_host)
            + 4
            + 8
            + 4
            + self.body.len()
            + if v2 { 2 } else { 1 }
            + self.topic.len()
            + 2
            + properties.len();
        let total_i32 = i32::try_from(total).map_err(|_| RecordError::TooLong {
            field: "record",
            len: total,
            max: i32::MAX as usize,
        })?;
        out.reserve(total);
        out.put_i32(total_i32);
        out.put_i32(if v2 { MAGIC_V2 } else { MAGIC_V1 });
        out.put_i32(body_crc(&self.body));
        out.put_i32(self.queue_id);
        out.put_i32(self.flag);
        out.put_i64(self.queue_offset);
        out.put_i64(self.physical_offset);
        out.put_i32(self.effective_sys_flag());
        out.put_i64(self.born_timestamp);
        put_host(out, &self.born_host);
        out.put_i64(self.store_timestamp);
        put_host(out, &self.store_host);
        out.put_i32(self.reconsume_times);
        out.put_i64(self.prepared_transaction_offset);
        out.put_i32(body_len);
        out.extend_from_slice(&self.body);
        if v2 {
            out.put_i16(self.topic.len() as i16);
        } else {
            out.put_i8(self.topic.len() as i8);
        }
        out.extend_from_slice(self.topic.as_bytes());
        out.put_i16(properties.len() as i16);
        out.extend_from_slice(properties.as_bytes());
        Ok(())
    }

    /// Decodes the record at the start of `data`; returns it and its encoded size. The body shares
    /// `data`'s memory. With `verify_crc`, a body whose CRC does not match is an error.
    pub fn decode(data: &Bytes, verify_crc: bool) -> Result<(MessageRecord, usize), RecordError> {
        let mut reader = Reader::new(data);
        let total = reader.length_i32("total size")?;
        let magic = reader.i32("magic")?;
        let v2 = match magic {
            MAGIC_V1 => false,
            MAGIC_V2 => true,
            other => {
                return Err(RecordError::BadMagic {
                    offset: 4,
                    magic: other as u32,
                });
            }
        };
        let stored_crc = reader.i32("body CRC")?;
        let queue_id = reader.i32("queue id")?;
        let flag = reader.i32("flag")?;
        let queue_offset = reader.i64("queue offset")?;
        let physical_offset = reader.i64("physical offset")?;
        let sys_flag = reader.i32("sys flag")?;
        let born_timestamp = reader.i64("born timestamp")?;
        let born_host = reader.host("born host", sys_flag & sys_flag::BORN_HOST_V6 != 0)?;
        let store_timestamp = reader.i64("store timestamp")?;
        let store_host = reader.host("store host", sys_flag & sys_flag::STORE_HOST_V6 != 0)?;
        let reconsume_times = reader.i32("reconsume times")?;
        let prepared_transaction_offset = reader.i64("prepared transaction offset")?;
        let body_len = reader.length_i32("body length")?;
        let body_at = reader.offset;
        reader.take("body", body_len)?;
        let body = data.slice(body_at..body_at + body_len);
        if verify_crc {
            let computed = body_crc(&body);
            if computed != stored_crc {
                return Err(RecordError::BodyCrc {
                    offset: body_at,
                    stored: stored_crc,
                    computed,
                });
            }
        }
        let topic_len = if v2 {
            reader.length_i16("topic length")?
        } else {
            reader.length_i8("topic length")?
        };
        let topic = reader.string("topic", topic_len)?;
        let properties_len = reader.length_i16("properties length")?;
        let properties = parse_properties(&reader.string("properties", properties_len)?);
        if reader.offset != total {
            return Err(RecordError::SizeMismatch {
                offset: 0,
                declared: total,
                actual: reader.offset,
            });
        }
        let record = MessageRecord {
            v2,
            queue_id,
            flag,
            queue_offset,
            physical_offset,
            sys_flag,
            born_timestamp,
            born_host,
            store_timestamp,
            store_host,
            reconsume_times,
            prepared_transaction_offset,
            body,
            topic,
            properties,
        };
        Ok((record, total))
    }
}

/// The fields of a stored record that Pull→POP reads, taken without copying: the topic and
/// properties stay borrowed from the record bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHead<'a> {
    pub queue_id: i32,
    pub queue_offset: i64,
    pub physical_offset: i64,
    pub reconsume_times: i32,
    pub topic: &'a str,
    /// The properties string: `name\x01value\x02` pairs.
    pub properties: &'a str,
    /// The whole record's encoded size.
    pub size: usize,
}

impl<'a> RecordHead<'a> {
    /// Reads the record at the start of `data` as [`MessageRecord::decode`] does (same checks),
    /// but allocates nothing.
    pub fn peek(data: &'a [u8]) -> Result<Self, RecordError> {
        let mut reader = Reader::new(data);
        let total = reader.length_i32("total size")?;
        let v2 = match reader.i32("magic")? {
            MAGIC_V1 => false,
            MAGIC_V2 => true,
            other => {
                return Err(RecordError::BadMagic {
                    offset: 4,
                    magic: other as u32,
                });
            }
        };
        reader.i32("body CRC")?;
        let queue_id = reader.i32("queue id")?;
        reader.i32("flag")?;
        let queue_offset = reader.i64("queue offset")?;
        let physical_offset = reader.i64("physical offset")?;
        let sys_flag = reader.i32("sys flag")?;
        reader.i64("born timestamp")?;
        reader.host("born host", sys_flag & sys_flag::BORN_HOST_V6 != 0)?;
        reader.i64("store timestamp")?;
        reader.host("store host", sys_flag & sys_flag::STORE_HOST_V6 != 0)?;
        let reconsume_times = reader.i32("reconsume times")?;
        reader.i64("prepared transaction offset")?;
        let body_len = reader.length_i32("body length")?;
        reader.take("body", body_len)?;
        let topic_len = if v2 {
            reader.length_i16("topic length")?
        } else {
            reader.length_i8("topic length")?
        };
        let topic = reader.str("topic", topic_len)?;
        let properties_len = reader.length_i16("properties length")?;
        let properties = reader.str("properties", properties_len)?;
        if reader.offset != total {
            return Err(RecordError::SizeMismatch {
                offset: 0,
                declared: total,
                actual: reader.offset,
            });
        }
        Ok(Self {
            queue_id,
            queue_offset,
            physical_offset,
            reconsume_times,
            topic,
            properties,
            size: total,
        })
    }

    /// One property's value, as [`parse_properties`] would give it.
    pub fn property(&self, name: &str) -> Option<&'a str> {
        self.properties
            .split(PROPERTY_SEPARATOR)
            .filter_map(|pair| pair.split_once(NAME_VALUE_SEPARATOR))
            .filter(|(key, _)| *key == name)
            .map(|(_, value)| value)
            .next_back()
    }
}

/// Decodes every record of a pull or pop body. Stops at the first error, reporting its offset within
/// `data`.
pub fn decode_records(data: &Bytes, verify_crc: bool) -> Result<Vec<MessageRecord>, RecordError> {
    let mut records = Vec::new();
    let mut offset = 0;
    while offset < data.len() {
        let rest = data.slice(offset..);
        let (record, size) =
            MessageRecord::decode(&rest, verify_crc).map_err(|error| error.shifted(offset))?;
        records.push(record);
        offset += size;
    }
    Ok(records)
}

fn put_host(out: &mut BytesMut, host: &SocketAddr) {
    match host.ip() {
        IpAddr::V4(ip) => out.extend_from_slice(&ip.octets()),
        IpAddr::V6(ip) => out.extend_from_slice(&ip.octets()),
    }
    out.put_i32(i32::from(host.port()));
}

/// One message of a SEND_BATCH_MESSAGE body: magic and CRC travel as zero.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchEntry {
    pub flag: i32,
    pub body: Bytes,
    pub properties: Properties,
}

/// Encodes a batch body.
pub fn encode_batch(entries: &[BatchEntry], out: &mut BytesMut) -> Result<(), RecordError> {
    for entry in entries {
        let properties = format_properties(&entry.properties);
        if properties.len() > MAX_PROPERTIES_LEN {
            return Err(RecordError::TooLong {
                field: "properties",
                len: properties.len(),
                max: MAX_PROPERTIES_LEN,
            });
        }
        let total = 4 + 4 + 4 + 4 + 4 + entry.body.len() + 2 + properties.len();
        let too_long = |field| RecordError::TooLong {
            field,
            len: total,
            max: i32::MAX as usize,
        };
        out.put_i32(i32::try_from(total).map_err(|_| too_long("batch entry"))?);
        out.put_i32(0);
        out.put_i32(0);
        out.put_i32(entry.flag);
        out.put_i32(i32::try_from(entry.body.len()).map_err(|_| too_long("body"))?);
        out.extend_from_slice(&entry.body);
        out.put_i16(properties.len() as i16);
        out.extend_from_slice(properties.as_bytes());
    }
    Ok(())
}

/// Decodes a batch body. Bodies share `data`'s memory.
pub fn decode_batch(data: &Bytes) -> Result<Vec<BatchEntry>, RecordError> {
    let mut entries = Vec::new();
    let mut reader = Reader::new(data);
    while reader.remaining() > 0 {
        let start = reader.offset;
        let total = reader.length_i32("total size")?;
        reader.i32("magic")?;
        reader.i32("body CRC")?;
        let flag = reader.i32("flag")?;
        let body_len = reader.length_i32("body length")?;
        let body_at = reader.offset;
        reader.take("body", body_len)?;
        let properties_len = reader.length_i16("properties length")?;
        let properties = parse_properties(&reader.string("properties", properties_len)?);
        if reader.offset - start != total {
            return Err(RecordError::SizeMismatch {
                offset: start,
                declared: total,
                actual: reader.offset - start,
            });
        }
        entries.push(BatchEntry {
            flag,
            body: data.slice(body_at..body_at + body_len),
            properties,
        });
    }
    Ok(entries)
}

/// The broker's message id: store host and commit-log offset, as 32 (IPv4) or 56 (IPv6) upper-case
/// hex characters. Clients send VIEW_MESSAGE_BY_ID straight to the host inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetMessageId {
    pub store_host: SocketAddr,
    pub commit_log_offset: i64,
}

impl std::fmt::Display for OffsetMessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut bytes = BytesMut::with_capacity(28);
        put_host(&mut bytes, &self.store_host);
        bytes.put_i64(self.commit_log_offset);
        f.write_str(&hex::encode_upper(&bytes))
    }
}

impl std::str::FromStr for OffsetMessageId {
    type Err = RecordError;

    fn from_str(id: &str) -> Result<Self, RecordError> {
        let bad = |reason| RecordError::BadMessageId {
            id: id.to_owned(),
            reason,
        };
        let bytes = hex::decode(id).map_err(|_| bad("not hexadecimal"))?;
        let v6 = match bytes.len() {
            16 => false,
            28 => true,
            _ => return Err(bad("length must be 32 or 56 hex characters")),
        };
        let data = Bytes::from(bytes);
        let mut reader = Reader::new(&data);
        let store_host = reader
            .host("store host", v6)
            .map_err(|_| bad("truncated"))?;
        let commit_log_offset = reader.i64("offset").map_err(|_| bad("truncated"))?;
        Ok(Self {
            store_host,
            commit_log_offset,
        })
    }
}

/// The client-generated message id (`UNIQ_KEY`): IP, pid, class-loader hash, milliseconds since the
/// start of the month, and a counter, as 32 (IPv4) or 56 (IPv6) upper-case hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UniqKey {
    pub ip: IpAddr,
    pub pid: i16,
    pub class_loader_hash: i32,
    pub millis_since_month_start: i32,
    pub counter: i16,
}

impl std::fmt::Display for UniqKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut bytes = BytesMut::with_capacity(28);
        match self.ip {
            IpAddr::V4(ip) => bytes.extend_from_slice(&ip.octets()),
            IpAddr::V6(ip) => bytes.extend_from_slice(&ip.octets()),
        }
        bytes.put_i16(self.pid);
        bytes.put_i32(self.class_loader_hash);
        bytes.put_i32(self.millis_since_month_start);
        bytes.put_i16(self.counter);
        f.write_str(&hex::encode_upper(&bytes))
    }
}

impl std::str::FromStr for UniqKey {
    type Err = RecordError;

    fn from_str(id: &str) -> Result<Self, RecordError> {
        let bad = |reason| RecordError::BadMessageId {
            id: id.to_owned(),
            reason,
        };
        let bytes = hex::decode(id).map_err(|_| bad("not hexadecimal"))?;
        let ip_len = match bytes.len() {
            16 => 4,
            28 => 16,
            _ => return Err(bad("length must be 32 or 56 hex characters")),
        };
        let data = Bytes::from(bytes);
        let mut reader = Reader::new(&data);
        let ip = reader
            .ip("ip", ip_len == 16)
            .map_err(|_| bad("truncated"))?;
        let truncated = |_| bad("truncated");
        Ok(Self {
            ip,
            pid: reader.i16("pid").map_err(truncated)?,
            class_loader_hash: reader.i32("class loader hash").map_err(truncated)?,
            millis_since_month_start: reader.i32("time").map_err(truncated)?,
            counter: reader.i16("counter").map_err(truncated)?,
        })
    }
}

impl RecordError {
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
            Self::SizeMismatch {
                offset,
                declared,
                actual,
            } => Self::SizeMismatch {
                offset: offset + base,
                declared,
                actual,
            },
            Self::BadMagic { offset, magic } => Self::BadMagic {
                offset: offset + base,
                magic,
            },
            Self::BodyCrc {
                offset,
                stored,
                computed,
            } => Self::BodyCrc {
                offset: offset + base,
                stored,
                computed,
            },
            Self::InvalidUtf8 { field, offset } => Self::InvalidUtf8 {
                field,
                offset: offset + base,
            },
            other => other,
        }
    }
}

/// A bounds-checked big-endian cursor over record bytes.
struct Reader<'a> {
    data: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, offset: 0 }
    }

    fn remaining(&self) -> usize {
        self.data.len() - self.offset
    }

    fn take(&mut self, field: &'static str, needed: usize) -> Result<&'a [u8], RecordError> {
        let slice = self
            .data
            .get(self.offset..)
            .and_then(|rest| rest.get(..needed))
            .ok_or(RecordError::Truncated {
                field,
                offset: self.offset,
                needed,
                available: self.remaining(),
            })?;
        self.offset += needed;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], RecordError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(field, N)?);
        Ok(array)
    }

    fn i16(&mut self, field: &'static str) -> Result<i16, RecordError> {
        Ok(i16::from_be_bytes(self.array(field)?))
    }

    fn i32(&mut self, field: &'static str) -> Result<i32, RecordError> {
        Ok(i32::from_be_bytes(self.array(field)?))
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, RecordError> {
        Ok(i64::from_be_bytes(self.array(field)?))
    }

    fn length(
        &self,
        field: &'static str,
        offset: usize,
        length: i64,
    ) -> Result<usize, RecordError> {
        usize::try_from(length).map_err(|_| RecordError::NegativeLength {
            field,
            offset,
            length,
        })
    }

    fn length_i8(&mut self, field: &'static str) -> Result<usize, RecordError> {
        let offset = self.offset;
        let [byte] = self.array::<1>(field)?;
        self.length(field, offset, i64::from(byte as i8))
    }

    fn length_i16(&mut self, field: &'static str) -> Result<usize, RecordError> {
        let offset = self.offset;
        let value = self.i16(field)?;
        self.length(field, offset, i64::from(value))
    }

    fn length_i32(&mut self, field: &'static str) -> Result<usize, RecordError> {
        let offset = self.offset;
        let value = self.i32(field)?;
        self.length(field, offset, i64::from(value))
    }

    fn str(&mut self, field: &'static str, len: usize) -> Result<&'a str, RecordError> {
        let offset = self.offset;
        let bytes = self.take(field, len)?;
        std::str::from_utf8(bytes).map_err(|_| RecordError::InvalidUtf8 { field, offset })
    }

    fn string(&mut self, field: &'static str, len: usize) -> Result<String, RecordError> {
        let offset = self.offset;
        let bytes = self.take(field, len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| RecordError::InvalidUtf8 { field, offset })
    }

    fn ip(&mut self, field: &'static str, v6: bool) -> Result<IpAddr, RecordError> {
        Ok(if v6 {
            IpAddr::V6(Ipv6Addr::from(self.array::<16>(field)?))
        } else {
            IpAddr::V4(Ipv4Addr::from(self.array::<4>(field)?))
        })
    }

    fn host(&mut self, field: &'static str, v6: bool) -> Result<SocketAddr, RecordError> {
        let ip = self.ip(field, v6)?;
        // Java writes the port as an int; only the low 16 bits can be a port.
        let port = self.i32(field)?;
        Ok(SocketAddr::new(ip, port as u16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
        ]
    }

    fn properties() -> impl Strategy<Value = Properties> {
        proptest::collection::btree_map("[A-Za-z_][A-Za-z0-9_ ]{0,12}", "[^\u{1}\u{2}]{0,24}", 0..6)
    }

    prop_compose! {
        fn record()(
            v2: bool,
            queue_id: i32,
            flag: i32,
            queue_offset: i64,
            physical_offset: i64,
            sys_flag in any::<i32>().prop_map(|f| f & !(sys_flag::BORN_HOST_V6 | sys_flag::STORE_HOST_V6)),
            born_timestamp: i64,
            born_host in socket_addr(),
            store_timestamp: i64,
            store_host in socket_addr(),
            reconsume_times: i32,
            prepared_transaction_offset: i64,
            body in proptest::collection::vec(any::<u8>(), 0..256),
            topic in "[%A-Za-z0-9_-]{0,200}",
            properties in properties(),
        ) -> MessageRecord {
            MessageRecord {
                v2, queue_id, flag, queue_offset, physical_offset, sys_flag, born_timestamp, born_host,
                store_timestamp, store_host, reconsume_times, prepared_transaction_offset,
                body: Bytes::from(body), topic, properties,
            }
        }
    }

    proptest! {
        #[test]
        fn records_round_trip(records in proptest::collection::vec(record(), 1..4)) {
            let mut out = BytesMut::new();
            for record in &records {
                record.encode(&mut out).expect("encode");
            }
            let decoded = decode_records(&out.freeze(), true).expect("decode");
            prop_assert_eq!(decoded.len(), records.len());
            for (decoded, original) in decoded.iter().zip(&records) {
                let mut expected = original.clone();
                expected.v2 = original.uses_v2();
                expected.sys_flag = original.effective_sys_flag();
                prop_assert_eq!(decoded, &expected);
            }
        }

        #[test]
        fn a_peek_reads_what_a_decode_reads(record in record(), probe in "[A-Za-z_]{1,4}") {
            let mut out = BytesMut::new();
            record.encode(&mut out).expect("encode");
            let bytes = out.freeze();
            let (decoded, size) = MessageRecord::decode(&bytes, true).expect("decode");
            let head = RecordHead::peek(&bytes).expect("peek");
            prop_assert_eq!(head.size, size);
            prop_assert_eq!(head.queue_id, decoded.queue_id);
            prop_assert_eq!(head.queue_offset, decoded.queue_offset);
            prop_assert_eq!(head.physical_offset, decoded.physical_offset);
            prop_assert_eq!(head.reconsume_times, decoded.reconsume_times);
            prop_assert_eq!(head.topic, decoded.topic.as_str());
            for name in decoded.properties.keys().map(String::as_str).chain([probe.as_str()]) {
                prop_assert_eq!(head.property(name), decoded.properties.get(name).map(String::as_str));
            }
            // Cut anywhere, it is an error, never a panic.
            for cut in [0, size / 2, size.saturating_sub(1)] {
                prop_assert!(RecordHead::peek(&bytes[..cut]).is_err());
            }
        }

        #[test]
        fn batches_round_trip(entries in proptest::collection::vec(
            (any::<i32>(), proptest::collection::vec(any::<u8>(), 0..128), properties())
                .prop_map(|(flag, body, properties)| BatchEntry { flag, body: Bytes::from(body), properties }),
            0..6,
        )) {
            let mut out = BytesMut::new();
            encode_batch(&entries, &mut out).expect("encode");
            prop_assert_eq!(decode_batch(&out.freeze()).expect("decode"), entries);
        }

        #[test]
        fn message_ids_round_trip(host in socket_addr(), offset: i64, pid: i16, hash: i32, time: i32, counter: i16) {
            let id = OffsetMessageId { store_host: host, commit_log_offset: offset };
            let text = id.to_string();
            prop_assert_eq!(text.len(), if host.is_ipv6() { 56 } else { 32 });
            prop_assert_eq!(text.parse::<OffsetMessageId>().expect("parse"), id);
            let key = UniqKey { ip: host.ip(), pid, class_loader_hash: hash, millis_since_month_start: time, counter };
            prop_assert_eq!(key.to_string().parse::<UniqKey>().expect("parse"), key);
        }

        #[test]
        fn properties_round_trip(properties in properties()) {
            prop_assert_eq!(parse_properties(&format_properties(&properties)), properties);
        }
    }

    #[test]
    fn offset_message_id_matches_java_layout() {
        let id = OffsetMessageId {
            store_host: "127.0.0.1:10911".parse().expect("addr"),
            commit_log_offset: 0x1234,
        };
        assert_eq!(id.to_string(), "7F00000100002A9F0000000000001234");
        assert!("XYZ".parse::<OffsetMessageId>().is_err());
    }

    #[test]
    fn java_hash_of_tags() {
        assert_eq!(java_string_hash("TagA"), 2598919);
        assert_eq!(java_string_hash(""), 0);
    }

    #[test]
    fn negative_and_oversized_lengths_are_errors() {
        let record = MessageRecord {
            topic: "T".into(),
            body: Bytes::from_static(b"hello"),
            ..MessageRecord::default()
        };
        let mut out = BytesMut::new();
        record.encode(&mut out).expect("encode");
        let good = out.freeze();
        // body length sits after the fixed part: 4*5 + 8*2 + 4 + 8 + 8 + 8 + 8 + 4 + 8 = 84
        let mut negative = good.to_vec();
        negative[84..88].copy_from_slice(&(-1i32).to_be_bytes());
        assert!(matches!(
            MessageRecord::decode(&Bytes::from(negative), false),
            Err(RecordError::NegativeLength {
                field: "body length",
                ..
            })
        ));
        let mut huge = good.to_vec();
        huge[84..88].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            MessageRecord::decode(&Bytes::from(huge), false),
            Err(RecordError::Truncated { .. })
        ));
        let mut bad_crc = good.to_vec();
        bad_crc[8] ^= 1;
        assert!(matches!(
            MessageRecord::decode(&Bytes::from(bad_crc), true),
            Err(RecordError::BodyCrc { .. })
        ));
        let mut bad_total = good.to_vec();
        bad_total[0..4].copy_from_slice(&(good.len() as i32 + 3).to_be_bytes());
        assert!(matches!(
            MessageRecord::decode(&Bytes::from(bad_total), false),
            Err(RecordError::SizeMismatch { .. })
        ));
    }
}
