// Reader of the case files that tools/core_cases.py writes: one op's inputs, parameters, expected outputs and
// tolerances, from the Python reference backend, for the C++ checks of the torch-free core (core_check.cpp).
//
// Format (little-endian, one case per file, `<label>.case`):
//   magic   8 bytes "SLRCASE1"
//   op      u16 length + bytes (ASCII): the op whose checker runs the case, e.g. "rate_grad_"
//   count   u32: the number of arrays that follow
//   array   name   u16 length + bytes (ASCII)
//           dtype  u8 code (DType below)
//           ndim   u8, then ndim × i64 sizes
//           data   numel × itemsize bytes in C order (f16/bf16: their 16 bits)
// Array names: inputs as the op's arguments name them, the i-th tensor of a list as "<argument>.<i>"
// ("params.0", "params.1", …); scalar parameters as 0-d arrays ("nu"); the reference's output as
// "expected.<output>" and its tolerance as "tol.<output>", a 0-d f64 bounding ‖got − expected‖ / ‖expected‖
// (0: equal).
#pragma once
#include <algorithm>
#include <cstdint>
#include <fstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/portable.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "case files are read as little-endian memory");

namespace slimrate::tests {

enum class DType : uint8_t { u8, i8, u16, i16, u32, i32, u64, i64, f16, bf16, f32, f64 };

inline size_t itemsize(DType dtype) {
  static constexpr size_t kSizes[] = {1, 1, 2, 2, 4, 4, 8, 8, 2, 2, 4, 8};
  return kSizes[static_cast<int>(dtype)];
}

struct Array {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }

  // Element i as a double (exact for every dtype but 64-bit integers beyond 2^53).
  double value(int64_t i) const {
    const uint8_t* p = bytes.data() + i * itemsize(dtype);
    auto load = [p](auto tag) {
      decltype(tag) v;
      std::copy(p, p + sizeof v, reinterpret_cast<uint8_t*>(&v));
      return v;
    };
    switch (dtype) {
      case DType::u8: return load(uint8_t{});
      case DType::i8: return load(int8_t{});
      case DType::u16: return load(uint16_t{});
      case DType::i16: return load(int16_t{});
      case DType::u32: return load(uint32_t{});
      case DType::i32: return load(int32_t{});
      case DType::u64: return static_cast<double>(load(uint64_t{}));
      case DType::i64: return static_cast<double>(load(int64_t{}));
      case DType::f16: return f16_to_f32(load(uint16_t{}));
      case DType::bf16: return bf16_to_f32(load(uint16_t{}));
      case DType::f32: return load(float{});
      case DType::f64: return load(double{});
    }
    return 0.0;
  }

  // The elements as T, which the caller checked is the array's dtype.
  template <class T>
  const T* data() const {
    return reinterpret_cast<const T*>(bytes.data());
  }

  std::vector<double> values() const {
    std::vector<double> out(numel());
    for (int64_t i = 0; i < numel(); ++i) out[i] = value(i);
    return out;
  }
};

struct Case {
  std::string label;  // the file name without ".case"
  std::string op;
  std::vector<Array> arrays;

  const Array* find(const std::string& name) const {
    for (const Array& a : arrays)
      if (a.name == name) return &a;
    return nullptr;
  }

  const Array& get(const std::string& name) const {
    const Array* a = find(name);
    if (a == nullptr) throw std::runtime_error("no array named '" + name + "'");
    return *a;
  }

  // "<argument>.0", "<argument>.1", … up to the first index missing: a list argument.
  std::vector<const Array*> list(const std::string& argument) const {
    std::vector<const Array*> out;
    while (const Array* a = find(argument + "." + std::to_string(out.size()))) out.push_back(a);
    return out;
  }

  double scalar(const std::string& name) const {
    const Array& a = get(name);
    if (a.numel() != 1) throw std::runtime_error("'" + name + "': expected one value, got " +
                                                 std::to_string(a.numel()));
    return a.value(0);
  }
};

// Reads a case file; throws std::runtime_error saying what is wrong with it.
inline Case read_case(const std::string& path, const std::string& label) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  auto read = [&](void* dst, size_t n) {
    if (!in.read(static_cast<char*>(dst), static_cast<std::streamsize>(n)))
      throw std::runtime_error(path + ": truncated");
  };
  auto read_u = [&](auto tag) {
    decltype(tag) v;
    read(&v, sizeof v);
    return v;
  };
  auto read_string = [&]() {
    std::string s(read_u(uint16_t{}), '\0');
    read(s.data(), s.size());
    return s;
  };
  char magic[8];
  read(magic, sizeof magic);
  if (std::string(magic, sizeof magic) != "SLRCASE1") throw std::runtime_error(path + ": not a case file");
  Case c{label, read_string(), {}};
  uint32_t count = read_u(uint32_t{});
  for (uint32_t i = 0; i < count; ++i) {
    Array a;
    a.name = read_string();
    uint8_t code = read_u(uint8_t{});
    if (code > static_cast<uint8_t>(DType::f64))
      throw std::runtime_error(path + ": array '" + a.name + "' has unknown dtype code " + std::to_string(code));
    a.dtype = static_cast<DType>(code);
    a.shape.resize(read_u(uint8_t{}));
    for (int64_t& s : a.shape)
      if ((s = read_u(int64_t{})) < 0) throw std::runtime_error(path + ": array '" + a.name + "' has a negative size");
    a.bytes.resize(static_cast<size_t>(a.numel()) * itemsize(a.dtype));
    read(a.bytes.data(), a.bytes.size());
    c.arrays.push_back(std::move(a));
  }
  if (in.peek() != std::char_traits<char>::eof()) throw std::runtime_error(path + ": bytes after the last array");
  return c;
}

}  // namespace slimrate::tests
