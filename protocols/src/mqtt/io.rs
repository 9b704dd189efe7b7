//! A connection's byte stream: read buffers released while idle, one write per
//! batch under the write timeout, and the connection's counter handles.

use super::*;

/// Counter handles, looked up once per connection.
pub(crate) struct Counters {
    pub(crate) messages_out: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) bytes_in: Counter,
}

impl Counters {
    pub(crate) fn new() -> Self {
        Counters {
            messages_out: metrics::counter!("switchboard_messages_out_total", "protocol" => "mqtt"),
            bytes_out: metrics::counter!("switchboard_bytes_out_total", "protocol" => "mqtt"),
            bytes_in: metrics::counter!("switchboard_bytes_in_total", "protocol" => "mqtt"),
        }
    }
}

/// The byte stream and its buffers.
pub(crate) struct Io<S> {
    pub(crate) stream: S,
    pub(crate) rbuf: BytesMut,
    pub(crate) wbuf: BytesMut,
    /// PUBLISHes in `wbuf`, counted in `messages_out` once per write (a
    /// counter update per delivery showed in profiles).
    pub(crate) delivered: u64,
    pub(crate) read_size: usize,
    pub(crate) write_timeout: Duration,
    pub(crate) counters: Counters,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    /// Reads more bytes; Ok(0) is EOF. Cancel-safe (`read_buf`, `read`).
    ///
    /// An idle connection holds no read buffer: between packets, with
    /// nothing waiting on the socket, the buffer is released and the wait
    /// for the next bytes reads into a few bytes inline in the task. A busy
    /// connection, whose next bytes are already there, keeps its buffer.
    pub(crate) async fn read_more(&mut self) -> std::io::Result<usize> {
        let n = if !self.rbuf.is_empty() || self.rbuf.capacity() > 0 {
            if self.rbuf.capacity() - self.rbuf.len() < self.read_size {
                self.rbuf.reserve(self.read_size);
            }
            match self.stream.read_buf(&mut self.rbuf).now_or_never() {
                Some(r) => Some(r?),
                // Mid-packet: wait with the buffer.
                None if !self.rbuf.is_empty() => Some(self.stream.read_buf(&mut self.rbuf).await?),
                None => {
                    self.rbuf = BytesMut::new();
                    None
                }
            }
        } else {
            None
        };
        let n = match n {
            Some(n) => n,
            None => {
                let mut first = [0u8; IDLE_READ];
                let n = self.stream.read(&mut first).await?;
                self.rbuf.reserve(self.read_size);
                self.rbuf.extend_from_slice(&first[..n]);
                n
            }
        };
        self.counters.bytes_in.increment(n as u64);
        Ok(n)
    }

    /// Writes and flushes the batch buffer once, within the write timeout.
    pub(crate) async fn flush(&mut self) -> Result<(), Stop> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let len = self.wbuf.len();
        if self.delivered > 0 {
            self.counters.messages_out.increment(std::mem::take(&mut self.delivered));
        }
        let write = std::pin::pin!(async {
            self.stream.write_all(&self.wbuf).await?;
            self.stream.flush().await
        });
        let res = crate::deadline::within(self.write_timeout, write).await;
        self.wbuf.clear();
        if self.wbuf.capacity() > KEEP_BUFFER {
            self.wbuf = BytesMut::new();
        }
        match res {
            Ok(Ok(())) => {
                self.counters.bytes_out.increment(len as u64);
                Ok(())
            }
            Ok(Err(e)) => {
                debug!(error = %e, "write failed; dropping connection");
                Err(Stop::Gone)
            }
            Err(_) => {
                debug!(timeout = ?self.write_timeout, "write timed out; dropping connection");
                Err(Stop::Gone)
            }
        }
    }

    pub(crate) async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }

    /// Ends the connection with a lingering close ([`crate::linger`]): the
    /// write side is shut down and what the client still sends is read and
    /// discarded (at most 1 s, 256 KiB) until it closes, so a CONNACK
    /// refusal or a DISCONNECT just written reaches a client that is still
    /// sending instead of being lost to a TCP reset. Buffers go first.
    pub(crate) async fn close_lingering(&mut self) {
        self.rbuf = BytesMut::new();
        self.wbuf = BytesMut::new();
        crate::linger::close(&mut self.stream).await;
    }
}
