// edgecc stand-in for src/support/base64.h: standard base64 (RFC 4648, '=' padding) layered on a Stream.
#ifndef TVM_SUPPORT_BASE64_H_
#define TVM_SUPPORT_BASE64_H_
#include <tvm/support/io.h>

#include <cstdint>
#include <string>

namespace tvm {
namespace support {
namespace base64 {
inline const char* Alphabet() { return "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"; }
inline int Decode(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '+') return 62;
  if (c == '/') return 63;
  return -1;
}
}  // namespace base64

// Decodes base64 text read from another stream.
class Base64InStream : public Stream {
 public:
  explicit Base64InStream(Stream* in) : in_(in) {}
  void InitPosition() {}  // skips nothing: decoding starts at the stream's current position
  using Stream::Read;
  using Stream::Write;
  size_t Read(void* ptr, size_t size) final {
    auto* out = static_cast<uint8_t*>(ptr);
    size_t n = 0;
    while (n < size) {
      if (buf_pos_ == buf_len_ && !Refill()) break;
      out[n++] = buf_[buf_pos_++];
    }
    return n;
  }
  size_t Write(const void*, size_t) final { return 0; }

 private:
  bool Refill() {
    int vals[4];
    int got = 0;
    while (got < 4) {
      char c;
      if (in_->Read(&c, 1) != 1) return false;
      if (c == '=') {
        vals[got++] = -2;
        continue;
      }
      int v = base64::Decode(c);
      if (v >= 0) vals[got++] = v;  // skips whitespace and other separators
    }
    if (vals[0] < 0 || vals[1] < 0) return false;
    buf_len_ = 0;
    buf_pos_ = 0;
    buf_[buf_len_++] = static_cast<uint8_t>((vals[0] << 2) | (vals[1] >> 4));
    if (vals[2] >= 0) buf_[buf_len_++] = static_cast<uint8_t>(((vals[1] & 15) << 4) | (vals[2] >> 2));
    if (vals[2] >= 0 && vals[3] >= 0) buf_[buf_len_++] = static_cast<uint8_t>(((vals[2] & 3) << 6) | vals[3]);
    return buf_len_ > 0;
  }
  Stream* in_;
  uint8_t buf_[3] = {0, 0, 0};
  size_t buf_len_ = 0, buf_pos_ = 0;
};

// Encodes everything written to it as base64 text into another stream; call Finish() at the end.
class Base64OutStream : public Stream {
 public:
  explicit Base64OutStream(Stream* out) : out_(out) {}
  using Stream::Read;
  using Stream::Write;
  size_t Write(const void* ptr, size_t size) final {
    const auto* in = static_cast<const uint8_t*>(ptr);
    for (size_t i = 0; i < size; ++i) {
      buf_[len_++] = in[i];
      if (len_ == 3) Flush();
    }
    return size;
  }
  size_t Read(void*, size_t) final { return 0; }
  void Finish() {
    if (len_ != 0) Flush();
  }

 private:
  void Flush() {
    const char* a = base64::Alphabet();
    char text[4];
    text[0] = a[buf_[0] >> 2];
    text[1] = a[((buf_[0] & 3) << 4) | (len_ > 1 ? buf_[1] >> 4 : 0)];
    text[2] = len_ > 1 ? a[((buf_[1] & 15) << 2) | (len_ > 2 ? buf_[2] >> 6 : 0)] : '=';
    text[3] = len_ > 2 ? a[buf_[2] & 63] : '=';
    out_->Write(static_cast<const void*>(text), 4);
    len_ = 0;
    buf_[0] = buf_[1] = buf_[2] = 0;
  }
  Stream* out_;
  uint8_t buf_[3] = {0, 0, 0};
  size_t len_ = 0;
};

}  // namespace support
}  // namespace tvm
#endif  // TVM_SUPPORT_BASE64_H_
