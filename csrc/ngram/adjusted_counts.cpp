// Adjusted counts: the top order split from the bos n-grams, then each lower order built from the
// unique suffixes of the order above, merged with the bos n-grams of that order.
#include "adjusted_counts.hh"

#include <stdexcept>

namespace ngram {

namespace {

int compare_words(const WordId* a, const WordId* b, int n) {
    for (int i = 0; i < n; ++i)
        if (a[i] != b[i]) return a[i] < b[i] ? -1 : 1;
    return 0;
}

}  // namespace

std::vector<Level> adjusted_counts(CountedGrams&& grams, size_t vocab_size, bool keep_raw) {
    const int N = grams.order;
    std::vector<Level> L(N + 1), bos(N + 1);
    for (int m = 0; m <= N; ++m) L[m].m = bos[m].m = m;

    // Split the counted top-order n-grams into real top-order ones and bos n-grams of lower order.
    for (size_t i = 0; i < grams.size(); ++i) {
        const WordId* w = &grams.words[i * N];
        int j = -1;
        for (int k = 1; k < N; ++k)
            if (w[k] == kBOS) { j = k; break; }
        Level& dst = (j < 0 || j == N - 1) ? L[N] : bos[j + 1];
        dst.push(w, grams.counts[i], grams.counts[i], keep_raw);
    }
    grams = CountedGrams{};

    // Lower orders: unique suffixes of the order above (adjusted counts) merged with bos n-grams.
    if (N == 1) {
        Level u;
        u.m = 1;
        const WordId specials[2] = {kUNK, kBOS};
        for (WordId s : specials) u.push(&s, 0, 0, keep_raw);
        for (size_t i = 0; i < L[1].size(); ++i) u.push(L[1].at(i), L[1].cnt[i], keep_raw ? L[1].raw[i] : 0, keep_raw);
        L[1] = std::move(u);
    }
    for (int m = N - 1; m >= 1; --m) {
        Level& up = L[m + 1];
        Level& cur = L[m];
        Level& b = bos[m];
        if (m == 1) {
            const WordId specials[2] = {kUNK, kBOS};
            for (WordId s : specials) b.push(&s, 0, 0, keep_raw);
        }
        up.suf.resize(up.size());
        size_t i = 0, k = 0;
        while (i < up.size() || k < b.size()) {
            int c = (i == up.size()) ? 1 : (k == b.size()) ? -1 : compare_words(up.at(i), b.at(k), m);
            if (c == 0) throw std::logic_error("bos n-gram is also a suffix (internal error)");
            if (c < 0) {
                size_t start = i;
                uint64_t raw = 0;
                for (; i < up.size() && compare_words(up.at(i), up.at(start), m) == 0; ++i) {
                    up.suf[i] = uint32_t(cur.size());
                    if (keep_raw) raw += up.raw[i];
                }
                cur.push(up.at(start), uint32_t(i - start), raw, keep_raw);
            } else {
                cur.push(b.at(k), b.cnt[k], keep_raw ? b.raw[k] : 0, keep_raw);
                ++k;
            }
        }
        b.release();
    }
    if (L[1].size() != vocab_size) throw std::logic_error("unigrams do not cover the vocabulary (internal error)");
    for (size_t i = 0; i < vocab_size; ++i)
        if (L[1].r[i] != i) throw std::logic_error("unigram order broken (internal error)");
    return L;
}

}  // namespace ngram
