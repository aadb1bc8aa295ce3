// Interpolated modified Kneser-Ney estimation exactly as KenLM's lmplz: adjusted counts,
// three discounts per order from the count-of-counts, <s>/<unk> handling, optional pruning.
#pragma once
#include <string>
#include <vector>

#include "common.hh"
#include "count.hh"

namespace ngram {

// Discounts D1, D2, D3+ of one order (amount[0] is 0 for unseen n-grams).
struct Discount {
    float amount[4] = {0, 0, 0, 0};
    float get(uint64_t count) const { return amount[count < 3 ? count : 3]; }
    float apply(uint64_t count) const { return float(count) - get(count); }
};

struct EstimateOptions {
    bool interpolate_unigrams = true;        // lmplz default: <unk> is a zeroton getting interpolated mass
    std::vector<uint64_t> prune;             // per order: drop n-grams with count <= threshold
    bool discount_fallback = false;          // use `fallback` when the closed form fails
    float fallback[3] = {0.5f, 1.0f, 1.5f};  // lmplz's defaults for --discount_fallback
    bool progress = false;
};

// The n-grams of one order: forward words, log10 probability, log10 backoff.
struct OrderTable {
    int n = 0;
    std::vector<WordId> words;  // (size, n)
    std::vector<float> prob, backoff;
    size_t size() const { return prob.size(); }
};

struct EstimateResult {
    std::vector<OrderTable> orders;            // orders[n-1] holds the n-grams
    std::vector<Discount> discounts;           // per order
    std::vector<std::vector<uint64_t>> count_of_counts;  // per order: n1..n4
    std::vector<std::string> warnings;
};

// Consumes the counted highest-order n-grams.
EstimateResult estimate(CountedGrams&& grams, size_t vocab_size, const EstimateOptions& opt);

// Refuses fallback discounts that are not numbers in [0, j] for D_j (D3+ in [0, 3]): outside, some
// probabilities would be negative or above 1.
void check_fallback(const float fallback[3]);

// Checks per-order pruning thresholds the way lmplz does and pads them to `order` values.
std::vector<uint64_t> normalise_prune(std::vector<uint64_t> prune, int order);

}  // namespace ngram
