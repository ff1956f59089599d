// 16-float vectors (GCC vector extensions: one AVX-512 register with -march=native on this
// machine, split into narrower registers on other targets) and unaligned loads and stores.
#ifndef GQA_FLAX_KERNELS_VEC16_H_
#define GQA_FLAX_KERNELS_VEC16_H_

#include <cstring>

typedef float Vec16 __attribute__((vector_size(64)));

inline Vec16 Load(const float* p) { Vec16 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void Store(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }

#endif  // GQA_FLAX_KERNELS_VEC16_H_
