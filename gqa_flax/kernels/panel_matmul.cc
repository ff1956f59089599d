// y [m, n] = x [m, k] @ w [k, n], with w stored as column panels: panels [ceil(n/32), k, 32].
//
// A decode step multiplies a few rows (batch x 1 token) by every weight matrix, so its time is
// the time to stream the weights. In the panel layout each 32-column panel is one contiguous
// block read front to back, while a row-major [k, n] weight is read 128 bytes per row with a
// stride of n floats (XLA:CPU's products read it at a third to a half of the bandwidth; see
// scripts/bench_primitives.py). Each panel is multiplied by up to 8 rows at a time (16 of
// AVX-512's 32 vector registers hold the accumulators), and panels are shared out to XLA's
// intra-op threads. Written with GCC vector extensions (vec16.h), so it compiles for any
// target; `-march=native` picks the vector instructions.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel_for.h"
#include "vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;  // columns per panel: two 16-float vectors
constexpr int64_t kRows = 8;    // rows per register block
constexpr int64_t kMinChunkBytes = 256 << 10;  // of weights per scheduled task

// y[r, :cols] = x[r, :] @ panel for r < R; x rows have stride k, y rows stride n.
template <int R>
void RowBlock(const float* x, int64_t k, const float* panel, float* y, int64_t n, int64_t cols) {
  Vec16 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = Vec16{};
  for (int64_t i = 0; i < k; ++i) {
    const Vec16 w_lo = Load(panel + i * kPanel), w_hi = Load(panel + i * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const float xi = x[r * k + i];
      lo[r] += xi * w_lo;
      hi[r] += xi * w_hi;
    }
  }
  for (int r = 0; r < R; ++r) {
    float out[kPanel];
    Store(out, lo[r]);
    Store(out + 16, hi[r]);
    std::memcpy(y + r * n, out, cols * sizeof(float));
  }
}

using RowBlockFn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t);
constexpr RowBlockFn kRowBlocks[kRows + 1] = {nullptr, RowBlock<1>, RowBlock<2>, RowBlock<3>,
                                              RowBlock<4>, RowBlock<5>, RowBlock<6>,
                                              RowBlock<7>, RowBlock<8>};

// Panels [begin, end) of the product.
void Panels(const float* x, const float* panels, float* y, int64_t m, int64_t k, int64_t n,
            int64_t begin, int64_t end) {
  for (int64_t p = begin; p < end; ++p) {
    const int64_t cols = std::min(kPanel, n - p * kPanel);
    for (int64_t r = 0; r < m; r += kRows) {
      kRowBlocks[std::min(kRows, m - r)](x + r * k, k, panels + p * k * kPanel,
                                         y + r * n + p * kPanel, n, cols);
    }
  }
}

using Matrix = ffi::Buffer<ffi::F32, 2>;
using Panels3 = ffi::Buffer<ffi::F32, 3>;

ffi::Error PanelMatmul(ffi::ThreadPool pool, Matrix x, Panels3 panels, ffi::Result<Matrix> y) {
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1], n = y->dimensions()[1];
  const int64_t num_panels = panels.dimensions()[0];
  if (panels.dimensions()[1] != k || panels.dimensions()[2] != kPanel ||
      num_panels != (n + kPanel - 1) / kPanel || y->dimensions()[0] != m) {
    return ffi::Error::InvalidArgument(
        "panel_matmul: want x [m, k], panels [ceil(n/32), k, 32], y [m, n]");
  }
  // Chunks of whole panels: about 4 per thread, none under kMinChunkBytes of weights.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t min_chunk = std::max<int64_t>(1, kMinChunkBytes / (k * kPanel * 4));
  const int64_t chunk = std::max(min_chunk, (num_panels + 4 * threads - 1) / (4 * threads));
  ParallelFor(pool, (num_panels + chunk - 1) / chunk, [&](int64_t c) {
    Panels(x.typed_data(), panels.typed_data(), y->typed_data(), m, k, n, c * chunk,
           std::min(num_panels, (c + 1) * chunk));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaPanelMatmul, PanelMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Panels3>()
                                  .Ret<Matrix>());
