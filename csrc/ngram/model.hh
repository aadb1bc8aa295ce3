// The query model: unigram arrays plus one open-addressing hash table per higher order (KenLM's
// "probing" layout), n-grams grouped by context for enumeration (sampling, top-k continuations),
// a binary format that memory-maps, and ARPA reading/writing.
#pragma once
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "common.hh"
#include "interpolate.hh"
#include "vocab.hh"

namespace ngram {

// The binary format: a file starts with these 8 bytes (the NUL is not written), then the version.
inline constexpr char kBinaryMagic[] = "MMFNGRM1";
constexpr uint32_t kBinaryVersion = 1;

// A read-only array that either owns its storage or points into a memory-mapped file.
template <class T> class Array {
  public:
    void own(HugeVector<T>&& v) { own_ = std::move(v); p_ = own_.data(); n_ = own_.size(); }
    void own(std::vector<T>&& v) { own(HugeVector<T>(v.begin(), v.end())); }
    void view(const T* p, size_t n) { own_.clear(); p_ = p; n_ = n; }
    const T* data() const { return p_; }
    size_t size() const { return n_; }
    const T& operator[](size_t i) const { return p_[i]; }

  private:
    HugeVector<T> own_;
    const T* p_ = nullptr;
    size_t n_ = 0;
};

struct Slot {  // one hash-table slot of an order >= 2
    uint64_t key;  // ngram_key(), 0 = empty
    float prob;    // log10 p
    float backoff; // log10 b
};

struct Range { uint32_t begin, end; };  // children of a context, in the next order's word list

// Query state: the context words (most recent first) and their backoffs.
struct State {  // only the first `length` entries of words and backoff are meaningful
    int length = 0;
    WordId words[kMaxOrder - 1];
    float backoff[kMaxOrder - 1];
    bool operator==(const State& o) const;
};

struct Score { float prob; int ngram_length; };

class Model {
  public:
    // From estimated or parsed n-grams (orders[n-1] holds the n-grams of order n, forward words).
    // close_contexts: add missing contexts of n-grams (pruned ARPA files); estimates have them all.
    static std::unique_ptr<Model> build(std::vector<OrderTable>&& orders, Vocab&& vocab,
                                        std::vector<std::string>* warnings = nullptr, bool close_contexts = false);
    static std::unique_ptr<Model> load_binary(const std::string& path);
    static std::unique_ptr<Model> read_arpa(const char* data, size_t len, std::vector<std::string>* warnings);
    ~Model();

    void save_binary(const std::string& path) const;
    void write_arpa(const std::string& path) const;

    int order() const { return order_; }
    size_t vocab_size() const { return vocab.size(); }
    uint64_t count(int n) const { return n == 1 ? vocab.size() : tables_[n].count; }

    WordId index(std::string_view w) const { int64_t i = vocab.find(w); return i < 0 ? kUNK : WordId(i); }

    State begin_state() const;
    State null_state() const { return State{}; }
    Score score(const State& in, WordId w, State& out) const;
    // Scores a whole sequence (after <s> when bos, then </s> when eos): probs and n-gram lengths
    // (lens may be null) of n + eos entries.
    void score_sequence(const WordId* ids, size_t n, bool bos, bool eos, float* probs, int32_t* lens) const;

    // Log10 probability of every word after `st` (dense, <s> gets -inf).
    void distribution(const State& st, float* out) const;
    // The k most likely next words after `st` (never <s>), best first.
    void top_k(const State& st, int k, std::vector<WordId>& ids, std::vector<float>& probs) const;
    WordId sample(const State& st, std::mt19937_64& rng) const;

    // State after the words ids[0..n) (bos: they follow <s>); only the last order-1 words matter.
    State state_after(const WordId* ids, size_t n, bool bos) const;
    // Greedy continuation of up to k words after `st`, each the most likely one, with its log10
    // probability (ids, probs); stops after </s> when stop_at_eos.
    void greedy(State st, int k, bool stop_at_eos, std::vector<WordId>& ids, std::vector<float>& probs) const;
    // Up to max_words words sampled after `st` (stops after </s>, included), the generator seeded by seed.
    std::vector<WordId> sample_words(State st, int max_words, uint64_t seed) const;

    // Lookup of an n-gram (forward words); false when absent.
    bool find(const WordId* words, int n, float& prob, float& backoff) const;

    Vocab vocab;
    std::vector<Discount> discounts;  // empty when unknown (ARPA input)

  private:
    Model() = default;
    struct Table {
        Array<Slot> slots;
        uint64_t count = 0;
        void prefetch(uint64_t key) const { __builtin_prefetch(&slots[reduce(key, slots.size())]); }
        const Slot* find(uint64_t key) const {
            size_t cap = slots.size();
            for (size_t s = reduce(key, cap);; s = (s + 1 == cap ? 0 : s + 1)) {
                const Slot& e = slots[s];
                if (e.key == key) return &e;
                if (!e.key) return nullptr;
            }
        }
    };
    const Range* children(const State& st, int ctx_len) const;
    void enumerate(const State& st, int j, const std::function<void(WordId, float)>& f) const;

    int order_ = 0;
    Array<float> uni_prob_, uni_backoff_;
    std::vector<Table> tables_;                 // [n] for n >= 2
    std::vector<Array<Range>> child_;           // [n] for n < order: per unigram id / slot of order n
    std::vector<Array<WordId>> words_;          // [n] for n >= 2: n-grams grouped by context
    mutable std::once_flag by_unigram_once_;
    mutable std::vector<WordId> by_unigram_;    // word ids by descending unigram probability
    void* map_ = nullptr;
    size_t map_len_ = 0;
};

// Writes estimated n-grams straight to ARPA (lmplz's line order), without building a model.
void write_arpa(const std::vector<OrderTable>& orders, const Vocab& vocab, const std::string& path);

}  // namespace ngram
