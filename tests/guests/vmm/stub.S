/* The null kernel: a freestanding ELF with a PVH entry note. It writes a
 * marker to COM1 and resets the machine through the i8042. 32-bit code in
 * a 64-bit ELF, as Linux's vmlinux is. */
#include "pvh.inc"

        .text
        .code32
        .globl _start
_start:
        com1_puts msg
        movb $0xfe, %al
        outb %al, $0x64
3:      hlt
        jmp 3b

        .section .rodata
msg:    .asciz "husk-vmm: null kernel up\n"
