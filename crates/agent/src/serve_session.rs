//! `streamspace-agent serve-session`: the tiny HTTP server the default templates run, so a
//! session has a reachable URL on a bare machine (no Python, no browser).
//!
//! It answers `GET /` with a small page naming the session and `GET /healthz` with `ok`,
//! one request per connection. Hand-written on tokio rather than pulling an HTTP framework
//! into every session process: it only ever has to answer a health probe and a curious
//! human. It needs no signal handling: SIGTERM's default action ends it, which is what
//! stopping a session asks for.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read; anything longer is answered 431 and dropped.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A client that sends nothing within this is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Listens on `host:port` and serves until the process is signalled.
pub async fn run(session_id: &str, host: IpAddr, port: u16) -> io::Result<()> {
    let listener = TcpListener::bind(SocketAddr::new(host, port)).await?;
    serve(listener, session_id.to_owned()).await
}

/// Serves on an already bound listener (tests bind port 0).
pub async fn serve(listener: TcpListener, session_id: String) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let session_id = session_id.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &session_id)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, session_id: &str) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_REQUEST_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
    }
    let text = String::from_utf8_lossy(&head);
    let mut request_line = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (request_line.next(), request_line.next());
    match (method, path) {
        (Some("GET" | "HEAD"), Some("/healthz")) => {
            respond(&mut stream, "200 OK", "text/plain; charset=utf-8", "ok\n").await
        }
        (Some("GET" | "HEAD"), Some("/")) => {
            let id = escape_html(session_id);
            let page = format!(
                "<!doctype html>\n<html><head><title>StreamSpace session {id}</title></head>\n\
                 <body><h1>StreamSpace session {id}</h1><p>Served by the process runtime.</p></body></html>\n"
            );
            respond(&mut stream, "200 OK", "text/html; charset=utf-8", &page).await
        }
        (Some("GET" | "HEAD"), _) => {
            respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await
        }
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn answers_root_healthz_and_unknown_paths() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, "s<1>".into()));
        let root = get(addr, "/").await;
        assert!(root.starts_with("HTTP/1.1 200 OK\r\n"), "{root}");
        assert!(root.contains("StreamSpace session s&lt;1&gt;"), "{root}");
        assert!(get(addr, "/healthz").await.ends_with("\r\n\r\nok\n"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    }
}
