// edgecc stand-in for src/support/utils.h: the helpers the runtime sources use.
#ifndef TVM_SUPPORT_UTILS_H_
#define TVM_SUPPORT_UTILS_H_
#include <algorithm>
#include <cctype>
#include <string>
namespace tvm {
namespace support {
inline bool IsNumber(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c); });
}
}  // namespace support
}  // namespace tvm
#endif  // TVM_SUPPORT_UTILS_H_
