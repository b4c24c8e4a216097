/* virtio-rng test guest: drives the virtio-mmio device at 0xd0000000 as a
 * tiny driver would (status handshake, VERSION_1, one queue of 8), offers
 * one 16-byte writable buffer, waits for it to come back used, and prints
 * it in hex on COM1: "rng: <len> <hex>". Freestanding, i386, no libc. */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define MMIO 0xd0000000u

static void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static void putc(char c) { outb(0x3f8, (u8)c); }
static void puts(const char *s) { while (*s) putc(*s++); }
static void hex8(u8 v) {
  const char *d = "0123456789abcdef";
  putc(d[v >> 4]);
  putc(d[v & 15]);
}
static void dec(u32 v) {
  char b[12];
  int i = 0;
  do { b[i++] = (char)('0' + v % 10); v /= 10; } while (v);
  while (i) putc(b[--i]);
}
static volatile u32 *reg(u32 off) { return (volatile u32 *)(MMIO + off); }

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[8]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[8]; u16 avail_event; };

static volatile struct desc descs[8] __attribute__((aligned(16)));
static volatile struct avail avail __attribute__((aligned(2)));
static volatile struct used used __attribute__((aligned(4)));
static volatile u8 buf[16];

void guest_main(void) {
  if (*reg(0x000) != 0x74726976 || *reg(0x004) != 2 || *reg(0x008) != 4) {
    puts("rng: no virtio-rng device\n");
    return;
  }
  *reg(0x070) = 0;          /* reset */
  *reg(0x070) = 1;          /* ACKNOWLEDGE */
  *reg(0x070) = 1 | 2;      /* DRIVER */
  *reg(0x014) = 1;
  if ((*reg(0x010) & 1) == 0) { puts("rng: no VERSION_1\n"); return; }
  *reg(0x024) = 1;
  *reg(0x020) = 1;          /* VIRTIO_F_VERSION_1 */
  *reg(0x024) = 0;
  *reg(0x020) = 0;
  *reg(0x070) = 1 | 2 | 8;  /* FEATURES_OK */
  if ((*reg(0x070) & 8) == 0) { puts("rng: features refused\n"); return; }
  *reg(0x030) = 0;
  if (*reg(0x034) < 8) { puts("rng: queue too small\n"); return; }
  *reg(0x038) = 8;
  *reg(0x080) = (u32)descs;
  *reg(0x084) = 0;
  *reg(0x090) = (u32)&avail;
  *reg(0x094) = 0;
  *reg(0x0a0) = (u32)&used;
  *reg(0x0a4) = 0;
  *reg(0x044) = 1;
  *reg(0x070) = 1 | 2 | 8 | 4; /* DRIVER_OK */

  descs[0].addr = (u32)buf;
  descs[0].len = sizeof buf;
  descs[0].flags = 2;        /* VIRTQ_DESC_F_WRITE */
  descs[0].next = 0;
  avail.ring[0] = 0;
  avail.idx = 1;
  *reg(0x050) = 0;           /* QueueNotify */
  for (u32 spin = 0; used.idx == 0; spin++) {
    if (spin > 1000000) { puts("rng: no answer\n"); return; }
  }
  puts("rng: ");
  dec(used.ring[0].len);
  putc(' ');
  for (u32 i = 0; i < sizeof buf; i++) hex8(buf[i]);
  putc('\n');
  if (*reg(0x060) & 1) *reg(0x064) = 1; /* acknowledge the interrupt */
}
