//! The API's connections: accepted under caps, served by hyper with a header-read timeout, and
//! drained on a graceful stop.
//!
//! `axum::serve` sets no timeout and no cap: a client that opens connections and sends nothing
//! holds a file descriptor each for ever, and about a thousand of them used to exhaust the
//! process's descriptors, after which the Raft log could not open a segment and the host fenced
//! its VMs. Here:
//! - hyper's `header_read_timeout` closes a connection whose request headers do not arrive in
//!   time, both on a new connection and on an idle kept-alive one between requests;
//! - a connection from outside the cluster counts against a cap per client address and a cap
//!   over all such clients; one over a cap is answered `503` and closed at once, so it holds no
//!   descriptor;
//! - connections from the cluster's own hosts (their addresses, from the replicated host
//!   records) count only against a hard ceiling, so host-to-host traffic (Raft, heartbeats,
//!   forwarded requests) keeps working while the public API is flooded;
//! - [`raise_nofile_limit`] lifts the soft descriptor limit to the hard one at start.
//!
//! The admission rule ([`Gate`]) is plain bookkeeping with no I/O, tested below.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// Limits on the API's connections (`novacron serve --max-connections ...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections from outside the cluster, over all client addresses.
    pub max_connections: usize,
    /// Connections from one client address outside the cluster.
    pub max_per_ip: usize,
    /// A connection whose request headers do not arrive within this time is closed (a new
    /// connection, or a kept-alive one idle between two requests).
    pub header_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_per_ip: 256,
            header_timeout: Duration::from_secs(15),
        }
    }
}

impl ConnLimits {
    /// Connections from the cluster's own hosts beyond the public cap, before even they are
    /// refused: the last guard of the process's descriptors.
    const HOSTS_HEADROOM: usize = 1024;
    /// Descriptors kept for everything else (the Raft log, redb, QMP sockets, disk files).
    const FD_RESERVE: u64 = 512;
    /// The header-read (and idle) timeout of the cluster's own hosts' connections: longer than
    /// the hosts keep idle connections in their pools (30 s).
    pub const HOST_HEADER_TIMEOUT: Duration = Duration::from_secs(60);

    /// The limits, lowered where the open files limit `fd_limit` could not hold them.
    pub fn within_fd_limit(&self, fd_limit: Option<u64>) -> ConnLimits {
        let Some(fds) = fd_limit else {
            return self.clone();
        };
        let room = usize::try_from(fds.saturating_sub(Self::FD_RESERVE)).unwrap_or(usize::MAX);
        let headroom = Self::HOSTS_HEADROOM.min(room / 4);
        let public = self
            .max_connections
            .min(room.saturating_sub(headroom))
            .max(1);
        let mut out = self.clone();
        if public < self.max_connections {
            tracing::warn!(
                "the open files limit ({fds}) holds only {public} public connections; \
                 --max-connections lowered from {}",
                self.max_connections
            );
            out.max_connections = public;
            out.max_per_ip = out.max_per_ip.min(public);
        }
        out
    }

    /// Every connection, the hosts' included, stops here: the public cap plus room for the
    /// hosts (a quarter of the whole at most, as `within_fd_limit` reckons).
    fn ceiling(&self) -> usize {
        self.max_connections + Self::HOSTS_HEADROOM.min(self.max_connections / 3)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 || self.max_per_ip == 0 {
            return Err("--max-connections and --max-connections-per-ip must be at least 1".into());
        }
        if self.max_per_ip > self.max_connections {
            return Err(format!(
                "--max-connections-per-ip ({}) cannot exceed --max-connections ({})",
                self.max_per_ip, self.max_connections
            ));
        }
        if self.header_timeout < Duration::from_secs(5) {
            // Clients keep idle connections for less than that (4 s), so none reuses one as
            // the server closes it.
            return Err("--header-timeout must be at least 5 seconds".into());
        }
        Ok(())
    }
}

/// Why a connection was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Its client address already holds `max_per_ip` connections.
    PerClient,
    /// Clients outside the cluster hold `max_connections` in all.
    Total,
    /// Even the cluster's hosts are past the hard ceiling.
    Ceiling,
}

impl Refusal {
    fn message(self) -> &'static str {
        match self {
            Refusal::PerClient => "too many connections from this address",
            Refusal::Total => "too many connections to this host",
            Refusal::Ceiling => "this host is out of connections",
        }
    }
}

#[derive(Default)]
struct Counts {
    /// Connections from outside the cluster, per client address.
    per_ip: HashMap<IpAddr, usize>,
    /// Connections from outside the cluster, in all.
    public: usize,
    /// Every connection, the cluster's hosts' included.
    all: usize,
}

/// Counts open connections and decides whether a new one is admitted.
pub struct Gate {
    limits: ConnLimits,
    counts: Mutex<Counts>,
}

/// An admitted connection's place; dropping it frees the place.
pub struct Permit {
    gate: Arc<Gate>,
    /// The client address, when it counts against the public caps.
    public: Option<IpAddr>,
}

impl Gate {
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `ip` (`host`: one of the cluster's own hosts), or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, host: bool) -> Result<Permit, Refusal> {
        let mut c = self.counts();
        if c.all >= self.limits.ceiling() {
            return Err(Refusal::Ceiling);
        }
        if !host {
            let mine = c.per_ip.get(&ip).copied().unwrap_or(0);
            if mine >= self.limits.max_per_ip {
                return Err(Refusal::PerClient);
            }
            if c.public >= self.limits.max_connections {
                return Err(Refusal::Total);
            }
            *c.per_ip.entry(ip).or_default() += 1;
            c.public += 1;
        }
        c.all += 1;
        Ok(Permit {
            gate: self.clone(),
            public: (!host).then_some(ip),
        })
    }

    /// Open connections: (from outside the cluster, all).
    pub fn open(&self) -> (usize, usize) {
        let c = self.counts();
        (c.public, c.all)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.gate.counts();
        c.all = c.all.saturating_sub(1);
        if let Some(ip) = self.public {
            c.public = c.public.saturating_sub(1);
            if let Some(n) = c.per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    c.per_ip.remove(&ip);
                }
            }
        }
    }
}

/// The addresses of the cluster's hosts, refreshed by the node as host records change.
/// Connections are admitted under the host or the public rules when accepted; when the set
/// changes, a connection admitted under the rules that no longer fit its address is closed
/// gracefully (see [`serve`]).
#[derive(Clone)]
pub struct HostAddrs {
    ips: Arc<RwLock<HashSet<IpAddr>>>,
    changed: Arc<tokio::sync::watch::Sender<()>>,
}

impl Default for HostAddrs {
    fn default() -> Self {
        Self {
            ips: Arc::default(),
            changed: Arc::new(tokio::sync::watch::Sender::new(())),
        }
    }
}

impl HostAddrs {
    pub fn set(&self, addrs: HashSet<IpAddr>) {
        let canonical: HashSet<IpAddr> = addrs.into_iter().map(|ip| ip.to_canonical()).collect();
        let mut ips = self.ips.write().unwrap_or_else(|p| p.into_inner());
        if *ips != canonical {
            *ips = canonical;
            drop(ips);
            self.changed.send_replace(());
        }
    }

    /// Whether `ip` is one of the hosts' (an IPv4 address seen as IPv4-mapped IPv6 on a `[::]`
    /// listener counts as itself).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        self.ips
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ip.to_canonical())
    }

    /// Wakes when the set changes.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<()> {
        self.changed.subscribe()
    }
}

/// Resolves host API addresses (`http://host:port`) to IP addresses; names that do not
/// resolve are left out.
pub async fn resolve_hosts(addresses: impl IntoIterator<Item = String>) -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    for a in addresses {
        let rest = a.split("://").nth(1).unwrap_or(&a);
        let authority = rest.split('/').next().unwrap_or(rest);
        if let Ok(sa) = authority.parse::<SocketAddr>() {
            out.insert(sa.ip());
            continue;
        }
        let with_port = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        if let Ok(Ok(found)) =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(with_port)).await
        {
            out.extend(found.map(|s| s.ip()));
        }
    }
    out
}

/// Lifts the soft limit on open files to the hard limit, so that the caps above, not the
/// kernel's default of 1024, decide how many connections a host holds. Returns the new limit.
pub fn raise_nofile_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!("cannot raise the open files limit from {soft} to {hard}: {e}");
            return Some(soft);
        }
        return Some(hard);
    }
    Some(soft)
}

/// Logs at most one warning a minute for refused connections, with the count since the last.
struct RefusalLog {
    last: Option<Instant>,
    since: u64,
}

impl RefusalLog {
    fn note(&mut self, ip: IpAddr, why: Refusal, gate: &Gate) {
        self.since += 1;
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        let (public, all) = gate.open();
        tracing::warn!(
            client = %ip,
            refused = self.since,
            open_public = public,
            open_all = all,
            "refusing connections: {}",
            why.message()
        );
        self.last = Some(Instant::now());
        self.since = 0;
    }
}

/// An admitted connection's place, shared by its requests: a request that becomes a WebSocket
/// keeps it (`Extension<ConnPermit>`) for as long as the WebSocket lives, so upgraded
/// connections count against the caps too.
#[derive(Clone)]
pub struct ConnPermit(#[allow(dead_code)] Arc<Permit>);

/// Serves `app` on `listener` until `shutdown` resolves, then lets requests in flight finish
/// (for at most `drain`).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    hosts: HostAddrs,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send,
    drain: Duration,
) {
    let gate = Gate::new(limits.clone());
    let public = server_builder(limits.header_timeout, None);
    let for_hosts = server_builder(
        limits.header_timeout.max(ConnLimits::HOST_HEADER_TIMEOUT),
        Some(HOST_RESET_STREAMS),
    );
    // Closed (every sender gone) when a graceful stop begins; each connection holds a
    // receiver of `close`, whose sender learns when the last one has ended.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let (close_tx, close_rx) = tokio::sync::watch::channel(());
    let mut refused = RefusalLog {
        last: None,
        since: 0,
    };
    let mut accept_errors: Option<Instant> = None;
    let refusing = Refusing::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors (or another transient failure): wait a little
                    // rather than spin, and say so once in a while.
                    if accept_errors.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        tracing::warn!("accepting a connection failed: {e}");
                        accept_errors = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ip = peer.ip().to_canonical();
        let host = hosts.contains(&ip);
        let permit = match gate.admit(ip, host) {
            Ok(p) => p,
            Err(why) => {
                refused.note(ip, why, &gate);
                // Answered (a 503 a client can read) while few refusals are in flight;
                // beyond that, closed at once: refusing must not cost descriptors either.
                if let Some(slot) = refusing.try_claim() {
                    tokio::spawn(turn_away(stream, why, slot));
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let permit = ConnPermit(Arc::new(permit));
        let for_requests = permit.clone();
        let metrics = metrics.clone();
        let counted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let http2 = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let is_http2 = http2.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                if req.version() == hyper::Version::HTTP_2 {
                    http2.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if !counted.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    // Counted by its first request: host-to-host traffic is `/internal/v1`.
                    let api = if req.uri().path().starts_with("/internal/") {
                        "internal"
                    } else {
                        "public"
                    };
                    metrics
                        .http_connections
                        .get_or_create(&crate::metrics::ConnLabels { api: api.into() })
                        .inc();
                }
                let mut req = req.map(axum::body::Body::new);
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(for_requests.clone());
                app.clone().oneshot(req)
            });
        let builder = if host { &for_hosts } else { &public };
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let mut stop = stop_rx.clone();
        let close = close_rx.clone();
        let mut host_set = hosts.subscribe();
        let hosts = hosts.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _close = close;
            tokio::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::trace!(client = %peer, "connection ended: {e}");
                        }
                        break;
                    }
                    _ = stop.changed(), if !stopping => {
                        // Finish the request in flight, then close.
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    Ok(()) = host_set.changed(), if !stopping => {
                        // A host that connected before this one knew its address (it had just
                        // joined), or a host removed since: close (requests in flight finish)
                        // so that it reconnects under the right rules. A host's HTTP/2
                        // connection lives as long as the host, so it would never be
                        // admitted again otherwise. Only HTTP/2 (what hosts speak): an
                        // HTTP/1 client has no way to learn of the close before it sends its
                        // next request on the connection, and fails.
                        let h2 = is_http2.load(std::sync::atomic::Ordering::Relaxed);
                        if h2 && hosts.contains(&ip) != host {
                            stopping = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    drop(stop_tx);
    drop(close_rx);
    if tokio::time::timeout(drain, close_tx.closed())
        .await
        .is_err()
    {
        tracing::info!(
            "requests still running after {}s; stopping anyway",
            drain.as_secs()
        );
    }
}

/// A connection's server: HTTP/1.1, or HTTP/2 with prior knowledge (what hosts speak to each
/// other: one multiplexed connection per peer), told apart by the first bytes. HTTP/1 waits
/// `header_timeout` for request headers (on a new connection and between requests); HTTP/2
/// pings an idle connection and closes it if the ping is not answered. `reset_streams` raises
/// how many streams a client may cancel before the server has picked them up (h2's default,
/// 20, guards against "rapid reset" floods from the public).
fn server_builder(
    header_timeout: Duration,
    reset_streams: Option<usize>,
) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .adaptive_window(true)
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(n) = reset_streams {
        b.http2().max_pending_accept_reset_streams(n);
    }
    b
}

/// Streams another host may cancel before they are picked up. A host cancels on its own
/// timeouts (a Raft RPC or a forwarded request through a slow or cut link), many at once when a
/// link heals; with h2's default the whole connection, and every call on it, was closed
/// ("remotely-reset pending-accept streams reached limit" in a chaos run).
const HOST_RESET_STREAMS: usize = 1024;

/// How many refused connections are being answered at once, at most [`Refusing::MAX`].
#[derive(Clone, Default)]
struct Refusing(Arc<std::sync::atomic::AtomicUsize>);

/// A refused connection being answered; frees its place when dropped.
struct RefusingSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Refusing {
    const MAX: usize = 256;

    fn try_claim(&self) -> Option<RefusingSlot> {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < Self::MAX).then_some(n + 1)
            })
            .ok()
            .map(|_| RefusingSlot(self.0.clone()))
    }
}

impl Drop for RefusingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// How long a refused connection may take to send its request before it is closed unanswered.
const REFUSAL_READ: Duration = Duration::from_secs(2);

/// Answers the request of a connection over a cap with a 503 (JSON, `Retry-After`) and closes
/// it. The request is read first, so that the client sees an answer to it rather than a reply
/// to a request it had not yet sent.
async fn turn_away(stream: TcpStream, why: Refusal, _slot: RefusingSlot) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_READ)
        .keep_alive(false);
    let service = hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
        let body = serde_json::json!({
            "error": {"code": "unavailable", "message": why.message(), "reason": "connection_limit"}
        })
        .to_string();
        let resp = hyper::Response::builder()
            .status(503)
            .header("content-type", "application/json")
            .header("retry-after", "5")
            .header("connection", "close")
            .body(axum::body::Body::from(body));
        async move { resp }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_READ * 2, conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_ip: usize) -> ConnLimits {
        ConnLimits {
            max_connections: total,
            max_per_ip: per_ip,
            header_timeout: Duration::from_secs(5),
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_client_cannot_take_more_than_its_share() {
        let gate = Gate::new(limits(10, 3));
        let held: Vec<Permit> = (0..3)
            .map(|_| gate.admit(ip(9), false).expect("admitted"))
            .collect();
        assert_eq!(
            gate.admit(ip(9), false).err(),
            Some(Refusal::PerClient),
            "the fourth from one address"
        );
        assert!(
            gate.admit(ip(8), false).is_ok(),
            "another address still gets in"
        );
        drop(held);
        assert!(
            gate.admit(ip(9), false).is_ok(),
            "closed connections free their places"
        );
    }

    #[test]
    fn the_public_cap_does_not_hold_back_the_clusters_hosts() {
        let gate = Gate::new(limits(4, 2));
        let _held: Vec<Permit> = (1..=2)
            .flat_map(|a| [gate.admit(ip(a), false), gate.admit(ip(a), false)])
            .map(|p| p.expect("admitted"))
            .collect();
        assert_eq!(gate.admit(ip(3), false).err(), Some(Refusal::Total));
        let host = gate
            .admit(ip(2), true)
            .expect("a host is admitted past the public cap");
        assert_eq!(gate.open(), (4, 5));
        drop(host);
        assert_eq!(gate.open(), (4, 4));
    }

    #[test]
    fn even_hosts_stop_at_the_ceiling() {
        let limits = limits(30, 1);
        assert_eq!(limits.ceiling(), 40);
        let gate = Gate::new(limits);
        let held: Vec<Permit> = (0..40)
            .map(|_| gate.admit(ip(1), true).expect("under the ceiling"))
            .collect();
        assert_eq!(gate.admit(ip(1), true).err(), Some(Refusal::Ceiling));
        assert_eq!(gate.admit(ip(7), false).err(), Some(Refusal::Ceiling));
        drop(held);
        assert_eq!(gate.open(), (0, 0));
    }

    #[test]
    fn limits_are_checked_and_fit_the_open_files_limit() {
        assert!(ConnLimits::default().validate().is_ok());
        assert!(limits(0, 0).validate().is_err());
        assert!(limits(10, 20).validate().is_err());
        let d = ConnLimits::default();
        assert_eq!(d.within_fd_limit(None), d);
        assert_eq!(d.within_fd_limit(Some(1 << 20)), d);
        // 1024 descriptors: 512 kept aside, a quarter of the rest for hosts.
        let small = d.within_fd_limit(Some(1024));
        assert_eq!(small.max_connections, 384);
        assert_eq!(small.max_per_ip, 256);
        assert_eq!(
            small.ceiling(),
            512,
            "all of the descriptors not kept aside"
        );
    }

    #[test]
    fn an_ipv4_host_is_recognised_when_seen_as_ipv6() {
        let hosts = HostAddrs::default();
        hosts.set([ip(3)].into());
        let mapped: IpAddr = "::ffff:127.0.0.3".parse().expect("ip");
        assert!(hosts.contains(&mapped));
        assert!(!hosts.contains(&ip(4)));
    }

    #[tokio::test]
    async fn host_addresses_resolve_from_urls() {
        let got = resolve_hosts([
            "http://127.0.0.3:8080".to_string(),
            "https://[::1]:9000/".to_string(),
            "http://localhost:80".to_string(),
        ])
        .await;
        assert!(got.contains(&ip(3)), "{got:?}");
        assert!(
            got.contains(&"::1".parse::<IpAddr>().expect("ip")),
            "{got:?}"
        );
    }

    /// The port a request came from: the same port, the same connection.
    async fn port_of(client: &reqwest::Client, url: &str) -> Option<u16> {
        client
            .get(url)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?
            .parse()
            .ok()
    }

    fn client_from(last: u8, http2: bool) -> reqwest::Client {
        let b = reqwest::Client::builder().local_address(ip(last));
        let b = if http2 { b.http2_prior_knowledge() } else { b };
        b.build().expect("client")
    }

    /// A host that connected before this host knew its address (it had just joined) is
    /// admitted again under the host rules once the address is known: its connection is closed
    /// and it reconnects. Other connections are left alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_admitted_under_the_wrong_rules_is_renewed() {
        let app = Router::new().route(
            "/port",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                peer.port().to_string()
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/port", listener.local_addr().expect("addr"));
        let hosts = HostAddrs::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            app,
            limits(100, 10),
            hosts.clone(),
            Arc::new(crate::metrics::Metrics::new()),
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        ));
        let joining = client_from(41, true);
        let public = client_from(42, false);
        let first = port_of(&joining, &url).await.expect("host's request");
        assert_eq!(port_of(&joining, &url).await, Some(first), "one connection");
        let public_port = port_of(&public, &url).await.expect("public request");

        hosts.set([ip(41)].into());
        let deadline = Instant::now() + Duration::from_secs(5);
        let renewed = loop {
            match port_of(&joining, &url).await {
                Some(p) if p != first => break p,
                _ => assert!(Instant::now() < deadline, "the host's connection was kept"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(
            port_of(&joining, &url).await,
            Some(renewed),
            "and reused after"
        );
        assert_eq!(
            port_of(&public, &url).await,
            Some(public_port),
            "a connection under the right rules stays"
        );
        // An HTTP/1 client is never closed under it (it could not tell before its next
        // request), even from an address that has become a host's.
        let local = client_from(43, false);
        let local_port = port_of(&local, &url).await.expect("HTTP/1 request");
        hosts.set([ip(41), ip(43)].into());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(port_of(&local, &url).await, Some(local_port));
        // Setting the same set again closes nothing.
        hosts.set([ip(41), ip(43)].into());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(port_of(&joining, &url).await, Some(renewed));
        let _ = stop.send(());
        server.await.expect("server");
    }
}
