/* probe: the test guest of husk's end-to-end tests. One WASI program whose
 * first argument picks what it does, so each test states its intent in the
 * pod manifest. Built for wasm32-wasi (preview1) and, wrapped with the
 * preview1 adapter, as a preview2 component. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

static int cat(const char *path) {
  FILE *f = fopen(path, "r");
  if (!f) {
    fprintf(stderr, "open %s: %s\n", path, strerror(errno));
    return 1;
  }
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, n, stdout);
  fclose(f);
  return 0;
}

static int write_file(const char *path, const char *text, const char *mode) {
  FILE *f = fopen(path, mode);
  if (!f) {
    fprintf(stderr, "open %s: %s\n", path, strerror(errno));
    return 1;
  }
  if (fputs(text, f) < 0 || fclose(f) != 0) {
    fprintf(stderr, "write %s: %s\n", path, strerror(errno));
    return 1;
  }
  return 0;
}

/* serve COUNT [FILE]: answer COUNT connections on the preopened listening
 * socket at fd 3 (husk's containerPorts, wasmtime's --tcplisten): wait with
 * poll, accept, read a line, reply "pong LINE" (plus FILE's first line, to
 * show that volumes stay visible next to the socket). */
static int serve(int count, const char *file) {
  const char *n = getenv("LISTEN_FDS");
  printf("serving fd 3 (LISTEN_FDS=%s)\n", n ? n : "<unset>");
  fflush(stdout);
  char extra[100] = "";
  if (file) {
    FILE *f = fopen(file, "r");
    if (!f) { fprintf(stderr, "open %s: %s\n", file, strerror(errno)); return 1; }
    if (fgets(extra, sizeof extra, f)) extra[strcspn(extra, "\n")] = 0;
    fclose(f);
  }
  for (int i = 0; i < count; i++) {
    struct pollfd p = {.fd = 3, .events = POLLIN};
    if (poll(&p, 1, 30000) != 1) { fprintf(stderr, "poll: %s\n", strerror(errno)); return 1; }
    int c = accept(3, NULL, NULL);
    if (c < 0) { fprintf(stderr, "accept: %s\n", strerror(errno)); return 1; }
    char line[100];
    size_t len = 0;
    while (len + 1 < sizeof line) {
      ssize_t r = read(c, line + len, 1);
      if (r <= 0 || line[len] == '\n') break;
      len++;
    }
    line[len] = 0;
    char reply[256];
    int m = snprintf(reply, sizeof reply, "pong %s%s%s\n", line, file ? " " : "", extra);
    if (write(c, reply, m) != m) { fprintf(stderr, "write: %s\n", strerror(errno)); return 1; }
    shutdown(c, SHUT_RDWR);
    close(c);
    printf("served %s\n", line);
    fflush(stdout);
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    puts("usage: probe echo|env|serve|cat|watch|write|append|fill|grow|spin|chat|stdin|sleep|count|lines|openmany|exit ...");
    return 0;
  }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "serve") && argc > 2) return serve(atoi(argv[2]), argc > 3 ? argv[3] : NULL);
  if (!strcmp(cmd, "echo")) {
    for (int i = 2; i < argc; i++) printf("%s%s", argv[i], i + 1 < argc ? " " : "\n");
    return 0;
  }
  if (!strcmp(cmd, "env")) {
    for (int i = 2; i < argc; i++) {
      const char *v = getenv(argv[i]);
      printf("%s=%s\n", argv[i], v ? v : "<unset>");
    }
    return 0;
  }
  if (!strcmp(cmd, "stderr")) {
    fprintf(stderr, "%s\n", argc > 2 ? argv[2] : "");
    return 0;
  }
  if (!strcmp(cmd, "cat") && argc > 2) return cat(argv[2]);
  if (!strcmp(cmd, "write") && argc > 3) return write_file(argv[2], argv[3], "w");
  if (!strcmp(cmd, "append") && argc > 3) return write_file(argv[2], argv[3], "a");
  if (!strcmp(cmd, "fill") && argc > 3) {
    /* fill PATH KIB: write KIB KiB, fail with exit 1 when the disk is full */
    FILE *f = fopen(argv[2], "w");
    if (!f) { fprintf(stderr, "open: %s\n", strerror(errno)); return 1; }
    static char block[1024];
    memset(block, 'x', sizeof block);
    long kib = atol(argv[3]);
    for (long i = 0; i < kib; i++) {
      if (fwrite(block, 1, sizeof block, f) != sizeof block || fflush(f) != 0) {
        fprintf(stderr, "write failed after %ld KiB: %s\n", i, strerror(errno));
        return 1;
      }
    }
    if (fclose(f) != 0) { fprintf(stderr, "close: %s\n", strerror(errno)); return 1; }
    printf("wrote %ld KiB\n", kib);
    return 0;
  }
  if (!strcmp(cmd, "grow") && argc > 2) {
    /* grow MIB: allocate and touch MIB MiB, one MiB at a time */
    long mib = atol(argv[2]);
    static char *volatile keep[4096];
    unsigned long sum = 0;
    for (long i = 0; i < mib && i < 4096; i++) {
      char *p = malloc(1 << 20);
      if (!p) { printf("malloc failed at %ld MiB\n", i); return 2; }
      memset(p, (int)i, 1 << 20);
      keep[i] = p;
      sum += (unsigned char)keep[i][i];
    }
    printf("allocated %ld MiB (%lu)\n", mib, sum);
    return 0;
  }
  if (!strcmp(cmd, "spin")) {
    puts("spinning");
    fflush(stdout);
    volatile unsigned long x = 0;
    for (;;) x++;
  }
  if (!strcmp(cmd, "chat")) {
    /* For attach: a line from stdin comes back on stdout, then a line on
     * stderr, and the exit code is 4. */
    char line[256];
    if (!fgets(line, sizeof line, stdin)) return 3;
    line[strcspn(line, "\n")] = 0;
    printf("got %s\n", line);
    fflush(stdout);
    fputs("to-stderr\n", stderr);
    return 4;
  }
  if (!strcmp(cmd, "stdin")) {
    /* The wasm guest's SIGTERM: stdin reaches end of file. */
    puts("waiting for stdin to close");
    fflush(stdout);
    char buf[256];
    while (fread(buf, 1, sizeof buf, stdin) > 0) {}
    puts("stdin closed, exiting cleanly");
    return 0;
  }
  if (!strcmp(cmd, "watch") && argc > 3) {
    /* watch PATH TEXT: read PATH until it holds TEXT, then print it */
    char buf[4096];
    for (;;) {
      FILE *f = fopen(argv[2], "r");
      size_t n = 0;
      if (f) {
        n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
      }
      buf[n] = 0;
      if (strstr(buf, argv[3])) {
        fputs(buf, stdout);
        return 0;
      }
      usleep(50000);
    }
  }
  if (!strcmp(cmd, "sleep") && argc > 2) {
    puts("sleeping");
    fflush(stdout);
    sleep(atoi(argv[2]));
    return 0;
  }
  if (!strcmp(cmd, "count") && argc > 3) {
    /* count PATH N: append a line to PATH; exit 1 until it has N lines */
    if (write_file(argv[2], "run\n", "a")) return 1;
    FILE *f = fopen(argv[2], "r");
    int lines = 0, c;
    while ((c = fgetc(f)) != EOF) lines += c == '\n';
    fclose(f);
    printf("runs so far: %d\n", lines);
    return lines >= atoi(argv[3]) ? 0 : 1;
  }
  if (!strcmp(cmd, "lines") && argc > 3) {
    /* lines N LEN: N numbered lines of LEN bytes (0: for ever), as fast as
     * stdout takes them */
    static char obuf[1 << 16];
    setvbuf(stdout, obuf, _IOFBF, sizeof obuf);
    long n = atol(argv[2]);
    int len = atoi(argv[3]);
    if (len < 10) len = 10;
    if (len > 4000) len = 4000;
    static char line[4096];
    memset(line, 'x', len);
    line[len] = '\n';
    for (long i = 0; n == 0 || i < n; i++) {
      snprintf(line, 10, "%08ld", i % 100000000);
      line[8] = ' ';
      if (fwrite(line, 1, len + 1, stdout) != (size_t)len + 1) return 1;
    }
    return fflush(stdout) != 0;
  }
  if (!strcmp(cmd, "openmany") && argc > 2) {
    /* openmany PATH: open PATH again and again, keeping every descriptor,
     * printing the count every 256; when an open fails, say so and wait */
    for (long n = 0;; n++) {
      FILE *f = fopen(argv[2], "r");
      if (!f) {
        printf("open failed after %ld: %s\n", n, strerror(errno));
        fflush(stdout);
        for (;;) sleep(1);
      }
      if (n % 256 == 0) { printf("open %ld\n", n); fflush(stdout); }
    }
  }
  if (!strcmp(cmd, "exit") && argc > 2) return atoi(argv[2]);
  fprintf(stderr, "probe: unknown command %s\n", cmd);
  return 64;
}
