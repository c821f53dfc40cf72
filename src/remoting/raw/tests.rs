use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;
use crate::remoting::{ExtFields, LanguageCode};

fn limits() -> FrameLimits {
    FrameLimits::default()
}

/// A frame without its length prefix, as the readers hand it over.
fn frame_of(command: &RemotingCommand) -> Bytes {
    let mut buffer = BytesMut::new();
    frame::encode_frame(command, &limits(), &mut buffer).expect("encode");
    buffer.freeze().slice(4..)
}

fn json_frame(header: &str, body: &[u8]) -> Bytes {
    let mut frame = Vec::new();
    frame.extend_from_slice(&(header.len() as u32).to_be_bytes());
    frame.extend_from_slice(header.as_bytes());
    frame.extend_from_slice(body);
    Bytes::from(frame)
}

fn written(raw: &RawCommand) -> Bytes {
    let mut buffer = BytesMut::new();
    raw.encode(&limits(), &mut buffer).expect("encode");
    buffer.freeze().slice(4..)
}

/// What a Java 4.x producer writes for SEND_MESSAGE_V2: unsorted keys, control characters
/// escaped in the properties.
const SEND_V2: &str = r#"{"code":310,"extFields":{"a":"PG","b":"TopicTest","c":"TBW102","d":"4","e":"3","f":"0","g":"1733462400000","h":"0","i":"KEYS\u0001k1\u0002WAIT\u0001true\u0002","j":"0","k":"false","m":"false"},"flag":0,"language":"JAVA","opaque":4711,"serializeTypeCurrentRPC":"JSON","version":399}"#;

#[test]
fn routing_fields_read_without_decoding() {
    let raw = RawCommand::scan(&json_frame(SEND_V2, b"hello"), &limits()).expect("scans");
    assert_eq!((raw.code, raw.opaque, raw.flag), (310, 4711, 0));
    assert_eq!(raw.ext("b"), Ok(Some("TopicTest")));
    assert_eq!(raw.ext("e"), Ok(Some("3")));
    assert_eq!(raw.ext("n"), Ok(None));
    assert_eq!(raw.ext("i"), Err(()), "escaped values are never read raw");
    assert_eq!(&raw.body[..], b"hello");
}

#[test]
fn a_relayed_send_changes_only_the_fields_meant() {
    let input = json_frame(SEND_V2, b"hello");
    let raw = RawCommand::scan(&input, &limits()).expect("scans");
    let relayed = written(&raw.rewritten(9, &[("e", "1"), ("n", "broker-b")]));
    let expected = SEND_V2
        .replace(r#""e":"3""#, r#""e":"1""#)
        .replace(r#""m":"false"}"#, r#""m":"false","n":"broker-b"}"#)
        .replace(r#""opaque":4711"#, r#""opaque":9"#);
    assert_eq!(relayed, json_frame(&expected, b"hello"));
    // And back: the original bytes exactly.
    let back = RawCommand::scan(&relayed, &limits()).expect("scans");
    let restored = back.with_opaque(4711);
    assert_eq!(restored.ext("n"), Ok(Some("broker-b")));
    assert_eq!(restored.ext("b"), Ok(Some("TopicTest")));
}

#[test]
fn odd_but_valid_json_is_kept_byte_for_byte() {
    let header = r#" { "version" : 317 , "opaque":-5,"remark":null,"extFields" : { "topic" : "T" , "queueId":"2", "n": 7 } ,"code": 10 } "#;
    let raw = RawCommand::scan(&json_frame(header, b""), &limits()).expect("scans");
    assert_eq!(raw.ext("topic"), Ok(Some("T")));
    assert_eq!(raw.ext("n"), Err(()), "a number where a string is expected");
    let relayed = written(&raw.rewritten(12345, &[("queueId", "0")]));
    let expected = header
        .replace(r#""queueId":"2""#, r#""queueId":"0""#)
        .replace(r#""opaque":-5"#, r#""opaque":12345"#);
    assert_eq!(relayed, json_frame(&expected, b""));
}

#[test]
fn fields_are_added_where_no_ext_object_or_an_empty_one_exists() {
    for header in [
        r#"{"code":10,"flag":0,"opaque":1}"#,
        r#"{"code":10,"extFields":{},"flag":0,"opaque":1}"#,
    ] {
        let raw = RawCommand::scan(&json_frame(header, b"x"), &limits()).expect("scans");
        let changed = raw.rewritten(2, &[("bname", "b"), ("queueId", "3")]);
        let decoded = changed.decode().expect("decodes");
        assert_eq!(decoded.opaque, 2);
        assert_eq!(decoded.ext("bname"), Some("b"), "{header}");
        assert_eq!(decoded.ext("queueId"), Some("3"), "{header}");
        assert_eq!(&decoded.body[..], b"x");
    }
}

#[test]
fn a_key_changed_twice_keeps_its_first_value() {
    for binary in [false, true] {
        let mut command = RemotingCommand::request(crate::remoting::RequestCode::SEND_MESSAGE, 1);
        command.ext_fields.insert("queueId".into(), "3".into());
        if binary {
            command.serialize_type = SerializeType::Binary;
        }
        let raw = RawCommand::scan(&frame_of(&command), &limits()).expect("scans");
        let changed = raw.rewritten(
            2,
            &[("queueId", "1"), ("queueId", "2"), ("n", "a"), ("n", "b")],
        );
        let decoded = changed.decode().expect("decodes");
        assert_eq!(decoded.ext("queueId"), Some("1"), "binary: {binary}");
        assert_eq!(decoded.ext("n"), Some("a"), "binary: {binary}");
    }
}

#[test]
fn what_the_scanner_does_not_vouch_for_is_declined() {
    for header in [
        r#"{"code":10,"opaque":1,"opaque":2}"#,
        r#"{"code":10,"opaque":"1"}"#,
        r#"{"code":10,"opaque":01}"#,
        r#"{"code":10,"opaque":1.5}"#,
        r#"{"code":10}"#,
        r#"{"code":10,"opaque":1,"extFields":{"a":"1","a":"2"}}"#,
        r#"{"code":10,"opaque":1,"extFields":{"topic":"1","a":"2","topic":"3"}}"#,
        r#"{"code":10,"extFields":{"topic":"1","a":"2","topic":"3"},"opaque":1}"#,
        r#"{"code":10,"opaque":1,"extFields":null}"#,
        r#"{"code":10,"opaque":1,"extFields":{"a\"b":"1"}}"#,
        r#"{"code":10,"opaque":1} x"#,
        r#"{"code":10,"opaque":1"#,
        r#"[{"code":10,"opaque":1}]"#,
        "{}",
    ] {
        assert!(
            RawCommand::scan(&json_frame(header, b""), &limits()).is_none(),
            "{header}"
        );
    }
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_%|-]{1,12}",
        any::<String>().prop_filter("not empty", |text| !text.is_empty()),
    ]
}

prop_compose! {
    fn command()(
        code in -300i32..300,
        opaque in any::<i32>(),
        flag in 0i32..4,
        language in 0u8..13,
        remark in proptest::option::of(text()),
        ext in proptest::collection::btree_map("[a-zA-Z]{1,8}", text(), 0..8),
        body in proptest::collection::vec(any::<u8>(), 0..64),
        binary in any::<bool>(),
    ) -> RemotingCommand {
        RemotingCommand {
            code,
            language: LanguageCode(language),
            version: 399,
            opaque,
            flag,
            remark,
            ext_fields: ext.into_iter().collect::<ExtFields>(),
            body: Bytes::from(body),
            serialize_type: if binary { SerializeType::Binary } else { SerializeType::Json },
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, rng_seed: proptest::test_runner::RngSeed::Fixed(20261206), ..ProptestConfig::default() })]

    /// Whatever our encoder writes scans, and the fields read raw are the decoded ones.
    #[test]
    fn encoded_commands_scan_to_their_fields(command in command()) {
        let raw = RawCommand::scan(&frame_of(&command), &limits()).expect("an encoded command scans");
        prop_assert_eq!((raw.code, raw.opaque, raw.flag), (command.code, command.opaque, command.flag));
        for (key, value) in &command.ext_fields {
            prop_assert_eq!(raw.ext_is_text(key), raw.ext(key).is_ok());
            match raw.ext(key) {
                Ok(Some(read)) => prop_assert_eq!(read, value.as_str()),
                Ok(None) => prop_assert!(value.is_empty()),
                Err(()) => prop_assert!(raw.serialize_type == SerializeType::Json),
            }
        }
        prop_assert_eq!(raw.decode().expect("decodes"), frame::decode_frame(frame_of(&command), &limits()).expect("decodes"));
    }

    /// What our encoder writes takes the sorted-keys path, and that path reads exactly what the
    /// general one reads, for requests (ext fields indexed) and answers (skipped) alike.
    #[test]
    fn sorted_headers_read_as_the_general_scan_reads_them(command in command()) {
        prop_assume!(command.serialize_type == SerializeType::Json);
        let frame = frame_of(&command);
        let (_, header, _) = split_header(&frame, &limits()).expect("splits");
        let specials = Specials::index(&header);
        for indexed in [false, true] {
            let (mut sorted_fields, mut any_fields) = (Vec::new(), Vec::new());
            let sorted = scan_sorted_top(&header, indexed.then_some(&mut sorted_fields), &specials)
                .expect("our encoder sorts its keys");
            let any = scan_any_top(&header, indexed.then_some(&mut any_fields), &specials).expect("scans");
            prop_assert_eq!(
                (sorted.code, sorted.opaque, sorted.opaque_at, sorted.flag, sorted.object_start, sorted.ascii),
                (any.code, any.opaque, any.opaque_at, any.flag, any.object_start, any.ascii)
            );
            prop_assert_eq!(sorted.ext.map(|ext| (ext.close, ext.members)), any.ext.map(|ext| (ext.close, ext.members)));
            prop_assert_eq!(sorted_fields, any_fields);
        }
    }

    /// An ext object of one-letter keys, as Java's compact send header is written, takes the
    /// letter path, and that path indexes exactly what the general walk indexes.
    #[test]
    fn letter_keyed_ext_objects_index_as_the_general_walk_does(
        ext in proptest::collection::btree_map("[a-p]", text(), 1..12),
        opaque in any::<i32>(),
    ) {
        let command = RemotingCommand {
            ext_fields: ext.into_iter().collect::<ExtFields>(),
            ..RemotingCommand::request(crate::remoting::RequestCode::SEND_MESSAGE_V2, opaque)
        };
        let frame = frame_of(&command);
        let (_, header, _) = split_header(&frame, &limits()).expect("splits");
        let at = header.windows(12).position(|window| window == b"\"extFields\":").expect("has ext") + 12;
        let specials = Specials::index(&header);
        let (mut letter_fields, mut any_fields) = (Vec::new(), Vec::new());
        let mut letters = Json { bytes: &header, at, specials: &specials };
        let letter_ext = letters.letter_ext_object(&mut letter_fields).expect("one-letter keys, sorted");
        let mut any = Json { bytes: &header, at, specials: &specials };
        let any_ext = any.any_ext_object(&mut any_fields).expect("scans");
        prop_assert_eq!((letter_ext.close, letter_ext.members, letters.at), (any_ext.close, any_ext.members, any.at));
        prop_assert_eq!(letter_ext.letters, index_json_keys(&header, &any_fields));
        prop_assert_eq!(any_ext.letters, None);
        prop_assert_eq!(letter_fields, any_fields);
    }

    /// A rewrite decodes to the original with exactly the changes applied, and writing the old
    /// values back gives the original bytes.
    #[test]
    fn rewrites_change_only_the_fields_meant(
        command in command(),
        opaque in any::<i32>(),
        changes in proptest::collection::btree_map(prop_oneof!["[a-zA-Z]{1,8}", Just("queueId".to_owned())], "[a-zA-Z0-9-]{1,10}", 0..3),
    ) {
        let input = frame_of(&command);
        let raw = RawCommand::scan(&input, &limits()).expect("scans");
        let list: Vec<(&str, &str)> = changes.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let changed = raw.rewritten(opaque, &list);
        let mut expected = frame::decode_frame(input.clone(), &limits()).expect("decodes");
        expected.opaque = opaque;
        for (key, value) in &changes {
            expected.ext_fields.insert(key.clone(), value.clone());
        }
        prop_assert_eq!(changed.decode().expect("decodes"), expected.clone());
        prop_assert_eq!(frame::decode_frame(written(&changed), &limits()).expect("decodes"), expected);
        // Opaque only: byte-identical round trip.
        prop_assert_eq!(written(&raw.with_opaque(opaque).with_opaque(command.opaque)), input.clone());
        // Same values written back where they exist: byte-identical.
        let same: Vec<(&str, &str)> = command.ext_fields.iter()
            .filter(|(_, value)| raw.serialize_type == SerializeType::Binary || !value.chars().any(|c| c < ' ' || c == '"' || c == '\\'))
            .map(|(k, v)| (k.as_str(), v.as_str())).collect();
        prop_assert_eq!(written(&raw.rewritten(command.opaque, &same)), input);
    }

    /// An answer's head reads what the full scan reads, and relaying it with another opaque gives
    /// the frame the full form gives: only the opaque differs from the input.
    #[test]
    fn heads_relay_answers_with_only_the_opaque_changed(command in command(), opaque in any::<i32>()) {
        let input = frame_of(&command);
        let head = RawHead::scan(&input, &limits()).expect("an encoded command's head scans");
        prop_assert_eq!((head.code, head.opaque, head.flag), (command.code, command.opaque, command.flag));
        let mut relayed = BytesMut::new();
        head.write_with_opaque(opaque, &limits(), &mut relayed).expect("writes");
        let raw = RawCommand::scan(&input, &limits()).expect("scans");
        prop_assert_eq!(relayed.clone().freeze().slice(4..), written(&raw.with_opaque(opaque)));
        let mut back = BytesMut::new();
        head.write_with_opaque(command.opaque, &limits(), &mut back).expect("writes");
        prop_assert_eq!(back.freeze().slice(4..), input);
    }

    /// A request written straight into a buffer is the same frame a rewrite gives.
    #[test]
    fn relays_written_in_place_match_rewrites(
        command in command(),
        opaque in any::<i32>(),
        changes in proptest::collection::btree_map(prop_oneof!["[a-zA-Z]{1,8}", Just("queueId".to_owned())], "[a-zA-Z0-9-]{1,10}", 0..3),
    ) {
        let raw = RawCommand::scan(&frame_of(&command), &limits()).expect("scans");
        let list: Vec<(&str, &str)> = changes.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut scratch = Vec::new();
        let mut buffer = BytesMut::from(&b"kept"[..]);
        raw.write_relayed(opaque, &list, &limits(), &mut scratch, &mut buffer).expect("writes");
        prop_assert_eq!(&buffer[..4], b"kept");
        prop_assert_eq!(buffer.freeze().slice(8..), written(&raw.rewritten(opaque, &list)));
    }

    /// Arbitrary bytes never panic the scanner; what it accepts agrees with the full decoder.
    #[test]
    fn arbitrary_headers_scan_safely(bytes in proptest::collection::vec(any::<u8>(), 0..96), json in any::<bool>()) {
        let mut frame = vec![u8::from(!json), 0, 0, bytes.len() as u8];
        frame.extend_from_slice(&bytes);
        let frame = Bytes::from(frame);
        if let Some(head) = RawHead::scan(&frame, &limits())
            && let Ok(decoded) = frame::decode_frame(frame.clone(), &limits())
        {
            prop_assert_eq!((head.code, head.opaque, head.flag), (decoded.code, decoded.opaque, decoded.flag));
        }
        if let Some(raw) = RawCommand::scan(&frame, &limits()) {
            for key in ["topic", "a", "b"] {
                prop_assert_eq!(raw.ext_is_text(key), raw.ext(key).is_ok());
            }
            let _ = raw.rewritten(1, &[("topic", "t")]);
            if let Ok(decoded) = frame::decode_frame(frame, &limits()) {
                prop_assert_eq!((raw.code, raw.opaque, raw.flag), (decoded.code, decoded.opaque, decoded.flag));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, rng_seed: proptest::test_runner::RngSeed::Fixed(20261206), ..ProptestConfig::default() })]

    /// The word-at-a-time skip stops where a byte-at-a-time one does.
    #[test]
    fn the_word_skip_stops_at_the_first_special_byte(
        text in proptest::collection::vec(prop_oneof![4 => 0x20u8..0x7f, 1 => any::<u8>()], 0..80)
    ) {
        let naive = text
            .iter()
            .position(|&byte| byte == b'"' || byte == b'\\' || byte < 0x20);
        prop_assert_eq!(next_special(&text, 0), naive);
    }

    /// The indexed string scan ends every string where the scan string by string does, escapes
    /// and control bytes included, wherever the string sits in the index.
    #[test]
    fn the_indexed_string_scan_agrees_with_the_plain_one(
        text in proptest::collection::vec(
            prop_oneof![8 => 0x20u8..0x7f, 2 => Just(b'"'), 2 => Just(b'\\'), 1 => Just(b'u'), 1 => any::<u8>()],
            0..1100,
        ),
        start in 0usize..1100,
    ) {
        let specials = Specials::index(&text);
        prop_assert_eq!(specials.indexed, text.len() <= INDEXED_HEADER);
        let start = start.min(text.len());
        prop_assert_eq!(specials.string_end(&text, start), string_end(&text, start));
        // From every quote too, as a scan meets strings.
        for quote in text.iter().enumerate().filter(|&(_, &byte)| byte == b'"').map(|(at, _)| at).take(16) {
            prop_assert_eq!(specials.string_end(&text, quote), string_end(&text, quote));
        }
    }
}

#[test]
fn headers_not_written_sorted_are_read_by_the_general_scan() {
    for (header, sorted) in [
        (r#"{"code":1,"flag":0,"opaque":7}"#, true),
        (r#"{"opaque":7,"code":1}"#, false),
        (r#"{ "code":1,"opaque":7}"#, false),
        (r#"{"code":1, "opaque":7}"#, false),
        (r#"{"code":1,"opaque":7,"remark":null,"version":1}"#, true),
        (r#"{"code":1,"opaque":7,"opaque":8}"#, false),
        (r#"{"code":1,"opaque":7,"code":2}"#, false),
        (r#"{"code":1,"opaque":7} "#, false),
    ] {
        let specials = Specials::index(header.as_bytes());
        assert_eq!(
            scan_sorted_top(header.as_bytes(), None, &specials).is_some(),
            sorted,
            "{header}"
        );
        let general = scan_any_top(header.as_bytes(), None, &specials);
        let scanned = RawHead::scan(&json_frame(header, b""), &limits());
        assert_eq!(
            scanned.map(|head| head.opaque),
            general.map(|top| top.opaque),
            "{header}"
        );
    }
}

#[test]
fn ext_objects_with_more_long_keys_than_indexed_are_declined() {
    let ext = |count: usize| {
        (0..count)
            .map(|index| format!(r#""key{index}":"v""#))
            .collect::<Vec<_>>()
            .join(",")
    };
    let header = |count| format!(r#"{{"code":10,"extFields":{{{}}},"opaque":1}}"#, ext(count));
    assert!(RawCommand::scan(&json_frame(&header(LONGER_KEYS), b""), &limits()).is_some());
    assert!(RawCommand::scan(&json_frame(&header(LONGER_KEYS + 1), b""), &limits()).is_none());
}

#[test]
fn ext_objects_not_written_with_sorted_letters_are_read_by_the_general_walk() {
    for (ext, letters) in [
        (r#"{"a":"1","b":"2"}"#, true),
        (r#"{"b":"1","a":"2"}"#, false),
        (r#"{"a":"1","a":"2"}"#, false),
        (r#"{"a":1}"#, false),
        (r#"{"ab":"1"}"#, false),
        (r#"{"A":"1"}"#, false),
        (r#"{ "a":"1"}"#, false),
        (r#"{}"#, false),
    ] {
        let specials = Specials::index(ext.as_bytes());
        let mut scanner = Json {
            bytes: ext.as_bytes(),
            at: 0,
            specials: &specials,
        };
        assert_eq!(
            scanner.letter_ext_object(&mut Vec::new()).is_some(),
            letters,
            "{ext}"
        );
        let header = format!(r#"{{"code":10,"extFields":{ext},"opaque":1}}"#);
        let scanned = RawCommand::scan(&json_frame(&header, b""), &limits());
        let duplicated = ext.contains(r#""a":"1","a""#);
        assert_eq!(scanned.is_some(), !duplicated, "{ext}");
    }
}

#[test]
fn keys_given_twice_are_caught_short_or_long() {
    let text = b"abab codecode";
    let mut seen = SeenKeys::default();
    assert!(seen.insert(text, 0..1));
    assert!(seen.insert(text, 1..2));
    assert!(!seen.insert(text, 2..3), "`a` again");
    assert!(seen.insert(text, 5..9));
    assert!(!seen.insert(text, 9..13), "`code` again");
    let many = (0..LONGER_KEYS + 1)
        .map(|index| format!("k{index:02}"))
        .collect::<String>();
    let mut seen = SeenKeys::default();
    let fits = (0..=LONGER_KEYS)
        .map(|index| seen.insert(many.as_bytes(), index * 3..index * 3 + 3))
        .collect::<Vec<_>>();
    assert!(fits[..LONGER_KEYS].iter().all(|&fresh| fresh));
    assert!(!fits[LONGER_KEYS], "past the room left, a key is declined");
}

#[test]
fn the_header_keys_are_told_apart_exactly() {
    let keys = [
        ("code", TopKey::Code),
        ("opaque", TopKey::Opaque),
        ("flag", TopKey::Flag),
        ("extFields", TopKey::ExtFields),
        ("language", TopKey::Language),
        ("version", TopKey::Version),
        ("remark", TopKey::Remark),
        ("serializeTypeCurrentRPC", TopKey::SerializeType),
    ];
    for (name, key) in keys {
        assert_eq!(TopKey::of(name.as_bytes()), Some(key), "{name}");
    }
    for other in [
        "",
        "cod",
        "codE",
        "flat",
        "opaquE",
        "remarks",
        "Version",
        "extfields",
        "x",
    ] {
        assert_eq!(TopKey::of(other.as_bytes()), None, "{other}");
    }
}

#[test]
fn bytes_compare_equal_exactly_at_every_length() {
    let text: Vec<u8> = (0..40u8).collect();
    for len in 0..30 {
        let a = &text[..len];
        assert!(same_bytes(a, &text[..len]), "{len}");
        assert!(!same_bytes(a, &text[..len + 1]), "{len}: lengths differ");
        for flip in 0..len {
            let mut b = a.to_vec();
            b[flip] ^= 1;
            assert!(!same_bytes(a, &b), "{len}: byte {flip} differs");
        }
    }
}
