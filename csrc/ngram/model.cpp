// Model construction, queries, enumeration of continuations and the binary format.
#include "model.hh"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <unordered_map>

namespace ngram {

bool State::operator==(const State& o) const {
    if (length != o.length) return false;
    for (int i = 0; i < length; ++i)
        if (words[i] != o.words[i] || backoff[i] != o.backoff[i]) return false;
    return true;
}

Model::~Model() {
    if (map_) ::munmap(map_, map_len_);
}

std::unique_ptr<Model> Model::build(std::vector<OrderTable>&& orders, Vocab&& vocab, std::vector<std::string>* warnings,
                                   bool close_contexts) {
    const int N = int(orders.size());
    if (N < 1 || N > kMaxOrder) throw InputError("model order must be between 1 and " + std::to_string(kMaxOrder));
    std::unique_ptr<Model> m(new Model());
    m->order_ = N;
    m->vocab = std::move(vocab);
    const size_t V = m->vocab.size();
    const float nan = std::numeric_limits<float>::quiet_NaN();

    std::vector<float> up(V, nan), ub(V, 0.0f);
    for (size_t i = 0; i < orders[0].size(); ++i) {
        WordId w = orders[0].words[i];
        up[w] = orders[0].prob[i];
        ub[w] = orders[0].backoff[i];
    }
    for (WordId w = 0; w < V; ++w) {
        if (!std::isnan(up[w])) continue;
        if (w > kEOS) throw InputError("word '" + std::string(m->vocab.word(w)) + "' has no unigram");
        if (warnings) warnings->push_back("the model has no unigram " + std::string(m->vocab.word(w)) + "; giving it log10 probability -100");
        up[w] = -100.0f;
    }
    orders[0] = OrderTable{1};
    m->uni_prob_.own(std::move(up));
    m->uni_backoff_.own(std::move(ub));

    // Pruned ARPA files (SRILM) may lack the context of an n-gram: add it, scored by backing off.
    for (int n = N; close_contexts && n >= 3; --n) {
        OrderTable& lo = orders[n - 2];
        std::vector<uint64_t> have(lo.size());
        for (size_t i = 0; i < lo.size(); ++i) have[i] = ngram_key(&lo.words[i * (n - 1)], n - 1);
        std::sort(have.begin(), have.end());
        const OrderTable& hi = orders[n - 1];
        std::vector<std::pair<uint64_t, size_t>> missing;
        for (size_t i = 0; i < hi.size(); ++i) {
            uint64_t k = ngram_key(&hi.words[i * n], n - 1);
            if (!std::binary_search(have.begin(), have.end(), k)) missing.emplace_back(k, i);
        }
        std::sort(missing.begin(), missing.end());
        size_t added = 0;
        for (size_t j = 0; j < missing.size(); ++j) {
            if (j && missing[j].first == missing[j - 1].first) continue;
            const WordId* w = &hi.words[missing[j].second * n];
            lo.words.insert(lo.words.end(), w, w + n - 1);
            lo.prob.push_back(nan);
            lo.backoff.push_back(0.0f);
            ++added;
        }
        if (added && warnings)
            warnings->push_back("added " + std::to_string(added) + " missing " + std::to_string(n - 1) + "-gram contexts");
    }

    m->tables_.resize(N + 1);
    m->child_.resize(N + 1);
    m->words_.resize(N + 1);
    std::vector<uint32_t> pos_of_slot;  // position in words_[n-1] of the n-gram in each slot of order n-1
    for (int n = 2; n <= N; ++n) {
        OrderTable& t = orders[n - 1];
        const size_t cnt = t.size();
        HugeVector<Slot> slots(cnt + cnt / 2 + 1, Slot{0, 0.0f, 0.0f});
        const size_t cap = slots.size();
        constexpr size_t kAhead = 16;  // slots are prefetched this many n-grams ahead
        std::vector<uint64_t> keys(cnt);
        std::vector<uint32_t> slot_of(cnt);
        for (size_t i = 0; i < cnt; ++i) keys[i] = ngram_key(&t.words[i * n], n);
        for (size_t i = 0; i < cnt; ++i) {
            if (i + kAhead < cnt) __builtin_prefetch(&slots[reduce(keys[i + kAhead], cap)]);
            uint64_t key = keys[i];
            size_t s = reduce(key, cap);
            while (slots[s].key && slots[s].key != key) s = (s + 1 == cap ? 0 : s + 1);
            if (slots[s].key) {
                std::string g;
                for (int j = 0; j < n; ++j) g += (j ? " " : "") + std::string(m->vocab.word(t.words[i * n + j]));
                throw InputError("duplicate " + std::to_string(n) + "-gram '" + g + "'");
            }
            slots[s] = Slot{key, t.prob[i], t.backoff[i]};
            slot_of[i] = uint32_t(s);
        }
        // Missing contexts get the probability the lower orders give them.
        for (size_t i = 0; i < cnt; ++i) {
            if (!std::isnan(t.prob[i])) continue;
            const WordId* w = &t.words[i * n];
            float p = 0.0f, prob, bo;
            int len = n - 1;
            for (; len >= 2; --len)
                if (m->find(w + n - len, len, prob, bo)) break;
            p = len >= 2 ? prob : m->uni_prob_[w[n - 1]];
            for (int k = len; k <= n - 1; ++k)  // contexts of lengths len..n-1 ending at w[n-2]
                if (m->find(w + n - 1 - k, k, prob, bo)) p += bo;
            uint64_t key = ngram_key(w, n);
            size_t s = reduce(key, cap);
            while (slots[s].key != key) s = (s + 1 == cap ? 0 : s + 1);
            slots[s].prob = p;
        }
        m->tables_[n].count = cnt;
        m->tables_[n].slots.own(std::move(slots));

        // Group the n-grams by context, groups in the order of their contexts in the order below
        // (word ids for bigrams), so the layout (and ARPA line order) does not depend on insertion
        // order. Child ranges are indexed by unigram id (n == 2) or by slot of order n-1.
        const size_t nparent = n == 2 ? V : size_t(m->tables_[n - 1].count);
        std::vector<uint32_t> parent(cnt), start(nparent + 1, 0);
        if (n > 2)
            for (size_t i = 0; i < cnt; ++i) keys[i] = ngram_key(&t.words[i * n], n - 1);
        const Table& below = m->tables_[n - 1];
        for (size_t i = 0; i < cnt; ++i) {
            if (n == 2) {
                parent[i] = t.words[i * n];
            } else {
                if (i + kAhead < cnt) below.prefetch(keys[i + kAhead]);
                parent[i] = pos_of_slot[below.find(keys[i]) - below.slots.data()];
            }
            ++start[parent[i] + 1];
        }
        std::vector<uint64_t>().swap(keys);
        for (size_t p = 0; p < nparent; ++p) start[p + 1] += start[p];
        HugeVector<Range> ranges(n == 2 ? V : below.slots.size(), Range{0, 0});
        if (n == 2) {
            for (size_t w = 0; w < V; ++w) ranges[w] = Range{start[w], start[w + 1]};
        } else {
            for (size_t sl = 0; sl < below.slots.size(); ++sl)
                if (below.slots[sl].key) ranges[sl] = Range{start[pos_of_slot[sl]], start[pos_of_slot[sl] + 1]};
        }
        HugeVector<WordId> grouped(cnt * n);
        std::vector<uint32_t> next_pos(m->tables_[n].slots.size(), 0);
        for (size_t i = 0; i < cnt; ++i) {
            uint32_t pos = start[parent[i]]++;
            std::memcpy(&grouped[size_t(pos) * n], &t.words[i * n], n * sizeof(WordId));
            next_pos[slot_of[i]] = pos;
        }
        pos_of_slot.swap(next_pos);
        m->child_[n - 1].own(std::move(ranges));
        m->words_[n].own(std::move(grouped));
        t = OrderTable{n};
    }
    return m;
}

bool Model::find(const WordId* words, int n, float& prob, float& backoff) const {
    if (n == 1) { prob = uni_prob_[words[0]]; backoff = uni_backoff_[words[0]]; return true; }
    if (n > order_) return false;
    const Slot* s = tables_[n].find(ngram_key(words, n));
    if (!s) return false;
    prob = s->prob; backoff = s->backoff;
    return true;
}

State Model::begin_state() const {
    State s;
    if (order_ > 1) { s.length = 1; s.words[0] = kBOS; s.backoff[0] = uni_backoff_[kBOS]; }
    return s;
}

Score Model::score(const State& in_state, WordId w, State& out) const {
    if (w >= vocab.size()) throw InputError("word id " + std::to_string(w) + " is out of the vocabulary (size " + std::to_string(vocab.size()) + ")");
    State copy;
    const State& in = (&in_state == &out) ? (copy = in_state) : in_state;
    // Fields are written one by one into `out` (a local copied out afterwards would stall on
    // store-to-load forwarding: this is the hottest path of every query).
    float p = uni_prob_[w];
    int len = 1;
    out.length = 0;
    if (order_ > 1) { out.length = 1; out.words[0] = w; out.backoff[0] = uni_backoff_[w]; }
    uint64_t h = hash_start(w);
    for (int j = 0; j < in.length && j + 2 <= order_; ++j) {
        h = hash_extend(h, in.words[j]);
        const Slot* s = tables_[j + 2].find(h ? h : 1);
        if (!s) break;
        p = s->prob;
        len = j + 2;
        if (len < order_) { out.words[len - 1] = in.words[j]; out.backoff[len - 1] = s->backoff; out.length = len; }
    }
    for (int k = len - 1; k < in.length; ++k) p += in.backoff[k];
    return Score{p, len};
}

void Model::score_sequence(const WordId* ids, size_t n, bool bos, bool eos, float* probs, int32_t* lens) const {
    State states[2] = {bos ? begin_state() : null_state(), State{}};  // ping-pong, no copies
    for (size_t p = 0; p < n + eos; ++p) {
        Score sc = score(states[p & 1], p < n ? ids[p] : kEOS, states[(p + 1) & 1]);
        probs[p] = sc.prob;
        if (lens) lens[p] = sc.ngram_length;
    }
}

const Range* Model::children(const State& st, int j) const {
    if (j + 1 > order_) return nullptr;
    if (j == 1) return &child_[1][st.words[0]];
    uint64_t h = hash_start(st.words[0]);
    for (int k = 1; k < j; ++k) h = hash_extend(h, st.words[k]);
    const Slot* s = tables_[j].find(h ? h : 1);
    return s ? &child_[j][s - tables_[j].slots.data()] : nullptr;
}

void Model::enumerate(const State& st, int j, const std::function<void(WordId, float)>& f) const {
    const Range* r = children(st, j);
    if (!r) return;
    const int n = j + 1;
    const WordId* words = words_[n].data();
    for (uint32_t i = r->begin; i < r->end; ++i) {
        WordId x = words[size_t(i) * n + n - 1];
        uint64_t h = hash_start(x);
        for (int k = 0; k < j; ++k) h = hash_extend(h, st.words[k]);
        const Slot* s = tables_[n].find(h ? h : 1);
        if (s) f(x, s->prob);
    }
}

void Model::distribution(const State& st, float* out) const {
    const size_t V = vocab.size();
    const int L = std::min(st.length, order_ - 1);
    float base = 0.0f;
    for (int k = 0; k < L; ++k) base += st.backoff[k];
    for (size_t w = 0; w < V; ++w) out[w] = uni_prob_[w] + base;
    for (int j = 1; j <= L; ++j) {
        float rest = 0.0f;
        for (int k = j; k < L; ++k) rest += st.backoff[k];
        enumerate(st, j, [&](WordId x, float p) { out[x] = p + rest; });
    }
    out[kBOS] = -std::numeric_limits<float>::infinity();
}

void Model::top_k(const State& st, int k, std::vector<WordId>& ids, std::vector<float>& probs) const {
    ids.clear(); probs.clear();
    if (k <= 0) return;
    const int L = std::min(st.length, order_ - 1);
    std::unordered_map<WordId, float> cand;
    for (int j = L; j >= 1; --j) {
        float rest = 0.0f;
        for (int q = j; q < L; ++q) rest += st.backoff[q];
        enumerate(st, j, [&](WordId x, float p) { cand.emplace(x, p + rest); });
    }
    std::call_once(by_unigram_once_, [&] {
        by_unigram_.resize(vocab.size());
        for (size_t w = 0; w < by_unigram_.size(); ++w) by_unigram_[w] = WordId(w);
        std::stable_sort(by_unigram_.begin(), by_unigram_.end(),
                         [&](WordId a, WordId b) { return uni_prob_[a] > uni_prob_[b]; });
    });
    float base = 0.0f;
    for (int q = 0; q < L; ++q) base += st.backoff[q];
    int extra = 0;
    for (WordId w : by_unigram_) {
        if (extra >= k) break;
        if (w == kBOS || cand.count(w)) continue;
        cand.emplace(w, uni_prob_[w] + base);
        ++extra;
    }
    cand.erase(kBOS);
    std::vector<std::pair<float, WordId>> all;
    all.reserve(cand.size());
    for (auto& [w, p] : cand) all.emplace_back(p, w);
    size_t take = std::min<size_t>(size_t(k), all.size());
    std::partial_sort(all.begin(), all.begin() + take, all.end(), [](auto& a, auto& b) {
        return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    for (size_t i = 0; i < take; ++i) { ids.push_back(all[i].second); probs.push_back(all[i].first); }
}

WordId Model::sample(const State& st, std::mt19937_64& rng) const {
    std::vector<float> d(vocab.size());
    distribution(st, d.data());
    std::vector<double> cum(d.size());
    double total = 0;
    for (size_t w = 0; w < d.size(); ++w) { total += std::pow(10.0, double(d[w])); cum[w] = total; }
    double u = std::uniform_real_distribution<double>(0.0, total)(rng);
    size_t w = std::upper_bound(cum.begin(), cum.end(), u) - cum.begin();
    return WordId(std::min(w, d.size() - 1));
}

State Model::state_after(const WordId* ids, size_t n, bool bos) const {
    const size_t keep = size_t(order_ - 1);
    State st = (bos && n < keep + 1) ? begin_state() : null_state();
    size_t from = (bos && n < keep + 1) ? 0 : (n > keep ? n - keep : 0);
    State next;
    for (size_t i = from; i < n; ++i) { score(st, ids[i], next); st = next; }
    return st;
}

void Model::greedy(State st, int k, bool stop_at_eos, std::vector<WordId>& ids, std::vector<float>& probs) const {
    ids.clear(); probs.clear();
    std::vector<WordId> best;
    std::vector<float> bp;
    State next;
    for (int i = 0; i < k; ++i) {
        top_k(st, 1, best, bp);
        if (best.empty()) break;
        ids.push_back(best[0]);
        probs.push_back(bp[0]);
        if (stop_at_eos && best[0] == kEOS) break;
        score(st, best[0], next);
        st = next;
    }
}

std::vector<WordId> Model::sample_words(State st, int max_words, uint64_t seed) const {
    std::mt19937_64 rng(seed);
    std::vector<WordId> out;
    State next;
    for (int i = 0; i < max_words; ++i) {
        WordId w = sample(st, rng);
        out.push_back(w);
        if (w == kEOS) break;
        score(st, w, next);
        st = next;
    }
    return out;
}

// ---- binary format ----

namespace {
static_assert(sizeof(kBinaryMagic) == 9, "the magic is 8 bytes");

struct Header {
    char magic[8];
    uint32_t version, order;
    uint64_t vocab_size, blob_size;
    uint64_t count[kMaxOrder + 1];     // n-grams per order
    uint64_t capacity[kMaxOrder + 1];  // hash-table slots per order (n >= 2)
    float discounts[kMaxOrder][4];
    uint32_t has_discounts, reserved;
};

size_t padded(size_t n) { return (n + 7) & ~size_t(7); }

class Writer {
  public:
    explicit Writer(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "wb")) {
        if (!f_) throw OutputFailure("cannot open " + path + " for writing: " + errno_text(errno));
    }
    ~Writer() { if (f_) std::fclose(f_); }
    void put(const void* p, size_t n) {
        static const char zeros[8] = {};
        if (n && std::fwrite(p, 1, n, f_) != n) fail();
        size_t pad = padded(n) - n;
        if (pad && std::fwrite(zeros, 1, pad, f_) != pad) fail();
    }
    void close() {
        FILE* f = f_;
        f_ = nullptr;
        if (std::fclose(f) != 0) fail();
    }

  private:
    [[noreturn]] void fail() { throw OutputFailure("cannot write " + path_ + ": " + errno_text(errno)); }
    std::string path_;
    FILE* f_;
};
}  // namespace

void Model::save_binary(const std::string& path) const {
    Header h{};
    std::memcpy(h.magic, kBinaryMagic, 8);
    h.version = kBinaryVersion;
    h.order = uint32_t(order_);
    h.vocab_size = vocab.size();
    h.blob_size = vocab.blob().size();
    for (int n = 1; n <= order_; ++n) h.count[n] = count(n);
    for (int n = 2; n <= order_; ++n) h.capacity[n] = tables_[n].slots.size();
    h.has_discounts = discounts.size() == size_t(order_);
    for (size_t n = 0; h.has_discounts && n < discounts.size(); ++n)
        std::memcpy(h.discounts[n], discounts[n].amount, sizeof(float) * 4);
    Writer w(path);
    w.put(&h, sizeof h);
    w.put(vocab.offsets().data(), vocab.offsets().size() * sizeof(uint64_t));
    w.put(vocab.blob().data(), vocab.blob().size());
    w.put(uni_prob_.data(), uni_prob_.size() * sizeof(float));
    w.put(uni_backoff_.data(), uni_backoff_.size() * sizeof(float));
    for (int n = 2; n <= order_; ++n) w.put(tables_[n].slots.data(), tables_[n].slots.size() * sizeof(Slot));
    for (int n = 1; n < order_; ++n) w.put(child_[n].data(), child_[n].size() * sizeof(Range));
    for (int n = 2; n <= order_; ++n) w.put(words_[n].data(), words_[n].size() * sizeof(WordId));
    w.close();
}

std::unique_ptr<Model> Model::load_binary(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw InputError("cannot open binary model " + path);
    struct stat st;
    if (::fstat(fd, &st) != 0 || st.st_size < off_t(sizeof(Header))) {
        ::close(fd);
        throw InputError(path + " is not an mmfuse binary n-gram model (too short)");
    }
    size_t len = size_t(st.st_size);
    void* map = ::mmap(nullptr, len, PROT_READ, MAP_SHARED, fd, 0);
    ::close(fd);
    if (map == MAP_FAILED) throw InputError("cannot memory-map " + path);
    std::unique_ptr<Model> m(new Model());
    m->map_ = map;
    m->map_len_ = len;
    const char* base = static_cast<const char*>(map);
    Header h;
    std::memcpy(&h, base, sizeof h);
    auto bad = [&](const std::string& why) { return InputError(path + ": corrupt binary n-gram model: " + why); };
    if (std::memcmp(h.magic, kBinaryMagic, 8) != 0) throw bad("bad magic (not an mmfuse binary model)");
    if (h.version != kBinaryVersion) throw bad("unsupported version " + std::to_string(h.version));
    if (h.order < 1 || h.order > uint32_t(kMaxOrder)) throw bad("order " + std::to_string(h.order));
    if (h.vocab_size < 3 || h.vocab_size > len) throw bad("vocabulary size " + std::to_string(h.vocab_size));
    size_t off = padded(sizeof h);
    auto bytes_of = [&](uint64_t count, uint64_t size) {  // count * size, refusing what cannot fit the file
        if (size && count > len / size) throw bad("truncated file (section larger than the file)");
        return size_t(count * size);
    };
    auto take = [&](size_t bytes) {
        if (bytes > len || off > len - bytes) throw bad("truncated file");
        const char* p = base + off;
        off += padded(bytes);
        return p;
    };
    const int N = int(h.order);
    const size_t V = h.vocab_size;
    const uint64_t* offsets = reinterpret_cast<const uint64_t*>(take(bytes_of(V + 1, sizeof(uint64_t))));
    const char* blob = take(h.blob_size);
    for (size_t i = 0; i < V; ++i)
        if (offsets[i] > offsets[i + 1] || offsets[i + 1] > h.blob_size) throw bad("vocabulary offsets");
    m->vocab.assign(blob, offsets, V);
    m->order_ = N;
    m->uni_prob_.view(reinterpret_cast<const float*>(take(bytes_of(V, sizeof(float)))), V);
    m->uni_backoff_.view(reinterpret_cast<const float*>(take(bytes_of(V, sizeof(float)))), V);
    m->tables_.resize(N + 1);
    m->child_.resize(N + 1);
    m->words_.resize(N + 1);
    for (int n = 2; n <= N; ++n) {
        if (h.capacity[n] <= h.count[n]) throw bad("hash table of order " + std::to_string(n));
        m->tables_[n].slots.view(reinterpret_cast<const Slot*>(take(bytes_of(h.capacity[n], sizeof(Slot)))), h.capacity[n]);
        m->tables_[n].count = h.count[n];
    }
    for (int n = 1; n < N; ++n) {
        size_t k = n == 1 ? V : h.capacity[n];
        const Range* r = reinterpret_cast<const Range*>(take(bytes_of(k, sizeof(Range))));
        for (size_t i = 0; i < k; ++i)
            if (r[i].begin > r[i].end || r[i].end > h.count[n + 1]) throw bad("child ranges of order " + std::to_string(n));
        m->child_[n].view(r, k);
    }
    for (int n = 2; n <= N; ++n) {
        size_t k = bytes_of(h.count[n], n);
        const WordId* w = reinterpret_cast<const WordId*>(take(bytes_of(k, sizeof(WordId))));
        for (size_t i = 0; i < k; ++i)
            if (w[i] >= V) throw bad("word id out of range in order " + std::to_string(n));
        m->words_[n].view(w, k);
        // A table without empty slots would make a missing key probe forever.
        size_t used = 0;
        const Array<Slot>& sl = m->tables_[n].slots;
        for (size_t i = 0; i < sl.size(); ++i) used += sl[i].key != 0;
        if (used != h.count[n]) throw bad("hash table of order " + std::to_string(n) + " holds " + std::to_string(used) + " keys");
    }
    if (h.has_discounts) {
        m->discounts.resize(N);
        for (int n = 0; n < N; ++n) std::memcpy(m->discounts[n].amount, h.discounts[n], sizeof(float) * 4);
    }
    return m;
}

}  // namespace ngram
