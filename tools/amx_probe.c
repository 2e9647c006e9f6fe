// What one core's AMX tiles can do on this machine, for the "% of peak" figures of docs/benchmarks.md: the
// `tdpbf16ps` rate with no memory traffic, then with the two A and two B tile loads of each step of a 32 x 32 block
// of C (the kernel of sketchx-core/src/ops/amx.rs) read from working sets of growing size (L1, L2, L3), all of
// them or half (A from L1), and from cache lines offset by 16 bytes (the allocator's alignment).
//
//   gcc -O2 -mamx-tile -mamx-bf16 tools/amx_probe.c -o /tmp/amx_probe && /tmp/amx_probe
//
// Linux only (the tile state is requested with arch_prctl); single-threaded; prints GFLOP/s (bf16, 2 per
// multiply-add). Not built by the project or its CI.
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define FLOP_PER_DP (16.0 * 16.0 * 32.0 * 2.0)

typedef struct {
  uint8_t palette, start;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} __attribute__((packed, aligned(64))) tile_config;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// Four steps' worth of tiles (two A, two B) per iteration from `base + off`, `off` walking `ws` bytes; the A tiles
// from `a_fixed` instead when it is set (a small buffer that stays in L1).
static double run(char *base, long ws, char *a_fixed, long iters) {
  long off = 0, a_off = 0;
  double t = now();
  for (long i = 0; i < iters; i++) {
    char *p = base + off;
    if (a_fixed) {
      char *q = a_fixed + a_off;
      a_off = (a_off + 2048) % 16384;
      _tile_loadd(4, q, 64);
      _tile_loadd(5, q + 1024, 64);
      _tile_loadd(6, p, 64);
      _tile_loadd(7, p + 1024, 64);
      off += 2048;
    } else {
      _tile_loadd(4, p, 64);
      _tile_loadd(5, p + 1024, 64);
      _tile_loadd(6, p + 2048, 64);
      _tile_loadd(7, p + 3072, 64);
      off += 4096;
    }
    if (off + 4096 > ws) off = 0;
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  return iters * 4 * FLOP_PER_DP / (now() - t) / 1e9;
}

int main(void) {
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
    fprintf(stderr, "the OS did not grant the AMX tile state\n");
    return 1;
  }
  tile_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int i = 0; i < 8; i++) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
  const long total = 64L << 20;
  char *buf = aligned_alloc(4096, total + 4096);
  char *l1 = aligned_alloc(4096, 16384);
  for (long i = 0; i < total + 4096; i += 2) *(uint16_t *)(buf + i) = 0x3f80;  // bf16 1.0
  memset(l1, 0, 16384);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, l1, 64);
  _tile_loadd(5, l1, 64);
  _tile_loadd(6, l1, 64);
  _tile_loadd(7, l1, 64);
  const long iters = 2000000;
  double t = now();
  for (long i = 0; i < iters; i++) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  double dt = now() - t;
  printf("tdpbf16ps only: %.0f GFLOP/s (%.2f ns per instruction)\n", iters * 4 * FLOP_PER_DP / dt / 1e9,
         dt / iters / 4 * 1e9);
  printf("%-12s %18s %18s %22s\n", "working set", "all 4 tiles there", "B there, A in L1", "all 4, 16 B off a line");
  const long sizes[] = {16 << 10, 256 << 10, 1 << 20, 2 << 20, 4 << 20, 16 << 20, 64 << 20};
  for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
    long ws = sizes[s];
    run(buf, ws, NULL, iters / 8);  // warm
    double all = run(buf, ws, NULL, iters);
    double half = run(buf, ws, l1, iters);
    double off = run(buf + 16, ws, NULL, iters);
    printf("%9ld KiB %18.0f %18.0f %22.0f\n", ws >> 10, all, half, off);
  }
  _tile_release();
  free(buf);
  free(l1);
  return 0;
}
