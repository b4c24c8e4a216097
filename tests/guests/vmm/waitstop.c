/* Stop-request test guest: announces itself, then polls the i8042 for the
 * ctrl-alt-del scancodes husk-vmm sends on SIGTERM, and returns (the
 * entry resets the machine) once the Del key arrives. */
#include "guest.h"

static u8 inb(u16 port) {
  u8 v;
  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
  return v;
}

void guest_main(void) {
  puts("waiting for ctrl-alt-del\n");
  u32 seen = 0;
  for (;;) {
    if ((inb(0x64) & 1) == 0) continue;
    u8 code = inb(0x60);
    puts("key ");
    hex8(code);
    putc('\n');
    seen++;
    if (code == 0x53) break;
  }
  puts("got ctrl-alt-del after ");
  dec(seen);
  puts(" scancodes, resetting\n");
}
