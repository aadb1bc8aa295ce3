// Kneser-Ney step 1, adjusted counts (lmplz's AdjustCounts): the count of a lower-order n-gram is
// the number of distinct words seen before it, not how often it occurs.
//
// Counting gives the highest-order n-grams of lines padded with order-1 <s>. An n-gram with <s>
// beyond its first word is cut back to start at its last <s> (a "bos" n-gram of lower order, which
// keeps its raw count: nothing can precede <s>). Lower orders hold every suffix of the order above
// with its adjusted count (number of distinct words preceding it), plus the bos n-grams.
#pragma once
#include <vector>

#include "common.hh"
#include "count.hh"

namespace ngram {

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
    void release() {  // frees the storage, keeps the order
        Level empty;
        empty.m = m;
        *this = std::move(empty);
    }
};

// Levels 1..N (index 0 unused) from the counted highest-order n-grams, which are consumed; `suf` is
// set for orders 2..N. Unigrams cover the whole vocabulary in id order (<unk> and <s> with count 0).
// keep_raw: also keep the raw occurrence counts (pruning thresholds apply to them).
std::vector<Level> adjusted_counts(CountedGrams&& grams, size_t vocab_size, bool keep_raw);

}  // namespace ngram
