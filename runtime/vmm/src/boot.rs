//! Loading a kernel into guest memory and describing the machine to it.
//!
//! Two boot paths, chosen by the kernel file:
//! - an ELF kernel (vmlinux, or a freestanding test guest) with a Xen PVH
//!   note: entered in 32-bit protected mode at the PVH entry with `ebx`
//!   pointing at an `hvm_start_info` block (memory map, command line, the
//!   initramfs as module 0);
//! - a bzImage: the protected-mode kernel is loaded at `code32_start`,
//!   the zero page gets the setup header, an e820 map, the command line and
//!   the initramfs, and the kernel is entered at its 32-bit entry with `esi`
//!   pointing at the zero page (Linux boot protocol, 32-bit).
//!
//! Both get a GDT with flat `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18).

use crate::{VmConfig, VmError};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use std::io::Read;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

pub const GDT: u64 = 0x500;
pub const START_INFO: u64 = 0x6000;
pub const MODLIST: u64 = 0x6800;
pub const MEMMAP: u64 = 0x7000;
pub const ZERO_PAGE: u64 = 0x8000;
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Kernels load at 1 MiB and above.
pub const HIMEM: u64 = 0x10_0000;
/// The highest address an initramfs may end at (below the 32-bit hole).
const INITRD_LIMIT: u64 = 0xc000_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PVH_MAGIC: u32 = 0x336e_c578;
/// The EBDA and legacy ROM area below 1 MiB stay reserved.
const EBDA: u64 = 0x9fc00;

/// RAM below 4 GiB ends where the 32-bit device gap begins.
pub const GAP_START: u64 = 0xc000_0000;
/// RAM beyond the gap continues at 4 GiB.
pub const HIGH_START: u64 = 0x1_0000_0000;

/// Guest RAM for `mem_mib`: (start, size) regions around the device gap.
pub fn ram_regions(mem_mib: u64) -> Vec<(u64, u64)> {
    let total = mem_mib << 20;
    let low = total.min(GAP_START);
    let mut r = vec![(0, low)];
    if total > low {
        r.push((HIGH_START, total - low));
    }
    r
}

/// The e820 map: low RAM with the EBDA/ROM hole reserved, then RAM above
/// 4 GiB when there is any.
fn e820(mem_mib: u64) -> Vec<(u64, u64, u32)> {
    let regions = ram_regions(mem_mib);
    let mut map = vec![
        (0, EBDA, E820_RAM),
        (EBDA, HIMEM - EBDA, E820_RESERVED),
        (HIMEM, regions[0].1 - HIMEM, E820_RAM),
    ];
    if let Some(&(start, size)) = regions.get(1) {
        map.push((start, size, E820_RAM));
    }
    map
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub rip: u64,
    /// PVH: start-info block.
    pub rbx: u64,
    /// Linux boot protocol: zero page.
    pub rsi: u64,
}

/// GDT entries: null, null, code (0x10), data (0x18), as the Linux boot
/// protocol asks (Firecracker writes the same table).
pub const GDT_ENTRIES: [u64; 4] = [0, 0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

fn kerr(cfg: &VmConfig, msg: impl std::fmt::Display) -> VmError {
    VmError::Kernel {
        path: cfg.kernel.clone(),
        msg: msg.to_string(),
    }
}

fn mem_err(what: &str) -> impl FnOnce(vm_memory::GuestMemoryError) -> VmError + '_ {
    move |e| VmError::Other(format!("{what}: {e}"))
}

/// Whether `head` starts a cpio archive (newc, crc or odc) or a
/// compressed stream the kernel can unpack (gzip, xz, zstd, lz4, bzip2).
pub fn is_initramfs(head: &[u8]) -> bool {
    const MAGICS: &[&[u8]] = &[
        b"070701",
        b"070702",
        b"070707",
        &[0x1f, 0x8b],
        &[0xfd, b'7', b'z', b'X', b'Z', 0],
        &[0x28, 0xb5, 0x2f, 0xfd],
        &[0x02, 0x21, 0x4c, 0x18],
        b"BZh",
    ];
    MAGICS.iter().any(|m| head.starts_with(m))
}

/// Reads and checks the initramfs, places it as high as it may go (page
/// aligned, above the kernel), and returns (address, size).
fn load_initrd(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    kernel_end: u64,
) -> Result<Option<(u64, u64)>, VmError> {
    let Some(path) = &cfg.initrd else {
        return Ok(None);
    };
    let bad = |msg: String| VmError::Config(format!("initrd {}: {msg}", path.display()));
    let mut data = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(|e| bad(e.to_string()))?;
    if !is_initramfs(&data) {
        return Err(bad(
            "not a cpio archive (newc/crc/odc) nor a compressed one (gzip, xz, zstd, lz4, bzip2)"
                .into(),
        ));
    }
    let top = ram_regions(cfg.mem_mib)[0].1.min(INITRD_LIMIT);
    let size = data.len() as u64;
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or_else(|| {
            bad(format!(
                "{size} bytes do not fit between the kernel and the end of {} MiB of memory",
                cfg.mem_mib
            ))
        })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(mem_err("initrd"))?;
    Ok(Some((addr, size)))
}

fn write_cmdline(cfg: &VmConfig, mem: &GuestMemoryMmap) -> Result<(), VmError> {
    let mut cmdline = cfg.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE))
        .map_err(mem_err("cmdline"))
}

/// Loads the kernel (and initramfs, command line, boot information).
pub fn load(cfg: &VmConfig, mem: &GuestMemoryMmap) -> Result<Entry, VmError> {
    let mut f = std::fs::File::open(&cfg.kernel).map_err(|e| kerr(cfg, e))?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic)
        .map_err(|_| kerr(cfg, "too short to be a kernel"))?;
    for (i, e) in GDT_ENTRIES.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT + 8 * i as u64))
            .map_err(mem_err("GDT"))?;
    }
    write_cmdline(cfg, mem)?;
    if &magic == b"\x7fELF" {
        load_pvh(cfg, mem, &mut f)
    } else {
        load_bzimage(cfg, mem, &mut f)
    }
}

fn load_pvh(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    f: &mut std::fs::File,
) -> Result<Entry, VmError> {
    let loaded = Elf::load(mem, None, f, Some(GuestAddress(HIMEM)))
        .map_err(|e| kerr(cfg, format!("not a loadable ELF kernel: {e}")))?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => a,
        _ => {
            return Err(kerr(
                cfg,
                "has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it with CONFIG_PVH or boot a bzImage",
            ))
        }
    };
    let initrd = load_initrd(cfg, mem, loaded.kernel_end)?;
    let memmap: Vec<hvm_memmap_table_entry> = e820(cfg.mem_mib)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut start = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_paddr: MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules = initrd.map(|(addr, size)| {
        [hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        }]
    });
    if modules.is_some() {
        start.nr_modules = 1;
        start.modlist_paddr = MODLIST;
    }
    let mut params = BootParams::new(&start, GuestAddress(START_INFO));
    params.set_sections(&memmap, GuestAddress(MEMMAP));
    if let Some(m) = &modules {
        params.set_modules(m, GuestAddress(MODLIST));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|e| VmError::Other(format!("PVH start info: {e}")))?;
    Ok(Entry {
        rip: entry.raw_value(),
        rbx: START_INFO,
        rsi: 0,
    })
}

fn load_bzimage(
    cfg: &VmConfig,
    mem: &GuestMemoryMmap,
    f: &mut std::fs::File,
) -> Result<Entry, VmError> {
    let loaded = BzImage::load(mem, None, f, Some(GuestAddress(HIMEM)))
        .map_err(|e| kerr(cfg, format!("neither an ELF kernel nor a bzImage: {e}")))?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| kerr(cfg, "bzImage without a setup header"))?;
    let initrd = load_initrd(cfg, mem, loaded.kernel_end)?;
    hdr.type_of_loader = 0xff;
    hdr.boot_flag = 0xaa55;
    hdr.header = 0x5372_6448;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.cmdline_size = cfg.cmdline.len() as u32 + 1;
    hdr.loadflags |= 0x80; // CAN_USE_HEAP
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut zp = boot_params {
        hdr,
        ..Default::default()
    };
    let e820 = e820(cfg.mem_mib);
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        zp.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            type_: *kind,
        };
    }
    zp.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(&BootParams::new(&zp, GuestAddress(ZERO_PAGE)), mem)
        .map_err(|e| VmError::Other(format!("zero page: {e}")))?;
    Ok(Entry {
        rip: loaded.kernel_load.raw_value(),
        rbx: 0,
        rsi: ZERO_PAGE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).unwrap()
    }

    fn cfg(kernel: &std::path::Path, initrd: Option<&std::path::Path>) -> VmConfig {
        VmConfig {
            kernel: kernel.to_owned(),
            initrd: initrd.map(|p| p.to_owned()),
            cmdline: "console=ttyS0 panic=-1".into(),
            mem_mib: 64,
            vcpus: 1,
            serial: None,
            pit: false,
            rng: false,
            disks: vec![],
            net: None,
            vsock: None,
            fs: vec![],
            stop_timeout_ms: 5000,
            jail: None,
        }
    }

    /// A minimal ELF64: one PT_LOAD of `code` at 1 MiB and a PT_NOTE with
    /// the Xen PVH entry.
    fn elf(code: &[u8], entry: u32) -> Vec<u8> {
        let mut note = Vec::new();
        for v in [4u32, 4, 18] {
            note.extend_from_slice(&v.to_le_bytes());
        }
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&entry.to_le_bytes());
        let phoff = 64u64;
        let data_off = phoff + 2 * 56;
        let note_off = data_off + code.len() as u64;
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&u64::from(entry).to_le_bytes());
        f.extend_from_slice(&phoff.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes()); // shoff
        f.extend_from_slice(&0u32.to_le_bytes()); // flags
        for v in [64u16, 56, 2, 64, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        let phdr = |f: &mut Vec<u8>, kind: u32, off: u64, addr: u64, size: u64| {
            f.extend_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(&5u32.to_le_bytes());
            for v in [off, addr, addr, size, size, 4] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        };
        phdr(&mut f, 1, data_off, HIMEM, code.len() as u64);
        phdr(&mut f, 4, note_off, HIMEM + 0x1000, note.len() as u64);
        f.extend_from_slice(code);
        f.extend_from_slice(&note);
        f
    }

    /// A synthetic bzImage: one setup sector after the boot sector, a
    /// protocol 2.15 header, and `payload` as the protected-mode kernel.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 1024];
        f[0x1f1] = 1; // setup_sects
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        f[0x211] = 1; // LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&(HIMEM as u32).to_le_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn pvh_elf_with_initramfs_as_module() {
        let dir = tempfile::tempdir().unwrap();
        let k = write(dir.path(), "vmlinux", &elf(&[0xf4; 16], 0x10_0004));
        let i = write(dir.path(), "initrd", b"070701rest-of-a-cpio-archive");
        let m = mem(64);
        let e = load(&cfg(&k, Some(&i)), &m).unwrap();
        assert_eq!(
            e,
            Entry {
                rip: 0x10_0004,
                rbx: START_INFO,
                rsi: 0
            }
        );
        let si: hvm_start_info = m.read_obj(GuestAddress(START_INFO)).unwrap();
        assert_eq!(si.magic, PVH_MAGIC);
        assert_eq!(si.nr_modules, 1);
        assert_eq!(si.memmap_entries, 3);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!(module.size, 28);
        assert_eq!(module.paddr % 4096, 0);
        assert!(module.paddr + module.size <= 64 << 20);
        let mut head = [0u8; 6];
        m.read_slice(&mut head, GuestAddress(module.paddr)).unwrap();
        assert_eq!(&head, b"070701");
        let top: hvm_memmap_table_entry =
            m.read_obj(GuestAddress(si.memmap_paddr + 2 * 24)).unwrap();
        assert_eq!((top.addr, top.size), (HIMEM, (64 << 20) - HIMEM));
        let mut cmd = [0u8; 23];
        m.read_slice(&mut cmd, GuestAddress(si.cmdline_paddr))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0 panic=-1\0");
        let cs: u64 = m.read_obj(GuestAddress(GDT + 0x10)).unwrap();
        assert_eq!(cs, GDT_ENTRIES[2]);
    }

    #[test]
    fn bzimage_gets_a_zero_page_with_e820_cmdline_and_initrd() {
        let dir = tempfile::tempdir().unwrap();
        let k = write(dir.path(), "bzImage", &bzimage(&[0x90; 4096]));
        let i = write(dir.path(), "initrd", &[0x1f, 0x8b, 8, 0, 0, 0]);
        let m = mem(64);
        let e = load(&cfg(&k, Some(&i)), &m).unwrap();
        assert_eq!(
            e,
            Entry {
                rip: HIMEM,
                rbx: 0,
                rsi: ZERO_PAGE
            }
        );
        let zp: boot_params = m.read_obj(GuestAddress(ZERO_PAGE)).unwrap();
        assert_eq!({ zp.hdr.cmd_line_ptr }, CMDLINE as u32);
        assert_eq!({ zp.hdr.type_of_loader }, 0xff);
        assert_eq!({ zp.hdr.ramdisk_size }, 6);
        assert!({ zp.hdr.ramdisk_image } >= (HIMEM as u32) + 4096);
        assert_eq!(zp.e820_entries, 3);
        let e2 = zp.e820_table[2];
        assert_eq!(
            ({ e2.addr }, { e2.size }, { e2.type_ }),
            (HIMEM, (64 << 20) - HIMEM, E820_RAM)
        );
        let mut payload = [0u8; 4];
        m.read_slice(&mut payload, GuestAddress(HIMEM)).unwrap();
        assert_eq!(payload, [0x90; 4]);
    }

    #[test]
    fn memory_above_the_gap_continues_at_4_gib() {
        assert_eq!(ram_regions(1024), vec![(0, 1 << 30)]);
        assert_eq!(
            ram_regions(5 * 1024),
            vec![(0, GAP_START), (HIGH_START, (5 << 30) - GAP_START)]
        );
        let map = e820(5 * 1024);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2], (HIMEM, GAP_START - HIMEM, E820_RAM));
        assert_eq!(map[3], (HIGH_START, (5 << 30) - GAP_START, E820_RAM));
        // The device window is in the gap, never RAM.
        let dev = crate::virtio::MMIO_BASE;
        assert!(map.iter().all(|(a, s, _)| dev < *a || dev >= a + s));
    }

    #[test]
    fn bad_kernels_and_initrds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = mem(64);
        let junk = write(dir.path(), "junk", b"this is no kernel at all, really");
        let err = load(&cfg(&junk, None), &m).unwrap_err();
        assert!(
            err.to_string()
                .contains("neither an ELF kernel nor a bzImage"),
            "{err}"
        );
        assert_eq!(err.status(), 2);
        // An ELF without the PVH note.
        let mut no_note = elf(&[0xf4; 16], 0x10_0000);
        let n = no_note.len();
        no_note[n - 12..n - 8].copy_from_slice(&17u32.to_le_bytes());
        let k = write(dir.path(), "nonote", &no_note);
        assert!(load(&cfg(&k, None), &m)
            .unwrap_err()
            .to_string()
            .contains("no PVH entry"));
        let k = write(dir.path(), "vmlinux", &elf(&[0xf4; 16], 0x10_0000));
        let i = write(dir.path(), "initrd", b"PK\x03\x04 a zip file");
        let err = load(&cfg(&k, Some(&i)), &m).unwrap_err();
        assert!(err.to_string().contains("not a cpio archive"), "{err}");
        assert_eq!(err.status(), 2);
        // Larger than the memory.
        let big = vec![b'0'; 70 << 20];
        let mut big = big;
        big[..6].copy_from_slice(b"070701");
        let i = write(dir.path(), "big", &big);
        let err = load(&cfg(&k, Some(&i)), &m).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }
}
