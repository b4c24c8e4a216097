/* netprobe: a WASI preview2 test guest that talks TCP through wasi:sockets
 * directly (the bindings come from wit-bindgen-c; see tests/build.rs).
 *
 *   netprobe serve PORT COUNT      listen on 0.0.0.0:PORT, answer COUNT
 *                                  connections: read a line, reply "pong LINE"
 *   netprobe serve6 PORT COUNT     the same on [::]:PORT (IPv6 only)
 *   netprobe connect IP PORT MSG   connect to an IPv4 or IPv6 address
 *                                  (retrying while refused for ~10 s),
 *                                  send MSG, print the reply line
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "netprobe.h"

static void out(wasi_cli_stdout_own_output_stream_t s, const char *text) {
  netprobe_list_u8_t list = {(uint8_t *)text, strlen(text)};
  wasi_io_streams_stream_error_t err;
  wasi_io_streams_method_output_stream_blocking_write_and_flush(
      wasi_io_streams_borrow_output_stream(s), &list, &err);
  wasi_io_streams_output_stream_drop_own(s);
}

static void say(const char *text) { out(wasi_cli_stdout_get_stdout(), text); }
static void fail(const char *text) { out(wasi_cli_stderr_get_stderr(), text); }

static void block_on(wasi_io_poll_own_pollable_t p) {
  wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(p));
  wasi_io_poll_pollable_drop_own(p);
}

static void sleep_ms(uint64_t ms) {
  block_on(wasi_clocks_monotonic_clock_subscribe_duration(ms * 1000000ull));
}

static int parse_ip(const char *s, wasi_sockets_network_ipv4_address_t *ip) {
  unsigned a, b, c, d;
  if (sscanf(s, "%u.%u.%u.%u", &a, &b, &c, &d) != 4 || a > 255 || b > 255 || c > 255 || d > 255)
    return -1;
  ip->f0 = a; ip->f1 = b; ip->f2 = c; ip->f3 = d;
  return 0;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Parses an IPv6 address (hex groups, one "::" at most) into 8 groups. */
static int parse_ip6(const char *s, uint16_t g[8]) {
  uint16_t head[8], tail[8];
  int nh = 0, nt = 0, gap = 0;
  const char *p = s;
  if (p[0] == ':' && p[1] == ':') { gap = 1; p += 2; }
  while (*p) {
    int v = 0, digits = 0;
    while (hexval(*p) >= 0 && digits < 4) { v = v * 16 + hexval(*p); p++; digits++; }
    if (digits == 0) return -1;
    if (gap) { if (nt == 8) return -1; tail[nt++] = v; }
    else { if (nh == 8) return -1; head[nh++] = v; }
    if (*p == 0) break;
    if (*p != ':') return -1;
    p++;
    if (*p == ':') { if (gap) return -1; gap = 1; p++; if (*p == 0) break; }
  }
  if (nh + nt > 8 || (!gap && nh != 8) || (gap && nh + nt == 8)) return -1;
  for (int i = 0; i < 8; i++) g[i] = 0;
  for (int i = 0; i < nh; i++) g[i] = head[i];
  for (int i = 0; i < nt; i++) g[8 - nt + i] = tail[i];
  return 0;
}

/* Reads up to a newline (not included) into buf. Returns the length or -1. */
static int read_line(wasi_io_streams_own_input_stream_t in, char *buf, size_t cap) {
  size_t n = 0;
  while (n + 1 < cap) {
    netprobe_list_u8_t data;
    wasi_io_streams_stream_error_t err;
    if (!wasi_io_streams_method_input_stream_blocking_read(
            wasi_io_streams_borrow_input_stream(in), 1, &data, &err))
      break;
    if (data.len == 0) continue;
    char c = (char)data.ptr[0];
    netprobe_list_u8_free(&data);
    if (c == '\n') { buf[n] = 0; return (int)n; }
    buf[n++] = c;
  }
  buf[n] = 0;
  return n > 0 ? (int)n : -1;
}

static int write_all(wasi_io_streams_own_output_stream_t o, const char *text) {
  netprobe_list_u8_t list = {(uint8_t *)text, strlen(text)};
  wasi_io_streams_stream_error_t err;
  return wasi_io_streams_method_output_stream_blocking_write_and_flush(
             wasi_io_streams_borrow_output_stream(o), &list, &err)
             ? 0
             : -1;
}

static wasi_sockets_tcp_own_tcp_socket_t new_socket(int v6) {
  wasi_sockets_tcp_own_tcp_socket_t s;
  wasi_sockets_network_error_code_t err;
  if (!wasi_sockets_tcp_create_socket_create_tcp_socket(
          v6 ? WASI_SOCKETS_NETWORK_IP_ADDRESS_FAMILY_IPV6 : WASI_SOCKETS_NETWORK_IP_ADDRESS_FAMILY_IPV4, &s, &err)) {
    char msg[64];
    snprintf(msg, sizeof msg, "create-tcp-socket: error %d\n", err);
    fail(msg);
    exit(1);
  }
  return s;
}

static int serve(int port, int count, int v6) {
  wasi_sockets_instance_network_own_network_t net = wasi_sockets_instance_network_instance_network();
  wasi_sockets_tcp_own_tcp_socket_t sock = new_socket(v6);
  wasi_sockets_tcp_borrow_tcp_socket_t b = wasi_sockets_tcp_borrow_tcp_socket(sock);
  wasi_sockets_network_ip_socket_address_t addr;
  memset(&addr, 0, sizeof addr);
  if (v6) {
    addr.tag = WASI_SOCKETS_NETWORK_IP_SOCKET_ADDRESS_IPV6;
    addr.val.ipv6.port = port;
  } else {
    addr.tag = WASI_SOCKETS_NETWORK_IP_SOCKET_ADDRESS_IPV4;
    addr.val.ipv4.port = port;
  }
  wasi_sockets_network_error_code_t err;
  char msg[160];
  if (!wasi_sockets_tcp_method_tcp_socket_start_bind(b, wasi_sockets_network_borrow_network(net), &addr, &err)) {
    snprintf(msg, sizeof msg, "bind %s:%d: error %d\n", v6 ? "[::]" : "0.0.0.0", port, err);
    fail(msg);
    return 1;
  }
  while (!wasi_sockets_tcp_method_tcp_socket_finish_bind(b, &err)) {
    if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) {
      snprintf(msg, sizeof msg, "bind %s:%d: error %d\n", v6 ? "[::]" : "0.0.0.0", port, err);
      fail(msg);
      return 1;
    }
    block_on(wasi_sockets_tcp_method_tcp_socket_subscribe(b));
  }
  if (!wasi_sockets_tcp_method_tcp_socket_start_listen(b, &err)) {
    snprintf(msg, sizeof msg, "listen: error %d\n", err);
    fail(msg);
    return 1;
  }
  while (!wasi_sockets_tcp_method_tcp_socket_finish_listen(b, &err)) {
    if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) {
      snprintf(msg, sizeof msg, "listen: error %d\n", err);
      fail(msg);
      return 1;
    }
    block_on(wasi_sockets_tcp_method_tcp_socket_subscribe(b));
  }
  snprintf(msg, sizeof msg, "listening on %d\n", port);
  say(msg);
  for (int i = 0; i < count; i++) {
    wasi_sockets_tcp_tuple3_own_tcp_socket_own_input_stream_own_output_stream_t conn;
    while (!wasi_sockets_tcp_method_tcp_socket_accept(b, &conn, &err)) {
      if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) {
        snprintf(msg, sizeof msg, "accept: error %d\n", err);
        fail(msg);
        return 1;
      }
      block_on(wasi_sockets_tcp_method_tcp_socket_subscribe(b));
    }
    char line[100], reply[128];
    if (read_line(conn.f1, line, sizeof line) >= 0) {
      snprintf(reply, sizeof reply, "pong %s\n", line);
      write_all(conn.f2, reply);
      snprintf(msg, sizeof msg, "served %s\n", line);
      say(msg);
    }
    wasi_io_streams_input_stream_drop_own(conn.f1);
    wasi_io_streams_output_stream_drop_own(conn.f2);
    wasi_sockets_tcp_tcp_socket_drop_own(conn.f0);
  }
  wasi_sockets_tcp_tcp_socket_drop_own(sock);
  return 0;
}

static int connect_to(const char *ip, int port, const char *text) {
  wasi_sockets_instance_network_own_network_t net = wasi_sockets_instance_network_instance_network();
  wasi_sockets_network_ip_socket_address_t addr;
  memset(&addr, 0, sizeof addr);
  int v6 = strchr(ip, ':') != NULL;
  char msg[160];
  uint16_t g[8];
  if (v6) {
    addr.tag = WASI_SOCKETS_NETWORK_IP_SOCKET_ADDRESS_IPV6;
    addr.val.ipv6.port = port;
    if (parse_ip6(ip, g) != 0) {
      snprintf(msg, sizeof msg, "not an IPv6 address: %s\n", ip);
      fail(msg);
      return 1;
    }
    wasi_sockets_network_ipv6_address_t *a = &addr.val.ipv6.address;
    a->f0 = g[0]; a->f1 = g[1]; a->f2 = g[2]; a->f3 = g[3];
    a->f4 = g[4]; a->f5 = g[5]; a->f6 = g[6]; a->f7 = g[7];
  } else {
    addr.tag = WASI_SOCKETS_NETWORK_IP_SOCKET_ADDRESS_IPV4;
    addr.val.ipv4.port = port;
    if (parse_ip(ip, &addr.val.ipv4.address) != 0) {
      snprintf(msg, sizeof msg, "not an IPv4 address: %s\n", ip);
      fail(msg);
      return 1;
    }
  }
  wasi_sockets_network_error_code_t err = 0;
  for (int attempt = 0; attempt < 100; attempt++) {
    wasi_sockets_tcp_own_tcp_socket_t sock = new_socket(v6);
    wasi_sockets_tcp_borrow_tcp_socket_t b = wasi_sockets_tcp_borrow_tcp_socket(sock);
    wasi_sockets_tcp_tuple2_own_input_stream_own_output_stream_t io;
    int ok = 0;
    if (wasi_sockets_tcp_method_tcp_socket_start_connect(b, wasi_sockets_network_borrow_network(net), &addr, &err)) {
      for (;;) {
        if (wasi_sockets_tcp_method_tcp_socket_finish_connect(b, &io, &err)) { ok = 1; break; }
        if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) break;
        block_on(wasi_sockets_tcp_method_tcp_socket_subscribe(b));
      }
    }
    if (ok) {
      char line[128], reply[128];
      snprintf(line, sizeof line, "%s\n", text);
      if (write_all(io.f1, line) != 0 || read_line(io.f0, reply, sizeof reply) < 0) {
        fail("connection closed before a reply\n");
        return 1;
      }
      snprintf(msg, sizeof msg, "%s\n", reply);
      say(msg);
      wasi_io_streams_input_stream_drop_own(io.f0);
      wasi_io_streams_output_stream_drop_own(io.f1);
      wasi_sockets_tcp_tcp_socket_drop_own(sock);
      return 0;
    }
    wasi_sockets_tcp_tcp_socket_drop_own(sock);
    if (err != WASI_SOCKETS_NETWORK_ERROR_CODE_CONNECTION_REFUSED) break;
    sleep_ms(100);
  }
  snprintf(msg, sizeof msg, "connect %s:%d: error %d\n", ip, port, err);
  fail(msg);
  return 1;
}

bool exports_wasi_cli_run_run(void) {
  netprobe_list_string_t args;
  wasi_cli_environment_get_arguments(&args);
  char *argv[8] = {0};
  size_t argc = args.len < 8 ? args.len : 8;
  for (size_t i = 0; i < argc; i++) {
    argv[i] = calloc(args.ptr[i].len + 1, 1);
    memcpy(argv[i], args.ptr[i].ptr, args.ptr[i].len);
  }
  netprobe_list_string_free(&args);
  if (argc >= 4 && !strcmp(argv[1], "serve")) return serve(atoi(argv[2]), atoi(argv[3]), 0) == 0;
  if (argc >= 4 && !strcmp(argv[1], "serve6")) return serve(atoi(argv[2]), atoi(argv[3]), 1) == 0;
  if (argc >= 5 && !strcmp(argv[1], "connect")) return connect_to(argv[2], atoi(argv[3]), argv[4]) == 0;
  fail("usage: netprobe serve|serve6 PORT COUNT | connect IP PORT MSG\n");
  return false;
}
