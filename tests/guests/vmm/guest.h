/* Shared by the C VMM test guests: COM1 output and a minimal virtio-mmio
 * (version 2) driver for one split queue of 8 descriptors. Freestanding,
 * i386, only plain moves, arithmetic and port/MMIO accesses. */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define MMIO_BASE 0xd0000000u
#define MMIO_SLOTS 8

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

struct desc { u64 addr; u32 len; u16 flags; u16 next; };
struct avail { u16 flags; u16 idx; u16 ring[8]; u16 used_event; };
struct used_elem { u32 id; u32 len; };
struct used { u16 flags; u16 idx; struct used_elem ring[8]; u16 avail_event; };

struct vq {
  volatile struct desc desc[8] __attribute__((aligned(16)));
  volatile struct avail avail __attribute__((aligned(2)));
  volatile struct used used __attribute__((aligned(4)));
  u32 base;
  u32 index;
  u16 last_used;
};

static volatile u32 *reg(u32 base, u32 off) { return (volatile u32 *)(base + off); }

/* The window of the first device of type `id`, or 0. */
static u32 find_device(u32 id) {
  for (u32 i = 0; i < MMIO_SLOTS; i++) {
    u32 base = MMIO_BASE + i * 0x1000;
    if (*reg(base, 0) == 0x74726976 && *reg(base, 4) == 2 && *reg(base, 8) == id) return base;
  }
  return 0;
}

/* Status handshake up to FEATURES_OK with VERSION_1 plus `features` (low
 * word). Returns 0 on success. */
static int virtio_begin(u32 base, u32 features) {
  *reg(base, 0x070) = 0;
  *reg(base, 0x070) = 1;
  *reg(base, 0x070) = 1 | 2;
  *reg(base, 0x024) = 1;
  *reg(base, 0x020) = 1; /* VIRTIO_F_VERSION_1 */
  *reg(base, 0x024) = 0;
  *reg(base, 0x020) = features;
  *reg(base, 0x070) = 1 | 2 | 8;
  return (*reg(base, 0x070) & 8) ? 0 : -1;
}

/* Sets up queue `index` with 8 entries. Returns 0 on success. */
static int virtio_queue(struct vq *q, u32 base, u32 index) {
  q->base = base;
  q->index = index;
  q->last_used = 0;
  *reg(base, 0x030) = index;
  if (*reg(base, 0x034) < 8) return -2;
  *reg(base, 0x038) = 8;
  *reg(base, 0x080) = (u32)q->desc;
  *reg(base, 0x084) = 0;
  *reg(base, 0x090) = (u32)&q->avail;
  *reg(base, 0x094) = 0;
  *reg(base, 0x0a0) = (u32)&q->used;
  *reg(base, 0x0a4) = 0;
  *reg(base, 0x044) = 1;
  return 0;
}

static void virtio_ready(u32 base) { *reg(base, 0x070) = 1 | 2 | 8 | 4; }

/* One-queue devices: handshake, queue 0, DRIVER_OK. */
static int virtio_init(struct vq *q, u32 base, u32 features) {
  if (virtio_begin(base, features)) return -1;
  if (virtio_queue(q, base, 0)) return -2;
  virtio_ready(base);
  return 0;
}

/* Makes the chain at `head` available and notifies the device. */
static void virtio_offer(struct vq *q, u16 head) {
  u16 slot = q->avail.idx % 8;
  q->avail.ring[slot] = head;
  q->avail.idx = q->avail.idx + 1;
  *reg(q->base, 0x050) = q->index;
}

/* Offers the chain starting at descriptor `head`, notifies, and waits for
 * it to be used. Returns the used length, or -1 when nothing came back. */
static int virtio_submit(struct vq *q, u16 head) {
  virtio_offer(q, head);
  for (u32 spin = 0; q->used.idx == q->last_used; spin++) {
    if (spin > 10000000) return -1;
  }
  u32 len = q->used.ring[q->last_used % 8].len;
  q->last_used++;
  if (*reg(q->base, 0x060) & 1) *reg(q->base, 0x064) = 1;
  return (int)len;
}
