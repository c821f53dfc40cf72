//! `rocketmesh decode`: turns a raw remoting byte stream (a TCP capture) into one JSON object per frame.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use rocketmesh::remoting::body::{
    BatchAckMessageRequestBody, ClusterInfo, ConsumerList, HeartbeatData, JsonBody,
    LockBatchRequestBody, LockBatchResponseBody, QueryAssignmentRequestBody,
    QueryAssignmentResponseBody, SetMessageRequestModeRequestBody, TopicRouteData,
    UnlockBatchRequestBody,
};
use rocketmesh::remoting::extra_info::ExtraInfo;
use rocketmesh::remoting::frame::{FrameLimits, decode_frame, split_frame};
use rocketmesh::remoting::message::{self, MessageRecord, parse_properties};
use rocketmesh::remoting::{RemotingCommand, RequestCode, SerializeType, fastjson};
use serde_json::{Map, Value, json};

#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// Capture to read; `-` or nothing reads standard input.
    pub input: Option<PathBuf>,
    /// The input is hexadecimal text (whitespace ignored) rather than raw bytes.
    #[arg(long)]
    pub hex: bool,
    /// Pretty-print each object (the default when writing to a terminal).
    #[arg(long, conflicts_with = "compact")]
    pub pretty: bool,
    /// One object per line (the default when writing to a pipe or file).
    #[arg(long)]
    pub compact: bool,
    /// Stop at the first malformed frame instead of skipping it.
    #[arg(long)]
    pub stop_on_error: bool,
    /// How many bytes of each message body to show.
    #[arg(long, default_value_t = 256)]
    pub body_preview: usize,
    /// Largest frame accepted, in bytes, length prefix included.
    #[arg(long, default_value_t = rocketmesh::remoting::frame::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
}

/// Counts of what was decoded, for the exit status and the closing line on stderr.
#[derive(Debug, Default)]
pub struct Summary {
    pub frames: usize,
    pub errors: usize,
}

pub fn run(args: &DecodeArgs) -> anyhow::Result<Summary> {
    let mut input: Box<dyn Read> = match &args.input {
        Some(path) if path.as_os_str() != "-" => Box::new(
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        ),
        _ => Box::new(std::io::stdin().lock()),
    };
    let stdout = std::io::stdout();
    let pretty = args.pretty || (!args.compact && stdout.is_terminal());
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut decoder = StreamDecoder::new(args, pretty);

    if args.hex {
        let mut text = String::new();
        input
            .read_to_string(&mut text)
            .context("cannot read hex input")?;
        let compact: String = text.split_whitespace().collect();
        let bytes = hex::decode(&compact).context("input is not valid hexadecimal")?;
        decoder.feed(&bytes, &mut out)?;
    } else {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let read = match input.read(&mut chunk) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error).context("cannot read input"),
            };
            if !decoder.feed(&chunk[..read], &mut out)? {
                break;
            }
        }
    }
    decoder.finish(&mut out)?;
    out.flush()?;
    Ok(decoder.summary)
}

/// Decodes frames as bytes arrive, remembering request codes by opaque so that responses in the
/// same stream can be decoded by what they answer.
struct StreamDecoder<'a> {
    args: &'a DecodeArgs,
    pretty: bool,
    limits: FrameLimits,
    buffer: BytesMut,
    /// Stream offset of `buffer[0]`.
    offset: usize,
    stopped: bool,
    requests: HashMap<i32, RequestCode>,
    summary: Summary,
}

impl<'a> StreamDecoder<'a> {
    fn new(args: &'a DecodeArgs, pretty: bool) -> Self {
        Self {
            args,
            pretty,
            limits: FrameLimits {
                max_frame: args.max_frame,
                ..FrameLimits::default()
            },
            buffer: BytesMut::new(),
            offset: 0,
            stopped: false,
            requests: HashMap::new(),
            summary: Summary::default(),
        }
    }

    /// Decodes what `bytes` completes; returns false once decoding cannot go on.
    fn feed(&mut self, bytes: &[u8], out: &mut impl Write) -> anyhow::Result<bool> {
        if self.stopped {
            return Ok(false);
        }
        self.buffer.extend_from_slice(bytes);
        loop {
            let before = self.buffer.len();
            match split_frame(&mut self.buffer, &self.limits) {
                Ok(Some(frame)) => {
                    let at = self.offset;
                    self.offset += before - self.buffer.len();
                    let size = before - self.buffer.len();
                    match decode_frame(frame, &self.limits) {
                        Ok(command) => {
                            self.summary.frames += 1;
                            let object = self.describe(at, size, &command);
                            self.emit(out, &object)?;
                        }
                        Err(error) => {
                            self.summary.errors += 1;
                            let object =
                                json!({"offset": at, "length": size, "error": error.to_string()});
                            self.emit(out, &object)?;
                            if self.args.stop_on_error {
                                return self.stop(
                                    out,
                                    at,
                                    "stopped at the first malformed frame (--stop-on-error)",
                                );
                            }
                        }
                    }
                }
                Ok(None) => return Ok(true),
                Err(error) => {
                    // The length prefix itself is bad: there is no way to find the next frame.
                    self.summary.errors += 1;
                    let object =
                        json!({"offset": self.offset, "error": error.to_string(), "fatal": true});
                    self.emit(out, &object)?;
                    let at = self.offset;
                    return self.stop(
                        out,
                        at,
                        "cannot find the next frame after a bad length prefix",
                    );
                }
            }
        }
    }

    fn stop(&mut self, out: &mut impl Write, offset: usize, why: &str) -> anyhow::Result<bool> {
        self.stopped = true;
        let object = json!({"offset": offset, "stopped": why});
        self.emit(out, &object)?;
        self.buffer.clear();
        Ok(false)
    }

    fn finish(&mut self, out: &mut impl Write) -> anyhow::Result<()> {
        if !self.stopped && !self.buffer.is_empty() {
            self.summary.errors += 1;
            let declared = self.buffer.get(..4).map(|prefix| {
                i32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as i64 + 4
            });
            let object = json!({
                "offset": self.offset,
                "error": format!("truncated frame: the input ends after {} of its bytes", self.buffer.len()),
                "declared_length": declared,
            });
            self.emit(out, &object)?;
        }
        Ok(())
    }

    fn emit(&self, out: &mut impl Write, object: &Value) -> anyhow::Result<()> {
        if self.pretty {
            serde_json::to_writer_pretty(&mut *out, object)?;
        } else {
            serde_json::to_writer(&mut *out, object)?;
        }
        writeln!(out)?;
        Ok(())
    }

    fn describe(&mut self, offset: usize, size: usize, command: &RemotingCommand) -> Value {
        let response = command.is_response();
        let answers = if response {
            self.requests.remove(&command.opaque)
        } else {
            if !command.is_oneway() {
                self.requests.insert(command.opaque, command.request_code());
            }
            None
        };
        let mut object = Map::new();
        object.insert("offset".into(), json!(offset));
        object.insert("length".into(), json!(size));
        object.insert(
            "type".into(),
            json!(if response { "response" } else { "request" }),
        );
        object.insert("code".into(), json!(command.code));
        object.insert("name".into(), json!(command.code_name()));
        if let Some(request) = answers {
            object.insert("answers".into(), json!(request.to_string()));
        }
        object.insert("oneway".into(), json!(command.is_oneway()));
        object.insert("opaque".into(), json!(command.opaque));
        object.insert("flag".into(), json!(command.flag));
        object.insert(
            "serialize".into(),
            json!(match command.serialize_type {
                SerializeType::Json => "JSON",
                SerializeType::Binary => "ROCKETMQ",
            }),
        );
        object.insert("language".into(), json!(command.language.to_string()));
        object.insert("version".into(), json!(command.version));
        if let Some(remark) = &command.remark {
            object.insert("remark".into(), json!(remark));
        }
        object.insert("header".into(), json!(command.ext_fields));
        if let Some(details) = self.header_details(command) {
            object.insert("header_decoded".into(), details);
        }
        object.insert("body_length".into(), json!(command.body.len()));
        if !command.body.is_empty() {
            let code = if response {
                answers
            } else {
                Some(command.request_code())
            };
            let (key, body) = self.describe_body(code, response, &command.body);
            object.insert(key.into(), body);
        }
        Value::Object(object)
    }

    /// Header fields worth unpacking: properties strings and POP receipt handles.
    fn header_details(&self, command: &RemotingCommand) -> Option<Value> {
        let mut details = Map::new();
        for key in ["properties", "i"] {
            if let Some(text) = command.ext(key).filter(|_| !command.is_response()) {
                details.insert("properties".into(), json!(parse_properties(text)));
            }
        }
        if let Some(text) = command.ext("extraInfo") {
            details.insert("extraInfo".into(), extra_info_json(text));
        }
        (!details.is_empty()).then_some(Value::Object(details))
    }

    fn describe_body(
        &self,
        code: Option<RequestCode>,
        response: bool,
        body: &Bytes,
    ) -> (&'static str, Value) {
        let typed = match (code, response) {
            (Some(RequestCode::HEART_BEAT), false) => Some(json_body::<HeartbeatData>(body)),
            (Some(RequestCode::SEND_BATCH_MESSAGE), false) => Some(self.batch(body)),
            (Some(RequestCode::CHECK_TRANSACTION_STATE), false) => Some(self.records(body)),
            (Some(RequestCode::LOCK_BATCH_MQ), false) => {
                Some(json_body::<LockBatchRequestBody>(body))
            }
            (Some(RequestCode::UNLOCK_BATCH_MQ), false) => {
                Some(json_body::<UnlockBatchRequestBody>(body))
            }
            (Some(RequestCode::BATCH_ACK_MESSAGE), false) => {
                Some(json_body::<BatchAckMessageRequestBody>(body))
            }
            (Some(RequestCode::QUERY_ASSIGNMENT), false) => {
                Some(json_body::<QueryAssignmentRequestBody>(body))
            }
            (Some(RequestCode::SET_MESSAGE_REQUEST_MODE), false) => {
                Some(json_body::<SetMessageRequestModeRequestBody>(body))
            }
            (Some(RequestCode::SEND_MESSAGE | RequestCode::SEND_MESSAGE_V2), false) => {
                return ("body", self.payload(body));
            }
            (Some(RequestCode::GET_ROUTEINFO_BY_TOPIC), true) => {
                Some(json_body::<TopicRouteData>(body))
            }
            (Some(RequestCode::GET_BROKER_CLUSTER_INFO), true) => {
                Some(json_body::<ClusterInfo>(body))
            }
            (Some(RequestCode::GET_CONSUMER_LIST_BY_GROUP), true) => {
                Some(json_body::<ConsumerList>(body))
            }
            (Some(RequestCode::LOCK_BATCH_MQ), true) => {
                Some(json_body::<LockBatchResponseBody>(body))
            }
            (Some(RequestCode::QUERY_ASSIGNMENT), true) => {
                Some(json_body::<QueryAssignmentResponseBody>(body))
            }
            (
                Some(
                    RequestCode::PULL_MESSAGE
                    | RequestCode::LITE_PULL_MESSAGE
                    | RequestCode::POP_MESSAGE
                    | RequestCode::PEEK_MESSAGE
                    | RequestCode::VIEW_MESSAGE_BY_ID
                    | RequestCode::QUERY_MESSAGE,
                ),
                true,
            ) => Some(self.records(body)),
            _ => None,
        };
        match typed {
            Some(Ok(value)) => ("body_decoded", value),
            Some(Err(error)) => (
                "body_error",
                json!({"error": error, "preview": self.payload(body)}),
            ),
            None => ("body_guess", self.guess(body)),
        }
    }

    /// A body whose type the code does not tell: message records, then JSON, then text or hex.
    fn guess(&self, body: &Bytes) -> Value {
        if let Ok(records) = self.records(body) {
            return json!({"records": records});
        }
        if let Ok(normalized) = fastjson::normalize(body)
            && let Ok(value) = serde_json::from_slice::<Value>(&normalized)
        {
            return json!({"json": value});
        }
        self.payload(body)
    }

    fn records(&self, body: &Bytes) -> Result<Value, String> {
        let records = message::decode_records(body, true).map_err(|error| error.to_string())?;
        Ok(Value::Array(
            records.iter().map(|record| self.record(record)).collect(),
        ))
    }

    fn record(&self, record: &MessageRecord) -> Value {
        json!({
            "topic": record.topic,
            "queueId": record.queue_id,
            "queueOffset": record.queue_offset,
            "commitLogOffset": record.physical_offset,
            "msgId": record.offset_msg_id(),
            "magic": if record.v2 { "V2" } else { "V1" },
            "flag": record.flag,
            "sysFlag": record.sys_flag,
            "bornTimestamp": record.born_timestamp,
            "bornHost": record.born_host.to_string(),
            "storeTimestamp": record.store_timestamp,
            "storeHost": record.store_host.to_string(),
            "reconsumeTimes": record.reconsume_times,
            "preparedTransactionOffset": record.prepared_transaction_offset,
            "properties": record.properties,
            "body": self.payload(&record.body),
        })
    }

    fn batch(&self, body: &Bytes) -> Result<Value, String> {
        let entries = message::decode_batch(body).map_err(|error| error.to_string())?;
        Ok(Value::Array(
            entries
                .iter()
                .map(|entry| json!({"flag": entry.flag, "properties": entry.properties, "body": self.payload(&entry.body)}))
                .collect(),
        ))
    }

    /// A message payload: text when it is UTF-8, hex otherwise, cut at the preview length.
    fn payload(&self, body: &[u8]) -> Value {
        let shown = &body[..body.len().min(self.args.body_preview)];
        let cut = shown.len() < body.len();
        match std::str::from_utf8(shown) {
            Ok(text) => json!({"length": body.len(), "text": text, "truncated": cut}),
            Err(_) => json!({"length": body.len(), "hex": hex::encode(shown), "truncated": cut}),
        }
    }
}

fn json_body<T: JsonBody>(body: &[u8]) -> Result<Value, String> {
    let parsed = T::from_json(body).map_err(|error| error.to_string())?;
    serde_json::to_value(parsed).map_err(|error| error.to_string())
}

fn extra_info_json(text: &str) -> Value {
    match text.parse::<ExtraInfo>() {
        Ok(info) => json!({
            "ckQueueOffset": info.ck_queue_offset,
            "popTime": info.pop_time,
            "invisibleTime": info.invisible_time,
            "reviveQid": info.revive_qid,
            "topicType": format!("{:?}", info.topic_type),
            "brokerName": info.broker_name,
            "queueId": info.queue_id,
            "queueOffset": info.queue_offset,
            "commitLogOffset": info.commit_log_offset,
        }),
        Err(error) => json!({"error": error.to_string()}),
    }
}
