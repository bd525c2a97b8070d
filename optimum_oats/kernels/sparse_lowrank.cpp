// CPU kernel for LinearSparseLowRank: y = x S^T + (x V^T) U^T + b, computed straight from the compact storage.
//
// S is read as stored: the kept values (row-major, 1-D) and the packed bitmask (1 bit per weight, little-endian
// within a byte). Only a per-row offset into the values (int64, out_features + 1) is derived at first use. Decode
// is bound by the bytes read, so the kernel never materialises S: each 16 (fp32) or 32 (bf16) columns of a row
// are expanded from the compressed values into a register with the mask bits (AVX-512 VEXPAND), then multiplied
// with the dense activations. Products are accumulated in fp32 for both dtypes. The low-rank term is fused:
// t = x V^T is computed first, then each output row adds U[row] . t before the single store.
//
// Without AVX-512 (F, BW, VBMI2, BF16) but with AVX2 + FMA, each 8 columns are expanded by one register permute
// whose indices come from a 256-entry table (the mask byte is the index), then masked with a second table: the same
// register-only work per 8 weights as VEXPAND. Without either, a portable path decodes each row into an fp32 scratch
// row (correct, slow: the Python side never picks it automatically).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI2__) && \
    defined(__AVX512BF16__)
#define OATS_AVX512 1
#define OATS_AVX2 0
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define OATS_AVX512 0
#define OATS_AVX2 1
#include <immintrin.h>
#else
#define OATS_AVX512 0
#define OATS_AVX2 0
#endif
// The 256-bit helpers (permute-table expansion): the AVX2 build's tiles, and the quantized-value tiles of both vector
// builds (an AVX-512 CPU runs them too; see "Quantized values" below).
#if defined(__AVX2__) && defined(__FMA__)
#define OATS_VEC256 1
#else
#define OATS_VEC256 0
#endif
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

constexpr int kRows = 4;    // output rows per register tile
constexpr int kTokens = 4;  // tokens per register tile

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Software prefetch of the next row tile's kept values, spread over the column steps of the current tile (a few
// lines per step) rather than issued in one burst: decode addresses depend on popcounts, so the hardware prefetcher
// alone leaves a tile latency-bound when it comes from DRAM, and a burst at the tile's start only queues behind
// itself. Measured on a 2-core Zen 3 (AVX2), 1536x576 fp32 at 45% density, DRAM-cold: 404 us without, 331 us with
// one burst, 187 us spread (dense GEMV: 356 us).
struct Prefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  int per_step = 0;
  __attribute__((always_inline)) inline void step() {
    if (next < end) {
      for (int i = 0; i < per_step; ++i) __builtin_prefetch(next + 64 * i);
      next += 64 * per_step;
    }
  }
  void drain() {  // everything left at once (paths that do not step)
    for (; next < end; next += 64) __builtin_prefetch(next);
  }
};

// Decode one row of S to a dense row in `dst` (zeros where pruned), one kept value at a time.
template <typename scalar_t>
inline void expand_row_scalar(const scalar_t* w, const uint8_t* mask, int64_t in_features, scalar_t* dst) {
  std::memset(dst, 0, static_cast<size_t>(in_features) * sizeof(scalar_t));
  for (int64_t byte = 0; byte * 8 < in_features; ++byte) {
    for (unsigned bits = mask[byte]; bits != 0; bits &= bits - 1) dst[byte * 8 + __builtin_ctz(bits)] = *w++;
  }
}

// `nbits` (<= 32) mask bits of a row starting at column `col` (a multiple of 8); bits past `in_features` are 0.
inline uint32_t mask_bits(const uint8_t* row, int64_t col, int64_t in_features, int nbits) {
  int64_t avail = in_features - col;
  int take = avail < nbits ? static_cast<int>(avail) : nbits;
  int bytes = (take + 7) / 8;
  uint32_t bits = 0;
  std::memcpy(&bits, row + col / 8, bytes);  // little-endian: byte 0 holds columns col..col+7
  return take >= 32 ? bits : bits & ((1u << take) - 1u);
}

#if OATS_AVX512

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// Mask bits of `nbits` columns from `col`: a fixed-size read on full chunks (inlined, no call that would spill the
// vector registers), the bounded read of mask_bits() only on the last partial chunk.
template <typename bits_t, bool FULL>
inline bits_t chunk_bits(const uint8_t* row, int64_t col, int64_t in_features) {
  if (FULL) {
    bits_t bits;
    std::memcpy(&bits, row + col / 8, sizeof(bits_t));
    return bits;
  }
  return static_cast<bits_t>(mask_bits(row, col, in_features, 8 * sizeof(bits_t)));
}

// One 16-column step of the fp32 tile: acc[r][t] += row_r[c:c+16] * x_t[c:c+16].
template <int R, int T, bool MASKED, bool FULL>
__attribute__((always_inline)) inline void step_f32(const float** wp, const uint8_t* const* mask, int64_t c,
                                                    int64_t in_features, const float* x, int64_t ldx, bool safe,
                                                    __m512 (&acc)[R][T]) {
  const __mmask16 tail = FULL ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (in_features - c)) - 1u);
  __m512 wv[R];
  for (int r = 0; r < R; ++r) {
    if (MASKED) {
      const __mmask16 m = chunk_bits<uint16_t, FULL>(mask[r], c, in_features);
      const int kept = __builtin_popcount(m);
      // Register-form expand after a load: the memory form of VEXPANDPS is microcoded (slow) on AMD. The full
      // 64-byte load may read past this row's values; `safe` says 16 more values exist, else it is masked.
      const __m512 packed =
          safe ? _mm512_loadu_ps(wp[r]) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << kept) - 1u), wp[r]);
      wv[r] = _mm512_maskz_expand_ps(m, packed);
      wp[r] += kept;
    } else {
      wv[r] = FULL ? _mm512_loadu_ps(wp[r] + c) : _mm512_maskz_loadu_ps(tail, wp[r] + c);
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m512 xv = FULL ? _mm512_loadu_ps(x + t * ldx + c) : _mm512_maskz_loadu_ps(tail, x + t * ldx + c);
    for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]);
  }
}

// out[r][t] = row_r . x_t over all columns (row_r of S, expanded from values + bitmask, or a dense row), fp32.
template <int R, int T, bool MASKED>
inline void tile_f32(const float* const* w, const uint8_t* const* mask, int64_t in_features, const float* x,
                     int64_t ldx, bool safe, Prefetch& pf, float out[kRows][kTokens]) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const float* wp[R];
  for (int r = 0; r < R; ++r) wp[r] = w[r];
  int64_t c = 0;
  for (; c + 16 <= in_features; c += 16) {
    if (MASKED) pf.step();
    step_f32<R, T, MASKED, true>(wp, mask, c, in_features, x, ldx, safe, acc);
  }
  if (c < in_features) step_f32<R, T, MASKED, false>(wp, mask, c, in_features, x, ldx, safe, acc);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r][t] = hsum(acc[r][t]);
}

// One 32-column step for bf16 storage: pairs multiplied and summed in fp32 by VDPBF16PS.
template <int R, int T, bool MASKED, bool FULL>
__attribute__((always_inline)) inline void step_bf16(const uint16_t** wp, const uint8_t* const* mask, int64_t c,
                                                     int64_t in_features, const uint16_t* x, int64_t ldx, bool safe,
                                                     __m512 (&acc)[R][T]) {
  const __mmask32 tail =
      FULL ? static_cast<__mmask32>(0xffffffffu) : static_cast<__mmask32>((1u << (in_features - c)) - 1u);
  __m512i wv[R];
  for (int r = 0; r < R; ++r) {
    if (MASKED) {
      const __mmask32 m = chunk_bits<uint32_t, FULL>(mask[r], c, in_features);
      const int kept = __builtin_popcount(m);
      const __mmask32 first = static_cast<__mmask32>(kept >= 32 ? 0xffffffffu : (1u << kept) - 1u);
      wv[r] = _mm512_maskz_expand_epi16(m, safe ? _mm512_loadu_si512(wp[r]) : _mm512_maskz_loadu_epi16(first, wp[r]));
      wp[r] += kept;
    } else {
      wv[r] = FULL ? _mm512_loadu_si512(wp[r] + c) : _mm512_maskz_loadu_epi16(tail, wp[r] + c);
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m512i xv = FULL ? _mm512_loadu_si512(x + t * ldx + c) : _mm512_maskz_loadu_epi16(tail, x + t * ldx + c);
    for (int r = 0; r < R; ++r)
      acc[r][t] = _mm512_dpbf16_ps(acc[r][t], reinterpret_cast<__m512bh>(wv[r]), reinterpret_cast<__m512bh>(xv));
  }
}

template <int R, int T, bool MASKED>
inline void tile_bf16(const uint16_t* const* w, const uint8_t* const* mask, int64_t in_features, const uint16_t* x,
                      int64_t ldx, bool safe, Prefetch& pf, float out[kRows][kTokens]) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const uint16_t* wp[R];
  for (int r = 0; r < R; ++r) wp[r] = w[r];
  int64_t c = 0;
  for (; c + 32 <= in_features; c += 32) {
    if (MASKED) pf.step();
    step_bf16<R, T, MASKED, true>(wp, mask, c, in_features, x, ldx, safe, acc);
  }
  if (c < in_features) step_bf16<R, T, MASKED, false>(wp, mask, c, in_features, x, ldx, safe, acc);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r][t] = hsum(acc[r][t]);
}

// Decode one row of S (values + mask bits) to a dense row in `dst`, for reuse across many tokens.
inline void expand_row(const float* w, const uint8_t* mask, int64_t in_features, bool safe, float* dst) {
  int64_t c = 0;
  for (; c + 16 <= in_features; c += 16) {
    const __mmask16 m = chunk_bits<uint16_t, true>(mask, c, in_features);
    const int kept = __builtin_popcount(m);
    const __m512 packed =
        safe ? _mm512_loadu_ps(w) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << kept) - 1u), w);
    _mm512_storeu_ps(dst + c, _mm512_maskz_expand_ps(m, packed));
    w += kept;
  }
  if (c < in_features) {
    const __mmask16 m = chunk_bits<uint16_t, false>(mask, c, in_features);
    const __m512 packed = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << __builtin_popcount(m)) - 1u), w);
    _mm512_mask_storeu_ps(dst + c, static_cast<__mmask16>((1u << (in_features - c)) - 1u),
                          _mm512_maskz_expand_ps(m, packed));
  }
}

inline void expand_row(const uint16_t* w, const uint8_t* mask, int64_t in_features, bool safe, uint16_t* dst) {
  int64_t c = 0;
  for (; c + 32 <= in_features; c += 32) {
    const __mmask32 m = chunk_bits<uint32_t, true>(mask, c, in_features);
    const int kept = __builtin_popcount(m);
    const __mmask32 first = static_cast<__mmask32>(kept >= 32 ? 0xffffffffu : (1u << kept) - 1u);
    const __m512i packed = safe ? _mm512_loadu_si512(w) : _mm512_maskz_loadu_epi16(first, w);
    _mm512_storeu_si512(dst + c, _mm512_maskz_expand_epi16(m, packed));
    w += kept;
  }
  if (c < in_features) {
    const __mmask32 m = chunk_bits<uint32_t, false>(mask, c, in_features);
    const __mmask32 first = static_cast<__mmask32>((1u << __builtin_popcount(m)) - 1u);
    _mm512_mask_storeu_epi16(dst + c, static_cast<__mmask32>((1u << (in_features - c)) - 1u),
                             _mm512_maskz_expand_epi16(m, _mm512_maskz_loadu_epi16(first, w)));
  }
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t left = n - i;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return hsum(acc);
}

inline float dot_bf16_f32(const uint16_t* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t left = n - i;
    const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
    const __m256i half = _mm256_maskz_loadu_epi16(m, a + i);
    const __m512 av = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    acc = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return hsum(acc);
}

#endif  // OATS_AVX512

#if OATS_VEC256

// For a mask byte b: the permute index of each lane (the rank of its bit among b's set bits) and an all-ones lane
// mask where b's bit is set; `prefix[n]` has its first n lanes set (masked loads of the last values of a row).
struct ExpandTable {
  alignas(32) int32_t index[256][8];
  alignas(32) int32_t keep[256][8];
  alignas(32) int32_t prefix[9][8];
  ExpandTable() {
    for (int b = 0; b < 256; ++b) {
      int k = 0;
      for (int i = 0; i < 8; ++i) {
        const bool set = (b >> i) & 1;
        index[b][i] = set ? k++ : 0;
        keep[b][i] = set ? -1 : 0;
      }
    }
    for (int n = 0; n <= 8; ++n)
      for (int i = 0; i < 8; ++i) prefix[n][i] = i < n ? -1 : 0;
  }
};
const ExpandTable kExpand;

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 values as fp32; only the first `n` are read when the load may not run past them (`full` false).
inline __m256 load8(const float* p, bool full, int n) {
  if (full) return _mm256_loadu_ps(p);
  return _mm256_maskload_ps(p, _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.prefix[n])));
}

inline __m256 load8(const uint16_t* p, bool full, int n) {
  __m128i h;
  if (full) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, p, static_cast<size_t>(n) * sizeof(uint16_t));
    h = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The 8 weights of columns c..c+7 of a compressed row: `kept` packed values spread to the lanes of the mask byte.
template <typename scalar_t>
__attribute__((always_inline)) inline __m256 expand8(const scalar_t* p, unsigned byte, int kept, bool full) {
  const __m256 packed = load8(p, full, kept);
  const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.index[byte]));
  const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.keep[byte])));
  return _mm256_and_ps(_mm256_permutevar8x32_ps(packed, index), keep);
}

// out[r][t] = row_r . x_t over all columns (row_r of S, expanded from values + bitmask, or a dense row), fp32.
template <int R, int T, bool MASKED, typename scalar_t>
inline void tile_avx2(const scalar_t* const* w, const uint8_t* const* mask, int64_t in_features, const scalar_t* x,
                      int64_t ldx, bool safe, Prefetch& pf, float out[kRows][kTokens]) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const scalar_t* wp[R];
  for (int r = 0; r < R; ++r) wp[r] = w[r];
  int64_t c = 0;
  for (; c + 8 <= in_features; c += 8) {
    if (MASKED) pf.step();
    __m256 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = load8(x + t * ldx + c, true, 8);
    for (int r = 0; r < R; ++r) {
      __m256 wv;
      if (MASKED) {
        const unsigned byte = mask[r][c >> 3];
        const int kept = __builtin_popcount(byte);
        wv = expand8(wp[r], byte, kept, safe);
        wp[r] += kept;
      } else {
        wv = load8(wp[r] + c, true, 8);
      }
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  if (c < in_features) {  // the last 1-7 columns: every load bounded (the mask's padding bits are 0)
    const int n = static_cast<int>(in_features - c);
    __m256 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = load8(x + t * ldx + c, false, n);
    for (int r = 0; r < R; ++r) {
      __m256 wv;
      if (MASKED) {
        const unsigned byte = mask[r][c >> 3];
        wv = expand8(wp[r], byte, __builtin_popcount(byte), false);
      } else {
        wv = load8(wp[r] + c, false, n);
      }
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r][t] = hsum8(acc[r][t]);
}

#endif  // OATS_VEC256

#if OATS_AVX2

// Decode one row of S to a dense row in `dst` (zeros where pruned): fp32 by the permute table, 8 columns a step.
inline void expand_row(const float* w, const uint8_t* mask, int64_t in_features, bool safe, float* dst) {
  int64_t c = 0;
  for (; c + 8 <= in_features; c += 8) {
    const unsigned byte = mask[c >> 3];
    const int kept = __builtin_popcount(byte);
    _mm256_storeu_ps(dst + c, expand8(w, byte, kept, safe));
    w += kept;
  }
  if (c < in_features) {  // the last 1-7 columns (padding bits of the mask are 0)
    std::memset(dst + c, 0, static_cast<size_t>(in_features - c) * sizeof(float));
    for (unsigned bits = mask[c >> 3]; bits != 0; bits &= bits - 1) dst[c + __builtin_ctz(bits)] = *w++;
  }
}

inline void expand_row(const uint16_t* w, const uint8_t* mask, int64_t in_features, bool /*safe*/, uint16_t* dst) {
  expand_row_scalar(w, mask, in_features, dst);
}

template <typename scalar_t>
inline float dot_avx2(const scalar_t* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(load8(a + i, true, 8), _mm256_loadu_ps(b + i), acc);
  if (i < n) {
    const int left = static_cast<int>(n - i);
    acc = _mm256_fmadd_ps(load8(a + i, false, left), load8(b + i, false, left), acc);
  }
  return hsum8(acc);
}

#endif  // OATS_AVX2

#if !OATS_AVX512 && !OATS_AVX2
template <typename scalar_t>
inline void expand_row(const scalar_t* w, const uint8_t* mask, int64_t in_features, bool /*safe*/, scalar_t* dst) {
  expand_row_scalar(w, mask, in_features, dst);
}
#endif

// Portable tile: decode each row to fp32 (zeros where pruned), then plain dot products.
template <typename scalar_t>
inline float load_value(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, uint16_t>) {
    return bf16_to_float(*p);
  } else {
    return *p;
  }
}

template <typename scalar_t, bool MASKED>
void tile_portable(const scalar_t* const* w, const uint8_t* const* mask, int rows, int64_t in_features,
                   const scalar_t* x, int64_t ldx, int tokens, float out[kRows][kTokens], std::vector<float>& scratch) {
  scratch.resize(in_features);
  for (int r = 0; r < rows; ++r) {
    const scalar_t* wp = w[r];
    for (int64_t c = 0; c < in_features; ++c) {
      if (MASKED) {
        scratch[c] = (mask[r][c >> 3] >> (c & 7)) & 1 ? load_value(wp++) : 0.0f;
      } else {
        scratch[c] = load_value(wp + c);
      }
    }
    for (int t = 0; t < tokens; ++t) {
      const scalar_t* xt = x + t * ldx;
      float s = 0.0f;
      for (int64_t c = 0; c < in_features; ++c) s += scratch[c] * load_value(xt + c);
      out[r][t] = s;
    }
  }
}

template <typename scalar_t, bool MASKED>
void tile(const scalar_t* const* w, const uint8_t* const* mask, int rows, int64_t in_features, const scalar_t* x,
          int64_t ldx, int tokens, bool safe, Prefetch& pf, float out[kRows][kTokens], std::vector<float>& scratch) {
#if OATS_AVX512
#define OATS_DISPATCH(R, T)                                                                            \
  if (rows == R && tokens == T) {                                                                      \
    if constexpr (std::is_same_v<scalar_t, float>) {                                                   \
      tile_f32<R, T, MASKED>(w, mask, in_features, x, ldx, safe, pf, out);                                      \
    } else {                                                                                           \
      tile_bf16<R, T, MASKED>(w, mask, in_features, x, ldx, safe, pf, out);                                     \
    }                                                                                                  \
    return;                                                                                            \
  }
  OATS_DISPATCH(4, 1)
  OATS_DISPATCH(4, 2)
  OATS_DISPATCH(4, 3)
  OATS_DISPATCH(4, 4)
  OATS_DISPATCH(1, 1)
  OATS_DISPATCH(1, 2)
  OATS_DISPATCH(1, 3)
  OATS_DISPATCH(1, 4)
#undef OATS_DISPATCH
  (void)scratch;
  for (int r = 0; r < rows; ++r) {
    tile<scalar_t, MASKED>(w + r, mask + r, 1, in_features, x, ldx, tokens, safe, pf, out + r, scratch);
  }
#elif OATS_AVX2
#define OATS_DISPATCH(R, T)                                                            \
  if (rows == R && tokens == T) {                                                      \
    tile_avx2<R, T, MASKED, scalar_t>(w, mask, in_features, x, ldx, safe, pf, out);        \
    return;                                                                            \
  }
  OATS_DISPATCH(4, 1)
  OATS_DISPATCH(4, 2)
  OATS_DISPATCH(4, 3)
  OATS_DISPATCH(4, 4)
  OATS_DISPATCH(1, 1)
  OATS_DISPATCH(1, 2)
  OATS_DISPATCH(1, 3)
  OATS_DISPATCH(1, 4)
#undef OATS_DISPATCH
  (void)scratch;
  for (int r = 0; r < rows; ++r) {
    tile<scalar_t, MASKED>(w + r, mask + r, 1, in_features, x, ldx, tokens, safe, pf, out + r, scratch);
  }
#else
  pf.drain();
  tile_portable<scalar_t, MASKED>(w, mask, rows, in_features, x, ldx, tokens, out, scratch);
#endif
}

// U[row] . t for one token; t is fp32.
template <typename scalar_t>
inline float lowrank_dot(const scalar_t* u_row, const float* t, int64_t rank) {
#if OATS_AVX512
  if constexpr (std::is_same_v<scalar_t, float>) {
    return dot_f32(u_row, t, rank);
  } else {
    return dot_bf16_f32(u_row, t, rank);
  }
#elif OATS_AVX2
  return dot_avx2(u_row, t, rank);
#else
  float s = 0.0f;
  for (int64_t j = 0; j < rank; ++j) s += load_value(u_row + j) * t[j];
  return s;
#endif
}

template <typename scalar_t>
inline scalar_t store_value(float v) {
  if constexpr (std::is_same_v<scalar_t, uint16_t>) {
    return float_to_bf16(v);
  } else {
    return v;
  }
}

// The output stage's store of one tile: y[n + k][row + r] = out[r][k] + U[row + r] . t_(n + k) + bias[row + r].
template <typename scalar_t>
inline void store_tile(const float out[kRows][kTokens], int rows, int tk, int64_t row, int64_t n, const scalar_t* u,
                       const float* t, int64_t rank, const scalar_t* bias, scalar_t* y, int64_t ld_out) {
  for (int r = 0; r < rows; ++r) {
    for (int k = 0; k < tk; ++k) {
      float v = out[r][k];
      if (rank > 0) v += lowrank_dot(u + (row + r) * rank, t + (n + k) * rank, rank);
      if (bias != nullptr) v += load_value(bias + row + r);
      y[(n + k) * ld_out + row + r] = store_value<scalar_t>(v);
    }
  }
}

// Rows [row_begin, row_end) of `weight` (dense, or compressed with `mask`/`offsets`) times every token:
// out[n][row] = w_row . x_n (+ U[row] . t_n + bias[row]) for the output stage, fp32 `raw` for the V stage.
template <typename scalar_t, bool MASKED, bool FINAL>
void rows_times_tokens(const scalar_t* weight, const uint8_t* mask, const int64_t* offsets, int64_t mask_stride,
                       int64_t row_begin, int64_t row_end, int64_t in_features, const scalar_t* x, int64_t tokens,
                       const scalar_t* u, const float* t, int64_t rank, const scalar_t* bias, scalar_t* y, float* raw,
                       int64_t ld_out) {
  std::vector<float> scratch;
  std::vector<scalar_t> dense_rows;
  float out[kRows][kTokens];
  const int64_t nnz = MASKED ? offsets[ld_out] : 0;
  constexpr int64_t kLane = 64 / sizeof(scalar_t);  // values in one 64-byte load
  constexpr int64_t kStepColumns = OATS_AVX512 ? kLane : 8;  // columns per step of the vector tile
  for (int64_t row = row_begin; row < row_end; row += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, row_end - row));
    const scalar_t* w[kRows];
    const uint8_t* m[kRows];
    for (int r = 0; r < rows; ++r) {
      w[r] = MASKED ? weight + offsets[row + r] : weight + (row + r) * in_features;
      m[r] = MASKED ? mask + (row + r) * mask_stride : nullptr;
    }
    const bool safe = !MASKED || offsets[row + rows] + kLane <= nnz;
    Prefetch pf;
    if (MASKED) {
      // The next tile's values, spread over this tile's column steps; its mask and U rows (small) at once.
      const int64_t ahead = std::min<int64_t>(row + kRows, row_end);
      const int64_t ahead_end = std::min<int64_t>(ahead + kRows, row_end);
      pf.next = reinterpret_cast<const char*>(weight + offsets[ahead]);
      pf.end = reinterpret_cast<const char*>(weight + offsets[ahead_end]);
      const int64_t lines = (pf.end - pf.next + 63) / 64, steps = (in_features + kStepColumns - 1) / kStepColumns;
      pf.per_step = static_cast<int>(std::max<int64_t>(1, (lines + steps - 1) / steps));
      for (const uint8_t* q = mask + ahead * mask_stride; q < mask + ahead_end * mask_stride; q += 64) {
        __builtin_prefetch(q);
      }
      if (rank > 0) {
        const char* uq = reinterpret_cast<const char*>(u + ahead * rank);
        for (const char* e = reinterpret_cast<const char*>(u + ahead_end * rank); uq < e; uq += 64) {
          __builtin_prefetch(uq);
        }
      }
    }
#if OATS_AVX512 || OATS_AVX2
    // Many tokens: decode the tile's rows once into an L1-resident dense buffer, then run the dense tile over all
    // tokens, so the per-chunk mask work is paid once per row instead of once per 4 tokens.
    const bool decoded = MASKED && tokens > kTokens;
    if (decoded) {
      dense_rows.resize(static_cast<size_t>(kRows * in_features));
      pf.drain();
      for (int r = 0; r < rows; ++r) {
        expand_row(w[r], m[r], in_features, safe, dense_rows.data() + r * in_features);
        w[r] = dense_rows.data() + r * in_features;
      }
    }
#else
    const bool decoded = false;
#endif
    for (int64_t n = 0; n < tokens; n += kTokens) {
      const int tk = static_cast<int>(std::min<int64_t>(kTokens, tokens - n));
      if (decoded) {
        tile<scalar_t, false>(w, m, rows, in_features, x + n * in_features, in_features, tk, true, pf, out, scratch);
      } else {
        tile<scalar_t, MASKED>(w, m, rows, in_features, x + n * in_features, in_features, tk, safe, pf, out, scratch);
      }
      if (FINAL) {
        store_tile<scalar_t>(out, rows, tk, row, n, u, t, rank, bias, y, ld_out);
      } else {
        for (int r = 0; r < rows; ++r)
          for (int k = 0; k < tk; ++k) raw[(n + k) * ld_out + row + r] = out[r][k];
      }
    }
  }
}


// ------------------------------------------------------------------------------------------------ quantized values
// Quantized S stores its kept values as b-bit codes (2 <= b <= 8) in one little-endian bit stream, row-major like the
// float values, and an fp16 scale per `group` columns of a row (a multiple of 8, so a mask byte lies in one group):
// value = (code - offset) * scale in fp32, offset = (2^b - 1) / 2 on the values' zero-free grid, then the layer's
// dtype (round to nearest even for bf16, as PyTorch's decode does). Nothing is decoded ahead: each row tile's codes
// are decoded into a small scratch in the layer's dtype (the row's kept values in order, stage 1, L1-resident), which
// the float tiles above then read exactly as they read stored values (stage 2). Stage 1 runs over kept values only,
// so the bytes read from memory are the codes: ~4x fewer than bf16 values at 4 bits. Its vector code is 256-bit in
// both vector builds (an AVX-512 CPU runs the same instructions; the bf16 rounding there is one VCVTNEPS2BF16).

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float f = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  const uint32_t bits =
      exponent == 31 ? (sign | 0x7f800000u | (mantissa << 13)) : (sign | ((exponent + 112) << 23) | (mantissa << 13));
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

struct CodeStream {
  const uint8_t* codes;
  int64_t nbytes;
  int bits;
  float offset;
};

// Stage 1a: `count` codes from code index `first` as one byte each into dst[0..count) (dst may be written up to 32
// bytes past the end, and 1 byte before its start: the scratch reserves both).
inline void unpack_codes(const CodeStream& s, int64_t first, int64_t count, uint8_t* dst) {
  if (s.bits == 8) {
    std::memcpy(dst, s.codes + first, static_cast<size_t>(count));
    return;
  }
#if OATS_VEC256
  if (s.bits == 4) {  // two codes a byte, low nibble first: 32 codes from each 16 bytes
    const int64_t lead = first & 1, begin = first >> 1, bytes = (lead + count + 1) / 2;
    const __m128i low = _mm_set1_epi8(0x0f);
    uint8_t* out = dst - lead;
    for (int64_t i = 0; i < bytes; i += 16) {
      __m128i v;
      if (begin + i + 16 <= s.nbytes) {
        v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s.codes + begin + i));
      } else {
        alignas(16) uint8_t tail[16] = {0};
        std::memcpy(tail, s.codes + begin + i, static_cast<size_t>(s.nbytes - begin - i));
        v = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
      }
      const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i), _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * i + 16), _mm_unpackhi_epi8(lo, hi));
    }
    return;
  }
#endif
  const uint64_t low = (1u << s.bits) - 1u;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t bit = (first + i) * s.bits;
    const int64_t byte = bit >> 3;
    uint32_t word = s.codes[byte];
    if (byte + 1 < s.nbytes) word |= static_cast<uint32_t>(s.codes[byte + 1]) << 8;
    dst[i] = static_cast<uint8_t>((word >> (bit & 7)) & low);
  }
}

#if OATS_VEC256
// 8 fp32 lanes to bf16, round to nearest even like float_to_bf16 (finite values).
inline __m128i bf16x8(__m256 v) {
  __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
}
#endif

// Stage 1b: dst[i] = (q[i] - offset) * scale in the layer's dtype, for i < count (may write up to 31 values more).
template <typename scalar_t>
inline void codes_to_values(const uint8_t* q, int64_t count, const CodeStream& s, float scale, scalar_t* dst) {
#if OATS_VEC256
  const __m256 offset = _mm256_set1_ps(s.offset), scales = _mm256_set1_ps(scale);
  if constexpr (std::is_same_v<scalar_t, uint16_t>) {
    if (s.bits <= 4) {  // a 16-entry table per group: each code's bf16 split into two byte lookups (PSHUFB)
      const __m256 k0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), k1 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
      const __m128i words0 = bf16x8(_mm256_mul_ps(_mm256_sub_ps(k0, offset), scales));
      const __m128i words1 = bf16x8(_mm256_mul_ps(_mm256_sub_ps(k1, offset), scales));
      const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
      const __m128i a = _mm_shuffle_epi8(words0, split), b = _mm_shuffle_epi8(words1, split);
      const __m128i lows = _mm_unpacklo_epi64(a, b), highs = _mm_unpackhi_epi64(a, b);
      for (int64_t i = 0; i < count; i += 16) {
        const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i));
        const __m128i lo = _mm_shuffle_epi8(lows, codes), hi = _mm_shuffle_epi8(highs, codes);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_unpacklo_epi8(lo, hi));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i + 8), _mm_unpackhi_epi8(lo, hi));
      }
      return;
    }
  }
  for (int64_t i = 0; i < count; i += 8) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i));
    const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)), offset), scales);
    if constexpr (std::is_same_v<scalar_t, float>) {
      _mm256_storeu_ps(dst + i, v);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), bf16x8(v));
    }
  }
#else
  for (int64_t i = 0; i < count; ++i) dst[i] = store_value<scalar_t>((static_cast<float>(q[i]) - s.offset) * scale);
#endif
}

// Stage 1 for one row: its kept values into `dst` (room for its kept count + 32: the vector loads read past it),
// through the row's codes as bytes in `codes` (room for the kept count + 33).
template <typename scalar_t>
inline void decode_row(const CodeStream& s, int64_t first, const uint8_t* mask, const uint16_t* scales, int64_t group,
                       int64_t in_features, uint8_t* codes, scalar_t* dst) {
  const int64_t bytes = (in_features + 7) / 8, group_bytes = group / 8;
  int64_t total = 0;
  for (int64_t i = 0; i < bytes; ++i) total += __builtin_popcount(mask[i]);
  unpack_codes(s, first, total, codes + 1);
  const uint8_t* q = codes + 1;
  for (int64_t g = 0, b = 0; b < bytes; ++g, b += group_bytes) {
    const int64_t e = std::min(b + group_bytes, bytes);
    int64_t kept = 0, i = b;
    for (; i + 8 <= e; i += 8) {
      uint64_t word;
      std::memcpy(&word, mask + i, 8);
      kept += __builtin_popcountll(word);
    }
    for (; i < e; ++i) kept += __builtin_popcount(mask[i]);
    if (kept == 0) continue;
    codes_to_values<scalar_t>(q, kept, s, half_to_float(scales[g]), dst);
    q += kept;
    dst += kept;
  }
}

#if OATS_AVX512
// The fused decode of AVX-512 builds for bf16 layers with codes of at most 4 bits and groups of whole 32-column steps:
// each row's codes are unpacked to bytes (stage 1a), and the 32-column bf16 tile maps them through the group's
// 16-entry bf16 table (VPERMW) before expanding them with the mask bits, so no decoded values are stored at all.
template <int R, int T, bool FULL>
__attribute__((always_inline)) inline void step_codes(const uint8_t** qp, const uint8_t* const* mask, int64_t c,
                                                      int64_t in_features, const uint16_t* x, int64_t ldx,
                                                      const __m512i (&table)[R], __m512 (&acc)[R][T]) {
  const __mmask32 tail =
      FULL ? static_cast<__mmask32>(0xffffffffu) : static_cast<__mmask32>((1u << (in_features - c)) - 1u);
  __m512i wv[R];
  for (int r = 0; r < R; ++r) {
    const __mmask32 m = chunk_bits<uint32_t, FULL>(mask[r], c, in_features);
    const __m512i codes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp[r])));
    wv[r] = _mm512_maskz_expand_epi16(m, _mm512_permutexvar_epi16(codes, table[r]));
    qp[r] += __builtin_popcount(m);
  }
  for (int t = 0; t < T; ++t) {
    const __m512i xv = FULL ? _mm512_loadu_si512(x + t * ldx + c) : _mm512_maskz_loadu_epi16(tail, x + t * ldx + c);
    for (int r = 0; r < R; ++r)
      acc[r][t] = _mm512_dpbf16_ps(acc[r][t], reinterpret_cast<__m512bh>(wv[r]), reinterpret_cast<__m512bh>(xv));
  }
}

template <int R, int T>
inline void tile_codes(const uint8_t* const* q, const uint8_t* const* mask, const uint16_t* const* scales,
                       int64_t group, float offset, int64_t in_features, const uint16_t* x, int64_t ldx, Prefetch& pf,
                       float out[kRows][kTokens]) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  const uint8_t* qp[R];
  for (int r = 0; r < R; ++r) qp[r] = q[r];
  const __m512 levels = _mm512_sub_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                      _mm512_set1_ps(offset));
  __m512i table[R];
  int64_t c = 0;
  for (; c < in_features; c += 32) {
    if (c % group == 0) {  // (q - z) s for q = 0..15 in fp32, rounded to bf16 like every other decode
      for (int r = 0; r < R; ++r) {
        const __m512 v = _mm512_mul_ps(levels, _mm512_set1_ps(half_to_float(scales[r][c / group])));
        table[r] = _mm512_castsi256_si512(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
      }
    }
    if (c + 32 > in_features) break;
    pf.step();
    step_codes<R, T, true>(qp, mask, c, in_features, x, ldx, table, acc);
  }
  if (c < in_features) step_codes<R, T, false>(qp, mask, c, in_features, x, ldx, table, acc);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r][t] = hsum(acc[r][t]);
}

inline void tile_codes(const uint8_t* const* q, const uint8_t* const* mask, const uint16_t* const* scales,
                       int64_t group, float offset, int rows, int64_t in_features, const uint16_t* x, int64_t ldx,
                       int tokens, Prefetch& pf, float out[kRows][kTokens]) {
#define OATS_DISPATCH(R, T)                                                                 \
  if (rows == R && tokens == T) {                                                           \
    tile_codes<R, T>(q, mask, scales, group, offset, in_features, x, ldx, pf, out);         \
    return;                                                                                 \
  }
  OATS_DISPATCH(4, 1)
  OATS_DISPATCH(4, 2)
  OATS_DISPATCH(4, 3)
  OATS_DISPATCH(4, 4)
  OATS_DISPATCH(1, 1)
  OATS_DISPATCH(1, 2)
  OATS_DISPATCH(1, 3)
  OATS_DISPATCH(1, 4)
#undef OATS_DISPATCH
  for (int r = 0; r < rows; ++r) {
    tile_codes(q + r, mask + r, scales + r, group, offset, 1, in_features, x, ldx, tokens, pf, out + r);
  }
}
#endif  // OATS_AVX512

// Whether the fused decode above computes this call (else stage 1 writes decoded values for the float tiles).
template <typename scalar_t>
constexpr bool fused_codes_build() {
  return OATS_AVX512 && std::is_same_v<scalar_t, uint16_t>;
}

// The output stage on quantized values: rows [row_begin, row_end) times every token, plus U t and the bias.
template <typename scalar_t>
void quantized_rows_times_tokens(const CodeStream& s, const uint16_t* scales, int64_t groups, int64_t group,
                                 const uint8_t* mask, const int64_t* offsets, int64_t mask_stride, int64_t row_begin,
                                 int64_t row_end, int64_t in_features, const scalar_t* x, int64_t tokens,
                                 const scalar_t* u, const float* t, int64_t rank, const scalar_t* bias, scalar_t* y,
                                 int64_t ld_out) {
  std::vector<scalar_t> values, dense_rows;
  std::vector<uint8_t> codes;
  std::vector<float> scratch;
  float out[kRows][kTokens];
  const bool many = tokens > kTokens;  // decode each row tile once to dense rows, then the dense tile per 4 tokens
  const bool fused = fused_codes_build<scalar_t>() && !many && s.bits <= 4 && group % 32 == 0;
  for (int64_t row = row_begin; row < row_end; row += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, row_end - row));
    const scalar_t* w[kRows];
    const uint8_t* m[kRows];
    const uint8_t* q[kRows];
    const uint16_t* sc[kRows];
    int64_t width = 0;
    for (int r = 0; r < rows; ++r) width = std::max(width, offsets[row + r + 1] - offsets[row + r] + 32);
    values.resize(static_cast<size_t>(kRows * width));
    codes.resize(static_cast<size_t>(kRows * (width + 2)));
    for (int r = 0; r < rows; ++r) {
      m[r] = mask + (row + r) * mask_stride;
      w[r] = values.data() + r * width;
      sc[r] = scales + (row + r) * groups;
      uint8_t* row_codes = codes.data() + r * (width + 2);
      if (fused) {
        unpack_codes(s, offsets[row + r], offsets[row + r + 1] - offsets[row + r], row_codes + 1);
        q[r] = row_codes + 1;
      } else {
        decode_row(s, offsets[row + r], m[r], sc[r], group, in_features, row_codes, values.data() + r * width);
      }
    }
    // The next tile's codes, spread over this tile's column steps (its stage 1 reads them next).
    Prefetch pf;
    const int64_t ahead = std::min<int64_t>(row + kRows, row_end), ahead_end = std::min<int64_t>(ahead + kRows, row_end);
    pf.next = reinterpret_cast<const char*>(s.codes + offsets[ahead] * s.bits / 8);
    pf.end = reinterpret_cast<const char*>(s.codes + (offsets[ahead_end] * s.bits + 7) / 8);
    const int64_t lines = (pf.end - pf.next + 63) / 64, steps = (in_features + 7) / 8;
    pf.per_step = static_cast<int>(std::max<int64_t>(1, (lines + steps - 1) / steps));
    if (many) {
      dense_rows.resize(static_cast<size_t>(kRows * in_features));
      pf.drain();
      for (int r = 0; r < rows; ++r) {
        expand_row(w[r], m[r], in_features, true, dense_rows.data() + r * in_features);
        w[r] = dense_rows.data() + r * in_features;
      }
    }
    for (int64_t n = 0; n < tokens; n += kTokens) {
      const int tk = static_cast<int>(std::min<int64_t>(kTokens, tokens - n));
      const scalar_t* xn = x + n * in_features;
      if (many) {
        tile<scalar_t, false>(w, m, rows, in_features, xn, in_features, tk, true, pf, out, scratch);
      } else if (fused) {
#if OATS_AVX512
        if constexpr (std::is_same_v<scalar_t, uint16_t>) {
          tile_codes(q, m, sc, group, s.offset, rows, in_features, xn, in_features, tk, pf, out);
        }
#endif
      } else {
        tile<scalar_t, true>(w, m, rows, in_features, xn, in_features, tk, true, pf, out, scratch);
      }
      store_tile<scalar_t>(out, rows, tk, row, n, u, t, rank, bias, y, ld_out);
    }
  }
}

// t = x V^T, fp32 (tokens, rank): the first stage of the low-rank term. Grains of 16 rows: small enough to split a
// 192-row layer across threads, large enough to amortise dispatch.
template <typename scalar_t>
std::vector<float> lowrank_stage(const scalar_t* xp, const scalar_t* vp, int64_t tokens, int64_t in_features,
                                 int64_t rank) {
  std::vector<float> t(static_cast<size_t>(tokens * rank));
  if (rank > 0) {
    at::parallel_for(0, rank, 16, [&](int64_t begin, int64_t end) {
      rows_times_tokens<scalar_t, false, false>(vp, nullptr, nullptr, 0, begin, end, in_features, xp, tokens, nullptr,
                                                nullptr, 0, nullptr, nullptr, t.data(), rank);
    });
  }
  return t;
}

template <typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask, const at::Tensor& offsets,
                  const at::Tensor& u, const at::Tensor& v, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t tokens = x.size(0), in_features = x.size(1), out_features = mask.size(0), rank = v.size(0);
  const auto* xp = reinterpret_cast<const scalar_t*>(x.data_ptr());
  const auto* vp = reinterpret_cast<const scalar_t*>(v.data_ptr());
  const auto* up = reinterpret_cast<const scalar_t*>(u.data_ptr());
  const auto* sp = reinterpret_cast<const scalar_t*>(values.data_ptr());
  const auto* bp = bias.has_value() ? reinterpret_cast<const scalar_t*>(bias->data_ptr()) : nullptr;
  auto* yp = reinterpret_cast<scalar_t*>(y.data_ptr());
  const std::vector<float> t = lowrank_stage<scalar_t>(xp, vp, tokens, in_features, rank);
  const int64_t tiles = (out_features + kRows - 1) / kRows;  // split by whole row tiles
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    rows_times_tokens<scalar_t, true, true>(sp, mask.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(), mask.size(1),
                                            begin * kRows, std::min(end * kRows, out_features), in_features, xp,
                                            tokens, up, t.data(), rank, bp, yp, nullptr, out_features);
  });
}

}  // namespace

// x: (..., in_features); values: (nnz,); mask: (out, ceil(in/8)) uint8; offsets: (out + 1,) int64; u: (out, rank);
// v: (rank, in); bias: (out,) or None. All of x's dtype (float32 or bfloat16). Returns (..., out).
at::Tensor sparse_lowrank_forward(const at::Tensor& x_in, const at::Tensor& values, const at::Tensor& mask,
                                  const at::Tensor& offsets, const at::Tensor& u, const at::Tensor& v,
                                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.device().is_cpu(), "x must be a CPU tensor");
  const int64_t in_features = x_in.size(-1), out_features = mask.size(0);
  const at::Tensor x = x_in.contiguous().view({-1, in_features});
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous(), "mask must be contiguous uint8");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.numel() == out_features + 1, "offsets: (out + 1,) int64");
  TORCH_CHECK(mask.size(1) == (in_features + 7) / 8, "mask has ", mask.size(1), " bytes per row, expected ",
              (in_features + 7) / 8);
  TORCH_CHECK(v.dim() == 2 && v.size(1) == in_features && u.size(0) == out_features && u.size(1) == v.size(0),
              "low-rank factor shapes do not match");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype must be float32 or bfloat16, got ", dtype);
  for (const at::Tensor* t : {&values, &u, &v}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous(), "all tensors must be contiguous and of x's dtype");
  }
  TORCH_CHECK(values.numel() == offsets.data_ptr<int64_t>()[out_features], "values and mask disagree on nnz");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->is_contiguous() && bias->numel() == out_features,
                "bias: (out,) of x's dtype");
  }
  std::vector<int64_t> sizes(x_in.sizes().begin(), x_in.sizes().end());
  sizes.back() = out_features;
  auto y = at::empty(sizes, x.options());
  if (dtype == at::kFloat) {
    forward_impl<float>(x, values, mask, offsets, u, v, bias, y);
  } else {
    forward_impl<uint16_t>(x, values, mask, offsets, u, v, bias, y);
  }
  return y;
}

// S as a dense (out, in) matrix written into `out` (of values' dtype): the memory-bound pass of prefill, which then
// runs one dense GEMM on a workspace shared by the layers of one shape instead of caching a dense copy per layer.
void sparse_decompress(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& offsets, at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.device().is_cpu(), "out must be a contiguous 2-D CPU tensor");
  const int64_t rows = out.size(0), in_features = out.size(1);
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.size(0) == rows &&
                  mask.size(1) == (in_features + 7) / 8,
              "mask does not match out's shape");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.numel() == rows + 1, "offsets: (out + 1,) int64");
  TORCH_CHECK(values.scalar_type() == out.scalar_type() && values.is_contiguous(), "values: contiguous, out's dtype");
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(values.numel() == off[rows], "values and mask disagree on nnz");
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const int64_t stride = mask.size(1), nnz = off[rows];
  auto run = [&](auto* vp, auto* op) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const bool safe = off[r + 1] + 64 / static_cast<int64_t>(sizeof(*vp)) <= nnz;
        expand_row(vp + off[r], mp + r * stride, in_features, safe, op + r * in_features);
      }
    });
  };
  if (out.scalar_type() == at::kFloat) {
    run(values.data_ptr<float>(), out.data_ptr<float>());
  } else {
    TORCH_CHECK(out.scalar_type() == at::kBFloat16, "dtype must be float32 or bfloat16");
    run(reinterpret_cast<const uint16_t*>(values.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()));
  }
}

namespace {

template <typename scalar_t>
void forward_quantized_impl(const at::Tensor& x, const CodeStream& s, const at::Tensor& scales, int64_t group,
                            const at::Tensor& mask, const at::Tensor& offsets, const at::Tensor& u,
                            const at::Tensor& v, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t tokens = x.size(0), in_features = x.size(1), out_features = mask.size(0), rank = v.size(0);
  const auto* xp = reinterpret_cast<const scalar_t*>(x.data_ptr());
  const auto* up = reinterpret_cast<const scalar_t*>(u.data_ptr());
  const auto* bp = bias.has_value() ? reinterpret_cast<const scalar_t*>(bias->data_ptr()) : nullptr;
  auto* yp = reinterpret_cast<scalar_t*>(y.data_ptr());
  const std::vector<float> t =
      lowrank_stage<scalar_t>(xp, reinterpret_cast<const scalar_t*>(v.data_ptr()), tokens, in_features, rank);
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const int64_t tiles = (out_features + kRows - 1) / kRows;
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    quantized_rows_times_tokens<scalar_t>(s, sp, scales.size(1), group, mask.data_ptr<uint8_t>(),
                                          offsets.data_ptr<int64_t>(), mask.size(1), begin * kRows,
                                          std::min(end * kRows, out_features), in_features, xp, tokens, up, t.data(),
                                          rank, bp, yp, out_features);
  });
}

// Checks shared by the quantized entry points; returns the code stream.
CodeStream check_codes(const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t group_size,
                       double offset, const at::Tensor& mask, const at::Tensor& offsets, int64_t in_features) {
  const int64_t out_features = mask.size(0);
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be in [2, 8], got ", bits);
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, "group_size must be a positive multiple of 8, got ", group_size);
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.size(1) == (in_features + 7) / 8,
              "mask must be contiguous uint8 (out, ceil(in / 8))");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.numel() == out_features + 1, "offsets: (out + 1,) int64");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "codes must be contiguous uint8");
  const int64_t nnz = offsets.data_ptr<int64_t>()[out_features];
  TORCH_CHECK(codes.numel() == (nnz * bits + 7) / 8, "codes hold ", codes.numel(), " bytes, the mask's ", nnz,
              " kept values need ", (nnz * bits + 7) / 8);
  TORCH_CHECK(scales.scalar_type() == at::kShort && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == out_features && scales.size(1) == (in_features + group_size - 1) / group_size,
              "scales: contiguous int16 (fp16 bits) of shape (out, ceil(in / group_size))");
  return CodeStream{codes.data_ptr<uint8_t>(), codes.numel(), static_cast<int>(bits), static_cast<float>(offset)};
}

}  // namespace

// As sparse_lowrank_forward, with S's kept values as `bits`-bit codes (`codes`, a bit stream) and fp16 group scales
// (`scales`, int16 bit patterns (out, ceil(in / group_size))): value = (code - offset) * scale.
at::Tensor sparse_lowrank_forward_quantized(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales,
                                            int64_t bits, int64_t group_size, double offset, const at::Tensor& mask,
                                            const at::Tensor& offsets, const at::Tensor& u, const at::Tensor& v,
                                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.device().is_cpu(), "x must be a CPU tensor");
  const int64_t in_features = x_in.size(-1), out_features = mask.size(0);
  const at::Tensor x = x_in.contiguous().view({-1, in_features});
  const CodeStream s = check_codes(codes, scales, bits, group_size, offset, mask, offsets, in_features);
  TORCH_CHECK(v.dim() == 2 && v.size(1) == in_features && u.size(0) == out_features && u.size(1) == v.size(0),
              "low-rank factor shapes do not match");
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype must be float32 or bfloat16, got ", dtype);
  for (const at::Tensor* t : {&u, &v}) {
    TORCH_CHECK(t->scalar_type() == dtype && t->is_contiguous(), "u and v must be contiguous and of x's dtype");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->is_contiguous() && bias->numel() == out_features,
                "bias: (out,) of x's dtype");
  }
  std::vector<int64_t> sizes(x_in.sizes().begin(), x_in.sizes().end());
  sizes.back() = out_features;
  auto y = at::empty(sizes, x.options());
  if (dtype == at::kFloat) {
    forward_quantized_impl<float>(x, s, scales, group_size, mask, offsets, u, v, bias, y);
  } else {
    forward_quantized_impl<uint16_t>(x, s, scales, group_size, mask, offsets, u, v, bias, y);
  }
  return y;
}

// S as a dense (out, in) matrix (fp32 or bf16 `out`) from quantized values: the prefill workspace's decompression.
void sparse_decompress_quantized(const at::Tensor& codes, const at::Tensor& scales, int64_t bits, int64_t group_size,
                                 double offset, const at::Tensor& mask, const at::Tensor& offsets, at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.device().is_cpu(), "out must be a contiguous 2-D CPU tensor");
  const int64_t rows = out.size(0), in_features = out.size(1);
  TORCH_CHECK(mask.size(0) == rows, "mask does not match out's shape");
  const CodeStream s = check_codes(codes, scales, bits, group_size, offset, mask, offsets, in_features);
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16, "out: float32 or bfloat16");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const uint8_t* mp = mask.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const int64_t stride = mask.size(1), groups = scales.size(1);
  auto run = [&](auto* op) {
    using scalar_t = std::remove_pointer_t<decltype(op)>;
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> values(static_cast<size_t>(in_features + 32));
      std::vector<uint8_t> codes(static_cast<size_t>(in_features + 34));
      for (int64_t r = begin; r < end; ++r) {
        decode_row(s, off[r], mp + r * stride, sp + r * groups, group_size, in_features, codes.data(), values.data());
        expand_row(values.data(), mp + r * stride, in_features, true, op + r * in_features);
      }
    });
  };
  if (out.scalar_type() == at::kFloat) {
    run(out.data_ptr<float>());
  } else {
    run(reinterpret_cast<uint16_t*>(out.data_ptr()));
  }
}

bool uses_avx512() { return OATS_AVX512 != 0; }

// Which decode path this build runs: "avx512", "avx2" or "portable" (the last is correct but far slower than dense).
std::string isa() { return OATS_AVX512 ? "avx512" : (OATS_AVX2 ? "avx2" : "portable"); }

// oats_threshold.cpp: the fused thresholding step of the fast OATS solver (same extension, one module).
std::tuple<double, double> oats_threshold_step(const at::Tensor& residual, const at::Tensor& scaled, int64_t keep,
                                               at::Tensor& threshold, at::Tensor& sparse, at::Tensor& mask,
                                               at::Tensor& work);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sparse_lowrank_forward", &sparse_lowrank_forward, "y = x S^T + (x V^T) U^T + b from values + bitmask");
  m.def("uses_avx512", &uses_avx512, "whether the AVX-512 path was compiled in");
  m.def("isa", &isa, "the decode path compiled in: avx512, avx2 or portable");
  m.def("sparse_decompress", &sparse_decompress, "S as a dense matrix written into out (prefill workspace)");
  m.def("sparse_lowrank_forward_quantized", &sparse_lowrank_forward_quantized,
        "sparse_lowrank_forward with S's values as b-bit codes and fp16 group scales, decoded on the fly");
  m.def("sparse_decompress_quantized", &sparse_decompress_quantized,
        "S as a dense matrix from b-bit codes and fp16 group scales (prefill workspace)");
  m.def("oats_threshold_step", &oats_threshold_step,
        "fast-OATS thresholding: sparse, mask, W_s - S and both squared norms in one pass");
}
