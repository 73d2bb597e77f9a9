// fastfm._C: fused CPU kernels for Flow Matching (pybind11 + OpenMP, no libtorch).
//
// The spec is kernels/reference.py. Every op works on a contiguous (B, D) view of its tensors,
// which the op layer (kernels/ops.py) validates and the Python wrapper (kernels/cpu.py) hands over
// as raw data pointers:
//
//   affine_path:    x_t = a x0 + b x1,  target = c x0 + d x1
//   cfm_loss:       L_b = (1/D) sum_j (v_bj - target_bj)^2
//   cfm_loss_grad:  dL/dv_bj = g_b * 2 (v_bj - target_bj) / D
//
// with per-sample float32 coefficients and x0 either given or regenerated on the fly from the
// stream of kernels/rng.py: element (r, j) of x0 is std times word j % 4 of the Box-Muller normals of
// Philox4x32-10 keyed by the seed at counter (j / 4, offset + r, 0, 0), where offset counts rows, so the
// noise and the target are never materialised, and one Philox call serves four elements.
//
// Numerics.
//  * float32 and bfloat16 are computed in float32 (bf16 loads are bit shifts, stores round to
//    nearest even, NaN -> 0x7FC0 like c10::BFloat16); float64 is computed in double with the
//    noise (std * n1) generated in float32 and widened.
//  * The noise uses our own branch-free float32 log and sin/cos (Cephes polynomials, ~1 ulp; within
//    1e-6 of the torch-computed reference stream), so the same code runs in vector lanes
//    and scalar tails: a noise value depends only on its index and the seed, never on the vector
//    width, the thread count or the work split. Philox is exact integer arithmetic and the build
//    uses -ffp-contract=off (no FMA contraction), so every noise path (AVX-512 / AVX2 / SSE2 /
//    portable) and every target clone gives bitwise the same noise, x_t, target and gradient.
//  * Loss reductions accumulate in double, in kLanes fixed interleaved accumulators per row
//    segment (not an `omp simd reduction`, whose order would follow the vector width). The work
//    split (the Plan below) depends only on (B, D), never on the number of threads, and per-chunk
//    partial sums are combined in a fixed order, so the loss is bitwise reproducible for any
//    OMP_NUM_THREADS and any instruction set.
//
// Parallelism. The flat element range is cut into tasks of about kChunk elements: whole rows
// when D <= kChunk (several rows per task for small D), otherwise equal chunks of one row, so
// B = 1 with a huge D still keeps every thread busy. Tasks run under `omp parallel for
// schedule(static)` (equal-cost tasks); small problems run on the calling thread. Thread count:
// OMP_NUM_THREADS or set_num_threads(). The GIL is released for every kernel call.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

#define FFM_INLINE inline __attribute__((always_inline))

// Function multiversioning of the per-task bodies (memory-bound loops, bf16 conversions):
// compiled for AVX2 and baseline x86-64, picked at load time (ifunc). Only on GCC/x86-64/ELF,
// where target_clones is solid. The compute-bound noise generator has its own explicit
// AVX-512 / AVX2 / SSE2 paths (see noise_paths).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__) && \
    !defined(FASTFM_NO_CLONES)
#define FFM_CLONES __attribute__((target_clones("avx2", "default")))
#define FFM_HAS_CLONES 1
#else
#define FFM_CLONES
#define FFM_HAS_CLONES 0
#endif

namespace {

// ------------------------------------------------------------------------------------------------
// Philox4x32-10 and Box-Muller (tl.randn conventions)

constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Keys {
    uint32_t k0[kRounds], k1[kRounds];
};

Keys make_keys(uint64_t seed) {
    Keys k;
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kRounds; ++r) {
        k.k0[r] = a;
        k.k1[r] = b;
        a += kKeyA;
        b += kKeyB;
    }
    return k;
}

FFM_INLINE float as_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

FFM_INLINE uint32_t as_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

// Word -> float in [0, 1]: int32 view, negatives x -> ~x, int->float rounds to nearest, scale.
FFM_INLINE float uniform(uint32_t w) {
    int32_t x = static_cast<int32_t>(w);
    x ^= (x >> 31);  // ~x for negative x (arithmetic shift)
    return static_cast<float>(x) * 4.6566127342e-10f;
}

// Natural log for normal positive x (here [1e-7, 1]); Cephes logf, branch-free.
FFM_INLINE float log_f32(float x) {
    uint32_t u = as_bits(x);
    int32_t e = static_cast<int32_t>(u >> 23) - 126;        // x = m 2^e, m in [0.5, 1)
    float m = as_float((u & 0x007FFFFFu) | 0x3F000000u);
    // m < sqrt(1/2): e -= 1, m = 2m - 1; else m = m - 1 (exact, Sterbenz). Written with masks, not
    // ?:, so GCC does not duplicate the whole polynomial per branch before if-converting.
    const uint32_t lo = 0u - static_cast<uint32_t>(m < 0.707106781186547524f);
    e += static_cast<int32_t>(lo);
    m = (m + as_float(as_bits(m) & lo)) - 1.0f;
    float z = m * m;
    float p = 7.0376836292e-2f;
    p = p * m - 1.1514610310e-1f;
    p = p * m + 1.1676998740e-1f;
    p = p * m - 1.2420140846e-1f;
    p = p * m + 1.4249322787e-1f;
    p = p * m - 1.6668057665e-1f;
    p = p * m + 2.0000714765e-1f;
    p = p * m - 2.4999993993e-1f;
    p = p * m + 3.3333331174e-1f;
    float y = p * m * z;
    float fe = static_cast<float>(e);
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    float r = m + y;
    r += 0.693359375f * fe;
    return r;
}

// (cos t, sin t) for t in [0, 2 pi]: Cody-Waite reduction by pi/2 (3-part constant), Cephes kernels,
// one reduction for both.
FFM_INLINE void sincos_f32(float t, float& cos_t, float& sin_t) {
    int32_t k = static_cast<int32_t>(t * 0.636619772367581343f + 0.5f);  // round(t / (pi/2)), t >= 0
    float fk = static_cast<float>(k);
    float r = ((t - fk * 1.5703125f) - fk * 4.837512969970703125e-4f) - fk * 7.54978995489188216e-8f;
    float z = r * r;
    float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
    float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
              0.5f * z + 1.0f;
    // quadrant k: cos = c, -s, -c, s; sin = s, c, -s, -c
    const bool odd = k & 1;
    cos_t = as_float(as_bits(odd ? s : c) ^ (static_cast<uint32_t>((k + 1) & 2) << 30));
    sin_t = as_float(as_bits(odd ? c : s) ^ (static_cast<uint32_t>(k & 2) << 30));
}

FFM_INLINE uint32_t mulhi(uint32_t a, uint32_t b) {
    return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Box-Muller on two Philox words: R (cos th, sin th), R = sqrt(-2 log max(u(w), 1e-7)), th = 2 pi u(w2).
FFM_INLINE void box_muller(uint32_t w, uint32_t w2, float& n0, float& n1) {
    // max(u, 1e-7) on the bit patterns (both non-negative): an integer max, not a branch.
    float u = as_float(std::max(as_bits(uniform(w)), 0x33D6BF95u));
    float r = std::sqrt(-2.0f * log_f32(u));
    float c, s;
    sincos_f32(6.283185307179586f * uniform(w2), c, s);
    n0 = r * c;
    n1 = r * s;
}

// Noise blocks. A noise path (NoiseFn) runs Philox at the counters (ctr0[k], ctr1[k], 0, 0), k < groups <=
// kGroups, into planar words w[0..3][k], then Box-Muller writes out[4k + (0, 1, 2, 3)], both compiled for
// the path's instruction set; the counter arrays hold kGroups entries (vector paths read whole vectors
// past `groups`).
constexpr int64_t kBlock = 512;  // elements per noise block (stack buffers)
constexpr int64_t kGroups = kBlock / 4;
using Words = uint32_t[4][kGroups];
using NoiseFn = void (*)(float* __restrict out, const uint32_t* __restrict ctr0, const uint32_t* __restrict ctr1,
                         int64_t groups, const Keys& K);

FFM_INLINE void box_muller_block(float* __restrict out, const Words& w, int64_t groups) {
    alignas(64) float n[4][kGroups];
#pragma omp simd
    for (int64_t k = 0; k < groups; ++k) {
        box_muller(w[0][k], w[1][k], n[0][k], n[1][k]);
        box_muller(w[2][k], w[3][k], n[2][k], n[3][k]);
    }
    for (int64_t k = 0; k < groups; ++k)
        for (int l = 0; l < 4; ++l) out[4 * k + l] = n[l][k];
}

// Portable Philox4x32-10 at counter (c0, c1, 0, 0).
FFM_INLINE void philox(uint32_t c0, uint32_t c1, const Keys& K, uint32_t& o0, uint32_t& o1, uint32_t& o2,
                       uint32_t& o3) {
    uint32_t c2 = 0, c3 = 0;
#pragma GCC unroll 10
    for (int r = 0; r < kRounds; ++r) {
        uint32_t n0 = mulhi(kRoundB, c2) ^ c1 ^ K.k0[r];
        uint32_t n2 = mulhi(kRoundA, c0) ^ c3 ^ K.k1[r];
        c1 = kRoundB * c2;
        c3 = kRoundA * c0;
        c0 = n0;
        c2 = n2;
    }
    o0 = c0;
    o1 = c1;
    o2 = c2;
    o3 = c3;
}

void noise_portable(float* __restrict out, const uint32_t* __restrict ctr0, const uint32_t* __restrict ctr1,
                    int64_t groups, const Keys& K) {
    alignas(64) Words w;
#pragma omp simd
    for (int64_t k = 0; k < groups; ++k) philox(ctr0[k], ctr1[k], K, w[0][k], w[1][k], w[2][k], w[3][k]);
    box_muller_block(out, w, groups);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define FFM_X86 1
// x86: Philox with explicit 32x32->64 even/odd lane multiplies (pmuludq), which GCC does not
// derive from portable code (it emulates a 64x64 multiply), then the portable Box-Muller loop
// auto-vectorised for the same target. Integer Philox is exact and the float code has no FMA
// contraction (-ffp-contract=off), so every path gives bitwise the same noise.

#define FFM_PHILOX_BLOCK(V, W, SET1, XOR, MULHILO, LOAD, STORE)                                    \
    alignas(64) Words w;                                                                          \
    const V ra = SET1(static_cast<int>(kRoundA)), rb = SET1(static_cast<int>(kRoundB));           \
    V k0[kRounds], k1[kRounds];                                                                   \
    for (int r = 0; r < kRounds; ++r) {                                                           \
        k0[r] = SET1(static_cast<int>(K.k0[r]));                                                  \
        k1[r] = SET1(static_cast<int>(K.k1[r]));                                                  \
    }                                                                                             \
    for (int64_t j = 0; j < groups; j += 2 * W) { /* two independent vectors per step, for ILP */ \
        /* round 0 with c2 = c3 = 0: c0' = ctr1 ^ k0, c1' = 0, (c2', c3') from A * ctr0 */           \
        V c0, c1 = SET1(0), c2, c3, d0, d1 = SET1(0), d2, d3;                                     \
        MULHILO(ra, LOAD(ctr0 + j), c2, c3);                                                      \
        MULHILO(ra, LOAD(ctr0 + j + W), d2, d3);                                                  \
        c0 = XOR(LOAD(ctr1 + j), k0[0]);                                                          \
        d0 = XOR(LOAD(ctr1 + j + W), k0[0]);                                                      \
        c2 = XOR(c2, k1[0]);                                                                      \
        d2 = XOR(d2, k1[0]);                                                                      \
        _Pragma("GCC unroll 9") for (int r = 1; r < kRounds; ++r) {                               \
            V hb, lb, ha, la, gb, mb, ga, ma;                                                     \
            MULHILO(rb, c2, hb, lb);                                                              \
            MULHILO(ra, c0, ha, la);                                                              \
            MULHILO(rb, d2, gb, mb);                                                              \
            MULHILO(ra, d0, ga, ma);                                                              \
            c0 = XOR(XOR(hb, c1), k0[r]);                                                         \
            c2 = XOR(XOR(ha, c3), k1[r]);                                                         \
            c1 = lb;                                                                              \
            c3 = la;                                                                              \
            d0 = XOR(XOR(gb, d1), k0[r]);                                                         \
            d2 = XOR(XOR(ga, d3), k1[r]);                                                         \
            d1 = mb;                                                                              \
            d3 = ma;                                                                              \
        }                                                                                         \
        STORE(w[0] + j, c0);                                                                      \
        STORE(w[1] + j, c1);                                                                      \
        STORE(w[2] + j, c2);                                                                      \
        STORE(w[3] + j, c3);                                                                      \
        STORE(w[0] + j + W, d0);                                                                  \
        STORE(w[1] + j + W, d1);                                                                  \
        STORE(w[2] + j + W, d2);                                                                  \
        STORE(w[3] + j + W, d3);                                                                  \
    }                                                                                             \
    box_muller_block(out, w, groups);

// SSE2 (baseline x86-64): no 32-bit blend, use masks.
FFM_INLINE void mulhilo_sse2(__m128i a, __m128i x, __m128i& hi, __m128i& lo) {
    const __m128i pe = _mm_mul_epu32(x, a), po = _mm_mul_epu32(_mm_srli_epi64(x, 32), a);
    const __m128i mlo = _mm_set1_epi64x(0xFFFFFFFFll);
    hi = _mm_or_si128(_mm_srli_epi64(pe, 32), _mm_andnot_si128(mlo, po));
    lo = _mm_or_si128(_mm_and_si128(pe, mlo), _mm_slli_epi64(po, 32));
}
#define FFM_SSE2_MULHILO(a, x, hi, lo) mulhilo_sse2(a, x, hi, lo)
#define FFM_SSE2_STORE(p, v) _mm_store_si128(reinterpret_cast<__m128i*>(p), v)
#define FFM_SSE2_LOAD(p) _mm_load_si128(reinterpret_cast<const __m128i*>(p))
void noise_sse2(float* __restrict out, const uint32_t* __restrict ctr0, const uint32_t* __restrict ctr1,
                int64_t groups, const Keys& K) {
    FFM_PHILOX_BLOCK(__m128i, 4, _mm_set1_epi32, _mm_xor_si128, FFM_SSE2_MULHILO, FFM_SSE2_LOAD, FFM_SSE2_STORE)
}

__attribute__((target("avx2"))) FFM_INLINE void mulhilo_avx2(__m256i a, __m256i x, __m256i& hi, __m256i& lo) {
    const __m256i pe = _mm256_mul_epu32(x, a), po = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), a);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
    lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}
#define FFM_AVX2_MULHILO(a, x, hi, lo) mulhilo_avx2(a, x, hi, lo)
#define FFM_AVX2_STORE(p, v) _mm256_store_si256(reinterpret_cast<__m256i*>(p), v)
#define FFM_AVX2_LOAD(p) _mm256_load_si256(reinterpret_cast<const __m256i*>(p))
__attribute__((target("avx2"))) void noise_avx2(float* __restrict out, const uint32_t* __restrict ctr0,
                                                const uint32_t* __restrict ctr1, int64_t groups, const Keys& K) {
    FFM_PHILOX_BLOCK(__m256i, 8, _mm256_set1_epi32, _mm256_xor_si256, FFM_AVX2_MULHILO, FFM_AVX2_LOAD,
                     FFM_AVX2_STORE)
}

// GCC 12's _mm512_undefined_epi32 (inside _mm512_mul_epu32) trips a false -Wmaybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) FFM_INLINE void mulhilo_avx512(__m512i a, __m512i x, __m512i& hi,
                                                                  __m512i& lo) {
    const __m512i pe = _mm512_mul_epu32(x, a), po = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), a);
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
    lo = _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
}
#define FFM_AVX512_MULHILO(a, x, hi, lo) mulhilo_avx512(a, x, hi, lo)
#define FFM_AVX512_STORE(p, v) _mm512_store_si512(reinterpret_cast<void*>(p), v)
#define FFM_AVX512_LOAD(p) _mm512_load_si512(reinterpret_cast<const void*>(p))
__attribute__((target("avx512f"))) void noise_avx512(float* __restrict out, const uint32_t* __restrict ctr0,
                                                     const uint32_t* __restrict ctr1, int64_t groups, const Keys& K) {
    FFM_PHILOX_BLOCK(__m512i, 16, _mm512_set1_epi32, _mm512_xor_si512, FFM_AVX512_MULHILO, FFM_AVX512_LOAD,
                     FFM_AVX512_STORE)
}
#pragma GCC diagnostic pop
#else
#define FFM_X86 0
#endif

// Noise paths by name; "auto" is the best one this CPU supports (picked once at import).
struct NoisePath {
    const char* name;
    NoiseFn fn;
    bool supported;
};

std::vector<NoisePath> noise_paths() {
    std::vector<NoisePath> p;
#if FFM_X86
    __builtin_cpu_init();
    p.push_back({"avx512", noise_avx512, static_cast<bool>(__builtin_cpu_supports("avx512f"))});
    p.push_back({"avx2", noise_avx2, static_cast<bool>(__builtin_cpu_supports("avx2"))});
    p.push_back({"sse2", noise_sse2, true});
#endif
    p.push_back({"portable", noise_portable, true});
    return p;
}

NoiseFn g_noise = nullptr;
const char* g_noise_name = "portable";

void select_noise(const std::string& name) {
    for (const NoisePath& p : noise_paths()) {
        if (!p.supported) continue;
        if (name == "auto" || name == p.name) {
            g_noise = p.fn;
            g_noise_name = p.name;
            return;
        }
    }
    throw std::invalid_argument("fastfm._C: noise path '" + name + "' is unknown or not supported by this CPU");
}

// Counters a vector path may read: `groups` rounded up to 32 (two AVX-512 vectors), within kGroups.
FFM_INLINE int64_t padded_groups(int64_t groups) { return std::min<int64_t>(kGroups, (groups + 31) / 32 * 32); }

// out[j] = noise at (row, col + j), 0 <= j < n <= kBlock, col a multiple of 4 (out holds 4 ceil(n / 4) floats).
FFM_INLINE void gen_noise(float* __restrict out, uint32_t row, int64_t col, int64_t n, const Keys& K) {
    alignas(64) uint32_t ctr0[kGroups], ctr1[kGroups];
    const int64_t groups = (n + 3) / 4;
    for (int64_t k = 0; k < padded_groups(groups); ++k) {
        ctr0[k] = static_cast<uint32_t>(col / 4 + k);
        ctr1[k] = row;
    }
    g_noise(out, ctr0, ctr1, groups, K);
}

// Whole rows of small D: rows [row, row + rows) into out (rows x D, row-major), rows * 4 ceil(D / 4) <= kBlock;
// the counters of all rows in one vector pass, so tiny rows cost no per-row call.
void noise_rows(float* __restrict out, uint32_t row, int64_t rows, int64_t D, const Keys& K) {
    alignas(64) uint32_t ctr0[kGroups], ctr1[kGroups];
    alignas(64) float buf[kBlock];
    const int64_t G = (D + 3) / 4, groups = rows * G;
    for (int64_t k = 0; k < padded_groups(groups); ++k) {
        ctr0[k] = static_cast<uint32_t>(k % G);
        ctr1[k] = row + static_cast<uint32_t>(k / G);
    }
    g_noise(buf, ctr0, ctr1, groups, K);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * D, buf + r * 4 * G, static_cast<size_t>(D) * sizeof(float));
}

// ------------------------------------------------------------------------------------------------
// dtypes

enum DType : int { kF32 = 0, kF64 = 1, kBF16 = 2 };

struct bf16 {
    uint16_t x;
};

template <class T> struct Traits;
template <> struct Traits<float> {
    using C = float;
    static FFM_INLINE C load(const float* p, int64_t j) { return p[j]; }
    static FFM_INLINE void store(float* p, int64_t j, C v) { p[j] = v; }
};
template <> struct Traits<double> {
    using C = double;
    static FFM_INLINE C load(const double* p, int64_t j) { return p[j]; }
    static FFM_INLINE void store(double* p, int64_t j, C v) { p[j] = v; }
};
template <> struct Traits<bf16> {
    using C = float;
    static FFM_INLINE C load(const bf16* p, int64_t j) {
        return as_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[j]) << 16);
    }
    static FFM_INLINE void store(bf16* p, int64_t j, C v) {
        uint32_t u = as_bits(v);
        uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;   // round to nearest even
        r = (v != v) ? 0x7FC0u : r;
        reinterpret_cast<uint16_t*>(p)[j] = static_cast<uint16_t>(r);
    }
};

// ------------------------------------------------------------------------------------------------
// Work split: depends on (B, D) only, never on the thread count (deterministic reductions).

constexpr int64_t kChunk = 8192;  // elements per task
constexpr int kLanes = 8;         // loss accumulators per segment

struct Plan {
    int64_t B = 0, D = 0;
    int64_t nck = 1;   // chunks per row (> 1 only when D > kChunk)
    int64_t seg = 0;   // elements per chunk when nck > 1
    int64_t rpt = 1;   // rows per task when nck == 1
    int64_t ntasks = 0;
};

Plan make_plan(int64_t B, int64_t D) {
    Plan p;
    p.B = B;
    p.D = D;
    if (D > kChunk) {
        int64_t n = (D + kChunk - 1) / kChunk;
        int64_t seg = (D + n - 1) / n;
        seg = (seg + 63) / 64 * 64;  // keep chunk starts 64-element aligned
        p.seg = seg;
        p.nck = (D + seg - 1) / seg;
        p.ntasks = B * p.nck;
    } else {
        p.nck = 1;
        p.seg = D;
        p.rpt = std::max<int64_t>(1, kChunk / std::max<int64_t>(D, 1));
        p.ntasks = (B + p.rpt - 1) / p.rpt;
    }
    return p;
}

// Flat element range [s, e) of task t.
FFM_INLINE void task_range(const Plan& p, int64_t t, int64_t& s, int64_t& e) {
    if (p.nck > 1) {
        int64_t row = t / p.nck, k = t % p.nck;
        s = row * p.D + k * p.seg;
        e = row * p.D + std::min(p.D, (k + 1) * p.seg);
    } else {
        s = t * p.rpt * p.D;
        e = std::min(p.B, (t + 1) * p.rpt) * p.D;
    }
}

struct Args {
    Plan plan;
    void* out0 = nullptr;         // x_t / grad_v
    void* out1 = nullptr;         // target (affine_path, optional)
    double* partial = nullptr;    // loss partial sums, B * nck
    const void* x1 = nullptr;
    const void* x0 = nullptr;     // null: regenerate from the seed
    const void* v = nullptr;
    const float *a = nullptr, *b = nullptr, *c = nullptr, *d = nullptr, *g = nullptr;
    Keys keys{};
    uint32_t offset = 0;          // row counter of x0's first row in the noise stream
    double stdv = 1.0;
};

// Calls f(row, i0, n, z) for each row segment [i0, i0 + n) of task t, where z(j) gives x0 at
// flat index i0 + j in the compute type (regenerated noise or the given x0). Seeded segments are cut
// into noise blocks of kBlock elements; every segment starts at column 0 or at a chunk start (a
// multiple of 64), so every noise block starts at a column that is a multiple of 4.
template <class T, bool SEEDED, class F>
FFM_INLINE void for_segments(const Args& A, int64_t t, F&& f) {
    using C = typename Traits<T>::C;
    const Plan& P = A.plan;
    int64_t s, e;
    task_range(P, t, s, e);
    alignas(64) float nz[kBlock];
    const float stdf = static_cast<float>(A.stdv);  // x0 = std * n in float32 (then widened)
    const T* x0 = static_cast<const T*>(A.x0);
    const int64_t group_rows = kBlock / (4 * ((P.D + 3) / 4));  // rows of small D whose noise fits one block
    if (SEEDED && P.nck == 1 && group_rows >= 4) {  // whole rows of small D: noise for many rows per call
        for (int64_t r0 = s / P.D, r_end = e / P.D; r0 < r_end; r0 += group_rows) {
            const int64_t nr = std::min(group_rows, r_end - r0);
            noise_rows(nz, static_cast<uint32_t>(A.offset + r0), nr, P.D, A.keys);
            for (int64_t r = r0; r < r0 + nr; ++r) {
                const float* nzr = nz + (r - r0) * P.D;
                auto z = [&](int64_t j) -> C { return static_cast<C>(stdf * nzr[j]); };
                f(r, r * P.D, P.D, z);
            }
        }
        return;
    }
    for (int64_t i = s; i < e;) {
        const int64_t row = i / P.D;
        const int64_t se = std::min(e, (row + 1) * P.D);
        for (int64_t p = i; p < se; p += (SEEDED ? kBlock : se - i)) {
            const int64_t q = SEEDED ? std::min(se, p + kBlock) : se;
            if (SEEDED) gen_noise(nz, static_cast<uint32_t>(A.offset + row), p - row * P.D, q - p, A.keys);
            const T* x0p = SEEDED ? nullptr : x0 + p;
            auto z = [&](int64_t j) -> C {
                if constexpr (SEEDED) return static_cast<C>(stdf * nz[j]);
                else return Traits<T>::load(x0p, j);
            };
            f(row, p, q - p, z);
        }
        i = se;
    }
}

template <class T, bool SEEDED, bool TARGET>
FFM_INLINE void affine_task(const Args& A, int64_t t) {
    using Tr = Traits<T>;
    using C = typename Tr::C;
    for_segments<T, SEEDED>(A, t, [&](int64_t row, int64_t i0, int64_t n, auto z) {
        const C a = A.a[row], b = A.b[row], c = A.c[row], d = A.d[row];
        const T* __restrict x1 = static_cast<const T*>(A.x1) + i0;
        T* __restrict xt = static_cast<T*>(A.out0) + i0;
        T* __restrict tg = TARGET ? static_cast<T*>(A.out1) + i0 : nullptr;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
            const C zj = z(j), xj = Tr::load(x1, j);
            Tr::store(xt, j, a * zj + b * xj);
            if constexpr (TARGET) Tr::store(tg, j, c * zj + d * xj);
        }
    });
}

template <class T, bool SEEDED>
FFM_INLINE void loss_task(const Args& A, int64_t t) {
    using Tr = Traits<T>;
    using C = typename Tr::C;
    const Plan& P = A.plan;
    double acc = 0.0;
    int64_t s, e;
    task_range(P, t, s, e);
    for_segments<T, SEEDED>(A, t, [&](int64_t row, int64_t i0, int64_t n, auto z) {
        const C c = A.c[row], d = A.d[row];
        const T* __restrict x1 = static_cast<const T*>(A.x1) + i0;
        const T* __restrict v = static_cast<const T*>(A.v) + i0;
        // Sum of squares in kLanes fixed interleaved double accumulators, combined in a fixed
        // order: the same bits whatever vector width the compiler picks.
        auto sq = [&](int64_t j) -> double {
            const C r = Tr::load(v, j) - (c * z(j) + d * Tr::load(x1, j));
            const double rd = static_cast<double>(r);
            return rd * rd;
        };
        double lane[kLanes] = {};
        int64_t j = 0;
        for (; j + kLanes <= n; j += kLanes) {
#pragma GCC unroll 8
            for (int l = 0; l < kLanes; ++l) lane[l] += sq(j + l);
        }
        double tail = 0.0;
        for (; j < n; ++j) tail += sq(j);
        double sum = 0.0;
        for (int l = 0; l < kLanes; ++l) sum += lane[l];
        acc += sum + tail;
        const int64_t end = i0 + n;
        if (end == (row + 1) * P.D || end == e) {  // row or task finished: flush
            A.partial[P.nck > 1 ? t : row] = acc;
            acc = 0.0;
        }
    });
}

template <class T, bool SEEDED>
FFM_INLINE void grad_task(const Args& A, int64_t t) {
    using Tr = Traits<T>;
    using C = typename Tr::C;
    const C two_over_d = static_cast<C>(2.0 / static_cast<double>(A.plan.D));
    for_segments<T, SEEDED>(A, t, [&](int64_t row, int64_t i0, int64_t n, auto z) {
        const C c = A.c[row], d = A.d[row];
        const C gs = static_cast<C>(A.g[row]) * two_over_d;
        const T* __restrict x1 = static_cast<const T*>(A.x1) + i0;
        const T* __restrict v = static_cast<const T*>(A.v) + i0;
        T* __restrict out = static_cast<T*>(A.out0) + i0;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
            const C r = Tr::load(v, j) - (c * z(j) + d * Tr::load(x1, j));
            Tr::store(out, j, gs * r);
        }
    });
}

// ------------------------------------------------------------------------------------------------
// Multiversioned task entry points (one per dtype x variant; the templates above are inlined
// into each clone). OpenMP regions stay outside them: GCC outlines parallel regions before
// cloning, so a clone must be the per-task body, not the parallel loop.

using TaskFn = void (*)(const Args&, int64_t);

#define FFM_DEFINE_TASKS(T, NAME)                                                                  \
    FFM_CLONES void affine_##NAME##_z_t(const Args& A, int64_t t) { affine_task<T, false, true>(A, t); }  \
    FFM_CLONES void affine_##NAME##_z_n(const Args& A, int64_t t) { affine_task<T, false, false>(A, t); } \
    FFM_CLONES void affine_##NAME##_s_t(const Args& A, int64_t t) { affine_task<T, true, true>(A, t); }   \
    FFM_CLONES void affine_##NAME##_s_n(const Args& A, int64_t t) { affine_task<T, true, false>(A, t); }  \
    FFM_CLONES void loss_##NAME##_z(const Args& A, int64_t t) { loss_task<T, false>(A, t); }              \
    FFM_CLONES void loss_##NAME##_s(const Args& A, int64_t t) { loss_task<T, true>(A, t); }               \
    FFM_CLONES void grad_##NAME##_z(const Args& A, int64_t t) { grad_task<T, false>(A, t); }              \
    FFM_CLONES void grad_##NAME##_s(const Args& A, int64_t t) { grad_task<T, true>(A, t); }

FFM_DEFINE_TASKS(float, f32)
FFM_DEFINE_TASKS(double, f64)
FFM_DEFINE_TASKS(bf16, bf16)

// Row `row` of the stream (dim normals) into out, through a block buffer (noise blocks round up to 4).
void randn_row(float* out, uint32_t row, int64_t dim, const Keys& K) {
    alignas(64) float nz[kBlock];
    for (int64_t p = 0; p < dim; p += kBlock) {
        const int64_t m = std::min(kBlock, dim - p);
        gen_noise(nz, row, p, m, K);
        std::memcpy(out + p, nz, static_cast<size_t>(m) * sizeof(float));
    }
}

enum Op { kAffineZT, kAffineZN, kAffineST, kAffineSN, kLossZ, kLossS, kGradZ, kGradS, kNumOps };

TaskFn pick(int dtype, Op op) {
    static const TaskFn table[3][kNumOps] = {
        {affine_f32_z_t, affine_f32_z_n, affine_f32_s_t, affine_f32_s_n, loss_f32_z, loss_f32_s, grad_f32_z,
         grad_f32_s},
        {affine_f64_z_t, affine_f64_z_n, affine_f64_s_t, affine_f64_s_n, loss_f64_z, loss_f64_s, grad_f64_z,
         grad_f64_s},
        {affine_bf16_z_t, affine_bf16_z_n, affine_bf16_s_t, affine_bf16_s_n, loss_bf16_z, loss_bf16_s,
         grad_bf16_z, grad_bf16_s},
    };
    if (dtype < 0 || dtype > 2) throw std::invalid_argument("fastfm._C: unknown dtype code " + std::to_string(dtype));
    return table[dtype][op];
}

// Below this much work (elements, noise counted 8x) a call runs on the calling thread.
constexpr int64_t kParallelMin = 1 << 16;

void run_tasks(TaskFn fn, const Args& A, bool seeded) {
    const int64_t nt = A.plan.ntasks;
    const int64_t work = A.plan.B * A.plan.D * (seeded ? 8 : 1);
#ifdef _OPENMP
    const bool par = nt > 1 && work >= kParallelMin && !omp_in_parallel();
#pragma omp parallel for schedule(static) if (par)
    for (int64_t t = 0; t < nt; ++t) fn(A, t);
#else
    (void)work;
    for (int64_t t = 0; t < nt; ++t) fn(A, t);
#endif
}

void check_sizes(int64_t B, int64_t D) {
    if (B < 0 || D < 0) throw std::invalid_argument("fastfm._C: negative size");
    if (D > 0 && B > INT64_MAX / D) throw std::invalid_argument("fastfm._C: size overflow");
}

template <class P> P* ptr(uint64_t p) { return reinterpret_cast<P*>(static_cast<uintptr_t>(p)); }

// ------------------------------------------------------------------------------------------------
// Entry points (raw pointers). Argument validation (shapes, dtypes, devices, the noise state and its
// row range) belongs to the op layer, kernels/ops.py, which raises KernelArgumentError; kernels/cpu.py
// hands validated tensors over. The throws here (null rng, negative or overflowing sizes, an unknown
// dtype code) are internal assertions that keep a direct misuse of this raw-pointer API from reading or
// writing out of bounds, not the API's argument checks.

// The noise state of a seeded op, read from the int64 tensor rng = [seed, offset] (kernels/rng.py): the
// seed's 64 bits and the row offset as the uint32 row counter (the op layer keeps rows in [0, 2^32)).
struct Stream {
    uint64_t seed = 0;
    uint32_t offset = 0;
};

Stream read_stream(uint64_t x0, uint64_t rng) {
    Stream s;
    if (x0 != 0) return s;  // x0 given: no noise is drawn and rng is not read
    if (rng == 0) throw std::invalid_argument("fastfm._C: rng (the int64 noise state [seed, offset]) is null");
    const int64_t* st = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(rng));
    s.seed = static_cast<uint64_t>(st[0]);
    s.offset = static_cast<uint32_t>(st[1]);
    return s;
}

// The fields every op shares: work plan, x1, x0 (0: seeded), the target coefficients, noise keys.
Args make_args(int64_t B, int64_t D, uint64_t x1, uint64_t x0, uint64_t c, uint64_t d, const Stream& S,
               double stdv) {
    Args A;
    A.plan = make_plan(B, D);
    A.x1 = ptr<const void>(x1);
    A.x0 = ptr<const void>(x0);
    A.c = ptr<const float>(c);
    A.d = ptr<const float>(d);
    A.keys = make_keys(S.seed);
    A.offset = S.offset;
    A.stdv = stdv;
    return A;
}

void affine_path(uint64_t xt, uint64_t target, uint64_t x1, uint64_t x0, uint64_t a, uint64_t b, uint64_t c,
                 uint64_t d, int64_t B, int64_t D, int dtype, uint64_t rng, double stdv) {
    const bool seeded = x0 == 0;
    const Stream S = read_stream(x0, rng);
    check_sizes(B, D);
    if (B * D == 0) return;
    Args A = make_args(B, D, x1, x0, c, d, S, stdv);
    A.out0 = ptr<void>(xt);
    A.out1 = ptr<void>(target);
    A.a = ptr<const float>(a);
    A.b = ptr<const float>(b);
    const bool tgt = target != 0;
    const Op op = seeded ? (tgt ? kAffineST : kAffineSN) : (tgt ? kAffineZT : kAffineZN);
    run_tasks(pick(dtype, op), A, seeded);
}

void cfm_loss(uint64_t out, uint64_t v, uint64_t x1, uint64_t x0, uint64_t c, uint64_t d, int64_t B, int64_t D,
              int dtype, uint64_t rng, double stdv) {
    const bool seeded = x0 == 0;
    const Stream S = read_stream(x0, rng);
    check_sizes(B, D);
    float* loss = ptr<float>(out);
    if (B == 0) return;
    if (D == 0) {
        for (int64_t r = 0; r < B; ++r) loss[r] = std::nanf("");
        return;
    }
    Args A = make_args(B, D, x1, x0, c, d, S, stdv);
    std::vector<double> partial(static_cast<size_t>(B * A.plan.nck));
    A.partial = partial.data();
    A.v = ptr<const void>(v);
    run_tasks(pick(dtype, seeded ? kLossS : kLossZ), A, seeded);
    // Fixed-order combination of the per-chunk partial sums.
    const int64_t nck = A.plan.nck;
    const double inv = 1.0 / static_cast<double>(D);
    for (int64_t r = 0; r < B; ++r) {
        double s = 0.0;
        for (int64_t k = 0; k < nck; ++k) s += partial[r * nck + k];
        loss[r] = static_cast<float>(s * inv);
    }
}

void cfm_loss_grad(uint64_t out, uint64_t grad, uint64_t v, uint64_t x1, uint64_t x0, uint64_t c, uint64_t d,
                   int64_t B, int64_t D, int dtype, uint64_t rng, double stdv) {
    const bool seeded = x0 == 0;
    const Stream S = read_stream(x0, rng);
    check_sizes(B, D);
    if (B * D == 0) return;
    Args A = make_args(B, D, x1, x0, c, d, S, stdv);
    A.out0 = ptr<void>(out);
    A.g = ptr<const float>(grad);
    A.v = ptr<const void>(v);
    run_tasks(pick(dtype, seeded ? kGradS : kGradZ), A, seeded);
}

// Rows [offset, offset + rows) of the stream of rng = int64 [seed, offset], dim float32 normals each, into
// out (rows x dim).
void randn(uint64_t out, int64_t rows, int64_t dim, uint64_t rng) {
    const Stream S = read_stream(0, rng);
    check_sizes(rows, dim);
    if (rows * dim == 0) return;
    float* o = ptr<float>(out);
    const Keys K = make_keys(S.seed);
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (rows > 1 && rows * dim * 8 >= kParallelMin && !omp_in_parallel())
#endif
    for (int64_t r = 0; r < rows; ++r) randn_row(o + r * dim, static_cast<uint32_t>(S.offset + r), dim, K);
}

int get_max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void set_num_threads(int n) {
    if (n < 1) throw std::invalid_argument("fastfm._C.set_num_threads: n must be >= 1");
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastfm fused CPU kernels (raw-pointer API; use fastfm.kernels.cpu)";
    using namespace pybind11::literals;
    using release = py::call_guard<py::gil_scoped_release>;
    m.def("affine_path", &affine_path, release(), "xt"_a, "target"_a, "x1"_a, "x0"_a, "a"_a, "b"_a, "c"_a, "d"_a,
          "B"_a, "D"_a, "dtype"_a, "rng"_a, "std"_a,
          "x_t = a x0 + b x1 and (target != 0) target = c x0 + d x1; x0 == 0: draw from the stream of "
          "rng = int64 [seed, offset]");
    m.def("cfm_loss", &cfm_loss, release(), "out"_a, "v"_a, "x1"_a, "x0"_a, "c"_a, "d"_a, "B"_a, "D"_a, "dtype"_a,
          "rng"_a, "std"_a, "per-sample (B,) float32 loss mean_j (v - c x0 - d x1)^2");
    m.def("cfm_loss_grad", &cfm_loss_grad, release(), "out"_a, "grad"_a, "v"_a, "x1"_a, "x0"_a, "c"_a, "d"_a, "B"_a,
          "D"_a, "dtype"_a, "rng"_a, "std"_a, "dL/dv = grad_b 2 (v - target) / D");
    m.def("randn", &randn, release(), "out"_a, "rows"_a, "dim"_a, "rng"_a,
          "float32 standard normals of the Philox stream of rng = int64 [seed, offset], rows [offset, "
          "offset + rows) of dim each");
    m.def("get_max_threads", &get_max_threads, "OpenMP threads the kernels use");
    m.def("set_num_threads", &set_num_threads, "n"_a, "set the OpenMP thread count of the calling thread");
#ifdef _OPENMP
    m.attr("openmp") = true;
#else
    m.attr("openmp") = false;
#endif
    m.attr("multiversioned") = static_cast<bool>(FFM_HAS_CLONES);
    {
        // FASTFM_NOISE_PATH=avx2|sse2|portable forces a path (debugging); unknown: the best one.
        const char* env = std::getenv("FASTFM_NOISE_PATH");
        try {
            select_noise(env && *env ? env : "auto");
        } catch (const std::invalid_argument&) {
            select_noise("auto");
        }
    }
    m.def("noise_paths", [] {
        py::list names;
        for (const NoisePath& p : noise_paths())
            if (p.supported) names.append(p.name);
        return names;
    }, "noise generator paths this CPU supports, best first (all give bitwise the same noise)");
    m.def("noise_path", [] { return std::string(g_noise_name); }, "noise generator path in use");
    m.def("set_noise_path", &select_noise, "name"_a, "use noise path `name` ('auto': the best supported)");
    m.attr("DTYPE_CODES") = py::dict("float32"_a = int(kF32), "float64"_a = int(kF64), "bfloat16"_a = int(kBF16));
}
