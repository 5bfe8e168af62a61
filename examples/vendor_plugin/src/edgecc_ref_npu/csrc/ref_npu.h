/* The reference NPU's kernel library: the "vendor SDK" of the edgecc plugin template.
 *
 * Plain C99 (also valid C++: edgecc's export compiles it with the host g++). A real vendor library would
 * drive an accelerator here; this one computes on the CPU so that the template runs anywhere, and counts
 * its calls so that tests can prove which layers ran in it.
 *
 * Tensors are dense, row-major (C-contiguous). Convolutions are NCHW activations, OIHW weights.
 */
#ifndef REF_NPU_H_
#define REF_NPU_H_

#include <stdint.h>

#ifndef REF_NPU_API
#define REF_NPU_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Operation kinds, for ref_npu_call_count(). */
enum {
  REF_NPU_MATMUL_F32 = 0,
  REF_NPU_CONV2D_F32 = 1,
  REF_NPU_MATMUL_I8 = 2,
  REF_NPU_CONV2D_I8 = 3,
  REF_NPU_NUM_OPS = 4
};

/* C[b] = A[b] x B[b] for b in [0, batch): A is M x K, B is K x N, C is M x N. A batch stride of 0
 * broadcasts that operand (a 2-D weight shared by every batch). */
REF_NPU_API void ref_npu_matmul_f32(const float* a, const float* b, float* c, int64_t batch, int64_t m,
                                    int64_t n, int64_t k, int64_t a_batch_stride, int64_t b_batch_stride);

/* int8 x int8 -> int32 accumulation, same layout as ref_npu_matmul_f32. */
REF_NPU_API void ref_npu_matmul_i8(const int8_t* a, const int8_t* b, int32_t* c, int64_t batch, int64_t m,
                                   int64_t n, int64_t k, int64_t a_batch_stride, int64_t b_batch_stride);

typedef struct {
  int64_t n, c, h, w;           /* input  N x C x H x W */
  int64_t o, kh, kw;            /* weight O x (C/groups) x KH x KW */
  int64_t oh, ow;               /* output N x O x OH x OW */
  int64_t stride_h, stride_w;
  int64_t pad_top, pad_left;    /* bottom/right padding is implied by OH/OW */
  int64_t dilation_h, dilation_w;
  int64_t groups;
} ref_npu_conv2d_params;

REF_NPU_API void ref_npu_conv2d_f32(const float* x, const float* w, float* y, const ref_npu_conv2d_params* p);

/* int8 activations and weights, int32 output. */
REF_NPU_API void ref_npu_conv2d_i8(const int8_t* x, const int8_t* w, int32_t* y, const ref_npu_conv2d_params* p);

/* How many times an operation kind ran since load (or the last reset). */
REF_NPU_API uint64_t ref_npu_call_count(int op);
REF_NPU_API void ref_npu_reset_counts(void);

#ifdef __cplusplus
}
#endif

#endif /* REF_NPU_H_ */
