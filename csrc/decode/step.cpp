// The decode step: every layer for R rows in one OpenMP parallel region, op after op. Each op is cut
// into chunks (a linear layer: blocks of output rows; attention: (row, key/value head) pairs; a norm
// and an int8 input's quantization: one chunk; the bf16 input of o and down is rounded piece by
// piece in the op that computes it, into a second buffer). Each thread owns a contiguous share of an
// op's chunks and takes them in order from its own atomic counter, then helps with what is left of
// the others' shares; an op ends when all its chunks are done. Owned shares make each core's weight
// reads one long stream (the hardware prefetcher's best case: 5-13% more bytes a second than chunks
// dealt out alternately, bench/stream_chunks.cpp). Unlike a barrier, this never waits for a thread
// that holds no work: on a machine shared with other jobs, a thread the OS has descheduled costs the
// step at most the chunk it holds, not a time slice per op. A row's attention reads the keys and
// values the other rows of its cache row write in the same step: when a cache row has several rows,
// every row's write of a layer is one op and the attention the next; otherwise (a decode step) both
// are one op per (row, key/value head). Numerics follow the PyTorch modules of engine/nn/layers.py op for op, in fp32, and do not depend on which thread computes what. bf16
// models keep that fp32 residual stream; what is bf16 in them is what the weights and the cache
// read: each bf16 layer's input and the keys and values, rounded to nearest even (fused_step.py).
#include <immintrin.h>
#include <omp.h>
#include <sched.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "decode.hh"

namespace mmdecode {

constexpr int ROWS = 16;  // output rows per chunk of a linear layer (a few microseconds of weights)

static int chunks(int n) { return (n + ROWS - 1) / ROWS; }

static void wait_until(const std::atomic<int>& done, int n) {  // spin briefly, then give the core away
    for (int spins = 0; done.load(std::memory_order_acquire) < n; spins++) {
        if (spins < 4096) _mm_pause();
        else sched_yield();
    }
}

Plan::Plan(const Config& cfg) : c_(cfg) {
    if (cfg.batch < 1 || cfg.n_head % cfg.n_kv_head || (cfg.rope && cfg.head_dim % 2))
        throw std::invalid_argument("fused decode: inconsistent config");
    int w = std::max({cfg.d_model, cfg.n_head * cfg.head_dim, cfg.d_ff});
    ld_ = w;
}

void Plan::prepare(Linear& lin) {
    lin.vnni = c_.int_dots && lin.bits < 16 && cpu_has_vnni() && vnni_fits(lin);
    lin.dpbf16 = c_.bf16_dots && lin.bits == 16 && cpu_has_bf16();
    ld_ = std::max({ld_, lin.kp(), lin.n});
}

void Plan::set_embed(const float* table, const Linear& quantized, const float* positions) {
    embed_ = table;
    embed_q_ = quantized;
    pos_ = positions;
}

void Plan::add_layer(const Layer& layer) {
    layers_.push_back(layer);
    Layer& l = layers_.back();
    for (Linear* lin : {&l.qkv, &l.o, &l.up, &l.down}) prepare(*lin);
}

void Plan::set_head(const Norm& norm, const Linear& head) {
    norm_f_ = norm;
    head_ = head;
    prepare(head_);
    ld_ = (ld_ + 63) / 64 * 64;
    ops_ = 3 + int(layers_.size()) * 10;  // the most ops a step runs
    seen_.assign(c_.batch, 0);
    reserve(c_.batch);
}

void Plan::reserve(int rows) {
    if (rows <= cap_) return;
    cap_ = rows;
    const size_t n = size_t(rows) * ld_;
    for (auto* v : {&x_, &xn_, &att_, &h_, &y_}) v->assign(n, 0.f);  // the padding past each width stays 0
    for (QuantRows& q : qr_) q.resize(rows, ld_);
}

void Plan::check(int rows, const int64_t* tokens, const int64_t* cache_rows, const int64_t* positions, int tmax,
                 int rope_len, int outs, const int64_t* out_index) const {
    if (rows < 1) throw std::invalid_argument("fused decode: no rows");
    if (out_index && (outs < 1 || outs > rows))
        throw std::invalid_argument("fused decode: " + std::to_string(outs) + " logits rows of " + std::to_string(rows));
    for (int i = 0; out_index && i < outs; i++)
        if (out_index[i] < 0 || out_index[i] >= rows)
            throw std::invalid_argument("fused decode: logits row " + std::to_string(out_index[i]) + " of " +
                                        std::to_string(rows) + " rows");
    const int64_t npos = c_.rope ? std::min(tmax, rope_len) : tmax;
    for (int r = 0; r < rows; r++) {
        const char* bad = tokens[r] < 0 || tokens[r] >= c_.vocab                 ? "token"
                          : cache_rows[r] < 0 || cache_rows[r] >= c_.batch       ? "cache row"
                          : positions[r] < 0 || positions[r] >= npos             ? "position"
                                                                                 : nullptr;
        if (bad)
            throw std::invalid_argument("fused decode: row " + std::to_string(r) + ": token " +
                                        std::to_string(tokens[r]) + " (vocab " + std::to_string(c_.vocab) +
                                        "), cache row " + std::to_string(cache_rows[r]) + " (batch " +
                                        std::to_string(c_.batch) + "), position " + std::to_string(positions[r]) +
                                        " (" + std::to_string(npos) + " positions): bad " + bad);
    }
}

int Plan::vnni_layers() const {
    int n = head_.vnni;
    for (const Layer& l : layers_) n += l.qkv.vnni + l.o.vnni + l.up.vnni + l.down.vnni;
    return n;
}

void Plan::embed_rows(int rows, const int64_t* tokens, const int64_t* positions) {
    const int C = c_.d_model;
    for (int b = 0; b < rows; b++) {
        float* xr = x_.data() + size_t(b) * ld_;
        const int64_t tok = tokens[b];
        if (embed_) {
            std::memcpy(xr, embed_ + size_t(tok) * C, sizeof(float) * C);
        } else if (embed_q_.bits == 16) {
            const uint16_t* e = static_cast<const uint16_t*>(embed_q_.w) + size_t(tok) * C;
            for (int i = 0; i < C; i++) xr[i] = from_bf16(e[i]);
        } else {  // a row of a quantized table: (q - zero) * scale
            const Linear& e = embed_q_;
            const int G = e.groups, g = e.g;
            for (int i = 0; i < C; i++) {
                const int t = i / g;
                float q, z;
                if (e.bits == 8) {
                    q = float(static_cast<const int8_t*>(e.w)[size_t(tok) * G * g + i]);
                    z = e.zeros ? float(static_cast<const int16_t*>(e.zeros)[size_t(tok) * G + t]) : 0.f;
                } else {
                    const int r = i - t * g, h = g / 2;
                    const uint8_t byte = static_cast<const uint8_t*>(e.w)[size_t(tok) * G * h + t * h + r % h];
                    q = float(r < h ? byte & 15 : byte >> 4);
                    z = e.zeros ? float(static_cast<const uint8_t*>(e.zeros)[size_t(tok) * G + t]) : 8.f;
                }
                xr[i] = (q - z) * e.scales[size_t(tok) * G + t];
            }
        }
        if (pos_)
            for (int i = 0; i < C; i++) xr[i] += pos_[size_t(positions[b]) * C + i];
    }
}

void Plan::step(int rows, const int64_t* tokens, const int64_t* cache_rows, const int64_t* positions,
                void* k_cache, void* v_cache, int tmax, const float* cos, const float* sin, int rope_len,
                float* logits, int threads, int outs, const int64_t* out_index) {
    check(rows, tokens, cache_rows, positions, tmax, rope_len, outs, out_index);
    reserve(rows);
    bool shared = rows > c_.batch;  // a cache row with several rows: all writes of a layer before any attention
    std::fill(seen_.begin(), seen_.end(), 0);
    for (int r = 0; r < rows && !shared; r++) shared = seen_[cache_rows[r]]++;
    const int B = rows, NB = c_.batch, C = c_.d_model, H = c_.n_head, Hkv = c_.n_kv_head, D = c_.head_dim, F = c_.d_ff;
    const int rep = H / Hkv, half = D / 2, ld = ld_;
    const int nt = std::max(1, threads);
    const size_t tmp_size = size_t(B) * ld_;  // B: rows of this step
    if (tmp_.size() < nt * tmp_size) tmp_.assign(nt * tmp_size, 0.f);
    if (scores_.size() < size_t(nt) * tmax) scores_.assign(size_t(nt) * tmax, 0.f);
    const size_t slots = size_t(ops_) * (nt + 1);  // per op: chunks done, then each thread's next chunk
    if (counters_.size() < slots) counters_ = std::vector<Counter>(slots);
    for (size_t i = 0; i < slots; i++) counters_[i].v.store(0, std::memory_order_relaxed);
    float *x = x_.data(), *xn = xn_.data(), *att = att_.data(), *hb = h_.data(), *y = y_.data();
    QuantRows *qa = &qr_[0], *qb = &qr_[1];  // prepared inputs: of qkv, up and the head; of o and down
#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num();
        float* tmp = tmp_.data() + tid * tmp_size;
        float* sc = scores_.data() + size_t(tid) * tmax;
        int op = 0;  // every thread runs the same sequence of ops
        auto run = [&](int n, auto&& chunk) {  // chunk(c) for c < n, shared out; returns when all are done
            Counter* ctr = counters_.data() + size_t(op) * (nt + 1);
            std::atomic<int>& done = ctr[0].v;
            op++;
            for (int i = 0; i < nt; i++) {  // its own share first, then what is left of the others'
                const int t = (tid + i) % nt, c0 = int(int64_t(n) * t / nt), c1 = int(int64_t(n) * (t + 1) / nt);
                for (int c; (c = c0 + ctr[1 + t].v.fetch_add(1, std::memory_order_relaxed)) < c1;) {
                    chunk(c);
                    done.fetch_add(1, std::memory_order_acq_rel);
                }
            }
            wait_until(done, n);
        };
        auto normalize = [&](const Norm& nm, const Linear& next) {  // x -> xn, prepared for `next` (int8 / bf16) in qa
            run(1, [&](int) {
                for (int b = 0; b < B; b++) norm_row(x + size_t(b) * ld, nm, c_.eps, C, xn + size_t(b) * ld);
                prepare_input(next, xn, ld, B, C, *qa);
            });
        };
        // The input of o and down, prepared in qb: bf16 layers' inputs are rounded by the op that computes
        // them, a piece at a time (round_cols); int8 ones are quantized here, once all of it is there.
        auto quantize = [&](const Linear& next, const float* in, int k) {
            if (rounds_input(next) && next.bits != 16) run(1, [&](int) { prepare_input(next, in, ld, B, k, *qb); });
        };
        auto add_residual = [&](const Linear& lin, const float* in) {  // x += lin(in)
            run(chunks(C), [&](int c) {
                const int j0 = c * ROWS, j1 = std::min(C, j0 + ROWS);
                linear_rows(lin, in, ld, qb, B, j0, j1, y, ld, tmp);
                for (int b = 0; b < B; b++)
                    for (int j = j0; j < j1; j++)
                        x[size_t(b) * ld + j] += y[size_t(b) * ld + j] + (lin.bias ? lin.bias[j] : 0.f);
            });
        };
        run(1, [&](int) { embed_rows(B, tokens, positions); });
        for (size_t li = 0; li < layers_.size(); li++) {
            const Layer& L = layers_[li];
            normalize(L.n1, L.qkv);
            run(chunks(L.qkv.n), [&](int c) {  // q, k, v of every row
                const int j0 = c * ROWS, j1 = std::min(L.qkv.n, j0 + ROWS);
                linear_rows(L.qkv, xn, ld, qa, B, j0, j1, y, ld, tmp);
                if (L.qkv.bias)
                    for (int b = 0; b < B; b++)
                        for (int j = j0; j < j1; j++) y[size_t(b) * ld + j] += L.qkv.bias[j];
            });
            auto base = [&](int b, int g) { return ((li * NB + cache_rows[b]) * Hkv + g) * size_t(tmax) * D; };
            auto write = [&](int item) {  // RoPE of the key and the cache writes of one (row, key/value head)
                const int b = item / Hkv, g = item % Hkv;
                const int64_t pos = positions[b];
                float* yr = y + size_t(b) * ld;
                float* k = yr + size_t(H + g) * D;
                const float* v = yr + size_t(H + Hkv + g) * D;
                if (c_.rope) rope(k, cos + pos * half, sin + pos * half, D);
                store(k_cache, c_.kv_bf16, base(b, g) + pos * D, k, D);
                store(v_cache, c_.kv_bf16, base(b, g) + pos * D, v, D);
            };
            auto heads = [&](int item) {  // RoPE of the queries and attention of one (row, key/value head)
                const int b = item / Hkv, g = item % Hkv;
                const int64_t pos = positions[b];
                float* yr = y + size_t(b) * ld;
                const size_t off = (c_.kv_bf16 ? sizeof(uint16_t) : sizeof(float)) * base(b, g);  // bytes
                const char *kc = static_cast<const char*>(k_cache) + off, *vc = static_cast<const char*>(v_cache) + off;
                for (int h = g * rep; h < (g + 1) * rep; h++) {
                    float* q = yr + size_t(h) * D;
                    if (c_.rope) rope(q, cos + pos * half, sin + pos * half, D);
                    attend(q, kc, vc, c_.kv_bf16, int(pos + 1), D, sc, att + size_t(b) * ld + size_t(h) * D);
                }
                if (L.o.bits == 16) round_cols(att + size_t(b) * ld, b, g * rep * D, (g + 1) * rep * D, H * D, *qb);
            };
            if (shared) {
                run(B * Hkv, write);
                run(B * Hkv, heads);
            } else {
                run(B * Hkv, [&](int item) { write(item); heads(item); });
            }
            quantize(L.o, att, H * D);
            add_residual(L.o, att);
            normalize(L.n2, L.up);
            run(chunks(F), [&](int c) {  // act(up), or act(gate) * up
                const int j0 = c * ROWS, j1 = std::min(F, j0 + ROWS);
                linear_rows(L.up, xn, ld, qa, B, j0, j1, y, ld, tmp);
                if (c_.gated) linear_rows(L.up, xn, ld, qa, B, F + j0, F + j1, y, ld, tmp);
                for (int b = 0; b < B; b++)
                    for (int j = j0; j < j1; j++) {
                        const float* yr = y + size_t(b) * ld;
                        const float u = yr[j] + (L.up.bias ? L.up.bias[j] : 0.f);
                        hb[size_t(b) * ld + j] = c_.gated ? act(c_.act, u) * (yr[F + j] + (L.up.bias ? L.up.bias[F + j] : 0.f))
                                                          : act(c_.act, u);
                    }
                if (L.down.bits == 16)
                    for (int b = 0; b < B; b++) round_cols(hb + size_t(b) * ld, b, j0, j1, F, *qb);
            });
            quantize(L.down, hb, F);
            add_residual(L.down, hb);
        }
        const int O = out_index ? outs : B;  // the rows whose logits are wanted, gathered into xn's first rows
        run(1, [&](int) {
            for (int r = 0; r < O; r++)
                norm_row(x + size_t(out_index ? out_index[r] : r) * ld, norm_f_, c_.eps, C, xn + size_t(r) * ld);
            prepare_input(head_, xn, ld, O, C, *qa);
        });
        const int V = head_.n;
        run(chunks(V), [&](int c) {
            const int j0 = c * ROWS;
            linear_rows(head_, xn, ld, qa, O, j0, std::min(V, j0 + ROWS), logits, V, tmp);
        });
    }
}

}  // namespace mmdecode
