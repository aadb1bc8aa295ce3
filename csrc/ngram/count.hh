// Counting n-grams of the highest order from a corpus, lmplz style: each line is padded with
// order-1 <s> in front and </s> at the end. Worker threads sort and merge blocks of n-grams into
// runs; past the memory budget, runs are spilled to disk and merged back at the end.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.hh"
#include "vocab.hh"

namespace ngram {

struct CountOptions {
    int order = 3;
    uint64_t memory_bytes = uint64_t(1) << 30;  // budget for the counting stage
    std::string tmp_dir = "/tmp";               // where sorted runs are spilled
    int threads = 2;                            // sorting workers
    bool skip_symbols = false;                  // treat <s>, </s>, <unk> in the text as whitespace
    bool verbose = false;                       // periodic counting lines on stderr
};

// Told how far a corpus file has been read: bytes consumed so far of `total` bytes (0: size unknown).
// Called every kProgressBytes and at the end; it may throw to stop the counting (Ctrl-C).
using Progress = std::function<void(uint64_t consumed, uint64_t total)>;
constexpr size_t kProgressBytes = size_t(2) << 20;

// Sorted unique n-grams of the highest order, words stored REVERSED (last word first), so that
// plain lexicographic order is KenLM's suffix order.
struct CountedGrams {
    int order = 0;
    std::vector<WordId> words;    // (n, order) reversed words
    std::vector<uint32_t> counts; // (n,)
    size_t size() const { return counts.size(); }
};

class Counter {
  public:
    virtual ~Counter() = default;
    static std::unique_ptr<Counter> make(const CountOptions& opt);

    // Whitespace-tokenised text of whole lines (errors name the line number counted so far).
    void add_text(const char* data, size_t len);
    // Reads a whole text file in blocks of kProgressBytes, telling `progress` (when set) after each.
    void add_file(const std::string& path, const Progress& progress = {});
    // One sentence of integer token ids (vocabulary words are their decimal strings).
    void add_token_ids(const int64_t* ids, size_t n);

    // Merges all runs; the counter can not be used afterwards.
    virtual CountedGrams finish() = 0;

    int order() const { return opt_.order; }

    Vocab vocab;
    uint64_t tokens = 0, lines = 0, spilled_runs = 0, bytes = 0;
    std::atomic<bool> busy{false};  // held by the caller (ExclusiveUse) around each feed and finish

  protected:
    explicit Counter(const CountOptions& opt) : opt_(opt) {}
    virtual void submit(std::vector<WordId>&& block) = 0;  // sentences, each ended by </s>
    void flush_block(bool force);
    void end_sentence();
    void check_open() const;
    bool finished_ = false;

    CountOptions opt_;
    std::vector<WordId> block_;
    WordId token_word(int64_t token);
    std::vector<int64_t> token_cache_;  // token id -> vocab id + 1 (0: not seen yet), small ids
    std::unordered_map<int64_t, WordId> token_sparse_;  // token id -> vocab id, ids past the dense cache
    size_t block_tokens_ = 1 << 20;
    double start_time_ = 0, last_report_ = 0;
};

}  // namespace ngram
