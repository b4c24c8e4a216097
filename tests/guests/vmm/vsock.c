/* virtio-vsock test guest, both directions:
 *   1. connects to the host (CID 2) port 6000, sends "hello from the
 *      guest", prints the answer: "vsock: host said <data>";
 *   2. accepts the host's connection to port 5000, prints what it sends:
 *      "vsock: got <data>", answers "pong over vsock". */
#include "vsock.h"

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
  if (vsock_setup()) return;

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
