/* virtio-net test guest: offers a receive buffer, then sends an Ethernet
 * frame (ethertype 0x88b5, payload "husk-net ping from <mac>") to the
 * broadcast address every so often until a frame of that ethertype comes
 * back, and prints its payload: "net: got <payload>". */
#include "guest.h"

static struct vq rx, tx;
static volatile u8 rxbuf[2048];
static volatile u8 txbuf[128];

void guest_main(void) {
  u32 base = find_device(1);
  if (!base) { puts("net: no virtio-net device\n"); return; }
  if (virtio_begin(base, 1u << 5 /* MAC */)) { puts("net: features refused\n"); return; }
  if (virtio_queue(&rx, base, 0) || virtio_queue(&tx, base, 1)) { puts("net: no queues\n"); return; }
  virtio_ready(base);
  u8 mac[6];
  for (u32 i = 0; i < 6; i++) mac[i] = *(volatile u8 *)(base + 0x100 + i);

  rx.desc[0].addr = (u32)rxbuf;
  rx.desc[0].len = sizeof rxbuf;
  rx.desc[0].flags = 2;
  virtio_offer(&rx, 0);

  /* virtio-net header (12 bytes, zero), then the frame. */
  u32 n = 0;
  for (; n < 12; n++) txbuf[n] = 0;
  for (u32 i = 0; i < 6; i++) txbuf[n++] = 0xff;
  for (u32 i = 0; i < 6; i++) txbuf[n++] = mac[i];
  txbuf[n++] = 0x88;
  txbuf[n++] = 0xb5;
  const char *msg = "husk-net ping from ";
  while (*msg) txbuf[n++] = (u8)*msg++;
  for (u32 i = 0; i < 6; i++) {
    const char *d = "0123456789abcdef";
    txbuf[n++] = (u8)d[mac[i] >> 4];
    txbuf[n++] = (u8)d[mac[i] & 15];
  }
  for (u32 round = 0; round < 2000; round++) {
    tx.desc[0].addr = (u32)txbuf;
    tx.desc[0].len = n;
    tx.desc[0].flags = 0;
    if (virtio_submit(&tx, 0) < 0) { puts("net: send failed\n"); return; }
    for (u32 spin = 0; spin < 20000; spin++) {
      if (rx.used.idx == rx.last_used) continue;
      u32 len = rx.used.ring[rx.last_used % 8].len;
      rx.last_used++;
      /* Only our ethertype counts (the host kernel sends IPv6 chatter when
       * the tap comes up); anything else: offer the buffer again. */
      if (len >= 12 + 14 && rxbuf[12 + 12] == 0x88 && rxbuf[12 + 13] == 0xb5) {
        puts("net: got ");
        for (u32 i = 12 + 14; i < len && i < sizeof rxbuf; i++) putc((char)rxbuf[i]);
        putc('\n');
        return;
      }
      virtio_offer(&rx, 0);
    }
  }
  puts("net: no answer\n");
}
