// edgecc stand-in for tvm/support/io.h (not shipped in the apache-tvm wheel): the binary stream
// interface the runtime sources serialise through. Written for edgecc's riscv64 runtime build.
#ifndef TVM_SUPPORT_IO_H_
#define TVM_SUPPORT_IO_H_
#include <cstddef>
#include <cstdint>
namespace tvm {
namespace support {
// Specialised per type in serializer.h (and by runtime headers for their own types).
template <typename T, typename = void>
struct Serializer {
  static constexpr bool enabled = false;
};
// A byte stream; typed Read/Write go through Serializer<T>.
class Stream {
 public:
  virtual ~Stream() = default;
  virtual size_t Read(void* ptr, size_t size) = 0;
  virtual size_t Write(const void* ptr, size_t size) = 0;
  template <typename T>
  void Write(const T& value) {
    static_assert(Serializer<T>::enabled, "type has no Serializer");
    Serializer<T>::Write(this, value);
  }
  template <typename T>
  bool Read(T* value) {
    static_assert(Serializer<T>::enabled, "type has no Serializer");
    return Serializer<T>::Read(this, value);
  }
  template <typename T>
  void WriteArray(const T* values, size_t n) {
    for (size_t i = 0; i < n; ++i) Write<T>(values[i]);
  }
  template <typename T>
  bool ReadArray(T* values, size_t n) {
    for (size_t i = 0; i < n; ++i)
      if (!Read<T>(values + i)) return false;
    return true;
  }
};
}  // namespace support
}  // namespace tvm
#endif  // TVM_SUPPORT_IO_H_
