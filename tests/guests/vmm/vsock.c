/* virtio-vsock test guest, both directions:
 *   1. connects to the host (CID 2) port 6000, sends "hello from the
 *      guest", prints the answer: "vsock: host said <data>";
 *   2. accepts the host's connection to port 5000, prints what it sends:
 *      "vsock: got <data>", answers "pong over vsock". */
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

static void send(u16 op, u32 src_port, u32 dst_port, const char *text) {
  volatile struct hdr *h = (volatile struct hdr *)txbuf;
  u32 n = 0;
  if (text) while (text[n]) { txbuf[sizeof(struct hdr) + n] = (u8)text[n]; n++; }
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

/* A host connection request that arrived while the guest was busy with
 * its own connection (the host may connect at any time). */
static u32 pending_peer;
static int have_pending;

/* Waits for a packet to `port`, setting aside host requests to 5000. */
static int receive_for(u32 port) {
  for (;;) {
    if (!receive()) return 0;
    if (got.dst_port == port) return 1;
    if (got.op == REQUEST && got.dst_port == 5000) {
      pending_peer = got.src_port;
      have_pending = 1;
    }
  }
}

void guest_main(void) {
  u32 base = find_device(19);
  if (!base) { puts("vsock: no virtio-vsock device\n"); return; }
  if (virtio_begin(base, 0)) { puts("vsock: features refused\n"); return; }
  if (virtio_queue(&rx, base, 0) || virtio_queue(&tx, base, 1) || virtio_queue(&ev, base, 2)) {
    puts("vsock: no queues\n");
    return;
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

  /* 1. Guest to host. */
  send(REQUEST, 1234, 6000, 0);
  if (!receive_for(1234) || got.op != RESPONSE) { puts("vsock: connect refused\n"); return; }
  send(RW, 1234, 6000, "hello from the guest");
  if (!receive_for(1234) || got.op != RW) { puts("vsock: no answer\n"); return; }
  puts("vsock: host said ");
  puts((const char *)data);
  putc('\n');
  send(RST, 1234, 6000, 0);

  /* 2. Host to guest. */
  while (!have_pending) {
    if (!receive()) { puts("vsock: no connection\n"); return; }
    if (got.op == REQUEST && got.dst_port == 5000) {
      pending_peer = got.src_port;
      have_pending = 1;
    }
  }
  u32 peer = pending_peer;
  fwd_cnt = 0; /* credit counters are per connection */
  send(RESPONSE, 5000, peer, 0);
  if (!receive_for(5000) || got.op != RW) { puts("vsock: no data\n"); return; }
  puts("vsock: got ");
  puts((const char *)data);
  putc('\n');
  send(RW, 5000, peer, "pong over vsock");
  receive(); /* the host closes: RST */
  puts("vsock: done\n");
}
