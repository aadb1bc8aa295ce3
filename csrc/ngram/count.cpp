// Parallel n-gram counting with sorted runs, spilled to disk past the memory budget.
#include "count.hh"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <queue>
#include <system_error>
#include <thread>

namespace ngram {

namespace {

// One counted n-gram; w is reversed (w[0] = last word) so lexicographic order = suffix order.
template <int N> struct Rec {
    WordId w[N];
    uint32_t c;
};

template <int N> inline bool rec_less(const Rec<N>& a, const Rec<N>& b) {
    for (int i = 0; i < N; ++i)
        if (a.w[i] != b.w[i]) return a.w[i] < b.w[i];
    return false;
}
template <int N> inline bool rec_same(const Rec<N>& a, const Rec<N>& b) {
    return std::memcmp(a.w, b.w, sizeof(a.w)) == 0;
}

inline uint32_t add_count(uint32_t a, uint32_t b) {
    uint64_t s = uint64_t(a) + b;
    if (s > 0xffffffffULL) throw InputError("an n-gram occurs more than 2^32-1 times; split the corpus");
    return uint32_t(s);
}

// A sorted run being read: in memory, or from a spill file in buffered blocks.
template <int N> class Cursor {
  public:
    Cursor(const Rec<N>* b, const Rec<N>* e) : p_(b), end_(e) {}
    explicit Cursor(const std::string& path) : file_(std::fopen(path.c_str(), "rb")) {
        if (!file_) throw OutputFailure("cannot reopen spill file " + path + ": " + errno_text(errno));
        refill();
    }
    Cursor(Cursor&& o) noexcept : p_(o.p_), end_(o.end_), file_(o.file_), buf_(std::move(o.buf_)) { o.file_ = nullptr; }
    ~Cursor() { if (file_) std::fclose(file_); }
    bool valid() const { return p_ < end_; }
    const Rec<N>& operator*() const { return *p_; }
    void next() { if (++p_ == end_ && file_) refill(); }

  private:
    void refill() {
        buf_.resize(1 << 16);
        size_t got = std::fread(buf_.data(), sizeof(Rec<N>), buf_.size(), file_);
        p_ = buf_.data(); end_ = p_ + got;
    }
    const Rec<N>* p_ = nullptr;
    const Rec<N>* end_ = nullptr;
    FILE* file_ = nullptr;
    std::vector<Rec<N>> buf_;
};

// k-way merge of sorted runs, summing the counts of equal n-grams; emit(rec) gets each result.
template <int N, class Emit> void merge_runs(std::vector<Cursor<N>>& cur, Emit&& emit) {
    auto greater = [&](size_t a, size_t b) { return rec_less(*cur[b], *cur[a]); };
    std::priority_queue<size_t, std::vector<size_t>, decltype(greater)> heap(greater);
    for (size_t i = 0; i < cur.size(); ++i) if (cur[i].valid()) heap.push(i);
    bool have = false;
    Rec<N> acc{};
    while (!heap.empty()) {
        size_t i = heap.top(); heap.pop();
        const Rec<N>& r = *cur[i];
        if (have && rec_same(acc, r)) acc.c = add_count(acc.c, r.c);
        else { if (have) emit(acc); acc = r; have = true; }
        cur[i].next();
        if (cur[i].valid()) heap.push(i);
    }
    if (have) emit(acc);
}

template <int N> class CounterImpl final : public Counter {
  public:
    explicit CounterImpl(const CountOptions& opt) : Counter(opt) {
        int workers = std::max(1, opt.threads);
        // Each in-flight block becomes records of sizeof(Rec) bytes per token; keep them within a
        // quarter of the budget, the rest holds the sorted runs.
        uint64_t per_block = opt.memory_bytes / 4 / uint64_t(workers + 1) / sizeof(Rec<N>);
        block_tokens_ = size_t(std::max<uint64_t>(1 << 14, std::min<uint64_t>(per_block, 1 << 22)));
        try {
            for (int i = 0; i < workers; ++i) workers_.emplace_back([this] { work(); });
        } catch (const std::system_error& e) {  // the machine refused a thread: stop those started
            const size_t started = workers_.size();
            stop_workers();
            throw ResourceFailure("cannot start " + std::to_string(workers) + " counting threads (--threads): only " +
                                  std::to_string(started) + " could be created (" + e.what() + "); use fewer");
        }
    }
    ~CounterImpl() override {
        stop_workers();
        for (auto& p : files_) ::unlink(p.c_str());
    }

    CountedGrams finish() override {
        check_open();
        flush_block(true);
        finished_ = true;
        stop_workers();
        if (error_) std::rethrow_exception(error_);
        CountedGrams out;
        out.order = N;
        uint64_t total = 0;
        for (auto& r : runs_) total += r.size();
        out.words.reserve(files_.empty() ? total * N : 0);
        out.counts.reserve(files_.empty() ? total : 0);
        auto emit = [&](const Rec<N>& r) {
            out.words.insert(out.words.end(), r.w, r.w + N);
            out.counts.push_back(r.c);
        };
        if (files_.empty() && runs_.size() > 1 && opt_.threads > 1) {
            merge_parallel(out);
        } else {
            std::vector<Cursor<N>> cur;
            for (auto& r : runs_) cur.emplace_back(r.data(), r.data() + r.size());
            for (auto& p : files_) cur.emplace_back(p);
            merge_runs<N>(cur, emit);
        }
        runs_.clear(); runs_.shrink_to_fit();
        return out;
    }

  protected:
    void submit(std::vector<WordId>&& block) override {
        std::unique_lock<std::mutex> lk(mu_);
        cv_space_.wait(lk, [&] { return queue_.size() < workers_.size() || error_; });
        if (error_) std::rethrow_exception(error_);
        queue_.push_back(std::move(block));
        cv_work_.notify_one();
    }

  private:
    void stop_workers() {
        { std::lock_guard<std::mutex> lk(mu_); done_ = true; }
        cv_work_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
    }

    void work() {
        for (;;) {
            std::vector<WordId> block;
            {
                std::unique_lock<std::mutex> lk(mu_);
                cv_work_.wait(lk, [&] { return !queue_.empty() || done_; });
                if (queue_.empty()) return;
                block = std::move(queue_.front());
                queue_.pop_front();
            }
            cv_space_.notify_one();
            try {
                std::vector<Rec<N>> run = make_run(block);
                std::vector<std::vector<Rec<N>>> to_spill;
                {
                    std::lock_guard<std::mutex> lk(mu_);
                    run_bytes_ += run.size() * sizeof(Rec<N>);
                    runs_.push_back(std::move(run));
                    if (run_bytes_ > opt_.memory_bytes / 2) {
                        to_spill.swap(runs_);
                        run_bytes_ = 0;
                    }
                }
                if (!to_spill.empty()) spill(to_spill);
            } catch (...) {
                std::lock_guard<std::mutex> lk(mu_);
                if (!error_) error_ = std::current_exception();
                cv_space_.notify_all();
            }
        }
    }

    // Records of one block of sentences (each ended by </s>), sorted and deduplicated.
    static std::vector<Rec<N>> make_run(const std::vector<WordId>& block) {
        std::vector<Rec<N>> recs(block.size());
        size_t start = 0;  // first token of the current sentence
        for (size_t i = 0; i < block.size(); ++i) {
            Rec<N>& r = recs[i];
            for (int j = 0; j < N; ++j) r.w[j] = (i - start >= size_t(j)) ? block[i - j] : kBOS;
            r.c = 1;
            if (block[i] == kEOS) start = i + 1;
        }
        std::sort(recs.begin(), recs.end(), rec_less<N>);
        size_t o = 0;
        for (size_t i = 0; i < recs.size(); ++i) {
            if (o && rec_same(recs[o - 1], recs[i])) recs[o - 1].c = add_count(recs[o - 1].c, recs[i].c);
            else recs[o++] = recs[i];
        }
        recs.resize(o);
        recs.shrink_to_fit();
        return recs;
    }

    void spill(std::vector<std::vector<Rec<N>>>& runs) {
        std::string path = opt_.tmp_dir + "/mmfuse-ngram-XXXXXX";
        int fd = ::mkstemp(&path[0]);
        if (fd < 0)
            throw OutputFailure("cannot create a spill file in the temp directory " + opt_.tmp_dir + " (-T): " + errno_text(errno));
        FILE* f = ::fdopen(fd, "wb");
        if (!f) { ::close(fd); ::unlink(path.c_str()); throw OutputFailure("cannot write spill file " + path + ": " + errno_text(errno)); }
        { std::lock_guard<std::mutex> lk(mu_); files_.push_back(path); ++spilled_runs; }
        std::vector<Cursor<N>> cur;
        for (auto& r : runs) cur.emplace_back(r.data(), r.data() + r.size());
        int err = 0;
        merge_runs<N>(cur, [&](const Rec<N>& r) { if (!err && std::fwrite(&r, sizeof r, 1, f) != 1) err = errno; });
        if (std::fclose(f) != 0 && !err) err = errno;
        if (err)
            throw OutputFailure("cannot write spill file " + path + " in the temp directory (-T): " + errno_text(err));
        runs.clear();
    }

    // Two halves of the key space (split on the last word) merged by two threads.
    void merge_parallel(CountedGrams& out) {
        const auto& big = *std::max_element(runs_.begin(), runs_.end(),
                                            [](auto& a, auto& b) { return a.size() < b.size(); });
        WordId pivot = big[big.size() / 2].w[0];
        std::vector<size_t> split(runs_.size());
        for (size_t i = 0; i < runs_.size(); ++i)
            split[i] = std::lower_bound(runs_[i].begin(), runs_[i].end(), pivot,
                                        [](const Rec<N>& r, WordId p) { return r.w[0] < p; }) - runs_[i].begin();
        CountedGrams hi;
        auto half = [&](CountedGrams& dst, bool upper) {
            std::vector<Cursor<N>> cur;
            for (size_t i = 0; i < runs_.size(); ++i) {
                const Rec<N>* b = runs_[i].data();
                if (upper) cur.emplace_back(b + split[i], b + runs_[i].size());
                else cur.emplace_back(b, b + split[i]);
            }
            merge_runs<N>(cur, [&](const Rec<N>& r) {
                dst.words.insert(dst.words.end(), r.w, r.w + N);
                dst.counts.push_back(r.c);
            });
        };
        std::exception_ptr err;
        std::thread t([&] { try { half(hi, true); } catch (...) { err = std::current_exception(); } });
        half(out, false);
        t.join();
        if (err) std::rethrow_exception(err);
        out.words.insert(out.words.end(), hi.words.begin(), hi.words.end());
        out.counts.insert(out.counts.end(), hi.counts.begin(), hi.counts.end());
    }

    std::vector<std::thread> workers_;
    std::mutex mu_;
    std::condition_variable cv_work_, cv_space_;
    std::deque<std::vector<WordId>> queue_;
    std::vector<std::vector<Rec<N>>> runs_;
    uint64_t run_bytes_ = 0;
    std::vector<std::string> files_;
    bool done_ = false;
    std::exception_ptr error_;
};

}  // namespace

std::unique_ptr<Counter> Counter::make(const CountOptions& opt) {
    if (opt.order < 1 || opt.order > kMaxOrder)
        throw InputError("order must be between 1 and " + std::to_string(kMaxOrder) + ", got " + std::to_string(opt.order));
    if (opt.threads < 1 || opt.threads > kMaxThreads)
        throw InputError("threads (--threads) must be between 1 and " + std::to_string(kMaxThreads) + ", got " + std::to_string(opt.threads));
    std::unique_ptr<Counter> c;
    switch (opt.order) {
        case 1: c.reset(new CounterImpl<1>(opt)); break;
        case 2: c.reset(new CounterImpl<2>(opt)); break;
        case 3: c.reset(new CounterImpl<3>(opt)); break;
        case 4: c.reset(new CounterImpl<4>(opt)); break;
        case 5: c.reset(new CounterImpl<5>(opt)); break;
        case 6: c.reset(new CounterImpl<6>(opt)); break;
        case 7: c.reset(new CounterImpl<7>(opt)); break;
        default: c.reset(new CounterImpl<8>(opt)); break;
    }
    c->start_time_ = c->last_report_ = now_seconds();
    return c;
}

void Counter::end_sentence() {
    block_.push_back(kEOS);
    ++lines;
    if (block_.size() >= block_tokens_) flush_block(false);
}

void Counter::flush_block(bool force) {
    if (block_.empty() || (!force && block_.size() < block_tokens_)) return;
    std::vector<WordId> b;
    b.swap(block_);
    block_.reserve(block_tokens_ + 1024);
    submit(std::move(b));
    if (opt_.verbose) {
        double t = now_seconds();
        if (force || t - last_report_ > 2.0) {
            std::fprintf(stderr, "[mmfuse.ngram] counting: %.1f MB, %llu lines, %llu tokens, %.1f s\n",
                         bytes / 1e6, (unsigned long long)lines, (unsigned long long)tokens, t - start_time_);
            last_report_ = t;
        }
    }
}

void Counter::check_open() const {
    if (finished_) throw InputError("this builder has already finished; start a new one");
}

void Counter::add_text(const char* data, size_t len) {
    check_open();
    bytes += len;
    const char* p = data;
    const char* end = data + len;
    while (p < end) {
        const char* eol = static_cast<const char*>(std::memchr(p, '\n', end - p));
        if (!eol) eol = end;
        while (p < eol) {
            while (p < eol && is_space(*p)) ++p;
            const char* b = p;
            while (p < eol && !is_space(*p)) ++p;
            if (p == b) break;
            std::string_view w(b, p - b);
            if (w[0] == '<' && (w == kBosWord || w == kEosWord || w == kUnkWord)) {
                if (opt_.skip_symbols) continue;
                throw InputError("line " + std::to_string(lines + 1) + ": the special word " + std::string(w) +
                                 " is not allowed in the corpus (pass skip_symbols to treat it as whitespace)");
            }
            block_.push_back(vocab.add(w));
            ++tokens;
        }
        end_sentence();
        p = eol + 1;
    }
}

void Counter::add_file(const std::string& path, const Progress& progress) {
    check_open();
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) throw InputError("cannot open corpus file " + path);
    struct stat st;
    const uint64_t total = (::fstat(::fileno(f), &st) == 0 && S_ISREG(st.st_mode)) ? uint64_t(st.st_size) : 0;
    std::vector<char> buf(kProgressBytes);
    size_t carry = 0;
    uint64_t consumed = 0;  // bytes handed to add_text
    try {
        for (;;) {
            size_t got = std::fread(buf.data() + carry, 1, buf.size() - carry, f);
            size_t have = carry + got;
            if (got == 0) {  // the end: the last line may lack its '\n'
                if (have) add_text(buf.data(), have);
                consumed += have;
                if (progress && (have || !consumed)) progress(consumed, total);
                break;
            }
            const char* last_nl = nullptr;
            for (size_t i = have; i-- > 0;) if (buf[i] == '\n') { last_nl = buf.data() + i; break; }
            if (!last_nl) {  // a line longer than the buffer: grow
                carry = have;
                buf.resize(buf.size() * 2);
                continue;
            }
            size_t used = last_nl + 1 - buf.data();
            add_text(buf.data(), used);
            consumed += used;
            if (progress) progress(consumed, total);
            carry = have - used;
            std::memmove(buf.data(), buf.data() + used, carry);
        }
    } catch (...) {
        std::fclose(f);
        throw;
    }
    std::fclose(f);
}

WordId Counter::token_word(int64_t t) {
    // Dense cache for ids up to a bound that grows with the vocabulary (ids of real tokenizers);
    // a hash map beyond, so one huge id costs one entry, not an array up to it.
    const size_t dense_limit = std::max<size_t>(size_t(1) << 16, 4 * vocab.size());
    if (size_t(t) < dense_limit) {
        if (size_t(t) >= token_cache_.size())
            token_cache_.resize(std::min(dense_limit, std::max<size_t>(size_t(t) + 1, token_cache_.size() * 2)), 0);
        if (!token_cache_[t]) token_cache_[t] = int64_t(vocab.add(std::to_string(t))) + 1;
        return WordId(token_cache_[t] - 1);
    }
    auto it = token_sparse_.find(t);
    if (it != token_sparse_.end()) return it->second;
    WordId w = vocab.add(std::to_string(t));
    token_sparse_.emplace(t, w);
    return w;
}

void Counter::add_token_ids(const int64_t* ids, size_t n) {
    check_open();
    for (size_t i = 0; i < n; ++i) {
        int64_t t = ids[i];
        if (t < 0) throw InputError("token ids must be non-negative, got " + std::to_string(t));
        block_.push_back(token_word(t));
    }
    tokens += n;
    bytes += n * sizeof(int32_t);
    end_sentence();
}

}  // namespace ngram
