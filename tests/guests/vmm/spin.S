/* A guest that ignores every stop request: prints a marker, then spins
 * with interrupts off. husk-vmm must stop it after the stop timeout. */
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
        cli
        mov $msg, %esi
        mov $0x3f8, %dx
1:      movb (%esi), %al
        cmpb $0, %al
        je 2f
        outb %al, %dx
        add $1, %esi
        jmp 1b
2:      jmp 2b

        .section .rodata
msg:    .asciz "spinning\n"
