// Argument checks shared by every binding in bindings.cpp (host compiler only).
//
// Each helper converts one Python argument and raises ValueError("amphista_engine._C: argument 'name' ...")
// when it is unusable, so a wrong call names the argument instead of faulting the device later.
#pragma once

#include <pybind11/pybind11.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <sstream>
#include <string>

#include "common.cuh"

namespace amphista_bind {

namespace py = pybind11;
using amphista::DType;

[[noreturn]] inline void bad_arg(const char* name, const std::string& why) {
  throw py::value_error(std::string("amphista_engine._C: argument '") + name + "' " + why);
}

inline std::string show(const py::handle& o) { return py::repr(o).cast<std::string>(); }

// Python int (or anything with __index__, not bool) -> int64.
inline int64_t as_int(const py::handle& o, const char* name) {
  if (PyBool_Check(o.ptr())) bad_arg(name, "must be an int, got bool");
  py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(o.ptr()));
  if (!idx) { PyErr_Clear(); bad_arg(name, "must be an int, got " + show(o)); }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(idx.ptr(), &overflow);
  if (overflow != 0) bad_arg(name, "is out of the 64-bit range: " + show(o));
  return v;
}

inline int64_t as_int_in(const py::handle& o, const char* name, int64_t lo, int64_t hi) {
  const int64_t v = as_int(o, name);
  if (v < lo || v > hi)
    bad_arg(name, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::to_string(v));
  return v;
}

// A size: positive and at most 2^40. Two of them can already overflow int64 when multiplied, so checks on a
// product of sizes use product() below, never a raw `a * b * c` (which wrapped past the limit checks).
inline int64_t as_size(const py::handle& o, const char* name) {
  const int64_t v = as_int(o, name);
  if (v <= 0) bad_arg(name, "must be positive, got " + std::to_string(v));
  if (v > (int64_t(1) << 40)) bad_arg(name, "is implausibly large: " + std::to_string(v));
  return v;
}

// Product of non-negative sizes, saturated at INT64_MAX instead of overflowing: `product({a, b}) <= limit` is then
// a sound check (a raw product of sizes up to 2^40 could wrap to a small or negative value and pass it).
inline int64_t product(std::initializer_list<int64_t> factors) {
  int64_t out = 1;
  for (int64_t f : factors)
    if (__builtin_mul_overflow(out, f, &out)) return std::numeric_limits<int64_t>::max();
  return out;
}

// Element strides of a tensor view: a tuple/list of `n` non-negative ints (the last dim, always 1, is implied).
template <size_t n>
std::array<int64_t, n> as_strides(const py::handle& o, const char* name) {
  if (!py::isinstance<py::tuple>(o) && !py::isinstance<py::list>(o))
    bad_arg(name, "must be a tuple of " + std::to_string(n) + " element strides, got " + show(o));
  py::sequence seq = py::reinterpret_borrow<py::sequence>(o);
  if (seq.size() != n) bad_arg(name, "must hold " + std::to_string(n) + " strides, got " + show(o));
  std::array<int64_t, n> out{};
  for (size_t i = 0; i < n; ++i) {
    out[i] = as_int(seq[i], name);
    if (out[i] < 0 || out[i] > (int64_t(1) << 40)) bad_arg(name, "holds an invalid stride: " + show(o));
  }
  return out;
}

// Device address or stream handle: a non-negative int of at most 64 bits.
inline uint64_t as_handle(const py::handle& o, const char* name, const char* example) {
  if (PyBool_Check(o.ptr())) bad_arg(name, "must be an int, got bool");
  py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(o.ptr()));
  if (!idx) { PyErr_Clear(); bad_arg(name, std::string("must be an int (") + example + "), got " + show(o)); }
  const unsigned long long v = PyLong_AsUnsignedLongLong(idx.ptr());
  if (PyErr_Occurred()) { PyErr_Clear(); bad_arg(name, "must be a non-negative 64-bit int, got " + show(o)); }
  return v;
}

// Non-null device address aligned to `align` bytes (the element size, or 16 for vector-only kernels).
inline void* as_ptr(const py::handle& o, const char* name, int64_t align) {
  const uint64_t p = as_handle(o, name, "tensor.data_ptr()");
  if (p == 0) bad_arg(name, "is a null pointer");
  if (p % static_cast<uint64_t>(align) != 0)
    bad_arg(name, "is not aligned to " + std::to_string(align) + " bytes");
  return reinterpret_cast<void*>(static_cast<uintptr_t>(p));
}

// The same, but 0 (None not accepted: pass 0) means "absent".
inline void* as_opt_ptr(const py::handle& o, const char* name, int64_t align) {
  if (as_handle(o, name, "tensor.data_ptr() or 0") == 0) return nullptr;
  return as_ptr(o, name, align);
}

inline cudaStream_t as_stream(const py::handle& o) {
  const uint64_t h = as_handle(o, "stream", "torch.cuda.current_stream().cuda_stream");
  return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(h));  // 0: the legacy default stream
}

inline DType as_dtype(const py::handle& o, const char* name = "dtype") {
  const int64_t code = as_int(o, name);
  if (!amphista::dtype_known(code))
    bad_arg(name, "is unknown code " + std::to_string(code) + " (0=float32, 1=float16, 2=bfloat16)");
  return static_cast<DType>(code);
}

inline DType as_half_dtype(const py::handle& o, const char* name = "dtype") {
  const DType t = as_dtype(o, name);
  if (t == DType::kFloat32) bad_arg(name, "must be 1 (float16) or 2 (bfloat16) for tensor-core kernels, got 0 (float32)");
  return t;
}

// A finite float in [lo, hi]. Python ints are accepted.
inline float as_float(const py::handle& o, const char* name, double lo, double hi) {
  if (PyBool_Check(o.ptr())) bad_arg(name, "must be a float, got bool");
  const double v = PyFloat_AsDouble(o.ptr());
  if (PyErr_Occurred()) { PyErr_Clear(); bad_arg(name, "must be a float, got " + show(o)); }
  if (!std::isfinite(v) || v < lo || v > hi) {
    std::ostringstream range;
    range << "must be a finite float in [" << lo << ", " << hi << "], got " << show(o);
    bad_arg(name, range.str());
  }
  return static_cast<float>(v);
}

inline void require(bool ok, const char* name, const std::string& why) {
  if (!ok) bad_arg(name, why);
}

// Launch with the GIL released (a launch blocks when the stream's queue is full), then raise on failure.
template <typename F>
void launch(const char* what, F&& f) {
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = f();
  }
  if (err != cudaSuccess) amphista::throw_cuda_error(err, what, __FILE__, __LINE__);
}

}  // namespace amphista_bind
