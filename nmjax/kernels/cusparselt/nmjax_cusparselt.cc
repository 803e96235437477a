// XLA FFI handler for nmjax's "cusparselt" backend: one 2:4-sparse GEMM of a linear layer
// through NVIDIA cuSPARSELt, on XLA's stream, with XLA's scratch memory.
//
// Operands, all row-major as XLA holds them (W is the Flax kernel (in, out), already masked):
//   direction 0 (forward):    Y (rows, out) = X (rows, in) · W
//   direction 1 (input grad): dX (rows, in) = dY (rows, out) · Wᵀ
// Read column-major, the same memory is the transposed GEMM with W on the left, the only
// operand the sparse tensor cores can take sparse:
//   forward:    Yᵀ (out×rows) = Wᵀ (out×in, sparse along in)  · Xᵀ (in×rows)
//   input grad: dXᵀ (in×rows) = W (in×out, sparse along out)  · dYᵀ (out×rows)
// Both read W through one column-major (out×in) descriptor, op N (forward) or op T (input
// grad), so no transpose is materialised.
//
// Each call compresses W with cuSPARSELt's own compress (W changes every training step), then
// runs the matmul. Descriptors, plan and algorithm choice are cached per (device, direction,
// dtype, shape, search) for the life of the process; with search=true the first call of a
// shape runs cusparseLtMatmulSearch once. All device memory comes from XLA's scratch allocator.
//
// Build: nmjax/kernels/cusparselt/_build.py (g++ -std=c++17 -shared -fPIC, linking
// libcusparseLt.so.0 and libcudart).

#include <cuda_runtime_api.h>
#include <cusparseLt.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr uint32_t kAlignment = 16;  // bytes; XLA buffers are at least this aligned

const char* StatusName(cusparseStatus_t s) {
  switch (s) {
    case CUSPARSE_STATUS_SUCCESS: return "CUSPARSE_STATUS_SUCCESS";
    case CUSPARSE_STATUS_NOT_INITIALIZED: return "CUSPARSE_STATUS_NOT_INITIALIZED";
    case CUSPARSE_STATUS_ALLOC_FAILED: return "CUSPARSE_STATUS_ALLOC_FAILED";
    case CUSPARSE_STATUS_INVALID_VALUE: return "CUSPARSE_STATUS_INVALID_VALUE";
    case CUSPARSE_STATUS_ARCH_MISMATCH: return "CUSPARSE_STATUS_ARCH_MISMATCH";
    case CUSPARSE_STATUS_EXECUTION_FAILED: return "CUSPARSE_STATUS_EXECUTION_FAILED";
    case CUSPARSE_STATUS_INTERNAL_ERROR: return "CUSPARSE_STATUS_INTERNAL_ERROR";
    case CUSPARSE_STATUS_NOT_SUPPORTED: return "CUSPARSE_STATUS_NOT_SUPPORTED";
    case CUSPARSE_STATUS_INSUFFICIENT_RESOURCES:
      return "CUSPARSE_STATUS_INSUFFICIENT_RESOURCES";
    default: return "cusparseStatus_t";
  }
}

std::string Shape(int64_t a, int64_t b) {
  return "(" + std::to_string(a) + ", " + std::to_string(b) + ")";
}

struct Key {
  int device, direction, dtype;
  int64_t m, n, k;
  bool search;
  auto Tie() const { return std::tie(device, direction, dtype, m, n, k, search); }
  bool operator<(const Key& o) const { return Tie() < o.Tie(); }
};

struct Plan {
  cusparseLtHandle_t* handle = nullptr;
  cusparseLtMatDescriptor_t a{}, b{}, d{};
  cusparseLtMatmulDescriptor_t matmul{};
  cusparseLtMatmulAlgSelection_t alg{};
  cusparseLtMatmulPlan_t plan{};
  size_t workspace = 0, compressed = 0, compress_buffer = 0;
  int alg_id = -1;
  bool searched = false;
  std::mutex search_mu;  // the first search of a shape runs once
};

// Handles and plans live for the process, like cuBLAS's handle pool: a plan costs host time
// to build (and a search costs GPU time), so no call after the first of a shape pays it.
std::mutex g_mu;
std::map<int, std::unique_ptr<cusparseLtHandle_t>> g_handles;
std::map<Key, std::unique_ptr<Plan>> g_plans;

// Makes `device` current for the handler (launches need the stream's device current), then
// restores the caller's device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) status_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    if (previous_ >= 0 && status_ == cudaSuccess) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = -1;
  cudaError_t status_ = cudaSuccess;
};

#define NMJAX_CSLT_TRY(call)                                                          \
  do {                                                                                \
    cusparseStatus_t status_ = (call);                                                \
    if (status_ != CUSPARSE_STATUS_SUCCESS)                                           \
      return ffi::Error::Internal(std::string("cuSPARSELt ") + #call + " failed: " + \
                                  StatusName(status_) + " (" +                        \
                                  std::to_string(static_cast<int>(status_)) + ")" +   \
                                  context);                                           \
  } while (0)

ffi::Error GetHandle(int device, cusparseLtHandle_t** out, const std::string& context) {
  auto it = g_handles.find(device);
  if (it == g_handles.end()) {
    auto handle = std::make_unique<cusparseLtHandle_t>();
    NMJAX_CSLT_TRY(cusparseLtInit(handle.get()));
    it = g_handles.emplace(device, std::move(handle)).first;
  }
  *out = it->second.get();
  return ffi::Error::Success();
}

ffi::Error BuildPlan(const Key& key, Plan* p, const std::string& context) {
  const cudaDataType type = key.dtype == 0 ? CUDA_R_16BF : CUDA_R_16F;
  const auto col = CUSPARSE_ORDER_COL;
  // W as stored: (out×in) column-major; out = M (forward) or K (input grad).
  const int64_t n_out = key.direction == 0 ? key.m : key.k;
  const int64_t n_in = key.direction == 0 ? key.k : key.m;
  NMJAX_CSLT_TRY(cusparseLtStructuredDescriptorInit(p->handle, &p->a, n_out, n_in, n_out,
                                                    kAlignment, type, col,
                                                    CUSPARSELT_SPARSITY_50_PERCENT));
  NMJAX_CSLT_TRY(
      cusparseLtDenseDescriptorInit(p->handle, &p->b, key.k, key.n, key.k, kAlignment, type, col));
  NMJAX_CSLT_TRY(
      cusparseLtDenseDescriptorInit(p->handle, &p->d, key.m, key.n, key.m, kAlignment, type, col));
  const auto op_a =
      key.direction == 0 ? CUSPARSE_OPERATION_NON_TRANSPOSE : CUSPARSE_OPERATION_TRANSPOSE;
  NMJAX_CSLT_TRY(cusparseLtMatmulDescriptorInit(p->handle, &p->matmul, op_a,
                                                CUSPARSE_OPERATION_NON_TRANSPOSE, &p->a, &p->b,
                                                &p->d, &p->d, CUSPARSE_COMPUTE_32F));
  NMJAX_CSLT_TRY(cusparseLtMatmulAlgSelectionInit(p->handle, &p->alg, &p->matmul,
                                                  CUSPARSELT_MATMUL_ALG_DEFAULT));
  NMJAX_CSLT_TRY(cusparseLtMatmulPlanInit(p->handle, &p->plan, &p->matmul, &p->alg));
  return ffi::Error::Success();
}

// Sizes that the plan's algorithm choice may change (a search can pick split-K).
ffi::Error QuerySizes(Plan* p, const std::string& context) {
  NMJAX_CSLT_TRY(cusparseLtMatmulGetWorkspace(p->handle, &p->plan, &p->workspace));
  NMJAX_CSLT_TRY(
      cusparseLtSpMMACompressedSize(p->handle, &p->plan, &p->compressed, &p->compress_buffer));
  NMJAX_CSLT_TRY(cusparseLtMatmulAlgGetAttribute(p->handle, &p->alg,
                                                 CUSPARSELT_MATMUL_ALG_CONFIG_ID, &p->alg_id,
                                                 sizeof(p->alg_id)));
  return ffi::Error::Success();
}

ffi::Error GetPlan(const Key& key, Plan** out, const std::string& context) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_plans.find(key);
  if (it == g_plans.end()) {
    auto plan = std::make_unique<Plan>();
    if (auto e = GetHandle(key.device, &plan->handle, context); e.failure()) return e;
    if (auto e = BuildPlan(key, plan.get(), context); e.failure()) return e;
    if (auto e = QuerySizes(plan.get(), context); e.failure()) return e;
    it = g_plans.emplace(key, std::move(plan)).first;
  }
  *out = it->second.get();
  return ffi::Error::Success();
}

std::optional<void*> Scratch(ffi::ScratchAllocator& scratch, size_t bytes) {
  if (bytes == 0) return nullptr;
  return scratch.Allocate(bytes, 256);
}

ffi::Error Spmm(cudaStream_t stream, ffi::ScratchAllocator scratch, int32_t device,
                ffi::AnyBuffer w, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                int32_t direction, bool search) {
  const auto dtype = w.element_type();
  if (dtype != ffi::DataType::BF16 && dtype != ffi::DataType::F16)
    return ffi::Error::InvalidArgument("nmjax_cusparselt_spmm: w must be bf16 or f16");
  if (b.element_type() != dtype || out->element_type() != dtype)
    return ffi::Error::InvalidArgument("nmjax_cusparselt_spmm: operands and result must share "
                                       "w's dtype");
  if (direction != 0 && direction != 1)
    return ffi::Error::InvalidArgument("nmjax_cusparselt_spmm: direction must be 0 (forward) "
                                       "or 1 (input grad), got " + std::to_string(direction));
  const auto wd = w.dimensions(), bd = b.dimensions(), od = out->dimensions();
  if (wd.size() != 2 || bd.size() != 2 || od.size() != 2)
    return ffi::Error::InvalidArgument("nmjax_cusparselt_spmm: w, the dense operand and the "
                                       "result must be 2-D");
  const int64_t n_in = wd[0], n_out = wd[1], rows = bd[0];
  const int64_t k = direction == 0 ? n_in : n_out;  // contracted
  const int64_t m = direction == 0 ? n_out : n_in;  // result columns
  if (bd[1] != k || od[0] != rows || od[1] != m)
    return ffi::Error::InvalidArgument(
        "nmjax_cusparselt_spmm: w " + Shape(n_in, n_out) + ", dense operand " +
        Shape(bd[0], bd[1]) + ", result " + Shape(od[0], od[1]) + " do not fit direction " +
        std::to_string(direction) + " (forward: (rows, in)->(rows, out); input grad: "
        "(rows, out)->(rows, in))");

  const Key key{device, direction, dtype == ffi::DataType::BF16 ? 0 : 1, m, rows, k, search};
  const std::string context = " [nmjax_cusparselt_spmm direction " + std::to_string(direction) +
                              ", (M, N, K)=(" + std::to_string(m) + ", " +
                              std::to_string(rows) + ", " + std::to_string(k) + "), device " +
                              std::to_string(device) + "]";
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess)
    return ffi::Error::Internal(std::string("cudaSetDevice failed: ") +
                                cudaGetErrorString(guard.status()) + context);
  Plan* p = nullptr;
  if (auto e = GetPlan(key, &p, context); e.failure()) return e;

  const float alpha = 1.0f, beta = 0.0f;
  void* d_out = out->untyped_data();
  const void* d_b = b.untyped_data();
  std::optional<void*> compressed, compress_buffer, workspace;

  auto compress = [&]() -> ffi::Error {
    compressed = Scratch(scratch, p->compressed);
    compress_buffer = Scratch(scratch, p->compress_buffer);
    if (!compressed || !compress_buffer)
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "XLA scratch allocation for the compressed operand failed" + context);
    NMJAX_CSLT_TRY(cusparseLtSpMMACompress(p->handle, &p->plan, w.untyped_data(), *compressed,
                                           *compress_buffer, stream));
    return ffi::Error::Success();
  };
  if (auto e = compress(); e.failure()) return e;

  if (search) {
    std::lock_guard<std::mutex> lock(p->search_mu);
    if (!p->searched) {
      workspace = Scratch(scratch, p->workspace);
      if (!workspace)
        return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                          "XLA scratch allocation for the search workspace failed" + context);
      NMJAX_CSLT_TRY(cusparseLtMatmulSearch(p->handle, &p->plan, &alpha, *compressed, d_b,
                                            &beta, d_out, d_out, *workspace, &stream, 1));
      const size_t compressed_before = p->compressed;
      if (auto e = QuerySizes(p, context); e.failure()) return e;
      p->searched = true;
      // The compressed layout belongs to the plan: redo it if the choice changed its size.
      if (p->compressed != compressed_before)
        if (auto e = compress(); e.failure()) return e;
      workspace.reset();
    }
  }
  if (!workspace) workspace = Scratch(scratch, p->workspace);
  if (!workspace)
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "XLA scratch allocation for the matmul workspace failed" + context);
  NMJAX_CSLT_TRY(cusparseLtMatmul(p->handle, &p->plan, &alpha, *compressed, d_b, &beta, d_out,
                                  d_out, *workspace, &stream, 1));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NmjaxCusparseltSpmm, Spmm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()  // w (in, out), masked
                                  .Arg<ffi::AnyBuffer>()  // x (rows, in) or dy (rows, out)
                                  .Ret<ffi::AnyBuffer>()  // y (rows, out) or dx (rows, in)
                                  .Attr<int32_t>("direction")
                                  .Attr<bool>("search"));

// Host-side helpers for Python (ctypes); none touches a GPU.
extern "C" {

// The cuSPARSELt version this library was compiled against, major*10000 + minor*100 + patch
// (CUSPARSELT_VERSION's own encoding changed between releases).
int nmjax_cusparselt_header_version() {
  return CUSPARSELT_VER_MAJOR * 10000 + CUSPARSELT_VER_MINOR * 100 + CUSPARSELT_VER_PATCH;
}

// The version of the libcusparseLt.so.0 actually loaded, same encoding; -1 on failure.
int nmjax_cusparselt_runtime_version() {
  int major = 0, minor = 0, patch = 0;
  if (cusparseLtGetProperty(MAJOR_VERSION, &major) != CUSPARSE_STATUS_SUCCESS ||
      cusparseLtGetProperty(MINOR_VERSION, &minor) != CUSPARSE_STATUS_SUCCESS ||
      cusparseLtGetProperty(PATCH_LEVEL, &patch) != CUSPARSE_STATUS_SUCCESS)
    return -1;
  return major * 10000 + minor * 100 + patch;
}

// Number of cached plans (one per device, direction, dtype, shape and search flag).
int nmjax_cusparselt_plan_count() {
  std::lock_guard<std::mutex> lock(g_mu);
  return static_cast<int>(g_plans.size());
}

// One line per cached plan: "direction dtype M N K search alg_id workspace compressed".
// Writes at most `size` bytes (NUL-terminated) and returns the length it needed.
int nmjax_cusparselt_describe_plans(char* buffer, int size) {
  std::lock_guard<std::mutex> lock(g_mu);
  std::string text;
  for (const auto& [key, plan] : g_plans) {
    char line[256];
    std::snprintf(line, sizeof(line), "%d %s %lld %lld %lld %d %d %zu %zu\n", key.direction,
                  key.dtype == 0 ? "bfloat16" : "float16", static_cast<long long>(key.m),
                  static_cast<long long>(key.n), static_cast<long long>(key.k),
                  key.search ? 1 : 0, plan->alg_id, plan->workspace, plan->compressed);
    text += line;
  }
  if (buffer != nullptr && size > 0) {
    const size_t n = std::min(text.size(), static_cast<size_t>(size - 1));
    std::memcpy(buffer, text.data(), n);
    buffer[n] = '\0';
  }
  return static_cast<int>(text.size());
}

}  // extern "C"
