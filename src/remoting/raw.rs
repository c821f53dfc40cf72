//! A command kept as its wire bytes: the relay form of the sidecar's hot path.
//!
//! A proxy needs only the code, opaque, flag and a few ext fields (topic, queue id, `bname`) of a
//! send and of its response. [`RawCommand::scan`] reads those from the header bytes without
//! building a map, and [`RawCommand::rewritten`] changes the opaque and chosen ext fields by
//! splicing: every other byte of the header, and the body, pass through untouched. Anything the
//! scanner does not handle with certainty (a header that is not plain JSON or binary, a duplicated
//! key, a number where a string is expected) makes it decline, and the caller decodes the frame in
//! full instead, so the fast path never has to be lenient.

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use super::command::{FLAG_RESPONSE, RemotingCommand, SerializeType};
use super::frame::{self, CodecError, FrameLimits, MAX_HEADER_FIELD};
use super::header_json::push_json_string;
use super::{header_binary, header_json};

const HEADER_WORD: usize = 4;
/// Binary layout: code i16, language u8, version i16, opaque i32, flag i32, remark length i32.
const BINARY_OPAQUE: Range<usize> = 5..9;
const BINARY_FLAG: Range<usize> = 9..13;
const BINARY_FIXED: usize = 17;

/// One ext field: where its key and value sit in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Field {
    key: Range<usize>,
    /// JSON: the whole value token (quotes included); binary: the value bytes.
    value: Range<usize>,
    /// Binary only: where the value's length prefix sits.
    value_len_at: usize,
    kind: ValueKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    /// A string whose bytes are its text (no escapes).
    Plain,
    /// A string with escapes, a number, a boolean or a nested value: passed through, never read.
    Opaque,
    /// JSON null, or an empty binary string: the field is absent once decoded.
    Absent,
}

/// A request or response as bytes, with the positions of the fields a relay reads or changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCommand {
    pub serialize_type: SerializeType,
    pub code: i32,
    pub opaque: i32,
    pub flag: i32,
    header: Bytes,
    pub body: Bytes,
    /// JSON: the opaque's number token.
    opaque_at: Range<usize>,
    fields: FieldList,
    /// For each one-letter key `a` to `p` (Java's compact send fields), its field's index + 1 in
    /// `fields` (0: absent): the reads a relay makes of every send cost no search.
    letters: [u16; LETTERS],
    /// Where new ext fields go.
    ext: ExtPlace,
    /// Every plain ext value is known to be UTF-8 (a JSON header all ASCII, or a binary one,
    /// whose values are checked as it is scanned).
    texts_checked: bool,
}

const LETTERS: usize = 16;

/// A command's `fields`, their storage reused on the thread that drops them: a relay scans
/// every request, and a fresh 768-byte block per scan (and its free) cost ~2% of the sidecar's
/// CPU per send, mostly in the allocator's slow path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct FieldList(Vec<Field>);

/// Room for a SEND_MESSAGE_V2's fields (a to n) in one block.
const FIELDS_ROOM: usize = 16;
/// Spare blocks a thread keeps.
const SPARE_FIELD_LISTS: usize = 256;

thread_local! {
    static SPARE_FIELDS: std::cell::RefCell<Vec<Vec<Field>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl FieldList {
    /// An empty list with room for `FIELDS_ROOM` fields.
    fn spare() -> Self {
        let spare = SPARE_FIELDS
            .try_with(|spare| spare.borrow_mut().pop())
            .ok()
            .flatten();
        Self(spare.unwrap_or_else(|| Vec::with_capacity(FIELDS_ROOM)))
    }
}

impl Drop for FieldList {
    fn drop(&mut self) {
        if self.0.capacity() != FIELDS_ROOM {
            return;
        }
        let mut fields = std::mem::take(&mut self.0);
        fields.clear();
        // At thread exit the spares are gone: the block is then freed as usual.
        let _ = SPARE_FIELDS.try_with(|spare| {
            if let Ok(mut spare) = spare.try_borrow_mut()
                && spare.len() < SPARE_FIELD_LISTS
            {
                spare.push(fields);
            }
        });
    }
}

impl std::ops::Deref for FieldList {
    type Target = Vec<Field>;

    fn deref(&self) -> &Vec<Field> {
        &self.0
    }
}

impl std::ops::DerefMut for FieldList {
    fn deref_mut(&mut self) -> &mut Vec<Field> {
        &mut self.0
    }
}

/// The `letters` index of `fields` (keys are unique: the scanners refuse one given twice).
/// `None` when there are too many fields to index.
fn index_letters(header: &[u8], fields: &[Field]) -> Option<[u16; LETTERS]> {
    let mut letters = [0u16; LETTERS];
    for (index, field) in fields.iter().enumerate() {
        if let Some(&[letter]) = header.get(field.key.clone())
            && let Some(slot) = letters.get_mut(usize::from(letter.wrapping_sub(b'a')))
        {
            *slot = u16::try_from(index + 1).ok()?;
        }
    }
    Some(letters)
}

/// As [`index_letters`], and `None` as well when a key is given twice (it decodes as its last
/// value: not worth following here) or more than [`LONGER_KEYS`] keys are longer than a letter.
fn index_json_keys(header: &[u8], fields: &[Field]) -> Option<[u16; LETTERS]> {
    let mut letters = [0u16; LETTERS];
    let mut singles = [0u64; 4];
    let mut longer_count = 0;
    for (index, field) in fields.iter().enumerate() {
        match header.get(field.key.clone())? {
            &[byte] => {
                let (word, bit) = (
                    singles.get_mut(usize::from(byte / 64))?,
                    1u64 << (byte % 64),
                );
                if *word & bit != 0 {
                    return None;
                }
                *word |= bit;
                if let Some(slot) = letters.get_mut(usize::from(byte.wrapping_sub(b'a'))) {
                    *slot = u16::try_from(index + 1).ok()?;
                }
            }
            name => {
                longer_count += 1;
                let earlier = fields.get(..index)?;
                if longer_count > LONGER_KEYS
                    || earlier.iter().any(|other| is_key(header, &other.key, name))
                {
                    return None;
                }
            }
        }
    }
    Some(letters)
}

/// Where a new ext field is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExtPlace {
    /// Before the closing brace (at this index) of an ext object with members: after a comma.
    JsonMembers(usize),
    /// Before the closing brace of an empty ext object.
    JsonEmpty(usize),
    /// No ext object: a whole `"extFields":{…},` member right after the header's opening brace.
    JsonMissing(usize),
    /// At the end of the header; the ext length word sits at the index, if there is one.
    Binary(Option<usize>),
}

impl RawCommand {
    /// Reads a frame (without its length prefix). `None` when the header is malformed or is
    /// anything the relay does not handle with certainty: decode it in full instead.
    pub fn scan(frame: &Bytes, limits: &FrameLimits) -> Option<Self> {
        let (serialize_type, header, body) = split_header(frame, limits)?;
        match serialize_type {
            SerializeType::Json => scan_json(header, body),
            SerializeType::Binary => scan_binary(header, body),
        }
    }

    /// The raw form of a decoded command (encoded first). `None` only if it cannot be encoded.
    pub fn from_command(command: &RemotingCommand, limits: &FrameLimits) -> Option<Self> {
        let mut buffer = BytesMut::new();
        frame::encode_frame(command, limits, &mut buffer).ok()?;
        let frame = buffer.freeze().slice(4..);
        Self::scan(&frame, limits)
    }

    pub fn is_response(&self) -> bool {
        self.flag & FLAG_RESPONSE != 0
    }

    /// The header bytes as they will be written.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// An ext field's text: `Ok(None)` when absent, `Err(())` when present but not a plain string
    /// (escaped, or not a string): such a field must be read from a full decode.
    #[allow(clippy::result_unit_err)]
    pub fn ext(&self, key: &str) -> Result<Option<&str>, ()> {
        let Some(field) = self.field(key) else {
            return Ok(None);
        };
        match field.kind {
            ValueKind::Absent => Ok(None),
            ValueKind::Opaque => Err(()),
            ValueKind::Plain => {
                let value = match self.serialize_type {
                    // Inside the quotes.
                    SerializeType::Json => field.value.start + 1..field.value.end - 1,
                    SerializeType::Binary => field.value.clone(),
                };
                let bytes = self.header.get(value).ok_or(())?;
                if self.texts_checked {
                    // SAFETY: `texts_checked` is set only when every plain value was found to be
                    // UTF-8 as the header was scanned (a JSON header with no byte above 0x7f, or
                    // a binary one whose values each passed `from_utf8`), and the header bytes
                    // are immutable since.
                    return Ok(Some(unsafe { std::str::from_utf8_unchecked(bytes) }));
                }
                std::str::from_utf8(bytes).map(Some).map_err(|_| ())
            }
        }
    }

    /// Whether an ext field is present as a plain string (its text not read).
    pub fn has_plain_ext(&self, key: &str) -> bool {
        self.field(key)
            .is_some_and(|field| field.kind == ValueKind::Plain)
    }

    /// Whether [`RawCommand::ext`] reads `key` without an error, without converting it.
    pub fn ext_is_text(&self, key: &str) -> bool {
        match self.field(key).map(|field| field.kind) {
            None | Some(ValueKind::Absent) => true,
            Some(ValueKind::Opaque) => false,
            Some(ValueKind::Plain) => self.texts_checked || self.ext(key).is_ok(),
        }
    }

    fn field(&self, key: &str) -> Option<&Field> {
        match key.as_bytes() {
            [letter] if usize::from(letter.wrapping_sub(b'a')) < LETTERS => self
                .letters
                .get(usize::from(letter.wrapping_sub(b'a')))
                .and_then(|&slot| self.fields.get(usize::from(slot).checked_sub(1)?)),
            name => self
                .fields
                .iter()
                .rev()
                .find(|field| is_key(&self.header, &field.key, name)),
        }
    }

    /// The same command with `opaque` and the given ext fields set (added when missing, every
    /// occurrence replaced when present); every other header byte and the body are kept.
    pub fn rewritten(&self, opaque: i32, changes: &[(&str, &str)]) -> Self {
        let header = self.rewritten_header(opaque, changes);
        let scanned = match self.serialize_type {
            SerializeType::Json => scan_json(header, self.body.clone()),
            SerializeType::Binary => scan_binary(header, self.body.clone()),
        };
        // A rewrite of a scanned header always scans; should it not, the original stands
        // rather than a frame the relay cannot vouch for.
        debug_assert!(scanned.is_some(), "a rewritten header scans");
        scanned.unwrap_or_else(|| self.clone())
    }

    /// As [`RawCommand::rewritten`], ready to write and not indexed again: what a relay sends on.
    pub fn relayed(&self, opaque: i32, changes: &[(&str, &str)]) -> Outgoing {
        Outgoing::Spliced {
            serialize_type: self.serialize_type,
            code: self.code,
            header: self.rewritten_header(opaque, changes),
            body: self.body.clone(),
        }
    }

    fn rewritten_header(&self, opaque: i32, changes: &[(&str, &str)]) -> Bytes {
        let mut header = Vec::with_capacity(self.header.len() + 64);
        self.rewrite_into(opaque, changes, &mut header);
        Bytes::from(header)
    }

    /// The rewritten header (see [`RawCommand::rewritten`]) in `out`, which is cleared first.
    fn rewrite_into(&self, opaque: i32, changes: &[(&str, &str)], out: &mut Vec<u8>) {
        out.clear();
        // A key named twice: its first value stands, present or added.
        let named_twice = changes
            .iter()
            .enumerate()
            .any(|(index, (key, _))| changes[..index].iter().any(|(seen, _)| seen == key));
        let distinct: Vec<(&str, &str)>;
        let changes = if named_twice {
            let mut firsts: Vec<(&str, &str)> = Vec::with_capacity(changes.len());
            for &(key, value) in changes {
                if firsts.iter().all(|(seen, _)| *seen != key) {
                    firsts.push((key, value));
                }
            }
            distinct = firsts;
            &distinct[..]
        } else {
            changes
        };
        match self.serialize_type {
            SerializeType::Json => self.rewrite_json(opaque, changes, out),
            SerializeType::Binary => self.rewrite_binary(opaque, changes, out),
        }
    }

    /// The rewritten request's whole frame appended to `dst`: [`RawCommand::write_relayed_head`]
    /// and the body after it.
    pub fn write_relayed(
        &self,
        opaque: i32,
        changes: &[(&str, &str)],
        limits: &FrameLimits,
        scratch: &mut Vec<u8>,
        dst: &mut BytesMut,
    ) -> Result<(), CodecError> {
        self.write_relayed_head(opaque, changes, limits, scratch, dst)?;
        dst.extend_from_slice(&self.body);
        Ok(())
    }

    /// The rewritten request's frame up to its body, appended to `dst` with no copy of the
    /// header in between: for a writer that queues the body by reference. `scratch` is reused
    /// space.
    pub fn write_relayed_head(
        &self,
        opaque: i32,
        changes: &[(&str, &str)],
        limits: &FrameLimits,
        scratch: &mut Vec<u8>,
        dst: &mut BytesMut,
    ) -> Result<(), CodecError> {
        self.rewrite_into(opaque, changes, scratch);
        write_frame_head(
            self.serialize_type,
            [&scratch[..]],
            self.body.len(),
            limits,
            dst,
        )
    }

    /// Just the opaque changed: what relaying a response to its client needs. Positions after
    /// the opaque shift by the change in its length; nothing is scanned again.
    pub fn with_opaque(&self, opaque: i32) -> Self {
        let mut text = itoa::Buffer::new();
        let digits: &[u8] = match self.serialize_type {
            SerializeType::Json => text.format(opaque).as_bytes(),
            SerializeType::Binary => &opaque.to_be_bytes(),
        };
        let old = &self.opaque_at;
        let mut header = Vec::with_capacity(self.header.len() + 8);
        header.extend_from_slice(&self.header[..old.start]);
        header.extend_from_slice(digits);
        header.extend_from_slice(&self.header[old.end..]);
        let shift = |at: usize| {
            if at >= old.end {
                at + digits.len() - old.len()
            } else {
                at
            }
        };
        let shift_range = |range: &Range<usize>| shift(range.start)..shift(range.end);
        Self {
            serialize_type: self.serialize_type,
            code: self.code,
            opaque,
            flag: self.flag,
            header: Bytes::from(header),
            body: self.body.clone(),
            opaque_at: old.start..old.start + digits.len(),
            letters: self.letters,
            texts_checked: self.texts_checked,
            fields: FieldList(
                self.fields
                    .iter()
                    .map(|field| Field {
                        key: shift_range(&field.key),
                        value: shift_range(&field.value),
                        value_len_at: shift(field.value_len_at),
                        kind: field.kind,
                    })
                    .collect(),
            ),
            ext: match self.ext {
                ExtPlace::JsonMembers(at) => ExtPlace::JsonMembers(shift(at)),
                ExtPlace::JsonEmpty(at) => ExtPlace::JsonEmpty(shift(at)),
                ExtPlace::JsonMissing(at) => ExtPlace::JsonMissing(shift(at)),
                binary @ ExtPlace::Binary(_) => binary,
            },
        }
    }

    fn rewrite_json(&self, opaque: i32, changes: &[(&str, &str)], out: &mut Vec<u8>) {
        let old = &self.header[..];
        let mut digits = itoa::Buffer::new();
        // (span of the old header to drop, what to put there): the opaque, one per change (keys
        // are unique in a scanned header) and the added members. A relay's few fit on the stack.
        let mut inline: [(Range<usize>, JsonEdit); INLINE_EDITS] =
            std::array::from_fn(|_| (0..0, JsonEdit::Bytes(&[])));
        let mut spilled: Vec<(Range<usize>, JsonEdit)> = Vec::new();
        let fits = changes.len() + 2 <= INLINE_EDITS;
        let mut count = 0;
        let mut push = |edit| {
            if let Some(slot) = inline.get_mut(count).filter(|_| fits) {
                *slot = edit;
            } else {
                spilled.push(edit);
            }
            count += 1;
        };
        push((
            self.opaque_at.clone(),
            JsonEdit::Bytes(digits.format(opaque).as_bytes()),
        ));
        let mut missing = false;
        for (key, value) in changes {
            match self.field(key) {
                Some(field) => push((field.value.clone(), JsonEdit::String(value))),
                None => missing = true,
            }
        }
        if missing {
            match self.ext {
                ExtPlace::JsonMembers(at) => push((at..at, JsonEdit::Added { after_member: true })),
                ExtPlace::JsonEmpty(at) => push((
                    at..at,
                    JsonEdit::Added {
                        after_member: false,
                    },
                )),
                ExtPlace::JsonMissing(at) => push((at..at, JsonEdit::ExtObject)),
                ExtPlace::Binary(_) => {}
            }
        }
        let edits = if fits {
            inline.get_mut(..count).unwrap_or_default()
        } else {
            &mut spilled[..]
        };
        sort_edits(edits);
        out.reserve(old.len() + 64);
        let mut at = 0;
        for (range, edit) in edits.iter() {
            // A key named twice in `changes` edits the same span twice: the first one stands.
            let Some(kept) = old.get(at..range.start) else {
                continue;
            };
            out.extend_from_slice(kept);
            match edit {
                JsonEdit::Bytes(bytes) => out.extend_from_slice(bytes),
                JsonEdit::String(value) => push_json_string(out, value),
                JsonEdit::Added { after_member } => {
                    self.write_added_members(changes, *after_member, out)
                }
                JsonEdit::ExtObject => {
                    out.extend_from_slice(b"\"extFields\":{");
                    self.write_added_members(changes, false, out);
                    out.extend_from_slice(b"},");
                }
            }
            at = range.end;
        }
        out.extend_from_slice(old.get(at..).unwrap_or_default());
    }

    /// The changes whose keys the header lacks, as JSON members, comma separated.
    fn write_added_members(&self, changes: &[(&str, &str)], after_member: bool, out: &mut Vec<u8>) {
        let mut comma = after_member;
        for (key, value) in changes {
            if self.field(key).is_some() {
                continue;
            }
            if comma {
                out.push(b',');
            }
            push_json_string(out, key);
            out.push(b':');
            push_json_string(out, value);
            comma = true;
        }
    }

    /// `out` must be empty: positions in it are the header's.
    fn rewrite_binary(&self, opaque: i32, changes: &[(&str, &str)], out: &mut Vec<u8>) {
        let old = &self.header[..];
        out.reserve(old.len() + 64);
        let mut at = 0;
        let mut replaced = vec![false; changes.len()];
        for field in self.fields.iter() {
            let key = old.get(field.key.clone());
            // The first change naming the key sets it; any later one naming it again is spent.
            let mut naming = changes
                .iter()
                .enumerate()
                .filter(|(_, (name, _))| key == Some(name.as_bytes()));
            let Some((index, (_, value))) = naming.next() else {
                continue;
            };
            let Some(kept) = old.get(at..field.value_len_at) else {
                continue;
            };
            out.extend_from_slice(kept);
            out.put_i32(i32::try_from(value.len()).unwrap_or(i32::MAX));
            out.extend_from_slice(value.as_bytes());
            at = field.value.end;
            replaced[index] = true;
            for (again, _) in naming {
                replaced[again] = true;
            }
        }
        out.extend_from_slice(old.get(at..).unwrap_or_default());
        let old_ext_len_at = match self.ext {
            ExtPlace::Binary(at) => at,
            _ => None,
        };
        let had_ext = old_ext_len_at.is_some();
        if !had_ext && changes.iter().zip(&replaced).any(|(_, done)| !done) {
            out.put_i32(0);
        }
        for ((key, value), _) in changes.iter().zip(&replaced).filter(|(_, done)| !**done) {
            out.put_i16(i16::try_from(key.len()).unwrap_or(i16::MAX));
            out.extend_from_slice(key.as_bytes());
            out.put_i32(i32::try_from(value.len()).unwrap_or(i32::MAX));
            out.extend_from_slice(value.as_bytes());
        }
        if let Some(opaque_bytes) = out.get_mut(BINARY_OPAQUE) {
            opaque_bytes.copy_from_slice(&opaque.to_be_bytes());
        }
        // The ext length: where it was, else where it was just appended.
        let ext_len_at = old_ext_len_at.unwrap_or(old.len());
        if out.len() >= ext_len_at + 4 {
            let ext_len = out.len() - ext_len_at - 4;
            out[ext_len_at..ext_len_at + 4]
                .copy_from_slice(&i32::try_from(ext_len).unwrap_or(i32::MAX).to_be_bytes());
        }
    }

    /// The whole frame, length prefix included, appended to `dst`.
    pub fn encode(&self, limits: &FrameLimits, dst: &mut BytesMut) -> Result<(), CodecError> {
        write_frame(self.serialize_type, &self.header, &self.body, limits, dst)
    }

    /// The decoded command, for code that needs every field.
    pub fn decode(&self) -> Result<RemotingCommand, CodecError> {
        let mut command = match self.serialize_type {
            SerializeType::Json => header_json::decode(&self.header)?,
            SerializeType::Binary => header_binary::decode(&self.header)?,
        };
        command.body = self.body.clone();
        Ok(command)
    }
}

/// A frame of which only the header's top level is read: code, opaque, flag and where the opaque
/// sits. What relaying a broker's answer needs; its ext fields pass through unread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawHead {
    pub serialize_type: SerializeType,
    pub code: i32,
    pub opaque: i32,
    pub flag: i32,
    header: Bytes,
    pub body: Bytes,
    opaque_at: Range<usize>,
}

impl RawHead {
    /// Reads a frame (without its length prefix). `None` when the header's top level is
    /// malformed or anything the relay does not handle with certainty: decode it in full instead.
    pub fn scan(frame: &Bytes, limits: &FrameLimits) -> Option<Self> {
        let (serialize_type, header, body) = split_header(frame, limits)?;
        match serialize_type {
            SerializeType::Json => {
                let top = scan_json_top(&header, None)?;
                Some(Self {
                    serialize_type,
                    code: top.code,
                    opaque: top.opaque,
                    flag: top.flag,
                    header,
                    body,
                    opaque_at: top.opaque_at,
                })
            }
            // Binary headers are fully checked: cheap, and a wrong length must not pass.
            SerializeType::Binary => scan_binary(header, body).map(Self::from),
        }
    }

    pub fn is_response(&self) -> bool {
        self.flag & FLAG_RESPONSE != 0
    }

    /// The decoded command, for code that needs every field.
    pub fn decode(&self) -> Result<RemotingCommand, CodecError> {
        let mut command = match self.serialize_type {
            SerializeType::Json => header_json::decode(&self.header)?,
            SerializeType::Binary => header_binary::decode(&self.header)?,
        };
        command.body = self.body.clone();
        Ok(command)
    }

    /// The whole frame with `opaque` in place of its own, appended to `dst`: what relaying an
    /// answer to its client needs, without building the changed command.
    pub fn write_with_opaque(
        &self,
        opaque: i32,
        limits: &FrameLimits,
        dst: &mut BytesMut,
    ) -> Result<(), CodecError> {
        let mut text = itoa::Buffer::new();
        let digits: &[u8] = match self.serialize_type {
            SerializeType::Json => text.format(opaque).as_bytes(),
            SerializeType::Binary => &opaque.to_be_bytes(),
        };
        let (Some(before), Some(after)) = (
            self.header.get(..self.opaque_at.start),
            self.header.get(self.opaque_at.end..),
        ) else {
            return write_frame(self.serialize_type, &self.header, &self.body, limits, dst);
        };
        write_frame_parts(
            self.serialize_type,
            [before, digits, after],
            &self.body,
            limits,
            dst,
        )
    }
}

impl From<RawCommand> for RawHead {
    fn from(raw: RawCommand) -> Self {
        Self {
            serialize_type: raw.serialize_type,
            code: raw.code,
            opaque: raw.opaque,
            flag: raw.flag,
            header: raw.header,
            body: raw.body,
            opaque_at: raw.opaque_at,
        }
    }
}

/// A frame's serialize type, header and body; `None` if its header length is out of bounds.
fn split_header(frame: &Bytes, limits: &FrameLimits) -> Option<(SerializeType, Bytes, Bytes)> {
    let word = frame.get(..HEADER_WORD)?;
    let word = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
    let header_len = (word & MAX_HEADER_FIELD as u32) as usize;
    if header_len > limits.max_header {
        return None;
    }
    let header_end = HEADER_WORD.checked_add(header_len)?;
    if header_end > frame.len() {
        return None;
    }
    let serialize_type = SerializeType::from_byte((word >> 24) as u8)?;
    Some((
        serialize_type,
        frame.slice(HEADER_WORD..header_end),
        frame.slice(header_end..),
    ))
}

/// Whether `a` and `b` hold the same bytes, compared a word at a time: keys are short, and a
/// call out to memcmp costs more than the comparison.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (mut a_words, mut b_words) = (a.chunks_exact(8), b.chunks_exact(8));
    let words_match = a_words
        .by_ref()
        .zip(b_words.by_ref())
        .all(|(x, y)| u64::from_ne_bytes(word_of(x)) == u64::from_ne_bytes(word_of(y)));
    words_match
        && a_words
            .remainder()
            .iter()
            .zip(b_words.remainder())
            .all(|(x, y)| x == y)
}

fn word_of(chunk: &[u8]) -> [u8; 8] {
    chunk.try_into().unwrap_or_default()
}

/// Whether `text[range]` is `key`. Keys are a few bytes: compared here, length first, rather than
/// by a call out to memcmp for every candidate.
fn is_key(text: &[u8], range: &Range<usize>, key: &[u8]) -> bool {
    range.len() == key.len()
        && text
            .get(range.clone())
            .is_some_and(|name| same_bytes(name, key))
}

/// Edits of a JSON header rewrite kept on the stack (more spill to the heap).
const INLINE_EDITS: usize = 8;

/// A piece of a rewritten JSON header.
enum JsonEdit<'a> {
    Bytes(&'a [u8]),
    /// A value, written as a JSON string.
    String(&'a str),
    /// The changes whose keys are missing, as members of the ext object.
    Added {
        after_member: bool,
    },
    /// The same for a header without an ext object: written as a whole `extFields` member.
    ExtObject,
}

/// Sorted by span: an insertion sort, as a relay makes two to four edits.
fn sort_edits(edits: &mut [(Range<usize>, JsonEdit)]) {
    for index in 1..edits.len() {
        let mut at = index;
        while at > 0
            && edits.get(at - 1).map(|(range, _)| (range.start, range.end))
                > edits.get(at).map(|(range, _)| (range.start, range.end))
        {
            edits.swap(at - 1, at);
            at -= 1;
        }
    }
}

fn write_frame(
    serialize_type: SerializeType,
    header: &[u8],
    body: &[u8],
    limits: &FrameLimits,
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    write_frame_parts(serialize_type, [header], body, limits, dst)
}

/// A frame whose header is the concatenation of `header`.
fn write_frame_parts<const N: usize>(
    serialize_type: SerializeType,
    header: [&[u8]; N],
    body: &[u8],
    limits: &FrameLimits,
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    let header_len: usize = header.iter().map(|part| part.len()).sum();
    dst.reserve(4 + HEADER_WORD + header_len + body.len());
    write_frame_head(serialize_type, header, body.len(), limits, dst)?;
    dst.extend_from_slice(body);
    Ok(())
}

/// A frame up to its body (of `body_len` bytes, counted in its length): the body follows.
fn write_frame_head<const N: usize>(
    serialize_type: SerializeType,
    header: [&[u8]; N],
    body_len: usize,
    limits: &FrameLimits,
    dst: &mut BytesMut,
) -> Result<(), CodecError> {
    let header_len: usize = header.iter().map(|part| part.len()).sum();
    let size = 4 + HEADER_WORD + header_len + body_len;
    if size > limits.max_frame || size - 4 > i32::MAX as usize {
        return Err(CodecError::FrameTooLarge {
            size,
            max: limits.max_frame,
        });
    }
    if header_len > limits.max_header.min(MAX_HEADER_FIELD) {
        return Err(CodecError::HeaderTooLarge {
            size: header_len,
            max: limits.max_header.min(MAX_HEADER_FIELD),
        });
    }
    dst.reserve(size - body_len);
    dst.put_u32((size - 4) as u32);
    dst.put_u32((u32::from(serialize_type.to_byte()) << 24) | header_len as u32);
    for part in header {
        dst.extend_from_slice(part);
    }
    Ok(())
}

fn scan_binary(header: Bytes, body: Bytes) -> Option<RawCommand> {
    let bytes = &header[..];
    let fixed = bytes.get(..BINARY_FIXED)?;
    let code = i32::from(i16::from_be_bytes([fixed[0], fixed[1]]));
    let opaque = i32::from_be_bytes(fixed.get(BINARY_OPAQUE)?.try_into().ok()?);
    let flag = i32::from_be_bytes(fixed.get(BINARY_FLAG)?.try_into().ok()?);
    let remark_len = usize::try_from(i32::from_be_bytes(fixed[13..17].try_into().ok()?)).ok()?;
    let mut at = BINARY_FIXED.checked_add(remark_len)?;
    if at > bytes.len() {
        return None;
    }
    let mut fields = FieldList::spare();
    let mut ext_len_at = None;
    if at < bytes.len() {
        let ext_len =
            usize::try_from(i32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?)).ok()?;
        ext_len_at = Some(at);
        at += 4;
        if at.checked_add(ext_len)? != bytes.len() {
            return None;
        }
        while at < bytes.len() {
            let key_len =
                usize::try_from(i16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
                    .ok()?;
            let key = at + 2..at + 2 + key_len;
            let value_len_at = key.end;
            let value_len = usize::try_from(i32::from_be_bytes(
                bytes.get(value_len_at..value_len_at + 4)?.try_into().ok()?,
            ))
            .ok()?;
            let value = value_len_at + 4..value_len_at.checked_add(4 + value_len)?;
            let key_text = std::str::from_utf8(bytes.get(key.clone())?).ok()?;
            let value_text = std::str::from_utf8(bytes.get(value.clone())?).ok()?;
            let kind = if key_text.is_empty() || value_text.is_empty() {
                ValueKind::Absent
            } else {
                ValueKind::Plain
            };
            at = value.end;
            fields.push(Field {
                key,
                value,
                value_len_at,
                kind,
            });
        }
    }
    let letters = index_letters(bytes, &fields)?;
    Some(RawCommand {
        serialize_type: SerializeType::Binary,
        code,
        opaque,
        flag,
        header,
        body,
        opaque_at: BINARY_OPAQUE,
        letters,
        fields,
        ext: ExtPlace::Binary(ext_len_at),
        texts_checked: true,
    })
}

fn scan_json(header: Bytes, body: Bytes) -> Option<RawCommand> {
    // Not checked to be UTF-8 as a whole: bytes pass through as they came, and a value read as
    // text is checked on its own (see `RawCommand::ext`).
    let mut fields = FieldList::spare();
    let top = scan_json_top(&header, Some(&mut fields))?;
    let (ext, letters) = match top.ext {
        Some(ExtObject {
            close,
            members: true,
            letters,
        }) => (ExtPlace::JsonMembers(close), letters),
        Some(ExtObject { close, .. }) => (ExtPlace::JsonEmpty(close), None),
        None => (ExtPlace::JsonMissing(top.object_start), None),
    };
    // Keys given twice inside extFields are refused here, unless the walk proved them distinct.
    let letters = match letters {
        Some(letters) => letters,
        None => index_json_keys(&header, &fields)?,
    };
    Some(RawCommand {
        serialize_type: SerializeType::Json,
        code: top.code,
        opaque: top.opaque,
        flag: top.flag,
        header,
        body,
        opaque_at: top.opaque_at,
        letters,
        fields,
        ext,
        texts_checked: top.ascii,
    })
}

/// The top level of a JSON header.
struct JsonTop {
    code: i32,
    opaque: i32,
    opaque_at: Range<usize>,
    flag: i32,
    /// Right after the opening brace.
    object_start: usize,
    /// Located only when its fields are indexed.
    ext: Option<ExtObject>,
    /// No byte of the header is above 0x7f.
    ascii: bool,
}

/// Reads a JSON header's top level strictly. With `fields`, the ext object's fields are indexed
/// into it; without, the ext object is only checked to be well formed and skipped.
fn scan_json_top(header: &[u8], mut fields: Option<&mut Vec<Field>>) -> Option<JsonTop> {
    let specials = Specials::index(header);
    if let Some(top) = scan_sorted_top(header, fields.as_deref_mut(), &specials) {
        return Some(top);
    }
    if let Some(fields) = fields.as_deref_mut() {
        fields.clear();
    }
    scan_any_top(header, fields, &specials)
}

/// The top level as our encoder, Java's fastjson, jsoncpp and serde write it: no whitespace, and
/// each key once, in sorted order. A key then is known by its first letter and one comparison,
/// and order alone proves it unique. `None` when the header is not written so (or is malformed):
/// [`scan_any_top`] reads it then.
fn scan_sorted_top(
    header: &[u8],
    mut fields: Option<&mut Vec<Field>>,
    specials: &Specials,
) -> Option<JsonTop> {
    let mut scanner = Json::at_start(header, specials);
    if header.first() != Some(&b'{') {
        return None;
    }
    let mut values = TopValues::default();
    let mut at = 1;
    let mut next_rank = 0;
    loop {
        let key = match *header.get(at + 1)? {
            b'c' => TopKey::Code,
            b'e' => TopKey::ExtFields,
            b'f' => TopKey::Flag,
            b'l' => TopKey::Language,
            b'o' => TopKey::Opaque,
            b'r' => TopKey::Remark,
            b's' => TopKey::SerializeType,
            b'v' => TopKey::Version,
            _ => return None,
        };
        let rank = key.sorted_rank();
        let literal = key.quoted_with_colon();
        if rank < next_rank || !same_bytes(header.get(at..at + literal.len())?, literal) {
            return None;
        }
        next_rank = rank + 1;
        scanner.at = at + literal.len();
        values.read(Some(key), &mut scanner, fields.as_deref_mut())?;
        at = scanner.at;
        match *header.get(at)? {
            b',' => at += 1,
            b'}' => break,
            _ => return None,
        }
    }
    if at + 1 != header.len() {
        return None;
    }
    values.finish(1, specials.ascii)
}

/// Reads a JSON header's top level strictly, keys in any order and with any whitespace.
fn scan_any_top(
    header: &[u8],
    mut fields: Option<&mut Vec<Field>>,
    specials: &Specials,
) -> Option<JsonTop> {
    let mut scanner = Json::at_start(header, specials);
    let mut at = skip_space_at(header, 0);
    if *header.get(at)? != b'{' {
        return None;
    }
    let object_start = at + 1;
    at = skip_space_at(header, object_start);
    if *header.get(at)? == b'}' {
        return None;
    }
    let mut values = TopValues::default();
    // The header's own keys are a bit each; any other key is compared with those met before.
    let mut known = 0u8;
    let mut seen = SeenKeys::default();
    loop {
        at = skip_space_at(header, at);
        let (key_end, escaped) = specials.string_end(header, at)?;
        if escaped {
            return None;
        }
        let key = at + 1..key_end - 1;
        let name = header.get(key.clone())?;
        // A key given twice decodes as its last value: not worth following here.
        let top_key = TopKey::of(name);
        let fresh = match top_key {
            Some(top) => {
                let bit = 1u8 << top as u8;
                let fresh = known & bit == 0;
                known |= bit;
                fresh
            }
            None => seen.insert(header, key),
        };
        if !fresh {
            return None;
        }
        at = skip_space_at(header, key_end);
        if *header.get(at)? != b':' {
            return None;
        }
        scanner.at = skip_space_at(header, at + 1);
        values.read(top_key, &mut scanner, fields.as_deref_mut())?;
        at = skip_space_at(header, scanner.at);
        match *header.get(at)? {
            b',' => at += 1,
            b'}' => break,
            _ => return None,
        }
    }
    if skip_space_at(header, at + 1) != header.len() {
        return None;
    }
    values.finish(object_start, specials.ascii)
}

/// The top-level values a relay reads, gathered as a header's members are met.
#[derive(Default)]
struct TopValues {
    code: Option<i32>,
    opaque: Option<(Range<usize>, i32)>,
    flag: Option<i32>,
    ext: Option<ExtObject>,
}

impl TopValues {
    /// Reads the value of the member `key` (`None`: not a header key) at the scanner's place.
    /// Inline: the header walks call it per member, and a call costs them about 5% per scan.
    #[inline(always)]
    fn read(
        &mut self,
        key: Option<TopKey>,
        scanner: &mut Json,
        fields: Option<&mut Vec<Field>>,
    ) -> Option<()> {
        match (key, fields) {
            (Some(TopKey::Code), _) => self.code = Some(scanner.integer()?.1),
            (Some(TopKey::Opaque), _) => self.opaque = Some(scanner.integer()?),
            (Some(TopKey::Flag), _) => self.flag = Some(scanner.integer()?.1),
            (Some(TopKey::ExtFields), Some(fields)) => self.ext = Some(scanner.ext_object(fields)?),
            // A remark or language the relay never reads, but must be well formed to skip.
            _ => {
                scanner.value()?;
            }
        }
        Some(())
    }

    /// The header's top level, once its closing brace is met: `None` without a code or opaque.
    #[inline(always)]
    fn finish(self, object_start: usize, ascii: bool) -> Option<JsonTop> {
        let (opaque_at, opaque) = self.opaque?;
        Some(JsonTop {
            code: self.code?,
            opaque,
            opaque_at,
            flag: self.flag.unwrap_or(0),
            object_start,
            ext: self.ext,
            ascii,
        })
    }
}

/// The keys of a RemotingCommand's JSON header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopKey {
    Code,
    Opaque,
    Flag,
    ExtFields,
    Language,
    Version,
    Remark,
    SerializeType,
}

impl TopKey {
    /// Told apart by length first: one comparison per key, not one per candidate.
    fn of(name: &[u8]) -> Option<Self> {
        let (key, text): (Self, &[u8]) = match name.len() {
            4 if name.first() == Some(&b'c') => (Self::Code, b"code"),
            4 => (Self::Flag, b"flag"),
            6 if name.first() == Some(&b'o') => (Self::Opaque, b"opaque"),
            6 => (Self::Remark, b"remark"),
            7 => (Self::Version, b"version"),
            8 => (Self::Language, b"language"),
            9 => (Self::ExtFields, b"extFields"),
            23 => (Self::SerializeType, b"serializeTypeCurrentRPC"),
            _ => return None,
        };
        same_bytes(name, text).then_some(key)
    }

    /// Where the key comes in a header whose keys are sorted.
    fn sorted_rank(self) -> usize {
        match self {
            Self::Code => 0,
            Self::ExtFields => 1,
            Self::Flag => 2,
            Self::Language => 3,
            Self::Opaque => 4,
            Self::Remark => 5,
            Self::SerializeType => 6,
            Self::Version => 7,
        }
    }

    /// The key as a member starts: quoted, then its colon.
    fn quoted_with_colon(self) -> &'static [u8] {
        match self {
            Self::Code => b"\"code\":",
            Self::ExtFields => b"\"extFields\":",
            Self::Flag => b"\"flag\":",
            Self::Language => b"\"language\":",
            Self::Opaque => b"\"opaque\":",
            Self::Remark => b"\"remark\":",
            Self::SerializeType => b"\"serializeTypeCurrentRPC\":",
            Self::Version => b"\"version\":",
        }
    }
}

struct ExtObject {
    /// Where its closing brace sits.
    close: usize,
    members: bool,
    /// The `letters` index, when the walk already proved every key a distinct letter.
    letters: Option<[u16; LETTERS]>,
}

/// A strict JSON reader over a header: only what a value needs to be skipped or located.
/// Keys met so far in one object, to refuse one given twice, without allocating. One-byte keys
/// (Java's compact ext field names `a` to `n`) are a bit each; up to [`LONGER_KEYS`] longer ones
/// are compared (an object with more is declined, for the full decoder).
#[derive(Default)]
struct SeenKeys {
    single: [u64; 4],
    longer: [(usize, usize); LONGER_KEYS],
    longer_count: usize,
}

const LONGER_KEYS: usize = 24;

impl SeenKeys {
    /// Records the key at `key` in `text`; `false` if it was already there (or no room is left).
    fn insert(&mut self, text: &[u8], key: Range<usize>) -> bool {
        let Some(name) = text.get(key.clone()) else {
            return false;
        };
        if let [byte] = name {
            let (word, bit) = (usize::from(*byte / 64), 1u64 << (*byte % 64));
            let Some(word) = self.single.get_mut(word) else {
                return false;
            };
            let fresh = *word & bit == 0;
            *word |= bit;
            return fresh;
        }
        let seen = self.longer.get(..self.longer_count).unwrap_or_default();
        if seen
            .iter()
            .any(|&(start, end)| is_key(text, &(start..end), name))
        {
            return false;
        }
        let Some(slot) = self.longer.get_mut(self.longer_count) else {
            return false;
        };
        *slot = (key.start, key.end);
        self.longer_count += 1;
        true
    }
}

/// A word with the high bit set in each byte that is a quote, a backslash or below 0x20 (the
/// classic has-zero-byte and has-byte-less-than tricks). A byte above a flagged one may be
/// flagged falsely; the lowest flag is always true.
fn special_bytes(word: u64) -> u64 {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let quote = word ^ (ONES * u64::from(b'"'));
    let backslash = word ^ (ONES * u64::from(b'\\'));
    zero(quote) | zero(backslash) | (word.wrapping_sub(ONES * 0x20) & !word & HIGHS)
}

/// Where the first quote, backslash or control byte at or after `at` sits (`None`: nowhere).
/// Eight bytes at a time while eight are left, so a short key or value costs one word.
fn next_special(bytes: &[u8], mut at: usize) -> Option<usize> {
    while let Some(word) = bytes.get(at..at + 8) {
        let found = special_bytes(u64::from_le_bytes(word.try_into().ok()?));
        if found != 0 {
            // Read as little-endian, the lowest flagged byte is the first special one.
            return Some(at + (found.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    let tail = bytes.get(at..)?;
    tail.iter()
        .position(|&byte| byte == b'"' || byte == b'\\' || byte < 0x20)
        .map(|offset| at + offset)
}

/// The end (past the closing quote) of the string token whose opening quote is at `start`, and
/// whether it holds escapes.
fn string_end(bytes: &[u8], start: usize) -> Option<(usize, bool)> {
    if bytes.get(start) != Some(&b'"') {
        return None;
    }
    let mut at = start + 1;
    let mut escaped = false;
    loop {
        at = next_special(bytes, at)?;
        match *bytes.get(at)? {
            b'"' => return Some((at + 1, escaped)),
            b'\\' => {
                escaped = true;
                at = escape_end(bytes, at)?;
            }
            _ => return None,
        }
    }
}

/// Headers up to this long get a [`Specials`] index; longer ones (rare) are scanned string by
/// string.
const INDEXED_HEADER: usize = 1024;
const BLOCK: usize = 64;
const INDEX_WORDS: usize = INDEXED_HEADER / BLOCK;
/// What one SSE2 compare covers.
const CHUNK: usize = 16;

/// One bit per header byte that is a quote, a backslash or a control byte, found 16 bytes at a
/// time before the header is read: finding a string's end is then a bit scan, whatever its
/// length, rather than a loop per string.
struct Specials {
    /// Bit `i % 64` of word `i / 64` is byte `i`; bytes past the header's end are marked (as
    /// control bytes), so a scan never runs off it unnoticed.
    words: [u64; INDEX_WORDS],
    indexed: bool,
    /// No byte is above 0x7f.
    ascii: bool,
}

impl Specials {
    fn index(header: &[u8]) -> Self {
        if header.len() > INDEXED_HEADER {
            return Self {
                words: [0; INDEX_WORDS],
                indexed: false,
                ascii: header.is_ascii(),
            };
        }
        // Words past the header's end stay marked.
        let mut words = [u64::MAX; INDEX_WORDS];
        let mut high = 0;
        let mut blocks = header.chunks_exact(BLOCK);
        for (word, block) in words.iter_mut().zip(blocks.by_ref()) {
            let Ok(block) = <&[u8; BLOCK]>::try_from(block) else {
                break;
            };
            let (specials, above) = special_mask(block);
            *word = specials;
            high |= above;
        }
        let tail = blocks.remainder().len();
        if tail > 0 {
            // The last 64 bytes, read again where they overlap the block before: no copy. The
            // bits past the header's end are marked.
            let (specials, above) = match header
                .len()
                .checked_sub(BLOCK)
                .and_then(|start| <&[u8; BLOCK]>::try_from(header.get(start..)?).ok())
            {
                Some(last) => {
                    let (specials, above) = special_mask(last);
                    (specials >> (BLOCK - tail), above)
                }
                None => {
                    let mut padded = [0u8; BLOCK];
                    if let Some(start) = padded.get_mut(..tail) {
                        start.copy_from_slice(blocks.remainder());
                    }
                    special_mask(&padded)
                }
            };
            if let Some(word) = words.get_mut(header.len() / BLOCK) {
                *word = specials | (u64::MAX << tail);
            }
            high |= above;
        }
        Self {
            words,
            indexed: true,
            ascii: high == 0,
        }
    }

    /// The first marked byte at or after `at` (`None`: past the header).
    #[inline]
    fn next(&self, at: usize) -> Option<usize> {
        let mut index = at / 64;
        let mut word = self.words.get(index)? & (u64::MAX << (at % 64));
        loop {
            if word != 0 {
                return Some(index * 64 + word.trailing_zeros() as usize);
            }
            index += 1;
            word = *self.words.get(index)?;
        }
    }

    /// [`string_end`], with the index when there is one. The common string (no escape, its
    /// closing quote in the same word) is inline: a bit scan and two byte checks.
    #[inline(always)]
    fn string_end(&self, bytes: &[u8], start: usize) -> Option<(usize, bool)> {
        if self.indexed && bytes.get(start) == Some(&b'"') {
            let after = start + 1;
            let word =
                self.words.get(after / 64).copied().unwrap_or(0) & (u64::MAX << (after % 64));
            if word != 0 {
                let at = (after / 64) * 64 + word.trailing_zeros() as usize;
                if bytes.get(at) == Some(&b'"') {
                    return Some((at + 1, false));
                }
            }
        }
        self.string_end_slow(bytes, start)
    }

    #[inline(never)]
    fn string_end_slow(&self, bytes: &[u8], start: usize) -> Option<(usize, bool)> {
        if !self.indexed {
            return string_end(bytes, start);
        }
        if bytes.get(start) != Some(&b'"') {
            return None;
        }
        let mut at = start + 1;
        let mut escaped = false;
        loop {
            at = self.next(at)?;
            match *bytes.get(at)? {
                b'"' => return Some((at + 1, escaped)),
                b'\\' => {
                    escaped = true;
                    at = escape_end(bytes, at)?;
                }
                _ => return None,
            }
        }
    }
}

/// Bit `i` set when byte `i` of `block` is a quote, a backslash or below 0x20; and a second mask
/// that is not zero when any byte is above 0x7f.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[inline]
fn special_mask(block: &[u8; BLOCK]) -> (u64, u16) {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8, _mm_setzero_si128,
    };
    let mut specials = 0u64;
    // SAFETY: the cfg above makes SSE2 present, and each unaligned load reads 16 of the 64
    // bytes `block` borrows.
    unsafe {
        let quote = _mm_set1_epi8(b'"' as i8);
        let backslash = _mm_set1_epi8(b'\\' as i8);
        // Unsigned `byte <= 0x1f` is `max(byte, 0x1f) == 0x1f`.
        let below = _mm_set1_epi8(0x1f);
        let mut high = _mm_setzero_si128();
        for (index, chunk) in block.chunks_exact(CHUNK).enumerate() {
            let bytes = _mm_loadu_si128(chunk.as_ptr().cast());
            let marked = _mm_or_si128(
                _mm_or_si128(
                    _mm_cmpeq_epi8(bytes, quote),
                    _mm_cmpeq_epi8(bytes, backslash),
                ),
                _mm_cmpeq_epi8(_mm_max_epu8(bytes, below), below),
            );
            specials |= u64::from(_mm_movemask_epi8(marked) as u16) << (index * CHUNK);
            high = _mm_or_si128(high, bytes);
        }
        // The sign bit of each byte is its bit 7.
        (specials, _mm_movemask_epi8(high) as u16)
    }
}

/// Bit `i` set when byte `i` of `block` is a quote, a backslash or below 0x20; and a second mask
/// that is not zero when any byte is above 0x7f.
#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
fn special_mask(block: &[u8; BLOCK]) -> (u64, u16) {
    block
        .iter()
        .enumerate()
        .fold((0, 0), |(specials, high), (index, &byte)| {
            let special = byte == b'"' || byte == b'\\' || byte < 0x20;
            (
                specials | u64::from(special) << index,
                high | u16::from(byte > 0x7f),
            )
        })
}

/// Past the escape sequence whose backslash is at `at`; `None` when it is not a valid one.
#[inline]
fn escape_end(bytes: &[u8], at: usize) -> Option<usize> {
    match *bytes.get(at + 1)? {
        b'u' => {
            let digits = bytes.get(at + 2..at + 6)?;
            digits.iter().all(u8::is_ascii_hexdigit).then_some(at + 6)
        }
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(at + 2),
        _ => None,
    }
}

/// Past any JSON whitespace at `at`.
fn skip_space_at(bytes: &[u8], mut at: usize) -> usize {
    // Compact JSON has none: one comparison in the common case.
    while bytes
        .get(at)
        .is_some_and(|&byte| byte <= b' ' && byte.is_ascii_whitespace())
    {
        at += 1;
    }
    at
}

struct Json<'a> {
    bytes: &'a [u8],
    at: usize,
    specials: &'a Specials,
}

impl<'a> Json<'a> {
    fn at_start(bytes: &'a [u8], specials: &'a Specials) -> Self {
        Self {
            bytes,
            at: 0,
            specials,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    /// A string token; the range covers the quotes; `true` when it holds escapes.
    fn string(&mut self) -> Option<(Range<usize>, bool)> {
        let start = self.at;
        let (end, escaped) = self.specials.string_end(self.bytes, start)?;
        self.at = end;
        Some((start..end, escaped))
    }

    /// An i32 number token (no fraction or exponent) and its range.
    fn integer(&mut self) -> Option<(Range<usize>, i32)> {
        let start = self.at;
        if self.peek()? == b'-' {
            self.at += 1;
        }
        while self.peek().is_some_and(|byte| byte.is_ascii_digit()) {
            self.at += 1;
        }
        let text = self.bytes.get(start..self.at)?;
        let (negative, digits) = match text.split_first() {
            Some((b'-', digits)) => (true, digits),
            _ => (false, text),
        };
        // JSON allows neither a fraction here (an i32 field) nor leading zeros.
        if digits.is_empty()
            || matches!(self.peek(), Some(b'.' | b'e' | b'E'))
            || (digits.len() > 1 && digits.first() == Some(&b'0'))
        {
            return None;
        }
        // Accumulated negative, so that i32::MIN fits.
        let mut value: i32 = 0;
        for digit in digits {
            value = value
                .checked_mul(10)?
                .checked_sub(i32::from(digit - b'0'))?;
        }
        let value = if negative {
            value
        } else {
            value.checked_neg()?
        };
        Some((start..self.at, value))
    }

    /// Any value, skipped; returns its kind as an ext value.
    fn value(&mut self) -> Option<ValueKind> {
        match self.peek()? {
            b'"' => {
                let (_, escaped) = self.string()?;
                Some(if escaped {
                    ValueKind::Opaque
                } else {
                    ValueKind::Plain
                })
            }
            b'{' | b'[' => {
                self.nested()?;
                Some(ValueKind::Opaque)
            }
            b'n' => {
                self.literal(b"null")?;
                Some(ValueKind::Absent)
            }
            b't' => self.literal(b"true").map(|()| ValueKind::Opaque),
            b'f' => self.literal(b"false").map(|()| ValueKind::Opaque),
            b'-' | b'0'..=b'9' => {
                self.at += 1;
                while self
                    .peek()
                    .is_some_and(|byte| byte.is_ascii_digit() || b".eE+-".contains(&byte))
                {
                    self.at += 1;
                }
                Some(ValueKind::Opaque)
            }
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at.checked_add(word.len())?;
        (self.bytes.get(self.at..end)? == word).then(|| self.at = end)
    }

    /// An object or array, skipped with strings honoured.
    fn nested(&mut self) -> Option<()> {
        let bytes = self.bytes;
        let mut at = self.at;
        let mut depth = 0usize;
        loop {
            match *bytes.get(at)? {
                b'"' => {
                    at = self.specials.string_end(bytes, at)?.0;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        self.at = at + 1;
                        return Some(());
                    }
                }
                _ => {}
            }
            at += 1;
        }
    }

    /// The ext object's members indexed into `fields` (keys given twice are looked for once
    /// all are in: see [`index_json_keys`]).
    fn ext_object(&mut self, fields: &mut Vec<Field>) -> Option<ExtObject> {
        if let Some(ext) = self.letter_ext_object(fields) {
            return Some(ext);
        }
        fields.clear();
        self.any_ext_object(fields)
    }

    /// An ext object as Java's compact send header (`SendMessageRequestHeaderV2`) is written:
    /// one-letter keys in ascending order, string values, no whitespace. A key is then one
    /// four-byte comparison (`"a":`), and its order proves it unique. `None` when the object is
    /// written any other way, for [`Json::any_ext_object`] to read; `fields` may hold some
    /// members then.
    fn letter_ext_object(&mut self, fields: &mut Vec<Field>) -> Option<ExtObject> {
        let bytes = self.bytes;
        let mut at = self.at;
        if bytes.get(at) != Some(&b'{') {
            return None;
        }
        at += 1;
        let mut last = 0;
        let mut letters = [0u16; LETTERS];
        loop {
            let &[b'"', letter, b'"', b':', b'"'] = bytes.get(at..at + 5)? else {
                return None;
            };
            if !letter.is_ascii_lowercase() || letter <= last {
                return None;
            }
            last = letter;
            let start = at + 4;
            let (end, escaped) = self.specials.string_end(bytes, start)?;
            fields.push(Field {
                key: at + 1..at + 2,
                value: start..end,
                value_len_at: 0,
                kind: if escaped {
                    ValueKind::Opaque
                } else {
                    ValueKind::Plain
                },
            });
            if let Some(slot) = letters.get_mut(usize::from(letter - b'a')) {
                *slot = u16::try_from(fields.len()).ok()?;
            }
            match bytes.get(end) {
                Some(b',') => at = end + 1,
                Some(b'}') => {
                    self.at = end + 1;
                    return Some(ExtObject {
                        close: end,
                        members: true,
                        letters: Some(letters),
                    });
                }
                _ => return None,
            }
        }
    }

    /// The ext object's members, written any way JSON allows: read with the position in a
    /// local, with one call per string.
    fn any_ext_object(&mut self, fields: &mut Vec<Field>) -> Option<ExtObject> {
        let bytes = self.bytes;
        let mut at = self.at;
        if *bytes.get(at)? != b'{' {
            // `"extFields":null` would need a member replaced, not extended: decode in full.
            return None;
        }
        at = skip_space_at(bytes, at + 1);
        if *bytes.get(at)? == b'}' {
            self.at = at + 1;
            return Some(ExtObject {
                close: at,
                members: false,
                letters: None,
            });
        }
        loop {
            at = skip_space_at(bytes, at);
            let (key_end, escaped) = self.specials.string_end(bytes, at)?;
            if escaped {
                return None;
            }
            let key = at + 1..key_end - 1;
            at = skip_space_at(bytes, key_end);
            if *bytes.get(at)? != b':' {
                return None;
            }
            at = skip_space_at(bytes, at + 1);
            let start = at;
            let kind = if *bytes.get(at)? == b'"' {
                let (end, escaped) = self.specials.string_end(bytes, at)?;
                at = end;
                if escaped {
                    ValueKind::Opaque
                } else {
                    ValueKind::Plain
                }
            } else {
                self.at = at;
                let kind = self.value()?;
                at = self.at;
                kind
            };
            fields.push(Field {
                key,
                value: start..at,
                value_len_at: 0,
                kind,
            });
            at = skip_space_at(bytes, at);
            match *bytes.get(at)? {
                b',' => at += 1,
                b'}' => {
                    self.at = at + 1;
                    return Some(ExtObject {
                        close: at,
                        members: true,
                        letters: None,
                    });
                }
                _ => return None,
            }
        }
    }
}

/// What a writer sends: a decoded command to encode, or a relayed one as bytes.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Command(RemotingCommand),
    Raw(RawCommand),
    /// A broker's response relayed to its client: written with the client's opaque (the second
    /// field) in place of the upstream one.
    Answer(RawHead, i32),
    /// A rewritten header and the original body: a relayed request on its way.
    Spliced {
        serialize_type: SerializeType,
        code: i32,
        header: Bytes,
        body: Bytes,
    },
}

impl Outgoing {
    /// The request or response code.
    pub fn code(&self) -> i32 {
        match self {
            Outgoing::Command(command) => command.code,
            Outgoing::Raw(raw) => raw.code,
            Outgoing::Answer(head, _) => head.code,
            Outgoing::Spliced { code, .. } => *code,
        }
    }
}

impl From<RemotingCommand> for Outgoing {
    fn from(command: RemotingCommand) -> Self {
        Outgoing::Command(command)
    }
}

impl From<RawCommand> for Outgoing {
    fn from(raw: RawCommand) -> Self {
        Outgoing::Raw(raw)
    }
}

impl tokio_util::codec::Encoder<Outgoing> for frame::RemotingCodec {
    type Error = CodecError;

    fn encode(&mut self, item: Outgoing, dst: &mut BytesMut) -> Result<(), CodecError> {
        match item {
            Outgoing::Command(command) => frame::encode_frame(&command, &self.limits(), dst),
            Outgoing::Raw(raw) => raw.encode(&self.limits(), dst),
            Outgoing::Answer(raw, opaque) => raw.write_with_opaque(opaque, &self.limits(), dst),
            Outgoing::Spliced {
                serialize_type,
                header,
                body,
                ..
            } => write_frame(serialize_type, &header, &body, &self.limits(), dst),
        }
    }
}

#[cfg(test)]
mod tests;
