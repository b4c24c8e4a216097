/* virtio-vsock for the C test guests: the packet header, one connection's
 * credit, send and receive on the device's rx/tx queues. */
#include "guest.h"

struct hdr {
  u64 src_cid, dst_cid;
  u32 src_port, dst_port, len;
  u16 type, op;
  u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

enum { REQUEST = 1, RESPONSE = 2, RST = 3, SHUTDOWN = 4, RW = 5, CREDIT_UPDATE = 6 };

static struct vq rx, tx, ev;
static volatile u8 rxbufs[4][1024];
static volatile u8 txbuf[256];
static u64 cid;
static u32 fwd_cnt; /* bytes received on the current connection */
static struct hdr got;
static u8 data[512];

/* One packet with `n` bytes of payload (at most what txbuf holds). */
static void send_bytes(u16 op, u32 src_port, u32 dst_port, const u8 *bytes, u32 n) {
  volatile struct hdr *h = (volatile struct hdr *)txbuf;
  if (n > sizeof txbuf - sizeof(struct hdr)) n = sizeof txbuf - sizeof(struct hdr);
  for (u32 i = 0; i < n; i++) txbuf[sizeof(struct hdr) + i] = bytes[i];
  h->src_cid = cid;
  h->dst_cid = 2;
  h->src_port = src_port;
  h->dst_port = dst_port;
  h->len = n;
  h->type = 1;
  h->op = op;
  h->flags = 0;
  h->buf_alloc = 65536;
  h->fwd_cnt = fwd_cnt;
  tx.desc[0].addr = (u32)txbuf;
  tx.desc[0].len = sizeof(struct hdr) + n;
  tx.desc[0].flags = 0;
  virtio_submit(&tx, 0);
}

static void send(u16 op, u32 src_port, u32 dst_port, const char *text) {
  u32 n = 0;
  if (text) while (text[n]) n++;
  send_bytes(op, src_port, dst_port, (const u8 *)text, n);
}

/* Waits for a packet other than a credit update; 0 on timeout. */
static int receive(void) {
  for (u32 spin = 0; spin < 50000000; spin++) {
    if (rx.used.idx == rx.last_used) continue;
    u32 id = rx.used.ring[rx.last_used % 8].id;
    rx.last_used++;
    volatile u8 *b = rxbufs[id % 4];
    u8 *g = (u8 *)&got;
    for (u32 i = 0; i < sizeof got; i++) g[i] = b[i];
    u32 len = got.len < sizeof data - 1 ? got.len : sizeof data - 1;
    for (u32 i = 0; i < len; i++) data[i] = b[sizeof got + i];
    data[len] = 0;
    virtio_offer(&rx, (u16)(id % 4));
    if (got.op == RW) fwd_cnt += got.len;
    if (got.op != CREDIT_UPDATE) return 1;
  }
  return 0;
}

/* Finds and starts the device, offers the receive buffers; prints the CID.
 * Returns 0 on success. */
static int vsock_setup(void) {
  u32 base = find_device(19);
  if (!base) { puts("vsock: no virtio-vsock device\n"); return -1; }
  if (virtio_begin(base, 0)) { puts("vsock: features refused\n"); return -1; }
  if (virtio_queue(&rx, base, 0) || virtio_queue(&tx, base, 1) || virtio_queue(&ev, base, 2)) {
    puts("vsock: no queues\n");
    return -1;
  }
  virtio_ready(base);
  cid = *(volatile u32 *)(base + 0x100);
  puts("vsock: cid ");
  dec((u32)cid);
  putc('\n');
  for (u16 i = 0; i < 4; i++) {
    rx.desc[i].addr = (u32)rxbufs[i];
    rx.desc[i].len = sizeof rxbufs[i];
    rx.desc[i].flags = 2;
    virtio_offer(&rx, i);
  }

  return 0;
}
