/* The reference NPU's kernel library (see ref_npu.h). */
#include "ref_npu.h"

#include <string.h>

static uint64_t ref_npu_counts[REF_NPU_NUM_OPS];

REF_NPU_API uint64_t ref_npu_call_count(int op) {
  return (op >= 0 && op < REF_NPU_NUM_OPS) ? ref_npu_counts[op] : 0;
}

REF_NPU_API void ref_npu_reset_counts(void) { memset(ref_npu_counts, 0, sizeof(ref_npu_counts)); }

/* i-p-j loop order: the inner loop streams a row of B and a row of C (vectorisable). */
#define REF_NPU_MATMUL_BODY(ACC_T)                                                        \
  for (int64_t bi = 0; bi < batch; ++bi) {                                                \
    const int64_t a0 = bi * a_batch_stride, b0 = bi * b_batch_stride, c0 = bi * m * n;    \
    for (int64_t i = 0; i < m; ++i) {                                                     \
      ACC_T* crow = c + c0 + i * n;                                                       \
      for (int64_t j = 0; j < n; ++j) crow[j] = 0;                                        \
      for (int64_t p = 0; p < k; ++p) {                                                   \
        const ACC_T av = (ACC_T)a[a0 + i * k + p];                                        \
        const int64_t brow = b0 + p * n;                                                  \
        for (int64_t j = 0; j < n; ++j) crow[j] += av * (ACC_T)b[brow + j];               \
      }                                                                                   \
    }                                                                                     \
  }

REF_NPU_API void ref_npu_matmul_f32(const float* a, const float* b, float* c, int64_t batch, int64_t m,
                                    int64_t n, int64_t k, int64_t a_batch_stride, int64_t b_batch_stride) {
  ref_npu_counts[REF_NPU_MATMUL_F32]++;
  REF_NPU_MATMUL_BODY(float)
}

REF_NPU_API void ref_npu_matmul_i8(const int8_t* a, const int8_t* b, int32_t* c, int64_t batch, int64_t m,
                                   int64_t n, int64_t k, int64_t a_batch_stride, int64_t b_batch_stride) {
  ref_npu_counts[REF_NPU_MATMUL_I8]++;
  REF_NPU_MATMUL_BODY(int32_t)
}

/* Direct convolution, one output element at a time (a reference, not a fast kernel). */
#define REF_NPU_CONV2D_BODY(ACC_T)                                                                   \
  const int64_t cg = p->c / p->groups, og = p->o / p->groups;                                        \
  for (int64_t b = 0; b < p->n; ++b)                                                                 \
    for (int64_t oc = 0; oc < p->o; ++oc) {                                                          \
      const int64_t g = oc / og;                                                                     \
      for (int64_t oy = 0; oy < p->oh; ++oy)                                                         \
        for (int64_t ox = 0; ox < p->ow; ++ox) {                                                     \
          ACC_T acc = 0;                                                                             \
          for (int64_t ic = 0; ic < cg; ++ic) {                                                      \
            const int64_t c_in = g * cg + ic;                                                        \
            for (int64_t ky = 0; ky < p->kh; ++ky) {                                                 \
              const int64_t iy = oy * p->stride_h - p->pad_top + ky * p->dilation_h;                \
              if (iy < 0 || iy >= p->h) continue;                                                    \
              for (int64_t kx = 0; kx < p->kw; ++kx) {                                               \
                const int64_t ix = ox * p->stride_w - p->pad_left + kx * p->dilation_w;              \
                if (ix < 0 || ix >= p->w) continue;                                                  \
                acc += (ACC_T)x[((b * p->c + c_in) * p->h + iy) * p->w + ix] *                       \
                       (ACC_T)w[((oc * cg + ic) * p->kh + ky) * p->kw + kx];                         \
              }                                                                                      \
            }                                                                                        \
          }                                                                                          \
          y[((b * p->o + oc) * p->oh + oy) * p->ow + ox] = acc;                                      \
        }                                                                                            \
    }

REF_NPU_API void ref_npu_conv2d_f32(const float* x, const float* w, float* y, const ref_npu_conv2d_params* p) {
  ref_npu_counts[REF_NPU_CONV2D_F32]++;
  REF_NPU_CONV2D_BODY(float)
}

REF_NPU_API void ref_npu_conv2d_i8(const int8_t* x, const int8_t* w, int32_t* y, const ref_npu_conv2d_params* p) {
  ref_npu_counts[REF_NPU_CONV2D_I8]++;
  REF_NPU_CONV2D_BODY(int32_t)
}
