//! virtio-mmio (version 2) transport and the devices behind it.
//!
//! Queues are virtio-queue's split queues; everything the guest puts in a
//! queue is validated by virtio-queue (descriptor addresses inside guest
//! memory, chain lengths bounded by the queue size) before a device sees
//! it. A device processes a queue when the guest writes QueueNotify (in
//! the vCPU thread that took the exit), then raises its interrupt through
//! an irqfd.

use std::sync::Mutex;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Size of each device's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Where the first device's window starts; the next ones follow.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// The first device's GSI; the next ones follow.
pub const FIRST_IRQ: u32 = 5;

const MAGIC: u32 = 0x7472_6976;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 0x80;
const INT_USED_RING: u32 = 1;

/// A descriptor chain of this VMM's guest memory.
pub type Chain<'a> = virtio_queue::DescriptorChain<&'a GuestMemoryMmap>;

/// Pops every available chain, hands it to `serve` (which returns the
/// bytes it wrote into the guest), and marks it used. Returns whether any
/// chain was used.
pub fn serve_chains(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    mut serve: impl FnMut(Chain<'_>) -> u32,
) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let written = serve(chain);
        if queue.add_used(mem, head, written).is_err() {
            break;
        }
        used = true;
    }
    used
}

/// The chain's readable bytes, at most `max` of them (what the guest may
/// send in one request is bounded before anything is allocated).
pub fn gather(chain: Chain<'_>, mem: &GuestMemoryMmap, max: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for d in chain.readable() {
        let n = (d.len() as usize).min(max - bytes.len());
        let start = bytes.len();
        bytes.resize(start + n, 0);
        if mem.read_slice(&mut bytes[start..], d.addr()).is_err() {
            bytes.truncate(start);
            break;
        }
    }
    bytes
}

/// Writes `bytes` across the chain's writable descriptors; returns how
/// many fit.
pub fn scatter(chain: Chain<'_>, mem: &GuestMemoryMmap, bytes: &[u8]) -> usize {
    let mut off = 0;
    for d in chain.writable() {
        if off == bytes.len() {
            break;
        }
        let n = (d.len() as usize).min(bytes.len() - off);
        if mem.write_slice(&bytes[off..off + n], d.addr()).is_err() {
            break;
        }
        off += n;
    }
    off
}

/// What a virtio device does; the transport does the rest.
pub trait Device: Send {
    /// virtio device id (4 = entropy).
    fn device_type(&self) -> u32;
    /// Feature bits besides VIRTIO_F_VERSION_1.
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16];
    /// Serves what the guest put in queue `index` (of `queues`, all the
    /// device's queues); returns whether anything was used (so the
    /// interrupt is raised).
    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// Device configuration space, read at `offset`.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    /// A host fd the event loop watches for this device (a tap).
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The backend fd is readable; returns whether anything was used.
    fn backend_ready(&mut self, _queues: &mut [Queue], _mem: &GuestMemoryMmap) -> bool {
        false
    }
}

/// One device on the virtio-mmio bus.
pub struct MmioTransport {
    device: Box<dyn Device>,
    mem: GuestMemoryMmap,
    irq: EventFd,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
}

impl MmioTransport {
    pub fn new(device: Box<dyn Device>, mem: GuestMemoryMmap, irq: EventFd) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&n| Queue::new(n).expect("queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
        }
    }

    fn features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.interrupt_status = 0;
        self.driver_features = 0;
    }

    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.device.device_type(),
            0x00c => 0x6b73_7568, // "husk"
            0x010 => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self.queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => 0,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            0x044 => {
                let mem = self.mem.clone();
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                    if v == 1 && !q.is_valid(&mem) {
                        // Rings outside guest memory or a bad size: refuse.
                        q.set_ready(false);
                    }
                }
            }
            0x050 => self.notify(v as usize),
            0x064 => self.interrupt_status &= !v,
            0x070 => {
                if v == 0 {
                    self.reset();
                } else {
                    if v & STATUS_FEATURES_OK != 0 && self.driver_features & !self.features() != 0 {
                        // The driver asked for features we do not offer.
                        self.status = v & !STATUS_FEATURES_OK;
                        return;
                    }
                    self.status = v;
                }
            }
            0x080 => self.set_addr(|q, lo| q.set_desc_table_address(Some(lo), None), v),
            0x084 => self.set_addr(|q, hi| q.set_desc_table_address(None, Some(hi)), v),
            0x090 => self.set_addr(|q, lo| q.set_avail_ring_address(Some(lo), None), v),
            0x094 => self.set_addr(|q, hi| q.set_avail_ring_address(None, Some(hi)), v),
            0x0a0 => self.set_addr(|q, lo| q.set_used_ring_address(Some(lo), None), v),
            0x0a4 => self.set_addr(|q, hi| q.set_used_ring_address(None, Some(hi)), v),
            _ => {}
        }
    }

    fn set_addr(&mut self, f: impl FnOnce(&mut Queue, u32), v: u32) {
        if let Some(q) = self.queue() {
            f(q, v);
        }
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    pub fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.device.backend_fd()
    }

    fn driver_ok(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    fn raise(&mut self) {
        self.interrupt_status |= INT_USED_RING;
        let _ = self.irq.write(1);
    }

    /// The backend fd became readable.
    pub fn backend_event(&mut self) {
        if !self.driver_ok() {
            return;
        }
        if self.device.backend_ready(&mut self.queues, &self.mem) {
            self.raise();
        }
    }

    pub fn notify(&mut self, index: usize) {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_FAILED != 0 {
            return;
        }
        if !self.queues.get(index).is_some_and(|q| q.ready()) {
            return;
        }
        if self.device.process(index, &mut self.queues, &self.mem) {
            self.raise();
        }
    }
}

/// virtio-rng: fills every writable buffer the guest offers from the
/// host's getrandom(2).
pub struct Rng;

impl Device for Rng {
    fn device_type(&self) -> u32 {
        4
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }

    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        serve_chains(queue, mem, |chain| {
            let mut written = 0u32;
            for d in chain.writable() {
                // Bounded: one descriptor is at most 4 GiB by type, and the
                // chain at most the queue size; fill in 4 KiB pieces.
                let mut left = d.len() as usize;
                let mut at = d.addr();
                let mut buf = [0u8; 4096];
                while left > 0 {
                    let n = left.min(buf.len());
                    if getrandom(&mut buf[..n]).is_err() || mem.write_slice(&buf[..n], at).is_err()
                    {
                        break;
                    }
                    written += n as u32;
                    left -= n;
                    at = GuestAddress(at.0 + n as u64);
                }
            }
            written
        })
    }
}

/// virtio-blk backed by a file: read, write (refused on a read-only disk),
/// flush (fdatasync) and get-id. Every request is checked against the
/// disk's size; data moves in 64 KiB pieces, so a hostile length never
/// becomes a large allocation.
pub struct Block {
    file: std::fs::File,
    sectors: u64,
    read_only: bool,
    id: [u8; 20],
}

const BLK_F_RO: u64 = 1 << 5;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_T_FLUSH: u32 = 4;
const BLK_T_GET_ID: u32 = 8;
const BLK_S_OK: u8 = 0;
const BLK_S_IOERR: u8 = 1;
const BLK_S_UNSUPP: u8 = 2;
const SECTOR: u64 = 512;

impl Block {
    pub fn open(path: &std::path::Path, read_only: bool) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        let len = file.metadata()?.len();
        let mut id = [0u8; 20];
        let name = path.file_name().unwrap_or_default().as_encoded_bytes();
        let n = name.len().min(20);
        id[..n].copy_from_slice(&name[..n]);
        Ok(Block {
            file,
            sectors: len / SECTOR,
            read_only,
            id,
        })
    }

    /// Serves one request chain; returns the bytes written into the guest.
    fn serve(
        &mut self,
        descs: &[virtio_queue::desc::split::Descriptor],
        mem: &GuestMemoryMmap,
    ) -> (u32, Option<GuestAddress>, u8) {
        use std::os::unix::fs::FileExt;
        let Some((status, body)) = descs.split_last() else {
            return (0, None, BLK_S_IOERR);
        };
        if !status.is_write_only() || status.len() < 1 {
            return (0, None, BLK_S_IOERR);
        }
        let status_at = Some(status.addr());
        let Some((head, data)) = body.split_first() else {
            return (0, status_at, BLK_S_IOERR);
        };
        if head.is_write_only() || head.len() < 16 {
            return (0, status_at, BLK_S_IOERR);
        }
        let (Ok(kind), Ok(sector)) = (
            mem.read_obj::<u32>(head.addr()),
            mem.read_obj::<u64>(GuestAddress(head.addr().0 + 8)),
        ) else {
            return (0, status_at, BLK_S_IOERR);
        };
        match kind {
            BLK_T_IN | BLK_T_OUT => {
                let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
                let end = sector
                    .checked_mul(SECTOR)
                    .and_then(|s| s.checked_add(total));
                if end.is_none_or(|e| e > self.sectors * SECTOR) {
                    return (0, status_at, BLK_S_IOERR);
                }
                if kind == BLK_T_OUT && self.read_only {
                    return (0, status_at, BLK_S_IOERR);
                }
                let mut offset = sector * SECTOR;
                let mut written = 0u32;
                let mut buf = vec![0u8; 64 << 10];
                for d in data {
                    if d.is_write_only() != (kind == BLK_T_IN) {
                        return (written, status_at, BLK_S_IOERR);
                    }
                    let mut left = u64::from(d.len());
                    let mut at = d.addr().0;
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        let ok = if kind == BLK_T_IN {
                            self.file.read_exact_at(&mut buf[..n], offset).is_ok()
                                && mem.write_slice(&buf[..n], GuestAddress(at)).is_ok()
                        } else {
                            mem.read_slice(&mut buf[..n], GuestAddress(at)).is_ok()
                                && self.file.write_all_at(&buf[..n], offset).is_ok()
                        };
                        if !ok {
                            return (written, status_at, BLK_S_IOERR);
                        }
                        if kind == BLK_T_IN {
                            written += n as u32;
                        }
                        left -= n as u64;
                        at += n as u64;
                        offset += n as u64;
                    }
                }
                (written, status_at, BLK_S_OK)
            }
            BLK_T_FLUSH => {
                if self.read_only || self.file.sync_data().is_ok() {
                    (0, status_at, BLK_S_OK)
                } else {
                    (0, status_at, BLK_S_IOERR)
                }
            }
            BLK_T_GET_ID => match data.first() {
                Some(d) if d.is_write_only() => {
                    let n = (d.len() as usize).min(self.id.len());
                    match mem.write_slice(&self.id[..n], d.addr()) {
                        Ok(()) => (n as u32, status_at, BLK_S_OK),
                        Err(_) => (0, status_at, BLK_S_IOERR),
                    }
                }
                _ => (0, status_at, BLK_S_IOERR),
            },
            _ => (0, status_at, BLK_S_UNSUPP),
        }
    }
}

impl Device for Block {
    fn device_type(&self) -> u32 {
        2
    }

    fn features(&self) -> u64 {
        BLK_F_FLUSH | if self.read_only { BLK_F_RO } else { 0 }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }

    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        serve_chains(queue, mem, |chain| {
            // At most the queue size, by virtio-queue's bound on chains.
            let descs: Vec<_> = chain.collect();
            let (written, status_at, status) = self.serve(&descs, mem);
            if let Some(at) = status_at {
                let _ = mem.write_obj(status, at);
            }
            written + u32::from(status_at.is_some())
        })
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64, in 512-byte sectors) at offset 0; the rest zero.
        let cap = self.sectors.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *b = cap.get(at).copied().unwrap_or(0);
        }
    }
}

/// virtio-net over a tap device (opened with IFF_VNET_HDR, so the 12-byte
/// virtio-net header passes through unchanged). Queue 0 receives, queue 1
/// transmits. A frame read from the tap while the guest has no receive
/// buffer waits until it offers one.
pub struct Net {
    tap: std::fs::File,
    mac: [u8; 6],
    pending: Option<Vec<u8>>,
}

const NET_F_MAC: u64 = 1 << 5;
/// virtio-net header (12 bytes with VERSION_1) plus a 64 KiB frame.
const NET_MAX_FRAME: usize = 12 + 65550;

impl Net {
    pub fn new(tap: std::fs::File, mac: [u8; 6]) -> Self {
        Net {
            tap,
            mac,
            pending: None,
        }
    }

    /// Copies pending frames into receive buffers while both exist.
    fn deliver(&mut self, rx: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        use std::io::Read;
        let mut used = false;
        loop {
            if self.pending.is_none() {
                let mut buf = vec![0u8; NET_MAX_FRAME];
                match self.tap.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        buf.truncate(n);
                        self.pending = Some(buf);
                    }
                    _ => break,
                }
            }
            let Some(chain) = rx.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let frame = self.pending.take().unwrap_or_default();
            let off = scatter(chain, mem, &frame);
            if rx.add_used(mem, head, off as u32).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

impl Device for Net {
    fn device_type(&self) -> u32 {
        1
    }

    fn features(&self) -> u64 {
        NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256]
    }

    fn process(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        use std::io::Write;
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        if index == 0 {
            return self.deliver(queue, mem);
        }
        serve_chains(queue, mem, |chain| {
            let frame = gather(chain, mem, NET_MAX_FRAME);
            if frame.len() > 12 {
                let _ = self.tap.write(&frame);
            }
            0
        })
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.mac.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(std::os::fd::AsRawFd::as_raw_fd(&self.tap))
    }

    fn backend_ready(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        match queues.first_mut() {
            Some(rx) if rx.ready() => self.deliver(rx, mem),
            _ => false,
        }
    }
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled part of buf.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// The devices of one VM, by MMIO window.
#[derive(Default)]
pub struct Bus {
    devices: Vec<(u64, Mutex<MmioTransport>)>,
}

impl Bus {
    pub fn add(&mut self, base: u64, t: MmioTransport) {
        self.devices.push((base, Mutex::new(t)));
    }

    pub fn devices(&self) -> impl Iterator<Item = (u64, &Mutex<MmioTransport>)> {
        self.devices.iter().map(|(b, t)| (*b, t))
    }

    fn find(&self, addr: u64) -> Option<(u64, &Mutex<MmioTransport>)> {
        self.devices
            .iter()
            .find(|(base, _)| (*base..base + MMIO_SIZE).contains(&addr))
            .map(|(base, t)| (addr - base, t))
    }

    /// An MMIO read; false if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, t)) => {
                if let Ok(mut t) = t.lock() {
                    t.read(off, data);
                }
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, t)) => {
                if let Ok(mut t) = t.lock() {
                    t.write(off, data);
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn desc(m: &GuestMemoryMmap, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = DESC + 16 * i;
        m.write_obj(addr, GuestAddress(at)).unwrap();
        m.write_obj(len, GuestAddress(at + 8)).unwrap();
        m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        m.write_obj(next, GuestAddress(at + 14)).unwrap();
    }

    /// Makes descriptor 0 available `times` times (avail idx = `times`).
    fn offer(m: &GuestMemoryMmap, times: u16) {
        for i in 0..times.min(8) {
            m.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(i)))
                .unwrap();
        }
        m.write_obj(times, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn queue(m: &GuestMemoryMmap) -> Queue {
        let mut q = Queue::new(8).unwrap();
        q.set_size(8);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(m));
        q
    }

    fn used(m: &GuestMemoryMmap) -> (u16, u32) {
        (
            m.read_obj(GuestAddress(USED + 2)).unwrap(),
            m.read_obj(GuestAddress(USED + 8)).unwrap(),
        )
    }

    #[test]
    fn rng_fills_a_writable_buffer() {
        let m = mem();
        desc(&m, 0, 0x8000, 64, 2, 0);
        offer(&m, 1);
        let mut q = queue(&m);
        assert!(Rng.process(0, std::slice::from_mut(&mut q), &m));
        assert_eq!(used(&m), (1, 64));
        let mut got = [0u8; 64];
        m.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_ne!(got, [0u8; 64]);
    }

    #[test]
    fn hostile_chains_are_contained() {
        // A buffer outside guest memory: nothing written, nothing panics.
        let m = mem();
        desc(&m, 0, 0x4000_0000, 16, 2, 0);
        offer(&m, 1);
        let mut q = queue(&m);
        Rng.process(0, std::slice::from_mut(&mut q), &m);
        assert_eq!(used(&m), (1, 0));

        // A chain that loops on itself ends (virtio-queue bounds it).
        let m = mem();
        desc(&m, 0, 0x8000, 16, 2 | 1, 0);
        offer(&m, 1);
        let mut q = queue(&m);
        Rng.process(0, std::slice::from_mut(&mut q), &m);
        assert!(used(&m).1 <= 16 * 8, "{:?}", used(&m));

        // An absurd length that runs off the end of memory stops there.
        let m = mem();
        desc(&m, 0, 0xf_f000, u32::MAX, 2, 0);
        offer(&m, 1);
        let mut q = queue(&m);
        Rng.process(0, std::slice::from_mut(&mut q), &m);
        assert_eq!(used(&m), (1, 0x1000));

        // An avail index far past the queue size is refused.
        let m = mem();
        desc(&m, 0, 0x8000, 16, 2, 0);
        offer(&m, 1000);
        let mut q = queue(&m);
        assert!(!Rng.process(0, std::slice::from_mut(&mut q), &m));
        assert_eq!(used(&m).0, 0);
    }

    #[test]
    fn hostile_block_requests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let run = |descs: &[(u64, u32, u16)], header: (u32, u64)| {
            let m = mem();
            m.write_obj(header.0, GuestAddress(0x9000)).unwrap();
            m.write_obj(header.1, GuestAddress(0x9008)).unwrap();
            for (i, (addr, len, flags)) in descs.iter().enumerate() {
                let next = if i + 1 < descs.len() { 1 } else { 0 };
                desc(&m, i as u64, *addr, *len, flags | next, i as u16 + 1);
            }
            offer(&m, 1);
            let mut q = queue(&m);
            let mut b = Block::open(&path, false).unwrap();
            assert!(b.process(0, std::slice::from_mut(&mut q), &m));
            let status: u8 = m.read_obj(GuestAddress(0xa000)).unwrap();
            (status, m)
        };
        let hdr = (0x9000, 16, 0);
        let st = (0xa000, 1, 2);
        // A read past the end of the 8-sector disk.
        assert_eq!(
            run(&[hdr, (0x8000, 512, 2), st], (BLK_T_IN, 8)).0,
            BLK_S_IOERR
        );
        // A sector number that overflows when multiplied.
        assert_eq!(
            run(&[hdr, (0x8000, 512, 2), st], (BLK_T_IN, u64::MAX / 2)).0,
            BLK_S_IOERR
        );
        // A length larger than the disk.
        assert_eq!(
            run(&[hdr, (0x8000, 8192, 2), st], (BLK_T_IN, 0)).0,
            BLK_S_IOERR
        );
        // A length past the end of guest memory never reaches the device
        // (virtio-queue ends the chain there); nothing is written.
        let (_, m) = run(&[hdr, (0xf_ff00, u32::MAX, 2), st], (BLK_T_IN, 0));
        let untouched: u8 = m.read_obj(GuestAddress(0xf_ff00)).unwrap();
        assert_eq!(untouched, 0);
        // A read whose data buffer is not writable.
        assert_eq!(
            run(&[hdr, (0x8000, 512, 0), st], (BLK_T_IN, 0)).0,
            BLK_S_IOERR
        );
        // Unknown request types.
        assert_eq!(run(&[hdr, st], (77, 0)).0, BLK_S_UNSUPP);
        // A good read, for contrast.
        let (s, m) = run(&[hdr, (0x8000, 512, 2), st], (BLK_T_IN, 7));
        assert_eq!(s, BLK_S_OK);
        let got: u8 = m.read_obj(GuestAddress(0x8000)).unwrap();
        assert_eq!(got, 7);
    }

    #[test]
    fn transport_refuses_rings_outside_memory() {
        let m = mem();
        let evt = EventFd::new(0).unwrap();
        let mut t = MmioTransport::new(Box::new(Rng), m, evt);
        let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        let r = |t: &mut MmioTransport, off: u64| {
            let mut b = [0u8; 4];
            t.read(off, &mut b);
            u32::from_le_bytes(b)
        };
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 8), 4);
        w(&mut t, 0x070, 1 | 2);
        // Features we do not offer are refused at FEATURES_OK.
        w(&mut t, 0x024, 0);
        w(&mut t, 0x020, 1 << 5);
        w(&mut t, 0x070, 1 | 2 | 8);
        assert_eq!(r(&mut t, 0x070) & 8, 0);
        w(&mut t, 0x020, 0);
        w(&mut t, 0x070, 1 | 2 | 8);
        assert_eq!(r(&mut t, 0x070) & 8, 8);
        w(&mut t, 0x030, 0);
        w(&mut t, 0x038, 8);
        w(&mut t, 0x080, 0x7000_0000);
        w(&mut t, 0x090, AVAIL as u32);
        w(&mut t, 0x0a0, USED as u32);
        w(&mut t, 0x044, 1);
        assert_eq!(
            r(&mut t, 0x044),
            0,
            "a descriptor table outside memory must not go ready"
        );
        // Registers past the window and unknown queues are harmless.
        w(&mut t, 0x030, 7);
        w(&mut t, 0x044, 1);
        w(&mut t, 0x050, 99);
        assert_eq!(r(&mut t, 0x034), 0);
    }
}
