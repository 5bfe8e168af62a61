/*
 * edgecc_runner: run one function of a compiled edgecc artifact (a Relax VM executable in a shared
 * library) with the TVM runtime alone, no Python.
 *
 *   edgecc_runner <model.so> <params.bin> <function> <out_dir> <in0.npy> [in1.npy ...]
 *
 * The function receives the user inputs first, then every tensor of params.bin in file order. Its
 * result (a tensor, or a possibly nested tuple of tensors and scalars) is flattened depth-first and
 * written as out_dir/out0.npy, out1.npy, ...
 *
 * On any error it prints one line, `edgecc_runner: <message>`, to stderr and exits with status 1
 * (2 for a usage error).
 *
 * It uses only the tvm_ffi C++ headers (the TVM wheel's own tvm/runtime headers are incomplete) and
 * links libtvm_runtime (which registers the Relax VM and its executable loader) and libtvm_ffi. It is
 * written to be the seed of edgecc's C API for firmware: the pieces are small functions that map
 * one-to-one onto that API (load model, bind params, set inputs, run, read outputs).
 *
 * Build (the cross compilers work the same way):
 *   g++ -std=c++17 -O2 runner.cc -I<tvm_ffi/include> -L<lib> -Wl,--no-as-needed -ltvm_runtime
 *       -ltvm_ffi -Wl,-rpath,<lib> -o edgecc_runner
 */

#include <dlpack/dlpack.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace edgecc {

// ---------------------------------------------------------------------------------------------
// Errors: everything the runner checks itself throws RunnerError; TVM throws ffi::Error.
// ---------------------------------------------------------------------------------------------

struct RunnerError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void Fail(const std::string& message) { throw RunnerError(message); }

/*! \brief Collapse a (possibly multi-line) message onto one line. */
std::string OneLine(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\r' || c == '\t') c = ' ';
  }
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

constexpr DLDevice kCPU{kDLCPU, 0};
// Alignment TVM's generated kernels assume for tensor data (kAllocAlignment).
constexpr size_t kAlign = 64;

// ---------------------------------------------------------------------------------------------
// Tensor storage
// ---------------------------------------------------------------------------------------------

/*! \brief Allocator for Tensor::FromNDAlloc: 64-byte aligned heap memory owned by the tensor. */
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t nbytes = ffi::GetDataSize(*t);
    size_t rounded = (nbytes + kAlign - 1) / kAlign * kAlign;
    t->data = std::aligned_alloc(kAlign, rounded == 0 ? kAlign : rounded);
    if (t->data == nullptr) Fail("out of memory allocating " + std::to_string(nbytes) + " bytes");
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

/*! \brief A file mapped copy-on-write into memory (params.bin). Kernels may not write through. */
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) Fail("cannot open " + path + ": " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      ::close(fd);
      Fail("cannot stat " + path + ": " + std::strerror(errno));
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      // MAP_PRIVATE + PROT_WRITE: a stray in-place write touches a private copy, never the file.
      void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        Fail("cannot mmap " + path + ": " + std::strerror(errno));
      }
      data_ = static_cast<uint8_t*>(p);
    }
    ::close(fd);
  }
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(data_, size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

/*! \brief Allocator for a zero-copy view into a mapped file; keeps the mapping alive. */
struct MappedViewAlloc {
  std::shared_ptr<MappedFile> file;
  void AllocData(DLTensor* t, void* data) { t->data = data; }
  void FreeData(DLTensor*) {}
};

// ---------------------------------------------------------------------------------------------
// params.bin (format: edgecc/runtime_bridge/params_file.py)
// ---------------------------------------------------------------------------------------------

/*! \brief Bounds-checked little-endian reader over the params.bin header. */
class HeaderReader {
 public:
  HeaderReader(const uint8_t* data, size_t size, std::string path)
      : data_(data), size_(size), path_(std::move(path)) {}

  template <typename T>
  T Read() {
    Need(sizeof(T));
    T value;
    std::memcpy(&value, data_ + pos_, sizeof(T));  // targets are little-endian, like the file
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
    if (pos_ + n > size_) Fail(path_ + " is truncated (header runs past the end of the file)");
  }
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  std::string path_;
};

DLDataType ParseDType(const std::string& name, const std::string& where) {
  try {
    return ffi::StringToDLDataType(name);
  } catch (const std::exception&) {
    Fail(where + ": unknown dtype '" + name + "'");
  }
}

/*! \brief Every tensor of params.bin, in file order, as views of the mapped file. */
std::vector<ffi::Tensor> LoadParams(const std::string& path) {
  auto file = std::make_shared<MappedFile>(path);
  if (file->size() < 16 || std::memcmp(file->data(), "EDGECCP1", 8) != 0) {
    Fail(path + " is not an edgecc params file (bad magic)");
  }
  HeaderReader reader(file->data() + 8, file->size() - 8, path);
  uint64_t count = reader.Read<uint64_t>();
  std::vector<ffi::Tensor> params;
  params.reserve(count);
  for (uint64_t i = 0; i < count; ++i) {
    std::string name = reader.ReadString();
    DLDataType dtype = ParseDType(reader.ReadString(), path + " tensor '" + name + "'");
    uint32_t ndim = reader.Read<uint32_t>();
    std::vector<int64_t> shape(ndim);
    for (auto& d : shape) d = reader.Read<int64_t>();
    uint64_t offset = reader.Read<uint64_t>();
    uint64_t nbytes = reader.Read<uint64_t>();
    if (offset > file->size() || nbytes > file->size() - offset) {
      Fail(path + " is truncated (tensor '" + name + "' runs past the end of the file)");
    }
    if (offset % kAlign != 0) Fail(path + ": tensor '" + name + "' is not 64-byte aligned");
    ffi::Tensor t = ffi::Tensor::FromNDAlloc(MappedViewAlloc{file}, ffi::ShapeView(shape.data(), ndim),
                                             dtype, kCPU, static_cast<void*>(file->data() + offset));
    if (ffi::GetDataSize(t) != nbytes) {
      Fail(path + ": tensor '" + name + "' has " + std::to_string(nbytes) +
           " bytes, its shape and dtype need " + std::to_string(ffi::GetDataSize(t)));
    }
    params.push_back(std::move(t));
  }
  return params;
}

// ---------------------------------------------------------------------------------------------
// .npy (format version 1.0-3.0, little-endian, C order)
// ---------------------------------------------------------------------------------------------

/*! \brief numpy descr ("<f4", "|b1", ...) -> DLDataType. */
DLDataType DTypeFromDescr(const std::string& descr, const std::string& path) {
  if (descr.size() < 3) Fail(path + ": unsupported dtype '" + descr + "'");
  char order = descr[0], kind = descr[1];
  int bytes = std::atoi(descr.c_str() + 2);
  if (order == '>') Fail(path + ": big-endian arrays are not supported (use '<' byte order)");
  if (bytes != 1 && bytes != 2 && bytes != 4 && bytes != 8) Fail(path + ": unsupported dtype '" + descr + "'");
  uint8_t bits = static_cast<uint8_t>(bytes * 8);
  switch (kind) {
    case 'f':
      if (bytes == 2 || bytes == 4 || bytes == 8) return DLDataType{kDLFloat, bits, 1};
      break;
    case 'i':
      return DLDataType{kDLInt, bits, 1};
    case 'u':
      return DLDataType{kDLUInt, bits, 1};
    case 'b':
      if (bytes == 1) return DLDataType{kDLBool, 8, 1};
      break;
    default:
      break;
  }
  Fail(path + ": unsupported dtype '" + descr + "'");
}

/*! \brief DLDataType -> numpy descr, for the outputs. */
std::string DescrFromDType(DLDataType t) {
  if (t.lanes != 1) Fail("cannot write a vector dtype (" + std::string(ffi::DLDataTypeToString(t)) + ") to .npy");
  switch (t.code) {
    case kDLFloat:
      if (t.bits == 16 || t.bits == 32 || t.bits == 64) return "<f" + std::to_string(t.bits / 8);
      break;
    case kDLInt:
      if (t.bits == 8) return "|i1";
      if (t.bits == 16 || t.bits == 32 || t.bits == 64) return "<i" + std::to_string(t.bits / 8);
      break;
    case kDLUInt:
      if (t.bits == 8) return "|u1";
      if (t.bits == 16 || t.bits == 32 || t.bits == 64) return "<u" + std::to_string(t.bits / 8);
      break;
    case kDLBool:
      if (t.bits == 8) return "|b1";
      break;
    default:
      break;
  }
  Fail("cannot write dtype " + std::string(ffi::DLDataTypeToString(t)) + " to .npy");
}

/*! \brief Value of key `key` in the npy header dict, as raw text (up to the next top-level comma). */
std::string HeaderField(const std::string& header, const std::string& key, const std::string& path) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) Fail(path + ": .npy header has no '" + key + "'");
  size_t colon = header.find(':', k);
  if (colon == std::string::npos) Fail(path + ": malformed .npy header");
  size_t begin = colon + 1, end = begin;
  int depth = 0;
  for (; end < header.size(); ++end) {
    char c = header[end];
    if (c == '(') ++depth;
    if (c == ')') --depth;
    if ((c == ',' && depth == 0) || c == '}') break;
  }
  std::string value = header.substr(begin, end - begin);
  size_t a = value.find_first_not_of(" '\""), b = value.find_last_not_of(" '\"");
  return a == std::string::npos ? std::string() : value.substr(a, b - a + 1);
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail("cannot open " + path);
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) Fail(path + " is not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t n;
    in.read(reinterpret_cast<char*>(&n), 2);
    header_len = n;
  } else {
    in.read(reinterpret_cast<char*>(&header_len), 4);
  }
  if (!in) Fail(path + ": truncated .npy header");
  std::string header(header_len, '\0');
  if (!in.read(&header[0], header_len)) Fail(path + ": truncated .npy header");

  DLDataType dtype = DTypeFromDescr(HeaderField(header, "descr", path), path);
  if (HeaderField(header, "fortran_order", path) != "False") {
    Fail(path + ": Fortran-order arrays are not supported (save with np.ascontiguousarray)");
  }
  std::string shape_text = HeaderField(header, "shape", path);  // "(2, 3)", "(4,)" or "()"
  std::vector<int64_t> shape;
  std::stringstream ss(shape_text.substr(1));
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t a = item.find_first_not_of(" )");
    if (a == std::string::npos) continue;
    shape.push_back(std::stoll(item.substr(a)));
  }

  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                           dtype, kCPU);
  size_t nbytes = ffi::GetDataSize(t);
  if (nbytes > 0 && !in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes))) {
    Fail(path + ": truncated .npy data (expected " + std::to_string(nbytes) + " bytes)");
  }
  return t;
}

void WriteNpyRaw(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape,
                 const void* data, size_t nbytes) {
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (";
  for (size_t i = 0; i < shape.size(); ++i) {
    dict += std::to_string(shape[i]) + (shape.size() == 1 ? ",)" : (i + 1 == shape.size() ? ")" : ", "));
  }
  if (shape.empty()) dict += ")";
  dict += ", }";
  // Version 1.0: magic(6) + version(2) + header_len(2) + header, padded so data starts 64-aligned.
  size_t total = 10 + dict.size() + 1;
  dict.append((kAlign - total % kAlign) % kAlign, ' ');
  dict += '\n';
  if (dict.size() > 65535) Fail("output shape too long for a .npy header");

  std::ofstream out(path, std::ios::binary);
  if (!out) Fail("cannot write " + path);
  uint16_t header_len = static_cast<uint16_t>(dict.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(reinterpret_cast<const char*>(&header_len), 2);
  out.write(dict.data(), static_cast<std::streamsize>(dict.size()));
  if (nbytes > 0) out.write(static_cast<const char*>(data), static_cast<std::streamsize>(nbytes));
  if (!out) Fail("error writing " + path);
}

void WriteNpy(const std::string& path, const ffi::Tensor& t) {
  const DLTensor* dl = t.GetDLTensorPtr();
  if (dl->device.device_type != kDLCPU) Fail("output is not on the CPU");
  if (!t.IsContiguous()) Fail("output tensor is not contiguous");
  std::vector<int64_t> shape(dl->shape, dl->shape + dl->ndim);
  const char* data = static_cast<const char*>(dl->data) + dl->byte_offset;
  WriteNpyRaw(path, DescrFromDType(dl->dtype), shape, data, ffi::GetDataSize(*dl));
}

// ---------------------------------------------------------------------------------------------
// Model: load the library, create the VM, run a function
// ---------------------------------------------------------------------------------------------

/*! \brief A Relax VM over one exported library. */
class Model {
 public:
  // Loading the .so runs the executable loader that libtvm_runtime registered
  // (ffi.Module.load_from_bytes.relax.VMExecutable) on the bytecode embedded in it.
  explicit Model(const std::string& path)
      : lib_(ffi::Module::LoadFromFile(path)),
        vm_(Require(lib_, "vm_load_executable", path)().cast<ffi::Module>()) {
    // One (device type, device id, allocator) triple: CPU 0 with the pooled allocator (naive is 1).
    constexpr int kPooledAllocator = 2;
    Require(vm_, "vm_initialization", path)(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  }

  /*! \brief Call `name` with the given arguments; returns what the function returns. */
  ffi::Any Call(const std::string& name, const std::vector<ffi::Tensor>& args) {
    ffi::Function f = Require(vm_, name, "the model");
    std::vector<ffi::AnyView> packed(args.begin(), args.end());
    ffi::Any result;
    f.CallPacked(packed.data(), static_cast<int32_t>(packed.size()), &result);
    return result;
  }

 private:
  static ffi::Function Require(const ffi::Module& mod, const std::string& name, const std::string& where) {
    ffi::Optional<ffi::Function> f = mod->GetFunction(name, /*query_imports=*/true);
    if (!f.has_value()) Fail(where + " has no function '" + name + "'");
    return *f;
  }

  ffi::Module lib_;  // keeps the kernels loaded while the VM lives
  ffi::Module vm_;
};

/*! \brief Flatten a returned value (tensor, scalar, or nested tuple) into out_dir/out<i>.npy. */
void WriteOutputs(const ffi::Any& value, const std::string& out_dir, int* index) {
  std::string path = out_dir + "/out" + std::to_string(*index) + ".npy";
  if (auto t = value.as<ffi::Tensor>()) {
    WriteNpy(path, *t);
    ++*index;
  } else if (const auto* arr = value.as<ffi::ArrayObj>()) {
    for (const ffi::Any& item : *arr) WriteOutputs(item, out_dir, index);
  } else if (auto shape = value.as<ffi::Shape>()) {
    std::vector<int64_t> dims(shape->begin(), shape->end());
    WriteNpyRaw(path, "<i8", {static_cast<int64_t>(dims.size())}, dims.data(), dims.size() * 8);
    ++*index;
  } else if (auto b = value.as<bool>()) {
    uint8_t v = *b ? 1 : 0;
    WriteNpyRaw(path, "|b1", {}, &v, 1);
    ++*index;
  } else if (auto i = value.as<int64_t>()) {
    int64_t v = *i;
    WriteNpyRaw(path, "<i8", {}, &v, 8);
    ++*index;
  } else if (auto d = value.as<double>()) {
    double v = *d;
    WriteNpyRaw(path, "<f8", {}, &v, 8);
    ++*index;
  } else {
    Fail("cannot write a result of type " + value.GetTypeKey());
  }
}

int Main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr,
                 "edgecc_runner: usage: edgecc_runner <model.so> <params.bin> <function> <out_dir> "
                 "[in0.npy ...]\n");
    return 2;
  }
  const std::string model_path = argv[1], params_path = argv[2], function = argv[3], out_dir = argv[4];

  std::vector<ffi::Tensor> args;
  for (int i = 5; i < argc; ++i) args.push_back(ReadNpy(argv[i]));
  for (ffi::Tensor& p : LoadParams(params_path)) args.push_back(std::move(p));

  Model model(model_path);
  ffi::Any result = model.Call(function, args);
  int count = 0;
  WriteOutputs(result, out_dir, &count);
  return 0;
}

}  // namespace edgecc

int main(int argc, char** argv) {
  try {
    return edgecc::Main(argc, argv);
  } catch (const tvm::ffi::Error& e) {
    std::fprintf(stderr, "edgecc_runner: %s: %s\n", e.kind().c_str(), edgecc::OneLine(e.message()).c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "edgecc_runner: %s\n", edgecc::OneLine(e.what()).c_str());
  }
  return 1;
}
