//! husk-vmm's virtio devices as a hostile guest drives them: descriptor
//! tables, available rings and buffer contents all come from the input,
//! laid out in guest memory with virtio-queue's `MockSplitQueue`. The
//! first byte picks the device (rng, blk, net, vsock, fs); the next ones
//! pick which queues the guest notifies, in what order.
//!
//! The devices are the real ones on real backends: a disk file, a
//! datagram socket pair as the tap, a vsock listener, a virtio-fs share of
//! a scratch directory (with CAP_MKNOD dropped, as husk-vmm does). Nothing
//! may panic, hang, or change anything outside the share.
#![no_main]

use husk_vmm::fs::{give_up_device_nodes, Fs};
use husk_vmm::virtio::{Block, Device, Net, Rng};
use husk_vmm::vsock::Vsock;
use libfuzzer_sys::fuzz_target;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM: u64 = 0x10000;
const QSIZE: u16 = 16;
/// Where each of the (up to two) fuzzed queues lies.
const QUEUE_AT: [u64; 2] = [0, 0x800];
/// Buffers the guest fills from the input start here.
const DATA: u64 = 0x1000;
const DISK: u64 = 0x10000;

struct Scratch {
    dir: tempfile::TempDir,
    /// What the share is next to: it must stay exactly as made.
    sentinel: PathBuf,
}

fn scratch() -> &'static Scratch {
    static S: OnceLock<Scratch> = OnceLock::new();
    S.get_or_init(|| {
        // As husk-vmm does before any device thread exists.
        give_up_device_nodes().expect("dropping CAP_MKNOD");
        let dir = tempfile::tempdir().expect("a scratch directory");
        let sentinel = dir.path().join("outside");
        std::fs::write(&sentinel, b"host data").unwrap();
        let disk = std::fs::File::create(dir.path().join("disk")).unwrap();
        disk.set_len(DISK).unwrap();
        Scratch { dir, sentinel }
    })
}

/// Bytes of the input, zero once it is used up.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
}

/// One queue as the guest laid it out: descriptors, then the heads it
/// makes available.
fn lay_out(mem: &GuestMemoryMmap, at: u64, input: &mut Input<'_>) -> Queue {
    let mock = MockSplitQueue::create(mem, GuestAddress(at), QSIZE);
    let descs = input.byte() % (QSIZE as u8 + 1);
    for i in 0..u16::from(descs) {
        // Addresses mostly inside memory, some past its end; flags NEXT,
        // WRITE and INDIRECT in any mix; `next` sometimes out of range.
        let addr = u64::from(input.u32()) % (MEM + 0x1000);
        let len = u32::from(input.u16());
        let flags = u16::from(input.byte() & 0x7);
        let next = u16::from(input.byte()) % (QSIZE + 2);
        let d = Descriptor::new(addr, len, flags, next);
        mock.desc_table().store(i, RawDescriptor::from(d)).unwrap();
    }
    let heads = input.byte() % (QSIZE as u8 + 1);
    for i in 0..usize::from(heads) {
        let head = u16::from(input.byte()) % (QSIZE + 2);
        mock.avail().ring().ref_at(i).unwrap().store(head);
    }
    let idx = match input.byte() {
        0xff => input.u16(),
        _ => u16::from(heads),
    };
    mock.avail().idx().store(idx);
    mock.create_queue::<Queue>()
        .expect("a queue of a valid size")
}

fn device(kind: u8, run: &std::path::Path) -> (Box<dyn Device>, Option<OwnedFd>) {
    match kind % 5 {
        0 => (Box::new(Rng), None),
        1 => (
            Box::new(Block::open(&scratch().dir.path().join("disk"), false).unwrap()),
            None,
        ),
        2 => {
            let mut fds = [0; 2];
            // SAFETY: fds has room for the two descriptors socketpair makes.
            let rc = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            };
            assert_eq!(rc, 0, "socketpair");
            // SAFETY: socketpair just made both; each is owned once.
            let (tap, peer) = unsafe {
                (
                    std::fs::File::from_raw_fd(fds[0]),
                    OwnedFd::from_raw_fd(fds[1]),
                )
            };
            (Box::new(Net::new(tap, [2, 0, 0, 0, 0, 1])), Some(peer))
        }
        3 => (
            Box::new(Vsock::new(3, run.join("vsock.sock")).unwrap()),
            None,
        ),
        _ => {
            let share = run.join("share");
            std::fs::create_dir(&share).unwrap();
            (
                Box::new(Fs::new("fuzz", &share, false, false).unwrap()),
                None,
            )
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let s = scratch();
    let mut input = Input(data);
    let run = tempfile::tempdir_in(s.dir.path()).unwrap();
    let (mut dev, peer) = device(input.byte(), run.path());
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let count = dev.queue_max_sizes().len();
    let mut queues: Vec<Queue> = (0..count)
        .map(|i| match QUEUE_AT.get(i) {
            Some(&at) => lay_out(&mem, at, &mut input),
            None => Queue::new(QSIZE).unwrap(),
        })
        .collect();
    let notify: Vec<u8> = (0..4).map(|_| input.byte()).collect();
    // The rest is what the guest's buffers hold (and, for net, a frame
    // that arrives on the tap).
    let rest = input.0;
    let fill = &rest[..rest.len().min((MEM - DATA) as usize)];
    mem.write_slice(fill, GuestAddress(DATA)).unwrap();
    if let Some(peer) = &peer {
        // SAFETY: a valid buffer and length on an open socket.
        unsafe {
            libc::send(
                std::os::fd::AsRawFd::as_raw_fd(peer),
                rest.as_ptr().cast(),
                rest.len().min(4096),
                0,
            )
        };
    }
    for n in notify {
        let index = usize::from(n) % (count + 1);
        dev.process(index, &mut queues, &mem);
        if n & 0x80 != 0 {
            dev.backend_ready(&mut queues, &mem);
        }
    }
    drop(dev);
    drop(run);
    // The share's neighbours are as they were.
    assert_eq!(std::fs::read(&s.sentinel).unwrap(), b"host data");
    let mut names: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["disk", "outside"],
        "nothing appears beside the share"
    );
});
