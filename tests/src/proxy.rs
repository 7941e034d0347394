//! A TCP proxy in front of the API server that can be frozen: connections stay open and nothing
//! more is forwarded, as when a network path blackholes. For tests of what a client does when its
//! calls hang.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Blackhole {
    addr: std::net::SocketAddr,
    frozen: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Copies bytes until the proxy is frozen; then holds the connection without forwarding.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Blackholed: keep both ends open, forward nothing, until the test ends.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Blackhole {
    /// Listens on a free loopback port and forwards to the host and port of `upstream`.
    pub async fn start(upstream: &http::Uri) -> Blackhole {
        let target = format!(
            "{}:{}",
            upstream.host().expect("upstream host"),
            upstream.port_u16().expect("upstream port")
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let frozen = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&frozen);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (target, f) = (target.clone(), Arc::clone(&f));
                tokio::spawn(async move {
                    if f.load(Ordering::SeqCst) {
                        // New connections are accepted and then hang, too.
                        let _hold = &client;
                        std::future::pending::<()>().await;
                    }
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, Arc::clone(&f)), pump(sr, cw, f));
                });
            }
        });
        Blackhole { addr, frozen, task }
    }

    /// `https://127.0.0.1:<port>`: the API server's certificate has 127.0.0.1 as a SAN.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
