/* virtio-fs test guest: speaks FUSE on the request queue (queue 1).
 *   fs: tag <tag>
 *   fs: init <major>.<minor>            | fs: init error <errno>
 *   fs: hello.txt: <first line>          | fs: hello.txt: error <errno>
 *   fs: create: ok | error <errno>       (new.txt, written "written by the guest\n")
 *   fs: mkdir: ok | error <errno>        (made-by-guest)
 *   fs: mknod: error <errno> | ok        (dev-null, a character device)
 *   fs: mkdir ../escaped: error <errno> | ok
 *   fs: lookup ..: node <nodeid>          (".." at the root)
 *   fs: escape/passwd: error <errno> | ok  (escape is a host symlink to /etc)
 *   fs: bad request: <used bytes>         (a header shorter than FUSE's) */
#include "guest.h"

enum {
  LOOKUP = 1, MKNOD = 8, MKDIR = 9, OPEN = 14, READ = 15, WRITE = 16, INIT = 26, CREATE = 35
};

static struct vq q;
static volatile u8 in[256] __attribute__((aligned(8)));
static volatile u8 out[1024] __attribute__((aligned(8)));
static u64 unique;

static void put32(volatile u8 *p, u32 v) { for (int i = 0; i < 4; i++) p[i] = (u8)(v >> (8 * i)); }
static void put64(volatile u8 *p, u64 v) { put32(p, (u32)v); put32(p + 4, (u32)(v >> 32)); }
static u32 get32(volatile u8 *p) { return p[0] | p[1] << 8 | p[2] << 16 | (u32)p[3] << 24; }
static u64 get64(volatile u8 *p) { return get32(p) | (u64)get32(p + 4) << 32; }
static u32 put_str(volatile u8 *p, const char *s) {
  u32 n = 0;
  while (s[n]) { p[n] = (u8)s[n]; n++; }
  p[n] = 0;
  return n + 1;
}

/* One request: the 40-byte in-header, `body` bytes already at in+40. Returns
 * the reply's error (0 or -errno), or 1000 when no reply came. */
static int fuse(u32 opcode, u64 nodeid, u32 body) {
  for (u32 i = 0; i < 40; i++) in[i] = 0;
  put32(in, 40 + body);
  put32(in + 4, opcode);
  put64(in + 8, ++unique);
  put64(in + 16, nodeid);
  for (u32 i = 0; i < 16; i++) out[i] = 0;
  q.desc[0].addr = (u32)in;
  q.desc[0].len = 40 + body;
  q.desc[0].flags = 1; /* NEXT */
  q.desc[0].next = 1;
  q.desc[1].addr = (u32)out;
  q.desc[1].len = sizeof out;
  q.desc[1].flags = 2; /* WRITE */
  q.desc[1].next = 0;
  int n = virtio_submit(&q, 0);
  if (n < 16 || get64(out + 8) != unique) return 1000;
  return (int)get32(out + 4);
}

static void error(int e) {
  puts("error ");
  dec((u32)(e == 1000 ? 1000 : -e));
  putc('\n');
}

/* LOOKUP name in nodeid; the new node id, or 0 (the error printed). */
static u64 lookup(u64 nodeid, const char *name, const char *label) {
  u32 n = put_str(in + 40, name);
  int e = fuse(LOOKUP, nodeid, n);
  if (e) { puts(label); error(e); return 0; }
  return get64(out + 16);
}

void guest_main(void) {
  u32 base = find_device(26);
  if (!base) { puts("fs: no virtio-fs device\n"); return; }
  puts("fs: tag ");
  for (u32 i = 0; i < 36; i++) {
    u8 c = *(volatile u8 *)(base + 0x100 + i);
    if (!c) break;
    putc((char)c);
  }
  putc('\n');
  if (virtio_begin(base, 0) || virtio_queue(&q, base, 1)) { puts("fs: setup refused\n"); return; }
  virtio_ready(base);

  /* INIT 7.31, no flags. */
  for (u32 i = 0; i < 64; i++) in[40 + i] = 0;
  put32(in + 40, 7);
  put32(in + 44, 31);
  int e = fuse(INIT, 0, 64);
  if (e) { puts("fs: init "); error(e); return; }
  puts("fs: init ");
  dec(get32(out + 16));
  putc('.');
  dec(get32(out + 20));
  putc('\n');

  /* hello.txt: LOOKUP, OPEN read-only, READ. */
  u64 node = lookup(1, "hello.txt", "fs: hello.txt: ");
  if (node) {
    put32(in + 40, 0); /* O_RDONLY */
    put32(in + 44, 0);
    e = fuse(OPEN, node, 8);
    if (e) { puts("fs: hello.txt: "); error(e); }
    else {
      u64 fh = get64(out + 16);
      for (u32 i = 0; i < 40; i++) in[40 + i] = 0;
      put64(in + 40, fh);
      put32(in + 56, 512);
      e = fuse(READ, node, 40);
      if (e) { puts("fs: hello.txt: "); error(e); }
      else {
        puts("fs: hello.txt: ");
        u32 len = get32(out) - 16;
        for (u32 i = 0; i < len && out[16 + i] != '\n'; i++) putc((char)out[16 + i]);
        putc('\n');
      }
    }
  }

  /* CREATE new.txt (O_WRONLY|O_CREAT, 0644) and WRITE to it. */
  put32(in + 40, 01 | 0100);
  put32(in + 44, 0100644);
  put32(in + 48, 022);
  put32(in + 52, 0);
  u32 n = put_str(in + 56, "new.txt");
  e = fuse(CREATE, 1, 16 + n);
  if (e) { puts("fs: create: "); error(e); }
  else {
    u64 created = get64(out + 16);
    u64 fh = get64(out + 16 + 128);
    const char *text = "written by the guest\n";
    for (u32 i = 0; i < 40; i++) in[40 + i] = 0;
    put64(in + 40, fh);
    u32 len = put_str(in + 80, text) - 1;
    put32(in + 56, len);
    e = fuse(WRITE, created, 40 + len);
    if (e || get32(out + 16) != len) { puts("fs: create: write "); error(e ? e : -5); }
    else puts("fs: create: ok\n");
  }

  /* MKDIR made-by-guest, 0755. */
  put32(in + 40, 0755);
  put32(in + 44, 022);
  n = put_str(in + 48, "made-by-guest");
  e = fuse(MKDIR, 1, 8 + n);
  if (e) { puts("fs: mkdir: "); error(e); }
  else puts("fs: mkdir: ok\n");

  /* A character device node (1,3: /dev/null's numbers, mode 0666). */
  put32(in + 40, 0020666);
  put32(in + 44, (1 << 8) | 3);
  put32(in + 48, 0);
  put32(in + 52, 0);
  n = put_str(in + 56, "dev-null");
  e = fuse(MKNOD, 1, 16 + n);
  if (e) { puts("fs: mknod: "); error(e); }
  else puts("fs: mknod: ok\n");

  /* A name that climbs out is refused (EINVAL). */
  put32(in + 40, 0755);
  put32(in + 44, 022);
  n = put_str(in + 48, "../escaped");
  e = fuse(MKDIR, 1, 8 + n);
  if (e) { puts("fs: mkdir ../escaped: "); error(e); }
  else puts("fs: mkdir ../escaped: ok\n");

  /* ".." at the root stays at the root. */
  node = lookup(1, "..", "fs: lookup ..: ");
  if (node) { puts("fs: lookup ..: node "); dec((u32)node); putc('\n'); }

  /* A host symlink is not followed on the host. */
  node = lookup(1, "escape", "fs: escape: ");
  if (node) {
    u64 inner = lookup(node, "passwd", "fs: escape/passwd: ");
    if (inner) puts("fs: escape/passwd: ok\n");
  }

  /* A request shorter than FUSE's header: nothing answered, the device
   * goes on. */
  q.desc[0].addr = (u32)in;
  q.desc[0].len = 8;
  q.desc[0].flags = 1;
  q.desc[0].next = 1;
  q.desc[1].addr = (u32)out;
  q.desc[1].len = sizeof out;
  q.desc[1].flags = 2;
  q.desc[1].next = 0;
  puts("fs: bad request: ");
  dec((u32)virtio_submit(&q, 0));
  putc('\n');
  if (lookup(1, "hello.txt", "fs: after: ")) puts("fs: after: ok\n");
}
