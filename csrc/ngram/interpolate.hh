// Kneser-Ney step 3, interpolation (lmplz's InitialProbabilities + Interpolate): each n-gram's
// discounted probability plus its context's backoff weight (gamma) times the probability of its
// suffix, p(g) = u(g) + gamma(context) * p(suffix), from unigrams up; the gammas are the backoffs.
#pragma once
#include <vector>

#include "adjusted_counts.hh"
#include "discounts.hh"

namespace ngram {

// The n-grams of one order: forward words, log10 probability, log10 backoff.
struct OrderTable {
    int n = 0;
    std::vector<WordId> words;  // (size, n)
    std::vector<float> prob, backoff;
    size_t size() const { return prob.size(); }
};

// Probabilities and backoffs of orders 1..N (result[n-1]) from the adjusted counts, which are
// consumed. interpolate_unigrams: <unk> is a zeroton getting interpolated mass (lmplz's default),
// else it takes the whole unigram backoff mass. prune: per-order thresholds on raw counts (all
// zero: no pruning; else `levels` must keep raw counts); a pruned n-gram's mass goes to its gamma.
std::vector<OrderTable> interpolate(std::vector<Level>&& levels, const std::vector<Discount>& discounts,
                                    size_t vocab_size, bool interpolate_unigrams, const std::vector<uint64_t>& prune);

}  // namespace ngram
