//! A lingering close: the reason for a close reaches a peer that is still
//! sending.
//!
//! When the server closes a TCP connection while the peer's bytes are still
//! arriving (a client in the middle of an oversize message, or one that just
//! keeps publishing), the kernel answers the unread input with a reset: the
//! server's last bytes still in flight — the MQTT 5 DISCONNECT with its
//! reason, the WebSocket close frame — are discarded, and the client sees
//! "connection reset" instead of why it was closed. [`close`] is the
//! lingering close HTTP servers have long used: shut the write side down
//! (a FIN after the last bytes), then read and discard what the peer still
//! sends until it closes too, so that the final close has nothing unread.
//!
//! It costs a connection up to [`LINGER_TIME`] and [`LINGER_BYTES`] of
//! reading after it is over: a peer that keeps sending beyond either bound
//! gets the reset after all (a hostile one cannot hold the connection), and
//! an honest one has long read the reason and closed by then. The read
//! buffer is allocated only here, so connections pay nothing for it while
//! they are open.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Longest a closed connection keeps reading what its peer still sends.
pub const LINGER_TIME: Duration = Duration::from_secs(1);

/// Most bytes read and discarded after the close.
pub const LINGER_BYTES: usize = 256 * 1024;

/// Shuts `io`'s write side down, then reads and discards its input until
/// EOF, an error, [`LINGER_TIME`] or [`LINGER_BYTES`], whichever comes
/// first. The caller drops `io` afterwards.
pub async fn close<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    close_within(io, LINGER_TIME, LINGER_BYTES).await;
}

/// [`close`] with explicit bounds.
pub async fn close_within<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, time: Duration, max_bytes: usize) {
    let deadline = Instant::now() + time;
    if tokio::time::timeout_at(deadline, io.shutdown()).await.is_err() {
        return;
    }
    let drain = async {
        let mut buf = vec![0u8; 8 * 1024];
        let mut read = 0;
        while read < max_bytes {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout_at(deadline, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peer sees our last bytes, then EOF; its own bytes sent after our
    /// close are read, and we return once it closes.
    #[tokio::test]
    async fn shuts_down_then_drains_until_the_peer_closes() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        ours.write_all(b"bye").await.unwrap();
        let peer = tokio::spawn(async move {
            theirs.write_all(&[7u8; 1000]).await.unwrap();
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).await.unwrap();
            drop(theirs);
            got
        });
        tokio::time::timeout(Duration::from_secs(5), close(&mut ours)).await.expect("returns on the peer's EOF");
        assert_eq!(peer.await.unwrap(), b"bye", "our bytes, then EOF");
    }

    /// A peer that never stops sending is cut off after the byte bound.
    #[tokio::test]
    async fn stops_after_the_byte_bound() {
        let (mut ours, mut theirs) = tokio::io::duplex(1024);
        let peer = tokio::spawn(async move { while theirs.write_all(&[1u8; 512]).await.is_ok() {} });
        tokio::time::timeout(Duration::from_secs(5), close_within(&mut ours, Duration::from_secs(60), 64 * 1024))
            .await
            .expect("returns after the byte bound");
        drop(ours);
        peer.await.unwrap();
    }

    /// A silent peer that never closes is cut off after the time bound.
    #[tokio::test(start_paused = true)]
    async fn stops_after_the_time_bound() {
        let (mut ours, _theirs) = tokio::io::duplex(64);
        let started = Instant::now();
        close(&mut ours).await;
        assert_eq!(started.elapsed(), LINGER_TIME);
    }
}
