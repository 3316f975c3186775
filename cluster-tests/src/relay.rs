//! A UDP relay in front of a node's QUIC port, for fault injection: it forwards datagrams both
//! ways (one upstream socket per client) and, while cut, drops them all. Runs on its own threads,
//! stopped on drop.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(50);

pub struct UdpRelay {
    /// The loopback port clients send to.
    pub port: u16,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpRelay {
    /// Relays 127.0.0.1:`port` (a free port) to `target`.
    pub fn start(target: SocketAddr) -> std::io::Result<UdpRelay> {
        let public = UdpSocket::bind("127.0.0.1:0")?;
        public.set_read_timeout(Some(POLL))?;
        let port = public.local_addr()?.port();
        let (cut, stop) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (cut, stop) = (cut.clone(), stop.clone());
            std::thread::spawn(move || relay(public, target, cut, stop))
        };
        Ok(UdpRelay { port, cut, stop, thread: Some(thread) })
    }

    /// Drops every datagram in both directions (`true`) or forwards them again (`false`).
    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn relay(public: UdpSocket, target: SocketAddr, cut: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    let mut upstreams: HashMap<SocketAddr, UdpSocket> = HashMap::new();
    let mut returns = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, client)) = public.recv_from(&mut buf) else { continue };
        if cut.load(Ordering::Relaxed) {
            continue;
        }
        let upstream = match upstreams.entry(client) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let Ok(upstream) = UdpSocket::bind("127.0.0.1:0").and_then(|s| s.connect(target).map(|_| s)) else { continue };
                let _ = upstream.set_read_timeout(Some(POLL));
                returns.push(spawn_return(&upstream, &public, client, cut.clone(), stop.clone()));
                entry.insert(upstream)
            }
        };
        let _ = upstream.send(&buf[..n]);
    }
    for thread in returns {
        let _ = thread.join();
    }
}

/// Forwards what the node answers on `upstream` back to `client`.
fn spawn_return(
    upstream: &UdpSocket,
    public: &UdpSocket,
    client: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    let (back, public) = (upstream.try_clone().expect("clone a UDP socket"), public.try_clone().expect("clone a UDP socket"));
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok(n) = back.recv(&mut buf) {
                if !cut.load(Ordering::Relaxed) {
                    let _ = public.send_to(&buf[..n], client);
                }
            }
        }
    })
}
