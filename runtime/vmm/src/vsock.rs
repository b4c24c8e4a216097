//! virtio-vsock with a userspace backend over unix sockets, in the hybrid
//! convention Firecracker uses:
//! - host to guest: a host process connects to the unix socket `uds` and
//!   writes `CONNECT <port>\n`; once the guest accepts, it reads
//!   `OK <host port>\n` and the stream carries the connection;
//! - guest to host: a guest connection to (CID 2, port P) becomes a
//!   connection to the unix socket `<uds>_<P>`.
//!
//! Every packet the guest sends is checked (its CID, the host CID, the
//! stream type, a length that matches the data and stays under 64 KiB)
//! and the guest's credit is enforced: a guest that sends more than it may
//! gets its connection reset. The device owns an epoll of its listener and
//! streams; that epoll is the backend fd the device thread watches.

use crate::virtio::{gather, scatter, serve_chains, Device};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const HOST_CID: u64 = 2;
const HDR: usize = 44;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
/// What each host-side connection can buffer for the guest.
const BUF_ALLOC: u32 = 256 << 10;
/// Largest payload the guest may send in one packet.
const MAX_PKT: u32 = 64 << 10;
/// Largest payload sent to the guest in one packet (fits a 4 KiB buffer).
const RX_CHUNK: usize = 4096 - HDR;
/// Host-side ports of host-initiated connections start here.
const FIRST_HOST_PORT: u32 = 1 << 30;
const LISTENER: u64 = u64::MAX;
/// Epoll token of host sockets still sending their greeting.
const GREETING: u64 = u64::MAX - 1;

#[derive(Clone, Copy, Debug, Default)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn parse(b: &[u8; HDR]) -> Self {
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap_or_default());
        Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn bytes(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(PartialEq, Eq)]
enum State {
    /// Host-initiated, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes of the guest's written to the stream.
    fwd_cnt: u32,
    /// Guest bytes the stream did not take yet.
    out: Vec<u8>,
}

/// (host port, guest port)
type Key = (u32, u32);

pub struct Vsock {
    cid: u64,
    /// The listening socket's path; `<uds>_<P>` for guest connections.
    uds: PathBuf,
    /// The same once this process is in its jail (`/vsock/NAME`).
    jailed_uds: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    /// Host sockets accepted but not yet through `CONNECT <port>\n`.
    greeting: Vec<(UnixStream, Vec<u8>)>,
    to_guest: VecDeque<(Hdr, Vec<u8>)>,
    next_port: u32,
    tokens: HashMap<u64, Key>,
}

impl Vsock {
    /// Listens on `uds` (which must not exist) for host-initiated
    /// connections.
    pub fn new(cid: u64, uds: PathBuf) -> std::io::Result<Self> {
        Self::reached_at(cid, uds.clone(), uds)
    }

    /// As [`Vsock::new`], binding `uds` now; once this process is in its
    /// jail ([`crate::jail::entered`]), later paths (the guest's
    /// `<uds>_<P>` connections, the socket's removal) go through `later`:
    /// the same socket as the jail shows it.
    pub fn reached_at(cid: u64, uds: PathBuf, later: PathBuf) -> std::io::Result<Self> {
        let listener = UnixListener::bind(&uds)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, LISTENER),
        )?;
        Ok(Vsock {
            cid,
            uds,
            jailed_uds: later,
            listener,
            epoll,
            conns: HashMap::new(),
            greeting: Vec::new(),
            to_guest: VecDeque::new(),
            next_port: FIRST_HOST_PORT,
            tokens: HashMap::new(),
        })
    }

    fn reply(&self, key: Key, op: u16, data: Vec<u8>) -> (Hdr, Vec<u8>) {
        let fwd = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
        (
            Hdr {
                src_cid: HOST_CID,
                dst_cid: self.cid,
                src_port: key.0,
                dst_port: key.1,
                len: data.len() as u32,
                kind: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: BUF_ALLOC,
                fwd_cnt: fwd,
            },
            data,
        )
    }

    fn send(&mut self, key: Key, op: u16, data: Vec<u8>) {
        let p = self.reply(key, op, data);
        self.to_guest.push_back(p);
    }

    fn token(key: Key) -> u64 {
        (u64::from(key.0) << 32) | u64::from(key.1)
    }

    fn add(&mut self, key: Key, stream: UnixStream, state: State) {
        let _ = stream.set_nonblocking(true);
        let _ = self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, Self::token(key)),
        );
        self.tokens.insert(Self::token(key), key);
        self.conns.insert(
            key,
            Conn {
                stream,
                state,
                tx_cnt: 0,
                peer_buf_alloc: 0,
                peer_fwd_cnt: 0,
                fwd_cnt: 0,
                out: Vec::new(),
            },
        );
    }

    fn close(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.tokens.remove(&Self::token(key));
    }

    fn reset(&mut self, key: Key) {
        self.close(key);
        self.send(key, OP_RST, Vec::new());
    }

    /// One packet from the guest.
    fn guest_packet(&mut self, h: Hdr, data: Vec<u8>) {
        let key = (h.dst_port, h.src_port);
        if h.src_cid != self.cid || h.dst_cid != HOST_CID || h.kind != TYPE_STREAM {
            if h.op != OP_RST {
                self.send(key, OP_RST, Vec::new());
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_REQUEST => {
                if self.conns.contains_key(&key) {
                    return self.reset(key);
                }
                let path = PathBuf::from(format!("{}_{}", self.uds().display(), h.dst_port));
                match UnixStream::connect(&path) {
                    Ok(s) => {
                        self.add(key, s, State::Established);
                        if let Some(c) = self.conns.get_mut(&key) {
                            c.peer_buf_alloc = h.buf_alloc;
                            c.peer_fwd_cnt = h.fwd_cnt;
                        }
                        self.send(key, OP_RESPONSE, Vec::new());
                    }
                    Err(_) => self.send(key, OP_RST, Vec::new()),
                }
            }
            OP_RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == State::Connecting => {
                    c.state = State::Established;
                    let line = format!("OK {}\n", key.0);
                    if c.stream.write_all(line.as_bytes()).is_err() {
                        self.reset(key);
                    }
                }
                _ => self.reset(key),
            },
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return self.send(key, OP_RST, Vec::new());
                };
                if c.state != State::Established || c.out.len() + data.len() > BUF_ALLOC as usize {
                    // Not connected, or more than the credit we gave.
                    return self.reset(key);
                }
                c.out.extend_from_slice(&data);
                let mut failed = false;
                while !c.out.is_empty() {
                    match c.stream.write(&c.out) {
                        Ok(0) => {
                            failed = true;
                            break;
                        }
                        Ok(n) => {
                            c.out.drain(..n);
                            c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                if failed {
                    return self.reset(key);
                }
                self.send(key, OP_CREDIT_UPDATE, Vec::new());
            }
            OP_CREDIT_REQUEST => self.send(key, OP_CREDIT_UPDATE, Vec::new()),
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => self.reset(key),
            OP_RST => self.close(key),
            _ => self.reset(key),
        }
    }

    /// Accepts host connections, reads greetings and stream data.
    fn poll_host(&mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for ev in events.iter().take(n) {
            if ev.data() == LISTENER {
                while let Ok((s, _)) = self.listener.accept() {
                    let _ = s.set_nonblocking(true);
                    let _ = self.epoll.ctl(
                        ControlOperation::Add,
                        s.as_raw_fd(),
                        EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, GREETING),
                    );
                    self.greeting.push((s, Vec::new()));
                }
            }
        }
        // Greetings: "CONNECT <port>\n", at most 32 bytes.
        let mut i = 0;
        while i < self.greeting.len() {
            let (s, buf) = &mut self.greeting[i];
            // Edge-triggered: read until the line is complete or the
            // socket is empty. The greeting is read a byte at a time so
            // nothing after the newline (the first data) is consumed.
            let done = loop {
                let mut b = [0u8; 1];
                match s.read(&mut b) {
                    Ok(0) => break Some(None),
                    Ok(_) if b[0] == b'\n' => {
                        let line = String::from_utf8_lossy(buf).into_owned();
                        break Some(
                            line.strip_prefix("CONNECT ")
                                .and_then(|p| p.trim().parse::<u32>().ok()),
                        );
                    }
                    Ok(_) if buf.len() >= 32 => break Some(None),
                    Ok(_) => buf.push(b[0]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                    Err(_) => break Some(None),
                }
            };
            match done {
                None => i += 1,
                Some(port) => {
                    let (s, _) = self.greeting.remove(i);
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        s.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    if let Some(port) = port {
                        let key = (self.next_port, port);
                        self.next_port = self.next_port.wrapping_add(1).max(FIRST_HOST_PORT);
                        self.add(key, s, State::Connecting);
                        self.send(key, OP_REQUEST, Vec::new());
                    }
                }
            }
        }
    }

    /// Reads stream data the guest has credit for into packets.
    fn read_streams(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if c.state != State::Established {
                continue;
            }
            let in_flight = c.tx_cnt.wrapping_sub(c.peer_fwd_cnt);
            let credit = c.peer_buf_alloc.saturating_sub(in_flight) as usize;
            if credit == 0 {
                continue;
            }
            let mut buf = vec![0u8; credit.min(RX_CHUNK)];
            match c.stream.read(&mut buf) {
                Ok(0) => self.reset(key),
                Ok(n) => {
                    buf.truncate(n);
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    self.send(key, OP_RW, buf);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => self.reset(key),
            }
        }
    }

    /// Hands queued packets to the guest's receive buffers.
    fn deliver(&mut self, rx: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some((h, data)) = self.to_guest.front() {
            let Some(chain) = rx.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let mut bytes = h.bytes().to_vec();
            bytes.extend_from_slice(data);
            let off = scatter(chain, mem, &bytes);
            // A buffer too small for the packet: the packet is dropped
            // (a guest that offers tiny buffers only hurts itself).
            let _ = rx.add_used(mem, head, off as u32);
            self.to_guest.pop_front();
            used = true;
        }
        used
    }

    fn pump(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.poll_host();
        let Some(rx) = queues.first_mut() else {
            return false;
        };
        if !rx.ready() {
            return false;
        }
        let mut used = self.deliver(rx, mem);
        // Read more only while the guest has buffers for it.
        loop {
            let before = self.to_guest.len();
            if before > 0 {
                break;
            }
            self.read_streams();
            if self.to_guest.len() == before {
                break;
            }
            used |= self.deliver(rx, mem);
        }
        used
    }
}

impl Vsock {
    fn uds(&self) -> &std::path::Path {
        if crate::jail::entered() {
            &self.jailed_uds
        } else {
            &self.uds
        }
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.uds());
    }
}

impl Device for Vsock {
    fn device_type(&self) -> u32 {
        19
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 256]
    }

    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match index {
            0 => self.pump(queues, mem),
            1 => {
                let Some(queue) = queues.get_mut(1) else {
                    return false;
                };
                let mut packets = Vec::new();
                let used = serve_chains(queue, mem, |chain| {
                    packets.push(gather(chain, mem, HDR + MAX_PKT as usize));
                    0
                });
                for mut bytes in packets {
                    if bytes.len() < HDR {
                        continue;
                    }
                    let mut hb = [0u8; HDR];
                    hb.copy_from_slice(&bytes[..HDR]);
                    let h = Hdr::parse(&hb);
                    let data = bytes.split_off(HDR);
                    if h.len as usize != data.len() || h.len > MAX_PKT {
                        self.reset((h.dst_port, h.src_port));
                        continue;
                    }
                    self.guest_packet(h, data);
                }
                // Answers (and data the new credit allows) go out now.
                self.pump(queues, mem) | used
            }
            // Event queue: nothing to tell the guest (no migration).
            _ => false,
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cid = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = cid.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn backend_ready(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        self.pump(queues, mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(src_cid: u64, op: u16, len: u32) -> Hdr {
        Hdr {
            src_cid,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 2000,
            len,
            kind: TYPE_STREAM,
            op,
            buf_alloc: 4096,
            ..Default::default()
        }
    }

    #[test]
    fn hostile_packets_get_resets_not_connections() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let mut v = Vsock::new(5, uds.clone()).unwrap();
        // A forged source CID.
        v.guest_packet(pkt(9, OP_REQUEST, 0), vec![]);
        // Data on a connection that does not exist.
        v.guest_packet(pkt(5, OP_RW, 3), b"abc".to_vec());
        // A connection to a port nobody listens on.
        v.guest_packet(pkt(5, OP_REQUEST, 0), vec![]);
        // A datagram type.
        let mut dgram = pkt(5, OP_REQUEST, 0);
        dgram.kind = 2;
        v.guest_packet(dgram, vec![]);
        assert!(v.conns.is_empty());
        assert_eq!(v.to_guest.len(), 4);
        assert!(v.to_guest.iter().all(|(h, _)| h.op == OP_RST));
        // A guest that sends past its credit is reset.
        let l = std::os::unix::net::UnixListener::bind(format!("{}_2000", uds.display())).unwrap();
        v.to_guest.clear();
        v.guest_packet(pkt(5, OP_REQUEST, 0), vec![]);
        let _peer = l.accept().unwrap();
        assert_eq!(v.to_guest.pop_front().map(|p| p.0.op), Some(OP_RESPONSE));
        let flood = vec![0u8; BUF_ALLOC as usize + 1];
        v.guest_packet(pkt(5, OP_RW, flood.len() as u32), flood);
        assert!(v.conns.is_empty(), "over-credit connection kept");
        assert_eq!(v.to_guest.pop_back().map(|p| p.0.op), Some(OP_RST));
        drop(v);
        assert!(!uds.exists(), "socket left behind");
    }
}
