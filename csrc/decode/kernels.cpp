// The kernels of the fused decode step: linear layers for a few rows (fp32, bf16, int8, int4),
// attention over the cached positions of one head (fp32 or bf16 caches), RoPE, norms and activations.
//
// Portable code with runtime dispatch: the plain loops are compiled three times (AVX-512, AVX2 and
// baseline x86-64, `target_clones`; the loader picks one), and the integer kernels are AVX-512
// VNNI intrinsics used only where `cpu_has_vnni()` says the CPU has them; the bf16 dot products
// likewise AVX-512 BF16 (`cpu_has_bf16()`).
//
// bf16 weights: the layer's input is rounded to bf16 first (as PyTorch's bf16 model holds it), so
// every product w * x is exact in fp32 and the kernels differ only in the order of the fp32 sums.
// With AVX-512 BF16, vdpbf16ps takes 32 products per instruction straight from the bf16 words;
// elsewhere both operands are widened to fp32 in registers (a 16-bit shift) and go through FMA.
// The vdpbf16ps kernel is kept where it exists because it is faster at every row count measured
// (bench/README.md, "bf16 in the fused decode step"): it needs no conversion and half the instructions, which
// matters from a few rows on, when the weights come from cache rather than memory.
//
// Integer kernels (llama.cpp's Q8_0 / Q4_0 x Q8 dot products): the input row is quantized to int8
// in blocks of 32 columns, each with its own scale d; each block's dot product with the weight
// codes is exact in int32 (vpdpbusd: unsigned bytes x signed bytes), then scaled:
//     y[j] = sum_t s[j, t] * (sum_{blocks c in group t} d_c * (q_j . x_c) - z[j, t] * sum_c d_c * sum(x_c))
// int8 weights are signed, so the unsigned operand is |w| and the signed one x with w's sign.
#include "decode.hh"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

namespace mmdecode {

void QuantRows::resize(int rows, int max_k) {
    blocks = (max_k + BLOCK - 1) / BLOCK;
    stride = blocks * BLOCK;
    q.assign(size_t(rows) * stride, 0);
    d.assign(size_t(rows) * blocks, 0.f);
    dsum.assign(size_t(rows) * blocks, 0.f);
    bf.assign(size_t(rows) * stride, 0);
    chunks = (stride / 2 + 63) / 64;
    nib.assign(size_t(rows) * chunks * 128, 0);
    nibd.assign(size_t(rows) * chunks * 48, 0.f);
    pairs.assign(size_t(rows) * pair_chunks() * 16, 0.f);
    dsum_all.assign(rows, 0.f);
}

static bool cpu_has_avx512() {  // what the AVX512 functions (attention) need
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

bool cpu_has_vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }

bool cpu_has_bf16() {
    __builtin_cpu_init();
    return cpu_has_vnni() && __builtin_cpu_supports("avx512bf16");
}

bool vnni_fits(const Linear& lin) {
    if (lin.bits == 8) return lin.groups == 1 || lin.g % QuantRows::BLOCK == 0;
    if (lin.bits == 4) return lin.g == 32 || lin.g % 64 == 0;
    return false;
}

float act(int kind, float x) {
    switch (kind) {
        case ACT_GELU_TANH: return 0.5f * x * (1.f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
        case ACT_GELU: return 0.5f * x * (1.f + std::erf(x * 0.7071067811865476f));
        case ACT_QUICK_GELU: return x / (1.f + std::exp(-1.702f * x));
        case ACT_SILU: return x / (1.f + std::exp(-x));
        case ACT_RELU: return x > 0.f ? x : 0.f;
        default: return x;
    }
}

CLONES void norm_row(const float* __restrict x, const Norm& nm, float eps, int c, float* __restrict out) {
    if (nm.b == nullptr) {  // RMSNorm
        float ss = 0.f;
        for (int i = 0; i < c; i++) ss += x[i] * x[i];
        const float r = 1.f / std::sqrt(ss / c + eps);
        for (int i = 0; i < c; i++) out[i] = nm.w[i] * (x[i] * r);
        return;
    }
    float s = 0.f;
    for (int i = 0; i < c; i++) s += x[i];
    const float mean = s / c;
    float v = 0.f;
    for (int i = 0; i < c; i++) v += (x[i] - mean) * (x[i] - mean);
    const float r = 1.f / std::sqrt(v / c + eps);
    for (int i = 0; i < c; i++) out[i] = (x[i] - mean) * r * nm.w[i] + nm.b[i];
}

CLONES void quantize_rows(const float* __restrict x, int ldx, int rows, int k, QuantRows& qr) {
    const int B = QuantRows::BLOCK;
    for (int r = 0; r < rows; r++) {
        const float* xr = x + size_t(r) * ldx;
        int8_t* q = qr.q.data() + size_t(r) * qr.stride;
        float* d = qr.d.data() + size_t(r) * qr.blocks;
        float* ds = qr.dsum.data() + size_t(r) * qr.blocks;
        const int nb = (k + B - 1) / B;
        for (int c = 0; c < nb; c++) {
            const int c0 = c * B, w = std::min(B, k - c0);
            float amax = 0.f;
            for (int i = 0; i < w; i++) amax = std::max(amax, std::fabs(xr[c0 + i]));
            const float dc = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            int sum = 0;
            for (int i = 0; i < w; i++) {
                const int v = int(std::nearbyint(xr[c0 + i] * inv));  // in [-127, 127]: no sign overflow
                q[c0 + i] = int8_t(v);
                sum += v;
            }
            for (int i = w; i < B; i++) q[c0 + i] = 0;
            d[c] = dc;
            ds[c] = dc * float(sum);
        }
    }
}

CLONES void round_rows(const float* __restrict x, int ldx, int rows, int k, QuantRows& qr) {
    for (int r = 0; r < rows; r++) {
        uint16_t* o = qr.bf.data() + size_t(r) * qr.stride;
        const float* xr = x + size_t(r) * ldx;
        for (int i = 0; i < k; i++) o[i] = to_bf16(xr[i]);
        for (int i = k; i < qr.stride; i++) o[i] = 0;
    }
}

CLONES void round_cols(const float* __restrict x, int r, int c0, int c1, int k, QuantRows& qr) {
    uint16_t* o = qr.bf.data() + size_t(r) * qr.stride;
    for (int i = c0; i < c1; i++) o[i] = to_bf16(x[i]);
    if (c1 == k)
        for (int i = k; i < qr.stride; i++) o[i] = 0;
}

bool nibble_kernel(const Linear& lin) {  // a chunk of 64 bytes holds whole groups, or lies in one
    const int h = lin.g / 2;
    return lin.vnni && lin.bits == 4 && (h == 16 || h == 32 || h % 64 == 0);
}

void nibble_order(const Linear& lin, int rows, QuantRows& qr) {
    const int g = lin.g, h = g / 2, nbytes = lin.groups * h, nch = (nbytes + 63) / 64;
    for (int r = 0; r < rows; r++) {
        const int8_t* q = qr.q.data() + size_t(r) * qr.stride;
        const float* d = qr.d.data() + size_t(r) * qr.blocks;
        const float* ds = qr.dsum.data() + size_t(r) * qr.blocks;
        int8_t* o = qr.nib.data() + size_t(r) * qr.chunks * 128;
        float* od = qr.nibd.data() + size_t(r) * qr.chunks * 48;
        for (int c = 0; c < nch; c++, o += 128, od += 48)
            for (int p = 0; p < 64; p++) {  // byte p of the chunk: column lo of its low nibble, lo + h of its high one
                const int byte = c * 64 + p, t = byte / h, lo = t * g + byte % h;
                const bool in = byte < nbytes;
                o[p] = in ? q[lo] : 0;
                o[64 + p] = in ? q[lo + h] : 0;
                if (p % 4 == 0) {  // a 32-bit lane: 4 columns of one block on each side
                    const int l = p / 4, blo = lo / QuantRows::BLOCK, bhi = (lo + h) / QuantRows::BLOCK;
                    od[l] = in ? d[blo] : 0.f;
                    od[16 + l] = in ? d[bhi] : 0.f;
                    od[32 + l] = in ? (ds[blo] + ds[bhi]) / 8.f : 0.f;  // 8 lanes hold a block's 32 columns
                }
            }
    }
}

bool int8_kernel(const Linear& lin) { return lin.vnni && lin.bits == 8 && lin.groups == 1; }

void pair_scales(int rows, int k, QuantRows& qr) {
    const int per = qr.pair_chunks(), nb = (k + QuantRows::BLOCK - 1) / QuantRows::BLOCK;
    for (int r = 0; r < rows; r++) {
        const float* d = qr.d.data() + size_t(r) * qr.blocks;
        const float* ds = qr.dsum.data() + size_t(r) * qr.blocks;
        float* o = qr.pairs.data() + size_t(r) * per * 16;
        float all = 0.f;
        for (int c = 0; c < nb; c++) {  // blocks past k: zero input, never read
            for (int l = 0; l < 8; l++) o[(c / 2) * 16 + (c % 2) * 8 + l] = d[c];
            all += ds[c];
        }
        qr.dsum_all[r] = all;
    }
}

void prepare_input(const Linear& lin, const float* x, int ldx, int rows, int k, QuantRows& qr) {
    if (lin.vnni) quantize_rows(x, ldx, rows, k, qr);
    else if (lin.bits == 16) round_rows(x, ldx, rows, k, qr);
    if (nibble_kernel(lin)) nibble_order(lin, rows, qr);
    if (int8_kernel(lin)) pair_scales(rows, k, qr);
}

// ---- float kernels (fp32 weights; bf16 and quantized weights converted in registers where
// AVX-512 BF16 / VNNI does not fit)

static inline float val(const float* p, size_t i) { return p[i]; }
static inline float val(const uint16_t* p, size_t i) { return from_bf16(p[i]); }  // bf16

template <class T>  // four rows of W (fp32 or bf16) . x (the same type)
static inline void dot4(const T* __restrict w, size_t ld, const T* __restrict x, int k, float* o) {
    const T *w0 = w, *w1 = w + ld, *w2 = w + 2 * ld, *w3 = w + 3 * ld;
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    for (int i = 0; i < k; i++) {
        const float xi = val(x, i);
        a0 += val(w0, i) * xi;
        a1 += val(w1, i) * xi;
        a2 += val(w2, i) * xi;
        a3 += val(w3, i) * xi;
    }
    o[0] = a0; o[1] = a1; o[2] = a2; o[3] = a3;
}

template <class T>
static inline float dot1(const T* __restrict w, const T* __restrict x, int k) {
    float a = 0.f;
    for (int i = 0; i < k; i++) a += val(w, i) * val(x, i);
    return a;
}

template <class T>  // y[b, j] = W[j] . x[b] for j in [j0, j1)
static inline void plain_rows(const T* W, size_t K, const T* x, size_t ldx, int rows, int j0, int j1, float* y,
                              int ldy) {
    int j = j0;
    for (; j + 4 <= j1; j += 4)
        for (int b = 0; b < rows; b++) {
            float o[4];
            dot4(W + j * K, K, x + b * ldx, int(K), o);
            for (int u = 0; u < 4; u++) y[size_t(b) * ldy + j + u] = o[u];
        }
    for (; j < j1; j++)
        for (int b = 0; b < rows; b++) y[size_t(b) * ldy + j] = dot1(W + j * K, x + b * ldx, int(K));
}

CLONES static void convert_rows(const Linear& L, const QuantRows& qr, int rows, int j0, int j1, float* y, int ldy) {
    plain_rows(static_cast<const uint16_t*>(L.w), L.k, qr.bf.data(), qr.stride, rows, j0, j1, y, ldy);
}

static inline float dot_i8(const int8_t* __restrict w, const float* __restrict x, int k) {
    float a = 0.f;
    for (int i = 0; i < k; i++) a += float(w[i]) * x[i];
    return a;
}

static inline float dot_nibbles(const uint8_t* __restrict q, const float* __restrict x, int g) {
    const int h = g / 2;  // low nibbles: columns [0, h), high nibbles: [h, g)
    float lo = 0.f, hi = 0.f;
    for (int i = 0; i < h; i++) {
        lo += float(q[i] & 15) * x[i];
        hi += float(q[i] >> 4) * x[h + i];
    }
    return lo + hi;
}

CLONES static void float_rows(const Linear& L, const float* __restrict x, int ldx, int rows, int j0, int j1,
                              float* __restrict y, int ldy, float* __restrict xs) {
    if (L.bits == 32) {
        plain_rows(static_cast<const float*>(L.w), L.k, x, ldx, rows, j0, j1, y, ldy);
        return;
    }
    const int G = L.groups, g = L.g;  // x is zero-padded to Kp = G * g
    for (int b = 0; b < rows; b++)
        for (int t = 0; t < G; t++) {
            float s = 0.f;
            for (int i = 0; i < g; i++) s += x[size_t(b) * ldx + t * g + i];
            xs[b * G + t] = s;
        }
    const float zc = L.bits == 4 ? 8.f : 0.f;
    for (int j = j0; j < j1; j++)
        for (int b = 0; b < rows; b++) {
            const float* xr = x + size_t(b) * ldx;
            float acc = 0.f;
            for (int t = 0; t < G; t++) {
                float d;
                if (L.bits == 8)
                    d = dot_i8(static_cast<const int8_t*>(L.w) + size_t(j) * G * g + t * g, xr + t * g, g);
                else
                    d = dot_nibbles(static_cast<const uint8_t*>(L.w) + size_t(j) * G * g / 2 + t * g / 2, xr + t * g, g);
                float z = zc;
                if (L.zeros)
                    z = L.bits == 8 ? float(static_cast<const int16_t*>(L.zeros)[size_t(j) * G + t])
                                    : float(static_cast<const uint8_t*>(L.zeros)[size_t(j) * G + t]);
                acc += L.scales[size_t(j) * G + t] * (d - z * xs[b * G + t]);
            }
            y[size_t(b) * ldy + j] = acc;
        }
}

// ---- integer kernels (AVX-512 VNNI on 256-bit vectors)

VNNI static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

VNNI static float row_i8(const Linear& L, int j, const int8_t* xq, const float* d, const float* dsum) {
    const int Kp = L.kp(), G = L.groups;
    const int per = G == 1 ? (Kp + 31) / 32 : L.g / 32;  // blocks per group
    const int8_t* wr = static_cast<const int8_t*>(L.w) + size_t(j) * Kp;
    const int16_t* zr = L.zeros ? static_cast<const int16_t*>(L.zeros) + size_t(j) * G : nullptr;
    const __m256i zero = _mm256_setzero_si256();
    __m256 acc = _mm256_setzero_ps();
    float corr = 0.f;
    for (int t = 0; t < G; t++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        const int c0 = t * per;
        float ds = 0.f;
        for (int i = 0; i < per; i++) {
            const int c = c0 + i, col = c * 32;
            const __m256i w = col + 32 <= Kp ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + col))
                                             : _mm256_maskz_loadu_epi8(__mmask32((1ull << (Kp - col)) - 1), wr + col);
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + col));
            const __m256i p = _mm256_dpbusd_epi32(zero, _mm256_sign_epi8(w, w), _mm256_sign_epi8(xv, w));
            if (i & 1) a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[c]), a1);
            else a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[c]), a0);
            ds += dsum[c];
        }
        const float s = L.scales[size_t(j) * G + t];
        acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(s), acc);
        if (zr) corr += s * float(zr[t]) * ds;
    }
    return hsum256(acc) - corr;
}

VNNI static inline __m256 block(__m256i w, const int8_t* xq, int c) {  // codes w of columns [32c, 32c + 32) . x
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(
        _mm256_setzero_si256(), w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + size_t(c) * 32))));
}

VNNI static float row_i4(const Linear& L, int j, const int8_t* xq, const float* d, const float* dsum) {
    const int G = L.groups, g = L.g, h = g / 2;
    const uint8_t* wr = static_cast<const uint8_t*>(L.w) + size_t(j) * G * h;
    const uint8_t* zr = L.zeros ? static_cast<const uint8_t*>(L.zeros) + size_t(j) * G : nullptr;
    const float* sr = L.scales + size_t(j) * G;
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    float corr = 0.f;
    if (g == 32) {  // a group is 16 bytes: two groups per load, each one block of x
        int t = 0;
        for (; t + 2 <= G; t += 2) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + t * 16));
            const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            a0 = _mm256_fmadd_ps(block(_mm256_permute2x128_si256(lo, hi, 0x20), xq, t), _mm256_set1_ps(sr[t] * d[t]), a0);
            a1 = _mm256_fmadd_ps(block(_mm256_permute2x128_si256(lo, hi, 0x31), xq, t + 1),
                                 _mm256_set1_ps(sr[t + 1] * d[t + 1]), a1);
            corr += sr[t] * (zr ? float(zr[t]) : 8.f) * dsum[t] + sr[t + 1] * (zr ? float(zr[t + 1]) : 8.f) * dsum[t + 1];
        }
        if (t < G) {
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + t * 16));
            const __m128i lo = _mm_and_si128(v, _mm_set1_epi8(15));
            const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15));
            a0 = _mm256_fmadd_ps(block(_mm256_set_m128i(hi, lo), xq, t), _mm256_set1_ps(sr[t] * d[t]), a0);
            corr += sr[t] * (zr ? float(zr[t]) : 8.f) * dsum[t];
        }
        return hsum256(_mm256_add_ps(a0, a1)) - corr;
    }
    for (int t = 0; t < G; t++) {  // g a multiple of 64: 32 bytes hold 32 columns of each half
        const float s = sr[t];
        float ds = 0.f;
        for (int c = 0; c < h; c += 32) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + t * h + c));
            const int blo = (t * g + c) / 32, bhi = (t * g + h + c) / 32;
            a0 = _mm256_fmadd_ps(block(_mm256_and_si256(v, m4), xq, blo), _mm256_set1_ps(s * d[blo]), a0);
            a1 = _mm256_fmadd_ps(block(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), xq, bhi), _mm256_set1_ps(s * d[bhi]), a1);
            ds += dsum[blo] + dsum[bhi];
        }
        corr += s * (zr ? float(zr[t]) : 8.f) * ds;
    }
    return hsum256(_mm256_add_ps(a0, a1)) - corr;
}

// int4 on 512-bit vectors: a chunk of 64 weight bytes (128 columns) per step, both nibbles' integer dot
// products against the input in nibble order (nibble_order), each lane scaled by its blocks' input scales,
// less its zero point's share, times its group's weight scale:
//     acc += s[lane] * (d_lo * (lo . x_lo) + d_hi * (hi . x_hi) - z[lane] * dsum share)
// NB input rows share each chunk's load and unpacking.
template <int NB>
VNNI static void nibble_rows(const Linear& L, int j, const QuantRows& qr, int b0, float* y, int ldy) {
    const int G = L.groups, h = L.g / 2, nbytes = G * h, nch = (nbytes + 63) / 64, per = h <= 64 ? 64 / h : 1;
    const uint8_t* wr = static_cast<const uint8_t*>(L.w) + size_t(j) * nbytes;
    const float* sr = L.scales + size_t(j) * G;
    const uint8_t* zr = L.zeros ? static_cast<const uint8_t*>(L.zeros) + size_t(j) * G : nullptr;
    __m512i lane_group = _mm512_setzero_si512();  // each lane's group within the chunk
    if (h < 64) lane_group = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               h == 16 ? 2 : 3);
    const __m512i m4 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    __m512 acc[NB];
    for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();
    const size_t xs = size_t(qr.chunks) * 128, ds = size_t(qr.chunks) * 48;
    const int8_t* x0 = qr.nib.data() + size_t(b0) * xs;
    const float* d0 = qr.nibd.data() + size_t(b0) * ds;
    for (int c = 0; c < nch; c++) {
        const int t0 = c * 64 / h, left = nbytes - c * 64;
        const __m512i v = left >= 64 ? _mm512_loadu_si512(wr + c * 64) : _mm512_maskz_loadu_epi8((1ull << left) - 1, wr + c * 64);
        const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        const __mmask16 gm = __mmask16((1u << std::min(per, G - t0)) - 1);
        const __m512 s = _mm512_permutexvar_ps(lane_group, _mm512_maskz_loadu_ps(gm, sr + t0));
        const __m512 z = zr ? _mm512_permutexvar_ps(lane_group, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                  _mm_maskz_loadu_epi8(gm, zr + t0))))
                            : _mm512_set1_ps(8.f);
        for (int b = 0; b < NB; b++) {
            const int8_t* xb = x0 + b * xs + size_t(c) * 128;
            const float* db = d0 + b * ds + size_t(c) * 48;
            const __m512 plo = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(xb)));
            const __m512 phi = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, hi, _mm512_loadu_si512(xb + 64)));
            __m512 t = _mm512_fmadd_ps(plo, _mm512_loadu_ps(db), _mm512_mul_ps(phi, _mm512_loadu_ps(db + 16)));
            t = _mm512_fnmadd_ps(z, _mm512_loadu_ps(db + 32), t);
            acc[b] = _mm512_fmadd_ps(t, s, acc[b]);
        }
    }
    for (int b = 0; b < NB; b++) y[size_t(b0 + b) * ldy + j] = _mm512_reduce_add_ps(acc[b]);
}

// Per-channel int8 on 512-bit vectors: 64 columns (two blocks of the input) per step. vpdpbusd takes
// an unsigned operand, so the signed weight codes go in as w + 128 (one xor) and the input's 128 * sum
// comes off once per row:
//     y = s * (sum_c d_c (w + 128) . x_c - (128 + z) * sum_c dsum_c)
template <int NB>
VNNI static void int8_rows(const Linear& L, int j, const QuantRows& qr, int b0, float* y, int ldy) {
    const int K = L.kp(), per = qr.pair_chunks();
    const int8_t* wr = static_cast<const int8_t*>(L.w) + size_t(j) * K;
    const __m512i flip = _mm512_set1_epi8(-128), zero = _mm512_setzero_si512();
    __m512 acc[NB];
    for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();
    for (int c = 0, i = 0; i < K; c++, i += 64) {
        const __mmask64 m = K - i >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - i)) - 1;
        const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, wr + i), flip);
        for (int b = 0; b < NB; b++) {
            const __m512i xv = _mm512_maskz_loadu_epi8(m, qr.q.data() + size_t(b0 + b) * qr.stride + i);
            const __m512 d = _mm512_loadu_ps(qr.pairs.data() + (size_t(b0 + b) * per + c) * 16);
            acc[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, u, xv)), d, acc[b]);
        }
    }
    const float s = L.scales[j];
    const float z = 128.f + (L.zeros ? float(static_cast<const int16_t*>(L.zeros)[j]) : 0.f);
    for (int b = 0; b < NB; b++)
        y[size_t(b0 + b) * ldy + j] = s * (_mm512_reduce_add_ps(acc[b]) - z * qr.dsum_all[b0 + b]);
}

template <void (*K1)(const Linear&, int, const QuantRows&, int, float*, int),
          void (*K2)(const Linear&, int, const QuantRows&, int, float*, int),
          void (*K3)(const Linear&, int, const QuantRows&, int, float*, int),
          void (*K4)(const Linear&, int, const QuantRows&, int, float*, int)>
static void row_blocks(const Linear& L, const QuantRows& qr, int rows, int j0, int j1, float* y, int ldy) {
    for (int j = j0; j < j1; j++) {  // up to 4 input rows share each load of the weight row
        int b = 0;
        for (; b + 4 <= rows; b += 4) K4(L, j, qr, b, y, ldy);
        switch (rows - b) {
            case 3: K3(L, j, qr, b, y, ldy); break;
            case 2: K2(L, j, qr, b, y, ldy); break;
            case 1: K1(L, j, qr, b, y, ldy); break;
            default: break;
        }
    }
}

VNNI static void vnni_rows(const Linear& L, const QuantRows& qr, int rows, int j0, int j1, float* y, int ldy) {
    if (int8_kernel(L)) {
        row_blocks<int8_rows<1>, int8_rows<2>, int8_rows<3>, int8_rows<4>>(L, qr, rows, j0, j1, y, ldy);
        return;
    }
    if (nibble_kernel(L)) {
        row_blocks<nibble_rows<1>, nibble_rows<2>, nibble_rows<3>, nibble_rows<4>>(L, qr, rows, j0, j1, y, ldy);
        return;
    }
    for (int j = j0; j < j1; j++)
        for (int b = 0; b < rows; b++) {
            const int8_t* xq = qr.q.data() + size_t(b) * qr.stride;
            const float* d = qr.d.data() + size_t(b) * qr.blocks;
            const float* ds = qr.dsum.data() + size_t(b) * qr.blocks;
            y[size_t(b) * ldy + j] = L.bits == 8 ? row_i8(L, j, xq, d, ds) : row_i4(L, j, xq, d, ds);
        }
}

// ---- bf16 kernels (AVX-512 BF16): NJ output rows x NB input rows per pass over K

// Weight rows [j + AHEAD, j + AHEAD + NJ) are prefetched while rows [j, j + NJ) are read: one core
// streams 1.2x as many bytes per second with it (bench/README.md, "bf16 in the fused decode step").
constexpr int AHEAD = 8;

template <int NJ, int NB>
BF16 static inline void dots_bf16(const uint16_t* w, size_t ldw, const uint16_t* x, size_t ldx, int k, float* y,
                                  size_t ldy) {
    __m512 acc[NJ][NB];
    for (int u = 0; u < NJ; u++)
        for (int b = 0; b < NB; b++) acc[u][b] = _mm512_setzero_ps();
    for (int i = 0; i < k; i += 32) {  // x is zero-padded to a multiple of 32; w is masked past k
        const __mmask32 m = k - i >= 32 ? ~__mmask32(0) : __mmask32((1u << (k - i)) - 1);
        __m512i xv[NB];
        for (int b = 0; b < NB; b++) xv[b] = _mm512_loadu_si512(x + b * ldx + i);
        for (int u = 0; u < NJ; u++) {
            if (NJ > 1) _mm_prefetch(reinterpret_cast<const char*>(w + (AHEAD + u) * ldw + i), _MM_HINT_T0);
            const __m512i wv = _mm512_maskz_loadu_epi16(m, w + u * ldw + i);
            for (int b = 0; b < NB; b++) acc[u][b] = _mm512_dpbf16_ps(acc[u][b], (__m512bh)wv, (__m512bh)xv[b]);
        }
    }
    for (int u = 0; u < NJ; u++)
        for (int b = 0; b < NB; b++) y[b * ldy + u] = _mm512_reduce_add_ps(acc[u][b]);
}

template <int NJ>
BF16 static void bf16_block(const uint16_t* w, size_t ldw, const QuantRows& qr, int rows, int k, float* y, int ldy) {
    const size_t ldx = qr.stride;
    const uint16_t* x = qr.bf.data();
    int b = 0;
    for (; b + 4 <= rows; b += 4) dots_bf16<NJ, 4>(w, ldw, x + b * ldx, ldx, k, y + size_t(b) * ldy, ldy);
    switch (rows - b) {
        case 3: dots_bf16<NJ, 3>(w, ldw, x + b * ldx, ldx, k, y + size_t(b) * ldy, ldy); break;
        case 2: dots_bf16<NJ, 2>(w, ldw, x + b * ldx, ldx, k, y + size_t(b) * ldy, ldy); break;
        case 1: dots_bf16<NJ, 1>(w, ldw, x + b * ldx, ldx, k, y + size_t(b) * ldy, ldy); break;
        default: break;
    }
}

BF16 static void bf16_rows(const Linear& L, const QuantRows& qr, int rows, int j0, int j1, float* y, int ldy) {
    const size_t K = L.k;
    const uint16_t* W = static_cast<const uint16_t*>(L.w);
    int j = j0;
    for (; j + 4 <= j1; j += 4) bf16_block<4>(W + j * K, K, qr, rows, L.k, y + j, ldy);
    for (; j < j1; j++) bf16_block<1>(W + j * K, K, qr, rows, L.k, y + j, ldy);
}

void linear_rows(const Linear& lin, const float* x, int ldx, const QuantRows* qr, int rows, int j0, int j1,
                 float* y, int ldy, float* tmp) {
    if (j0 >= j1) return;
    if (lin.vnni) vnni_rows(lin, *qr, rows, j0, j1, y, ldy);
    else if (lin.bits == 16 && lin.dpbf16) bf16_rows(lin, *qr, rows, j0, j1, y, ldy);
    else if (lin.bits == 16) convert_rows(lin, *qr, rows, j0, j1, y, ldy);
    else float_rows(lin, x, ldx, rows, j0, j1, y, ldy, tmp);
}

// ---- attention and RoPE

// exp(x) for x <= 0 (a score less the largest), in plain arithmetic that the compiler vectorizes
// (std::exp stays a scalar libm call per score): 2^n times Cephes' expf polynomial of the remainder,
// within 8e-8 relative of exp (measured over [-87, 0]); below -87.3 (where expf leaves the normal
// floats) it gives 2^-126 * ~e^-0.3.
constexpr float EXP_MIN = -87.3f, LOG2E = 1.44269504088896341f;
constexpr float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;  // ln 2 in two parts
constexpr float EXP_POLY[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

static inline float exp_le0(float x) {
    x = std::max(x, EXP_MIN);
    const float n = std::floor(x * LOG2E + 0.5f);
    const float r = (x - n * LN2_HI) - n * LN2_LO;  // x - n ln 2
    float p = EXP_POLY[0];
    for (int i = 1; i < 6; i++) p = p * r + EXP_POLY[i];
    p = p * r * r + r + 1.f;
    const int32_t bits = (int32_t(n) + 127) << 23;  // 2^n, n in [-126, 0]
    float scale;
    __builtin_memcpy(&scale, &bits, 4);
    return p * scale;
}

// Attention of one query: scores (scaled q . k of every position), softmax, the weighted sum of the
// values (the portable kernel; attend16 below is the AVX-512 one).
template <class T>
static inline void attend_t(const float* __restrict q, const T* __restrict kc, const T* __restrict vc, int len, int d,
                            float* __restrict scores, float* __restrict out) {
    const float scale = 1.f / std::sqrt(float(d));
    float mx = -INFINITY;
    for (int t = 0; t < len; t++) {
        const T* k = kc + size_t(t) * d;
        float s = 0.f;
        for (int i = 0; i < d; i++) s += val(k, i) * q[i];
        s *= scale;
        scores[t] = s;
        mx = std::max(mx, s);
    }
    float sum = 0.f;
    for (int t = 0; t < len; t++) {
        scores[t] = exp_le0(scores[t] - mx);
        sum += scores[t];
    }
    for (int i = 0; i < d; i++) out[i] = 0.f;
    const float inv = 1.f / sum;
    for (int t = 0; t < len; t++) {
        const float p = scores[t] * inv;
        const T* v = vc + size_t(t) * d;
        for (int i = 0; i < d; i++) out[i] += p * val(v, i);
    }
}

CLONES static void attend_f32(const float* q, const float* kc, const float* vc, int len, int d, float* scores,
                              float* out) {
    attend_t(q, kc, vc, len, d, scores, out);
}

CLONES static void attend_bf16(const float* q, const uint16_t* kc, const uint16_t* vc, int len, int d, float* scores,
                               float* out) {
    attend_t(q, kc, vc, len, d, scores, out);
}

// ---- attention on AVX-512 (attend16): 16 values of a key or value row as fp32
AVX512 static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 static inline __m512 load16(const uint16_t* p) {  // bf16 -> fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

// Lane p = the sum of a[p]'s lanes: 16 dot products' accumulators into 16 scores with a transposing
// reduction (about 3 instructions a position instead of a horizontal sum each).
AVX512 static inline __m512 reduce16(const __m512* a) {
    __m512 t[8], u[4];
    for (int p = 0; p < 8; p++)  // per 128 bits: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] of a = a[2p], b = a[2p + 1]
        t[p] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * p], a[2 * p + 1]), _mm512_unpackhi_ps(a[2 * p], a[2 * p + 1]));
    for (int p = 0; p < 4; p++)  // per 128 bits: the 128-bit sums of a[4p .. 4p + 3]
        u[p] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * p], t[2 * p + 1], 0x44), _mm512_shuffle_ps(t[2 * p], t[2 * p + 1], 0xEE));
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

AVX512 static inline __m512 exp16_le0(__m512 x) {  // exp_le0 on 16 lanes
    x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x));
    __m512 p = _mm512_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_POLY[i]));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// The whole attention of one query on AVX-512, d = 16 NV: scores 16 positions at a time, softmax and
// the weighted sum of the values with the output in registers.
template <int NV, class T>
AVX512 static void attend16(const float* q, const T* kc, const T* vc, int len, float* scores, float* out) {
    constexpr int d = 16 * NV;
    const __m512 scale = _mm512_set1_ps(1.f / std::sqrt(float(d)));
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int t0 = 0; t0 < len; t0 += 16) {
        const int n = std::min(16, len - t0);
        const __mmask16 m = __mmask16((1u << n) - 1);
        __m512 acc[16];
        for (int p = 0; p < 16; p++) acc[p] = _mm512_setzero_ps();
        for (int i = 0; i < d; i += 16) {
            const __m512 qv = _mm512_loadu_ps(q + i);
            for (int p = 0; p < 16; p++)  // past len: the last row again (in bounds, masked out below)
                acc[p] = _mm512_fmadd_ps(load16(kc + size_t(t0 + std::min(p, n - 1)) * d + i), qv, acc[p]);
        }
        const __m512 s = _mm512_mul_ps(reduce16(acc), scale);
        _mm512_mask_storeu_ps(scores + t0, m, s);
        mx = _mm512_mask_max_ps(mx, m, mx, s);
    }
    const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int t0 = 0; t0 < len; t0 += 16) {
        const __mmask16 m = __mmask16((1u << std::min(16, len - t0)) - 1);
        const __m512 e = exp16_le0(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + t0), top));
        _mm512_mask_storeu_ps(scores + t0, m, e);
        sum = _mm512_mask_add_ps(sum, m, sum, e);
    }
    const float inv = 1.f / _mm512_reduce_add_ps(sum);
    __m512 o[NV], e[NV];  // odd and even positions: two chains of FMAs per output vector
    for (int c = 0; c < NV; c++) o[c] = e[c] = _mm512_setzero_ps();
    int t = 0;
    for (; t + 2 <= len; t += 2) {
        const __m512 p0 = _mm512_set1_ps(scores[t]), p1 = _mm512_set1_ps(scores[t + 1]);
        const T* v = vc + size_t(t) * d;
        for (int c = 0; c < NV; c++) {
            e[c] = _mm512_fmadd_ps(p0, load16(v + 16 * c), e[c]);
            o[c] = _mm512_fmadd_ps(p1, load16(v + d + 16 * c), o[c]);
        }
    }
    if (t < len)
        for (int c = 0; c < NV; c++) e[c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[t]), load16(vc + size_t(t) * d + 16 * c), e[c]);
    for (int c = 0; c < NV; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(_mm512_add_ps(e[c], o[c]), _mm512_set1_ps(inv)));
}

template <class T>  // attend16 for the head sizes models use; false: d is none of them
static bool attend_avx512(const float* q, const T* kc, const T* vc, int len, int d, float* scores, float* out) {
    switch (d) {
        case 64: attend16<4>(q, kc, vc, len, scores, out); return true;
        case 80: attend16<5>(q, kc, vc, len, scores, out); return true;
        case 96: attend16<6>(q, kc, vc, len, scores, out); return true;
        case 128: attend16<8>(q, kc, vc, len, scores, out); return true;
        case 256: attend16<16>(q, kc, vc, len, scores, out); return true;
        default: return false;
    }
}

void attend(const float* q, const void* kc, const void* vc, bool bf16, int len, int d, float* scores, float* out) {
    static const bool avx512 = cpu_has_avx512();
    if (bf16) {
        const uint16_t *k = static_cast<const uint16_t*>(kc), *v = static_cast<const uint16_t*>(vc);
        if (!(avx512 && attend_avx512(q, k, v, len, d, scores, out))) attend_bf16(q, k, v, len, d, scores, out);
    } else {
        const float *k = static_cast<const float*>(kc), *v = static_cast<const float*>(vc);
        if (!(avx512 && attend_avx512(q, k, v, len, d, scores, out))) attend_f32(q, k, v, len, d, scores, out);
    }
}

void store(void* cache, bool bf16, size_t at, const float* x, int d) {
    if (!bf16) {
        std::memcpy(static_cast<float*>(cache) + at, x, sizeof(float) * d);
        return;
    }
    uint16_t* c = static_cast<uint16_t*>(cache) + at;
    for (int i = 0; i < d; i++) c[i] = to_bf16(x[i]);
}

void rope(float* x, const float* cos, const float* sin, int d) {  // half-split layout (rotate_half)
    const int h = d / 2;
    for (int i = 0; i < h; i++) {
        const float a = x[i], b = x[h + i];
        x[i] = a * cos[i] - b * sin[i];
        x[h + i] = b * cos[i] + a * sin[i];
    }
}

}  // namespace mmdecode
