// How fast two threads stream a layer's fp32 weights through 4-row dot products, by how the rows are
// shared out and by page size: the question behind the fused decode step's owned shares
// (csrc/decode/step.cpp) and the huge-page weight arena (engine/nn/weight_arena.py).
//
//     g++ -O3 -fopenmp -march=native bench/stream_chunks.cpp -o /tmp/stream_chunks && /tmp/stream_chunks
//
// ~600 MB of (N, K) matrices (SmolLM2-135M's MLP up-projection shape by default: N 1536, K 576),
// read one after another as a decode step reads its layers; chunks of 16 rows, taken either
// alternately from one atomic counter ("dealt") or as each thread's contiguous half ("owned"), in
// memory from aligned_alloc (4 KiB pages) or advised to use transparent huge pages. Best of 7, GB/s.
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

static void dot4(const float* w, size_t ld, const float* x, int k, float* o) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int i = 0; i < k; i += 16) {
        const __m512 xv = _mm512_loadu_ps(x + i);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), xv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + ld + i), xv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 2 * ld + i), xv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 3 * ld + i), xv, a3);
    }
    o[0] = _mm512_reduce_add_ps(a0), o[1] = _mm512_reduce_add_ps(a1);
    o[2] = _mm512_reduce_add_ps(a2), o[3] = _mm512_reduce_add_ps(a3);
}

static double run(int N, int K, bool owned, bool huge) {
    const int ROWS = 16, layers = std::max(1, int(600e6 / (4.0 * N * K)));
    const size_t bytes = size_t(N) * K * 4 * layers, page = 2 << 20;
    char* arena = static_cast<char*>(aligned_alloc(page, (bytes + page - 1) / page * page));
    if (huge) madvise(arena, bytes, MADV_HUGEPAGE);
    for (size_t i = 0; i < bytes / 4; i++) reinterpret_cast<float*>(arena)[i] = 1e-3f * float(i % 7);
    std::vector<float> x(K, 1.f), y(N);
    double best = 1e9;
    for (int rep = 0; rep < 7; rep++) {
        const double t0 = now();
        for (int l = 0; l < layers; l++) {
            const float* w = reinterpret_cast<const float*>(arena) + size_t(l) * N * K;
            const int chunks = (N + ROWS - 1) / ROWS;
            std::atomic<int> next{0};
            auto chunk = [&](int c) {
                for (int j = c * ROWS; j < std::min(N, (c + 1) * ROWS); j += 4) dot4(w + size_t(j) * K, K, x.data(), K, &y[j]);
            };
#pragma omp parallel num_threads(2)
            {
                if (!owned) {
                    for (int c; (c = next.fetch_add(1)) < chunks;) chunk(c);
                } else {
                    const int t = omp_get_thread_num();
                    for (int c = chunks * t / 2; c < chunks * (t + 1) / 2; c++) chunk(c);
                }
            }
        }
        best = std::min(best, now() - t0);
    }
    free(arena);
    return bytes / best / 1e9;
}

int main(int argc, char** argv) {
    const int N = argc > 1 ? atoi(argv[1]) : 1536, K = argc > 2 ? atoi(argv[2]) : 576;
    printf("(%d, %d) fp32 layers, 2 threads, chunks of 16 rows, GB/s (best of 7)\n", N, K);
    printf("| chunks | 4 KiB pages | huge pages |\n|---|---|---|\n");
    for (bool owned : {false, true})
        printf("| %s | %.1f | %.1f |\n", owned ? "owned halves" : "dealt alternately", run(N, K, owned, false),
               run(N, K, owned, true));
}
