// edgecc stand-in for tvm/support/cuda/nvtx.h: NVTX ranges are a no-op in a CPU-only runtime.
#ifndef TVM_SUPPORT_CUDA_NVTX_H_
#define TVM_SUPPORT_CUDA_NVTX_H_
#include <string>
namespace tvm {
namespace support {
class NVTXScopedRange {
 public:
  explicit NVTXScopedRange(const char*) {}
  explicit NVTXScopedRange(const std::string&) {}
};
}  // namespace support
}  // namespace tvm
#endif  // TVM_SUPPORT_CUDA_NVTX_H_
