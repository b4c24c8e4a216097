/* A guest that triple-faults: an empty IDT, then an invalid opcode
 * (#UD -> #GP -> #DF -> shutdown). husk-vmm must end with status 3. */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4
        .long 4
        .long 18
        .asciz "Xen"
        .balign 4
        .long _start
        .text
        .code32
        .globl _start
_start:
        lidt idtr
        ud2
        .section .rodata
idtr:   .word 0
        .long 0
