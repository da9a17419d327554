// Thin pybind11 module amphista_engine._C. It never links libtorch: tensors cross as raw device
// addresses (Python ints from tensor.data_ptr()), sizes, a dtype code and the CUDA stream handle
// (torch.cuda.current_stream().cuda_stream), so one build serves any torch on the same driver.
// Every argument is checked here, before any CUDA call: a bad pointer handed to a kernel is a
// sticky device fault that kills the whole CUDA context, so it must never reach the launch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "common.cuh"
#include "rmsnorm.cuh"

#ifndef AMPHISTA_CUDA_ARCHS
#define AMPHISTA_CUDA_ARCHS "unknown"
#endif

namespace py = pybind11;
using amphista::DType;

namespace {

[[noreturn]] void bad_arg(const char* name, const std::string& why) {
  throw py::value_error(std::string("amphista_engine._C: argument '") + name + "' " + why);
}

std::string show(const py::handle& o) { return py::repr(o).cast<std::string>(); }

// Python int (or anything with __index__, not bool) -> int64.
int64_t as_int(const py::handle& o, const char* name) {
  if (PyBool_Check(o.ptr())) bad_arg(name, "must be an int, got bool");
  py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(o.ptr()));
  if (!idx) { PyErr_Clear(); bad_arg(name, "must be an int, got " + show(o)); }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(idx.ptr(), &overflow);
  if (overflow != 0) bad_arg(name, "is out of the 64-bit range: " + show(o));
  return v;
}

// Device address or stream handle: a non-negative int of at most 64 bits.
uint64_t as_handle(const py::handle& o, const char* name, const char* example) {
  if (PyBool_Check(o.ptr())) bad_arg(name, "must be an int, got bool");
  py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(o.ptr()));
  if (!idx) { PyErr_Clear(); bad_arg(name, std::string("must be an int (") + example + "), got " + show(o)); }
  const unsigned long long v = PyLong_AsUnsignedLongLong(idx.ptr());
  if (PyErr_Occurred()) { PyErr_Clear(); bad_arg(name, "must be a non-negative 64-bit int, got " + show(o)); }
  return v;
}

void* as_device_ptr(const py::handle& o, const char* name, int64_t elem_size) {
  const uint64_t p = as_handle(o, name, "tensor.data_ptr()");
  if (p == 0) bad_arg(name, "is a null pointer");
  if (p % static_cast<uint64_t>(elem_size) != 0)
    bad_arg(name, "is not aligned to its " + std::to_string(elem_size) + "-byte element size");
  return reinterpret_cast<void*>(static_cast<uintptr_t>(p));
}

DType as_dtype(const py::handle& o) {
  const int64_t code = as_int(o, "dtype");
  if (!amphista::dtype_known(code))
    bad_arg("dtype", "is unknown code " + std::to_string(code) + " (0=float32, 1=float16, 2=bfloat16)");
  return static_cast<DType>(code);
}

void rmsnorm(py::object x_ptr, py::object w_ptr, py::object out_ptr, py::object rows_o, py::object d_o,
             py::object eps_o, py::object dtype_o, py::object stream_o) {
  const DType dtype = as_dtype(dtype_o);  // first: the pointer checks need the element size
  const int64_t esize = amphista::dtype_size(dtype);
  const int64_t rows = as_int(rows_o, "rows");
  const int64_t d = as_int(d_o, "d");
  if (rows <= 0) bad_arg("rows", "must be positive, got " + std::to_string(rows));
  if (d <= 0) bad_arg("d", "must be positive, got " + std::to_string(d));
  if (rows > std::numeric_limits<int32_t>::max())
    bad_arg("rows", "exceeds 2^31-1 (one CUDA block per row), got " + std::to_string(rows));
  if (d > std::numeric_limits<int64_t>::max() / esize / rows) bad_arg("d", "times rows overflows 64-bit bytes");
  const double eps = PyFloat_AsDouble(eps_o.ptr());
  if (PyErr_Occurred()) { PyErr_Clear(); bad_arg("eps", "must be a float, got " + show(eps_o)); }
  if (!std::isfinite(eps) || eps < 0 || eps > std::numeric_limits<float>::max())
    bad_arg("eps", "must be a finite float >= 0, got " + show(eps_o));
  const void* x = as_device_ptr(x_ptr, "x_ptr", esize);
  const void* w = as_device_ptr(w_ptr, "w_ptr", esize);
  void* out = as_device_ptr(out_ptr, "out_ptr", esize);
  const uint64_t stream_handle = as_handle(stream_o, "stream", "torch.cuda.current_stream().cuda_stream");
  auto stream = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream_handle));  // 0: legacy default

  cudaError_t err;
  {
    py::gil_scoped_release nogil;  // a launch can block when the stream's queue is full
    err = amphista::rmsnorm(x, w, out, rows, d, static_cast<float>(eps), dtype, stream);
  }
  if (err != cudaSuccess) amphista::throw_cuda_error(err, "rmsnorm kernel launch", __FILE__, __LINE__);
}

std::string version_string(int v) { return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "amphista-engine CUDA kernels (raw device pointers; no libtorch dependency)";

  m.def("rmsnorm", &rmsnorm, py::arg("x_ptr"), py::arg("w_ptr"), py::arg("out_ptr"), py::arg("rows"),
        py::arg("d"), py::arg("eps"), py::arg("dtype"), py::arg("stream"),
        "out[r,:] = x[r,:] * rsqrt(mean(x[r,:]^2) + eps) * w for contiguous rows x d; dtype code "
        "0=float32, 1=float16, 2=bfloat16 for x, w and out; out may equal x. Raises ValueError for "
        "a bad argument, RuntimeError for a CUDA launch error.");

  // CUDA runtime this module carries (static cudart, so fixed at build time), e.g. "13.0".
  m.def("cuda_version", [] {
    int v = 0;
    AMPHISTA_CUDA_CHECK(cudaRuntimeGetVersion(&v));
    return version_string(v);
  });

  // Newest CUDA version the installed driver supports, or None without a driver.
  m.def("driver_version", []() -> py::object {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess || v == 0) return py::none();
    return py::str(version_string(v));
  });

  // CMAKE_CUDA_ARCHITECTURES the module was compiled for, e.g. ["80", "90"].
  m.def("built_archs", [] {
    std::vector<std::string> out;
    std::stringstream ss(AMPHISTA_CUDA_ARCHS);
    for (std::string item; std::getline(ss, item, ',');)
      if (!item.empty()) out.push_back(item);
    return out;
  });
}
