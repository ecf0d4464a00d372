//! The HTTP layer over real loopback sockets, on both monoio drivers.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use gantry_proxy::http::client::ClientConn;
use gantry_proxy::http::server::{self, Handler, Request, Responder, Response, ServerConfig};
use gantry_proxy::http::sse::SseParser;
use gantry_proxy::http::Limits;
use gantry_proxy::rt::{self, Driver};

/// Echo server: `/echo` returns the body; `/stream?n=K` streams K SSE events; `/hang` never
/// answers and flips `dropped` when the client going away cancels it.
struct Echo {
    dropped: Arc<AtomicBool>,
    started: Arc<AtomicUsize>,
}

struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl Handler for Echo {
    async fn handle(&self, req: Request, resp: &mut Responder) {
        self.started.fetch_add(1, Ordering::SeqCst);
        match req.head.path() {
            "/echo" => {
                let _ = resp.send(Response::new(200).body(req.body)).await;
            }
            "/stream" => {
                let n: usize = req.head.target().rsplit('=').next().and_then(|s| s.parse().ok()).unwrap_or(3);
                let _ = resp.start_stream(200, &[("content-type".into(), "text/event-stream".into())]).await;
                for i in 0..n {
                    let _ = resp.send_chunk(format!("data: {i}\n\n").as_bytes()).await;
                }
                let _ = resp.send_chunk(b"data: [DONE]\n\n").await;
                let _ = resp.end_stream().await;
            }
            "/hang" => {
                let _guard = DropFlag(self.dropped.clone());
                std::future::pending::<()>().await;
            }
            _ => {
                let _ = resp.send(Response::new(404)).await;
            }
        }
    }
}

struct TestServer {
    addr: SocketAddr,
    dropped: Arc<AtomicBool>,
    started: Arc<AtomicUsize>,
}

fn start_server(driver: Driver, limits: Limits) -> TestServer {
    let dropped = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel();
    let (d, s) = (dropped.clone(), started.clone());
    std::thread::spawn(move || {
        rt::block_on(driver, async move {
            let listener = server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let handler = Rc::new(Echo { dropped: d, started: s });
            server::serve(listener, handler, Rc::new(ServerConfig { limits, ..ServerConfig::default() })).await;
        })
        .unwrap();
    });
    let addr = rx.recv_timeout(Duration::from_secs(10)).expect("server thread started");
    TestServer { addr, dropped, started }
}

fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

fn drivers() -> Vec<Driver> {
    let mut d = vec![Driver::Legacy];
    if rt::uring_available() {
        d.push(Driver::IoUring);
    } else {
        eprintln!("io_uring unavailable on this kernel: testing the epoll driver only");
    }
    d
}

fn client<F: std::future::Future>(f: F) -> F::Output {
    rt::block_on(Driver::Legacy, f).unwrap()
}

#[test]
fn keep_alive_reuse_and_bodies() {
    for driver in drivers() {
        let srv = start_server(driver, Limits::default());
        client(async {
            let mut c = ClientConn::connect(srv.addr, Duration::from_secs(5)).await.unwrap();
            for i in 0..50 {
                let body = format!("hello {i}");
                let (head, got) = c.request("POST", "/echo", &[("host", b"x")], body.as_bytes()).await.unwrap();
                assert_eq!(head.status, 200);
                assert_eq!(got, body.as_bytes());
                assert!(c.reusable());
            }
            // A chunked request body, sent by hand.
            c.send_raw(
                b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            )
            .await
            .unwrap();
            let head = c.read_head(false).await.unwrap();
            assert_eq!(head.status, 200);
            assert_eq!(c.read_body().await.unwrap(), &b"abcde"[..]);
            // A streamed (chunked) response, read event by event.
            c.send("GET", "/stream?n=20", &[("host", b"x")], b"").await.unwrap();
            let head = c.read_head(false).await.unwrap();
            assert_eq!(head.headers().get("transfer-encoding"), Some(&b"chunked"[..]));
            let mut p = SseParser::new();
            let mut events = Vec::new();
            while let Some(chunk) = c.read_chunk().await.unwrap() {
                p.push(&chunk);
                while let Some(e) = p.next_event() {
                    events.push(e.data);
                }
            }
            assert_eq!(events.len(), 21);
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            assert!(c.reusable());
            let (head, _) = c.request("GET", "/echo", &[("host", b"x")], b"").await.unwrap();
            assert_eq!(head.status, 200);
        });
        assert_eq!(srv.started.load(Ordering::SeqCst), 53, "{driver:?}: one connection served all");
    }
}

#[test]
fn pipelined_requests_and_expect_continue() {
    for driver in drivers() {
        let srv = start_server(driver, Limits::default());
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\ncontent-length: 1\r\n\r\naPOST /echo HTTP/1.1\r\ncontent-length: 1\r\nconnection: close\r\n\r\nb")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{driver:?}: {out}");
        assert!(out.ends_with("\r\n\r\nb"), "{out}");

        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\ncontent-length: 2\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 25];
        s.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"ok").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK") && out.ends_with("ok"), "{out}");
    }
}

fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn limits_give_the_right_status() {
    let limits = Limits { max_body_bytes: 100, max_head_bytes: 1024, max_headers: 8, ..Limits::default() };
    for driver in drivers() {
        let srv = start_server(driver, limits.clone());
        let body = "x".repeat(101);
        let out =
            raw_exchange(srv.addr, format!("POST /echo HTTP/1.1\r\ncontent-length: 101\r\n\r\n{body}").as_bytes());
        assert!(out.starts_with("HTTP/1.1 413"), "{driver:?}: {out}");
        let chunks = format!("POST /echo HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n65\r\n{body}\r\n0\r\n\r\n");
        assert!(raw_exchange(srv.addr, chunks.as_bytes()).starts_with("HTTP/1.1 413"));
        let big = format!("GET /echo HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(2000));
        assert!(raw_exchange(srv.addr, big.as_bytes()).starts_with("HTTP/1.1 431"));
        let many: String = (0..9).map(|i| format!("h{i}: v\r\n")).collect();
        assert!(
            raw_exchange(srv.addr, format!("GET /echo HTTP/1.1\r\n{many}\r\n").as_bytes()).starts_with("HTTP/1.1 431")
        );
        assert!(raw_exchange(srv.addr, b"GARBAGE\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(
            raw_exchange(srv.addr, b"POST /echo HTTP/1.1\r\ncontent-length: zz\r\n\r\n").starts_with("HTTP/1.1 400")
        );
    }
}

#[test]
fn slow_clients_time_out_and_others_are_unaffected() {
    let limits = Limits {
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    for driver in drivers() {
        let srv = start_server(driver, limits.clone());
        // Slowloris: half a head, then nothing.
        let mut slow = std::net::TcpStream::connect(srv.addr).unwrap();
        slow.write_all(b"GET /echo HTTP/1.1\r\nhost: x\r\n").unwrap();
        let mut slow_body = std::net::TcpStream::connect(srv.addr).unwrap();
        slow_body.write_all(b"POST /echo HTTP/1.1\r\ncontent-length: 10\r\n\r\nab").unwrap();
        // Meanwhile a normal client is served.
        client(async {
            let mut c = ClientConn::connect(srv.addr, Duration::from_secs(5)).await.unwrap();
            let (head, body) = c.request("POST", "/echo", &[], b"fine").await.unwrap();
            assert_eq!((head.status, &body[..]), (200, &b"fine"[..]));
        });
        for s in [&mut slow, &mut slow_body] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            assert!(out.starts_with("HTTP/1.1 408"), "{driver:?}: {out}");
        }
    }
}

#[test]
fn client_disconnect_cancels_the_handler() {
    for driver in drivers() {
        let srv = start_server(driver, Limits::default());
        let before = srv.started.load(Ordering::SeqCst);
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        s.write_all(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        wait_until("the handler to start", Duration::from_secs(10), || srv.started.load(Ordering::SeqCst) > before);
        assert!(!srv.dropped.load(Ordering::SeqCst));
        drop(s);
        wait_until("the handler to be cancelled", Duration::from_secs(10), || srv.dropped.load(Ordering::SeqCst));
        srv.dropped.store(false, Ordering::SeqCst);
    }
}

#[test]
fn client_reports_eof_and_garbage() {
    // A server that answers garbage, then one that closes mid-body.
    for (reply, want_err) in [
        (&b"NOT HTTP\r\n\r\n"[..], "malformed"),
        (&b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"[..], "closed before the body"),
    ] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let reply = reply.to_vec();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            s.write_all(&reply).unwrap();
        });
        let err = client(async {
            let mut c = ClientConn::connect(addr, Duration::from_secs(5)).await.unwrap();
            c.request("GET", "/", &[], b"").await.unwrap_err()
        });
        assert!(err.to_string().contains(want_err), "{err}");
        t.join().unwrap();
    }
}
