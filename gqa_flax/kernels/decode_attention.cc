// One decode step's grouped-query attention, for every (sequence, K/V head) at once:
//   out[b, h, g, :] = softmax_t(query[b, h, g, :] . key[b, h, t, :] + bias[b, h, g, t])
//                     @ value[b, h, :, :]
// with query [batch, kv_heads, group, head_dim], key/value heads-major [batch, kv_heads,
// length, head_dim] (the decode caches as stored) and bias [batch, kv_heads, group, length].
// Each (b, h) reads its K and V once, front to back, for all `group` query heads that share
// them, so MQA's and GQA's smaller caches cost proportionally less time. (b, h) pairs are
// shared out to XLA's intra-op threads. No 1/sqrt(head_dim) scaling (T5 folds it into the
// query projection); the softmax subtracts the row maximum, as jax.nn.softmax does.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#include "vec16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
typedef int32_t Int16 __attribute__((vector_size(64)));

inline Vec16 Splat(float x) { return Vec16{} + x; }

// The sum of v's lanes, by halves (a short dependency chain).
inline float Sum(Vec16 v) {
  const Vec8 v8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 v4 = __builtin_shufflevector(v8, v8, 0, 1, 2, 3) +
                  __builtin_shufflevector(v8, v8, 4, 5, 6, 7);
  return (v4[0] + v4[2]) + (v4[1] + v4[3]);
}

// exp(x), Cephes' single-precision polynomial (relative error ~2e-7); 0 below -87.3.
inline Vec16 Exp(Vec16 x) {
  const Int16 underflow = x < Splat(-87.3f);
  x = x < Splat(-87.3f) ? Splat(-87.3f) : x;
  x = x > Splat(88.7f) ? Splat(88.7f) : x;
  Vec16 n = x * 1.44269504088896341f;
  n = (n + 12582912.0f) - 12582912.0f;  // round to nearest (|n| < 2^22)
  const Vec16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec16 p = Splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Int16 bits = (__builtin_convertvector(n, Int16) + 127) << 23;
  Vec16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? Splat(0.0f) : p * scale;
}

// Softmax over each of the `group` rows of `s` [group, length], in place.
void Softmax(float* s, int64_t group, int64_t length) {
  const int64_t vt = length / 16 * 16;
  for (int64_t g = 0; g < group; ++g) {
    float* row = s + g * length;
    const float max = *std::max_element(row, row + length);
    Vec16 total{};
    for (int64_t t = 0; t < vt; t += 16) {
      const Vec16 e = Exp(Load(row + t) - max);
      Store(row + t, e);
      total += e;
    }
    float sum = Sum(total);
    for (int64_t t = vt; t < length; ++t) {
      row[t] = Exp(Splat(row[t] - max))[0];
      sum += row[t];
    }
    const float inverse = 1.0f / sum;
    for (int64_t t = 0; t < length; ++t) row[t] *= inverse;
  }
}

// G query heads (sharing one K/V head) with head_dim 16 * DV; queries and outputs are held
// in registers while K, then V, stream past once. s: scratch [G, length].
template <int G, int DV>
void QueryBlock(const float* q, const float* k, const float* v, const float* bias, float* out,
                int64_t length, float* s) {
  constexpr int D = 16 * DV;
  Vec16 qv[G][DV];
  for (int g = 0; g < G; ++g) for (int j = 0; j < DV; ++j) qv[g][j] = Load(q + g * D + 16 * j);
  for (int64_t t = 0; t < length; ++t) {
    Vec16 kr[DV];
    for (int j = 0; j < DV; ++j) kr[j] = Load(k + t * D + 16 * j);
    for (int g = 0; g < G; ++g) {
      Vec16 acc = qv[g][0] * kr[0];
      for (int j = 1; j < DV; ++j) acc += qv[g][j] * kr[j];
      s[g * length + t] = Sum(acc) + bias[g * length + t];
    }
  }
  Softmax(s, G, length);
  Vec16 o[G][DV] = {};
  for (int64_t t = 0; t < length; ++t) {
    Vec16 vr[DV];
    for (int j = 0; j < DV; ++j) vr[j] = Load(v + t * D + 16 * j);
    for (int g = 0; g < G; ++g) {
      const float w = s[g * length + t];
      for (int j = 0; j < DV; ++j) o[g][j] += w * vr[j];
    }
  }
  for (int g = 0; g < G; ++g) for (int j = 0; j < DV; ++j) Store(out + g * D + 16 * j, o[g][j]);
}

using QueryBlockFn = void (*)(const float*, const float*, const float*, const float*, float*,
                              int64_t, float*);
constexpr int kMaxBlock = 6;  // query heads per block: G * DV accumulators fit 32 registers

template <int DV>
constexpr QueryBlockFn kBlocks[kMaxBlock + 1] = {
    nullptr, QueryBlock<1, DV>, QueryBlock<2, DV>, QueryBlock<3, DV>, QueryBlock<4, DV>,
    QueryBlock<5, DV>, QueryBlock<6, DV>};

QueryBlockFn Block(int64_t head_dim, int64_t g) {
  switch (head_dim) {
    case 16: return kBlocks<1>[g];
    case 32: return kBlocks<2>[g];
    case 64: return kBlocks<4>[g];
    default: return nullptr;
  }
}

using Tensor = ffi::Buffer<ffi::F32, 4>;

ffi::Error DecodeAttention(ffi::ThreadPool pool, Tensor query, Tensor key, Tensor value,
                           Tensor bias, ffi::Result<Tensor> out) {
  const auto q = query.dimensions(), k = key.dimensions(), b = bias.dimensions();
  const bool same_kv = std::equal(k.begin(), k.end(), value.dimensions().begin());
  if (k[0] != q[0] || k[1] != q[1] || k[3] != q[3] || !same_kv || b[0] != q[0] ||
      b[1] != q[1] || b[2] != q[2] || b[3] != k[2]) {
    return ffi::Error::InvalidArgument(
        "decode_attention: want query [b, h, g, d], key/value [b, h, t, d], bias [b, h, g, t]");
  }
  const int64_t group = q[2], length = k[2], d = q[3];
  if (Block(d, 1) == nullptr) {
    return ffi::Error::InvalidArgument("decode_attention: head_dim must be 16, 32 or 64");
  }
  // One (sequence, K/V head) pair per index; its query heads in blocks of up to kMaxBlock.
  ParallelFor(pool, q[0] * q[1], [&](int64_t pair) {
    thread_local std::vector<float> scores;
    scores.resize(std::min<int64_t>(group, kMaxBlock) * length);
    for (int64_t g = 0; g < group; g += kMaxBlock) {
      const int64_t rows = pair * group + g;  // first query head of the block
      Block(d, std::min<int64_t>(kMaxBlock, group - g))(
          query.typed_data() + rows * d, key.typed_data() + pair * length * d,
          value.typed_data() + pair * length * d, bias.typed_data() + rows * length,
          out->typed_data() + rows * d, length, scores.data());
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GqaDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Tensor>()
                                  .Arg<Tensor>()
                                  .Arg<Tensor>()
                                  .Arg<Tensor>()
                                  .Ret<Tensor>());
