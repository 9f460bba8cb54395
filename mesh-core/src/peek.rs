//! Looking at the first bytes of an accepted connection without consuming
//! them, for listener filters (the TLS inspector, protocol detection).
//!
//! The bytes stay in the socket's receive queue (`MSG_PEEK`), so whichever
//! filter chain is chosen reads the stream from byte 0: nothing has to be
//! replayed. The price is that a peek returns at once while unread bytes
//! wait, so when the bytes so far do not decide, [`peek_until`] waits a
//! little (1 ms, doubling up to 50 ms) before looking again. A peer that
//! closes its side before the bytes decide is noticed at once (the socket
//! reports read-closed), not at the deadline.

use std::io;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant};

/// Why [`peek_until`] gave up.
#[derive(Debug)]
pub enum PeekError {
    /// The deadline passed with `seen` bytes that did not decide.
    TimedOut {
        /// Bytes received by then.
        seen: usize,
    },
    /// The peer closed its side after `seen` bytes that did not decide.
    Closed {
        /// Bytes received before the close.
        seen: usize,
    },
    /// `max` bytes arrived and still did not decide.
    TooLarge,
    /// Reading the socket failed.
    Io(io::Error),
}

impl std::fmt::Display for PeekError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeekError::TimedOut { seen } => write!(f, "timed out after {seen} bytes"),
            PeekError::Closed { seen: 0 } => f.write_str("closed by the peer before any byte"),
            PeekError::Closed { seen } => write!(f, "closed by the peer after {seen} bytes"),
            PeekError::TooLarge => f.write_str("too many bytes without deciding"),
            PeekError::Io(e) => write!(f, "read error: {e}"),
        }
    }
}

impl std::error::Error for PeekError {}

/// Peeks at `stream` until `decide` returns `Some` for the bytes received
/// so far (always from byte 0), the `deadline` passes (`None`: no
/// deadline), the peer closes, or `max` bytes did not decide.
pub async fn peek_until<T>(
    stream: &TcpStream,
    deadline: Option<Instant>,
    max: usize,
    mut decide: impl FnMut(&[u8]) -> Option<T>,
) -> Result<T, PeekError> {
    let mut buf = vec![0u8; max.min(2048)];
    let mut seen = 0;
    let mut backoff = Duration::from_millis(1);
    loop {
        let n = until(deadline, seen, stream.peek(&mut buf)).await?;
        if n == 0 {
            return Err(PeekError::Closed { seen: 0 });
        }
        if let Some(t) = decide(&buf[..n]) {
            return Ok(t);
        }
        if n == buf.len() {
            if n >= max {
                return Err(PeekError::TooLarge);
            }
            buf.resize((n * 2).min(max), 0);
            seen = n;
            continue;
        }
        if n == seen {
            // Nothing new: unless the peer has closed its side, wait a
            // little before looking again.
            let ready = until(deadline, seen, stream.ready(Interest::READABLE)).await?;
            if ready.is_read_closed() {
                return Err(PeekError::Closed { seen: n });
            }
            if deadline.is_some_and(|d| Instant::now() + backoff > d) {
                return Err(PeekError::TimedOut { seen: n });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        } else {
            backoff = Duration::from_millis(1);
        }
        seen = n;
    }
}

/// Runs `io` until `deadline` (if any).
async fn until<T>(
    deadline: Option<Instant>,
    seen: usize,
    io: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, PeekError> {
    match deadline {
        Some(d) => match tokio::time::timeout_at(d, io).await {
            Ok(r) => r.map_err(PeekError::Io),
            Err(_) => Err(PeekError::TimedOut { seen }),
        },
        None => io.await.map_err(PeekError::Io),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    fn line(b: &[u8]) -> Option<usize> {
        b.iter().position(|&c| c == b'\n')
    }

    #[tokio::test]
    async fn decides_across_segments_and_leaves_the_bytes() {
        let (mut c, s) = pair().await;
        c.write_all(b"hel").await.unwrap();
        let w = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.write_all(b"lo\nrest").await.unwrap();
            c
        });
        let d = Instant::now() + Duration::from_secs(5);
        assert_eq!(peek_until(&s, Some(d), 1024, line).await.unwrap(), 5);
        let _c = w.await.unwrap();
        let mut b = [0u8; 10];
        let n = s.try_read(&mut b).unwrap();
        assert_eq!(&b[..n], b"hello\nrest");
    }

    #[tokio::test]
    async fn a_close_before_deciding_is_seen_before_the_deadline() {
        let (mut c, s) = pair().await;
        c.write_all(b"partial").await.unwrap();
        c.shutdown().await.unwrap();
        let start = Instant::now();
        let e = peek_until(&s, Some(start + Duration::from_secs(10)), 1024, line).await;
        assert!(matches!(e, Err(PeekError::Closed { seen: 7 })), "{e:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(c);
        let (c, s) = pair().await;
        drop(c);
        let e = peek_until(&s, None, 1024, line).await;
        assert!(matches!(e, Err(PeekError::Closed { seen: 0 })), "{e:?}");
    }

    #[tokio::test]
    async fn silence_times_out_and_too_much_is_refused() {
        let (mut c, s) = pair().await;
        let d = Instant::now() + Duration::from_millis(50);
        let e = peek_until(&s, Some(d), 1024, line).await;
        assert!(matches!(e, Err(PeekError::TimedOut { seen: 0 })), "{e:?}");
        c.write_all(&[b'x'; 5000]).await.unwrap();
        let d = Instant::now() + Duration::from_secs(5);
        let e = peek_until(&s, Some(d), 4096, line).await;
        assert!(matches!(e, Err(PeekError::TooLarge)), "{e:?}");
    }
}
