// Modified Kneser-Ney estimation, following lmplz's arithmetic (float where lmplz uses float):
// adjusted counts -> discounts -> interpolated probabilities and backoffs.
#include "estimate.hh"

#include <algorithm>
#include <cstdio>

namespace ngram {

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
    const std::vector<uint64_t> prune = normalise_prune(opt.prune, grams.order);
    const bool pruning = std::any_of(prune.begin(), prune.end(), [](uint64_t t) { return t > 0; });
    const double t0 = now_seconds();
    auto report = [&](const char* what) {
        if (opt.verbose) std::fprintf(stderr, "[mmfuse.ngram] %s (%.1f s)\n", what, now_seconds() - t0);
    };
    if (grams.size() == 0) throw InputError("the corpus is empty");

    std::vector<Level> levels = adjusted_counts(std::move(grams), vocab_size, pruning);
    report("adjusted counts");
    EstimateResult res;
    compute_discounts(levels, opt.fallback, res.discounts, res.count_of_counts, res.warnings);
    res.orders = interpolate(std::move(levels), res.discounts, vocab_size, opt.interpolate_unigrams, prune);
    report("probabilities");
    return res;
}

}  // namespace ngram
