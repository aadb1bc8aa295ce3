// Kneser-Ney step 2, discounts (lmplz's Discount): three per order, D1, D2, D3+, in closed form from
// the count-of-counts of the adjusted counts (Chen & Goodman eq. 26), or fixed fallback values.
#pragma once
#include <string>
#include <vector>

#include "adjusted_counts.hh"

namespace ngram {

// Discounts D1, D2, D3+ of one order (amount[0] is 0 for unseen n-grams).
struct Discount {
    float amount[4] = {0, 0, 0, 0};
    float get(uint64_t count) const { return amount[count < 3 ? count : 3]; }
    float apply(uint64_t count) const { return float(count) - get(count); }
};

// Discounts used for orders whose closed form fails (lmplz's --discount_fallback).
struct DiscountFallback {
    bool enabled = false;                  // false: such an order is an InputError
    float amount[3] = {0.5f, 1.0f, 1.5f};  // D1, D2, D3+ (lmplz's defaults)
};

// A fallback from 1 to 3 values (the last one stands for the D's after it), each checked to lie in
// [0, j] for D_j (D3+ in [0, 3]): outside, some probabilities would be negative or above 1.
DiscountFallback make_fallback(const std::vector<float>& values);

// Discounts of orders 1..N (discounts[n-1]) and their count-of-counts n1..n4; an order whose closed
// form fails takes the fallback and adds a warning, or raises InputError without one.
void compute_discounts(const std::vector<Level>& levels, const DiscountFallback& fallback,
                       std::vector<Discount>& discounts, std::vector<std::vector<uint64_t>>& count_of_counts,
                       std::vector<std::string>& warnings);

}  // namespace ngram
