//! The Intel MultiProcessor table (spec 1.4) in the EBDA, so that a guest
//! kernel finds every vCPU, the I/O APIC and the ISA interrupt routing: a
//! floating pointer, then a configuration table with one processor entry
//! per vCPU (the first is the BSP), the ISA bus, the I/O APIC, IRQ 0–23
//! routed to its pins, and ExtINT/NMI on LINT0/LINT1.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the floating pointer and the table go (the EBDA, reserved in e820).
pub const MPTABLE_START: u64 = 0x9fc00;
const APIC_DEFAULT: u32 = 0xfee0_0000;
const IOAPIC_DEFAULT: u32 = 0xfec0_0000;
const IRQS: u8 = 24;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table for `vcpus` CPUs, as bytes placed at [`MPTABLE_START`].
pub fn build(vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus + 1;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let mut e = vec![0u8; 20];
        e[0] = 0; // processor
        e[1] = id; // local APIC id
        e[2] = 0x14; // APIC version
        e[3] = 1 | if id == 0 { 2 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // signature
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend(e);
        count += 1;
    }
    entries.extend([1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    count += 1;
    entries.extend([2, ioapic_id, 0x11, 1]);
    entries.extend(IOAPIC_DEFAULT.to_le_bytes());
    count += 1;
    for irq in 0..IRQS {
        // I/O interrupt: INT, conforming polarity/trigger, ISA irq → pin.
        entries.extend([3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1, all local APICs.
    entries.extend([4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend([4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = vec![0u8; 44];
    table[0..4].copy_from_slice(b"PCMP");
    let len = (44 + entries.len()) as u16;
    table[4..6].copy_from_slice(&len.to_le_bytes());
    table[6] = 4; // spec revision 1.4
    table[8..16].copy_from_slice(b"HUSK    ");
    table[16..28].copy_from_slice(b"HUSK-VMM    ");
    table[34..36].copy_from_slice(&count.to_le_bytes());
    table[36..40].copy_from_slice(&APIC_DEFAULT.to_le_bytes());
    table.extend(entries);
    table[7] = checksum(&table);

    let mut fp = vec![0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&((MPTABLE_START + 16) as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4; // spec revision 1.4
    fp[10] = checksum(&fp);
    fp.extend(table);
    fp
}

/// Writes the table for `vcpus` CPUs into guest memory.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_slice(&build(vcpus), GuestAddress(MPTABLE_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_entries() {
        let t = build(2);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let cfg = &t[16..];
        assert_eq!(&cfg[0..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(cfg.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([cfg[34], cfg[35]]);
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
        // Two processors, the first the BSP.
        assert_eq!((cfg[44], cfg[45], cfg[47]), (0, 0, 3));
        assert_eq!((cfg[64], cfg[65], cfg[67]), (0, 1, 1));
        // The whole table fits below the end of the EBDA hole (1 MiB).
        assert!(MPTABLE_START + t.len() as u64 <= 0x10_0000);
    }
}
