//! A fault-injecting TCP proxy for host-to-host traffic.
//!
//! Each host gets a [`Proxy`] in front of it and advertises the proxy's address, so every byte
//! another host sends it passes through the proxy. Hosts listen (and connect out) on their own
//! loopback address (`127.0.0.X`), so the proxy knows which host a connection comes from by its
//! source IP. [`Net`] holds the state of every directed link `from → to`:
//!
//! - `down`: bytes travelling from `from` to `to` are held (on connections opened in either
//!   direction) until the link is up again, like a cable pulled out and plugged back in, with
//!   TCP retransmitting. Cutting one direction only gives a one-way partition.
//! - `delay` (+ up to `jitter`): each chunk waits before it is passed on (order is kept).
//! - `loss`: each chunk has this chance of resetting its connection (TCP cannot lose bytes in
//!   the middle of a stream; what a host sees of packet loss is stalls and broken connections).
//!
//! Connections from addresses that are not registered hosts (test clients) are never faulted.
//! The proxy connects to its host from the client's own address, so the host sees who calls.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::seeded::Seeded;

/// The state of one direction between two hosts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Link {
    pub down: bool,
    pub delay: Duration,
    pub jitter: Duration,
    /// Chance, per chunk, that the connection is reset.
    pub loss: f64,
}

#[derive(Default)]
struct NetState {
    links: HashMap<(u32, u32), Link>,
    hosts: HashMap<IpAddr, u32>,
}

/// The fault table shared by every proxy of one test.
#[derive(Clone)]
pub struct Net {
    state: Arc<Mutex<NetState>>,
    changed: Arc<watch::Sender<u64>>,
    rng: Arc<Mutex<Seeded>>,
}

impl Net {
    pub fn new(seed: u64) -> Self {
        Self {
            state: Arc::default(),
            changed: Arc::new(watch::channel(0).0),
            rng: Arc::new(Mutex::new(Seeded::new(seed))),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Connections from `ip` come from host `id`.
    pub fn register_host(&self, id: u32, ip: IpAddr) {
        self.lock().hosts.insert(ip, id);
    }

    pub fn link(&self, from: u32, to: u32) -> Link {
        self.lock()
            .links
            .get(&(from, to))
            .cloned()
            .unwrap_or_default()
    }

    pub fn set(&self, from: u32, to: u32, link: Link) {
        self.lock().links.insert((from, to), link);
        self.bump();
    }

    /// Cuts every link between the two groups, both ways.
    pub fn partition(&self, a: &[u32], b: &[u32]) {
        {
            let mut s = self.lock();
            for x in a {
                for y in b {
                    for key in [(*x, *y), (*y, *x)] {
                        s.links.entry(key).or_default().down = true;
                    }
                }
            }
        }
        self.bump();
    }

    /// Cuts `from → to` only.
    pub fn cut_one_way(&self, from: u32, to: u32) {
        self.lock().links.entry((from, to)).or_default().down = true;
        self.bump();
    }

    /// Delay, jitter and loss on every link between the given hosts.
    pub fn degrade(&self, hosts: &[u32], delay: Duration, jitter: Duration, loss: f64) {
        {
            let mut s = self.lock();
            for x in hosts {
                for y in hosts {
                    if x != y {
                        let l = s.links.entry((*x, *y)).or_default();
                        l.delay = delay;
                        l.jitter = jitter;
                        l.loss = loss;
                    }
                }
            }
        }
        self.bump();
    }

    /// Every link back to normal.
    pub fn heal(&self) {
        self.lock().links.clear();
        self.bump();
    }

    fn host_of(&self, ip: IpAddr) -> Option<u32> {
        self.lock().hosts.get(&ip).copied()
    }

    fn roll(&self) -> f64 {
        let mut r = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        r.below(1_000_000) as f64 / 1_000_000.0
    }

    /// Starts a proxy for host `id`, listening on `ip` (port chosen by the system). Point it at
    /// the host with [`Proxy::set_upstream`] once the host is listening.
    pub async fn proxy(&self, id: u32, ip: IpAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind((ip, 0)).await?;
        let addr = listener.local_addr()?;
        let upstream: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let net = self.clone();
        let up = upstream.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, peer)) = listener.accept().await else {
                    continue;
                };
                let target = *up.lock().unwrap_or_else(|p| p.into_inner());
                let Some(target) = target else {
                    continue; // host not started yet: drop the connection
                };
                let src = net.host_of(peer.ip());
                let net = net.clone();
                tokio::spawn(async move {
                    // From the client's own address, as if there were no proxy: the host sees
                    // which host is calling (its connection caps exempt the cluster's hosts).
                    if let Ok(server) = connect_from(peer.ip(), target).await {
                        let _ = conn.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        net.pipe(conn, server, src, id).await;
                    }
                });
            }
        });
        Ok(Proxy {
            addr,
            upstream,
            task,
        })
    }

    /// Copies both ways, applying `src → dst` faults to what the client sends and `dst → src`
    /// faults to what comes back. Returns (dropping both sockets) once both directions have
    /// ended, or as soon as either resets.
    async fn pipe(&self, client: TcpStream, server: TcpStream, src: Option<u32>, dst: u32) {
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let up = self.clone().copy(cr, sw, src.map(|s| (s, dst)));
        let down = self.clone().copy(sr, cw, src.map(|s| (dst, s)));
        tokio::pin!(up, down);
        let (first, up_ended) = tokio::select! {
            e = &mut up => (e, true),
            e = &mut down => (e, false),
        };
        match (first, up_ended) {
            // When one direction resets, the other goes too.
            (End::Reset, _) => {}
            // A half-close: the other direction goes on until it ends on its own.
            (End::Eof, true) => {
                down.await;
            }
            (End::Eof, false) => {
                up.await;
            }
        }
    }

    /// Copies one direction until its source ends (`Eof`, after passing the end on) or
    /// anything breaks (`Reset`).
    async fn copy(
        self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        link: Option<(u32, u32)>,
    ) -> End {
        let mut buf = vec![0u8; 64 * 1024];
        let mut changes = self.changed.subscribe();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) => {
                    let _ = to.shutdown().await;
                    return End::Eof;
                }
                Err(_) => return End::Reset,
                Ok(n) => n,
            };
            if let Some((a, b)) = link {
                // Hold the bytes while the link is down.
                let l = loop {
                    let l = self.link(a, b);
                    if !l.down {
                        break l;
                    }
                    if changes.changed().await.is_err() {
                        return End::Reset;
                    }
                };
                if l.loss > 0.0 && self.roll() < l.loss {
                    return End::Reset; // both halves are dropped
                }
                let wait = l.delay + l.jitter.mul_f64(self.roll());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return End::Reset;
            }
        }
    }
}

/// Connects to `to` from address `ip` (any port).
async fn connect_from(ip: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match ip {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(to).await
}

/// How one direction of a proxied connection ended.
enum End {
    /// Its source closed its side: the end was passed on.
    Eof,
    /// A read or write failed, or a simulated loss reset it.
    Reset,
}

/// One host's proxy. Stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: Arc<Mutex<Option<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub fn set_upstream(&self, to: SocketAddr) {
        *self.upstream.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// An echo server, a proxy in front of it, and a client on a registered host address.
    async fn setup(net: &Net) -> (Proxy, IpAddr) {
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let echo_addr = echo.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = net
            .proxy(2, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)))
            .await
            .expect("proxy");
        proxy.set_upstream(echo_addr);
        let client_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 21));
        net.register_host(1, client_ip);
        (proxy, client_ip)
    }

    async fn connect_from(ip: IpAddr, to: SocketAddr) -> TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(ip, 0)).expect("bind source");
        sock.connect(to).await.expect("connect")
    }

    async fn echo_within(s: &mut TcpStream, msg: &[u8], within: Duration) -> bool {
        s.write_all(msg).await.expect("write");
        let mut got = vec![0u8; msg.len()];
        matches!(
            tokio::time::timeout(within, s.read_exact(&mut got)).await,
            Ok(Ok(_))
        ) && got == msg
    }

    #[tokio::test]
    async fn passes_bytes_holds_them_while_down_and_delivers_after_healing() {
        let net = Net::new(1);
        let (proxy, ip) = setup(&net).await;
        let mut s = connect_from(ip, proxy.addr).await;
        assert!(echo_within(&mut s, b"hello", Duration::from_secs(2)).await);

        net.partition(&[1], &[2]);
        assert!(
            !echo_within(&mut s, b"held", Duration::from_millis(300)).await,
            "bytes crossed a cut link"
        );
        net.heal();
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got))
            .await
            .expect("held bytes delivered after healing")
            .expect("read");
        assert_eq!(&got, b"held");
    }

    #[tokio::test]
    async fn one_way_cuts_stop_only_their_direction() {
        let net = Net::new(2);
        let (proxy, ip) = setup(&net).await;
        let mut s = connect_from(ip, proxy.addr).await;
        // Replies (2 → 1) are cut: the request arrives but its echo never comes back.
        net.cut_one_way(2, 1);
        assert!(!echo_within(&mut s, b"x", Duration::from_millis(300)).await);
        net.heal();
        let mut got = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut got))
            .await
            .expect("reply released")
            .expect("read");
    }

    #[tokio::test]
    async fn delay_slows_each_chunk_and_clients_are_never_faulted() {
        let net = Net::new(3);
        let (proxy, ip) = setup(&net).await;
        net.set(
            1,
            2,
            Link {
                delay: Duration::from_millis(150),
                ..Link::default()
            },
        );
        let mut s = connect_from(ip, proxy.addr).await;
        let t = std::time::Instant::now();
        assert!(echo_within(&mut s, b"slow", Duration::from_secs(2)).await);
        assert!(
            t.elapsed() >= Duration::from_millis(150),
            "{:?}",
            t.elapsed()
        );
        // An unregistered source (a test client) passes even when every link is down.
        net.partition(&[1], &[2]);
        let mut c = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), proxy.addr).await;
        assert!(echo_within(&mut c, b"client", Duration::from_secs(2)).await);
    }

    /// Open descriptors of this process.
    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finished_connections_release_both_sockets() {
        let net = Net::new(5);
        let (proxy, ip) = setup(&net).await;
        // Warm up (the runtime's own descriptors, the echo server's first accept).
        for _ in 0..10 {
            let mut s = connect_from(ip, proxy.addr).await;
            assert!(echo_within(&mut s, b"warm", Duration::from_secs(2)).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = open_fds();
        for i in 0..3000 {
            let mut s = connect_from(ip, proxy.addr).await;
            assert!(
                echo_within(&mut s, b"short", Duration::from_secs(2)).await,
                "connection {i}"
            );
            // Half of them closed by the client, the other half shut down for writing first.
            if i % 2 == 0 {
                s.shutdown().await.expect("shutdown");
            }
        }
        // The last pipes end a moment after their clients close.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = open_fds();
            if now <= before + 20 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "3000 short connections left {} descriptors open (before: {before})",
                now
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn loss_resets_connections() {
        let net = Net::new(4);
        let (proxy, ip) = setup(&net).await;
        net.set(
            1,
            2,
            Link {
                loss: 1.0,
                ..Link::default()
            },
        );
        let mut s = connect_from(ip, proxy.addr).await;
        assert!(!echo_within(&mut s, b"lost", Duration::from_millis(500)).await);
    }
}
