//! A loopback TCP proxy that injects the network faults a service must survive, for tests
//! and chaos runs only. Put it between a service and what it talks to (PostgreSQL, a
//! dispatcher) and switch its [`Mode`] while the service runs:
//!
//! | mode | existing connections | new connections | models |
//! |---|---|---|---|
//! | [`Mode::Pass`] | bytes flow both ways | forwarded | a healthy network |
//! | [`Mode::Hold`] | requests flow; replies are held back until the mode changes | forwarded | a peer whose answers are late |
//! | [`Mode::HoldPgCompletions`] | PostgreSQL only: requests flow, and so do replies up to the next `CommandComplete` of a statement sent after the mode was set, which is held with everything after it | forwarded | a statement that executed (and, outside an explicit transaction, committed) but whose reply is late or lost |
//! | [`Mode::HoldPgRowCompletions`] | as above, but only the completion of a statement that returned rows is held; statements without rows complete | forwarded | the reply of a `… RETURNING` (a claim that leased something) lost, while everything else works |
//! | [`Mode::Blackhole`] | bytes are swallowed both ways; nothing is closed | accepted, never answered | a partition: no RST, only silence |
//! | [`Mode::Down`] | closed at once | accepted and closed at once | a server restart: refused, then back |
//!
//! [`FaultProxy::sever`] closes every open connection without changing the mode (a cut).
//! A connection that had bytes swallowed is closed when the black-hole ends: the protocol
//! on it is out of step, as after a real partition, and its peers must notice and
//! reconnect.
//!
//! Invariant: bytes are never reordered or duplicated; held replies are released in order.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Hold,
    /// See the table above. Needs the PostgreSQL wire protocol in plain text (no TLS): the
    /// proxy follows the server's message framing to find the completion. A byte-level
    /// [`Mode::Hold`] would stall a client that prepares a statement before executing it
    /// (sqlx does), so the statement would never run.
    HoldPgCompletions,
    /// Like [`Mode::HoldPgCompletions`], for statements that returned rows only.
    HoldPgRowCompletions,
    Blackhole,
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Control {
    mode: Mode,
    /// Bumped by `sever` (and on entering `Down`): connections born before close.
    generation: u64,
    /// Bumped by every mode change; request cycles are tagged with it when forwarded.
    version: u64,
    /// The `version` that entered the current PostgreSQL hold mode: only replies to
    /// requests forwarded since then are held. A reply still on its way when the mode was
    /// set belongs to a statement the caller did not mean to hold.
    hold_since: u64,
}

impl Control {
    fn change(&mut self, mode: Mode) {
        self.version += 1;
        let pg_hold = matches!(mode, Mode::HoldPgCompletions | Mode::HoldPgRowCompletions);
        if pg_hold && self.mode != mode {
            self.hold_since = self.version;
        }
        self.mode = mode;
    }
}

/// A running proxy. Dropping it stops accepting and closes every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    control: watch::Sender<Control>,
    stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Stats {
    accepted: AtomicU64,
    open: AtomicU64,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (control, control_rx) = watch::channel(Control {
            mode: Mode::Pass,
            generation: 0,
            version: 0,
            hold_since: 0,
        });
        let stats = Arc::new(Stats::default());
        let task = tokio::spawn(accept_loop(listener, target, control_rx, stats.clone()));
        Ok(Self {
            addr,
            target,
            control,
            stats,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where traffic goes.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// `url` with its `host:port` replaced by the proxy's, e.g. a PostgreSQL URL.
    pub fn rewrite_url(&self, url: &str) -> String {
        url.replace(&self.target.to_string(), &self.addr.to_string())
    }

    pub fn mode(&self) -> Mode {
        self.control.borrow().mode
    }

    /// Sets the mode (see the table in the crate docs). Entering `Down` closes every open
    /// connection.
    pub fn set_mode(&self, mode: Mode) {
        tracing::info!(proxy = %self.addr, target = %self.target, ?mode, "fault proxy mode");
        self.control.send_modify(|c| {
            if mode == Mode::Down && c.mode != Mode::Down {
                c.generation += 1;
            }
            c.change(mode);
        });
    }

    pub fn pass(&self) {
        self.set_mode(Mode::Pass);
    }

    pub fn hold(&self) {
        self.set_mode(Mode::Hold);
    }

    /// [`Mode::HoldPgCompletions`]: the next statements execute, their replies are held.
    pub fn hold_pg_completions(&self) {
        self.set_mode(Mode::HoldPgCompletions);
    }

    /// [`Mode::HoldPgRowCompletions`].
    pub fn hold_pg_row_completions(&self) {
        self.set_mode(Mode::HoldPgRowCompletions);
    }

    pub fn blackhole(&self) {
        self.set_mode(Mode::Blackhole);
    }

    pub fn down(&self) {
        self.set_mode(Mode::Down);
    }

    /// Closes every open connection now; the mode stays as it is.
    pub fn sever(&self) {
        tracing::info!(proxy = %self.addr, "fault proxy severs every connection");
        self.control.send_modify(|c| c.generation += 1);
    }

    /// Closes every open connection and switches to `mode` in one step: nothing held on
    /// an open connection is released by the mode change (a reply that was held is lost
    /// with its connection, as when a server's answer never arrives).
    pub fn sever_into(&self, mode: Mode) {
        tracing::info!(proxy = %self.addr, ?mode, "fault proxy severs every connection");
        self.control.send_modify(|c| {
            c.generation += 1;
            c.change(mode);
        });
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> u64 {
        self.stats.open.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        // Every connection task watches the control channel; a dropped sender ends them.
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    control: watch::Receiver<Control>,
    stats: Arc<Stats>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::SeqCst);
        let mut control = control.clone();
        let now = *control.borrow_and_update();
        if now.mode == Mode::Down {
            drop(client);
            continue;
        }
        let stats = stats.clone();
        tokio::spawn(async move {
            stats.open.fetch_add(1, Ordering::SeqCst);
            serve(client, target, control, now.generation).await;
            stats.open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// One proxied connection, until either side closes, it is severed, or it was
/// black-holed and the black-hole ended.
async fn serve(
    client: TcpStream,
    target: SocketAddr,
    control: watch::Receiver<Control>,
    born: u64,
) {
    let _ = client.set_nodelay(true);
    // A connection opened during a black-hole is never forwarded: the client sees silence.
    let mut wait = control.clone();
    if wait.borrow().mode == Mode::Blackhole {
        let _ = wait
            .wait_for(|c| c.mode != Mode::Blackhole || c.generation != born)
            .await;
        return;
    }
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut severed = control.clone();
    let shared = Arc::new(Shared::default());
    tokio::select! {
        // First: a sever wins over a mode change seen at the same time.
        biased;
        _ = severed.wait_for(|c| c.generation != born) => {}
        () = pump(cr, sw, control.clone(), Direction::Request(shared.clone())) => {}
        () = pump(sr, cw, control.clone(), Direction::Reply(shared)) => {}
    }
    // Dropping every half closes both sockets.
}

/// What the two pumps of one connection share.
#[derive(Debug, Default)]
struct Shared {
    /// Set by the request side when the client opened with a PostgreSQL
    /// `SSLRequest`/`GSSENCRequest`, whose one-byte answer is the only unframed message the
    /// server sends.
    encryption_requested: std::sync::atomic::AtomicBool,
    /// One entry per request cycle forwarded and not yet answered (the start-up, each
    /// `Sync`, `Query` and `FunctionCall`: each gets exactly one `ReadyForQuery`), holding
    /// the control `version` it was forwarded under.
    cycles: Mutex<VecDeque<u64>>,
}

/// Which way a pump copies.
enum Direction {
    Request(Arc<Shared>),
    Reply(Arc<Shared>),
}

/// Copies `from` to `to` under the current mode. `Hold` and `HoldPgCompletions` delay the
/// reply direction only.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut control: watch::Receiver<Control>,
    direction: Direction,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut swallowed = false;
    let mut framing: Option<PgFraming> = None;
    let mut requests = ClientFraming::default();
    let mut first = true;
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // A black-holed connection closes when the black-hole ends.
            _ = control.wait_for(|c| c.mode != Mode::Blackhole), if swallowed => return,
        };
        let reply = match &direction {
            Direction::Request(shared) => {
                if first && is_pg_encryption_request(&buf[..n]) {
                    shared.encryption_requested.store(true, Ordering::SeqCst);
                }
                let version = control.borrow().version;
                requests.scan(&buf[..n], || {
                    if let Ok(mut cycles) = shared.cycles.lock() {
                        cycles.push_back(version);
                    }
                });
                false
            }
            Direction::Reply(shared) => {
                if first {
                    framing = Some(PgFraming::new(shared.clone()));
                }
                true
            }
        };
        first = false;
        let mut start = 0;
        while start < n {
            let Control {
                mode, hold_since, ..
            } = *control.borrow_and_update();
            let upto = match mode {
                Mode::Blackhole => {
                    swallowed = true;
                    break;
                }
                Mode::Hold if reply => None,
                Mode::HoldPgCompletions | Mode::HoldPgRowCompletions if reply => {
                    let stop = if mode == Mode::HoldPgCompletions {
                        Stop::Completion
                    } else {
                        Stop::CompletionAfterRows
                    };
                    framing
                        .as_mut()
                        .map(|f| start + f.scan(&buf[start..n], stop, hold_since))
                }
                _ => {
                    if let Some(f) = framing.as_mut() {
                        f.scan(&buf[start..n], Stop::Never, hold_since);
                    }
                    Some(n)
                }
            };
            if let Some(upto) = upto
                && upto > start
            {
                if to.write_all(&buf[start..upto]).await.is_err() {
                    return;
                }
                start = upto;
            }
            if start < n && control.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Whether `first` (a client's first bytes) is PostgreSQL's `SSLRequest` or
/// `GSSENCRequest`.
fn is_pg_encryption_request(first: &[u8]) -> bool {
    first.len() >= 8
        && first[..4] == 8u32.to_be_bytes()
        && (first[4..8] == 80_877_103u32.to_be_bytes()
            || first[4..8] == 80_877_104u32.to_be_bytes())
}

/// Where [`PgFraming::scan`] stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Never,
    /// Before the next `CommandComplete`.
    Completion,
    /// Before the next `CommandComplete` of a statement that sent `DataRow`s.
    CompletionAfterRows,
}

/// Follows the framing of PostgreSQL's client messages, to tag each request cycle with the
/// mode version it was forwarded under. The first message (or two, after an encryption
/// request) has no type byte: a length and a code.
#[derive(Debug, Default)]
struct ClientFraming {
    /// Past the untyped start of the connection.
    typed: bool,
    remaining: usize,
    header: [u8; 8],
    header_len: usize,
}

/// `CancelRequest`'s code: its connection carries nothing else and gets no answer.
const PG_CANCEL_CODE: u32 = 80_877_102;

impl ClientFraming {
    /// Advances over `buf`, calling `cycle` for every message that starts a request cycle.
    fn scan(&mut self, buf: &[u8], mut cycle: impl FnMut()) {
        let mut i = 0;
        while i < buf.len() {
            if self.remaining > 0 {
                let n = self.remaining.min(buf.len() - i);
                self.remaining -= n;
                i += n;
                continue;
            }
            self.header[self.header_len] = buf[i];
            self.header_len += 1;
            i += 1;
            if self.typed && self.header_len == 5 {
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                if matches!(self.header[0], b'S' | b'Q' | b'F') {
                    cycle();
                }
                self.remaining = (len as usize).saturating_sub(4);
                self.header_len = 0;
            } else if !self.typed && self.header_len == 8 {
                let len = u32::from_be_bytes([
                    self.header[0],
                    self.header[1],
                    self.header[2],
                    self.header[3],
                ]);
                let code = u32::from_be_bytes([
                    self.header[4],
                    self.header[5],
                    self.header[6],
                    self.header[7],
                ]);
                if !is_pg_encryption_request(&self.header) {
                    // The start-up message (answered by the first ReadyForQuery).
                    self.typed = true;
                    if code != PG_CANCEL_CODE {
                        cycle();
                    }
                }
                self.remaining = (len as usize).saturating_sub(8);
                self.header_len = 0;
            }
        }
    }
}

/// Follows the framing of PostgreSQL's server messages (type byte, then a length that
/// counts itself), so a reply can be cut at a message boundary.
#[derive(Debug)]
struct PgFraming {
    /// The connection's request cycles, to tell which request a reply answers.
    shared: Arc<Shared>,
    /// A `DataRow` passed since the last `ReadyForQuery`/`CommandComplete`.
    rows: bool,
    /// Unframed bytes still to come (the answer to an encryption request).
    unframed: usize,
    /// Bytes of the current message body still to come.
    remaining: usize,
    header: [u8; 5],
    header_len: usize,
}

impl PgFraming {
    fn new(shared: Arc<Shared>) -> Self {
        let encryption_requested = shared.encryption_requested.load(Ordering::SeqCst);
        Self {
            shared,
            rows: false,
            unframed: usize::from(encryption_requested),
            remaining: 0,
            header: [0; 5],
            header_len: 0,
        }
    }

    /// Advances over `buf` and returns how many bytes it consumed: all of them, or up to
    /// the start of the first message where `stop` says to stop — a completion answering
    /// a request forwarded at mode version `hold_since` or later (or one whose request
    /// the proxy did not see).
    fn scan(&mut self, buf: &[u8], stop: Stop, hold_since: u64) -> usize {
        let mut i = 0;
        while i < buf.len() {
            if self.unframed > 0 {
                let n = self.unframed.min(buf.len() - i);
                self.unframed -= n;
                i += n;
            } else if self.remaining > 0 {
                let n = self.remaining.min(buf.len() - i);
                self.remaining -= n;
                i += n;
            } else {
                if self.header_len == 0 {
                    let kind = buf[i];
                    let stop_here = kind == b'C'
                        && match stop {
                            Stop::Never => false,
                            Stop::Completion => true,
                            Stop::CompletionAfterRows => self.rows,
                        }
                        && self.answering() >= hold_since;
                    if stop_here {
                        return i;
                    }
                    match kind {
                        b'D' => self.rows = true,
                        b'C' => self.rows = false,
                        b'Z' => {
                            self.rows = false;
                            if let Ok(mut cycles) = self.shared.cycles.lock() {
                                cycles.pop_front();
                            }
                        }
                        _ => {}
                    }
                }
                self.header[self.header_len] = buf[i];
                self.header_len += 1;
                i += 1;
                if self.header_len == 5 {
                    let len = u32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    self.remaining = (len as usize).saturating_sub(4);
                    self.header_len = 0;
                }
            }
        }
        buf.len()
    }

    /// The mode version of the request cycle being answered now (unknown: the newest).
    fn answering(&self) -> u64 {
        self.shared
            .cycles
            .lock()
            .ok()
            .and_then(|c| c.front().copied())
            .unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An echo server on a free port.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    const LIMIT: Duration = Duration::from_secs(10);

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(LIMIT, s.read_exact(&mut got))
            .await
            .expect("reply within the limit")
            .unwrap();
        got
    }

    /// Whether the peer closed (EOF or reset) within the limit.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(LIMIT, s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn passes_holds_and_releases_in_order() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"one").await, b"one");

        proxy.hold();
        s.write_all(b"two").await.unwrap();
        s.write_all(b"three").await.unwrap();
        // The echo server has answered (it sees requests), but nothing comes back yet;
        // a read that returns proves otherwise. Releasing delivers both, in order.
        let mut buf = [0u8; 8];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf))
                .await
                .is_err(),
            "a held reply leaked"
        );
        proxy.pass();
        let mut got = vec![0u8; 8];
        tokio::time::timeout(LIMIT, s.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"twothree");
    }

    #[test]
    fn pg_framing_stops_at_a_completion_across_chunk_boundaries() {
        // 'N' (the answer to SSLRequest), then ParseComplete, a DataRow, CommandComplete.
        let mut wire = vec![b'N', b'1', 0, 0, 0, 4, b'D', 0, 0, 0, 6, b'C', b'x'];
        let complete_at = wire.len();
        wire.extend_from_slice(&[b'C', 0, 0, 0, 9]);
        wire.extend_from_slice(b"UPDATE");
        wire.push(0);
        for split in 0..wire.len() {
            for stop in [Stop::Completion, Stop::CompletionAfterRows] {
                let mut f = PgFraming::new(framing_state(true));
                let (a, b) = wire.split_at(split);
                let first = f.scan(a, stop, 0);
                let found = if first < a.len() {
                    first
                } else {
                    a.len() + f.scan(b, stop, 0)
                };
                // A 'C' inside the DataRow's body is not a message start.
                assert_eq!(found, complete_at, "split at {split}, {stop:?}");
            }
        }
        // Without rows, only a plain completion hold stops.
        let rowless = [b'1', 0, 0, 0, 4, b'C', 0, 0, 0, 5, 0];
        assert_eq!(
            PgFraming::new(framing_state(false)).scan(&rowless, Stop::Completion, 0),
            5
        );
        assert_eq!(
            PgFraming::new(framing_state(false)).scan(&rowless, Stop::CompletionAfterRows, 0),
            rowless.len()
        );
    }

    fn framing_state(encryption_requested: bool) -> Arc<Shared> {
        let shared = Shared::default();
        shared
            .encryption_requested
            .store(encryption_requested, Ordering::SeqCst);
        Arc::new(shared)
    }

    #[test]
    fn only_completions_of_requests_sent_since_the_hold_are_held() {
        // Start-up (untyped), then two extended-protocol cycles: Parse+Sync, Execute+Sync.
        let mut client = vec![0, 0, 0, 9, 0, 3, 0, 0, 0];
        client.extend_from_slice(&[b'P', 0, 0, 0, 4, b'S', 0, 0, 0, 4]);
        let shared = framing_state(false);
        let mut requests = ClientFraming::default();
        let tag = |v: u64| {
            let shared = shared.clone();
            move || shared.cycles.lock().unwrap().push_back(v)
        };
        requests.scan(&client, tag(1));
        requests.scan(&[b'E', 0, 0, 0, 4, b'S', 0, 0, 0, 4], tag(2));
        assert_eq!(shared.cycles.lock().unwrap().len(), 3);

        // Server: start-up answered (ReadyForQuery), the first statement completes, then
        // the second. A hold entered at version 2 lets the first completion through and
        // stops before the second.
        let ready = [b'Z', 0, 0, 0, 5, b'I'];
        let complete = [b'C', 0, 0, 0, 5, 0];
        let mut server = Vec::new();
        server.extend_from_slice(&ready);
        server.extend_from_slice(&complete);
        server.extend_from_slice(&ready);
        let second_at = server.len();
        server.extend_from_slice(&complete);
        server.extend_from_slice(&ready);
        let mut f = PgFraming::new(shared.clone());
        assert_eq!(f.scan(&server, Stop::Completion, 2), second_at);
    }

    #[tokio::test]
    async fn down_closes_and_refuses_then_recovers() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"x").await, b"x");
        proxy.down();
        assert!(closed(&mut s).await, "open connection closed");
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        assert!(closed(&mut refused).await, "new connection closed at once");
        proxy.pass();
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut again, b"back").await, b"back");
    }

    #[tokio::test]
    async fn sever_closes_open_connections_only() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"x").await, b"x");
        proxy.sever();
        assert!(closed(&mut s).await);
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut fresh, b"y").await, b"y");
        assert_eq!(proxy.accepted(), 2);
    }

    #[tokio::test]
    async fn blackhole_swallows_then_closes_on_heal() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"x").await, b"x");
        proxy.blackhole();
        s.write_all(b"lost").await.unwrap();
        let mut buf = [0u8; 8];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf))
                .await
                .is_err(),
            "a black-holed connection answered"
        );
        proxy.pass();
        assert!(
            closed(&mut s).await,
            "out-of-step connection closed on heal"
        );
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut fresh, b"ok").await, b"ok");
    }
}
