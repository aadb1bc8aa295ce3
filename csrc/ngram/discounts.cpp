// Modified Kneser-Ney discounts with lmplz's float arithmetic.
#include "discounts.hh"

#include <algorithm>

namespace ngram {

namespace {

// Closed-form discounts (Chen & Goodman eq. 26) with lmplz's float arithmetic; false when undefined.
bool closed_form(const uint64_t* n, Discount& d) {
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

DiscountFallback make_fallback(const std::vector<float>& values) {
    if (values.empty() || values.size() > 3) throw InputError("discount_fallback (--discount-fallback) takes 1 to 3 discounts");
    static const char* names[3] = {"D1", "D2", "D3+"};
    DiscountFallback f;
    f.enabled = true;
    for (size_t j = 0; j < 3; ++j) {
        f.amount[j] = values[std::min(j, values.size() - 1)];
        if (!(f.amount[j] >= 0.0f && f.amount[j] <= float(j + 1)))  // NaN fails both
            throw InputError(std::string("discount_fallback (--discount-fallback): ") + names[j] + " must be a number in [0, " +
                             std::to_string(j + 1) + "], got " + std::to_string(f.amount[j]));
    }
    return f;
}

void compute_discounts(const std::vector<Level>& levels, const DiscountFallback& fallback,
                       std::vector<Discount>& discounts, std::vector<std::vector<uint64_t>>& count_of_counts,
                       std::vector<std::string>& warnings) {
    const int N = int(levels.size()) - 1;
    discounts.assign(N, Discount{});
    count_of_counts.assign(N, std::vector<uint64_t>(4, 0));
    for (int m = 1; m <= N; ++m) {
        uint64_t n[5] = {0, 0, 0, 0, 0};
        for (uint32_t c : levels[m].cnt)
            if (c < 5) ++n[c];
        std::copy(n + 1, n + 5, count_of_counts[m - 1].begin());
        if (!closed_form(n, discounts[m - 1])) {
            std::string msg = "could not calculate Kneser-Ney discounts for " + std::to_string(m) +
                              "-grams from the count-of-counts n1..n4 = " + std::to_string(n[1]) + " " +
                              std::to_string(n[2]) + " " + std::to_string(n[3]) + " " + std::to_string(n[4]);
            if (!fallback.enabled)
                throw InputError(msg + "; is this small or artificial data? (discount_fallback substitutes fixed discounts)");
            Discount& d = discounts[m - 1];
            d.amount[0] = 0.0f;
            for (int j = 0; j < 3; ++j) d.amount[j + 1] = fallback.amount[j];
            warnings.push_back(msg + "; using the fallback discounts");
        }
    }
}

}  // namespace ngram
