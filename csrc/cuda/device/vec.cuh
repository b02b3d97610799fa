// 16-byte vectors of storage elements, moved as one load or store.
#pragma once

#include <cstring>

namespace imbsam::cuda {

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T val[V];
};

// 16-byte accesses through uint4, which the compiler keeps as one ld/st.global.v4: a
// plain Vec copy may be split into element loads once the values are used one by one
// (it was, for restore's source, in the PTX of nvcc 13.0).
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load16(const T* p) {
  static_assert(sizeof(Vec<T, V>) == sizeof(uint4), "16-byte vectors");
  const uint4 bits = *reinterpret_cast<const uint4*>(p);
  Vec<T, V> v;
  memcpy(&v, &bits, sizeof(v));
  return v;
}

template <typename T, int V>
__device__ __forceinline__ void store16(T* p, const Vec<T, V>& v) {
  uint4 bits;
  memcpy(&bits, &v, sizeof(bits));
  *reinterpret_cast<uint4*>(p) = bits;
}

}  // namespace imbsam::cuda
