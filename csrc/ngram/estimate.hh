// Interpolated modified Kneser-Ney estimation exactly as KenLM's lmplz, one file per step:
// adjusted_counts (step 1), discounts (step 2), interpolate (step 3). This only wires them.
#pragma once
#include <string>
#include <vector>

#include "adjusted_counts.hh"
#include "common.hh"
#include "count.hh"
#include "discounts.hh"
#include "interpolate.hh"

namespace ngram {

struct EstimateOptions {
    bool interpolate_unigrams = true;  // lmplz default: <unk> is a zeroton getting interpolated mass
    std::vector<uint64_t> prune;       // per order: drop n-grams with count <= threshold
    DiscountFallback fallback;         // discounts for orders whose closed form fails
    bool verbose = false;              // stage timings on stderr
};

struct EstimateResult {
    std::vector<OrderTable> orders;            // orders[n-1] holds the n-grams
    std::vector<Discount> discounts;           // per order
    std::vector<std::vector<uint64_t>> count_of_counts;  // per order: n1..n4
    std::vector<std::string> warnings;
};

// Consumes the counted highest-order n-grams.
EstimateResult estimate(CountedGrams&& grams, size_t vocab_size, const EstimateOptions& opt);

// Checks per-order pruning thresholds the way lmplz does and pads them to `order` values.
std::vector<uint64_t> normalise_prune(std::vector<uint64_t> prune, int order);

}  // namespace ngram
