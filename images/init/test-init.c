/*
 * husk's tiny static test init: PID 1 of the test initramfs.
 *
 * Freestanding (no libc, raw x86_64 system calls) so that it is a few KiB and
 * needs nothing from the build machine but gcc. It mounts /dev, /proc and
 * /sys, loads the kernel modules listed in /lib/modules/modules.load (kernel
 * A ships its virtio drivers as modules; kernel B has none), and reports what
 * the kernel gave it on the console, one `husk-test-init:` line per fact:
 * the kernel release, the CPUs online, every virtio device and the driver
 * bound to it, and the first line of /dev/vda when there is one. It ends with
 * a reboot, which husk-vmm and `qemu -no-reboot` both turn into an exit.
 *
 * Module parameters given on the kernel command line (`virtio_mmio.device=`)
 * are handed to finit_module, as modprobe would do.
 */
typedef unsigned long u64;
typedef long i64;

#define SYS_read 0
#define SYS_write 1
#define SYS_close 3
#define SYS_dup3 292
#define SYS_openat 257
#define SYS_mkdirat 258
#define SYS_mount 165
#define SYS_uname 63
#define SYS_getdents64 217
#define SYS_readlinkat 267
#define SYS_finit_module 313
#define SYS_reboot 169
#define AT_FDCWD (-100)
#define O_RDONLY 0
#define O_RDWR 2
#define O_DIRECTORY 0200000
#define O_CLOEXEC 02000000

static i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f)
{
	register i64 r10 __asm__("r10") = d;
	register i64 r8 __asm__("r8") = e;
	register i64 r9 __asm__("r9") = f;
	i64 ret;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
			 : "rcx", "r11", "memory");
	return ret;
}
#define sys3(n, a, b, c) sys6(n, (i64)(a), (i64)(b), (i64)(c), 0, 0, 0)

void *memset(void *d, int c, u64 n)
{
	unsigned char *p = d;
	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
	unsigned char *p = d;
	const unsigned char *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

static u64 len(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return n;
}

static void put(const char *s) { sys3(SYS_write, 1, s, len(s)); }

static void say4(const char *a, const char *b, const char *c, const char *d)
{
	put("husk-test-init: ");
	put(a);
	put(b);
	put(c);
	put(d);
	put("\n");
}
#define say(a, b, c) say4(a, b, c, "")

static void num(u64 v, char *out)
{
	char t[24];
	int i = 0, j = 0;
	do
		t[i++] = (char)('0' + v % 10);
	while (v /= 10);
	while (i)
		out[j++] = t[--i];
	out[j] = 0;
}

/* Reads a whole small file into buf (NUL-terminated); returns its length or -1. */
static i64 slurp(const char *path, char *buf, u64 size)
{
	i64 fd = sys3(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
	i64 n, got = 0;
	if (fd < 0)
		return -1;
	while (got < (i64)size - 1 && (n = sys3(SYS_read, fd, buf + got, size - 1 - got)) > 0)
		got += n;
	sys3(SYS_close, fd, 0, 0);
	buf[got] = 0;
	return got;
}

static void chomp(char *s)
{
	for (; *s; s++)
		if (*s == '\n') {
			*s = 0;
			return;
		}
}

static char cmdline[4096];

/* "name.param=value" tokens of the kernel command line, as "param=value ...". */
static void module_params(const char *name, char *out, u64 size)
{
	u64 nl = len(name), o = 0;
	char *p = cmdline;
	while (*p) {
		char *tok = p;
		u64 tl = 0, i;
		int match = 1;
		while (p[tl] && p[tl] != ' ' && p[tl] != '\n')
			tl++;
		p += tl;
		while (*p == ' ' || *p == '\n')
			p++;
		if (tl <= nl + 1 || tok[nl] != '.')
			continue;
		for (i = 0; i < nl; i++) {
			char a = tok[i] == '-' ? '_' : tok[i];
			char b = name[i] == '-' ? '_' : name[i];
			if (a != b)
				match = 0;
		}
		if (!match || o + tl - nl + 1 >= size)
			continue;
		if (o)
			out[o++] = ' ';
		memcpy(out + o, tok + nl + 1, tl - nl - 1);
		o += tl - nl - 1;
	}
	out[o] = 0;
}

static void load_modules(void)
{
	static char list[8192];
	char path[256], params[1024], n1[24], n2[24];
	u64 loaded = 0, wanted = 0;
	char *line = list;
	if (slurp("/lib/modules/modules.load", list, sizeof list) < 0)
		return;
	while (*line) {
		char *end = line;
		u64 l;
		i64 fd, r;
		while (*end && *end != '\n')
			end++;
		l = (u64)(end - line);
		if (l && l < 200) {
			char name[200];
			memcpy(name, line, l);
			name[l] = 0;
			memcpy(path, "/lib/modules/", 13);
			memcpy(path + 13, name, l);
			memcpy(path + 13 + l, ".ko", 4);
			module_params(name, params, sizeof params);
			wanted++;
			fd = sys3(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
			r = fd < 0 ? fd : sys3(SYS_finit_module, fd, params, 0);
			if (fd >= 0)
				sys3(SYS_close, fd, 0, 0);
			if (r == 0)
				loaded++;
			else
				say("module failed: ", name, "");
		}
		line = *end ? end + 1 : end;
	}
	num(loaded, n1);
	num(wanted, n2);
	say4("modules loaded ", n1, " of ", n2);
}

struct dirent64 {
	u64 ino;
	i64 off;
	unsigned short reclen;
	unsigned char type;
	char name[];
};

static void list_virtio(void)
{
	static char buf[4096];
	i64 dir = sys3(SYS_openat, AT_FDCWD, "/sys/bus/virtio/devices", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	i64 n;
	if (dir < 0)
		return;
	while ((n = sys3(SYS_getdents64, dir, buf, sizeof buf)) > 0) {
		i64 off = 0;
		while (off < n) {
			struct dirent64 *d = (struct dirent64 *)(buf + off);
			off += d->reclen;
			if (d->name[0] == '.')
				continue;
			char link[256], target[256];
			u64 l = len(d->name);
			i64 t;
			memcpy(link, "/sys/bus/virtio/devices/", 24);
			memcpy(link + 24, d->name, l);
			memcpy(link + 24 + l, "/driver", 8);
			t = sys6(SYS_readlinkat, AT_FDCWD, (i64)link, (i64)target, sizeof target - 1, 0, 0);
			if (t < 0) {
				say4("virtio ", d->name, " ", "(no driver)");
				continue;
			}
			target[t] = 0;
			char *base = target;
			for (char *c = target; *c; c++)
				if (*c == '/')
					base = c + 1;
			say4("virtio ", d->name, " ", base);
		}
	}
	sys3(SYS_close, dir, 0, 0);
}

struct utsname {
	char sysname[65], nodename[65], release[65], version[65], machine[65], domain[65];
};

void init_main(void)
{
	static struct utsname u;
	static char buf[512];
	i64 fd;

	sys3(SYS_mkdirat, AT_FDCWD, "/dev", 0755);
	sys6(SYS_mount, (i64) "devtmpfs", (i64) "/dev", (i64) "devtmpfs", 0, 0, 0);
	fd = sys3(SYS_openat, AT_FDCWD, "/dev/console", O_RDWR);
	if (fd >= 0) {
		sys3(SYS_dup3, fd, 0, 0);
		sys3(SYS_dup3, fd, 1, 0);
		sys3(SYS_dup3, fd, 2, 0);
	}
	sys3(SYS_mkdirat, AT_FDCWD, "/proc", 0555);
	sys3(SYS_mkdirat, AT_FDCWD, "/sys", 0555);
	sys6(SYS_mount, (i64) "proc", (i64) "/proc", (i64) "proc", 0, 0, 0);
	sys6(SYS_mount, (i64) "sysfs", (i64) "/sys", (i64) "sysfs", 0, 0, 0);
	sys3(SYS_uname, &u, 0, 0);
	say("started as pid 1 on Linux ", u.release, "");
	slurp("/proc/cmdline", cmdline, sizeof cmdline);
	load_modules();
	if (slurp("/sys/devices/system/cpu/online", buf, sizeof buf) > 0) {
		chomp(buf);
		say("cpus online ", buf, "");
	}
	list_virtio();
	if (slurp("/dev/vda", buf, 128) > 0) {
		chomp(buf);
		say("vda says ", buf, "");
	}
	say("done", "", "");
	sys6(SYS_reboot, 0xfee1dead, 672274793, 0x01234567, 0, 0, 0);
	for (;;)
		;
}

__asm__(".globl _start\n"
	"_start:\n"
	"  xor %rbp, %rbp\n"
	"  and $-16, %rsp\n"
	"  call init_main\n"
	"  hlt\n");
