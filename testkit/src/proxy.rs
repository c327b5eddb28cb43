//! A loopback TCP proxy a test can cut and restore, to make a real service
//! unreachable for one instance without touching the shared server. It can
//! also lose one reply: after a connection sends a marker and then a given
//! request, the request reaches the server but its answer never comes back.
//! And it can be slow: every chunk from the server waits a set delay.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    cut: watch::Sender<u64>,
    trap: Arc<Mutex<Option<Trap>>>,
    sprung: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    open: Arc<AtomicUsize>,
}

/// Loses the reply to the first request containing `then` on a connection
/// that earlier (or in the same request) sent `marker`.
struct Trap {
    marker: Vec<u8>,
    then: Vec<u8>,
}

impl Proxy {
    pub async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = watch::channel(0u64);
        let trap = Arc::new(Mutex::new(None));
        let sprung = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let target = target.to_owned();
        let (up2, cut2, trap2, sprung2, delay2, open2) = (
            up.clone(),
            cut.clone(),
            trap.clone(),
            sprung.clone(),
            delay_ms.clone(),
            open.clone(),
        );
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let cut_rx = cut2.subscribe();
                let (trap, sprung, delay, open) = (trap2.clone(), sprung2.clone(), delay2.clone(), open2.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    open.fetch_add(1, Ordering::SeqCst);
                    pipe(inbound, outbound, cut_rx, trap, sprung, delay).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Proxy {
            port,
            up,
            cut,
            trap,
            sprung,
            delay_ms,
            open,
        }
    }

    /// Connections passing through now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Delays every chunk the server sends by this much, on open and new
    /// connections alike: a slow link, not a broken one.
    pub fn slow_down(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Refuses new connections and drops the open ones.
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Arms a one-shot trap: on the first connection that sends `marker` and
    /// then `then`, `then` is delivered to the server, and the client's
    /// connection is closed before any answer reaches it.
    pub fn lose_reply_after(&self, marker: &[u8], then: &[u8]) {
        *self.trap.lock().unwrap() = Some(Trap {
            marker: marker.to_vec(),
            then: then.to_vec(),
        });
    }

    /// Whether the armed trap has fired.
    pub fn reply_lost(&self) -> bool {
        self.sprung.load(Ordering::SeqCst)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

async fn pipe(
    inbound: TcpStream,
    outbound: TcpStream,
    mut cut: watch::Receiver<u64>,
    trap: Arc<Mutex<Option<Trap>>>,
    sprung: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
) {
    let (mut client_rx, mut client_tx) = inbound.into_split();
    let (mut server_rx, mut server_tx) = outbound.into_split();
    let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut marked = false;
    loop {
        tokio::select! {
            _ = cut.changed() => return,
            r = client_rx.read(&mut up) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let chunk = &up[..n];
                let fire = {
                    let mut armed = trap.lock().unwrap();
                    match armed.as_ref() {
                        Some(t) => {
                            marked |= contains(chunk, &t.marker);
                            let fire = marked && contains(chunk, &t.then);
                            if fire {
                                *armed = None;
                            }
                            fire
                        }
                        None => false,
                    }
                };
                if server_tx.write_all(chunk).await.is_err() {
                    return;
                }
                if fire {
                    let _ = server_tx.flush().await;
                    // The client loses its connection; the server keeps its
                    // own a while, so it reads and executes the request.
                    drop((client_rx, client_tx));
                    sprung.store(true, Ordering::SeqCst);
                    let drain = async {
                        while let Ok(n) = server_rx.read(&mut down).await {
                            if n == 0 {
                                break;
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
                    return;
                }
            }
            r = server_rx.read(&mut down) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let delay = delay_ms.load(Ordering::SeqCst);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                if client_tx.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
