//! The rendezvous store: a small key/value table that rank 0 hosts at
//! MASTER_ADDR:MASTER_PORT ([`TcpStore::host_with_secret`]) and the other ranks reach
//! over TCP ([`TcpStore::connect_with_secret`]), for the addresses the mesh is built
//! from and other small metadata (a NCCL unique id). A `get` waits for its key.
//!
//! Every client connection opens with a handshake that proves both sides know the
//! run's secret (see `auth.rs`): the client sends its hello (`wire.rs`, no body); the
//! server answers with its own and an HMAC; the client answers with its HMAC. A
//! connection that fails it is closed before anything but the fixed-size hello was
//! read, and a silent one is dropped after [`HELLO_TIMEOUT`]. Then, all integers
//! little-endian, a request is `op: u8, key_len: u64, key` followed by (set)
//! `value_len: u64, value` or (get) `timeout_ms: u64`; keys are capped at 4 KiB and
//! values at [`MAX_VALUE`], and a value's buffer grows only as its bytes arrive.

use super::auth::{Secret, MAC, NONCE};
use super::mailbox::deadline_after;
use super::wire::{
    bad_data, check_hello, comm, dial_retry, hello, length, read_exact_until, read_u64, read_vec,
    remaining, resolve, timed_out, wrong_secret, RejectLog, HELLO_TIMEOUT,
};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

    /// [`TcpStore::connect_with_secret`] with a `deadline` shared with the caller (a
    /// rank joining a group spends one timeout on the store and the mesh together).
    pub(super) fn connect_until(
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

#[cfg(test)]
mod tests {
    use super::*;

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
