/* Second-vCPU test guest. The BSP reads the MP table the VMM wrote (CPU
 * count), copies a real-mode trampoline to 0x8000, wakes the AP with
 * INIT-SIPI-SIPI through its local APIC, and waits for the AP to report:
 *   smp: mp table lists <n> cpus
 *   ap: up
 *   smp: second vcpu reported */
#include "guest.h"

#define FLAG ((volatile u16 *)0x7000)
#define LAPIC(off) ((volatile u32 *)(0xfee00000u + (off)))

/* Real mode, CS=0x800 IP=0, DS=0: print "ap: up\n" on COM1, set the flag
 * word at 0x7000, then halt. */
static const u8 trampoline[] = {
    0xba, 0xf8, 0x03,                   /* mov $0x3f8, %dx */
    0xb0, 'a', 0xee, 0xb0, 'p', 0xee, 0xb0, ':', 0xee, 0xb0, ' ', 0xee,
    0xb0, 'u', 0xee, 0xb0, 'p', 0xee, 0xb0, '\n', 0xee,
    0xc7, 0x06, 0x00, 0x70, 0x01, 0x00, /* movw $1, 0x7000 */
    0xfa,                               /* cli */
    0xf4,                               /* hlt */
    0xeb, 0xfd,                         /* jmp back to hlt */
};

static u32 mp_cpus(void) {
  volatile u8 *fp = (volatile u8 *)0x9fc00;
  if (fp[0] != '_' || fp[1] != 'M' || fp[2] != 'P' || fp[3] != '_') return 0;
  volatile u8 *cfg = (volatile u8 *)*(volatile u32 *)(fp + 4);
  u32 count = cfg[34] | (cfg[35] << 8);
  volatile u8 *e = cfg + 44;
  u32 cpus = 0;
  for (u32 i = 0; i < count; i++) {
    if (e[0] == 0) { cpus++; e += 20; } else e += 8;
  }
  return cpus;
}

static void wait_icr(void) {
  for (u32 spin = 0; spin < 100000 && (*LAPIC(0x300) & (1u << 12)); spin++) {}
}

void guest_main(void) {
  u32 cpus = mp_cpus();
  puts("smp: mp table lists ");
  dec(cpus);
  puts(" cpus\n");
  if (cpus < 2) return;
  volatile u8 *dst = (volatile u8 *)0x8000;
  for (u32 i = 0; i < sizeof trampoline; i++) dst[i] = trampoline[i];
  *FLAG = 0;
  *LAPIC(0x0f0) = 0x1ff;     /* software-enable the local APIC */
  *LAPIC(0x310) = 1u << 24;  /* destination: APIC id 1 */
  *LAPIC(0x300) = 0x4500;    /* INIT */
  wait_icr();
  for (int i = 0; i < 2; i++) {
    *LAPIC(0x310) = 1u << 24;
    *LAPIC(0x300) = 0x4608;  /* STARTUP, vector 0x08 -> 0x8000 */
    wait_icr();
  }
  for (u32 spin = 0; spin < 50000000; spin++) {
    if (*FLAG == 1) { puts("smp: second vcpu reported\n"); return; }
  }
  puts("smp: no answer from the second vcpu\n");
}
