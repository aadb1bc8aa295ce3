// Interpolated modified Kneser-Ney probabilities and backoffs with lmplz's float arithmetic.
#include "interpolate.hh"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace ngram {

std::vector<OrderTable> interpolate(std::vector<Level>&& levels, const std::vector<Discount>& discounts,
                                    size_t vocab_size, bool interpolate_unigrams, const std::vector<uint64_t>& prune) {
    std::vector<Level> L = std::move(levels);
    const int N = int(L.size()) - 1;
    const bool pruning = std::any_of(prune.begin(), prune.end(), [](uint64_t t) { return t > 0; });
    std::vector<OrderTable> orders(N);
    auto pruned = [&](const Level& lv, size_t i) { return pruning && lv.m >= 2 && lv.raw[i] <= prune[lv.m - 1]; };

    // Probabilities in ascending order: p(g) = u(g) + gamma(context) * p(suffix).
    std::vector<HugeVector<float>> prob(N + 1), gamma(N + 1);
    HugeVector<uint32_t> ctx_prev, ctx_cur, begin_prev;

    // Emits order m (all its probabilities and the gammas of its n-grams as contexts are known).
    auto emit = [&](int m) {
        Level& lv = L[m];
        OrderTable& out = orders[m - 1];
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
        const Discount& d = discounts[m - 1];
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
        const Discount& d = discounts[0];
        HugeVector<float>& p = prob[1];
        p.resize(vocab_size);
        const float fden = static_cast<float>(den[0]);
        for (size_t i = 0; i < vocab_size; ++i) {
            float u, gi = interpolate_unigrams ? g0 : 0.0f;
            if (i == kUNK) u = interpolate_unigrams ? 0.0f : g0;
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
        const Discount& d = discounts[m - 1];
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
    return orders;
}

}  // namespace ngram
