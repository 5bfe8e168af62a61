/* Work stealing for the parallel loops of edgecc's kernels (see edgecc/ir_passes/work_stealing.py).
 *
 * TVM splits a parallel loop statically: thread t of T runs iterations [t*S, (t+1)*S), S = ceil(n/T). On a
 * shared machine, or on a phone's big.LITTLE cores, one thread is often slower than the other, and the kernel
 * waits for it. Here each thread still starts on exactly that static share (so it reads what it wrote in the
 * previous kernel), claims it from the front a quarter of the rest at a time, and when its share is done it
 * takes half of what another thread's share has left from its *back*, the end that thread reaches last.
 *
 * ranges[w] packs one share, [front, back): front in the low 32 bits, back in the high 32 bits, so a single
 * compare-and-swap moves either end. Memory order: the kernel's writes are published by the runtime's join
 * at the end of the parallel region; the CAS only has to hand each iteration to exactly one thread.
 */
#include <stdint.h>

static inline int64_t edgecc_pack(int32_t front, int32_t back) {
  return (int64_t)(((uint64_t)(uint32_t)back << 32) | (uint32_t)front);
}

/* Split n iterations into `shares` static shares, as TVM's parallel launch would. */
int32_t edgecc_parallel_init(int64_t* ranges, int32_t shares, int32_t n) {
  int32_t step = (n + shares - 1) / shares;
  for (int32_t i = 0; i < shares; i++) {
    int32_t front = i * step < n ? i * step : n;
    int32_t back = front + step < n ? front + step : n;
    ranges[i] = edgecc_pack(front, back);
  }
  return 0;
}

/* The next iterations for share w (at least `chunk`, unless fewer are left): from the front of its own range,
 * else from the back of the others', the share behind w first. Writes slot[0] = first iteration and
 * slot[1] = count; returns 0 when none is left. */
int32_t edgecc_parallel_claim(int64_t* ranges, int32_t* slot, int32_t w, int32_t shares, int32_t chunk) {
  for (int32_t k = 0; k < shares; k++) {
    int32_t j = (w - k + shares) % shares;
    int64_t v = __atomic_load_n(&ranges[j], __ATOMIC_RELAXED);
    for (;;) {
      int32_t front = (int32_t)(uint32_t)v, back = (int32_t)(v >> 32);
      if (front >= back) break;
      /* own share: a quarter of what is left (few claims on kernels of many small iterations); stolen: half
         of what the owner has left, as classic work stealing does (so a slow owner is relieved in a few steps) */
      int32_t size = (back - front) / (k == 0 ? 4 : 2);
      if (size < chunk) size = chunk;
      if (size > back - front) size = back - front;
      int64_t next = k == 0 ? edgecc_pack(front + size, back) : edgecc_pack(front, back - size);
      if (__atomic_compare_exchange_n(&ranges[j], &v, next, 1, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
        slot[0] = k == 0 ? front : back - size;
        slot[1] = size;
        return 1;
      }
    }
  }
  return 0;
}

int32_t edgecc_parallel_begin(const int32_t* slot) { return slot[0]; }

int32_t edgecc_parallel_count(const int32_t* slot) { return slot[1]; }
