// The fused CPU decode step: one call runs every layer of a GPT-2 or Llama-family decoder for a
// few rows, inside one OpenMP parallel region, on the torch tensors' memory (no copies). A row is
// one new token at one position of one row of the KV cache: a decode step (one row per cache row),
// or several tokens per cache row (speculative verification, a short prompt continuation).
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace mmdecode {

enum Act { ACT_NONE = 0, ACT_GELU_TANH, ACT_GELU, ACT_QUICK_GELU, ACT_SILU, ACT_RELU };

// A linear layer in one of the engine's weight formats (kernels/quant_cpu.py documents the quantized ones).
struct Linear {
    int bits = 32;                  // 32: fp32 (N, K); 16: bf16 (N, K); 8: int8 (N, Kp); 4: int4 nibbles (N, Kp / 2)
    const void* w = nullptr;
    const float* scales = nullptr;  // (N, G) fp32
    const void* zeros = nullptr;    // (N, G) int16 (int8) / uint8 (int4), or null: symmetric (0 / 8)
    const float* bias = nullptr;    // (N,) or null
    int n = 0, k = 0;               // out and in features
    int g = 0, groups = 0;          // group size and groups per row (quantized); Kp = g * groups
    bool vnni = false;              // integer dot products with int8 activations (see kernels.cpp)
    bool dpbf16 = false;            // bf16 weights: AVX-512 BF16 dot products (else converted to fp32 and FMA)
    int kp() const { return bits >= 16 ? k : g * groups; }
};

// The input rows of a layer as its kernel reads them: quantized to int8 in blocks of 32 columns (as
// llama.cpp's Q8 activations) for the integer kernels, rounded to bf16 for bf16 weights.
struct QuantRows {
    static constexpr int BLOCK = 32;
    std::vector<int8_t> q;   // (B, stride), zero past K
    std::vector<float> d;    // (B, blocks) scale of each block
    std::vector<float> dsum; // (B, blocks) d * sum(q) of each block: the zero point's share
    std::vector<uint16_t> bf;  // (B, stride) bf16, zero past K
    // The int8 input in the order of an int4 weight row's bytes (`nibble_order`), per chunk of 64 weight
    // bytes (128 columns): the columns of the 64 low nibbles, then of the 64 high ones; and per 32-bit
    // lane of the chunk, the scales of those columns' blocks (low, high) and their zero-point share.
    std::vector<int8_t> nib;   // (B, chunks, 128)
    std::vector<float> nibd;   // (B, chunks, 3, 16): low-nibble block scale, high-nibble block scale, dsum share
    // For per-channel int8 weights on 512-bit vectors (`pair_scales`): the scales of each pair of blocks,
    // one per 32-bit lane (16 floats per 64 columns), and the sum of a row's dsum.
    std::vector<float> pairs;  // (B, pair_chunks(), 16)
    std::vector<float> dsum_all;  // (B,)
    int stride = 0, blocks = 0, chunks = 0;
    int pair_chunks() const { return stride / 64 + 1; }  // 64-column chunks a row of `pairs` holds
    void resize(int rows, int max_k);
};

struct Norm { const float* w = nullptr; const float* b = nullptr; };  // b null: RMSNorm

struct Layer { Norm n1, n2; Linear qkv, o, up, down; };

// kernels.cpp
bool cpu_has_vnni();
bool cpu_has_bf16();
bool vnni_fits(const Linear& lin);
void quantize_rows(const float* x, int ldx, int rows, int k, QuantRows& qr);
bool nibble_kernel(const Linear& lin);  // an int4 layer the AVX-512 kernel runs (reads QuantRows::nib)
void nibble_order(const Linear& lin, int rows, QuantRows& qr);  // after quantize_rows
bool int8_kernel(const Linear& lin);  // a per-channel int8 layer the AVX-512 kernel runs (reads QuantRows::pairs)
void pair_scales(int rows, int k, QuantRows& qr);  // after quantize_rows of k columns
inline uint16_t to_bf16(float x) {  // round to nearest even, as PyTorch's float -> bfloat16
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // a NaN stays a (quiet) NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
inline float from_bf16(uint16_t h) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
void round_rows(const float* x, int ldx, int rows, int k, QuantRows& qr);  // x -> qr.bf
// Columns [c0, c1) of input row r (x: that row) into qr.bf, the row's padding past k zeroed with its last piece.
void round_cols(const float* x, int r, int c0, int c1, int k, QuantRows& qr);
// Whether `lin` reads its input from QuantRows (int8 or bf16) rather than fp32, and making it so.
inline bool rounds_input(const Linear& lin) { return lin.vnni || lin.bits == 16; }
void prepare_input(const Linear& lin, const float* x, int ldx, int rows, int k, QuantRows& qr);
// y[b * ldy + j] = sum_k W[j, k] * x[b, k] for j in [j0, j1) (no bias); qr: x prepared (rounds_input)
void linear_rows(const Linear& lin, const float* x, int ldx, const QuantRows* qr, int rows, int j0, int j1,
                 float* y, int ldy, float* tmp);
// Attention of one query over `len` cached positions of one head; the caches hold fp32, or bf16
// (uint16_t) where `bf16`: `store` writes d values at element `at` of one.
void attend(const float* q, const void* kc, const void* vc, bool bf16, int len, int d, float* scores, float* out);
void store(void* cache, bool bf16, size_t at, const float* x, int d);
void rope(float* x, const float* cos, const float* sin, int d);
float act(int kind, float x);
void norm_row(const float* x, const Norm& nm, float eps, int c, float* out);

// A decoder's weights and the step's scratch buffers, for one KV cache batch size.
struct Config {
    int batch;        // rows of the KV cache
    int d_model, n_head, n_kv_head, head_dim, d_ff, vocab;
    int act;          // Act of the MLP
    bool gated;       // act(gate) * up (Llama) or act(up) (GPT-2)
    bool rope;        // rotary positions (else a learned position table)
    float eps;        // norm epsilon
    bool int_dots;    // run quantized layers that fit as integer dot products (where the CPU has VNNI)
    bool kv_bf16;     // the KV cache holds bf16 (else fp32)
    bool bf16_dots;   // run bf16 layers as AVX-512 BF16 dot products where the CPU has them (else convert + FMA)
};

class Plan {
  public:
    explicit Plan(const Config& cfg);
    void set_embed(const float* table, const Linear& quantized, const float* positions);
    void add_layer(const Layer& layer);
    void set_head(const Norm& norm, const Linear& head);
    // R rows, row r: token tokens[r] at position positions[r] of cache row cache_rows[r] (int64 each;
    // no two rows at one position of one cache row).
    // Writes each layer's keys and values of every row into the caches (L, B, Hkv, tmax, D) fp32, or
    // bf16 where kv_bf16 (rounded to nearest even, as PyTorch writes them), then
    // each row attends over positions [0, positions[r]] of its cache row (so over the rows before it
    // in the same cache row too), and writes the logits (R, V), or where `out_index` is given those of
    // its `outs` rows only (outs, V): the LM head of a prompt's last token, not of all its tokens.
    // cos / sin: (rope_len, D / 2) RoPE tables. Throws std::invalid_argument (nothing written) for an
    // index out of range.
    void step(int rows, const int64_t* tokens, const int64_t* cache_rows, const int64_t* positions, void* k_cache,
              void* v_cache, int tmax, const float* cos, const float* sin, int rope_len, float* logits, int threads,
              int outs = 0, const int64_t* out_index = nullptr);
    int vnni_layers() const;  // linears that run as integer dot products

  private:
    Config c_;
    std::vector<Layer> layers_;
    Norm norm_f_;
    Linear head_, embed_q_;
    const float* embed_ = nullptr;
    const float* pos_ = nullptr;
    int ld_ = 0;                                  // row stride of the activation buffers
    int cap_ = 0;                                 // rows the buffers hold (grown by `reserve`)
    std::vector<float> x_, xn_, att_, h_, y_;     // (cap_, ld_) each
    QuantRows qr_[2];
    std::vector<float> tmp_, scores_;             // per thread
    std::vector<char> seen_;                      // (B,) scratch of `step`: cache rows seen
    struct alignas(64) Counter { std::atomic<int> v{0}; };  // one cache line each
    std::vector<Counter> counters_;               // per op of a step: chunks done, each thread's next chunk
    int ops_ = 0;
    void prepare(Linear& lin);
    void reserve(int rows);
    void check(int rows, const int64_t* tokens, const int64_t* cache_rows, const int64_t* positions, int tmax,
               int rope_len, int outs, const int64_t* out_index) const;
    void embed_rows(int rows, const int64_t* tokens, const int64_t* positions);
};

}  // namespace mmdecode
