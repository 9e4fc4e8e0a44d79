//! A loopback TCP proxy the e2e run controls, to cut the network between an agent and its
//! dispatcher without touching either process: `cut()` black-holes every connection (bytes
//! are swallowed, nothing is closed — like a partition, not a reset), `heal()` lets new
//! connections through again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug)]
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    /// Bumped by `sever()`: connections opened before it are closed at once.
    generation: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:target`.
    pub async fn start(target: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, gen_rx) = tokio::sync::watch::channel(0u64);
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let flag = flag.clone();
                let mut severed = gen_rx.clone();
                let born = *severed.borrow_and_update();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await {
                        tokio::select! {
                            () = pipe(client, server, flag) => {}
                            _ = severed.wait_for(|g| *g != born) => {} // both sockets dropped: reset
                        }
                    }
                });
            }
        });
        Ok(Self {
            port,
            cut,
            generation,
            task,
        })
    }

    /// Closes every open connection at once (a cut stream, not a silent partition); new
    /// connections pass.
    pub fn sever(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways while not cut; once cut, reads and discards, so the peers see
/// silence. A connection cut once stays dead (as after a real partition, the endpoints
/// must notice and reconnect).
async fn pipe(client: TcpStream, server: TcpStream, cut: Arc<AtomicBool>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let dead = Arc::new(AtomicBool::new(false));
    let up = copy(&mut cr, &mut sw, cut.clone(), dead.clone());
    let down = copy(&mut sr, &mut cw, cut, dead);
    tokio::join!(up, down);
}

async fn copy(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
    dead: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            dead.store(true, Ordering::SeqCst);
        }
        if dead.load(Ordering::SeqCst) {
            continue; // swallowed: the other side hears nothing
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
