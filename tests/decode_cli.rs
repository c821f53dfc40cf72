//! `rocketmesh decode` as a user runs it: on the shipped captures, on hex text, and on broken input.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

struct Run {
    status: i32,
    objects: Vec<Value>,
    stderr: String,
}

fn decode(args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rocketmesh"))
        .arg("decode")
        .arg("--compact")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rocketmesh");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        input.write_all(bytes).expect("write stdin");
    }
    drop(input);
    let output = child.wait_with_output().expect("run");
    let stdout = String::from_utf8(output.stdout).expect("utf8 output");
    let objects = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}")))
        .collect();
    Run {
        status: output.status.code().unwrap_or(-1),
        objects,
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn data(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn decodes_the_shipped_producer_capture() {
    let run = decode(&[&data("rust-client-producer.bin")], None);
    assert_eq!(run.status, 0, "{}", run.stderr);
    assert!(
        run.objects.iter().all(|o| o.get("error").is_none()),
        "{:?}",
        run.objects
    );
    let names: Vec<&str> = run
        .objects
        .iter()
        .filter_map(|o| o["name"].as_str())
        .collect();
    assert!(names.contains(&"GET_ROUTEINFO_BY_TOPIC"), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("SEND_MESSAGE")),
        "{names:?}"
    );
    let send = run
        .objects
        .iter()
        .find(|o| o["name"] == "SEND_MESSAGE_V2" || o["name"] == "SEND_MESSAGE");
    let send = send.expect("a send");
    assert!(send["header_decoded"]["properties"].is_object(), "{send}");
    assert!(
        send["body"]["length"].as_u64().is_some_and(|n| n > 0),
        "{send}"
    );
    assert!(run.stderr.contains("0 errors"), "{}", run.stderr);
}

#[test]
fn decodes_the_reference_example_from_hex_on_stdin() {
    let hex = b"0000002d 01000029 0069 00 01df 00000007 00000000 00000000 00000014 0005 746f706963 00000009 546f70696354657374\n";
    let run = decode(&["--hex", "-"], Some(hex));
    assert_eq!(run.status, 0, "{}", run.stderr);
    let frame = &run.objects[0];
    assert_eq!(frame["name"], "GET_ROUTEINFO_BY_TOPIC");
    assert_eq!(frame["serialize"], "ROCKETMQ");
    assert_eq!(frame["opaque"], 7);
    assert_eq!(frame["version"], 479);
    assert_eq!(frame["header"]["topic"], "TopicTest");
}

#[test]
fn a_malformed_frame_is_reported_with_its_offset_and_decoding_goes_on() {
    let good = std::fs::read(data("rust-client-producer.bin")).expect("capture");
    let first_len = i32::from_be_bytes([good[0], good[1], good[2], good[3]]) as usize + 4;
    let mut bytes = good[..first_len].to_vec();
    // A frame with a well-formed length but a header that is not JSON.
    bytes.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 3, b'{', b'"', b'x']);
    bytes.extend_from_slice(&good[..first_len]);
    let run = decode(&["-"], Some(&bytes));
    assert_eq!(run.status, 1);
    assert_eq!(run.objects.len(), 3, "{:?}", run.objects);
    assert_eq!(run.objects[1]["offset"], first_len);
    assert!(
        run.objects[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("JSON"))
    );
    assert_eq!(run.objects[2]["name"], run.objects[0]["name"]);

    // A bad length prefix cannot be skipped: decoding stops with a clear message.
    let mut broken = good[..first_len].to_vec();
    broken.extend_from_slice(&(-1i32).to_be_bytes());
    let run = decode(&["-"], Some(&broken));
    assert_eq!(run.status, 1);
    assert_eq!(run.objects[1]["fatal"], true);
    assert!(run.objects[2]["stopped"].is_string());
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let run = decode(&["/nonexistent/capture.bin"], None);
    assert_eq!(run.status, 2);
    assert!(
        run.stderr.contains("cannot open /nonexistent/capture.bin"),
        "{}",
        run.stderr
    );
}
