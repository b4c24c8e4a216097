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

/// What a virtio device does; the transport does the rest.
pub trait Device: Send {
    /// virtio device id (4 = entropy).
    fn device_type(&self) -> u32;
    /// Feature bits besides VIRTIO_F_VERSION_1.
    fn features(&self) -> u64 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16];
    /// Serves what the guest put in queue `index`; returns whether anything
    /// was used (so the interrupt is raised).
    fn process(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool;
    /// Device configuration space, read at `offset`.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
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

    fn notify(&mut self, index: usize) {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_FAILED != 0 {
            return;
        }
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        if !q.ready() {
            return;
        }
        if self.device.process(index, q, &self.mem) {
            self.interrupt_status |= INT_USED_RING;
            let _ = self.irq.write(1);
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

    fn process(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
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
            if queue.add_used(mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        used
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
        assert!(Rng.process(0, &mut q, &m));
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
        Rng.process(0, &mut q, &m);
        assert_eq!(used(&m), (1, 0));

        // A chain that loops on itself ends (virtio-queue bounds it).
        let m = mem();
        desc(&m, 0, 0x8000, 16, 2 | 1, 0);
        offer(&m, 1);
        let mut q = queue(&m);
        Rng.process(0, &mut q, &m);
        assert!(used(&m).1 <= 16 * 8, "{:?}", used(&m));

        // An absurd length that runs off the end of memory stops there.
        let m = mem();
        desc(&m, 0, 0xf_f000, u32::MAX, 2, 0);
        offer(&m, 1);
        let mut q = queue(&m);
        Rng.process(0, &mut q, &m);
        assert_eq!(used(&m), (1, 0x1000));

        // An avail index far past the queue size is refused.
        let m = mem();
        desc(&m, 0, 0x8000, 16, 2, 0);
        offer(&m, 1000);
        let mut q = queue(&m);
        assert!(!Rng.process(0, &mut q, &m));
        assert_eq!(used(&m).0, 0);
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
