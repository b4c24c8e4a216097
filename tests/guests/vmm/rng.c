/* virtio-rng test guest: offers one 16-byte writable buffer to the
 * entropy device and prints what comes back: "rng: <len> <hex>". */
#include "guest.h"

static struct vq q;
static volatile u8 buf[16];

void guest_main(void) {
  u32 base = find_device(4);
  if (!base) { puts("rng: no virtio-rng device\n"); return; }
  if (virtio_init(&q, base, 0)) { puts("rng: setup refused\n"); return; }
  q.desc[0].addr = (u32)buf;
  q.desc[0].len = sizeof buf;
  q.desc[0].flags = 2; /* WRITE */
  int n = virtio_submit(&q, 0);
  if (n < 0) { puts("rng: no answer\n"); return; }
  puts("rng: ");
  dec((u32)n);
  putc(' ');
  for (u32 i = 0; i < sizeof buf; i++) hex8(buf[i]);
  putc('\n');
}
