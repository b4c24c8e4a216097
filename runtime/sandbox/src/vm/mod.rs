//! The microVM side of husk's sandboxes (#5, first part): what a VM pod
//! needs on the host to boot a guest kernel with husk-agent as its init and
//! talk to it. [`initramfs`] packs the agent (and whatever else the guest
//! needs) into a newc archive, [`hypervisor`] is the boundary to what runs
//! the VM: [`qemu`] runs it under QEMU (KVM or TCG), [`husk_vmm`] under
//! husk's own VMM; each owns its process and run directory, [`agent`] is the client of
//! husk-protocol. It must not know about pods: the VM pod sandbox is built
//! on these.

pub mod agent;
pub mod cri;
pub mod husk_vmm;
pub mod hypervisor;
pub mod identity;
pub mod initramfs;
pub mod nic;
pub mod probe;
pub mod qemu;
pub mod rootfs;
pub mod sandbox;
pub mod share;
