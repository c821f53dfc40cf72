//! A client connection's write side, driven by the connection's own task: responses are encoded
//! into one buffer and written together when nothing else is ready, so a burst of answers costs
//! one write, and no writer task sits between a handler and the socket.

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio_util::codec::Encoder;
use tracing::{debug, warn};

use crate::remoting::raw::Outgoing;
use crate::remoting::{FrameLimits, RemotingCodec};

/// Bytes waiting for the socket beyond which the connection stops taking more (it stops reading
/// requests and draining answers until the client reads).
pub const PENDING_LIMIT: usize = 256 * 1024;

pub struct Output {
    writer: OwnedWriteHalf,
    codec: RemotingCodec,
    pending: BytesMut,
    failed: bool,
}

impl Output {
    pub fn new(writer: OwnedWriteHalf, limits: FrameLimits) -> Self {
        Self {
            writer,
            codec: RemotingCodec::new(limits),
            pending: BytesMut::with_capacity(16 * 1024),
            failed: false,
        }
    }

    /// Queues one frame. A frame the codec refuses (over the limits) is dropped and logged: the
    /// connection carries on.
    pub fn push(&mut self, frame: Outgoing) {
        let code = frame.code();
        if let Err(error) = self.codec.encode(frame, &mut self.pending) {
            warn!(code, %error, "response not written");
        }
    }

    /// Room for more: below the pending limit and the socket still working.
    pub fn has_room(&self) -> bool {
        !self.failed && self.pending.len() < PENDING_LIMIT
    }

    pub fn has_pending(&self) -> bool {
        !self.failed && !self.pending.is_empty()
    }

    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Writes what the socket takes now, without waiting.
    pub fn write_now(&mut self) {
        while self.has_pending() {
            match self.writer.try_write(&self.pending) {
                Ok(0) => self.fail(&std::io::ErrorKind::WriteZero.into()),
                Ok(written) => self.pending.advance(written),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(error) => self.fail(&error),
            }
        }
    }

    /// Resolves once the socket may take more bytes.
    pub async fn writable(&self) {
        if self.writer.writable().await.is_err() {
            // The next write reports the error.
        }
    }

    /// Writes everything pending, waiting as long as it takes (shutdown bounds it).
    pub async fn finish(mut self) {
        if self.has_pending()
            && let Err(error) = self.writer.write_all(&self.pending).await
        {
            debug!(%error, "write to client failed");
        }
        let _ = self.writer.shutdown().await;
    }

    fn fail(&mut self, error: &std::io::Error) {
        debug!(%error, "write to client failed");
        self.failed = true;
        self.pending.clear();
    }
}
