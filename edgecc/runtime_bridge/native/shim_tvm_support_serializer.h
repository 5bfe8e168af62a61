// edgecc stand-in for tvm/support/serializer.h. Byte layout (little-endian hosts only): numbers and
// enums raw; strings and sequences as a uint64 count then the items; pairs and maps item by item;
// DLDataType as u8 code, u8 bits, u16 lanes; DLDevice as i32 type, i32 id.
#ifndef TVM_SUPPORT_SERIALIZER_H_
#define TVM_SUPPORT_SERIALIZER_H_
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/string.h>
#include <tvm/support/io.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "edgecc's runtime build assumes little-endian");

namespace tvm {
namespace support {

template <typename T>
struct Serializer<T, std::enable_if_t<std::is_arithmetic_v<T> || std::is_enum_v<T>>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const T& v) { s->Write(static_cast<const void*>(&v), sizeof(T)); }
  static bool Read(Stream* s, T* v) { return s->Read(static_cast<void*>(v), sizeof(T)) == sizeof(T); }
};

namespace detail {
inline bool ReadCount(Stream* s, uint64_t* n) { return Serializer<uint64_t>::Read(s, n); }
inline void WriteCount(Stream* s, size_t n) { Serializer<uint64_t>::Write(s, static_cast<uint64_t>(n)); }
inline bool ReadChars(Stream* s, std::string* out) {
  uint64_t n;
  if (!ReadCount(s, &n)) return false;
  out->resize(static_cast<size_t>(n));
  return n == 0 || s->Read(out->data(), out->size()) == out->size();
}
}  // namespace detail

template <>
struct Serializer<std::string> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::string& v) {
    detail::WriteCount(s, v.size());
    if (!v.empty()) s->Write(static_cast<const void*>(v.data()), v.size());
  }
  static bool Read(Stream* s, std::string* v) { return detail::ReadChars(s, v); }
};

template <>
struct Serializer<ffi::String> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const ffi::String& v) {
    detail::WriteCount(s, v.size());
    if (v.size() != 0) s->Write(static_cast<const void*>(v.data()), v.size());
  }
  static bool Read(Stream* s, ffi::String* v) {
    std::string tmp;
    if (!detail::ReadChars(s, &tmp)) return false;
    *v = ffi::String(std::move(tmp));
    return true;
  }
};

template <typename T>
struct Serializer<std::vector<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::vector<T>& v) {
    detail::WriteCount(s, v.size());
    for (const T& item : v) Serializer<T>::Write(s, item);
  }
  static bool Read(Stream* s, std::vector<T>* v) {
    uint64_t n;
    if (!detail::ReadCount(s, &n)) return false;
    v->clear();
    v->resize(static_cast<size_t>(n));
    for (T& item : *v)
      if (!Serializer<T>::Read(s, &item)) return false;
    return true;
  }
};

template <typename A, typename B>
struct Serializer<std::pair<A, B>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::pair<A, B>& v) {
    Serializer<A>::Write(s, v.first);
    Serializer<B>::Write(s, v.second);
  }
  static bool Read(Stream* s, std::pair<A, B>* v) {
    return Serializer<A>::Read(s, &v->first) && Serializer<B>::Read(s, &v->second);
  }
};

template <typename K, typename V>
struct Serializer<std::unordered_map<K, V>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const std::unordered_map<K, V>& v) {
    detail::WriteCount(s, v.size());
    for (const auto& kv : v) {
      Serializer<K>::Write(s, kv.first);
      Serializer<V>::Write(s, kv.second);
    }
  }
  static bool Read(Stream* s, std::unordered_map<K, V>* v) {
    uint64_t n;
    if (!detail::ReadCount(s, &n)) return false;
    v->clear();
    for (uint64_t i = 0; i < n; ++i) {
      std::pair<K, V> kv;
      if (!Serializer<std::pair<K, V>>::Read(s, &kv)) return false;
      v->insert(std::move(kv));
    }
    return true;
  }
};

template <typename T>
struct Serializer<ffi::Array<T>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const ffi::Array<T>& v) {
    detail::WriteCount(s, v.size());
    for (const T& item : v) Serializer<T>::Write(s, item);
  }
  static bool Read(Stream* s, ffi::Array<T>* v) {
    uint64_t n;
    if (!detail::ReadCount(s, &n)) return false;
    ffi::Array<T> out;
    for (uint64_t i = 0; i < n; ++i) {
      T item;
      if (!Serializer<T>::Read(s, &item)) return false;
      out.push_back(std::move(item));
    }
    *v = std::move(out);
    return true;
  }
};

template <typename K, typename V>
struct Serializer<ffi::Map<K, V>> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const ffi::Map<K, V>& v) {
    detail::WriteCount(s, v.size());
    for (const auto& kv : v) {
      Serializer<K>::Write(s, kv.first);
      Serializer<V>::Write(s, kv.second);
    }
  }
  static bool Read(Stream* s, ffi::Map<K, V>* v) {
    uint64_t n;
    if (!detail::ReadCount(s, &n)) return false;
    ffi::Map<K, V> out;
    for (uint64_t i = 0; i < n; ++i) {
      K key;
      V value;
      if (!Serializer<K>::Read(s, &key) || !Serializer<V>::Read(s, &value)) return false;
      out.Set(std::move(key), std::move(value));
    }
    *v = std::move(out);
    return true;
  }
};

template <>
struct Serializer<DLDataType> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const DLDataType& t) {
    s->Write(t.code);
    s->Write(t.bits);
    s->Write(t.lanes);
  }
  static bool Read(Stream* s, DLDataType* t) { return s->Read(&t->code) && s->Read(&t->bits) && s->Read(&t->lanes); }
};

template <>
struct Serializer<DLDevice> {
  static constexpr bool enabled = true;
  static void Write(Stream* s, const DLDevice& d) {
    s->Write(static_cast<int32_t>(d.device_type));
    s->Write(static_cast<int32_t>(d.device_id));
  }
  static bool Read(Stream* s, DLDevice* d) {
    int32_t type, id;
    if (!s->Read(&type) || !s->Read(&id)) return false;
    d->device_type = static_cast<DLDeviceType>(type);
    d->device_id = id;
    return true;
  }
};

}  // namespace support
}  // namespace tvm
#endif  // TVM_SUPPORT_SERIALIZER_H_
