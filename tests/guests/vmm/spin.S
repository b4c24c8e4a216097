/* A guest that ignores every stop request: prints a marker, then spins
 * with interrupts off. husk-vmm must stop it after the stop timeout. */
#include "pvh.inc"

        .text
        .code32
        .globl _start
_start:
        cli
        com1_puts msg
3:      jmp 3b

        .section .rodata
msg:    .asciz "spinning\n"
