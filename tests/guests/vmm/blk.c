/* virtio-blk test guest: reads sector 0 and prints its first line, writes
 * a pattern to sector 1, flushes, reads sector 1 back and compares:
 *   blk: capacity <sectors>
 *   blk: sector 0: <text up to the first newline>
 *   blk: write ok | blk: write refused (status N)
 *   blk: flush ok
 *   blk: read back ok | blk: read back differs */
#include "guest.h"

struct req { u32 type; u32 reserved; u64 sector; };

static struct vq q;
static volatile struct req hdr;
static volatile u8 data[512];
static volatile u8 status;

/* One request: header, optional data (writable for reads), status. */
static int request(u32 type, u64 sector, int with_data) {
  hdr.type = type;
  hdr.reserved = 0;
  hdr.sector = sector;
  status = 0xff;
  q.desc[0].addr = (u32)&hdr;
  q.desc[0].len = sizeof hdr;
  q.desc[0].flags = 1; /* NEXT */
  q.desc[0].next = 1;
  u16 st = 1;
  if (with_data) {
    q.desc[1].addr = (u32)data;
    q.desc[1].len = sizeof data;
    q.desc[1].flags = 1 | (type == 0 ? 2 : 0); /* NEXT, WRITE for reads */
    q.desc[1].next = 2;
    st = 2;
  }
  q.desc[st].addr = (u32)&status;
  q.desc[st].len = 1;
  q.desc[st].flags = 2;
  q.desc[st].next = 0;
  if (virtio_submit(&q, 0) < 0) return -1;
  return status;
}

void guest_main(void) {
  u32 base = find_device(2);
  if (!base) { puts("blk: no virtio-blk device\n"); return; }
  if (virtio_init(&q, base, 1u << 9 /* FLUSH */)) { puts("blk: setup refused\n"); return; }
  puts("blk: capacity ");
  dec(*reg(base, 0x100));
  putc('\n');
  if (request(0, 0, 1) != 0) { puts("blk: read failed\n"); return; }
  puts("blk: sector 0: ");
  for (u32 i = 0; i < 64 && data[i] != '\n' && data[i] != 0; i++) putc((char)data[i]);
  putc('\n');
  for (u32 i = 0; i < sizeof data; i++) data[i] = (u8)('a' + i % 26);
  int s = request(1, 1, 1);
  if (s == 0) puts("blk: write ok\n");
  else { puts("blk: write refused (status "); dec((u32)s); puts(")\n"); }
  if (request(4, 0, 0) == 0) puts("blk: flush ok\n");
  for (u32 i = 0; i < sizeof data; i++) data[i] = 0;
  if (request(0, 1, 1) != 0) { puts("blk: read back failed\n"); return; }
  int same = 1;
  for (u32 i = 0; i < sizeof data; i++) if (data[i] != (u8)('a' + i % 26)) same = 0;
  puts(same ? "blk: read back ok\n" : "blk: read back differs\n");
  /* Past the end of the disk: refused with IOERR. */
  u64 cap = ((u64)*reg(base, 0x104) << 32) | *reg(base, 0x100);
  puts("blk: past the end: status ");
  dec((u32)request(0, cap, 1));
  putc('\n');
}
