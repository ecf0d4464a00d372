//! The HTTP/1.1 server: an accept loop and one keep-alive loop per connection.
//!
//! Each connection reads a head (bounded, with an idle timeout before its first byte and a
//! header timeout after it), reads the whole body (bounded, timed), then runs the handler. While
//! the handler runs, a read on the connection watches for the client going away; if it does,
//! the handler's future is dropped, so whatever it holds (an engine request, a load charge) is
//! released by its destructors.

use std::borrow::Cow;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::{ListenerOpts, TcpListener, TcpStream};

use super::body::BodyReader;
use super::chunked::{encode_chunk, LAST_CHUNK};
use super::{framing_from_headers, reason, HttpError, Limits, Method, RequestHead};

/// A request with its whole body.
#[derive(Debug)]
pub struct Request {
    /// The parsed head.
    pub head: RequestHead,
    /// The body (empty if none).
    pub body: Bytes,
    /// The client's address.
    pub peer: SocketAddr,
}

/// A complete response, sent with a Content-Length.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header lines (Content-Length and Connection are added by the server).
    pub headers: Vec<(Cow<'static, str>, Bytes)>,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// A response with this status and no headers or body.
    pub fn new(status: u16) -> Response {
        Response { status, headers: Vec::new(), body: Bytes::new() }
    }

    /// A response with a JSON body.
    pub fn json(status: u16, body: impl Into<Bytes>) -> Response {
        Response::new(status).header("content-type", "application/json").body(body)
    }

    /// Adds a header line.
    pub fn header(mut self, name: impl Into<Cow<'static, str>>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }
}

/// Answers requests. Implementations live on one thread (no `Send` needed).
pub trait Handler: 'static {
    /// Answers `req` through `resp`. If the future returns without completing a response, the
    /// server sends 500 (nothing sent yet) or closes the connection (a stream was started).
    fn handle(&self, req: Request, resp: &mut Responder) -> impl Future<Output = ()>;

    /// The response for a request the server itself rejects (bad head, too large, timeout).
    fn error_response(&self, status: u16, message: &str) -> Response {
        Response::new(status).header("content-type", "text/plain; charset=utf-8").body(format!("{message}\n"))
    }
}

/// Server settings.
#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// Bounds on requests.
    pub limits: Limits,
    /// Gauge of open connections, if someone keeps one.
    pub open_connections: Option<Arc<AtomicI64>>,
}

/// Decrements the open-connections gauge when a connection ends.
struct ConnGauge(Option<Arc<AtomicI64>>);

impl ConnGauge {
    fn open(g: &Option<Arc<AtomicI64>>) -> ConnGauge {
        if let Some(g) = g {
            g.fetch_add(1, Ordering::Relaxed);
        }
        ConnGauge(g.clone())
    }
}

impl Drop for ConnGauge {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RespState {
    Idle,
    Streaming,
    Done,
    Broken,
}

/// Writes the response to one request: either [`Responder::send`] once, or
/// [`Responder::start_stream`], any number of [`Responder::send_chunk`], then
/// [`Responder::end_stream`].
pub struct Responder {
    w: OwnedWriteHalf<TcpStream>,
    out: Vec<u8>,
    state: RespState,
    keep_alive: bool,
    head_only: bool,
    /// The streamed body has a Content-Length: pieces go out as they are, unframed.
    length_framed: bool,
}

impl Responder {
    fn new(w: OwnedWriteHalf<TcpStream>) -> Responder {
        Responder {
            w,
            out: Vec::new(),
            state: RespState::Idle,
            keep_alive: true,
            head_only: false,
            length_framed: false,
        }
    }

    fn reset(&mut self, keep_alive: bool, head_only: bool) {
        self.state = RespState::Idle;
        self.length_framed = false;
        self.keep_alive = keep_alive;
        self.head_only = head_only;
    }

    /// Whether nothing has been sent for this request yet.
    pub fn is_idle(&self) -> bool {
        self.state == RespState::Idle
    }

    /// Asks for the connection to be closed after this response.
    pub fn close_after(&mut self) {
        self.keep_alive = false;
    }

    /// Gives up on this response: the connection is closed without completing it (a stream is
    /// cut mid-way). For fault injection and for upstream failures that cannot be reported.
    pub fn abort(&mut self) {
        self.state = RespState::Broken;
    }

    fn write_head(&mut self, status: u16, headers: HeadLines<'_>, framing: &[u8]) {
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        let code = itoa_u16(status);
        out.extend_from_slice(code.as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason(status).as_bytes());
        out.extend_from_slice(b"\r\n");
        match headers {
            HeadLines::Pairs(pairs) => {
                for (name, value) in pairs {
                    out.extend_from_slice(name.as_bytes());
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(value);
                    out.extend_from_slice(b"\r\n");
                }
            }
            HeadLines::Raw(lines) => out.extend_from_slice(lines),
        }
        out.extend_from_slice(framing);
        if !self.keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    async fn flush(&mut self) -> io::Result<()> {
        let out = std::mem::take(&mut self.out);
        let (res, out) = self.w.write_all(out).await;
        self.out = out;
        if res.is_err() {
            self.state = RespState::Broken;
        }
        res.map(|_| ())
    }

    /// Sends a whole response (Content-Length framing).
    pub async fn send(&mut self, resp: Response) -> io::Result<()> {
        self.send_whole(resp.status, HeadLines::Pairs(&resp.headers), &resp.body).await
    }

    /// Sends a whole response whose header lines are already rendered (`name: value\r\n` each,
    /// without framing headers): the proxy's path, which copies an engine's head through.
    pub async fn send_raw(&mut self, status: u16, header_lines: &[u8], body: &[u8]) -> io::Result<()> {
        self.send_whole(status, HeadLines::Raw(header_lines), body).await
    }

    async fn send_whole(&mut self, status: u16, headers: HeadLines<'_>, body: &[u8]) -> io::Result<()> {
        if self.state != RespState::Idle {
            return Err(io::Error::other("response already started"));
        }
        let mut cl = [0u8; 40];
        let framing = content_length_line(&mut cl, body.len());
        self.write_head(status, headers, framing);
        if !self.head_only {
            self.out.extend_from_slice(body);
        }
        self.state = RespState::Done;
        self.flush().await
    }

    /// Sends the head of a chunked response; the body follows with [`Responder::send_chunk`].
    pub async fn start_stream(&mut self, status: u16, headers: &[(Cow<'static, str>, Bytes)]) -> io::Result<()> {
        self.start(status, HeadLines::Pairs(headers), None).await
    }

    /// Sends the head of a response whose body of `len` bytes follows in pieces with
    /// [`Responder::send_chunk`] (no chunked framing: the bytes go out as they are).
    pub async fn start_sized_stream(
        &mut self,
        status: u16,
        headers: &[(Cow<'static, str>, Bytes)],
        len: u64,
    ) -> io::Result<()> {
        self.start(status, HeadLines::Pairs(headers), Some(len)).await
    }

    /// [`Responder::start_stream`] (`len` None) or [`Responder::start_sized_stream`] with
    /// pre-rendered header lines (see [`Responder::send_raw`]).
    pub async fn start_stream_raw(&mut self, status: u16, header_lines: &[u8], len: Option<u64>) -> io::Result<()> {
        self.start(status, HeadLines::Raw(header_lines), len).await
    }

    async fn start(&mut self, status: u16, headers: HeadLines<'_>, len: Option<u64>) -> io::Result<()> {
        if self.state != RespState::Idle {
            return Err(io::Error::other("response already started"));
        }
        let mut cl = [0u8; 40];
        let framing = match len {
            Some(len) => content_length_line(&mut cl, len as usize),
            None => b"transfer-encoding: chunked\r\n",
        };
        self.write_head(status, headers, framing);
        self.state = RespState::Streaming;
        self.length_framed = len.is_some();
        self.flush().await
    }

    /// Sends one piece of a streamed body, flushed at once.
    pub async fn send_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if self.state != RespState::Streaming {
            return Err(io::Error::other("no stream started"));
        }
        if data.is_empty() || self.head_only {
            return Ok(());
        }
        self.out.clear();
        if self.length_framed {
            self.out.extend_from_slice(data);
        } else {
            encode_chunk(&mut self.out, data);
        }
        self.flush().await
    }

    /// Ends a streamed body.
    pub async fn end_stream(&mut self) -> io::Result<()> {
        if self.state != RespState::Streaming {
            return Err(io::Error::other("no stream started"));
        }
        self.out.clear();
        self.state = RespState::Done;
        if self.head_only || self.length_framed {
            return Ok(());
        }
        self.out.extend_from_slice(LAST_CHUNK);
        self.flush().await
    }
}

/// Header lines of a response head: pairs, or bytes already in wire form.
#[derive(Clone, Copy)]
enum HeadLines<'a> {
    Pairs(&'a [(Cow<'static, str>, Bytes)]),
    Raw(&'a [u8]),
}

struct SmallNum {
    buf: [u8; 8],
    start: usize,
}

impl SmallNum {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_u16(n: u16) -> SmallNum {
    let mut buf = [0u8; 8];
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    SmallNum { buf, start: i }
}

/// `content-length: N\r\n`, rendered into `storage` without allocating.
pub(crate) fn content_length_line(storage: &mut [u8; 40], len: usize) -> &[u8] {
    const PREFIX: &[u8] = b"content-length: ";
    storage[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let d = &digits[i..];
    let end = PREFIX.len() + d.len();
    storage[PREFIX.len()..end].copy_from_slice(d);
    storage[end..end + 2].copy_from_slice(b"\r\n");
    &storage[..end + 2]
}

/// Binds a listener with `SO_REUSEPORT` (one per thread on the same address) and a deep backlog.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let opts = ListenerOpts::new().reuse_port(true).reuse_addr(true).backlog(4096);
    TcpListener::bind_with_config(addr, &opts)
}

/// Accepts connections forever, serving each on its own task on this thread.
pub async fn serve<H: Handler>(listener: TcpListener, handler: Rc<H>, config: Rc<ServerConfig>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let handler = handler.clone();
                let config = config.clone();
                monoio::spawn(async move {
                    serve_connection(stream, peer, handler, config).await;
                });
            }
            Err(e) => {
                // Out of descriptors or a transient accept failure: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A read in flight on a connection: it owns the read half and the buffer and gives both back.
type PendingRead = Pin<Box<dyn Future<Output = (io::Result<usize>, BytesMut, OwnedReadHalf<TcpStream>)>>>;

/// The read side of a connection: idle (we hold the half and buffer) or a read in flight.
///
/// A read started to watch for the client going away while a handler runs is never cancelled:
/// if the handler finishes first, that same read receives the next request. So a keep-alive
/// connection always has at most one read outstanding and costs no cancellations.
enum ReadSide {
    Idle(OwnedReadHalf<TcpStream>, BytesMut),
    Reading(PendingRead),
    Gone,
}

/// Bytes reserved for reading a request head (most heads are far smaller; bodies grow it).
const HEAD_READ_RESERVE: usize = 2048;

fn start_read(mut r: OwnedReadHalf<TcpStream>, mut buf: BytesMut) -> PendingRead {
    Box::pin(async move {
        if buf.capacity() - buf.len() < HEAD_READ_RESERVE {
            buf.reserve(HEAD_READ_RESERVE);
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let (res, slice) = r.read(buf.slice_mut(len..cap)).await;
        (res, slice.into_inner(), r)
    })
}

impl ReadSide {
    /// Reads more bytes (awaiting the read in flight, if any); returns the count (0 = EOF).
    async fn fill(&mut self) -> io::Result<usize> {
        let fut = match std::mem::replace(self, ReadSide::Gone) {
            ReadSide::Idle(r, buf) => start_read(r, buf),
            ReadSide::Reading(f) => f,
            ReadSide::Gone => return Ok(0),
        };
        let (res, buf, r) = fut.await;
        *self = ReadSide::Idle(r, buf);
        res
    }

    fn buffered(&self) -> usize {
        match self {
            ReadSide::Idle(_, buf) => buf.len(),
            _ => 0,
        }
    }
}

/// Serves one connection until it closes, fails or times out.
pub async fn serve_connection<H: Handler>(
    stream: TcpStream,
    peer: SocketAddr,
    handler: Rc<H>,
    config: Rc<ServerConfig>,
) {
    let _ = stream.set_nodelay(true);
    let _gauge = ConnGauge::open(&config.open_connections);
    let limits = &config.limits;
    let (r, w) = stream.into_split();
    let mut side = ReadSide::Idle(r, BytesMut::new());
    let mut resp = Responder::new(w);
    loop {
        let head = match read_head(&mut side, limits).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => {
                reject(&mut resp, &*handler, &e).await;
                return;
            }
        };
        let ReadSide::Idle(r, buf) = &mut side else { return };
        let keep_alive = head.keep_alive();
        resp.reset(keep_alive, head.method == Method::Head);
        let framing = match framing_from_headers(&head.headers()) {
            Ok(f) => f,
            Err(e) => {
                reject(&mut resp, &*handler, &e).await;
                return;
            }
        };
        if head.headers().has_token("expect", "100-continue") && buf.is_empty() {
            resp.out.clear();
            resp.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            if resp.flush().await.is_err() {
                return;
            }
        }
        let body = match BodyReader::new(framing, limits.max_body_bytes) {
            Ok(mut reader) => match monoio::time::timeout(limits.body_timeout, reader.read_all(r, buf)).await {
                Ok(Ok(body)) => body,
                Ok(Err(e)) => {
                    reject(&mut resp, &*handler, &e).await;
                    return;
                }
                Err(_) => {
                    reject(&mut resp, &*handler, &HttpError::Timeout("request body")).await;
                    return;
                }
            },
            Err(e) => {
                reject(&mut resp, &*handler, &e).await;
                return;
            }
        };
        let req = Request { head, body, peer };
        // Boxed: an idle keep-alive connection then carries no handler state.
        let finished = run_watched(Box::pin(handler.handle(req, &mut resp)), &mut side).await;
        if !finished {
            return; // the client went away; the handler was dropped
        }
        match resp.state {
            RespState::Done if resp.keep_alive => continue,
            RespState::Idle => {
                resp.keep_alive = false;
                let e = handler.error_response(500, "handler returned without a response");
                let _ = resp.send(e).await;
                return;
            }
            _ => return,
        }
    }
}

async fn reject<H: Handler>(resp: &mut Responder, handler: &H, err: &HttpError) {
    if matches!(err, HttpError::Io(_)) {
        return;
    }
    tracing::debug!(error = %err, "rejecting request");
    if resp.is_idle() {
        resp.keep_alive = false;
        let r = handler.error_response(err.status(), &err.to_string());
        let _ = resp.send(r).await;
    }
}

async fn read_head(side: &mut ReadSide, limits: &Limits) -> Result<Option<RequestHead>, HttpError> {
    if side.buffered() == 0 {
        match monoio::time::timeout(limits.idle_timeout, side.fill()).await {
            Ok(Ok(0)) | Err(_) => return Ok(None),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(HttpError::Io(e)),
        }
    }
    let deadline = monoio::time::Instant::now() + limits.header_timeout;
    loop {
        if let ReadSide::Idle(_, buf) = side {
            if let Some(head) = RequestHead::parse(buf, limits.max_headers, limits.max_head_bytes)? {
                return Ok(Some(head));
            }
        }
        match monoio::time::timeout_at(deadline, side.fill()).await {
            Ok(Ok(0)) => return Err(HttpError::UnexpectedEof("request head")),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(HttpError::Io(e)),
            Err(_) => return Err(HttpError::Timeout("request head")),
        }
    }
}

/// Runs `fut` while watching the connection for the client going away. Returns false (having
/// dropped `fut`) if it went away first. The watching read is left in flight for the next
/// request when `fut` finishes first; bytes that arrive meanwhile (a pipelined request) stay
/// buffered.
async fn run_watched<F: Future<Output = ()>>(fut: F, side: &mut ReadSide) -> bool {
    let mut fut = pin!(fut);
    // Most handlers that finish at once need no watch at all.
    let first = poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx).is_ready())).await;
    if first {
        return true;
    }
    if side.buffered() > 0 {
        // A pipelined request is already buffered: the client is still there.
        fut.await;
        return true;
    }
    let mut read = match std::mem::replace(side, ReadSide::Gone) {
        ReadSide::Idle(r, buf) => start_read(r, buf),
        ReadSide::Reading(f) => f,
        ReadSide::Gone => {
            fut.await;
            return true;
        }
    };
    enum Outcome<T> {
        Finished,
        Read(T),
    }
    let outcome = poll_fn(|cx| {
        if fut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Outcome::Finished);
        }
        read.as_mut().poll(cx).map(Outcome::Read)
    })
    .await;
    match outcome {
        Outcome::Finished => {
            *side = ReadSide::Reading(read);
            true
        }
        Outcome::Read((Ok(n), buf, r)) if n > 0 => {
            *side = ReadSide::Idle(r, buf);
            fut.await;
            true
        }
        Outcome::Read((_, buf, r)) => {
            *side = ReadSide::Idle(r, buf);
            false
        }
    }
}
