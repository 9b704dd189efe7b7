//! MQTT over WebSocket (`/mqtt`, subprotocol `mqtt`): a byte-stream view of
//! a WebSocket, so that [`serve`](super::serve) runs unchanged.
//!
//! MQTT 5 §6 / MQTT 3.1.1 §6: MQTT bytes travel in binary messages, and a
//! packet may span messages (or a message hold several packets); WebSocket
//! is only framing. [`WsBytes`] implements `AsyncRead` (binary payloads, in
//! order) and `AsyncWrite` (each flushed batch becomes one binary message).
//!
//! It deliberately does not perform the HTTP upgrade or echo the `mqtt`
//! subprotocol (the gateway does), nor interpret MQTT.
//!
//! | WebSocket event | effect on the MQTT byte stream |
//! |---|---|
//! | binary message | its bytes are read |
//! | text message | read error (invalid data): MQTT 5 §6 requires binary; the connection ends |
//! | ping / pong | nothing (tungstenite answers pings on the next write or flush) |
//! | close frame, EOF | end of stream |

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::{MqttConfig, SessionStore};
use crate::port::Core;

/// The WebSocket subprotocol of MQTT (MQTT 5 §6).
pub const SUBPROTOCOL: &str = "mqtt";

/// A WebSocket seen as a byte stream of binary message payloads.
pub struct WsBytes<S> {
    ws: WebSocketStream<S>,
    /// Unread rest of the last binary message.
    pending: Bytes,
    eof: bool,
}

impl<S> WsBytes<S> {
    /// Wraps an upgraded WebSocket.
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsBytes { ws, pending: Bytes::new(), eof: false }
    }
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::Error::new(io::ErrorKind::BrokenPipe, e),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None => self.eof = true,
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => self.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                Some(Ok(Message::Binary(b))) => self.pending = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket needs binary messages",
                    )));
                }
                Some(Ok(Message::Close(_))) => self.eof = true,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut self.ws).start_send(Message::binary(Bytes::copy_from_slice(buf))).map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

/// Runs MQTT over an upgraded WebSocket (see the module docs).
pub async fn serve_ws<S: AsyncRead + AsyncWrite + Unpin + Send>(
    ws: WebSocketStream<S>,
    core: Arc<dyn Core>,
    sessions: Arc<dyn SessionStore>,
    cfg: Arc<MqttConfig>,
    peer: Option<SocketAddr>,
    shutdown: watch::Receiver<bool>,
) {
    super::serve(WsBytes::new(ws), core, sessions, cfg, super::Peer::addr(peer), shutdown).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    const WAIT: std::time::Duration = std::time::Duration::from_secs(5);

    #[tokio::test]
    async fn bytes_span_messages_and_writes_are_binary() {
        let (a, b) = tokio::io::duplex(4096);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let mut client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let mut bytes = WsBytes::new(server);
        client.send(Message::binary(vec![1u8, 2])).await.unwrap();
        client.send(Message::Ping(Bytes::new())).await.unwrap();
        client.send(Message::binary(vec![3u8])).await.unwrap();
        let mut got = [0u8; 3];
        tokio::time::timeout(WAIT, bytes.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(got, [1, 2, 3]);
        bytes.write_all(&[9, 8]).await.unwrap();
        bytes.flush().await.unwrap();
        loop {
            match tokio::time::timeout(WAIT, client.next()).await.unwrap() {
                Some(Ok(Message::Binary(b))) => {
                    assert_eq!(&b[..], &[9, 8]);
                    break;
                }
                Some(Ok(Message::Pong(_))) => continue,
                other => panic!("{other:?}"),
            }
        }
        client.send(Message::text("x")).await.unwrap();
        let mut one = [0u8; 1];
        let err = tokio::time::timeout(WAIT, bytes.read(&mut one)).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        client.send(Message::Close(None)).await.unwrap();
        assert_eq!(tokio::time::timeout(WAIT, bytes.read(&mut one)).await.unwrap().unwrap(), 0);
    }
}
