/* The null kernel: a freestanding ELF with a PVH entry note. It writes a
 * marker to COM1 and resets the machine through the i8042. Only plain
 * moves, arithmetic, compares, jumps and port I/O, which KVM's instruction
 * emulator handles on PVM hosts. 32-bit code in a 64-bit ELF, as Linux's
 * vmlinux is. */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4                 /* namesz: "Xen\0" */
        .long 4                 /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .balign 4
        .long _start

        .text
        .code32
        .globl _start
_start:
        mov $msg, %esi
        mov $0x3f8, %dx
1:      movb (%esi), %al
        cmpb $0, %al
        je 2f
        outb %al, %dx
        add $1, %esi
        jmp 1b
2:      movb $0xfe, %al
        outb %al, $0x64
3:      hlt
        jmp 3b

        .section .rodata
msg:    .asciz "husk-vmm: null kernel up\n"
