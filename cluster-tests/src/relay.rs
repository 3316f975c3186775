//! A UDP relay in front of a node's QUIC port, for fault injection: it forwards datagrams both
//! ways (one upstream socket per client), while cut drops them all, can drop a share of them at
//! random, and can delay the datagrams towards the node. Runs on its own threads, stopped on drop.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(50);

pub struct UdpRelay {
    /// The loopback port clients send to.
    pub port: u16,
    cut: Arc<AtomicBool>,
    /// Milliseconds each datagram towards the node is held.
    delay_ms: Arc<AtomicU64>,
    /// Per mille of datagrams dropped, each direction.
    loss: Arc<AtomicU64>,
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
        let (delay_ms, loss) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let thread = {
            let faults = Faults { cut: cut.clone(), loss: loss.clone(), stop: stop.clone() };
            let delay_ms = delay_ms.clone();
            std::thread::spawn(move || relay(public, target, faults, delay_ms))
        };
        Ok(UdpRelay { port, cut, delay_ms, loss, stop, thread: Some(thread) })
    }

    /// Drops this share (0.0 to 1.0) of the datagrams in each direction, at random.
    pub fn lose(&self, share: f64) {
        self.loss.store((share.clamp(0.0, 1.0) * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Holds every datagram towards the node for `delay` (in order) before forwarding it.
    pub fn delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Drops every datagram in both directions, those held by a delay included (`true`), or
    /// forwards them again (`false`).
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

/// The faults both directions apply, shared with the relay's threads.
#[derive(Clone)]
struct Faults {
    cut: Arc<AtomicBool>,
    loss: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Faults {
    /// Whether to drop the next datagram: all while cut, else the random share (`random` is a
    /// xorshift state per thread).
    fn drops(&self, random: &mut u64) -> bool {
        *random ^= *random << 13;
        *random ^= *random >> 7;
        *random ^= *random << 17;
        self.cut.load(Ordering::Relaxed) || *random % 1000 < self.loss.load(Ordering::Relaxed)
    }
}

fn relay(public: UdpSocket, target: SocketAddr, faults: Faults, delay_ms: Arc<AtomicU64>) {
    let mut upstreams: HashMap<SocketAddr, UdpSocket> = HashMap::new();
    let mut returns = Vec::new();
    let mut held: VecDeque<(Instant, SocketAddr, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 65_536];
    let mut random = 0x9E37_79B9_7F4A_7C15u64;
    while !faults.stop.load(Ordering::Relaxed) {
        if faults.cut.load(Ordering::Relaxed) {
            held.clear();
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _, _)| *due <= now) {
            let (_, client, datagram) = held.pop_front().expect("checked");
            if let Some(upstream) = upstreams.get(&client) {
                let _ = upstream.send(&datagram);
            }
        }
        let wait = held.front().map_or(POLL, |(due, _, _)| due.saturating_duration_since(now).clamp(Duration::from_millis(1), POLL));
        let _ = public.set_read_timeout(Some(wait));
        let Ok((n, client)) = public.recv_from(&mut buf) else { continue };
        if faults.drops(&mut random) {
            continue;
        }
        let upstream = match upstreams.entry(client) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let Ok(upstream) = UdpSocket::bind("127.0.0.1:0").and_then(|s| s.connect(target).map(|_| s)) else { continue };
                let _ = upstream.set_read_timeout(Some(POLL));
                returns.push(spawn_return(&upstream, &public, client, faults.clone()));
                entry.insert(upstream)
            }
        };
        match delay_ms.load(Ordering::Relaxed) {
            0 if held.is_empty() => drop(upstream.send(&buf[..n])),
            ms => held.push_back((Instant::now() + Duration::from_millis(ms), client, buf[..n].to_vec())),
        }
    }
    for thread in returns {
        let _ = thread.join();
    }
}

/// Forwards what the node answers on `upstream` back to `client`.
fn spawn_return(upstream: &UdpSocket, public: &UdpSocket, client: SocketAddr, faults: Faults) -> JoinHandle<()> {
    let (back, public) = (upstream.try_clone().expect("clone a UDP socket"), public.try_clone().expect("clone a UDP socket"));
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        let mut random = 0xD1B5_4A32_D192_ED03u64 ^ u64::from(client.port());
        while !faults.stop.load(Ordering::Relaxed) {
            if let Ok(n) = back.recv(&mut buf) {
                if !faults.drops(&mut random) {
                    let _ = public.send_to(&buf[..n], client);
                }
            }
        }
    })
}
