/* A stand-in for husk-agent's vsock transport, for a host whose KVM cannot
 * run Linux user space (kvm-pvm): accepts the host's connection to vsock
 * port 1024 and speaks the first and last of husk-protocol's exchanges
 * (4-byte big-endian length, JSON):
 *   hello    -> {"type":"hello","version":<the host's>,"nonce":<the host's>,
 *                "kernel":"vsock-stand-in"}   (every hello: the host resends)
 *   shutdown -> {"type":"shutting_down"}, then the guest resets.
 * Prints "agent: <type>" for each request it reads. */
#include "vsock.h"

#define PORT 1024

static u8 frame[1024];
static u32 have;
static u32 peer;

/* The digits after `"key":` in the frame's body, or 0 (32-bit: the host
 * counts its hellos from 1, and this guest has no 64-bit division). */
static u32 number(const u8 *body, u32 n, const char *key) {
  u32 k = 0;
  while (key[k]) k++;
  for (u32 i = 0; i + k + 3 < n; i++) {
    if (body[i] != '"') continue;
    u32 j = 0;
    while (j < k && body[i + 1 + j] == (u8)key[j]) j++;
    if (j < k || body[i + 1 + k] != '"' || body[i + 2 + k] != ':') continue;
    u32 v = 0;
    for (u32 p = i + 3 + k; p < n && body[p] >= '0' && body[p] <= '9'; p++) v = v * 10 + (body[p] - '0');
    return v;
  }
  return 0;
}

/* Whether the body's "type" is `want`. */
static int is_type(const u8 *body, u32 n, const char *want) {
  const char *key = "\"type\":\"";
  for (u32 i = 0; i + 8 < n; i++) {
    u32 j = 0;
    while (key[j] && body[i + j] == (u8)key[j]) j++;
    if (key[j]) continue;
    u32 w = 0;
    while (want[w] && i + 8 + w < n && body[i + 8 + w] == (u8)want[w]) w++;
    return !want[w] && i + 8 + w < n && body[i + 8 + w] == '"';
  }
  return 0;
}

static u32 put_dec(u8 *p, u32 v) {
  u8 d[20];
  u32 n = 0;
  do { d[n++] = (u8)('0' + v % 10); v /= 10; } while (v);
  for (u32 i = 0; i < n; i++) p[i] = d[n - 1 - i];
  return n;
}

static u32 put_str(u8 *p, const char *s) {
  u32 n = 0;
  while (s[n]) { p[n] = (u8)s[n]; n++; }
  return n;
}

/* Sends one frame with the body built at out+4. */
static void reply(u8 *out, u32 body) {
  out[0] = (u8)(body >> 24);
  out[1] = (u8)(body >> 16);
  out[2] = (u8)(body >> 8);
  out[3] = (u8)body;
  send_bytes(RW, PORT, peer, out, 4 + body);
}

void guest_main(void) {
  if (vsock_setup()) return;
  /* The host's connection. */
  for (;;) {
    if (receive() && got.op == REQUEST && got.dst_port == PORT) break;
  }
  peer = got.src_port;
  fwd_cnt = 0;
  send(RESPONSE, PORT, peer, 0);
  static u8 out[200];
  for (;;) {
    if (!receive()) continue;
    if (got.dst_port != PORT) continue;
    if (got.op == RST || got.op == SHUTDOWN) { puts("agent: the host went away\n"); return; }
    if (got.op != RW) continue;
    u32 len = got.len < sizeof data - 1 ? got.len : sizeof data - 1;
    for (u32 i = 0; i < len && have < sizeof frame; i++) frame[have++] = data[i];
    /* Every complete frame. */
    while (have >= 4) {
      u32 n = (u32)frame[0] << 24 | (u32)frame[1] << 16 | (u32)frame[2] << 8 | frame[3];
      if (n > sizeof frame - 4) { puts("agent: frame too large\n"); return; }
      if (have < 4 + n) break;
      const u8 *body = frame + 4;
      if (is_type(body, n, "hello")) {
        puts("agent: hello\n");
        u32 b = 4;
        b += put_str(out + b, "{\"type\":\"hello\",\"version\":");
        b += put_dec(out + b, number(body, n, "version"));
        b += put_str(out + b, ",\"nonce\":");
        b += put_dec(out + b, number(body, n, "nonce"));
        b += put_str(out + b, ",\"kernel\":\"vsock-stand-in\"}");
        reply(out, b - 4);
      } else if (is_type(body, n, "shutdown")) {
        puts("agent: shutdown\n");
        reply(out, put_str(out + 4, "{\"type\":\"shutting_down\"}"));
        return;
      } else {
        puts("agent: unknown request\n");
      }
      for (u32 i = 0; i + 4 + n < have; i++) frame[i] = frame[4 + n + i];
      have -= 4 + n;
    }
  }
}
