//! Raw TCP pass-through (`envoy.filters.network.tcp_proxy`): bytes copied
//! both ways until either side closes, with an idle timeout that closes both
//! sides when nothing moves.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes moved by [`proxy`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// Downstream to upstream.
    pub sent: u64,
    /// Upstream to downstream.
    pub received: u64,
}

/// Copies `downstream` <-> `upstream` until both directions have ended or
/// `idle_timeout` passes with no byte moving either way. A half-close is
/// forwarded (the write side is shut down when the read side ends).
pub async fn proxy<D, U>(
    downstream: D,
    upstream: U,
    idle_timeout: Option<Duration>,
) -> io::Result<Transferred>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut dr, mut dw) = tokio::io::split(downstream);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let mut t = Transferred::default();
    let mut dbuf = vec![0u8; 16 * 1024];
    let mut ubuf = vec![0u8; 16 * 1024];
    let (mut down_open, mut up_open) = (true, true);
    while down_open || up_open {
        let idle = async {
            match idle_timeout {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = dr.read(&mut dbuf), if down_open => {
                let n = r?;
                if n == 0 {
                    down_open = false;
                    uw.shutdown().await.ok();
                } else {
                    uw.write_all(&dbuf[..n]).await?;
                    t.sent += n as u64;
                }
            }
            r = ur.read(&mut ubuf), if up_open => {
                let n = r?;
                if n == 0 {
                    up_open = false;
                    dw.shutdown().await.ok();
                } else {
                    dw.write_all(&ubuf[..n]).await?;
                    t.received += n as u64;
                }
            }
            _ = idle => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "tcp_proxy idle timeout"));
            }
        }
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_both_ways_and_forwards_half_close() {
        let (client, proxy_down) = tokio::io::duplex(1024);
        let (proxy_up, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(proxy(proxy_down, proxy_up, None));
        let (mut sr, mut sw) = tokio::io::split(server);
        let echo = tokio::spawn(async move {
            let mut buf = Vec::new();
            sr.read_to_end(&mut buf).await.unwrap();
            sw.write_all(&buf).await.unwrap();
            sw.shutdown().await.unwrap();
        });
        let (mut cr, mut cw) = tokio::io::split(client);
        let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                cw.write_all(&data).await.unwrap();
                cw.shutdown().await.unwrap();
            })
        };
        let mut got = Vec::new();
        cr.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        echo.await.unwrap();
        assert_eq!(got, data);
        let t = task.await.unwrap().unwrap();
        assert_eq!(t.sent, 200_000);
        assert_eq!(t.received, 200_000);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_closes() {
        let (_client, proxy_down) = tokio::io::duplex(64);
        let (proxy_up, _server) = tokio::io::duplex(64);
        let r = proxy(proxy_down, proxy_up, Some(Duration::from_secs(5))).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
