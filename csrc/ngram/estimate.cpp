// Modified Kneser-Ney estimation, following lmplz's arithmetic (float where lmplz uses float).
//
// Counting gives the highest-order n-grams of lines padded with order-1 <s>. An n-gram with <s>
// beyond its first word is cut back to start at its last <s> (a "bos" n-gram of lower order, which
// keeps its raw count: nothing can precede <s>). Lower orders hold every suffix of the order above
// with its adjusted count (number of distinct words preceding it), plus the bos n-grams.
#include "estimate.hh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>

namespace ngram {

double now_seconds();

namespace {

// The n-grams of one order during estimation: reversed words in suffix order.
struct Level {
    int m = 0;
    HugeVector<WordId> r;      // (size, m), r[0] is the last word
    HugeVector<uint32_t> cnt;  // adjusted count (raw for the top order and bos n-grams)
    HugeVector<uint64_t> raw;  // raw occurrence count, only kept when pruning
    HugeVector<uint32_t> suf;  // index of the suffix (drop first word) in the order below
    size_t size() const { return cnt.size(); }
    const WordId* at(size_t i) const { return r.data() + i * m; }
    void push(const WordId* w, uint32_t c, uint64_t raw_count, bool keep_raw) {
        r.insert(r.end(), w, w + m);
        cnt.push_back(c);
        if (keep_raw) raw.push_back(raw_count);
    }
    void release() { *this = Level{m}; }
};

int compare_words(const WordId* a, const WordId* b, int n) {
    for (int i = 0; i < n; ++i)
        if (a[i] != b[i]) return a[i] < b[i] ? -1 : 1;
    return 0;
}

// Closed-form discounts (Chen & Goodman eq. 26) with lmplz's float arithmetic; false when undefined.
bool compute_discount(const uint64_t* n, Discount& d) {
    for (int j = 1; j < 4; ++j)
        if (n[j] == 0) return false;
    d.amount[0] = 0.0f;
    float y = static_cast<float>(n[1]) / static_cast<float>(n[1] + 2.0 * n[2]);
    for (int j = 1; j < 4; ++j) {
        d.amount[j] = static_cast<float>(j) -
                      static_cast<float>(j + 1) * y * static_cast<float>(n[j + 1]) / static_cast<float>(n[j]);
        if (d.amount[j] < 0.0f || d.amount[j] > j) return false;
    }
    return true;
}

}  // namespace

void check_fallback(const float fallback[3]) {
    static const char* names[3] = {"D1", "D2", "D3+"};
    for (int j = 0; j < 3; ++j)
        if (!(fallback[j] >= 0.0f && fallback[j] <= float(j + 1)))  // NaN fails both
            throw InputError(std::string("discount_fallback (--discount-fallback): ") + names[j] + " must be a number in [0, " +
                             std::to_string(j + 1) + "], got " + std::to_string(fallback[j]));
}

std::vector<uint64_t> normalise_prune(std::vector<uint64_t> prune, int order) {
    if (prune.empty()) prune.push_back(0);
    if (prune.size() > size_t(order))
        throw InputError("got " + std::to_string(prune.size()) + " pruning thresholds for order " + std::to_string(order));
    if (prune[0] != 0) throw InputError("unigram pruning is not supported: the first pruning threshold must be 0");
    for (size_t i = 1; i < prune.size(); ++i)
        if (prune[i] < prune[i - 1]) throw InputError("pruning thresholds must be non-decreasing");
    while (prune.size() < size_t(order)) prune.push_back(prune.back());
    return prune;
}

EstimateResult estimate(CountedGrams&& grams, size_t vocab_size, const EstimateOptions& opt) {
    const int N = grams.order;
    const std::vector<uint64_t> prune = normalise_prune(opt.prune, N);
    const bool pruning = std::any_of(prune.begin(), prune.end(), [](uint64_t t) { return t > 0; });
    const double t0 = now_seconds();
    auto report = [&](const char* what) {
        if (opt.progress) std::fprintf(stderr, "[mmfuse.ngram] %s (%.1f s)\n", what, now_seconds() - t0);
    };
    if (grams.size() == 0) throw InputError("the corpus is empty");

    std::vector<Level> L(N + 1), bos(N + 1);
    for (int m = 0; m <= N; ++m) L[m].m = bos[m].m = m;

    // Split the counted top-order n-grams into real top-order ones and bos n-grams of lower order.
    for (size_t i = 0; i < grams.size(); ++i) {
        const WordId* w = &grams.words[i * N];
        int j = -1;
        for (int k = 1; k < N - 1 + 1 && k < N; ++k)
            if (w[k] == kBOS) { j = k; break; }
        Level& dst = (j < 0 || j == N - 1) ? L[N] : bos[j + 1];
        dst.push(w, grams.counts[i], grams.counts[i], pruning);
    }
    grams = CountedGrams{};

    // Lower orders: unique suffixes of the order above (adjusted counts) merged with bos n-grams.
    if (N == 1) {
        Level u{1};
        const WordId specials[2] = {kUNK, kBOS};
        for (WordId s : specials) u.push(&s, 0, 0, pruning);
        for (size_t i = 0; i < L[1].size(); ++i) u.push(L[1].at(i), L[1].cnt[i], pruning ? L[1].raw[i] : 0, pruning);
        L[1] = std::move(u);
    }
    for (int m = N - 1; m >= 1; --m) {
        Level& up = L[m + 1];
        Level& cur = L[m];
        Level& b = bos[m];
        if (m == 1) {
            const WordId specials[2] = {kUNK, kBOS};
            for (WordId s : specials) b.push(&s, 0, 0, pruning);
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
                    if (pruning) raw += up.raw[i];
                }
                cur.push(up.at(start), uint32_t(i - start), raw, pruning);
            } else {
                cur.push(b.at(k), b.cnt[k], pruning ? b.raw[k] : 0, pruning);
                ++k;
            }
        }
        b.release();
    }
    if (L[1].size() != vocab_size) throw std::logic_error("unigrams do not cover the vocabulary (internal error)");
    for (size_t i = 0; i < vocab_size; ++i)
        if (L[1].r[i] != i) throw std::logic_error("unigram order broken (internal error)");
    report("adjusted counts");

    EstimateResult res;
    res.discounts.resize(N);
    res.count_of_counts.assign(N, std::vector<uint64_t>(4, 0));
    for (int m = 1; m <= N; ++m) {
        uint64_t n[5] = {0, 0, 0, 0, 0};
        for (uint32_t c : L[m].cnt)
            if (c < 5) ++n[c];
        std::copy(n + 1, n + 5, res.count_of_counts[m - 1].begin());
        if (!compute_discount(n, res.discounts[m - 1])) {
            std::string msg = "could not calculate Kneser-Ney discounts for " + std::to_string(m) +
                              "-grams from the count-of-counts n1..n4 = " + std::to_string(n[1]) + " " +
                              std::to_string(n[2]) + " " + std::to_string(n[3]) + " " + std::to_string(n[4]);
            if (!opt.discount_fallback)
                throw InputError(msg + "; is this small or artificial data? (discount_fallback substitutes fixed discounts)");
            Discount& d = res.discounts[m - 1];
            d.amount[0] = 0.0f;
            for (int j = 0; j < 3; ++j) d.amount[j + 1] = opt.fallback[j];
            res.warnings.push_back(msg + "; using the fallback discounts");
        }
    }

    auto pruned = [&](const Level& lv, size_t i) { return pruning && lv.m >= 2 && lv.raw[i] <= prune[lv.m - 1]; };

    // Probabilities in ascending order: p(g) = u(g) + gamma(context) * p(suffix).
    std::vector<HugeVector<float>> prob(N + 1), gamma(N + 1);
    HugeVector<uint32_t> ctx_prev, ctx_cur, begin_prev;
    res.orders.resize(N);

    // Emits order m (all its probabilities and the gammas of its n-grams as contexts are known).
    auto emit = [&](int m) {
        Level& lv = L[m];
        OrderTable& out = res.orders[m - 1];
        out.n = m;
        const bool top = (m == N);
        for (size_t i = 0; i < lv.size(); ++i) {
            if (pruned(lv, i)) continue;
            const WordId* w = lv.at(i);
            for (int j = m - 1; j >= 0; --j) out.words.push_back(w[j]);
            out.prob.push_back(std::min(0.0f, log10f(prob[m][i])));
            float bo = 0.0f;
            if (!top && w[0] != kUNK && w[0] != kEOS && gamma[m][i] >= 0.0f) bo = log10f(gamma[m][i]);
            out.backoff.push_back(bo);
        }
        lv.release();
        HugeVector<float>().swap(prob[m]);
        HugeVector<float>().swap(gamma[m]);
    };

    // Gammas of the contexts of order m-1 from the n-grams of order m: sum of discounts over distinct
    // continuations (plus the mass of pruned ones) divided by the sum of adjusted counts.
    auto context_gammas = [&](int m, const HugeVector<uint32_t>& ctx, size_t n_ctx) {
        const Level& lv = L[m];
        const Discount& d = res.discounts[m - 1];
        HugeVector<uint64_t> den(n_ctx, 0), norm(pruning ? n_ctx : 0, 0);
        HugeVector<uint32_t> nk(n_ctx * 4, 0);
        for (size_t i = 0; i < lv.size(); ++i) {
            uint32_t c = ctx.empty() ? 0 : ctx[i];
            uint64_t a = lv.cnt[i];
            den[c] += a;
            if (pruned(lv, i)) norm[c] += a;
            else if (a > 0) ++nk[c * 4 + std::min<uint64_t>(a, 3)];
        }
        HugeVector<float>& g = gamma[m - 1];
        g.assign(n_ctx, -1.0f);  // -1: not a context
        for (size_t c = 0; c < n_ctx; ++c) {
            if (!den[c]) continue;
            float v = 0.0f;
            for (int j = 1; j <= 3; ++j) v += d.get(j) * static_cast<float>(nk[c * 4 + j]);
            if (pruning) v += static_cast<float>(norm[c]);
            v /= static_cast<float>(den[c]);
            g[c] = v;
        }
        return den;
    };

    {  // unigrams: the empty context
        HugeVector<uint64_t> den = context_gammas(1, {}, 1);
        const float g0 = gamma[0][0];
        const float uniform = static_cast<float>(1.0 / static_cast<float>(vocab_size - 1));  // excludes <s>
        const Discount& d = res.discounts[0];
        HugeVector<float>& p = prob[1];
        p.resize(vocab_size);
        const float fden = static_cast<float>(den[0]);
        for (size_t i = 0; i < vocab_size; ++i) {
            float u, gi = opt.interpolate_unigrams ? g0 : 0.0f;
            if (i == kUNK) u = opt.interpolate_unigrams ? 0.0f : g0;
            else if (i == kBOS) { u = 1.0f; gi = 0.0f; }
            else u = d.apply(L[1].cnt[i]) / fden;
            p[i] = u + gi * uniform;
        }
    }
    for (int m = 2; m <= N; ++m) {
        Level& lv = L[m];
        Level& lo = L[m - 1];
        // Index of each n-gram's context (its first m-1 words) in the order below.
        ctx_cur.resize(lv.size());
        if (m == 2) {
            for (size_t i = 0; i < lv.size(); ++i) ctx_cur[i] = lv.at(i)[1];
        } else {
            for (size_t i = 0; i < lv.size(); ++i) {
                uint32_t s = ctx_prev[lv.suf[i]];
                WordId w0 = lv.at(i)[m - 1];
                uint32_t a = begin_prev[s], b = begin_prev[s + 1];
                while (a < b) {  // entries sharing suffix s are sorted by their first word
                    uint32_t mid = (a + b) / 2;
                    if (lo.at(mid)[m - 2] < w0) a = mid + 1; else b = mid;
                }
                if (a >= begin_prev[s + 1] || lo.at(a)[m - 2] != w0)
                    throw std::logic_error("context missing from the order below (internal error)");
                ctx_cur[i] = a;
            }
        }
        HugeVector<uint64_t> den = context_gammas(m, ctx_cur, lo.size());
        const Discount& d = res.discounts[m - 1];
        HugeVector<float>& p = prob[m];
        p.resize(lv.size());
        for (size_t i = 0; i < lv.size(); ++i) {
            uint32_t c = ctx_cur[i];
            float u = d.apply(lv.cnt[i]) / static_cast<float>(den[c]);
            p[i] = u + gamma[m - 1][c] * prob[m - 1][lv.suf[i]];
        }
        // Ranges of n-grams of this order sharing a suffix, for the context lookups of order m+1.
        begin_prev.assign(lo.size() + 1, 0);
        for (size_t i = 0; i < lv.size(); ++i) begin_prev[lv.suf[i] + 1] = uint32_t(i + 1);
        for (size_t s = 1; s <= lo.size(); ++s) begin_prev[s] = std::max(begin_prev[s], begin_prev[s - 1]);
        ctx_prev.swap(ctx_cur);
        emit(m - 1);
    }
    gamma[N].clear();
    emit(N);
    report("probabilities");
    return res;
}

}  // namespace ngram
