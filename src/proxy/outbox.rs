//! Bytes queued for one socket. Frame heads are copied into one buffer; a large body is kept by
//! reference (a slice of the buffer it was read into) and goes out in the same vectored write, so
//! a relayed send's body is never copied in user space.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// Bodies at least this long are written from where they were read; shorter ones are copied
/// next to their head (a copy is cheaper than a slot in the write).
const BY_REFERENCE: usize = 512;

/// Pieces handed to one vectored write.
pub const WRITE_PIECES: usize = 64;

#[derive(Default)]
pub struct Outbox {
    /// Heads and short bodies, in order; a body kept by reference goes where its offset says.
    staging: BytesMut,
    /// Bytes of `staging` already written.
    staged_written: usize,
    /// Bodies kept by reference, each with the offset in `staging` it is written at (the staged
    /// bytes before it go first); offsets never decrease.
    bodies: VecDeque<(usize, Bytes)>,
    /// Bytes of `bodies` not yet written.
    bodies_len: usize,
}

/// Written staged bytes are dropped from the buffer's front once this many gathered while
/// bodies still wait (otherwise the whole buffer is reset when all was written).
const COMPACT_AFTER: usize = 32 * 1024;

impl Outbox {
    pub fn len(&self) -> usize {
        self.staging.len() - self.staged_written + self.bodies_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The buffer the next head is appended to.
    pub fn heads(&mut self) -> &mut BytesMut {
        &mut self.staging
    }

    /// Queues `body` after what is queued.
    pub fn push_body(&mut self, body: &Bytes) {
        if body.len() < BY_REFERENCE {
            self.staging.extend_from_slice(body);
            return;
        }
        self.bodies_len += body.len();
        self.bodies.push_back((self.staging.len(), body.clone()));
    }

    /// The queued bytes in order, as up to [`WRITE_PIECES`] slices; how many were filled.
    pub fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>; WRITE_PIECES]) -> usize {
        let mut count = 0;
        let mut at = self.staged_written;
        let mut put = |piece: &'a [u8], count: &mut usize| {
            if piece.is_empty() {
                return true;
            }
            match slices.get_mut(*count) {
                Some(slot) => {
                    *slot = IoSlice::new(piece);
                    *count += 1;
                    true
                }
                None => false,
            }
        };
        for (offset, body) in &self.bodies {
            let staged = self.staging.get(at..*offset).unwrap_or_default();
            if !put(staged, &mut count) || !put(body, &mut count) {
                return count;
            }
            at = at.max(*offset);
        }
        put(self.staging.get(at..).unwrap_or_default(), &mut count);
        count
    }

    /// Drops the first `written` bytes (taken by the socket).
    pub fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let staged_end = self
                .bodies
                .front()
                .map_or(self.staging.len(), |(offset, _)| *offset);
            if self.staged_written < staged_end {
                let taken = written.min(staged_end - self.staged_written);
                self.staged_written += taken;
                written -= taken;
                continue;
            }
            let Some((_, body)) = self.bodies.front_mut() else {
                break;
            };
            let taken = written.min(body.len());
            body.advance(taken);
            self.bodies_len -= taken;
            written -= taken;
            if body.is_empty() {
                self.bodies.pop_front();
            }
        }
        if self.bodies.is_empty() && self.staged_written == self.staging.len() {
            // All written: the buffer is reused from its start.
            self.staging.clear();
            self.staged_written = 0;
        } else if self.staged_written >= COMPACT_AFTER {
            self.staging.advance(self.staged_written);
            for (offset, _) in &mut self.bodies {
                *offset -= self.staged_written;
            }
            self.staged_written = 0;
        }
    }

    pub fn clear(&mut self) {
        self.bodies.clear();
        self.bodies_len = 0;
        self.staging.clear();
        self.staged_written = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(outbox: &Outbox) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); WRITE_PIECES];
        let count = outbox.slices(&mut slices);
        slices[..count]
            .iter()
            .flat_map(|slice| slice.to_vec())
            .collect()
    }

    #[test]
    fn heads_and_bodies_come_out_in_order_across_partial_writes() {
        let mut outbox = Outbox::default();
        let big = Bytes::from(vec![b'b'; BY_REFERENCE]);
        let mut expected = Vec::new();
        for round in 0..3u8 {
            outbox.heads().extend_from_slice(&[b'h', round]);
            outbox.push_body(&big);
            outbox.heads().extend_from_slice(&[b's', round]);
            outbox.push_body(&Bytes::from_static(b"short"));
            expected.extend_from_slice(&[b'h', round]);
            expected.extend_from_slice(&big);
            expected.extend_from_slice(&[b's', round]);
            expected.extend_from_slice(b"short");
        }
        assert_eq!(outbox.len(), expected.len());
        assert_eq!(queued(&outbox), expected);
        // Writes that stop mid-head, mid-body and at a boundary.
        for step in [1, BY_REFERENCE, 7, 2, BY_REFERENCE + 10] {
            outbox.advance(step);
            expected.drain(..step);
            assert_eq!(outbox.len(), expected.len());
            assert_eq!(queued(&outbox), expected);
        }
        outbox.advance(expected.len());
        assert!(outbox.is_empty());
        assert!(queued(&outbox).is_empty());
    }

    /// Random heads, short and long bodies and partial writes, against a plain byte queue; long
    /// runs cross the compaction of written heads.
    #[test]
    fn any_mix_of_pushes_and_writes_keeps_the_byte_order() {
        let mut outbox = Outbox::default();
        let mut model: std::collections::VecDeque<u8> = std::collections::VecDeque::new();
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |bound: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % bound as u64) as usize
        };
        for step in 0..20_000usize {
            let fill = (step % 251) as u8;
            match next(4) {
                0 => {
                    let head = vec![fill; 1 + next(3000)];
                    outbox.heads().extend_from_slice(&head);
                    model.extend(&head);
                }
                1 => {
                    let body = Bytes::from(vec![fill.wrapping_add(1); next(2 * BY_REFERENCE)]);
                    outbox.push_body(&body);
                    model.extend(&body[..]);
                }
                _ => {
                    let written = next(outbox.len() + 1);
                    outbox.advance(written);
                    model.drain(..written);
                }
            }
            assert_eq!(outbox.len(), model.len(), "step {step}");
            let queued = queued(&outbox);
            assert!(
                model.iter().take(queued.len()).eq(queued.iter()),
                "step {step}: the slices are the queue's first bytes"
            );
        }
    }
}
