/*
 * edgecc_model.cc: the C API of edgecc_model.h on the TVM runtime, through the tvm_ffi C++ headers only
 * (the TVM wheel's tvm/runtime headers are incomplete). Grown from native/runner.cc.
 *
 * Build: c++ -std=c++17 -O2 -fPIC -c edgecc_model.cc -I<dir of edgecc_model.h> -I<tvm_ffi include>
 * Link:  libtvm_runtime (registers the Relax VM; link it with --no-as-needed) and libtvm_ffi.
 * One TVM runtime header is needed besides them: tvm/runtime/device_api.h (with tvm/runtime/base.h), for the
 * caller-provided arena (below); firmware.py passes the TVM wheel's include dir, a shared artifact carries
 * the two files in cmake/tvm_include/.
 *
 * Two ways to get a model:
 *  - edgecc_model_create(dir): loads dir/model.so with the TVM module loader, reads dir/manifest.json for
 *    the signature and hashes, and dir/params.bin.
 *  - edgecc_model_create_linked(params): the kernels and the VM bytecode are linked into the program as a
 *    TVM "system library" (objects of `--emit static`); the manifest subset and, with `--embed-params`,
 *    params.bin are linked in too (symbols below, defined by edgecc_model_data.S of the build).
 *
 * Caller-provided arena (edgecc_model_set_arena): the Relax VM takes every tensor's memory from the CPU
 * DeviceAPI (vm.builtin.alloc_storage -> memory::NaiveAllocator::Alloc -> DeviceAPI::Get(cpu)->AllocDataSpace;
 * kernel scratch: TVMBackendAllocWorkspace -> DeviceAPI::Get(cpu)->AllocWorkspace). The runtime looks that
 * API up once, through the global function "device_api.cpu" (src/runtime/device_api.cc,
 * DeviceAPIManager::GetAPI). Before the first model is created, this file re-registers "device_api.cpu"
 * (override) with a DeviceAPI that forwards to TVM's own CPU API, except on a thread that is inside
 * edgecc_model_run of a model with an arena: there, data space and workspace come from the arena (a
 * first-fit allocator over the caller's buffer), and an arena that is too small makes the run fail with
 * EDGECC_ERR_OUT_OF_MEMORY. Such a model's VM uses the naive allocator (the pooled one
 * keeps blocks process-wide, beyond the life of a caller's buffer).
 */

#include "edgecc_model.h"

#include <dlpack/dlpack.h>

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>
#include <tvm/runtime/device_api.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ffi = tvm::ffi;

// Linked-in data of an `--emit static` build (edgecc_model_data.S); absent (NULL) otherwise.
extern "C" {
__attribute__((weak)) extern const char edgecc_linked_meta;
__attribute__((weak)) extern const char edgecc_linked_meta_end;
__attribute__((weak)) extern const unsigned char edgecc_linked_params;
__attribute__((weak)) extern const unsigned char edgecc_linked_params_end;
}

namespace {

#if defined(__x86_64__)
constexpr const char* kArch = "x86_64";
#elif defined(__aarch64__)
constexpr const char* kArch = "aarch64";
#elif defined(__riscv) && __riscv_xlen == 64
constexpr const char* kArch = "riscv64";
#else
constexpr const char* kArch = "unknown";
#endif

constexpr DLDevice kCPU{kDLCPU, 0};
constexpr size_t kAlign = 64;  // alignment TVM kernels assume for tensor data

thread_local std::string g_error;

struct ApiError {
  edgecc_status status;
  std::string message;
};

[[noreturn]] void Fail(edgecc_status status, const std::string& message) { throw ApiError{status, message}; }

std::string OneLine(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  }
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

edgecc_status SetError(edgecc_status status, const std::string& message) {
  g_error = OneLine(message);
  return status;
}

/*! \brief Run `body`, turning every exception into a status and message. */
template <typename F>
edgecc_status Guard(F&& body) {
  try {
    body();
    g_error.clear();
    return EDGECC_OK;
  } catch (const ApiError& e) {
    return SetError(e.status, e.message);
  } catch (const ffi::Error& e) {
    return SetError(EDGECC_ERR_RUNTIME, "TVM runtime: " + std::string(e.kind()) + ": " + std::string(e.message()));
  } catch (const std::bad_alloc&) {
    return SetError(EDGECC_ERR_OUT_OF_MEMORY, "out of memory");
  } catch (const std::exception& e) {
    return SetError(EDGECC_ERR_RUNTIME, e.what());
  } catch (...) {
    return SetError(EDGECC_ERR_RUNTIME, "unknown error");
  }
}

// ---------------------------------------------------------------------------------------------
// SHA-256 (FIPS 180-4), to check params.bin / model.so against the manifest
// ---------------------------------------------------------------------------------------------

class Sha256 {
 public:
  void Update(const uint8_t* data, size_t n) {
    total_ += n;
    if (fill_ > 0) {
      size_t take = std::min(n, size_t(64) - fill_);
      std::memcpy(buf_ + fill_, data, take);
      fill_ += take, data += take, n -= take;
      if (fill_ < 64) return;
      Block(buf_);
      fill_ = 0;
    }
    for (; n >= 64; data += 64, n -= 64) Block(data);
    std::memcpy(buf_, data, n);
    fill_ = n;
  }
  std::string HexDigest() {
    uint64_t bits = total_ * 8;
    uint8_t pad[72] = {0x80};
    size_t padlen = (fill_ < 56 ? 56 : 120) - fill_;
    for (int i = 0; i < 8; ++i) pad[padlen + i] = static_cast<uint8_t>(bits >> (56 - 8 * i));
    Update(pad, padlen + 8);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (uint32_t v : h_) {
      for (int s = 28; s >= 0; s -= 4) out += hex[(v >> s) & 15];
    }
    return out;
  }

 private:
  static uint32_t Rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void Block(const uint8_t* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i) {
      w[i] = (uint32_t(p[4 * i]) << 24) | (uint32_t(p[4 * i + 1]) << 16) | (uint32_t(p[4 * i + 2]) << 8) |
             uint32_t(p[4 * i + 3]);
    }
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = Rotr(w[i - 15], 7) ^ Rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = Rotr(w[i - 2], 17) ^ Rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = h + (Rotr(e, 6) ^ Rotr(e, 11) ^ Rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (Rotr(a, 2) ^ Rotr(a, 13) ^ Rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h_[0] += a, h_[1] += b, h_[2] += c, h_[3] += d, h_[4] += e, h_[5] += f, h_[6] += g, h_[7] += h;
  }
  uint32_t h_[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  uint8_t buf_[64];
  size_t fill_ = 0;
  uint64_t total_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Caller-provided arena: a CPU DeviceAPI that serves a model's run from the caller's buffer
// ---------------------------------------------------------------------------------------------

/*! \brief A first-fit allocator over the caller's buffer, with its block table sized once (set_arena), so
 *  that nothing in it allocates from the heap.
 *
 *  Live blocks never overlap, so a pointer names one block: a free is never ambiguous, even for blocks
 *  freed late (the Relax VM keeps its last return value, the previous run's outputs, until the next call
 *  returns; those blocks stay live across runs and the allocator works around them). */
struct Arena {
  uint8_t* base = nullptr;  // first 64-byte aligned byte of the caller's buffer
  size_t size = 0;          // usable bytes from base
  size_t high = 0;          // highest end of a block since set_arena
  size_t allocations = 0;   // blocks handed out since set_arena
  size_t stray_frees = 0;   // frees of pointers in the buffer that name no live block (never expected)
  struct Block {
    size_t begin, end;
  };
  std::vector<Block> blocks;  // live blocks sorted by begin; capacity fixed at set_arena
  // the first request that did not fit (reported by edgecc_model_run)
  bool overflow = false;
  size_t failed_bytes = 0, failed_live = 0;

  bool Owns(const void* p) const {
    auto* b = static_cast<const uint8_t*>(p);
    return base != nullptr && b >= base && b < base + size;
  }
  size_t LiveBytes() const {
    size_t n = 0;
    for (const Block& b : blocks) n += b.end - b.begin;
    return n;
  }
  void* Alloc(size_t nbytes, size_t alignment) {
    if (alignment < kAlign) alignment = kAlign;
    size_t need = (nbytes + kAlign - 1) / kAlign * kAlign;
    if (need == 0) need = kAlign;
    size_t pos = 0, start = 0;
    for (; pos < blocks.size(); ++pos) {  // the first gap that fits
      if (start + need <= blocks[pos].begin) break;
      start = (blocks[pos].end + alignment - 1) / alignment * alignment;
    }
    if (start + need > size || need < nbytes || blocks.size() == blocks.capacity()) {
      if (!overflow) overflow = true, failed_bytes = nbytes, failed_live = LiveBytes();
      TVM_FFI_THROW(RuntimeError) << "edgecc arena exhausted: " << nbytes << " bytes requested, " << LiveBytes()
                                  << " of " << size << " in use";
    }
    blocks.insert(blocks.begin() + static_cast<std::ptrdiff_t>(pos), Block{start, start + need});
    if (start + need > high) high = start + need;
    ++allocations;
    return base + start;
  }
  void Free(void* p) {
    size_t offset = static_cast<size_t>(static_cast<uint8_t*>(p) - base);
    auto it = std::lower_bound(blocks.begin(), blocks.end(), offset,
                               [](const Block& b, size_t off) { return b.begin < off; });
    if (it == blocks.end() || it->begin != offset) {
      ++stray_frees;
      return;
    }
    blocks.erase(it);
  }
};

thread_local Arena* t_arena = nullptr;  // the arena of the model whose run is on this thread
std::mutex g_arenas_mutex;
std::vector<Arena*> g_arenas;  // every arena set on a model (frees may come from any thread)

Arena* OwnerOf(const void* p) {
  if (t_arena != nullptr && t_arena->Owns(p)) return t_arena;
  std::lock_guard<std::mutex> lock(g_arenas_mutex);
  for (Arena* a : g_arenas) {
    if (a->Owns(p)) return a;
  }
  return nullptr;
}

class ArenaCpuDeviceAPI final : public tvm::runtime::DeviceAPI {
 public:
  explicit ArenaCpuDeviceAPI(tvm::runtime::DeviceAPI* cpu) : cpu_(cpu) {}
  using tvm::runtime::DeviceAPI::AllocDataSpace;
  using tvm::runtime::DeviceAPI::CopyDataFromTo;

  void SetDevice(DLDevice dev) final { cpu_->SetDevice(dev); }
  void GetAttr(DLDevice dev, tvm::runtime::DeviceAttrKind kind, ffi::Any* rv) final { cpu_->GetAttr(dev, kind, rv); }
  void* AllocDataSpace(DLDevice dev, size_t nbytes, size_t alignment, DLDataType type_hint) final {
    if (t_arena != nullptr) return t_arena->Alloc(nbytes, alignment);
    return cpu_->AllocDataSpace(dev, nbytes, alignment, type_hint);
  }
  void FreeDataSpace(DLDevice dev, void* ptr) final {
    if (Arena* a = OwnerOf(ptr)) return a->Free(ptr);
    cpu_->FreeDataSpace(dev, ptr);
  }
  void* AllocWorkspace(DLDevice dev, size_t nbytes, DLDataType type_hint) final {
    if (t_arena != nullptr) return t_arena->Alloc(nbytes, tvm::runtime::kTempAllocaAlignment);
    return cpu_->AllocWorkspace(dev, nbytes, type_hint);
  }
  void FreeWorkspace(DLDevice dev, void* ptr) final {
    if (Arena* a = OwnerOf(ptr)) return a->Free(ptr);
    cpu_->FreeWorkspace(dev, ptr);
  }
  void StreamSync(DLDevice, TVMStreamHandle) final {}
  bool SupportsDevicePointerArithmeticsOnHost() final { return true; }

 protected:
  void CopyDataFromTo(const void* from, size_t from_offset, void* to, size_t to_offset, size_t size, DLDevice,
                      DLDevice, DLDataType, TVMStreamHandle) final {
    std::memcpy(static_cast<char*>(to) + to_offset, static_cast<const char*>(from) + from_offset, size);
  }

 private:
  tvm::runtime::DeviceAPI* cpu_;
};

struct ArenaHook {
  bool active = false;
  std::string why_not;  // when not active
};

/*! \brief Put ArenaCpuDeviceAPI in front of TVM's CPU DeviceAPI (once per process). */
const ArenaHook& InstallArenaHook() {
  static const ArenaHook hook = [] {
    ArenaHook h;
    try {
      ffi::Optional<ffi::Function> factory = ffi::Function::GetGlobal("device_api.cpu");
      if (!factory.has_value()) {
        h.why_not = "the TVM runtime registers no device_api.cpu (is libtvm_runtime linked with --no-as-needed?)";
        return h;
      }
      auto* cpu = static_cast<tvm::runtime::DeviceAPI*>((*factory)().cast<void*>());
      // never destroyed: TVM's DeviceAPIs live until the process exits
      static auto* api = new ArenaCpuDeviceAPI(cpu);
      ffi::Function::SetGlobal(
          "device_api.cpu", ffi::Function::FromTyped([]() -> void* { return static_cast<void*>(api); }),
          /*override=*/true);
      // DeviceAPIManager caches the first answer: if someone fetched the CPU API before us, ours is not used
      if (tvm::runtime::DeviceAPI::Get(kCPU) == api) {
        h.active = true;
      } else {
        h.why_not = "the TVM runtime looked up its CPU DeviceAPI before the first edgecc model was created "
                    "(DeviceAPIManager caches it), so allocations cannot be redirected to an arena";
      }
    } catch (const std::exception& e) {
      h.why_not = std::string("cannot hook the TVM CPU DeviceAPI: ") + e.what();
    }
    return h;
  }();
  return hook;
}

/*! \brief Takes `arena` (may be null) out of the registry when it goes out of scope. */
class ArenaRegistration {
 public:
  explicit ArenaRegistration(Arena* arena) : arena_(arena) {}
  ~ArenaRegistration() {
    if (arena_ == nullptr) return;
    std::lock_guard<std::mutex> lock(g_arenas_mutex);
    g_arenas.erase(std::remove(g_arenas.begin(), g_arenas.end(), arena_), g_arenas.end());
  }
  ArenaRegistration(const ArenaRegistration&) = delete;
  ArenaRegistration& operator=(const ArenaRegistration&) = delete;

 private:
  Arena* arena_;
};

/*! \brief Makes `arena` the one this thread's CPU allocations come from, for the guard's scope. */
class ArenaScope {
 public:
  explicit ArenaScope(Arena* arena) : saved_(t_arena) { t_arena = arena; }
  ~ArenaScope() { t_arena = saved_; }
  ArenaScope(const ArenaScope&) = delete;
  ArenaScope& operator=(const ArenaScope&) = delete;

 private:
  Arena* saved_;
};

// ---------------------------------------------------------------------------------------------
// Aligned heap buffers and files
// ---------------------------------------------------------------------------------------------

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
using AlignedBuffer = std::unique_ptr<uint8_t, AlignedFree>;

/*! \brief 64-byte aligned memory; what lies on whole 2 MiB pages inside it asks Linux for huge pages.
 *
 * The weights (params.bin, read into one such buffer) are streamed once per decode step: with 4 KiB pages
 * that is a TLB miss every few rows of a GEMV. Most distributions set THP to `madvise`, so ask for it before
 * the first write (as the Python loader does, edgecc/runtime_bridge/weight_memory.py). Only the 2 MiB-aligned
 * interior is advised: aligning the allocation itself would cost up to 2 MiB of heap per buffer, and the
 * manifest's memory plan is exact.
 */
AlignedBuffer AllocAligned(size_t nbytes) {
  size_t rounded = (nbytes + kAlign - 1) / kAlign * kAlign;
  void* p = std::aligned_alloc(kAlign, rounded == 0 ? kAlign : rounded);
  if (p == nullptr) Fail(EDGECC_ERR_OUT_OF_MEMORY, "out of memory allocating " + std::to_string(nbytes) + " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHugePage - 1) & ~(kHugePage - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(p) + rounded) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advisory only
#endif
  return AlignedBuffer(static_cast<uint8_t*>(p));
}

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};

/*! \brief Read a whole file into a 64-byte aligned buffer, hashing it on the way. */
AlignedBuffer ReadFile(const std::string& path, size_t* size, std::string* sha256) {
  std::unique_ptr<std::FILE, FileCloser> f(std::fopen(path.c_str(), "rb"));
  if (!f) Fail(EDGECC_ERR_IO, "cannot open " + path + ": " + std::strerror(errno));
  if (std::fseek(f.get(), 0, SEEK_END) != 0) Fail(EDGECC_ERR_IO, "cannot seek in " + path);
  long end = std::ftell(f.get());
  if (end < 0) Fail(EDGECC_ERR_IO, "cannot read " + path);
  std::rewind(f.get());
  size_t n = static_cast<size_t>(end);
  AlignedBuffer buf = AllocAligned(n + 1);
  if (n > 0 && std::fread(buf.get(), 1, n, f.get()) != n) Fail(EDGECC_ERR_IO, "error reading " + path);
  buf.get()[n] = 0;
  if (sha256 != nullptr) {
    Sha256 h;
    h.Update(buf.get(), n);
    *sha256 = h.HexDigest();
  }
  *size = n;
  return buf;
}

/*! \brief Tensor allocator: a view into memory owned elsewhere (kept alive by `owner`). */
struct ViewAlloc {
  std::shared_ptr<void> owner;
  void AllocData(DLTensor* t, void* data) { t->data = data; }
  void FreeData(DLTensor*) {}
};

/*! \brief Tensor allocator: 64-byte aligned heap memory owned by the tensor. */
struct HeapAlloc {
  void AllocData(DLTensor* t) {
    size_t nbytes = ffi::GetDataSize(*t);
    size_t rounded = (nbytes + kAlign - 1) / kAlign * kAlign;
    t->data = std::aligned_alloc(kAlign, rounded == 0 ? kAlign : rounded);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

// ---------------------------------------------------------------------------------------------
// JSON (manifest.json, or its linked-in subset)
// ---------------------------------------------------------------------------------------------

ffi::Any Field(const ffi::Any& obj, const char* key, const std::string& where) {
  auto map = obj.as<ffi::Map<ffi::Any, ffi::Any>>();
  if (!map.has_value()) Fail(EDGECC_ERR_FORMAT, where + ": expected an object holding '" + key + "'");
  auto it = map->find(ffi::String(key));
  if (it == map->end()) Fail(EDGECC_ERR_FORMAT, where + ": missing '" + key + "'");
  return (*it).second;
}

bool HasField(const ffi::Any& obj, const char* key) {
  auto map = obj.as<ffi::Map<ffi::Any, ffi::Any>>();
  return map.has_value() && map->find(ffi::String(key)) != map->end();
}

std::string Str(const ffi::Any& v, const std::string& where) {
  auto s = v.as<ffi::String>();
  if (!s.has_value()) Fail(EDGECC_ERR_FORMAT, where + ": expected a string");
  return std::string(*s);
}

int64_t Int(const ffi::Any& v, const std::string& where) {
  auto i = v.as<int64_t>();
  if (!i.has_value()) Fail(EDGECC_ERR_FORMAT, where + ": expected an integer");
  return *i;
}

ffi::Array<ffi::Any> Arr(const ffi::Any& v, const std::string& where) {
  auto a = v.as<ffi::Array<ffi::Any>>();
  if (!a.has_value()) Fail(EDGECC_ERR_FORMAT, where + ": expected an array");
  return *a;
}

struct TensorSpec {
  std::string name, dtype_name;
  DLDataType dtype;
  std::vector<int64_t> shape;
  size_t elem_bytes = 0, nbytes = 0;

  void Fill(edgecc_tensor_info* info) const {
    info->name = name.c_str();
    info->dtype = dtype_name.c_str();
    info->elem_bytes = elem_bytes;
    info->ndim = shape.size();
    info->shape = shape.data();
    info->nbytes = nbytes;
  }
};

std::vector<TensorSpec> ParseSignature(const ffi::Any& list, const std::string& where) {
  std::vector<TensorSpec> out;
  for (const ffi::Any& item : Arr(list, where)) {
    TensorSpec t;
    t.name = Str(Field(item, "name", where), where + " name");
    std::string w = where + " '" + t.name + "'";
    t.dtype_name = Str(Field(item, "dtype", w), w + " dtype");
    try {
      t.dtype = ffi::StringToDLDataType(t.dtype_name == "bool" ? "bool" : t.dtype_name);
    } catch (const std::exception&) {
      Fail(EDGECC_ERR_FORMAT, w + ": unknown dtype '" + t.dtype_name + "'");
    }
    t.elem_bytes = (static_cast<size_t>(t.dtype.bits) * t.dtype.lanes + 7) / 8;
    size_t count = 1;
    for (const ffi::Any& d : Arr(Field(item, "shape", w), w + " shape")) {
      auto dim = d.as<int64_t>();
      if (!dim.has_value() || *dim < 0) {
        Fail(EDGECC_ERR_FORMAT, w + ": symbolic or negative dim (build with --dim NAME=SIZE)");
      }
      t.shape.push_back(*dim);
      count *= static_cast<size_t>(*dim);
    }
    t.nbytes = count * t.elem_bytes;
    out.push_back(std::move(t));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// params.bin (format: edgecc/runtime_bridge/params_file.py)
// ---------------------------------------------------------------------------------------------

class HeaderReader {
 public:
  HeaderReader(const uint8_t* data, size_t size, std::string where) : data_(data), size_(size), where_(std::move(where)) {}
  template <typename T>
  T Read() {
    Need(sizeof(T));
    T value;
    std::memcpy(&value, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }
  std::string ReadString() {
    uint32_t n = Read<uint32_t>();
    Need(n);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return s;
  }

 private:
  void Need(size_t n) {
    if (n > size_ - pos_) Fail(EDGECC_ERR_FORMAT, where_ + " is truncated (header runs past the end)");
  }
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  std::string where_;
};

std::vector<ffi::Tensor> ParseParams(const uint8_t* data, size_t size, const std::shared_ptr<void>& owner,
                                     const std::string& where) {
  if (size < 16 || std::memcmp(data, "EDGECCP1", 8) != 0) {
    Fail(EDGECC_ERR_FORMAT, where + " is not an edgecc params file (bad magic)");
  }
  HeaderReader reader(data + 8, size - 8, where);
  uint64_t count = reader.Read<uint64_t>();
  if (count > size / 16) Fail(EDGECC_ERR_FORMAT, where + ": implausible tensor count");
  std::vector<ffi::Tensor> params;
  params.reserve(count);
  for (uint64_t i = 0; i < count; ++i) {
    std::string name = reader.ReadString();
    std::string dtype_name = reader.ReadString();
    DLDataType dtype;
    try {
      dtype = ffi::StringToDLDataType(dtype_name);
    } catch (const std::exception&) {
      Fail(EDGECC_ERR_FORMAT, where + " tensor '" + name + "': unknown dtype '" + dtype_name + "'");
    }
    uint32_t ndim = reader.Read<uint32_t>();
    if (ndim > 32) Fail(EDGECC_ERR_FORMAT, where + " tensor '" + name + "': implausible rank");
    std::vector<int64_t> shape(ndim);
    for (auto& d : shape) d = reader.Read<int64_t>();
    uint64_t offset = reader.Read<uint64_t>();
    uint64_t nbytes = reader.Read<uint64_t>();
    if (offset > size || nbytes > size - offset) {
      Fail(EDGECC_ERR_FORMAT, where + " is truncated (tensor '" + name + "' runs past the end)");
    }
    if (offset % kAlign != 0) Fail(EDGECC_ERR_FORMAT, where + ": tensor '" + name + "' is not 64-byte aligned");
    uint64_t expect = (dtype.bits * uint64_t(dtype.lanes) + 7) / 8;
    for (int64_t d : shape) {
      if (d < 0) Fail(EDGECC_ERR_FORMAT, where + ": tensor '" + name + "' has a negative dim");
      expect *= static_cast<uint64_t>(d);
    }
    if (expect != nbytes) {
      Fail(EDGECC_ERR_FORMAT, where + ": tensor '" + name + "' has " + std::to_string(nbytes) +
                                  " bytes, its shape and dtype need " + std::to_string(expect));
    }
    params.push_back(ffi::Tensor::FromNDAlloc(ViewAlloc{owner}, ffi::ShapeView(shape.data(), ndim), dtype, kCPU,
                                              const_cast<uint8_t*>(data + offset)));
  }
  return params;
}

ffi::Function Require(const ffi::Module& mod, const std::string& name, const std::string& where) {
  ffi::Optional<ffi::Function> f = mod->GetFunction(name, /*query_imports=*/true);
  if (!f.has_value()) Fail(EDGECC_ERR_FORMAT, where + " has no function '" + name + "'");
  return *f;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

struct edgecc_model {
  ffi::Optional<ffi::Module> lib;  // keeps the kernels loaded while the VM lives
  ffi::Optional<ffi::Module> vm;
  ffi::Function entry;
  std::vector<TensorSpec> inputs, outputs;
  std::vector<ffi::Tensor> input_tensors;  // what a run passes: the model's own buffer, or a caller's (bound)
  std::vector<ffi::Tensor> input_buffers;  // the model's own input buffers (edgecc_model_set_input copies here)
  std::vector<bool> input_set;
  bool inputs_any_alignment = false;       // manifest signature.input_alignment == "element"
  std::vector<ffi::Tensor> params;
  std::vector<ffi::Tensor> results;
  bool has_results = false;
  edgecc_memory_info memory{};
  std::string entry_name;
  int64_t arena_need = -1;    // bytes a caller's arena needs (manifest), -1: unknown (dynamic shapes)
  int64_t arena_blocks = 0;   // storage blocks of the entry function (manifest)
  std::unique_ptr<Arena> arena;  // the caller's buffer, when edgecc_model_set_arena gave one

  ~edgecc_model() {
    // tensors in the arena go back to it while it is still registered
    ArenaRegistration registration(arena.get());
    results.clear();
    entry = ffi::Function();
    vm = ffi::Optional<ffi::Module>();
  }
};

namespace {

constexpr int kNaiveAllocator = 1;   // memory::AllocatorType::kNaive
constexpr int kPooledAllocator = 2;  // memory::AllocatorType::kPooled

/*! \brief A fresh VM for the model's library: CPU 0 with `allocator`. Pooled: after the first run, storage
 *  comes from TVM's process-wide pool. Naive: every block is allocated and freed (used with an arena, whose
 *  blocks must not outlive the caller's buffer in a shared pool). */
void MakeVM(edgecc_model* m, int allocator) {
  m->results.clear();
  m->has_results = false;
  m->entry = ffi::Function();
  m->vm = ffi::Optional<ffi::Module>();
  ffi::Module vm = Require(*m->lib, "vm_load_executable", "the model")().cast<ffi::Module>();
  Require(vm, "vm_initialization", "the model")(static_cast<int>(kDLCPU), 0, allocator);
  m->entry = Require(vm, m->entry_name, "the model");
  m->vm = vm;
}

/*! \brief Everything but the library: signature, memory figures, params, VM. */
void Init(edgecc_model* m, const ffi::Any& meta, const std::string& where) {
  std::string arch = Str(Field(Field(meta, "target", where), "arch", where + " target"), where + " target.arch");
  if (arch != kArch) {
    Fail(EDGECC_ERR_TARGET_MISMATCH, where + ": the artifact is built for " + arch + " (target '" +
                                         Str(Field(Field(meta, "target", where), "name", where), where) +
                                         "'), this program runs on " + kArch);
  }
  ffi::Any built = Field(Field(meta, "signature", where), "built", where + " signature");
  m->inputs = ParseSignature(Field(built, "inputs", where), where + " input");
  m->outputs = ParseSignature(Field(built, "outputs", where), where + " output");
  std::string entry = HasField(meta, "entry") ? Str(Field(meta, "entry", where), where + " entry") : "main";

  ffi::Any memory = Field(meta, "memory", where);
  m->memory.weights_bytes = static_cast<uint64_t>(Int(Field(memory, "weights_bytes", where), where));
  ffi::Any arena = Field(memory, "arena_bytes", where);
  if (HasField(arena, entry.c_str())) m->memory.arena_bytes = static_cast<uint64_t>(Int(Field(arena, entry.c_str(), where), where));
  if (HasField(meta, "deliverables")) {
    ffi::Any d = Field(meta, "deliverables", where);
    if (HasField(d, "memory") && HasField(Field(d, "memory", where), "workspace_bytes")) {
      auto ws = Field(Field(d, "memory", where), "workspace_bytes", where).as<int64_t>();  // null: sized at run time
      if (ws.has_value()) m->memory.workspace_bytes = static_cast<uint64_t>(*ws);
    }
  }
  ffi::Any sig = Field(meta, "signature", where);
  m->inputs_any_alignment = HasField(sig, "input_alignment") &&
                            Str(Field(sig, "input_alignment", where), where + " input_alignment") == "element";
  for (const TensorSpec& t : m->inputs) {
    m->input_buffers.push_back(
        ffi::Tensor::FromNDAlloc(HeapAlloc(), ffi::ShapeView(t.shape.data(), t.shape.size()), t.dtype, kCPU));
    m->input_tensors.push_back(m->input_buffers.back());
    m->input_set.push_back(false);
    m->memory.io_bytes += t.nbytes;
  }
  for (const TensorSpec& t : m->outputs) m->memory.io_bytes += t.nbytes;
  m->entry_name = entry;
  if (HasField(meta, "deliverables") && HasField(Field(meta, "deliverables", where), "memory")) {
    ffi::Any d = Field(Field(meta, "deliverables", where), "memory", where);
    if (HasField(d, "arena_run_bytes")) {
      auto need = Field(d, "arena_run_bytes", where).as<int64_t>();  // null with dynamic shapes
      if (need.has_value()) m->arena_need = *need;
    }
    if (HasField(d, "arena_blocks")) m->arena_blocks = Int(Field(d, "arena_blocks", where), where);
  }
  MakeVM(m, kPooledAllocator);
}

std::string ParamsSha(const ffi::Any& meta, const std::string& where, int64_t* bytes) {
  ffi::Any files = Field(meta, "files", where);
  ffi::Any p = Field(files, "params.bin", where + " files");
  *bytes = Int(Field(p, "bytes", where), where);
  return Str(Field(p, "sha256", where), where);
}

/*! \brief Load params.bin from a file, checking size and sha256 against `meta`. */
void LoadParamsFile(edgecc_model* m, const std::string& path, const ffi::Any& meta, const std::string& where) {
  int64_t want_bytes = 0;
  std::string want = ParamsSha(meta, where, &want_bytes);
  size_t size = 0;
  std::string sha;
  AlignedBuffer buf = ReadFile(path, &size, &sha);
  if (static_cast<int64_t>(size) != want_bytes || sha != want) {
    Fail(EDGECC_ERR_HASH_MISMATCH, path + " does not match the manifest (sha256 " + sha.substr(0, 12) + "..., " +
                                       std::to_string(size) + " bytes; expected " + want.substr(0, 12) + "..., " +
                                       std::to_string(want_bytes) + " bytes): corrupted or from another build");
  }
  std::shared_ptr<void> owner(buf.release(), AlignedFree());
  m->params = ParseParams(static_cast<const uint8_t*>(owner.get()), size, owner, path);
}

ffi::Any ParseJson(const std::string& text, const std::string& where) {
  ffi::String err;
  ffi::Any value = ffi::json::Parse(ffi::String(text), &err);
  if (!err.empty()) Fail(EDGECC_ERR_FORMAT, where + " is not valid JSON: " + std::string(err));
  return value;
}

void CheckFileHash(const std::string& path, const ffi::Any& meta, const char* name, const std::string& where) {
  ffi::Any files = Field(meta, "files", where);
  if (!HasField(files, name)) return;
  ffi::Any f = Field(files, name, where);
  size_t size = 0;
  std::string sha;
  ReadFile(path, &size, &sha);
  if (sha != Str(Field(f, "sha256", where), where) || static_cast<int64_t>(size) != Int(Field(f, "bytes", where), where)) {
    Fail(EDGECC_ERR_HASH_MISMATCH, path + " does not match the manifest sha256 (corrupted or replaced)");
  }
}

void Flatten(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto t = value.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (const auto* arr = value.as<ffi::ArrayObj>()) {
    for (const ffi::Any& item : *arr) Flatten(item, out);
  } else {
    Fail(EDGECC_ERR_RUNTIME, "the model returned a " + value.GetTypeKey() + ", which the C API cannot return");
  }
}

edgecc_status CheckModel(const edgecc_model* model) {
  if (model == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "model is NULL");
  return EDGECC_OK;
}

/*! \brief EDGECC_ERR_INDEX unless index < count ("input"/"output" names the kind in the message). */
edgecc_status CheckIndex(size_t index, size_t count, const char* kind) {
  if (index < count) return EDGECC_OK;
  return SetError(EDGECC_ERR_INDEX, std::string(kind) + " index " + std::to_string(index) +
                                        " out of range (the model has " + std::to_string(count) + " " + kind + "s)");
}

/*! \brief Bytes a bound input's address must be a multiple of: the element size when the kernels load inputs at
 *  any element alignment (manifest signature.input_alignment "element"), else the 64 TVM assumes. */
size_t InputAlignment(const edgecc_model* model, size_t index) {
  size_t elem = model->inputs[index].elem_bytes;
  return model->inputs_any_alignment ? (elem == 0 ? 1 : elem) : kAlign;
}

/*! \brief The checks set_input and bind_input share: index, data pointer, byte size. */
edgecc_status CheckInputData(const edgecc_model* model, size_t index, const void* data, size_t nbytes) {
  if (CheckIndex(index, model->inputs.size(), "input") != EDGECC_OK) return EDGECC_ERR_INDEX;
  const TensorSpec& t = model->inputs[index];
  if (data == nullptr && t.nbytes > 0) return SetError(EDGECC_ERR_NULL_POINTER, "data is NULL");
  if (nbytes != t.nbytes) {
    return SetError(EDGECC_ERR_SIZE, "input " + std::to_string(index) + " ('" + t.name + "', " + t.dtype_name +
                                         ") takes " + std::to_string(t.nbytes) + " bytes, got " +
                                         std::to_string(nbytes));
  }
  return EDGECC_OK;
}

}  // namespace

extern "C" {

const char* edgecc_last_error(void) { return g_error.c_str(); }

const char* edgecc_status_name(edgecc_status status) {
  switch (status) {
    case EDGECC_OK: return "EDGECC_OK";
    case EDGECC_ERR_NULL_POINTER: return "EDGECC_ERR_NULL_POINTER";
    case EDGECC_ERR_INDEX: return "EDGECC_ERR_INDEX";
    case EDGECC_ERR_SIZE: return "EDGECC_ERR_SIZE";
    case EDGECC_ERR_IO: return "EDGECC_ERR_IO";
    case EDGECC_ERR_FORMAT: return "EDGECC_ERR_FORMAT";
    case EDGECC_ERR_HASH_MISMATCH: return "EDGECC_ERR_HASH_MISMATCH";
    case EDGECC_ERR_TARGET_MISMATCH: return "EDGECC_ERR_TARGET_MISMATCH";
    case EDGECC_ERR_NOT_LINKED: return "EDGECC_ERR_NOT_LINKED";
    case EDGECC_ERR_STATE: return "EDGECC_ERR_STATE";
    case EDGECC_ERR_RUNTIME: return "EDGECC_ERR_RUNTIME";
    case EDGECC_ERR_OUT_OF_MEMORY: return "EDGECC_ERR_OUT_OF_MEMORY";
    case EDGECC_ERR_ALIGNMENT: return "EDGECC_ERR_ALIGNMENT";
  }
  return "EDGECC_ERR_UNKNOWN";
}

edgecc_status edgecc_model_create(const char* artifact_dir, edgecc_model** out) {
  if (out == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "out is NULL");
  *out = nullptr;
  if (artifact_dir == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "artifact_dir is NULL");
  InstallArenaHook();  // before the TVM runtime first looks up its CPU DeviceAPI
  std::unique_ptr<edgecc_model> m;
  edgecc_status st = Guard([&] {
    std::string dir(artifact_dir);
    std::string where = dir + "/manifest.json";
    size_t size = 0;
    AlignedBuffer text = ReadFile(where, &size, nullptr);
    ffi::Any meta = ParseJson(std::string(reinterpret_cast<const char*>(text.get()), size), where);
    std::string arch = Str(Field(Field(meta, "target", where), "arch", where), where);
    if (arch != kArch) {
      Fail(EDGECC_ERR_TARGET_MISMATCH, dir + " is built for " + arch + " (target '" +
                                           Str(Field(Field(meta, "target", where), "name", where), where) +
                                           "'), this program runs on " + kArch);
    }
    m.reset(new edgecc_model());
    std::string so = dir + "/model.so";
    CheckFileHash(so, meta, "model.so", where);  // before dlopen: a corrupted library could crash the loader
    LoadParamsFile(m.get(), dir + "/params.bin", meta, where);
    m->lib = ffi::Module::LoadFromFile(so);
    Init(m.get(), meta, where);
  });
  if (st == EDGECC_OK) *out = m.release();
  return st;
}

edgecc_status edgecc_model_create_linked(const char* params_path, edgecc_model** out) {
  if (out == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "out is NULL");
  *out = nullptr;
  if (&edgecc_linked_meta == nullptr || &edgecc_linked_meta_end == nullptr) {
    return SetError(EDGECC_ERR_NOT_LINKED, "no model is linked into this program (link libedgecc_model.a of an "
                                           "`edgecc build --emit static` artifact, or use edgecc_model_create)");
  }
  InstallArenaHook();  // before the TVM runtime first looks up its CPU DeviceAPI
  std::unique_ptr<edgecc_model> m;
  edgecc_status st = Guard([&] {
    const std::string where = "linked model metadata";
    ffi::Any meta = ParseJson(std::string(&edgecc_linked_meta, &edgecc_linked_meta_end), where);
    m.reset(new edgecc_model());
    if (params_path != nullptr) {
      LoadParamsFile(m.get(), params_path, meta, where);
    } else {
      if (&edgecc_linked_params == nullptr || &edgecc_linked_params_end == nullptr) {
        Fail(EDGECC_ERR_NOT_LINKED, "the weights are not linked in (build with --embed-params), give params.bin");
      }
      size_t size = static_cast<size_t>(&edgecc_linked_params_end - &edgecc_linked_params);
      m->params = ParseParams(&edgecc_linked_params, size, nullptr, "linked params");
    }
    ffi::Optional<ffi::Function> syslib = ffi::Function::GetGlobal("ffi.SystemLib");
    if (!syslib.has_value()) Fail(EDGECC_ERR_RUNTIME, "the TVM runtime has no ffi.SystemLib (link libtvm_ffi)");
    m->lib = (*syslib)().cast<ffi::Module>();
    Init(m.get(), meta, where);
  });
  if (st == EDGECC_OK) *out = m.release();
  return st;
}

void edgecc_model_destroy(edgecc_model* model) {
  try {
    delete model;
  } catch (...) {
  }
}

edgecc_status edgecc_model_num_inputs(const edgecc_model* model, size_t* count) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  if (count == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "count is NULL");
  *count = model->inputs.size();
  return EDGECC_OK;
}

edgecc_status edgecc_model_num_outputs(const edgecc_model* model, size_t* count) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  if (count == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "count is NULL");
  *count = model->outputs.size();
  return EDGECC_OK;
}

edgecc_status edgecc_model_input_info(const edgecc_model* model, size_t index, edgecc_tensor_info* info) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  if (info == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "info is NULL");
  if (CheckIndex(index, model->inputs.size(), "input") != EDGECC_OK) return EDGECC_ERR_INDEX;
  model->inputs[index].Fill(info);
  return EDGECC_OK;
}

edgecc_status edgecc_model_output_info(const edgecc_model* model, size_t index, edgecc_tensor_info* info) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  if (info == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "info is NULL");
  if (CheckIndex(index, model->outputs.size(), "output") != EDGECC_OK) return EDGECC_ERR_INDEX;
  model->outputs[index].Fill(info);
  return EDGECC_OK;
}

edgecc_status edgecc_model_memory(const edgecc_model* model, edgecc_memory_info* info) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  if (info == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "info is NULL");
  *info = model->memory;
  return EDGECC_OK;
}

edgecc_status edgecc_model_set_input(edgecc_model* model, size_t index, const void* data, size_t nbytes) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  edgecc_status st = CheckInputData(model, index, data, nbytes);
  if (st != EDGECC_OK) return st;
  model->input_tensors[index] = model->input_buffers[index];  // a bound caller buffer is let go
  if (nbytes > 0) std::memcpy(model->input_tensors[index].data_ptr(), data, nbytes);
  model->input_set[index] = true;
  return EDGECC_OK;
}

edgecc_status edgecc_model_input_alignment(const edgecc_model* model, size_t index, size_t* bytes) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  if (bytes == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "bytes is NULL");
  if (CheckIndex(index, model->inputs.size(), "input") != EDGECC_OK) return EDGECC_ERR_INDEX;
  *bytes = InputAlignment(model, index);
  return EDGECC_OK;
}

edgecc_status edgecc_model_bind_input(edgecc_model* model, size_t index, const void* data, size_t nbytes) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  edgecc_status st = CheckInputData(model, index, data, nbytes);
  if (st != EDGECC_OK) return st;
  size_t align = InputAlignment(model, index);
  const TensorSpec& t = model->inputs[index];
  if (reinterpret_cast<uintptr_t>(data) % align != 0) {
    return SetError(EDGECC_ERR_ALIGNMENT,
                    "input " + std::to_string(index) + " ('" + t.name + "'): the address is not a multiple of " +
                        std::to_string(align) + " bytes, which this artifact's kernels need (" +
                        (model->inputs_any_alignment ? "the element size" : "manifest signature.input_alignment \"64\"") +
                        "): align the buffer, or copy it in with edgecc_model_set_input");
  }
  return Guard([&] {
    model->input_tensors[index] = ffi::Tensor::FromNDAlloc(
        ViewAlloc{nullptr}, ffi::ShapeView(t.shape.data(), t.shape.size()), t.dtype, kCPU, const_cast<void*>(data));
    model->input_set[index] = true;
  });
}

edgecc_status edgecc_model_run(edgecc_model* model) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  for (size_t i = 0; i < model->inputs.size(); ++i) {
    if (!model->input_set[i]) {
      return SetError(EDGECC_ERR_STATE, "input " + std::to_string(i) + " ('" + model->inputs[i].name +
                                            "') was never set (edgecc_model_set_input or edgecc_model_bind_input)");
    }
  }
  if (!model->vm.has_value()) return SetError(EDGECC_ERR_STATE, "the model has no VM (a failed edgecc_model_set_arena)");
  model->has_results = false;
  Arena* arena = model->arena.get();
  if (arena != nullptr) arena->overflow = false;
  edgecc_status st = Guard([&] {
    ArenaScope scope(arena);  // with an arena, every CPU allocation of this run comes from it
    model->results.clear();   // the last run's outputs (in the arena, when there is one)
    std::vector<ffi::AnyView> args;
    args.reserve(model->input_tensors.size() + model->params.size());
    for (const ffi::Tensor& t : model->input_tensors) args.emplace_back(t);
    for (const ffi::Tensor& t : model->params) args.emplace_back(t);
    ffi::Any result;
    model->entry.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    model->results.clear();
    Flatten(result, &model->results);
    if (model->results.size() != model->outputs.size()) {
      Fail(EDGECC_ERR_RUNTIME, "the model returned " + std::to_string(model->results.size()) + " tensors, the "
                               "manifest lists " + std::to_string(model->outputs.size()) + " outputs");
    }
    for (size_t i = 0; i < model->results.size(); ++i) {
      const ffi::Tensor& r = model->results[i];
      if (r.GetDLTensorPtr()->device.device_type != kDLCPU || !r.IsContiguous() || ffi::GetDataSize(*r.GetDLTensorPtr()) != model->outputs[i].nbytes) {
        Fail(EDGECC_ERR_RUNTIME, "output " + std::to_string(i) + " does not match the manifest (size, layout or device)");
      }
    }
    model->has_results = true;
  });
  if (st != EDGECC_OK && arena != nullptr && arena->overflow) {
    return SetError(EDGECC_ERR_OUT_OF_MEMORY,
                    "the arena is too small: " + std::to_string(arena->failed_bytes) + " bytes requested with " +
                        std::to_string(arena->failed_live) + " of " + std::to_string(arena->size) +
                        " bytes in use (edgecc_model_arena_bytes gives the size the build planned)");
  }
  return st;
}

edgecc_status edgecc_model_arena_bytes(const edgecc_model* model, size_t* bytes) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  if (bytes == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "bytes is NULL");
  if (model->arena_need < 0) {
    return SetError(EDGECC_ERR_STATE, "the artifact states no arena size (storage sized at run time, or built by an "
                                      "older edgecc): a caller-provided arena is not possible");
  }
  *bytes = static_cast<size_t>(model->arena_need) + kAlign;  // + slack to align an unaligned buffer
  return EDGECC_OK;
}

edgecc_status edgecc_model_set_arena(edgecc_model* model, void* buffer, size_t nbytes) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  if (buffer == nullptr && nbytes != 0) {
    return SetError(EDGECC_ERR_NULL_POINTER, "buffer is NULL (give NULL and 0 to let the runtime allocate again)");
  }
  size_t need = 0;
  if (buffer != nullptr) {
    edgecc_status st = edgecc_model_arena_bytes(model, &need);
    if (st != EDGECC_OK) return st;
    if (nbytes < need) {
      return SetError(EDGECC_ERR_SIZE, "the arena has " + std::to_string(nbytes) + " bytes, the model needs " +
                                           std::to_string(need) + " (edgecc_model_arena_bytes)");
    }
    const ArenaHook& hook = InstallArenaHook();
    if (!hook.active) return SetError(EDGECC_ERR_STATE, hook.why_not);
  }
  return Guard([&] {
    std::unique_ptr<Arena> fresh;
    if (buffer != nullptr) {
      fresh.reset(new Arena());
      auto addr = reinterpret_cast<uintptr_t>(buffer);
      size_t skip = static_cast<size_t>((kAlign - addr % kAlign) % kAlign);
      fresh->base = static_cast<uint8_t*>(buffer) + skip;
      fresh->size = nbytes - skip;
      // storage blocks of this run and of the previous run's outputs, plus nested kernel workspaces
      fresh->blocks.reserve(2 * static_cast<size_t>(model->arena_blocks) + 256);
      std::lock_guard<std::mutex> lock(g_arenas_mutex);
      g_arenas.push_back(fresh.get());
    }
    // the old VM and outputs go first (their blocks return to the old arena), then the old arena, also when
    // making the new VM fails
    std::unique_ptr<Arena> old = std::move(model->arena);
    ArenaRegistration old_registration(old.get());
    model->arena = std::move(fresh);
    MakeVM(model, model->arena ? kNaiveAllocator : kPooledAllocator);
  });
}

edgecc_status edgecc_model_arena_used(const edgecc_model* model, size_t* bytes) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  if (bytes == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "bytes is NULL");
  if (!model->arena) return SetError(EDGECC_ERR_STATE, "no arena is set (edgecc_model_set_arena)");
  *bytes = model->arena->high;
  return EDGECC_OK;
}

edgecc_status edgecc_model_output_data(const edgecc_model* model, size_t index, const void** data, size_t* nbytes) {
  if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
  if (data == nullptr || nbytes == nullptr) return SetError(EDGECC_ERR_NULL_POINTER, "data or nbytes is NULL");
  if (CheckIndex(index, model->outputs.size(), "output") != EDGECC_OK) return EDGECC_ERR_INDEX;
  if (!model->has_results) return SetError(EDGECC_ERR_STATE, "no outputs: edgecc_model_run has not succeeded yet");
  const DLTensor* dl = model->results[index].GetDLTensorPtr();
  *data = static_cast<const char*>(dl->data) + dl->byte_offset;
  *nbytes = model->outputs[index].nbytes;
  return EDGECC_OK;
}

edgecc_status edgecc_model_get_output(const edgecc_model* model, size_t index, void* data, size_t nbytes) {
  const void* src = nullptr;
  size_t have = 0;
  if (data == nullptr) {
    if (CheckModel(model) != EDGECC_OK) return EDGECC_ERR_NULL_POINTER;
    return SetError(EDGECC_ERR_NULL_POINTER, "data is NULL");
  }
  edgecc_status st = edgecc_model_output_data(model, index, &src, &have);
  if (st != EDGECC_OK) return st;
  if (nbytes != have) {
    const TensorSpec& t = model->outputs[index];
    return SetError(EDGECC_ERR_SIZE, "output " + std::to_string(index) + " ('" + t.name + "', " + t.dtype_name +
                                         ") has " + std::to_string(have) + " bytes, the buffer has " +
                                         std::to_string(nbytes));
  }
  if (have > 0) std::memcpy(data, src, have);
  return EDGECC_OK;
}

}  // extern "C"
