//! Ranks as processes, on one machine or many, connected by TCP.
//!
//! Rendezvous goes through a [`TcpStore`] that rank 0 hosts at MASTER_ADDR:MASTER_PORT:
//! every rank publishes the address of its own listener there, then the ranks build a
//! full mesh (one connection per pair, the higher rank dialing the lower). A reader
//! thread per connection decodes frames into the rank's [`Mailbox`]; when a connection
//! ends (the peer exited, was killed, or dropped its group) the peer is marked as gone,
//! so every pending and later receive from it fails at once, naming it.
//!
//! Wire format, all integers little-endian: a message is `tag: u64, n: u64` followed by
//! `n` f32s; the mesh handshake (both directions) is `b"FVTG", version: u32, rank: u64,
//! world: u64`.

use super::mailbox::{deadline_after, left_error, Mailbox};
use super::ProcessGroup;
use crate::error::{Error, Result};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs,
    UdpSocket,
};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn comm(msg: String) -> Error {
    Error::Comm(msg)
}

/// Puts "rank r: " in front of a communication error from a helper.
fn on_rank(rank: usize, e: Error) -> Error {
    match e {
        Error::Comm(m) => Error::Comm(format!("rank {rank}: {m}")),
        Error::Config(m) => Error::Config(format!("rank {rank}: {m}")),
        e => e,
    }
}

/// Time left until `deadline`, `None` once it passed (never a zero duration, which
/// socket timeouts reject).
fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| *d >= Duration::from_millis(1))
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::Config(format!("cannot resolve {host}:{port}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(Error::Config(format!(
            "{host}:{port} resolves to no address"
        )));
    }
    Ok(addrs)
}

/// Connects to the first of `addrs` that accepts, retrying (the other side may not be
/// listening yet) until `deadline`; the last error when none did.
fn dial_retry(addrs: &[SocketAddr], deadline: Instant) -> io::Result<TcpStream> {
    let mut last = timed_out();
    loop {
        for a in addrs {
            let Some(left) = remaining(deadline) else {
                return Err(last);
            };
            match TcpStream::connect_timeout(a, left.min(Duration::from_secs(2))) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        match remaining(deadline) {
            Some(left) => std::thread::sleep(left.min(Duration::from_millis(50))),
            None => return Err(last),
        }
    }
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// `n` bytes, failing cleanly (not aborting) when a corrupt length asks for too much.
fn read_bytes(r: &mut impl Read, n: u64) -> io::Result<Vec<u8>> {
    let n = usize::try_from(n).map_err(|_| bad_data("length too large"))?;
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| bad_data("length too large"))?;
    v.resize(n, 0);
    r.read_exact(&mut v)?;
    Ok(v)
}

fn bad_data(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

// ---------------------------------------------------------------------------------
// The rendezvous store

const STORE_MAGIC: &[u8; 4] = b"FVST";
const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const REPLY_OK: u8 = 0;
const REPLY_MISSING: u8 = 1;
const REPLY_CLOSED: u8 = 2;
/// Longest key, in bytes.
const MAX_KEY: usize = 4096;

/// The key/value table of a hosted store.
#[derive(Default)]
struct Table {
    state: Mutex<TableState>,
    changed: Condvar,
}

#[derive(Default)]
struct TableState {
    values: HashMap<String, Vec<u8>>,
    closed: bool,
}

/// What a `get` on the table found.
enum Lookup {
    Found(Vec<u8>),
    Missing,
    Closed,
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, TableState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, key: String, value: Vec<u8>) {
        self.lock().values.insert(key, value);
        self.changed.notify_all();
    }

    /// The value of `key`, waiting for it until `deadline`.
    fn get(&self, key: &str, deadline: Instant) -> Lookup {
        let mut st = self.lock();
        loop {
            if st.closed {
                return Lookup::Closed;
            }
            if let Some(v) = st.values.get(key) {
                return Lookup::Found(v.clone());
            }
            let Some(left) = remaining(deadline) else {
                return Lookup::Missing;
            };
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// A hosted store's client connections (to shut them down) and their threads.
type Clients = Arc<Mutex<Vec<(TcpStream, JoinHandle<()>)>>>;

/// The server side of a hosted store: an accept thread and a thread per client.
struct Server {
    addr: SocketAddr,
    table: Arc<Table>,
    clients: Clients,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    fn start(listener: TcpListener, table: Arc<Table>) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        let clients = Clients::default();
        let (t, c) = (table.clone(), clients.clone());
        let accept = std::thread::Builder::new()
            .name("ferrovit-store".into())
            .spawn(move || Server::accept_loop(listener, t, c))?;
        Ok(Server {
            addr,
            table,
            clients,
            accept: Some(accept),
        })
    }

    fn accept_loop(listener: TcpListener, table: Arc<Table>, clients: Clients) {
        for conn in listener.incoming() {
            if table.lock().closed {
                break;
            }
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    // e.g. out of file descriptors: do not spin
                    tracing::debug!("rendezvous store: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            let Ok(handle) = conn.try_clone() else {
                continue;
            };
            let t = table.clone();
            let spawned = std::thread::Builder::new()
                .name("ferrovit-store-client".into())
                .spawn(move || {
                    if let Err(e) = serve_client(conn, &t) {
                        tracing::debug!("rendezvous store: client dropped: {e}");
                    }
                });
            if let Ok(thread) = spawned {
                clients
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((handle, thread));
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.table.close();
        // wake the accept thread with a connection of our own; it then sees `closed`
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let woke = TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok();
        if let Some(accept) = self.accept.take() {
            if woke {
                let _ = accept.join();
            } // else: leave it blocked in accept rather than hang here
        }
        let clients =
            std::mem::take(&mut *self.clients.lock().unwrap_or_else(PoisonError::into_inner));
        for (conn, _) in &clients {
            let _ = conn.shutdown(Shutdown::Both);
        }
        for (_, thread) in clients {
            let _ = thread.join();
        }
    }
}

/// Answers one client's requests until it disconnects.
fn serve_client(mut conn: TcpStream, table: &Table) -> io::Result<()> {
    conn.set_nodelay(true)?;
    let mut magic = [0u8; 4];
    conn.read_exact(&mut magic)?;
    if &magic != STORE_MAGIC {
        return Err(bad_data("not a ferrovit store client"));
    }
    conn.write_all(STORE_MAGIC)?;
    loop {
        let mut op = [0u8; 1];
        match conn.read_exact(&mut op) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            r => r?,
        }
        let key_len = read_u64(&mut conn)?;
        if key_len > MAX_KEY as u64 {
            return Err(bad_data("key too long"));
        }
        let key = String::from_utf8(read_bytes(&mut conn, key_len)?)
            .map_err(|_| bad_data("key is not UTF-8"))?;
        match op[0] {
            OP_SET => {
                let n = read_u64(&mut conn)?;
                let value = read_bytes(&mut conn, n)?;
                table.set(key, value);
                conn.write_all(&[REPLY_OK])?;
            }
            OP_GET => {
                let ms = read_u64(&mut conn)?;
                let deadline = deadline_after(Duration::from_millis(ms));
                match table.get(&key, deadline) {
                    Lookup::Found(v) => {
                        let mut reply = Vec::with_capacity(9 + v.len());
                        reply.push(REPLY_OK);
                        reply.extend_from_slice(&(v.len() as u64).to_le_bytes());
                        reply.extend_from_slice(&v);
                        conn.write_all(&reply)?;
                    }
                    Lookup::Missing => conn.write_all(&[REPLY_MISSING])?,
                    Lookup::Closed => {
                        conn.write_all(&[REPLY_CLOSED])?;
                        return Ok(());
                    }
                }
            }
            _ => return Err(bad_data("unknown request")),
        }
    }
}

enum Backend {
    /// The table lives in this process (rank 0, or a world of one); `server` serves it
    /// to the other ranks.
    Local {
        table: Arc<Table>,
        _server: Option<Server>,
    },
    /// A connection to the process that hosts the table.
    Remote { conn: Mutex<TcpStream> },
}

/// A small key/value store for rendezvous and for sharing metadata between ranks (e.g.
/// addresses, a NCCL unique id): one process hosts it, the others connect. Values are
/// bytes; `get` waits for the key to be set. Usable from several threads at once.
pub struct TcpStore {
    /// `host:port` of the hosting process, for messages.
    addr: String,
    port: u16,
    timeout: Duration,
    backend: Backend,
}

impl TcpStore {
    /// Hosts a store at `host:port` (`port` 0: any free port, see [`TcpStore::port`]).
    /// A non-loopback `host` is served on every interface, since the name other
    /// machines use for this one need not be the address of one of its interfaces.
    pub fn host(host: &str, port: u16, timeout: Duration) -> Result<TcpStore> {
        let first = resolve(host, port)?[0];
        let bind = if first.ip().is_loopback() {
            first
        } else {
            let any = match first {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            SocketAddr::new(any, port)
        };
        let fail = |e: io::Error| {
            comm(format!(
                "cannot host the rendezvous store at {host}:{port} (binding {bind}): {e}"
            ))
        };
        let listener = TcpListener::bind(bind).map_err(fail)?;
        let port = listener.local_addr().map_err(fail)?.port();
        let table = Arc::new(Table::default());
        let server = Server::start(listener, table.clone()).map_err(fail)?;
        Ok(TcpStore {
            addr: format!("{host}:{port}"),
            port,
            timeout,
            backend: Backend::Local {
                table,
                _server: Some(server),
            },
        })
    }

    /// Connects to the store hosted at `host:port`, retrying until `timeout` (the host
    /// may not be up yet).
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStore> {
        Self::connect_until(host, port, timeout, deadline_after(timeout))
    }

    fn connect_until(
        host: &str,
        port: u16,
        timeout: Duration,
        deadline: Instant,
    ) -> Result<TcpStore> {
        let addr = format!("{host}:{port}");
        let fail = |e: io::Error| {
            comm(format!(
                "cannot reach the rendezvous store at {addr} within {timeout:?} (is rank 0 \
                 running, with the same MASTER_ADDR and MASTER_PORT?): {e}"
            ))
        };
        if timeout.is_zero() {
            return Err(Error::Config("the store timeout must be positive".into()));
        }
        let addrs = resolve(host, port)?;
        let mut conn = dial_retry(&addrs, deadline).map_err(fail)?;
        let left = remaining(deadline).ok_or_else(timed_out).map_err(fail)?;
        conn.set_nodelay(true).map_err(fail)?;
        conn.set_read_timeout(Some(left)).map_err(fail)?;
        conn.set_write_timeout(Some(timeout)).map_err(fail)?;
        conn.write_all(STORE_MAGIC).map_err(fail)?;
        let mut magic = [0u8; 4];
        conn.read_exact(&mut magic).map_err(fail)?;
        if &magic != STORE_MAGIC {
            return Err(fail(bad_data("the server there is not a ferrovit store")));
        }
        Ok(TcpStore {
            addr,
            port,
            timeout,
            backend: Backend::Remote {
                conn: Mutex::new(conn),
            },
        })
    }

    /// A store that only this process sees (for a world of one rank).
    pub fn in_memory(timeout: Duration) -> TcpStore {
        TcpStore {
            addr: "(in memory)".into(),
            port: 0,
            timeout,
            backend: Backend::Local {
                table: Arc::default(),
                _server: None,
            },
        }
    }

    /// `host:port` of the hosting process.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The port the store is served on (the one picked, for a host given port 0).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How long `get` waits for a key.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets (or replaces) `key`.
    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        check_key(key)?;
        match &self.backend {
            Backend::Local { table, .. } => {
                table.set(key.to_string(), value.to_vec());
                Ok(())
            }
            Backend::Remote { conn } => {
                let mut req = Vec::with_capacity(17 + key.len() + value.len());
                req.push(OP_SET);
                req.extend_from_slice(&(key.len() as u64).to_le_bytes());
                req.extend_from_slice(key.as_bytes());
                req.extend_from_slice(&(value.len() as u64).to_le_bytes());
                req.extend_from_slice(value);
                self.request(conn, key, "set", &req, self.timeout, |c| {
                    let mut r = [0u8; 1];
                    c.read_exact(&mut r)?;
                    match r[0] {
                        REPLY_OK => Ok(()),
                        _ => Err(bad_data("unexpected reply")),
                    }
                })
            }
        }
    }

    /// The value of `key`, waiting up to the store's timeout for some rank to set it.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.get_timeout(key, self.timeout)
    }

    /// The value of `key`, waiting up to `timeout` for some rank to set it.
    pub fn get_timeout(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let missing = || {
            comm(format!(
                "rendezvous store at {}: key `{key}` was not set within {timeout:?}",
                self.addr
            ))
        };
        let closed = || {
            comm(format!(
                "rendezvous store at {}: get `{key}`: the store was shut down (its host left)",
                self.addr
            ))
        };
        check_key(key)?;
        match &self.backend {
            Backend::Local { table, .. } => match table.get(key, deadline_after(timeout)) {
                Lookup::Found(v) => Ok(v),
                Lookup::Missing => Err(missing()),
                Lookup::Closed => Err(closed()),
            },
            Backend::Remote { conn } => {
                let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                let mut req = Vec::with_capacity(17 + key.len());
                req.push(OP_GET);
                req.extend_from_slice(&(key.len() as u64).to_le_bytes());
                req.extend_from_slice(key.as_bytes());
                req.extend_from_slice(&ms.to_le_bytes());
                // the server answers by itself at the timeout: allow for the round trip
                let wait = timeout.saturating_add(self.timeout.max(Duration::from_secs(5)));
                let found = self.request(conn, key, "get", &req, wait, |c| {
                    let mut r = [0u8; 1];
                    c.read_exact(&mut r)?;
                    match r[0] {
                        REPLY_OK => {
                            let n = read_u64(c)?;
                            read_bytes(c, n).map(Lookup::Found)
                        }
                        REPLY_MISSING => Ok(Lookup::Missing),
                        REPLY_CLOSED => Ok(Lookup::Closed),
                        _ => Err(bad_data("unexpected reply")),
                    }
                })?;
                match found {
                    Lookup::Found(v) => Ok(v),
                    Lookup::Missing => Err(missing()),
                    Lookup::Closed => Err(closed()),
                }
            }
        }
    }

    /// Sends `req` and reads the reply with `read`, waiting at most `wait`. Any failure
    /// leaves the connection mid-message, so it is closed for good.
    fn request<T>(
        &self,
        conn: &Mutex<TcpStream>,
        key: &str,
        op: &str,
        req: &[u8],
        wait: Duration,
        read: impl FnOnce(&mut TcpStream) -> io::Result<T>,
    ) -> Result<T> {
        let mut c = conn.lock().unwrap_or_else(PoisonError::into_inner);
        let result = c
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .and_then(|_| c.write_all(req))
            .and_then(|_| read(&mut c));
        result.map_err(|e| {
            let _ = c.shutdown(Shutdown::Both);
            let hint = match e.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::NotConnected => " (the host, rank 0, may have exited)",
                _ => "",
            };
            comm(format!(
                "rendezvous store at {}: {op} `{key}`: {e}{hint}",
                self.addr
            ))
        })
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.len() > MAX_KEY {
        return Err(Error::Config(format!(
            "store key of {} bytes (at most {MAX_KEY})",
            key.len()
        )));
    }
    Ok(())
}

impl std::fmt::Debug for TcpStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let role = match &self.backend {
            Backend::Local {
                _server: Some(_), ..
            } => "host",
            Backend::Local { .. } => "in memory",
            Backend::Remote { .. } => "client",
        };
        f.debug_struct("TcpStore")
            .field("addr", &self.addr)
            .field("role", &role)
            .finish()
    }
}

// ---------------------------------------------------------------------------------
// The process group

const MESH_MAGIC: &[u8; 4] = b"FVTG";
const MESH_VERSION: u32 = 1;
/// Messages up to this many bytes go out in one write (header included).
const ONE_WRITE: usize = 64 << 10;

fn write_hello(w: &mut impl Write, rank: usize, world: usize) -> io::Result<()> {
    let mut b = [0u8; 24];
    b[..4].copy_from_slice(MESH_MAGIC);
    b[4..8].copy_from_slice(&MESH_VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&(rank as u64).to_le_bytes());
    b[16..].copy_from_slice(&(world as u64).to_le_bytes());
    w.write_all(&b)
}

/// The (rank, world) a peer announced.
fn read_hello(r: &mut impl Read) -> io::Result<(u64, u64)> {
    let mut b = [0u8; 24];
    r.read_exact(&mut b)?;
    if &b[..4] != MESH_MAGIC {
        return Err(bad_data("not a ferrovit rank"));
    }
    let version = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    if version != MESH_VERSION {
        return Err(bad_data(&format!(
            "protocol version {version}, this build speaks {MESH_VERSION}"
        )));
    }
    let num = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
    Ok((num(8), num(16)))
}

fn le_bytes(data: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(data))
    } else {
        Cow::Owned(data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

fn write_frame(w: &mut impl Write, tag: u64, data: &[f32]) -> io::Result<()> {
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&tag.to_le_bytes());
    head[8..].copy_from_slice(&(data.len() as u64).to_le_bytes());
    let body = le_bytes(data);
    if head.len() + body.len() <= ONE_WRITE {
        // one segment for small messages (no Nagle to merge two writes)
        let mut buf = Vec::with_capacity(head.len() + body.len());
        buf.extend_from_slice(&head);
        buf.extend_from_slice(&body);
        w.write_all(&buf)
    } else {
        w.write_all(&head)?;
        w.write_all(&body)
    }
}

fn read_frame(r: &mut impl Read) -> io::Result<(u64, Vec<f32>)> {
    let tag = read_u64(r)?;
    let n = usize::try_from(read_u64(r)?).map_err(|_| bad_data("message too long"))?;
    let mut v: Vec<f32> = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| bad_data("message too long"))?;
    v.resize(n, 0.0);
    r.read_exact(bytemuck::cast_slice_mut(&mut v))?;
    if cfg!(target_endian = "big") {
        for x in &mut v {
            *x = f32::from_bits(u32::from_le(x.to_bits()));
        }
    }
    Ok((tag, v))
}

/// Decodes `peer`'s messages into `mail` until the connection ends, then marks the
/// peer as gone.
fn read_loop(mut conn: TcpStream, mail: &Mailbox, me: usize, peer: usize) {
    loop {
        match read_frame(&mut conn) {
            Ok((tag, data)) => {
                if mail.deliver(peer, me, tag, data).is_err() {
                    return;
                }
            }
            Err(e) => {
                let why = if e.kind() == io::ErrorKind::UnexpectedEof {
                    "connection closed".to_string()
                } else {
                    format!("connection closed: {e}")
                };
                mail.leave(peer, &why);
                return;
            }
        }
    }
}

/// The local address to listen on for the mesh: that of the interface this machine
/// uses to reach `master` (loopback for a loopback master). A UDP "connect" only asks
/// the routing table; it sends nothing.
fn route_ip(master: SocketAddr) -> io::Result<IpAddr> {
    let any: SocketAddr = match master {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let probe = UdpSocket::bind(any)?;
    probe.connect(master)?;
    Ok(probe.local_addr()?.ip())
}

/// One connection of the mesh.
struct Peer {
    /// The sending side; the lock keeps frames whole.
    writer: Mutex<TcpStream>,
    /// Another handle on the socket, for shutting it down.
    socket: TcpStream,
}

/// One rank's handle on a group of processes connected by TCP (see
/// [`TcpGroup::connect`]). Dropping it closes its connections, so the other ranks
/// see it leave.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    mail: Arc<Mailbox>,
    /// The connection to each other rank (`None` at this rank's index).
    peers: Vec<Option<Peer>>,
    readers: Vec<JoinHandle<()>>,
    store: TcpStore,
}

impl TcpGroup {
    /// Joins the group as `rank` of `world`: rank 0 hosts the rendezvous store at
    /// `master_addr:master_port`, every rank connects to every other one. Fails after
    /// `timeout` if some rank does not come (naming it); every later blocking call
    /// fails after `timeout` too. A world of one needs no network.
    pub fn connect(
        rank: usize,
        world: usize,
        master_addr: &str,
        master_port: u16,
        timeout: Duration,
    ) -> Result<TcpGroup> {
        if world == 0 || rank >= world {
            return Err(Error::Config(format!(
                "rank {rank} is not in a group of {world}"
            )));
        }
        if timeout.is_zero() {
            return Err(Error::Config(
                "the process group timeout must be positive".into(),
            ));
        }
        let mail = Arc::new(Mailbox::new(world, timeout, ()));
        if world == 1 {
            return Ok(TcpGroup {
                rank,
                world,
                mail,
                peers: vec![None],
                readers: Vec::new(),
                store: TcpStore::in_memory(timeout),
            });
        }
        if master_port == 0 {
            return Err(Error::Config(format!(
                "rank {rank}: master port 0: the ranks of a group need a fixed MASTER_PORT to find rank 0"
            )));
        }
        let deadline = deadline_after(timeout);
        let store = if rank == 0 {
            TcpStore::host(master_addr, master_port, timeout)
        } else {
            TcpStore::connect_until(master_addr, master_port, timeout, deadline)
        }
        .map_err(|e| on_rank(rank, e))?;
        let streams = mesh(rank, world, &store, master_addr, master_port, deadline)
            .map_err(|e| on_rank(rank, e))?;

        let mut peers = Vec::with_capacity(world);
        let mut readers = Vec::with_capacity(world - 1);
        for (peer, s) in streams.into_iter().enumerate() {
            let Some(s) = s else {
                peers.push(None);
                continue;
            };
            let setup = |e: io::Error| {
                comm(format!(
                    "rank {rank}: setting up the connection to rank {peer}: {e}"
                ))
            };
            s.set_nodelay(true).map_err(setup)?;
            s.set_read_timeout(None).map_err(setup)?;
            s.set_write_timeout(Some(timeout)).map_err(setup)?;
            let reader = s.try_clone().map_err(setup)?;
            let socket = s.try_clone().map_err(setup)?;
            let m = mail.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ferrovit-tcp-{rank}<-{peer}"))
                .spawn(move || read_loop(reader, &m, rank, peer))
                .map_err(setup)?;
            readers.push(thread);
            peers.push(Some(Peer {
                writer: Mutex::new(s),
                socket,
            }));
        }
        tracing::debug!(
            "rank {rank}: connected to all {world} ranks via {master_addr}:{master_port}"
        );
        Ok(TcpGroup {
            rank,
            world,
            mail,
            peers,
            readers,
            store,
        })
    }

    /// Joins the group that the environment describes (torchrun's RANK, WORLD_SIZE,
    /// MASTER_ADDR, MASTER_PORT; see [`DistEnv::from_env`]); `Ok(None)` when it
    /// describes none.
    pub fn from_env(timeout: Duration) -> Result<Option<TcpGroup>> {
        DistEnv::from_env()?
            .map(|env| env.connect(timeout))
            .transpose()
    }

    /// The rendezvous store (hosted by rank 0; in memory for a world of one), for
    /// sharing small metadata between ranks. It serves as long as rank 0's group lives.
    pub fn store(&self) -> &TcpStore {
        &self.store
    }

    /// How long blocking calls wait.
    pub fn timeout(&self) -> Duration {
        self.mail.timeout()
    }

    fn check_rank(&self, r: usize, what: &str) -> Result<()> {
        if r < self.world {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "{what}: rank {r} is not in a group of {}",
                self.world
            )))
        }
    }
}

/// Builds this rank's connections to all others: publishes the address of a fresh
/// listener, dials the lower ranks and accepts the higher ones.
fn mesh(
    rank: usize,
    world: usize,
    store: &TcpStore,
    master_addr: &str,
    master_port: u16,
    deadline: Instant,
) -> Result<Vec<Option<TcpStream>>> {
    let timeout = store.timeout();
    let master = resolve(master_addr, master_port)?[0];
    let ip = route_ip(master).map_err(|e| {
        comm(format!(
            "no local interface reaches the master {master_addr}:{master_port}: {e}"
        ))
    })?;
    let listener = TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr().map(|a| (l, a)))
        .map_err(|e| comm(format!("cannot listen on {ip}: {e}")));
    let (listener, me) = listener?;
    store.set(&format!("addr/{rank}"), me.to_string().as_bytes())?;

    let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let mut lower = Vec::with_capacity(rank);
    for j in 0..rank {
        let left = remaining(deadline).unwrap_or(Duration::from_millis(1));
        let raw = store.get_timeout(&format!("addr/{j}"), left).map_err(|e| {
            comm(format!(
                "rank {j} did not publish its address within {timeout:?}: {e}"
            ))
        })?;
        let addr = std::str::from_utf8(&raw)
            .ok()
            .and_then(|s| s.parse::<SocketAddr>().ok())
            .ok_or_else(|| comm(format!("rank {j} published a malformed address {raw:?}")))?;
        lower.push(addr);
    }
    for (j, addr) in lower.into_iter().enumerate() {
        streams[j] = Some(dial_peer(rank, world, j, addr, deadline, timeout)?);
    }
    accept_peers(&listener, rank, world, deadline, timeout, &mut streams)?;
    Ok(streams)
}

/// Connects to lower rank `j` at `addr` and checks that it is rank `j` of this group.
fn dial_peer(
    rank: usize,
    world: usize,
    j: usize,
    addr: SocketAddr,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    let fail = |e: io::Error| {
        let e = if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            format!("no answer within {timeout:?}")
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            "it closed the connection (did it fail?)".to_string()
        } else {
            e.to_string()
        };
        comm(format!("cannot connect to rank {j} at {addr}: {e}"))
    };
    let mut s = dial_retry(&[addr], deadline).map_err(fail)?;
    let left = remaining(deadline).ok_or_else(timed_out).map_err(fail)?;
    s.set_read_timeout(Some(left)).map_err(fail)?;
    s.set_write_timeout(Some(left)).map_err(fail)?;
    write_hello(&mut s, rank, world).map_err(fail)?;
    // rank j answers once it is done dialing its own lower ranks
    let (r, w) = read_hello(&mut s).map_err(fail)?;
    if (r, w) != (j as u64, world as u64) {
        return Err(comm(format!(
            "expected rank {j} of {world} at {addr}, found rank {r} of {w} (a process of another run?)"
        )));
    }
    Ok(s)
}

/// Accepts the connections of ranks `rank+1..world` until `deadline`.
fn accept_peers(
    listener: &TcpListener,
    rank: usize,
    world: usize,
    deadline: Instant,
    timeout: Duration,
    streams: &mut [Option<TcpStream>],
) -> Result<()> {
    // non-blocking accept, polled, so the wait can end at the deadline
    listener
        .set_nonblocking(true)
        .map_err(|e| comm(format!("listener: {e}")))?;
    loop {
        let missing: Vec<usize> = (rank + 1..world)
            .filter(|&r| streams[r].is_none())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let (mut s, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    tracing::debug!("rank {rank}: accept failed: {e}");
                }
                match remaining(deadline) {
                    Some(left) => {
                        std::thread::sleep(left.min(Duration::from_millis(5)));
                        continue;
                    }
                    None => {
                        return Err(comm(format!(
                            "timed out after {timeout:?} waiting for rank(s) {missing:?} to connect \
                             (did they start, with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE?)"
                        )))
                    }
                }
            }
        };
        let hello = s
            .set_nonblocking(false)
            .and_then(|_| {
                s.set_read_timeout(remaining(deadline).or(Some(Duration::from_millis(1))))
            })
            .and_then(|_| read_hello(&mut s));
        let (r, w) = match hello {
            Ok(h) => h,
            Err(e) => {
                // not one of ours (a port scanner, a stray client): ignore it
                tracing::warn!("rank {rank}: ignoring a connection from {from}: {e}");
                continue;
            }
        };
        if w != world as u64 {
            return Err(Error::Config(format!(
                "rank {r} (at {from}) was started with a world of {w} ranks, this rank with {world}"
            )));
        }
        let r = usize::try_from(r).unwrap_or(usize::MAX);
        if r <= rank || r >= world {
            return Err(Error::Config(format!(
                "a process at {from} claims rank {r}, which should not connect to rank {rank} of {world}"
            )));
        }
        if streams[r].is_some() {
            return Err(Error::Config(format!(
                "two processes claim rank {r} (the second at {from})"
            )));
        }
        s.set_write_timeout(Some(timeout))
            .and_then(|_| write_hello(&mut s, rank, world))
            .map_err(|e| comm(format!("handshake with rank {r} at {from}: {e}")))?;
        streams[r] = Some(s);
    }
}

impl ProcessGroup for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn send(&self, data: &[f32], to: usize, tag: u64) -> Result<()> {
        self.check_rank(to, "send")?;
        if to == self.rank {
            return self.mail.deliver(to, to, tag, data.to_vec());
        }
        let what = || format!("send to rank {to} (tag {tag})");
        let gone = self.mail.lock().left(to).map(str::to_string);
        if let Some(why) = gone {
            return Err(left_error(self.rank, &what(), to, &why));
        }
        let Some(peer) = &self.peers[to] else {
            return Err(comm(format!(
                "rank {}: {}: no connection",
                self.rank,
                what()
            )));
        };
        let mut w = peer.writer.lock().unwrap_or_else(PoisonError::into_inner);
        write_frame(&mut *w, tag, data).map_err(|e| {
            // a partial frame would garble the stream: close it for good
            let _ = peer.socket.shutdown(Shutdown::Both);
            let e = if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) {
                format!("rank {to} took no data for {:?}", self.timeout())
            } else {
                e.to_string()
            };
            self.mail
                .leave(to, &format!("connection closed: send failed: {e}"));
            comm(format!("rank {}: {}: {e}", self.rank, what()))
        })
    }

    fn recv(&self, from: usize, tag: u64) -> Result<Vec<f32>> {
        self.check_rank(from, "recv")?;
        self.mail.take(self.rank, from, tag)
    }
}

impl Drop for TcpGroup {
    fn drop(&mut self) {
        // FIN after anything already sent; the readers see the end and stop
        for p in self.peers.iter().flatten() {
            let _ = p.socket.shutdown(Shutdown::Both);
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl std::fmt::Debug for TcpGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpGroup")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("store", &self.store)
            .finish()
    }
}

/// Where this process sits in a multi-process run, as the launcher (ferrovit's, or
/// torchrun, or SLURM) describes it in the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// The rank among the processes of this machine (LOCAL_RANK or SLURM_LOCALID),
    /// when given.
    pub local_rank: Option<usize>,
    pub master_addr: String,
    pub master_port: u16,
}

impl DistEnv {
    /// Reads RANK, WORLD_SIZE (or SLURM_PROCID, SLURM_NTASKS where those are unset),
    /// LOCAL_RANK (or SLURM_LOCALID), MASTER_ADDR and MASTER_PORT. `Ok(None)` when no
    /// world size is set; malformed or missing values are errors naming the variable.
    pub fn from_env() -> Result<Option<DistEnv>> {
        Self::from_lookup(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))
    }

    /// As [`DistEnv::from_env`], reading variables through `var`.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Option<DistEnv>> {
        // (name, value) of the first of `names` that is set
        let first = |names: &[&'static str]| {
            names
                .iter()
                .find_map(|&n| var(n).map(|v| (n, v.trim().to_string())))
        };
        let int = |(name, v): (&str, String)| {
            v.parse::<usize>()
                .map_err(|_| Error::Config(format!("{name}={v:?} is not a non-negative integer")))
        };
        let Some(world_var) = first(&["WORLD_SIZE", "SLURM_NTASKS"]) else {
            return Ok(None);
        };
        let world_name = world_var.0;
        let world = int(world_var)?;
        if world == 0 {
            return Err(Error::Config(format!(
                "{world_name}=0: a group needs a rank"
            )));
        }
        let rank_var = first(&["RANK", "SLURM_PROCID"])
            .ok_or_else(|| Error::Config(format!("{world_name}={world} is set but RANK is not")))?;
        let rank_name = rank_var.0;
        let rank = int(rank_var)?;
        if rank >= world {
            return Err(Error::Config(format!(
                "{rank_name}={rank} is not below {world_name}={world}"
            )));
        }
        let local_rank = first(&["LOCAL_RANK", "SLURM_LOCALID"])
            .map(int)
            .transpose()?;
        let master_addr = match first(&["MASTER_ADDR"]) {
            Some((_, v)) if !v.is_empty() => v,
            Some(_) => return Err(Error::Config("MASTER_ADDR is empty".into())),
            None if world == 1 => "127.0.0.1".into(),
            None => {
                return Err(Error::Config(format!(
                    "MASTER_ADDR is not set (needed to find rank 0 of {world_name}={world})"
                )))
            }
        };
        let master_port = match first(&["MASTER_PORT"]) {
            Some((name, v)) => v
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0 || world == 1)
                .ok_or_else(|| {
                    Error::Config(format!("{name}={v:?} is not a port number (1-65535)"))
                })?,
            None if world == 1 => 0,
            None => {
                return Err(Error::Config(format!(
                    "MASTER_PORT is not set (needed to find rank 0 of {world_name}={world})"
                )))
            }
        };
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
        }))
    }

    /// Joins the group this environment describes.
    pub fn connect(&self, timeout: Duration) -> Result<TcpGroup> {
        TcpGroup::connect(
            self.rank,
            self.world,
            &self.master_addr,
            self.master_port,
            timeout,
        )
    }
}
