// The fused CPU Lion step: one pass over p, g and the momentum (fp32, 8-bit codes with a scale
// per block of 256 or per tensor, or 4-bit codes with a scale per block of 32), for
// fp32/fp16/bf16 parameters and gradients.
//
// Built on first use by kernels/compiled.py (system C++ compiler, -O3 -march=native -fopenmp
// -ffp-contract=off) and loaded with ctypes; no torch headers, so it builds in seconds. The
// arithmetic is the reference's (kernels/torch_eager.py), operation for operation, in fp32 and
// in the same order, with no FMA contraction: results are bit-identical to it.
//
// Work layout: every tensor is cut into chunks of LK_CHUNK elements (a multiple of the block
// size) and the chunks of all tensors of a step form one OpenMP loop, so hundreds of small
// tensors cost one parallel region. The 8-bit path dequantizes, updates, takes the new absmax
// and requantizes one block at a time through a 1 KiB stack buffer: nothing is allocated in
// proportion to a tensor.
//
// Quantization uses quant_fast's bucket table: the top 15 bits of |x| index a table whose
// entry holds the number of thresholds below the bucket and the low 16 bits of the (at most
// one) threshold inside it; one integer comparison finishes the job (the AVX-512 code uses its
// code-valued form, quant_fast.code_table, indexed by the top 16 bits of x: an addition and a
// shift). Exact for every float32
// in [-1, 1] (checked exhaustively by quant_fast.check_exhaustive through lk_quantize).

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if !defined(LK_FORCE_SCALAR) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512DQ__) && defined(__AVX512VL__)
#define LK_AVX512 1
#include <immintrin.h>
#else
#define LK_AVX512 0
#endif

// Shared by the translation units of a parallel build (see compiled.py): plain types only.
namespace lk {

constexpr int64_t LK_BLOCK = 256;
constexpr int64_t LK_CHUNK = 1 << 15;
enum DType { F32 = 0, F16 = 1, BF16 = 2 };
enum Mode { MOM32 = 0, MOM8_BLOCK = 1, MOM8_TENSOR = 2, MOM4 = 3 };
constexpr int64_t LK_BLOCK4 = 32;  // 4-bit momentum: elements per scale (quant4.BLOCK_SIZE)
constexpr int LK_MAP4 = 15;        // levels of the 4-bit map; code 7 is 0
constexpr int LK_NINFO = 6;        // int32 words of lk_step's info per tensor

// Layout of the constants (uint32 words; quant_fast.kernel_constants builds them).
constexpr uint32_t QC_MAGIC = 0x4C4B5131;
constexpr int QC_KEY0 = 1, QC_NB = 2, QC_ZERO = 3, QC_SYM = 4, QC_QMAP = 16, QC_LUT = 16 + 256;

// Per-tensor scalars, already rounded to fp32 the way the reference rounds them.
struct Hyper {
  float lr, b1, omb1, b2, omb2, decay, gscale, clip;  // the 8 floats of lk_step's hyper row
  bool sr;         // bf16 parameter rounded stochastically (rounding.stochastic_round_keyed)
  uint32_t srkey;  // its key (rounding.key32 of the step's seed)
};

struct Quant {  // the bucket table (and its code-valued form, quant_fast.code_table) and the map
  const float* qmap;
  const uint32_t* lut;
  const uint32_t* lut2;
  uint32_t key0, nb, zero;
  bool sym;  // -m[127 - j] == m[127 + j]: magnitudes decode from 128 entries
  explicit Quant(const uint32_t* qc)
      : qmap((const float*)(qc + QC_QMAP)), lut(qc + QC_LUT), lut2(qc + QC_LUT + 2 * qc[QC_NB]), key0(qc[QC_KEY0]),
        nb(qc[QC_NB]), zero(qc[QC_ZERO]), sym(qc[QC_SYM] == 1) {}
};

struct Tensor {
  void* p;
  const void* g;
  void* m;        // fp32 momentum or uint8 codes
  float* absmax;  // 8- and 4-bit only
  const float* map4;  // 4-bit only: the 15 levels
  uint32_t key;       // 4-bit only: the step's rounding key (quant4.uniform)
  int64_t n;
  int mode, pdt, gdt;
  bool skip, gsc;
  Hyper h;
};

// One chunk of one tensor, per parameter dtype (each in its own translation unit when built
// in parallel). Gradients are of the parameter's dtype or fp32; other pairs go to the eager
// backend (compiled.py checks). pass: see chunk_impl.
float run_chunk_f32(const Tensor& t, int64_t n0, int64_t n1, int pass, float scale, const Quant& q);
float run_chunk_f16(const Tensor& t, int64_t n0, int64_t n1, int pass, float scale, const Quant& q);
float run_chunk_bf16(const Tensor& t, int64_t n0, int64_t n1, int pass, float scale, const Quant& q);

}  // namespace lk

namespace {
using namespace lk;

inline float bits_f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// rounding._mix32 in uint32 arithmetic (products mod 2**32, as the int64 & 0xFFFFFFFF there)
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  x ^= x >> 13;
  x *= 0x297A2D39u;
  return x ^ (x >> 16);
}
// rounding._lowbias32
inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}
// rounding.sr_hash(key, i)
inline uint32_t sr_hash(uint32_t key, int64_t i) {
  const uint32_t hi = (uint32_t)((uint64_t)i >> 32);
  return lowbias32((uint32_t)i ^ key ^ (hi ? lowbias32(hi) : 0u));
}
// rounding.counter_hash(key, i)
inline uint32_t counter_hash(uint32_t key, int64_t i) {
  uint32_t x = mix32((uint32_t)i);
  uint32_t hi = (uint32_t)((uint64_t)i >> 32);
  if (hi) x ^= mix32(hi);
  return mix32(x ^ key);
}

// ---------------------------------------------------------------- scalar conversions
inline float bf16_to_f(uint16_t h) { return bits_f((uint32_t)h << 16); }
inline uint16_t f_to_bf16(float f) {
  if (f != f) return 0x7FC0;
  uint32_t u = f_bits(f);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return (uint16_t)(u >> 16);
}
inline float f16_to_f(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, mant = h & 0x3FF;
  if (e == 0) return bits_f(f_bits((float)mant * 5.9604644775390625e-08f) | sign);  // mant * 2^-24, exact
  if (e == 31) return bits_f(sign | 0x7F800000u | (mant << 13));
  return bits_f(sign | ((e + 112) << 23) | (mant << 13));
}
inline uint16_t f_to_f16(float f) {
  uint32_t u = f_bits(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
  u &= 0x7FFFFFFFu;
  if (u >= 0x7F800000u) return sign | (u > 0x7F800000u ? 0x7E00 : 0x7C00);
  if (u >= 0x477FF000u) return sign | 0x7C00;  // >= 65520 rounds to inf
  if (u < 0x38800000u)                         // below 2^-14: half subnormal or zero
    return sign | (uint16_t)std::nearbyint(bits_f(u) * 16777216.0f);  // exact scaling, round to even
  u += 0xFFFu + ((u >> 13) & 1u);  // round to nearest even at bit 13
  u -= 112u << 23;
  return sign | (uint16_t)(u >> 13);
}

template <int DT> struct IO;
template <> struct IO<F32> {
  typedef float T;
  static float ld(const T* p, int64_t i) { return p[i]; }
  static void st(T* p, int64_t i, float v) { p[i] = v; }
};
template <> struct IO<BF16> {
  typedef uint16_t T;
  static float ld(const T* p, int64_t i) { return bf16_to_f(p[i]); }
  static void st(T* p, int64_t i, float v) { p[i] = f_to_bf16(v); }
};
// rounding._round_bf16 with the noise of sr_hash(key, i): finite values get the hash's top
// 16 bits added to their pattern and are truncated; NaN and inf round to nearest
inline uint16_t f_to_bf16_sr(float f, uint32_t key, int64_t i) {
  const uint32_t u = f_bits(f);
  if ((u & 0x7F800000u) == 0x7F800000u) return f_to_bf16(f);
  return (uint16_t)((u + (sr_hash(key, i) >> 16)) >> 16);
}
template <> struct IO<F16> {
  typedef uint16_t T;
  static float ld(const T* p, int64_t i) { return f16_to_f(p[i]); }
  static void st(T* p, int64_t i, float v) { p[i] = f_to_f16(v); }
};
// A parameter's store: to nearest, or stochastically for a bf16 parameter with h.sr (element i
// of its tensor: the index the random number belongs to)
template <int PT>
inline void st_p(typename IO<PT>::T* p, int64_t i, float v, const Hyper& h) {
  if constexpr (PT == BF16) {
    if (h.sr) {
      p[i] = f_to_bf16_sr(v, h.srkey, i);
      return;
    }
  }
  IO<PT>::st(p, i, v);
}

// ---------------------------------------------------------------- scalar step and quantizer
// The reference's operations in its order (torch_eager._update_chunk). Without a grad scale
// or clip the multiply by 1 and the clamp to +-inf are skipped (they would be exact anyway).
template <bool GSC>
inline float grad_in(float g, const Hyper& h) {
  if (!GSC) return g;
  g = g * h.gscale;
  g = g < -h.clip ? -h.clip : g;  // clamp; NaN passes through
  return g > h.clip ? h.clip : g;
}
template <bool SKIP>
inline void lion1(float p, float g, float m, const Hyper& h, float* pn, float* mn) {
  // interpolation, used only for its sign
  float c = h.b1 * m + h.omb1 * g;
  float s = (float)((c > 0.0f) - (c < 0.0f));
  // stepweight decay (decay = 1 without weight decay: exact), weight update
  *pn = p * h.decay - h.lr * s;
  // decay the momentum
  *mn = h.b2 * m + h.omb2 * g;
  if (SKIP && g == 0.0f) {
    *pn = p;
    *mn = m;
  }
}

inline int quant1(float x, const Quant& q) {
  if (x != x) return 255;  // torch.bucketize orders NaN last
  uint32_t b = f_bits(x) & 0x7FFFFFFFu;
  if (b == 0) return (int)q.zero;
  bool neg = x < 0.0f;
  uint32_t key = (b >> 16) > q.key0 ? (b >> 16) - q.key0 : 0;
  key = key < q.nb ? key : q.nb - 1;
  uint32_t e = q.lut[key + (neg ? q.nb : 0)];
  int j = (int)(e >> 17) + ((b & 0xFFFFu) >= (e & 0x1FFFFu));
  return neg ? (int)q.zero - 1 - j : (int)q.zero + 1 + j;
}

// max |v| over a buffer with the reference's NaN rule (amax propagates NaN)
inline float absmax_exact(const float* v, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    float a = std::fabs(v[i]);
    if (a != a) return NAN;
    m = a > m ? a : m;
  }
  return m;
}

// codes of buf[i] / scale, or the zero code for the whole block when !(scale > 0)
inline void quant_block_scalar(const float* buf, int64_t n, float scale, uint8_t* codes, const Quant& q) {
  if (!(scale > 0.0f)) {
    std::memset(codes, (int)q.zero, (size_t)n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) codes[i] = (uint8_t)quant1(buf[i] / scale, q);
}

// ---------------------------------------------------------------- 4-bit momentum (quant4.py)
// quant4.uniform(key, i): a multiple of 2**-24 in [0, 1)
inline float uniform4(uint32_t key, int64_t i) { return (float)(counter_hash(key, i) >> 8) * (1.0f / 16777216.0f); }
// quant4.round_to_codes with uniform u: hi = the first level >= v (torch.bucketize), clamped
// to [1, 14]; up with probability (v - lo) / (hi - lo), computed in fp32 as there
inline int round4(float v, float u, const float* q) {
  int hi = 0;
  for (int k = 0; k < LK_MAP4; ++k) hi += q[k] < v;
  hi = hi < 1 ? 1 : (hi > LK_MAP4 - 1 ? LK_MAP4 - 1 : hi);
  float lo_v = q[hi - 1], hi_v = q[hi];
  return u < (v - lo_v) / (hi_v - lo_v) ? hi : hi - 1;
}

// One block of 4-bit momentum (b0 a multiple of 32, len <= 32): decode (level x old scale),
// update, new scale (max |m_new|, NaN for NaN or inf), re-encode with stochastic rounding, two
// codes per byte (an odd tail padded with the zero code, as quant4.pack).
template <int PT, int GT, bool GSC, bool SKIP>
void block4_scalar(typename IO<PT>::T* p, const typename IO<GT>::T* g, uint8_t* codes, float* am, int64_t b0,
                   int64_t len, const Hyper& h, const float* q, uint32_t key) {
  float buf[LK_BLOCK4];
  const float sold = *am;
  for (int64_t k = 0; k < len; ++k) {
    const int64_t i = b0 + k;
    const int c = (codes[i >> 1] >> (4 * (int)(i & 1))) & 15;
    float pn, mn;
    lion1<SKIP>(IO<PT>::ld(p, i), grad_in<GSC>(IO<GT>::ld(g, i), h), q[c] * sold, h, &pn, &mn);
    st_p<PT>(p, i, pn, h);
    buf[k] = mn;
  }
  float s = absmax_exact(buf, len);
  if (std::isinf(s)) s = NAN;
  for (int64_t k = 0; k < len; k += 2) {
    int c0 = 7, c1 = 7;  // where(scale > 0, m / scale, 0): the zero code for a 0 or NaN scale
    if (s > 0.0f) {
      c0 = round4(buf[k] / s, uniform4(key, b0 + k), q);
      if (k + 1 < len) c1 = round4(buf[k + 1] / s, uniform4(key, b0 + k + 1), q);
    }
    codes[(b0 + k) >> 1] = (uint8_t)(c0 | (c1 << 4));
  }
  *am = s;
}

// 4-bit over [n0, n1) (n0 a multiple of 32), block by block
template <int PT, int GT, bool GSC, bool SKIP>
void run4_scalar(void* pv, const void* gv, uint8_t* codes, float* absmax, int64_t n0, int64_t n1, const Hyper& h,
                 const float* q, uint32_t key) {
  auto* p = (typename IO<PT>::T*)pv;
  auto* g = (const typename IO<GT>::T*)gv;
  for (int64_t b0 = n0; b0 < n1; b0 += LK_BLOCK4) {
    const int64_t len = n1 - b0 < LK_BLOCK4 ? n1 - b0 : LK_BLOCK4;
    block4_scalar<PT, GT, GSC, SKIP>(p, g, codes, absmax + b0 / LK_BLOCK4, b0, len, h, q, key);
  }
}

template <int PT, int GT, bool GSC, bool SKIP>
void run32_scalar(void* pv, const void* gv, float* m, int64_t n0, int64_t n1, const Hyper& h) {
  auto* p = (typename IO<PT>::T*)pv;
  auto* g = (const typename IO<GT>::T*)gv;
  for (int64_t i = n0; i < n1; ++i) {
    float pn, mn;
    lion1<SKIP>(IO<PT>::ld(p, i), grad_in<GSC>(IO<GT>::ld(g, i), h), m[i], h, &pn, &mn);
    st_p<PT>(p, i, pn, h);
    m[i] = mn;
  }
}

// 8-bit: new momentum of [n0, n1) into buf (from index 0), p updated if write_p; returns
// max |m_new| (NaN if any m_new is NaN).
template <int PT, int GT, bool GSC, bool SKIP>
float run8_scalar(void* pv, const void* gv, const uint8_t* codes, float sold, int64_t n0, int64_t n1,
                  const Hyper& h, const Quant& q, float* buf, bool write_p) {
  auto* p = (typename IO<PT>::T*)pv;
  auto* g = (const typename IO<GT>::T*)gv;
  for (int64_t i = n0; i < n1; ++i) {
    float pn, mn;
    lion1<SKIP>(write_p ? IO<PT>::ld(p, i) : 0.0f, grad_in<GSC>(IO<GT>::ld(g, i), h), q.qmap[codes[i]] * sold, h,
                &pn, &mn);
    if (write_p) st_p<PT>(p, i, pn, h);
    buf[i - n0] = mn;
  }
  return absmax_exact(buf, n1 - n0);
}

#if LK_AVX512
// ---------------------------------------------------------------- AVX-512
typedef __m512 V;
template <int DT> struct VIO;
template <> struct VIO<F32> {
  static V ld(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
  static void st(float* p, V v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
};
template <> struct VIO<BF16> {
  static V ld(const uint16_t* p, __mmask16 k) {
#ifdef __AVX512VBMI__
    // bf16 j (bytes 2j, 2j+1) to the high half of dword j, the low half zeroed: one vpermb
    const __m512i idx = _mm512_set_epi8(31, 30, 0, 0, 29, 28, 0, 0, 27, 26, 0, 0, 25, 24, 0, 0, 23, 22, 0, 0, 21, 20, 0, 0,
                                        19, 18, 0, 0, 17, 16, 0, 0, 15, 14, 0, 0, 13, 12, 0, 0, 11, 10, 0, 0, 9, 8, 0, 0, 7,
                                        6, 0, 0, 5, 4, 0, 0, 3, 2, 0, 0, 1, 0, 0, 0);
    const __m512i raw = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(k, p));
    return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi8((__mmask64)0xCCCCCCCCCCCCCCCCull, idx, raw));
#else
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
#endif
  }
  // round to nearest even in integer arithmetic (f_to_bf16 on 16 lanes)
  static __m256i round_int(V v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  // vcvtneps2bf16 rounds to nearest even but flushes subnormal inputs to zero (it ignores
  // MXCSR); a vector holding one (fpclass 0x20) takes the integer rounding instead
  static void st(uint16_t* p, V v, __mmask16 k) {
    if (__builtin_expect(_mm512_fpclass_ps_mask(v, 0x20) != 0, 0))
      _mm256_mask_storeu_epi16(p, k, round_int(v));
    else
      _mm256_mask_storeu_epi16(p, k, (__m256i)_mm512_cvtneps_pbh(v));
  }
  // the same, for v known to hold no subnormal number
  static void st_normal(uint16_t* p, V v, __mmask16 k) { _mm256_mask_storeu_epi16(p, k, (__m256i)_mm512_cvtneps_pbh(v)); }
  // 32 values (v0 then v1, neither holding a subnormal number) with one vcvtne2ps2bf16: the
  // conversion costs half as much per element as two vcvtneps2bf16
  static void st_normal2(uint16_t* p, V v0, V v1) { _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(v1, v0)); }
#else
  static void st(uint16_t* p, V v, __mmask16 k) { _mm256_mask_storeu_epi16(p, k, round_int(v)); }
  static void st_normal(uint16_t* p, V v, __mmask16 k) { st(p, v, k); }
  static void st_normal2(uint16_t* p, V v0, V v1) {
    st(p, v0, 0xFFFF);
    st(p + 16, v1, 0xFFFF);
  }
#endif
};
template <> struct VIO<F16> {
  static V ld(const uint16_t* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }
  static void st(uint16_t* p, V v, __mmask16 k) {
    _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

struct VHyper {
  V lr, b1, omb1, b2, omb2, decay, gscale, lo, hi;
  bool sr;
  // lr >= 2^-100: p * decay -+ lr is then 0 or a normal number (a nonzero difference of two
  // such numbers is at least half an ulp of lr), so only a lane without a step can be subnormal
  bool big_lr;
  uint32_t srkey;
  explicit VHyper(const Hyper& h)
      : lr(_mm512_set1_ps(h.lr)), b1(_mm512_set1_ps(h.b1)), omb1(_mm512_set1_ps(h.omb1)),
        b2(_mm512_set1_ps(h.b2)), omb2(_mm512_set1_ps(h.omb2)), decay(_mm512_set1_ps(h.decay)),
        gscale(_mm512_set1_ps(h.gscale)), lo(_mm512_set1_ps(-h.clip)), hi(_mm512_set1_ps(h.clip)), sr(h.sr),
        big_lr(h.lr >= 0x1p-100f), srkey(h.srkey) {}
};

inline __m512i vlowbias32(__m512i x) {  // lowbias32 on 16 lanes
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846CA68Bu));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
inline __m512i vmix32(__m512i x) {  // mix32 on 16 lanes (vpmulld: the low 32 bits, as uint32 *)
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x2C1B3C6D));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x297A2D39));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// Lanes k of v into dst[0..15] as bf16, rounded stochastically as elements i..i+15 of their
// tensor (f_to_bf16_sr on 16 lanes)
inline void vst_bf16_sr(uint16_t* dst, int64_t i, V v, __mmask16 k, uint32_t key) {
  const uint64_t i0 = (uint64_t)i;
  if ((i0 >> 32) != ((i0 + 15) >> 32)) {  // the 16 indices straddle 2**32 (once per 4G elements)
    alignas(64) float vals[16];
    _mm512_store_ps(vals, v);
    for (int l = 0; l < 16; ++l)
      if (k >> l & 1) dst[l] = f_to_bf16_sr(vals[l], key, i + l);
    return;
  }
  const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const uint32_t hi = (uint32_t)(i0 >> 32), salt = key ^ (hi ? lowbias32(hi) : 0u);
  __m512i x = _mm512_xor_si512(_mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)i0), iota),
                               _mm512_set1_epi32((int)salt));
  const __m512i noise = _mm512_srli_epi32(vlowbias32(x), 16);
  const __m512i u = _mm512_castps_si512(v);
  const __m512i expo = _mm512_set1_epi32(0x7F800000);
  const __mmask16 fin = _mm512_mask_cmpneq_epi32_mask(k, _mm512_and_si512(u, expo), expo);
  _mm256_mask_storeu_epi16(dst, fin, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(u, noise), 16)));
  if (fin != k) VIO<BF16>::st(dst, v, k & (__mmask16)~fin);  // NaN and inf: to nearest
}
// A parameter's store (elements i..i+15 of its tensor, lanes k): st_p on 16 lanes. stepped:
// the lanes that took a step (vlion), where a bf16 store needs no subnormal check
template <int PT>
inline void vst_p(typename IO<PT>::T* p, int64_t i, V v, __mmask16 k, const VHyper& h, __mmask16 stepped = 0) {
  if constexpr (PT == BF16) {
    if (h.sr) {
      vst_bf16_sr(p + i, i, v, k, h.srkey);
      return;
    }
    if (stepped == 0xFFFF && h.big_lr) {
      VIO<BF16>::st_normal(p + i, v, k);
      return;
    }
  }
  VIO<PT>::st(p + i, v, k);
}

// Two whole vectors of a parameter (elements i..i+31): vst_p on each, or, when both hold no
// subnormal number (as vst_p decides it), one conversion for the pair
template <int PT>
inline void vst_p2(typename IO<PT>::T* p, int64_t i, V v0, V v1, const VHyper& h, __mmask16 stepped0,
                   __mmask16 stepped1) {
  if constexpr (PT == BF16) {
    if (!h.sr && (stepped0 & stepped1) == 0xFFFF && h.big_lr) {
      VIO<BF16>::st_normal2(p + i, v0, v1);
      return;
    }
  }
  vst_p<PT>(p, i, v0, 0xFFFF, h, stepped0);
  vst_p<PT>(p, i + 16, v1, 0xFFFF, h, stepped1);
}

template <bool GSC>
inline V vgrad_in(V g, const VHyper& h) {
  if (!GSC) return g;
  g = _mm512_mul_ps(g, h.gscale);
  // max/min return their second operand when either is NaN, so NaN passes as in clamp
  return _mm512_min_ps(h.hi, _mm512_max_ps(h.lo, g));
}
template <bool SKIP>
inline void vlion(V p, V g, V m, const VHyper& h, V* pn, V* mn, __mmask16* stepped = nullptr) {
  const V zero = _mm512_setzero_ps();
  // interpolation, used only for its sign
  V c = _mm512_add_ps(_mm512_mul_ps(h.b1, m), _mm512_mul_ps(h.omb1, g));
  // lr * sign(c): lr with c's sign bit where c != 0 (NaN compares unequal: 0, as sign(NaN))
  __mmask16 nz = _mm512_cmp_ps_mask(c, zero, _CMP_NEQ_OQ);
  V step = _mm512_castsi512_ps(_mm512_maskz_ternarylogic_epi32(
      nz, _mm512_castps_si512(c), _mm512_set1_epi32(INT32_MIN), _mm512_castps_si512(h.lr), 0xEA /* (a & b) | c */));
  // stepweight decay, weight update
  V pp = _mm512_sub_ps(_mm512_mul_ps(p, h.decay), step);
  // decay the momentum
  V mm = _mm512_add_ps(_mm512_mul_ps(h.b2, m), _mm512_mul_ps(h.omb2, g));
  if (SKIP) {
    __mmask16 z = _mm512_cmp_ps_mask(g, zero, _CMP_EQ_OQ);
    pp = _mm512_mask_mov_ps(pp, z, p);
    mm = _mm512_mask_mov_ps(mm, z, m);
    nz &= (__mmask16)~z;
  }
  *pn = pp;
  *mn = mm;
  if (stepped) *stepped = nz;
}

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

// Block maxima of |m_new|: the bit patterns of |v| folded into a running max (patterns of
// non-negative floats order as their values, and those of inf and NaN above every finite one,
// so the NaN rule needs no second reduction), then read out as absmax_exact would.
inline __m512i vmax_abs_bits(__m512i acc, V v) {
  return _mm512_max_epu32(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF)), acc);
}
inline float max_abs_of(__m512i acc) {
  const uint32_t s = (uint32_t)_mm512_reduce_max_epu32(acc);
  return s <= 0x7F800000u ? bits_f(s) : NAN;
}

template <int PT, int GT, bool GSC, bool SKIP>
inline void step32_16(typename IO<PT>::T* p, const typename IO<GT>::T* g, float* m, int64_t i, const VHyper& h,
                      __mmask16 k) {  // elements i..i+15 (lanes k)
  V pn, mn;
  __mmask16 stepped;
  vlion<SKIP>(VIO<PT>::ld(p + i, k), vgrad_in<GSC>(VIO<GT>::ld(g + i, k), h), _mm512_maskz_loadu_ps(k, m + i), h, &pn,
              &mn, &stepped);
  vst_p<PT>(p, i, pn, k, h, stepped | (__mmask16)~k);
  _mm512_mask_storeu_ps(m + i, k, mn);
}

template <int PT, int GT, bool GSC, bool SKIP>
void run32_vec(void* pv, const void* gv, float* m, int64_t n0, int64_t n1, const Hyper& hs) {
  auto* p = (typename IO<PT>::T*)pv;
  auto* g = (const typename IO<GT>::T*)gv;
  VHyper h(hs);
  int64_t i = n0;
  for (; i + 16 <= n1; i += 16) step32_16<PT, GT, GSC, SKIP>(p, g, m, i, h, (__mmask16)0xFFFF);
  if (i < n1) step32_16<PT, GT, GSC, SKIP>(p, g, m, i, h, tail_mask(n1 - i));
}

// 16 lanes of the 8-bit update (elements i..i+15 of p and g, lanes k) from the map values mq
// of their codes: dequantize (times the old scale), update (p read if READ_P); the parameter's
// new value and the lanes that took a step into *pn and *stepped; returns the new momentum.
template <int PT, int GT, bool GSC, bool SKIP, bool READ_P>
inline V update8_16(const typename IO<PT>::T* p, const typename IO<GT>::T* g, int64_t i, V mq, V sold,
                    const VHyper& h, __mmask16 k, V* pn, __mmask16* stepped) {
  V mn;
  vlion<SKIP>(READ_P ? VIO<PT>::ld(p + i, k) : _mm512_setzero_ps(), vgrad_in<GSC>(VIO<GT>::ld(g + i, k), h),
              _mm512_mul_ps(mq, sold), h, pn, &mn, stepped);
  return mn;
}
// the same with p written back if WRITE_P; returns the new momentum (0 outside k)
template <int PT, int GT, bool GSC, bool SKIP, bool WRITE_P>
inline V step8_16m(typename IO<PT>::T* p, const typename IO<GT>::T* g, int64_t i, V mq, V sold, const VHyper& h,
                   __mmask16 k) {
  V pn;
  __mmask16 stepped;
  V mn = update8_16<PT, GT, GSC, SKIP, WRITE_P>(p, g, i, mq, sold, h, k, &pn, &stepped);
  if (WRITE_P) vst_p<PT>(p, i, pn, k, h, stepped | (__mmask16)~k);
  return k == 0xFFFF ? mn : _mm512_maskz_mov_ps(k, mn);
}

// the same, looking the 16 codes (codes[i..]) up in the map with a gather
template <int PT, int GT, bool GSC, bool SKIP, bool WRITE_P>
inline V step8_16(typename IO<PT>::T* p, const typename IO<GT>::T* g, const uint8_t* codes, int64_t i, V sold,
                  const VHyper& h, const float* qmap, __mmask16 k) {
  __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, codes + i));
  return step8_16m<PT, GT, GSC, SKIP, WRITE_P>(p, g, i, _mm512_i32gather_ps(idx, qmap, 4), sold, h, k);
}

#ifdef __AVX512VBMI__
// Map lookup of 64 codes without a gather, for a map symmetric around its zero code 127 (the
// dynamic map; quant_fast flags it): each byte of the fp32 magnitudes |m[127 + j]| (j = 1..127,
// with m[255] at j = 0) is a 128-entry byte table in two registers, looked up for 64 codes at
// once with one vpermi2b by |c - 127| (as a byte: c = 255 wraps to 128, i.e. entry 0), zeroed
// for c = 127, the sign bit set for c < 127; the four byte planes are interleaved back into 64
// floats. The codes are pre-permuted so that the interleave (which works within 128-bit lanes)
// yields elements in order. ~20 instructions per 64 codes instead of 4 gathers, which stall
// the core while the stream of p and g is in flight.
struct VDeq {
  __m512i t[4][2];  // [byte plane][64-entry half]
  __m512i perm, c127, sign;
  explicit VDeq(const Quant& q) : c127(_mm512_set1_epi8(127)), sign(_mm512_set1_epi8((char)0x80)) {
    alignas(64) uint8_t planes[4][128];
    for (int j = 0; j < 128; ++j) {
      uint32_t u = f_bits(q.qmap[j == 0 ? 255 : 127 + j]);
      for (int b = 0; b < 4; ++b) planes[b][j] = (uint8_t)(u >> (8 * b));
    }
    for (int b = 0; b < 4; ++b)
      for (int k = 0; k < 2; ++k) t[b][k] = _mm512_load_si512(planes[b] + 64 * k);
    alignas(64) uint8_t pm[64];
    for (int r = 0; r < 4; ++r)
      for (int lane = 0; lane < 4; ++lane)
        for (int u = 0; u < 4; ++u) pm[16 * lane + 8 * (r >> 1) + 4 * (r & 1) + u] = (uint8_t)(16 * r + 4 * lane + u);
    perm = _mm512_load_si512(pm);
  }
  // map values of codes[0..63] into out[0..3] (elements 0-15, 16-31, 32-47, 48-63)
  __attribute__((always_inline)) inline void lookup(const uint8_t* codes, V out[4]) const {
    const __m512i c = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(codes));
    const __m512i d = _mm512_sub_epi8(c, c127);
    const __m512i j = _mm512_abs_epi8(d);
    const __mmask64 nz = _mm512_test_epi8_mask(d, d), neg = _mm512_cmplt_epu8_mask(c, c127);
    __m512i pl[4];
    for (int b = 0; b < 4; ++b) pl[b] = _mm512_maskz_permutex2var_epi8(nz, t[b][0], j, t[b][1]);
    pl[3] = _mm512_mask_add_epi8(pl[3], neg, pl[3], sign);
    const __m512i w01l = _mm512_unpacklo_epi8(pl[0], pl[1]), w01h = _mm512_unpackhi_epi8(pl[0], pl[1]);
    const __m512i w23l = _mm512_unpacklo_epi8(pl[2], pl[3]), w23h = _mm512_unpackhi_epi8(pl[2], pl[3]);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01l, w23l));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01l, w23l));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01h, w23h));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01h, w23h));
  }
};
#endif

template <int PT, int GT, bool GSC, bool SKIP, bool WRITE_P>
float run8_vec_t(void* pv, const void* gv, const uint8_t* codes, float sold, int64_t n0, int64_t n1, const Hyper& hs,
                 const Quant& q, float* buf) {
  auto* p = (typename IO<PT>::T*)pv;
  auto* g = (const typename IO<GT>::T*)gv;
  const int64_t n = n1 - n0;
  VHyper h(hs);
  const V vs = _mm512_set1_ps(sold);
  __m512i amax = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 16 <= n || i < n; i += 16) {
    __mmask16 k = i + 16 <= n ? (__mmask16)0xFFFF : tail_mask(n - i);
    V mn = k == 0xFFFF ? step8_16<PT, GT, GSC, SKIP, WRITE_P>(p, g, codes, n0 + i, vs, h, q.qmap, 0xFFFF)
                       : step8_16<PT, GT, GSC, SKIP, WRITE_P>(p, g, codes, n0 + i, vs, h, q.qmap, k);
    _mm512_store_ps(buf + i, mn);  // buf holds whole vectors
    amax = vmax_abs_bits(amax, mn);
  }
  return max_abs_of(amax);
}

// 8-bit: new momentum of [n0, n1) into buf (from index 0), p updated if write_p; returns
// max |m_new| (NaN if any m_new is NaN).
template <int PT, int GT, bool GSC, bool SKIP>
float run8_vec(void* pv, const void* gv, const uint8_t* codes, float sold, int64_t n0, int64_t n1, const Hyper& hs,
               const Quant& q, float* buf, bool write_p) {
  return write_p ? run8_vec_t<PT, GT, GSC, SKIP, true>(pv, gv, codes, sold, n0, n1, hs, q, buf)
                 : run8_vec_t<PT, GT, GSC, SKIP, false>(pv, gv, codes, sold, n0, n1, hs, q, buf);
}

// Codes of 16 values in [-1, 1] with the code-valued table (quant_fast.code_table, one entry
// per top 16 bits of x): the entry plus the low 16 bits of x (complemented when negative),
// shifted right by 17, is the code; +-0 included. 5 instructions and one gather per 16 values.
struct VQuant {
  __m512i low16;
  const int* tab;
  explicit VQuant(const Quant& q) : low16(_mm512_set1_epi32(0xFFFF)), tab((const int*)q.lut2) {}
  __m512i codes(V x) const {
    const __m512i xb = _mm512_castps_si512(x);
    const __m512i e = _mm512_i32gather_epi32(_mm512_srli_epi32(xb, 16), tab, 4);
    const __m512i low = _mm512_ternarylogic_epi32(xb, low16, _mm512_srai_epi32(xb, 31), 0x6A /* (a & b) ^ c */);
    return _mm512_srli_epi32(_mm512_add_epi32(e, low), 17);
  }
};

// codes of buf[i] / scale for one block
inline void quant_block_vec(const float* buf, int64_t n, float scale, uint8_t* codes, const Quant& q) {
  if (!(scale > 0.0f) || scale == INFINITY) {  // all-zero block, NaN or inf: the exact scalar path
    quant_block_scalar(buf, n, scale, codes, q);
    return;
  }
  const VQuant vq(q);
  const V vs = _mm512_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    V x = _mm512_div_ps(_mm512_loadu_ps(buf + i), vs);  // IEEE division, as the reference
    _mm_storeu_si128((__m128i*)(codes + i), _mm512_cvtepi32_epi8(vq.codes(x)));
  }
  if (i < n) {
    __mmask16 k = tail_mask(n - i);
    V x = _mm512_div_ps(_mm512_maskz_loadu_ps(k, buf + i), vs);
    _mm_mask_storeu_epi8(codes + i, k, _mm512_cvtepi32_epi8(vq.codes(x)));
  }
}
// Elements ahead whose lines the 8-bit pipeline asks for (software prefetch into L2): the
// hardware prefetchers alone leave the compute-heavy 8-bit loop waiting on memory (measured on
// Emerald Rapids, 2 threads out of cache: 7-9% faster at 512-1024, less at 4096)
constexpr int64_t LK_PREFETCH = 1024;

// Block-wise 8-bit over [n0, n1) (n0 a multiple of the block size), software-pipelined: the
// update of block b (memory-bound: p, g, codes come from DRAM) runs interleaved with the
// requantization of block b-1 (compute: division, bucket lookup), whose absmax is known by
// then, so the core has independent work while loads are in flight. Same results as running
// the two phases one block after the other.
template <int PT, int GT, bool GSC, bool SKIP>
void run8_block_pipe(void* pv, const void* gv, uint8_t* codes, float* absmax, int64_t n0, int64_t n1,
                     const Hyper& hs, const Quant& q) {
  auto* p = (typename IO<PT>::T*)pv;
  auto* g = (const typename IO<GT>::T*)gv;
  alignas(64) float bufs[2][LK_BLOCK];
  const VHyper h(hs);
  const VQuant vq(q);
#ifdef __AVX512VBMI__
  const VDeq deq(q);
#endif
  const bool sym = q.sym;
  // 64 codes packed from four vectors of 16 by two in-lane packs hold, in 128-bit lane L,
  // codes 4L..4L+3 of each vector: one dword permutation puts them back in element order
  const __m512i packed = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  int cur = 0;
  int64_t prev0 = -1, prev_len = 0;
  float s_prev = 0.0f;
  for (int64_t b0 = n0;; b0 += LK_BLOCK) {
    const int64_t len = b0 < n1 ? (n1 - b0 < LK_BLOCK ? n1 - b0 : LK_BLOCK) : 0;
    float* bn = bufs[cur];
    if (b0 + LK_PREFETCH + LK_BLOCK <= n1) {  // p, g and codes of the block LK_PREFETCH ahead, into L2
      const char* pa = (const char*)(p + b0 + LK_PREFETCH);
      const char* ga = (const char*)(g + b0 + LK_PREFETCH);
      for (int l = 0; l < (int)(LK_BLOCK * sizeof(*p)); l += 64) _mm_prefetch(pa + l, _MM_HINT_T1);
      for (int l = 0; l < (int)(LK_BLOCK * sizeof(*g)); l += 64) _mm_prefetch(ga + l, _MM_HINT_T1);
      for (int l = 0; l < (int)LK_BLOCK; l += 64) _mm_prefetch((const char*)(codes + b0 + LK_PREFETCH) + l, _MM_HINT_T1);
    }
    const float* bp = bufs[cur ^ 1];
    // the previous block's scale: a normal positive number, or the exact scalar path
    int64_t qlen = prev0 >= 0 ? prev_len : 0;
    if (qlen && (!(s_prev > 0.0f) || s_prev == INFINITY)) {
      quant_block_scalar(bp, qlen, s_prev, codes + prev0, q);
      qlen = 0;
    }
    const V sold = _mm512_set1_ps(len ? absmax[b0 / LK_BLOCK] : 0.0f);
    const V sq = _mm512_set1_ps(s_prev);
    __m512i amax = _mm512_setzero_si512();  // max |m_new| of this block (vmax_abs_bits)
    if (len == LK_BLOCK && (qlen == 0 || qlen == LK_BLOCK)) {  // the common case: whole blocks
      // the block's 4 x 64 elements, with (requantize: the previous block's codes) or without
      auto whole = [&](auto requantize) {
        constexpr bool RQ = decltype(requantize)::value;
        for (int64_t i = 0; i < LK_BLOCK; i += 64) {
          V mq[4];
#ifdef __AVX512VBMI__
          if (sym) {
            deq.lookup(codes + b0 + i, mq);
          } else
#endif
          {
            for (int r = 0; r < 4; ++r)
              mq[r] = _mm512_i32gather_ps(
                  _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(codes + b0 + i + 16 * r))), q.qmap, 4);
          }
          __m512i cv[4];
          // vector r's new momentum: into the block buffer and its max; the previous block's codes
          auto keep = [&](int r, V mn) {
            const int64_t o = i + 16 * r;
            _mm512_store_ps(bn + o, mn);
            amax = vmax_abs_bits(amax, mn);
            if constexpr (RQ)  // IEEE division, as the reference
              cv[r] = vq.codes(_mm512_div_ps(_mm512_load_ps(bp + o), sq));
          };
          if constexpr (PT != BF16) {  // vector by vector (the pairs below cost fp32 3%)
#pragma GCC unroll 4
            for (int r = 0; r < 4; ++r)
              keep(r, step8_16m<PT, GT, GSC, SKIP, true>(p, g, b0 + i + 16 * r, mq[r], sold, h, 0xFFFF));
          } else {  // bf16: two vectors at a time, one conversion of p for both
#pragma GCC unroll 2
            for (int r = 0; r < 4; r += 2) {
              V pn[2];
              __mmask16 stepped[2];
#pragma GCC unroll 2
              for (int u = 0; u < 2; ++u)
                keep(r + u, update8_16<PT, GT, GSC, SKIP, true>(p, g, b0 + i + 16 * (r + u), mq[r + u], sold, h,
                                                                 0xFFFF, &pn[u], &stepped[u]));
              vst_p2<PT>(p, b0 + i + 16 * r, pn[0], pn[1], h, stepped[0], stepped[1]);
            }
          }
          if constexpr (RQ) {
            const __m512i b = _mm512_packus_epi16(_mm512_packus_epi32(cv[0], cv[1]), _mm512_packus_epi32(cv[2], cv[3]));
            _mm512_storeu_si512(codes + prev0 + i, _mm512_permutexvar_epi32(packed, b));
          }
        }
      };
      if (qlen)
        whole(std::true_type{});
      else
        whole(std::false_type{});
    } else {  // a partial block on either side
      for (int64_t i = 0; i < (len > qlen ? len : qlen); i += 16) {
        if (i < len) {
          __mmask16 k = tail_mask(len - i);
          V mn = step8_16<PT, GT, GSC, SKIP, true>(p, g, codes, b0 + i, sold, h, q.qmap, k);
          _mm512_store_ps(bn + i, mn);
          amax = vmax_abs_bits(amax, mn);
        }
        if (i < qlen) {
          __mmask16 k = tail_mask(qlen - i);
          V x = _mm512_div_ps(_mm512_maskz_loadu_ps(k, bp + i), sq);
          _mm_mask_storeu_epi8(codes + prev0 + i, k, _mm512_cvtepi32_epi8(vq.codes(x)));
        }
      }
    }
    if (prev0 >= 0) absmax[prev0 / LK_BLOCK] = s_prev;
    if (!len) break;
    float s = max_abs_of(amax);
    if (std::isinf(s)) s = NAN;  // as quant.block_absmax: 8 bits cannot hold inf, the block decodes to NaN
    prev0 = b0;
    prev_len = len;
    s_prev = s;
    cur ^= 1;
  }
}
// ---------------------------------------------------------------- 4-bit, AVX-512

// Whole blocks of 32 in registers: the 15 levels sit in one register (lane 15: +inf), so the
// decode is one vpermps, the neighbour search a branchless 4-step binary search of vpermps and
// compares (lower_bound = torch.bucketize), and the uniforms are quant4.uniform on 16 lanes. A
// partial block (only at a tensor's end) takes the scalar path. Same results bit for bit.
template <int PT, int GT, bool GSC, bool SKIP>
void run4_vec(void* pv, const void* gv, uint8_t* codes, float* absmax, int64_t n0, int64_t n1, const Hyper& hs,
              const float* qm, uint32_t key) {
  auto* p = (typename IO<PT>::T*)pv;
  auto* g = (const typename IO<GT>::T*)gv;
  const VHyper h(hs);
  alignas(64) float qa[16];
  for (int k = 0; k < LK_MAP4; ++k) qa[k] = qm[k];
  qa[15] = INFINITY;
  const V vq = _mm512_load_ps(qa);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i one = _mm512_set1_epi32(1), vkey = _mm512_set1_epi32((int)key);
  const V two24 = _mm512_set1_ps(1.0f / 16777216.0f);
  const __m128i nib = _mm_set1_epi8(0x0F), pair = _mm_set1_epi16(0x1001);  // bytes (1, 16): c0 + 16 c1
  for (int64_t b0 = n0; b0 < n1; b0 += LK_BLOCK4) {
    float* am = absmax + b0 / LK_BLOCK4;
    if (n1 - b0 < LK_BLOCK4) {
      block4_scalar<PT, GT, GSC, SKIP>(p, g, codes, am, b0, n1 - b0, hs, qm, key);
      break;
    }
    uint8_t* cb = codes + (b0 >> 1);
    const __m128i bytes = _mm_loadu_si128((const __m128i*)cb);
    const __m128i lo = _mm_and_si128(bytes, nib), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
    const __m128i c8[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};  // elements 0-15, 16-31
    const V sold = _mm512_set1_ps(*am);
    V mn[2];
    for (int r = 0; r < 2; ++r) {
      const int64_t i = b0 + 16 * r;
      V m = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(c8[r]), vq), sold);
      V pn;
      __mmask16 stepped;
      vlion<SKIP>(VIO<PT>::ld(p + i, 0xFFFF), vgrad_in<GSC>(VIO<GT>::ld(g + i, 0xFFFF), h), m, h, &pn, &mn[r], &stepped);
      vst_p<PT>(p, i, pn, 0xFFFF, h, stepped);
    }
    float s = max_abs_of(vmax_abs_bits(vmax_abs_bits(_mm512_setzero_si512(), mn[0]), mn[1]));
    if (std::isinf(s)) s = NAN;
    if (!(s > 0.0f)) {  // a zero or NaN scale: every element gets the zero code
      std::memset(cb, 0x77, LK_BLOCK4 / 2);
      *am = s;
      continue;
    }
    const V vs = _mm512_set1_ps(s);
    const uint32_t top = (uint32_t)((uint64_t)b0 >> 32);
    const __m512i fold = _mm512_set1_epi32(top ? (int)mix32(top) : 0);
    __m128i out[2];
    for (int r = 0; r < 2; ++r) {
      const V v = _mm512_div_ps(mn[r], vs);  // IEEE division, as the reference
      __m512i cnt = _mm512_setzero_si512();  // levels below v: 8, 4, 2, 1 steps of lower_bound
      for (int step = 8; step >= 1; step >>= 1) {
        const __m512i cand = _mm512_add_epi32(cnt, _mm512_set1_epi32(step));
        const V t = _mm512_permutexvar_ps(_mm512_sub_epi32(cand, one), vq);
        cnt = _mm512_mask_mov_epi32(cnt, _mm512_cmp_ps_mask(t, v, _CMP_LT_OQ), cand);
      }
      const __m512i hi_i = _mm512_max_epi32(_mm512_min_epi32(cnt, _mm512_set1_epi32(LK_MAP4 - 1)), one);
      const __m512i lo_i = _mm512_sub_epi32(hi_i, one);
      const V lo_v = _mm512_permutexvar_ps(lo_i, vq), hi_v = _mm512_permutexvar_ps(hi_i, vq);
      const V pu = _mm512_div_ps(_mm512_sub_ps(v, lo_v), _mm512_sub_ps(hi_v, lo_v));
      const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)(b0 + 16 * r)), lane);
      const __m512i hsh = vmix32(_mm512_xor_si512(_mm512_xor_si512(vmix32(idx), fold), vkey));
      const V u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(hsh, 8)), two24);
      const __m512i code = _mm512_mask_mov_epi32(lo_i, _mm512_cmp_ps_mask(u, pu, _CMP_LT_OQ), hi_i);
      out[r] = _mm_maddubs_epi16(_mm512_cvtepi32_epi8(code), pair);  // 8 words c[2j] + 16 c[2j+1]
    }
    _mm_storeu_si128((__m128i*)cb, _mm_packus_epi16(out[0], out[1]));
    *am = s;
  }
}

#define LK_RUN4 run4_vec
#define LK_RUN32 run32_vec
#define LK_RUN8 run8_vec
#define LK_QUANT quant_block_vec
#define LK_PIPE 1
#else
#define LK_RUN4 run4_scalar
#define LK_RUN32 run32_scalar
#define LK_RUN8 run8_scalar
#define LK_QUANT quant_block_scalar
#define LK_PIPE 0
#endif  // LK_AVX512

// ---------------------------------------------------------------- one chunk of one tensor
// pass 0: the update (8-bit per-tensor: returns the chunk's max |m_new|, codes untouched);
// pass 1 (8-bit per-tensor only): recompute m_new from the old codes, quantize with `scale`.
template <int PT, int GT, bool GSC, bool SKIP>
float chunk_impl(const Tensor& t, int64_t n0, int64_t n1, int pass, float scale, const Quant& q) {
  alignas(64) float buf[LK_BLOCK];
  if (t.mode == MOM4) {
    LK_RUN4<PT, GT, GSC, SKIP>(t.p, t.g, (uint8_t*)t.m, t.absmax, n0, n1, t.h, t.map4, t.key);
    return 0.0f;
  }
  if (t.mode == MOM32) {
    LK_RUN32<PT, GT, GSC, SKIP>(t.p, t.g, (float*)t.m, n0, n1, t.h);
    return 0.0f;
  }
  auto* codes = (uint8_t*)t.m;
#if LK_PIPE
  if (t.mode == MOM8_BLOCK) {
    run8_block_pipe<PT, GT, GSC, SKIP>(t.p, t.g, codes, t.absmax, n0, n1, t.h, q);
    return 0.0f;
  }
#endif
  float amax = 0.0f;
  for (int64_t b0 = n0; b0 < n1; b0 += LK_BLOCK) {
    int64_t b1 = b0 + LK_BLOCK < n1 ? b0 + LK_BLOCK : n1;
    if (t.mode == MOM8_BLOCK) {
      float* am = t.absmax + b0 / LK_BLOCK;
      float s = LK_RUN8<PT, GT, GSC, SKIP>(t.p, t.g, codes, *am, b0, b1, t.h, q, buf, true);
      if (std::isinf(s)) s = NAN;  // as quant.block_absmax: 8 bits cannot hold inf, the block decodes to NaN
      LK_QUANT(buf, b1 - b0, s, codes + b0, q);
      *am = s;
    } else {
      float s = LK_RUN8<PT, GT, GSC, SKIP>(t.p, t.g, codes, t.absmax[0], b0, b1, t.h, q, buf, pass == 0);
      if (pass == 1) LK_QUANT(buf, b1 - b0, scale, codes + b0, q);
      amax = (s != s || amax != amax) ? NAN : (s > amax ? s : amax);
    }
  }
  return amax;
}

template <int PT, int GT>
float chunk_flags(const Tensor& t, int64_t n0, int64_t n1, int pass, float scale, const Quant& q) {
  if (t.gsc) return t.skip ? chunk_impl<PT, GT, true, true>(t, n0, n1, pass, scale, q)
                           : chunk_impl<PT, GT, true, false>(t, n0, n1, pass, scale, q);
  return t.skip ? chunk_impl<PT, GT, false, true>(t, n0, n1, pass, scale, q)
                : chunk_impl<PT, GT, false, false>(t, n0, n1, pass, scale, q);
}

float run_chunk(const Tensor& t, int64_t n0, int64_t n1, int pass, float scale, const Quant& q) {
  if (t.pdt == F32) return run_chunk_f32(t, n0, n1, pass, scale, q);
  if (t.pdt == F16) return run_chunk_f16(t, n0, n1, pass, scale, q);
  return run_chunk_bf16(t, n0, n1, pass, scale, q);
}

}  // namespace

// The per-dtype parts: all of them in a single-file build, one with -DLK_ONLY_PART=k.
#if !defined(LK_ONLY_MAIN) && (!defined(LK_ONLY_PART) || LK_ONLY_PART == 0)
float lk::run_chunk_f32(const Tensor& t, int64_t n0, int64_t n1, int pass, float scale, const Quant& q) {
  return chunk_flags<F32, F32>(t, n0, n1, pass, scale, q);
}
#endif
#if !defined(LK_ONLY_MAIN) && (!defined(LK_ONLY_PART) || LK_ONLY_PART == 1)
float lk::run_chunk_f16(const Tensor& t, int64_t n0, int64_t n1, int pass, float scale, const Quant& q) {
  return t.gdt == F32 ? chunk_flags<F16, F32>(t, n0, n1, pass, scale, q) : chunk_flags<F16, F16>(t, n0, n1, pass, scale, q);
}
#endif
#if !defined(LK_ONLY_MAIN) && (!defined(LK_ONLY_PART) || LK_ONLY_PART == 2)
float lk::run_chunk_bf16(const Tensor& t, int64_t n0, int64_t n1, int pass, float scale, const Quant& q) {
  return t.gdt == F32 ? chunk_flags<BF16, F32>(t, n0, n1, pass, scale, q)
                      : chunk_flags<BF16, BF16>(t, n0, n1, pass, scale, q);
}
#endif

#if !defined(LK_ONLY_PART)  // the entry points
extern "C" {

// The instruction set this build vectorises with: 512 (AVX-512) or 0 (portable scalar code).
int lk_isa() { return LK_AVX512 ? 512 : 0; }

// One Lion step over n tensors. Per tensor i: pointers p[i], g[i], m[i] (fp32 momentum or
// uint8 codes), absmax[i] (8- and 4-bit), numel[i], map4[i] (4-bit: its 15 fp32 levels);
// info[6i..6i+5] = {mode, p dtype, g dtype, flags, 4-bit rounding key, stochastic rounding key
// of a bf16 parameter (keys: uint32 bits)} (flags: 1 skip_zeros, 2 grad scale or clip present,
// 4 bf16 parameter rounded stochastically); hyper[8i..8i+7] = {lr, b1, 1-b1, b2, 1-b2,
// 1-lr*wd (or 1), grad_scale, clip (or inf)}. qc: quant_fast.kernel_constants.
// Returns 0, or -1 if qc is not a constants array.
int lk_step(int n, const int64_t* p, const int64_t* g, const int64_t* m, const int64_t* absmax,
            const int64_t* numel, const int64_t* map4, const int32_t* info, const float* hyper, const uint32_t* qc,
            int nthreads) {
  if (qc[0] != QC_MAGIC) return -1;
  const Quant q(qc);
  std::vector<Tensor> ts((size_t)n);
  std::vector<int64_t> first((size_t)n + 1, 0);  // index of each tensor's first chunk
  bool any_per_tensor = false;
  for (int i = 0; i < n; ++i) {
    Tensor& t = ts[(size_t)i];
    t.p = (void*)p[i];
    t.g = (const void*)g[i];
    t.m = (void*)m[i];
    t.absmax = (float*)absmax[i];
    t.n = numel[i];
    t.map4 = (const float*)map4[i];
    const int32_t* inf = info + LK_NINFO * i;
    t.mode = inf[0];
    t.pdt = inf[1];
    t.gdt = inf[2];
    t.skip = (inf[3] & 1) != 0;
    t.gsc = (inf[3] & 2) != 0;
    t.key = (uint32_t)inf[4];
    std::memcpy(&t.h, hyper + 8 * i, 8 * sizeof(float));
    t.h.sr = (inf[3] & 4) != 0 && t.pdt == BF16;
    t.h.srkey = (uint32_t)inf[5];
    any_per_tensor |= t.mode == MOM8_TENSOR;
    first[(size_t)i + 1] = first[(size_t)i] + (t.n + LK_CHUNK - 1) / LK_CHUNK;
  }
  const int64_t nchunks = first[(size_t)n];
  std::vector<int32_t> owner((size_t)nchunks);
  for (int i = 0; i < n; ++i)
    for (int64_t c = first[(size_t)i]; c < first[(size_t)i + 1]; ++c) owner[(size_t)c] = i;
  std::vector<float> part(any_per_tensor ? (size_t)nchunks : 0);
  // Small steps run on the calling thread: waking a thread team costs more than the work, and
  // on a busy machine the barrier waits for a descheduled thread.
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += ts[(size_t)i].n;
  if (total < 4 * LK_CHUNK || nthreads < 1) nthreads = 1;
  if (nthreads > nchunks) nthreads = (int)(nchunks > 0 ? nchunks : 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t c = 0; c < nchunks; ++c) {
    int i = owner[(size_t)c];
    const Tensor& t = ts[(size_t)i];
    int64_t n0 = (c - first[(size_t)i]) * LK_CHUNK, n1 = n0 + LK_CHUNK < t.n ? n0 + LK_CHUNK : t.n;
    float r = run_chunk(t, n0, n1, 0, 0.0f, q);
    if (t.mode == MOM8_TENSOR) part[(size_t)c] = r;
  }
  if (!any_per_tensor) return 0;
  // per-tensor scales: the max over the tensor's chunks (NaN-propagating), then pass 1
  std::vector<float> scale((size_t)n, 0.0f);
  for (int i = 0; i < n; ++i) {
    if (ts[(size_t)i].mode != MOM8_TENSOR) continue;
    float s = 0.0f;
    for (int64_t c = first[(size_t)i]; c < first[(size_t)i + 1]; ++c) {
      float r = part[(size_t)c];
      s = (r != r || s != s) ? NAN : (r > s ? r : s);
    }
    scale[(size_t)i] = s;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t c = 0; c < nchunks; ++c) {
    int i = owner[(size_t)c];
    const Tensor& t = ts[(size_t)i];
    if (t.mode != MOM8_TENSOR) continue;
    int64_t n0 = (c - first[(size_t)i]) * LK_CHUNK, n1 = n0 + LK_CHUNK < t.n ? n0 + LK_CHUNK : t.n;
    run_chunk(t, n0, n1, 1, scale[(size_t)i], q);
  }
  for (int i = 0; i < n; ++i)
    if (ts[(size_t)i].mode == MOM8_TENSOR) ts[(size_t)i].absmax[0] = scale[(size_t)i];
  return 0;
}

// Which of n tensors (fp32/fp16/bf16, dtype codes as in lk_step) hold only finite values:
// out[i] = 1 if tensor i is all finite, else 0. One multithreaded pass over all of them (for
// the optimizer's non-finite-gradient guard): a value is not finite when its exponent bits
// are all ones.
int lk_all_finite(int n, const int64_t* ptr, const int64_t* numel, const int32_t* dtype, uint8_t* out,
                  int nthreads) {
  std::vector<int64_t> first((size_t)n + 1, 0);
  for (int i = 0; i < n; ++i) {
    out[i] = 1;
    first[(size_t)i + 1] = first[(size_t)i] + (numel[i] + LK_CHUNK - 1) / LK_CHUNK;
  }
  const int64_t nchunks = first[(size_t)n];
  std::vector<int32_t> owner((size_t)nchunks);
  for (int i = 0; i < n; ++i)
    for (int64_t c = first[(size_t)i]; c < first[(size_t)i + 1]; ++c) owner[(size_t)c] = i;
  if (nchunks < 8 || nthreads < 1) nthreads = 1;  // small: on the calling thread
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int i = owner[(size_t)c];
    const int64_t n0 = (c - first[(size_t)i]) * LK_CHUNK, n1 = n0 + LK_CHUNK < numel[i] ? n0 + LK_CHUNK : numel[i];
    bool bad = false;
    if (dtype[i] == F32) {
      const uint32_t* x = (const uint32_t*)ptr[i];
      uint32_t acc = 0;  // any element with all exponent bits set: (x & e) == e
      for (int64_t k = n0; k < n1; ++k) acc |= (uint32_t)((x[k] & 0x7F800000u) == 0x7F800000u);
      bad = acc != 0;
    } else {
      const uint16_t* x = (const uint16_t*)ptr[i];
      const uint16_t e = dtype[i] == F16 ? 0x7C00 : 0x7F80;
      uint32_t acc = 0;
      for (int64_t k = n0; k < n1; ++k) acc |= (uint32_t)((x[k] & e) == e);
      bad = acc != 0;
    }
    if (bad) {
#pragma omp atomic write
      out[i] = 0;
    }
  }
  return 0;
}

// x[0..n) rounded stochastically to bf16 as elements start.. of a tensor with key, the way the
// step stores a bf16 parameter with stochastic rounding (for the tests).
int lk_round_bf16_sr(const float* x, uint16_t* out, int64_t n, int64_t start, uint32_t key) {
#if LK_AVX512
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    vst_bf16_sr(out + i, start + i, _mm512_maskz_loadu_ps(k, x + i), k, key);
  }
#else
  for (int64_t i = 0; i < n; ++i) out[i] = f_to_bf16_sr(x[i], key, start + i);
#endif
  return 0;
}

// Codes of x[i] / scale (|x[i]| <= scale) with the kernel's own quantizer, normalisation
// included, as the 8-bit step computes them; for the exhaustive check (scale 1).
int lk_quantize(const float* x, uint8_t* out, int64_t n, float scale, const uint32_t* qc, int nthreads) {
  if (qc[0] != QC_MAGIC) return -1;
  const Quant q(qc);
  if (nthreads < 1) nthreads = 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t c = 0; c < (n + LK_CHUNK - 1) / LK_CHUNK; ++c) {
    int64_t n0 = c * LK_CHUNK, n1 = n0 + LK_CHUNK < n ? n0 + LK_CHUNK : n;
    for (int64_t b0 = n0; b0 < n1; b0 += LK_BLOCK) {
      int64_t b1 = b0 + LK_BLOCK < n1 ? b0 + LK_BLOCK : n1;
      LK_QUANT(x + b0, b1 - b0, scale, out + b0, q);
    }
  }
  return 0;
}

}  // extern "C"
#endif  // !LK_ONLY_PART
