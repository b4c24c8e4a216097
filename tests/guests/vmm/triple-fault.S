/* A guest that triple-faults: an empty IDT, then an invalid opcode
 * (#UD -> #GP -> #DF -> shutdown). husk-vmm must end with status 3. */
#include "pvh.inc"

        .text
        .code32
        .globl _start
_start:
        lidt idtr
        ud2

        .section .rodata
idtr:   .word 0
        .long 0
