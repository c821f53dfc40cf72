//! Reads remoting frames from a peer with three protections the plain codec lacks: the buffer
//! grows with the bytes that arrived (a peer announcing 16 MiB and sending 8 bytes costs 8 bytes
//! plus a few KiB), bytes of unfinished frames count against a process-wide budget, and a
//! connection closes when idle too long between frames or when one frame takes too long to arrive.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use super::BufferBudget;
use crate::remoting::RemotingCommand;
use crate::remoting::frame::{self, CodecError, FrameLimits};

/// Most room a buffer holds beyond the bytes received.
const READ_CHUNK: usize = 64 * 1024;
/// A buffer with less free room than this is grown before the next read, by at least this.
const MIN_FREE: usize = 4 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    pub frame: FrameLimits,
    /// Close a connection after this long without a byte, unless it has requests in flight.
    pub idle_timeout: Duration,
    /// A frame must arrive whole within this long of its first byte.
    pub frame_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("idle for {0:?} with nothing in flight")]
    Idle(Duration),
    #[error("frame not complete within {timeout:?}: {have} bytes of it arrived")]
    FrameTimeout { timeout: Duration, have: usize },
    #[error("the process-wide budget of {max} bytes for unfinished frames is used up")]
    BudgetExhausted { max: usize },
}

impl ReadError {
    /// Whether the peer simply went away: worth a debug line, not a warning.
    pub fn is_closed_connection(&self) -> bool {
        matches!(self, ReadError::Codec(error) if error.is_closed_connection())
    }

    /// Whether the stream position is lost and the connection must close; other errors consumed
    /// exactly one bad frame.
    pub fn is_fatal(&self) -> bool {
        match self {
            ReadError::Codec(error) => error.is_fatal(),
            _ => true,
        }
    }
}

pub struct FrameReader<R> {
    io: R,
    buffer: BytesMut,
    limits: ReadLimits,
    budget: Arc<BufferBudget>,
    /// Bytes of `buffer` currently charged to `budget`.
    charged: usize,
    /// When the first byte of the frame now in the buffer arrived.
    frame_started: Option<Instant>,
    last_read: Instant,
    /// Twice what the last read brought when it filled all the room it had (more was waiting),
    /// else 0: the next read may then take that much, so a busy connection reads in large
    /// batches while memory still follows the bytes received.
    wanted: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, limits: ReadLimits, budget: Arc<BufferBudget>) -> Self {
        Self {
            io,
            buffer: BytesMut::new(),
            limits,
            budget,
            charged: 0,
            frame_started: None,
            last_read: Instant::now(),
            wanted: 0,
        }
    }

    /// When the last bytes arrived: the arrival time of every frame they completed.
    pub fn last_read(&self) -> Instant {
        self.last_read
    }

    /// The next command, `None` at a clean end of stream. `busy` tells whether the connection has
    /// requests in flight (a parked long poll keeps a quiet connection open).
    pub async fn next(
        &mut self,
        busy: impl Fn() -> bool,
    ) -> Option<Result<RemotingCommand, ReadError>> {
        let frame = self.next_frame(busy).await?;
        Some(
            frame.and_then(|bytes| {
                frame::decode_frame(bytes, &self.limits.frame).map_err(Into::into)
            }),
        )
    }

    /// The next frame's bytes (without the length prefix), undecoded: for a relay that reads
    /// only what it needs.
    pub async fn next_frame(
        &mut self,
        busy: impl Fn() -> bool,
    ) -> Option<Result<bytes::Bytes, ReadError>> {
        loop {
            if let Some(frame) = self.buffered_frame() {
                return Some(frame);
            }
            match self.fill(&busy).await {
                Ok(true) => {}
                Ok(false) if self.buffer.is_empty() => return None,
                Ok(false) => {
                    return Some(Err(CodecError::Truncated {
                        have: self.buffer.len(),
                        need: self.announced_size().unwrap_or(4),
                    }
                    .into()));
                }
                Err(error) => return Some(Err(error)),
            }
        }
    }

    /// The next frame if it is already whole in the buffer; `None` when more bytes must be read
    /// first. Lets a caller handle every frame one read brought before it waits on anything.
    pub fn buffered_frame(&mut self) -> Option<Result<bytes::Bytes, ReadError>> {
        match frame::split_frame(&mut self.buffer, &self.limits.frame) {
            Ok(Some(bytes)) => {
                self.settle_charge();
                // What is left arrived with the last read: no clock read per frame.
                self.frame_started = (!self.buffer.is_empty()).then_some(self.last_read);
                Some(Ok(bytes))
            }
            Ok(None) => None,
            Err(error) => Some(Err(error.into())),
        }
    }

    /// The whole size of the frame at the front of the buffer, once its length prefix arrived.
    fn announced_size(&self) -> Option<usize> {
        let prefix = self.buffer.get(..4)?;
        let length = i32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        usize::try_from(length).ok()?.checked_add(4)
    }

    /// Reads more bytes; `false` at end of stream.
    async fn fill(&mut self, busy: &impl Fn() -> bool) -> Result<bool, ReadError> {
        let free = self.buffer.capacity() - self.buffer.len();
        if free < MIN_FREE {
            let missing = self
                .announced_size()
                .map_or(MIN_FREE, |size| size.saturating_sub(self.buffer.len()));
            // Doubling with what arrived keeps memory within twice the bytes received.
            let ahead = self
                .buffer
                .len()
                .max(self.wanted)
                .clamp(MIN_FREE, READ_CHUNK);
            self.buffer
                .reserve(missing.max(self.wanted).clamp(MIN_FREE, ahead));
        }
        let room = self.buffer.capacity() - self.buffer.len();
        loop {
            let deadline = match self.frame_started {
                Some(started) => started + self.limits.frame_timeout,
                None => self.last_read + self.limits.idle_timeout,
            };
            let read = tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.buffer)).await;
            match read {
                Ok(Ok(0)) => return Ok(false),
                Ok(Ok(read)) => {
                    self.wanted = if read >= room {
                        read.saturating_mul(2)
                    } else {
                        0
                    };
                    self.last_read = Instant::now();
                    self.frame_started.get_or_insert(self.last_read);
                    let unpaid = self.buffer.len().saturating_sub(self.charged);
                    if !self.budget.try_charge(unpaid) {
                        return Err(ReadError::BudgetExhausted {
                            max: self.budget.max(),
                        });
                    }
                    self.charged += unpaid;
                    return Ok(true);
                }
                Ok(Err(error)) => return Err(CodecError::Io(error).into()),
                Err(_elapsed) if self.frame_started.is_some() => {
                    return Err(ReadError::FrameTimeout {
                        timeout: self.limits.frame_timeout,
                        have: self.buffer.len(),
                    });
                }
                Err(_elapsed) if busy() => self.last_read = Instant::now(),
                Err(_elapsed) => return Err(ReadError::Idle(self.limits.idle_timeout)),
            }
        }
    }

    /// After a frame left the buffer, only what remains stays charged.
    fn settle_charge(&mut self) {
        let remaining = self.buffer.len();
        if remaining < self.charged {
            self.budget.release(self.charged - remaining);
            self.charged = remaining;
        }
    }
}

impl<R> Drop for FrameReader<R> {
    fn drop(&mut self) {
        self.budget.release(self.charged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remoting::{RemotingCodec, RequestCode};
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::Encoder;

    fn limits(idle_ms: u64, frame_ms: u64) -> ReadLimits {
        ReadLimits {
            frame: FrameLimits::default(),
            idle_timeout: Duration::from_millis(idle_ms),
            frame_timeout: Duration::from_millis(frame_ms),
        }
    }

    fn encoded(opaque: i32) -> BytesMut {
        let mut bytes = BytesMut::new();
        RemotingCodec::default()
            .encode(
                RemotingCommand::request(RequestCode::HEART_BEAT, opaque).with_body(&b"{}"[..]),
                &mut bytes,
            )
            .expect("encode");
        bytes
    }

    #[tokio::test(start_paused = true)]
    async fn an_announced_frame_costs_only_the_bytes_that_arrived_and_times_out() {
        let (mut peer, ours) = tokio::io::duplex(1024);
        let budget = Arc::new(BufferBudget::new(1 << 30));
        let mut reader = FrameReader::new(ours, limits(60_000, 1_000), budget.clone());
        peer.write_all(&(16 * 1024 * 1024 - 4u32).to_be_bytes())
            .await
            .expect("write");
        let outcome = reader.next(|| false).await;
        assert!(
            matches!(outcome, Some(Err(ReadError::FrameTimeout { have: 4, .. }))),
            "{outcome:?}"
        );
        assert!(
            reader.buffer.capacity() <= 2 * MIN_FREE,
            "a few KiB, not the 16 MiB announced"
        );
        assert_eq!(budget.used(), 4);
        drop(reader);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn frames_are_read_whole_and_idle_waits_while_busy() {
        let (mut peer, ours) = tokio::io::duplex(1 << 16);
        let budget = Arc::new(BufferBudget::new(1 << 20));
        let mut reader = FrameReader::new(ours, limits(1_000, 1_000), budget.clone());
        let mut two = encoded(1);
        two.extend_from_slice(&encoded(2));
        peer.write_all(&two).await.expect("write");
        for opaque in [1, 2] {
            let command = reader.next(|| false).await.expect("frame").expect("ok");
            assert_eq!(command.opaque, opaque);
        }
        assert_eq!(budget.used(), 0, "complete frames are no longer charged");
        let busy_until = Instant::now() + Duration::from_millis(3_500);
        let outcome = reader.next(|| Instant::now() < busy_until).await;
        assert!(
            matches!(outcome, Some(Err(ReadError::Idle(_)))),
            "{outcome:?}"
        );
        assert!(Instant::now() >= busy_until, "no idle close while busy");
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_frame_is_cut_by_the_frame_timeout() {
        let (mut peer, ours) = tokio::io::duplex(1024);
        let budget = Arc::new(BufferBudget::new(1 << 20));
        let mut reader = FrameReader::new(ours, limits(60_000, 2_000), budget);
        let frame = encoded(5);
        let writer = tokio::spawn(async move {
            for byte in frame.iter() {
                if peer.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let outcome = reader.next(|| false).await;
        assert!(
            matches!(outcome, Some(Err(ReadError::FrameTimeout { .. }))),
            "{outcome:?}"
        );
        writer.abort();
    }

    #[tokio::test]
    async fn the_budget_refuses_what_does_not_fit_and_a_short_stream_is_truncated() {
        let (mut peer, ours) = tokio::io::duplex(1 << 16);
        let budget = Arc::new(BufferBudget::new(10));
        let mut reader = FrameReader::new(ours, limits(60_000, 60_000), budget);
        peer.write_all(&encoded(1)[..20]).await.expect("write");
        let outcome = reader.next(|| false).await;
        assert!(
            matches!(outcome, Some(Err(ReadError::BudgetExhausted { max: 10 }))),
            "{outcome:?}"
        );

        let (mut peer, ours) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(
            ours,
            limits(60_000, 60_000),
            Arc::new(BufferBudget::new(1 << 20)),
        );
        peer.write_all(&encoded(1)[..10]).await.expect("write");
        drop(peer);
        let outcome = reader.next(|| false).await;
        assert!(
            matches!(outcome, Some(Err(ref error)) if error.is_closed_connection()),
            "{outcome:?}"
        );
    }
}
