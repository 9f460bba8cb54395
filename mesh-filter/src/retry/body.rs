//! A request body that can be sent more than once.
//!
//! The first try streams the body as it arrives (no added latency) and
//! keeps a copy of each frame, up to a limit (Envoy's
//! `per_request_buffer_limit_bytes`). A retry replays the copy and then
//! continues with whatever has not arrived yet. Past the limit the copy is
//! dropped, the first try keeps streaming, and no retry is possible: memory
//! per request stays bounded, never the whole body.
//!
//! Only the body of the latest try may read on: when a retry starts, the
//! bodies of earlier tries fail with [`ReplayError::Superseded`] so a
//! lingering connection can never steal frames from the retry.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

/// Why a [`ReplayBody`] failed.
#[derive(Debug)]
pub enum ReplayError<E> {
    /// The source body failed.
    Source(E),
    /// A later try took over the body.
    Superseded,
}

impl<E: std::fmt::Display> std::fmt::Display for ReplayError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplayError::Source(e) => e.fmt(f),
            ReplayError::Superseded => f.write_str("request body taken over by a retry"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for ReplayError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ReplayError::Source(e) => Some(e),
            ReplayError::Superseded => None,
        }
    }
}

struct Shared<B> {
    source: B,
    frames: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    buffered: usize,
    limit: usize,
    /// The copy was dropped (over the limit) or the source failed: no
    /// replay is possible.
    unreplayable: bool,
    ended: bool,
    generation: u32,
}

/// The shared source of a request body's tries.
pub struct ReplaySource<B> {
    shared: Arc<Mutex<Shared<B>>>,
    hint: SizeHint,
    bodies: u32,
}

impl<B> std::fmt::Debug for ReplaySource<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplaySource").finish_non_exhaustive()
    }
}

impl<B: Body<Data = Bytes>> ReplaySource<B> {
    /// Wraps `body`, keeping at most `limit` bytes for replay.
    pub fn new(body: B, limit: usize) -> Self {
        let hint = body.size_hint();
        let ended = body.is_end_stream();
        ReplaySource {
            shared: Arc::new(Mutex::new(Shared {
                source: body,
                frames: Vec::new(),
                trailers: None,
                buffered: 0,
                limit,
                unreplayable: false,
                ended,
                generation: 0,
            })),
            hint,
            bodies: 0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared<B>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a new try can get the whole body.
    pub fn can_replay(&self) -> bool {
        self.bodies == 0 || !self.lock().unreplayable
    }

    /// The body of the next try, from the start; earlier tries' bodies stop
    /// reading. `None` when the body cannot be replayed.
    pub fn body(&mut self) -> Option<ReplayBody<B>> {
        if !self.can_replay() {
            return None;
        }
        let generation = {
            let mut s = self.lock();
            s.generation += 1;
            s.generation
        };
        self.bodies += 1;
        Some(ReplayBody {
            shared: self.shared.clone(),
            pos: 0,
            trailers_sent: false,
            generation,
            hint: self.hint,
        })
    }
}

/// One try's view of a [`ReplaySource`].
pub struct ReplayBody<B> {
    shared: Arc<Mutex<Shared<B>>>,
    pos: usize,
    trailers_sent: bool,
    generation: u32,
    hint: SizeHint,
}

impl<B> std::fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody").finish_non_exhaustive()
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = ReplayError<B::Error>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let mut s = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        if s.generation != this.generation {
            return Poll::Ready(Some(Err(ReplayError::Superseded)));
        }
        if this.pos < s.frames.len() {
            let f = s.frames[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(f))));
        }
        if s.ended {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = s.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        match Pin::new(&mut s.source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.unreplayable = true;
                Poll::Ready(Some(Err(ReplayError::Source(e))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if !s.unreplayable {
                            if s.buffered + data.len() > s.limit {
                                // Over the limit: stop copying and free the
                                // copy; this try goes on streaming.
                                s.unreplayable = true;
                                s.frames = Vec::new();
                                this.pos = 0;
                            } else {
                                s.buffered += data.len();
                                s.frames.push(data.clone());
                                this.pos = s.frames.len();
                            }
                        }
                        Frame::data(data)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(t) => {
                            s.ended = true;
                            s.trailers = Some(t.clone());
                            this.trailers_sent = true;
                            Frame::trailers(t)
                        }
                        Err(other) => {
                            // Neither data nor trailers: pass through, no
                            // replay of it.
                            s.unreplayable = true;
                            other
                        }
                    },
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        s.generation == self.generation
            && self.pos >= s.frames.len()
            && s.ended
            && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}
