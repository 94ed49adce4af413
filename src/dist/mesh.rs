//! Ranks as processes, on one machine or many, connected by TCP: the [`TcpGroup`].
//!
//! Rendezvous goes through the [`TcpStore`] that rank 0 hosts at MASTER_ADDR:MASTER_PORT
//! (`store.rs`): every rank publishes the address of its own listener there, then the
//! ranks build a full mesh (one connection per pair, the higher rank dialing the
//! lower). A reader thread per connection decodes frames into the rank's [`Mailbox`];
//! when a connection ends (the peer exited, was killed, or dropped its group) the peer
//! is marked as gone, so every pending and later receive from it fails at once, naming
//! it.
//!
//! Every connection opens with a handshake that proves both sides know the run's
//! secret (see `auth.rs`): the dialing (higher) rank sends its hello (`wire.rs`, with
//! the body `rank: u64, world: u64`); the accepting rank answers with its hello and
//! HMAC; the dialer answers with its HMAC. A connection that fails it is closed before
//! anything but the fixed-size hello was read, and a silent one is dropped after
//! [`HELLO_TIMEOUT`]. Then a message is `tag: u64, n: u64` followed by `n` f32s, all
//! little-endian; `n` is capped at [`MAX_MESSAGE`], and a message's buffer grows only
//! as its bytes arrive.

use super::auth::{Secret, MAC, NONCE};
use super::env::DistEnv;
use super::mailbox::{deadline_after, left_error, Mailbox};
use super::store::TcpStore;
use super::wire::{
    bad_data, check_hello, comm, dial_retry, hello, length, read_exact_until, read_u64, read_vec,
    remaining, resolve, timed_out, wrong_secret, RejectLog, HELLO_TIMEOUT,
};
use super::ProcessGroup;
use crate::error::{Error, Result};
use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Puts "rank r: " in front of a communication error from a helper.
fn on_rank(rank: usize, e: Error) -> Error {
    match e {
        Error::Comm(m) => Error::Comm(format!("rank {rank}: {m}")),
        Error::Config(m) => Error::Config(format!("rank {rank}: {m}")),
        e => e,
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::wire::EAGER_BYTES;

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
}
