//! The low-level pieces that both TCP protocols (the rendezvous store in `store.rs`,
//! the mesh in `mesh.rs`) share, defined once: bounded reads of lengths and payloads,
//! reads with a deadline, dialing with retries, and the hello that opens every
//! handshake (`magic: [u8; 4], version: u32`, a protocol's body, `nonce: [u8; 16]`;
//! the proof of the secret itself is in `auth.rs`). All integers are little-endian.

use super::auth::{nonce, NONCE};
use crate::error::{Error, Result};
use std::collections::HashSet;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

pub(crate) fn comm(msg: String) -> Error {
    Error::Comm(msg)
}

/// Time left until `deadline`, `None` once it passed (never a zero duration, which
/// socket timeouts reject).
pub(crate) fn remaining(deadline: Instant) -> Option<Duration> {
    // never None before the deadline: a wait must not end early
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .map(|d| d.max(Duration::from_millis(1)))
}

pub(crate) fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

pub(crate) fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
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
pub(crate) fn dial_retry(addrs: &[SocketAddr], deadline: Instant) -> io::Result<TcpStream> {
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

pub(crate) fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Bytes of a message allocated before any of it arrived; past them, a buffer at most
/// doubles what was received so far.
pub(crate) const EAGER_BYTES: usize = 4 << 20;

/// `n` values of `T` from `r`. Memory follows the bytes that actually arrive (at most
/// twice them, beyond the first [`EAGER_BYTES`]), never a length a peer merely claims.
pub(crate) fn read_vec<T: bytemuck::Pod>(r: &mut impl Read, n: usize) -> io::Result<Vec<T>> {
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
pub(crate) fn length(n: u64, max: usize, what: &str) -> io::Result<usize> {
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
pub(crate) fn read_exact_until(
    mut conn: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> io::Result<()> {
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
pub(crate) struct RejectLog {
    seen: Mutex<HashSet<IpAddr>>,
}

/// Addresses a [`RejectLog`] remembers; refusals from more are not logged.
const REJECT_LOG_MAX: usize = 1024;

impl RejectLog {
    pub(crate) fn refused(&self, what: &str, from: SocketAddr, why: &io::Error) {
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
pub(crate) fn hello(magic: &[u8; 4], version: u32, body: &[u8]) -> io::Result<Vec<u8>> {
    let mut h = Vec::with_capacity(8 + body.len() + NONCE);
    h.extend_from_slice(magic);
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(body);
    h.extend_from_slice(&nonce()?);
    Ok(h)
}

/// Checks a received hello's magic and version (`who`: what it should come from).
pub(crate) fn check_hello(h: &[u8], magic: &[u8; 4], version: u32, who: &str) -> io::Result<()> {
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

pub(crate) fn wrong_secret(who: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{who} does not know this run's secret (FERROVIT_SECRET differs)"),
    )
}

pub(crate) fn bad_data(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}
