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
    /// Queued before `staging`.
    chunks: VecDeque<Bytes>,
    chunks_len: usize,
    /// Where heads (and short bodies) are written; always the last bytes queued.
    staging: BytesMut,
}

impl Outbox {
    pub fn len(&self) -> usize {
        self.chunks_len + self.staging.len()
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
        if !self.staging.is_empty() {
            let heads = self.staging.split().freeze();
            self.chunks_len += heads.len();
            self.chunks.push_back(heads);
        }
        self.chunks_len += body.len();
        self.chunks.push_back(body.clone());
    }

    /// The queued bytes in order, as up to [`WRITE_PIECES`] slices; how many were filled.
    pub fn slices<'a>(&'a self, slices: &mut [IoSlice<'a>; WRITE_PIECES]) -> usize {
        let pieces = self
            .chunks
            .iter()
            .map(|chunk| &chunk[..])
            .chain(std::iter::once(&self.staging[..]))
            .filter(|piece| !piece.is_empty());
        let mut count = 0;
        for (slot, piece) in slices.iter_mut().zip(pieces) {
            *slot = IoSlice::new(piece);
            count += 1;
        }
        count
    }

    /// Drops the first `written` bytes (taken by the socket).
    pub fn advance(&mut self, mut written: usize) {
        while written > 0 {
            let Some(front) = self.chunks.front_mut() else {
                let taken = written.min(self.staging.len());
                self.staging.advance(taken);
                return;
            };
            let taken = written.min(front.len());
            front.advance(taken);
            self.chunks_len -= taken;
            written -= taken;
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
    }

    pub fn clear(&mut self) {
        self.chunks.clear();
        self.chunks_len = 0;
        self.staging.clear();
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
}
