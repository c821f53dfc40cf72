//! A bare remoting connection for tests that must control every header field (no `bname`, exact
//! queue ids, odd codes): one request at a time, each answer awaited within a bound.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rocketmesh::remoting::{RemotingCodec, RemotingCommand};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RawClient {
    framed: Framed<TcpStream, RemotingCodec>,
    next_opaque: i32,
}

impl RawClient {
    pub async fn connect(address: SocketAddr) -> Self {
        let socket = tokio::time::timeout(ANSWER_TIMEOUT, TcpStream::connect(address))
            .await
            .expect("connect in time")
            .unwrap_or_else(|error| panic!("connect to {address}: {error}"));
        Self::from_stream(socket)
    }

    /// A client over a connection made elsewhere (from a chosen local address, say).
    pub fn from_stream(socket: TcpStream) -> Self {
        Self {
            framed: Framed::new(socket, RemotingCodec::default()),
            next_opaque: 1,
        }
    }

    /// Sends `request` and returns its answer; requests the server sends meanwhile are skipped.
    pub async fn call(&mut self, mut request: RemotingCommand) -> RemotingCommand {
        self.next_opaque += 1;
        request.opaque = self.next_opaque;
        self.framed.send(request).await.expect("send");
        loop {
            let frame = tokio::time::timeout(ANSWER_TIMEOUT, self.framed.next())
                .await
                .expect("an answer in time")
                .expect("the connection stays open")
                .expect("a well-formed answer");
            if frame.is_response() && frame.opaque == self.next_opaque {
                return frame;
            }
        }
    }
}
