//! Ranks as processes, on one machine or many, connected by TCP.
//!
//! Rendezvous goes through a [`TcpStore`] that rank 0 hosts at MASTER_ADDR:MASTER_PORT:
//! every rank publishes the address of its own listener there, then the ranks build a
//! full mesh (one connection per pair, the higher rank dialing the lower). A reader
//! thread per connection decodes frames into the rank's [`Mailbox`]; when a connection
//! ends (the peer exited, was killed, or dropped its group) the peer is marked as gone,
//! so every pending and later receive from it fails at once, naming it.
//!
//! Every connection, to the store or between ranks, starts with a handshake that proves
//! both sides know the run's secret (see `auth.rs`); a connection that fails it is
//! closed before anything but the fixed-size hello was read, and a silent one is
//! dropped after [`HELLO_TIMEOUT`]. No length a peer claims is allocated up front:
//! store values are capped at [`MAX_VALUE`], and a message's buffer grows only as its
//! bytes arrive.
//!
//! Wire format, all integers little-endian. A hello is `magic: [u8; 4], version: u32`,
//! then (mesh only) `rank: u64, world: u64`, then `nonce: [u8; 16]`. Store: the client
//! sends its hello; the server answers with its own and an HMAC; the client answers with
//! its HMAC. Mesh: the dialing (higher) rank sends its hello; the accepting rank answers
//! with its hello and HMAC; the dialer answers with its HMAC. A mesh message is
//! `tag: u64, n: u64` followed by `n` f32s.

use super::auth::{nonce, Secret, MAC, NONCE};
use super::mailbox::{deadline_after, left_error, Mailbox};
use super::ProcessGroup;
use crate::error::{Error, Result};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
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

/// Bytes of a message allocated before any of it arrived; past them, a buffer at most
/// doubles what was received so far.
const EAGER_BYTES: usize = 4 << 20;

/// `n` values of `T` from `r`. Memory follows the bytes that actually arrive (at most
/// twice them, beyond the first [`EAGER_BYTES`]), never a length a peer merely claims.
fn read_vec<T: bytemuck::Pod>(r: &mut impl Read, n: usize) -> io::Result<Vec<T>> {
    let eager = (EAGER_BYTES / std::mem::size_of::<T>()).max(1);
    let mut v: Vec<T> = Vec::new();
    while v.len() < n {
        let start = v.len();
        let step = (n - start).min(start.max(eager));
        v.try_reserve(step)
            .map_err(|_| io::Error::new(io::ErrorKind::OutOfMemory, "out of memory"))?;
        v.resize(start + step, T::zeroed());
        r.read_exact(bytemuck::cast_slice_mut(&mut v[start..]))?;
    }
    Ok(v)
}

/// A length field of `n` units, refused when over `max`.
fn length(n: u64, max: usize, what: &str) -> io::Result<usize> {
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= max)
        .ok_or_else(|| bad_data(&format!("{what} {n} exceeds the limit of {max}")))
}

/// How long a new connection may take to say hello (and answer the challenge): a
/// connection that sends nothing does not hold a thread (or the mesh's setup) longer.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// `read_exact` that gives up at `deadline`, however slowly the bytes trickle in (a
/// socket timeout alone bounds each read, not their sum).
fn read_exact_until(mut conn: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        conn.set_read_timeout(Some(remaining(deadline).ok_or_else(timed_out)?))?;
        match conn.read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Remembers whom a refusal was already logged for, so that a port scanner or a
/// misconfigured machine hammering a port logs one line, not one per connection.
#[derive(Default)]
struct RejectLog {
    seen: Mutex<HashSet<IpAddr>>,
}

/// Addresses a [`RejectLog`] remembers; refusals from more are not logged.
const REJECT_LOG_MAX: usize = 1024;

impl RejectLog {
    fn refused(&self, what: &str, from: SocketAddr, why: &io::Error) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.len() < REJECT_LOG_MAX && seen.insert(from.ip()) {
            tracing::warn!(
                "{what}: refused a connection from {from}: {why} (later ones from {} are not logged)",
                from.ip()
            );
        } else {
            tracing::debug!("{what}: refused a connection from {from}: {why}");
        }
    }
}

/// A hello: magic, version, `body`, a fresh nonce.
fn hello(magic: &[u8; 4], version: u32, body: &[u8]) -> io::Result<Vec<u8>> {
    let mut h = Vec::with_capacity(8 + body.len() + NONCE);
    h.extend_from_slice(magic);
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(body);
    h.extend_from_slice(&nonce()?);
    Ok(h)
}

/// Checks a received hello's magic and version (`who`: what it should come from).
fn check_hello(h: &[u8], magic: &[u8; 4], version: u32, who: &str) -> io::Result<()> {
    if &h[..4] != magic {
        return Err(bad_data(&format!("not {who}")));
    }
    let theirs = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if theirs != version {
        return Err(bad_data(&format!(
            "{who} speaking protocol version {theirs}; this build speaks {version}"
        )));
    }
    Ok(())
}

fn wrong_secret(who: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{who} does not know this run's secret (FERROVIT_SECRET differs)"),
    )
}

fn bad_data(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

// ---------------------------------------------------------------------------------
// The rendezvous store

const STORE_MAGIC: &[u8; 4] = b"FVST";
const STORE_VERSION: u32 = 2;
/// Bytes of a store hello (magic, version, nonce).
const STORE_HELLO: usize = 8 + NONCE;
const STORE_SERVER: &str = "ferrovit store server";
const STORE_CLIENT: &str = "ferrovit store client";
const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const REPLY_OK: u8 = 0;
const REPLY_MISSING: u8 = 1;
const REPLY_CLOSED: u8 = 2;
/// Longest key, in bytes.
const MAX_KEY: usize = 4096;
/// Largest value, in bytes: rendezvous metadata (addresses, ids) is tiny; the cap keeps
/// a confused client from making the host allocate without bound.
pub const MAX_VALUE: usize = 64 << 20;

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

/// What every client thread of a store shares.
struct Shared {
    table: Arc<Table>,
    secret: Secret,
    log: RejectLog,
}

impl Server {
    fn start(listener: TcpListener, table: Arc<Table>, secret: Secret) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        let clients = Clients::default();
        let shared = Arc::new(Shared {
            table: table.clone(),
            secret,
            log: RejectLog::default(),
        });
        let c = clients.clone();
        let accept = std::thread::Builder::new()
            .name("ferrovit-store".into())
            .spawn(move || Server::accept_loop(listener, shared, c))?;
        Ok(Server {
            addr,
            table,
            clients,
            accept: Some(accept),
        })
    }

    fn accept_loop(listener: TcpListener, shared: Arc<Shared>, clients: Clients) {
        for conn in listener.incoming() {
            if shared.table.lock().closed {
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
            let (Ok(handle), Ok(from)) = (conn.try_clone(), conn.peer_addr()) else {
                continue;
            };
            let sh = shared.clone();
            let spawned = std::thread::Builder::new()
                .name("ferrovit-store-client".into())
                .spawn(move || serve_client(conn, from, &sh));
            if let Ok(thread) = spawned {
                let mut clients = clients.lock().unwrap_or_else(PoisonError::into_inner);
                // forget the clients that left (refused strangers, mostly): their
                // sockets would pile up
                clients.retain(|(_, t)| !t.is_finished());
                clients.push((handle, thread));
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

/// Serves the client at `from`: the handshake, then its requests until it disconnects.
fn serve_client(conn: TcpStream, from: SocketAddr, shared: &Shared) {
    serve_client_on(&conn, from, shared);
    // closes the connection now: the server's handle on it lives on until pruned
    let _ = conn.shutdown(Shutdown::Both);
}

fn serve_client_on(conn: &TcpStream, from: SocketAddr, shared: &Shared) {
    if let Err(e) = store_server_handshake(conn, &shared.secret) {
        shared.log.refused("rendezvous store", from, &e);
        return;
    }
    if let Err(e) = serve_requests(conn, &shared.table) {
        if e.kind() == io::ErrorKind::InvalidData {
            tracing::warn!("rendezvous store: dropped the client at {from}: {e}");
        } else {
            tracing::debug!("rendezvous store: client at {from} dropped: {e}");
        }
    }
}

/// The server's side of the handshake: within [`HELLO_TIMEOUT`], a client hello, our
/// hello and answer, the client's answer.
fn store_server_handshake(mut conn: &TcpStream, secret: &Secret) -> io::Result<()> {
    let deadline = deadline_after(HELLO_TIMEOUT);
    conn.set_nodelay(true)?;
    conn.set_write_timeout(Some(HELLO_TIMEOUT))?;
    let mut theirs = [0u8; STORE_HELLO];
    read_exact_until(conn, &mut theirs, deadline)?;
    if &theirs[..4] != STORE_MAGIC {
        return Err(bad_data("not a ferrovit store client"));
    }
    // answered even on another version, so that the client can say which
    let mine = hello(STORE_MAGIC, STORE_VERSION, &[])?;
    let answer = secret.answer(STORE_SERVER, &[&theirs, &mine]);
    conn.write_all(&[&mine[..], &answer].concat())?;
    check_hello(
        &theirs,
        STORE_MAGIC,
        STORE_VERSION,
        "a ferrovit store client",
    )?;
    let mut reply = [0u8; MAC];
    read_exact_until(conn, &mut reply, deadline)?;
    if !secret.verify(STORE_CLIENT, &[&theirs, &mine], &reply) {
        return Err(wrong_secret("the client"));
    }
    // a client waits as long as it likes between requests
    conn.set_read_timeout(None)?;
    conn.set_write_timeout(None)
}

/// The client's side of the handshake.
fn store_client_handshake(conn: &mut TcpStream, secret: &Secret) -> io::Result<()> {
    let mine = hello(STORE_MAGIC, STORE_VERSION, &[])?;
    conn.write_all(&mine)?;
    let mut reply = [0u8; STORE_HELLO + MAC];
    conn.read_exact(&mut reply)?;
    let (theirs, answer) = reply.split_at(STORE_HELLO);
    check_hello(theirs, STORE_MAGIC, STORE_VERSION, "a ferrovit store")?;
    if !secret.verify(STORE_SERVER, &[&mine, theirs], answer) {
        return Err(wrong_secret("the store"));
    }
    conn.write_all(&secret.answer(STORE_CLIENT, &[&mine, theirs]))
}

/// Answers an authenticated client's requests until it disconnects.
fn serve_requests(mut conn: &TcpStream, table: &Table) -> io::Result<()> {
    loop {
        let mut op = [0u8; 1];
        match conn.read_exact(&mut op) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            r => r?,
        }
        let key_len = length(read_u64(&mut conn)?, MAX_KEY, "key length")?;
        let key = String::from_utf8(read_vec(&mut conn, key_len)?)
            .map_err(|_| bad_data("key is not UTF-8"))?;
        match op[0] {
            OP_SET => {
                let n = read_u64(&mut conn)?;
                let n = length(n, MAX_VALUE, &format!("length of the value of `{key}`"))?;
                let value = read_vec(&mut conn, n)?;
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
    /// Hosts a store at `host:port` (`port` 0: any free port, see [`TcpStore::port`])
    /// for clients with the empty secret; see [`TcpStore::host_with_secret`].
    pub fn host(host: &str, port: u16, timeout: Duration) -> Result<TcpStore> {
        Self::host_with_secret(host, port, timeout, b"")
    }

    /// Hosts a store at `host:port` (`port` 0: any free port, see [`TcpStore::port`])
    /// for the clients that know `secret`. A non-loopback `host` is served on every
    /// interface, since the name other machines use for this one need not be the
    /// address of one of its interfaces.
    pub fn host_with_secret(
        host: &str,
        port: u16,
        timeout: Duration,
        secret: &[u8],
    ) -> Result<TcpStore> {
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
        let server = Server::start(listener, table.clone(), Secret::new(secret)).map_err(fail)?;
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

    /// Connects to the store hosted at `host:port` with the empty secret; see
    /// [`TcpStore::connect_with_secret`].
    pub fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStore> {
        Self::connect_with_secret(host, port, timeout, b"")
    }

    /// Connects to the store hosted at `host:port`, proving knowledge of `secret` (and
    /// checking that the host knows it too), retrying until `timeout` (the host may not
    /// be up yet).
    pub fn connect_with_secret(
        host: &str,
        port: u16,
        timeout: Duration,
        secret: &[u8],
    ) -> Result<TcpStore> {
        Self::connect_until(host, port, timeout, deadline_after(timeout), secret)
    }

    fn connect_until(
        host: &str,
        port: u16,
        timeout: Duration,
        deadline: Instant,
        secret: &[u8],
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
        store_client_handshake(&mut conn, &Secret::new(secret)).map_err(|e| {
            if e.kind() == io::ErrorKind::PermissionDenied {
                comm(format!("rendezvous store at {addr}: {e}"))
            } else {
                fail(e)
            }
        })?;
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
        if value.len() > MAX_VALUE {
            return Err(Error::Config(format!(
                "store value of {} bytes for `{key}` (at most {MAX_VALUE})",
                value.len()
            )));
        }
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
                            let n = length(read_u64(c)?, MAX_VALUE, "value length")?;
                            read_vec(c, n).map(Lookup::Found)
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
const MESH_VERSION: u32 = 2;
/// Bytes of a mesh hello (magic, version, rank, world, nonce).
const MESH_HELLO: usize = 24 + NONCE;
const MESH_ACCEPT: &str = "ferrovit mesh accept";
const MESH_DIAL: &str = "ferrovit mesh dial";
/// Messages up to this many bytes go out in one write (header included).
const ONE_WRITE: usize = 64 << 10;
/// Most f32s in one message (16 GiB): far above any activation or gradient bucket;
/// a longer claim is a corrupt (or hostile) stream.
pub const MAX_MESSAGE: usize = 1 << 32;

/// This rank's hello.
fn mesh_hello(rank: usize, world: usize) -> io::Result<Vec<u8>> {
    let body = [(rank as u64).to_le_bytes(), (world as u64).to_le_bytes()].concat();
    hello(MESH_MAGIC, MESH_VERSION, &body)
}

/// The (rank, world) that a peer's hello announces.
fn parse_mesh_hello(h: &[u8]) -> io::Result<(u64, u64)> {
    check_hello(h, MESH_MAGIC, MESH_VERSION, "a ferrovit rank")?;
    let num = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or([0; 8]));
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
    let n = length(read_u64(r)?, MAX_MESSAGE, "message length (f32s)")?;
    let mut v: Vec<f32> = read_vec(r, n)?;
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
    /// Joins the group as `rank` of `world` with the empty secret; see
    /// [`TcpGroup::connect_with_secret`].
    pub fn connect(
        rank: usize,
        world: usize,
        master_addr: &str,
        master_port: u16,
        timeout: Duration,
    ) -> Result<TcpGroup> {
        Self::connect_with_secret(rank, world, master_addr, master_port, timeout, b"")
    }

    /// Joins the group as `rank` of `world`: rank 0 hosts the rendezvous store at
    /// `master_addr:master_port`, every rank connects to every other one, each
    /// connection proving that both sides know `secret` (see the module docs). Fails
    /// after `timeout` if some rank does not come (naming it); every later blocking
    /// call fails after `timeout` too. A world of one needs no network.
    pub fn connect_with_secret(
        rank: usize,
        world: usize,
        master_addr: &str,
        master_port: u16,
        timeout: Duration,
        secret: &[u8],
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
            TcpStore::host_with_secret(master_addr, master_port, timeout, secret)
        } else {
            TcpStore::connect_until(master_addr, master_port, timeout, deadline, secret)
        }
        .map_err(|e| on_rank(rank, e))?;
        let master = (master_addr, master_port);
        let streams = mesh(
            (rank, world),
            &store,
            master,
            deadline,
            &Secret::new(secret),
        )
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
    (rank, world): (usize, usize),
    store: &TcpStore,
    (master_addr, master_port): (&str, u16),
    deadline: Instant,
    secret: &Secret,
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
        streams[j] = Some(dial_peer(
            (rank, world),
            j,
            addr,
            deadline,
            timeout,
            secret,
        )?);
    }
    accept_peers(
        &listener,
        (rank, world),
        deadline,
        timeout,
        secret,
        &mut streams,
    )?;
    Ok(streams)
}

/// Connects to lower rank `j` at `addr` and checks that it is rank `j` of this group.
fn dial_peer(
    (rank, world): (usize, usize),
    j: usize,
    addr: SocketAddr,
    deadline: Instant,
    timeout: Duration,
    secret: &Secret,
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
    let mine = mesh_hello(rank, world).map_err(fail)?;
    s.write_all(&mine).map_err(fail)?;
    // rank j answers once it is done dialing its own lower ranks
    let mut reply = [0u8; MESH_HELLO + MAC];
    s.read_exact(&mut reply).map_err(fail)?;
    let (theirs, answer) = reply.split_at(MESH_HELLO);
    let (r, w) = parse_mesh_hello(theirs).map_err(fail)?;
    if !secret.verify(MESH_ACCEPT, &[&mine, theirs], answer) {
        return Err(comm(format!(
            "the process at {addr} (rank {j}?) does not know this run's secret (FERROVIT_SECRET differs: a process of another run?)"
        )));
    }
    if (r, w) != (j as u64, world as u64) {
        return Err(comm(format!(
            "expected rank {j} of {world} at {addr}, found rank {r} of {w} (a process of another run?)"
        )));
    }
    s.write_all(&secret.answer(MESH_DIAL, &[&mine, theirs]))
        .map_err(fail)?;
    Ok(s)
}

/// Accepts the connections of ranks `rank+1..world` until `deadline`.
fn accept_peers(
    listener: &TcpListener,
    (rank, world): (usize, usize),
    deadline: Instant,
    timeout: Duration,
    secret: &Secret,
    streams: &mut [Option<TcpStream>],
) -> Result<()> {
    // non-blocking accept, polled, so the wait can end at the deadline
    listener
        .set_nonblocking(true)
        .map_err(|e| comm(format!("listener: {e}")))?;
    let log = RejectLog::default();
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
                             (did they start, with the same MASTER_ADDR, MASTER_PORT, WORLD_SIZE \
                             and FERROVIT_SECRET?)"
                    )))
                    }
                }
            }
        };
        match accept_handshake(&mut s, (rank, world), deadline, secret) {
            Ok((r, w)) => {
                let r = check_claim((r, w), from, (rank, world), streams)?;
                streams[r] = Some(s);
            }
            // not one of ours (a port scanner, a stray client, another run): ignore it
            Err(e) => log.refused(&format!("rank {rank}"), from, &e),
        }
    }
}

/// The accepting side of the mesh handshake, within [`HELLO_TIMEOUT`]: the (rank,
/// world) that the now authenticated peer claims.
fn accept_handshake(
    s: &mut TcpStream,
    (rank, world): (usize, usize),
    deadline: Instant,
    secret: &Secret,
) -> io::Result<(u64, u64)> {
    let deadline = deadline.min(deadline_after(HELLO_TIMEOUT));
    s.set_nonblocking(false)?;
    s.set_write_timeout(Some(remaining(deadline).ok_or_else(timed_out)?))?;
    let mut theirs = [0u8; MESH_HELLO];
    read_exact_until(s, &mut theirs, deadline)?;
    if &theirs[..4] != MESH_MAGIC {
        return Err(bad_data("not a ferrovit rank"));
    }
    // answered even on another version, so that the dialer can say which
    let mine = mesh_hello(rank, world)?;
    let answer = secret.answer(MESH_ACCEPT, &[&theirs, &mine]);
    s.write_all(&[&mine[..], &answer].concat())?;
    let claim = parse_mesh_hello(&theirs)?;
    let mut reply = [0u8; MAC];
    read_exact_until(s, &mut reply, deadline)?;
    if !secret.verify(MESH_DIAL, &[&theirs, &mine], &reply) {
        return Err(wrong_secret("the peer"));
    }
    Ok(claim)
}

/// The rank that an authenticated peer at `from` claims to be, if it may connect to
/// this one; a wrong claim from a process with the run's secret is a misconfigured run.
fn check_claim(
    (r, w): (u64, u64),
    from: SocketAddr,
    (rank, world): (usize, usize),
    streams: &[Option<TcpStream>],
) -> Result<usize> {
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
    Ok(r)
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
#[derive(Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    /// The rank among the processes of this machine (LOCAL_RANK or SLURM_LOCALID),
    /// when given.
    pub local_rank: Option<usize>,
    pub master_addr: String,
    pub master_port: u16,
    /// The run's shared secret (FERROVIT_SECRET; empty when unset), which every
    /// connection between its processes proves knowledge of.
    pub secret: String,
}

impl std::fmt::Debug for DistEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // the secret stays out of logs
        f.debug_struct("DistEnv")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("local_rank", &self.local_rank)
            .field("master_addr", &self.master_addr)
            .field("master_port", &self.master_port)
            .field("secret", &format_args!("({} bytes)", self.secret.len()))
            .finish()
    }
}

impl DistEnv {
    /// Reads RANK, WORLD_SIZE (or SLURM_PROCID, SLURM_NTASKS where those are unset),
    /// LOCAL_RANK (or SLURM_LOCALID), MASTER_ADDR, MASTER_PORT and FERROVIT_SECRET. `Ok(None)` when no
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
            // as given: surrounding spaces would be part of it on every rank alike
            secret: var("FERROVIT_SECRET").unwrap_or_default(),
        }))
    }

    /// Joins the group this environment describes.
    pub fn connect(&self, timeout: Duration) -> Result<TcpGroup> {
        TcpGroup::connect_with_secret(
            self.rank,
            self.world,
            &self.master_addr,
            self.master_port,
            timeout,
            self.secret.as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `data`, then ends; records the largest buffer a read asked it to fill.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        largest_read: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest_read = self.largest_read.max(buf.len());
            let n = buf.len().min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn frame_claiming(n: u64, body: usize) -> Trickle {
        let mut data = 5u64.to_le_bytes().to_vec();
        data.extend_from_slice(&n.to_le_bytes());
        data.resize(16 + body, 1);
        Trickle {
            data,
            at: 0,
            largest_read: 0,
        }
    }

    #[test]
    fn a_message_allocates_as_its_bytes_arrive_not_as_claimed() {
        // claims 256 MiB, sends 1000 bytes and hangs up
        let mut r = frame_claiming(1 << 26, 1000);
        let e = read_frame(&mut r).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(r.largest_read <= EAGER_BYTES, "{}", r.largest_read);
        // a claim past the limit is refused before reading any of it
        let mut r = frame_claiming(MAX_MESSAGE as u64 + 1, 8);
        let e = read_frame(&mut r).unwrap_err().to_string();
        assert!(e.contains(&format!("{}", MAX_MESSAGE + 1)), "{e}");
        assert_eq!(r.at, 16);
        // messages of several steps arrive whole
        let n = 3 * EAGER_BYTES / 4 + 5;
        let want: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut data = Vec::new();
        write_frame(&mut data, 9, &want).unwrap();
        let (tag, got) = read_frame(&mut io::Cursor::new(data)).unwrap();
        assert!(tag == 9 && got == want);
    }

    #[test]
    fn the_store_refuses_values_over_its_limit() {
        let timeout = Duration::from_secs(10);
        let host = TcpStore::host_with_secret("127.0.0.1", 0, timeout, b"s").unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", host.port())).unwrap();
        store_client_handshake(&mut c, &Secret::new(b"s")).unwrap();
        // a client of the run claims a 1 GiB value
        let mut req = vec![OP_SET];
        req.extend_from_slice(&1u64.to_le_bytes());
        req.push(b'k');
        req.extend_from_slice(&(1u64 << 30).to_le_bytes());
        c.write_all(&req).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        let closed = match c.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == io::ErrorKind::ConnectionReset,
        };
        assert!(closed, "the store closes the connection");
        assert!(host.get_timeout("k", Duration::from_millis(1)).is_err());
        // clients refuse to send one
        let c = TcpStore::connect_with_secret("127.0.0.1", host.port(), timeout, b"s").unwrap();
        let e = c
            .set("big", &vec![0; MAX_VALUE + 1])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`big`") && e.contains(&MAX_VALUE.to_string()),
            "{e}"
        );
    }
}
