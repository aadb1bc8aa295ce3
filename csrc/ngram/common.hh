// Shared types of the n-gram core: word ids, special words, the n-gram hash, error helpers, clock.
#pragma once
#include <sys/mman.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace ngram {

using WordId = uint32_t;
constexpr WordId kUNK = 0;  // <unk>: id 0, as in KenLM
constexpr WordId kBOS = 1;  // <s>
constexpr WordId kEOS = 2;  // </s>
constexpr std::string_view kUnkWord = "<unk>", kBosWord = "<s>", kEosWord = "</s>";
// The special words in the id space of token models (words that are decimal token ids): negative,
// so that they never collide with a token id.
constexpr int64_t kEosToken = -1, kUnkToken = -2, kBosToken = -3;
constexpr int kMaxOrder = 8;

constexpr int kMaxThreads = 256;  // bound on worker threads (--threads): the machine refuses thousands

// Bad input (malformed ARPA, bad corpus, bad argument): Python's mmfuse.errors.NGramError.
struct InputError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// An output or spill file cannot be written (unwritable place, full disk): mmfuse.errors.OutputError.
struct OutputFailure : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The machine refused a resource (a thread): mmfuse.errors.ResourceError.
struct ResourceFailure : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Seconds on a monotonic clock (stage timings).
inline double now_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Text of the last C library error (ENOSPC: "No space left on device").
inline std::string errno_text(int err) { return std::strerror(err); }

// KenLM's word delimiters (util::kSpaces, C-locale isspace): ' ', \t, \n, \v, \f, \r. Lines end at
// '\n' only, so a lone '\r' separates words, never lines.
inline bool is_space(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

// Refuses a second thread entering an object (a Builder) that is not safe to share, instead of
// letting the two corrupt each other's buffers.
class ExclusiveUse {
  public:
    ExclusiveUse(std::atomic<bool>& busy, const char* what) : busy_(busy) {
        if (busy_.exchange(true))
            throw InputError(std::string(what) + " is in use by another thread; use one per thread (or a lock)");
    }
    ~ExclusiveUse() { busy_.store(false); }
    ExclusiveUse(const ExclusiveUse&) = delete;
    ExclusiveUse& operator=(const ExclusiveUse&) = delete;

  private:
    std::atomic<bool>& busy_;
};

inline uint64_t mix64(uint64_t x) {  // splitmix64 finaliser
    x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27; x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

// Hash of an n-gram, built from its LAST word leftwards so a query can extend the match
// into the context one word at a time: key(w) = start(w), key(c w) = extend(key(w), c), ...
// Two independent multiplies per word (short dependency chain: this is on every query's path);
// reduce() uses the high bits of the product, which these mix well.
inline uint64_t hash_start(WordId w) {
    uint64_t x = (uint64_t(w) + 1) * 0x9E3779B97F4A7C15ULL;
    return x ^ (x >> 31);
}
inline uint64_t hash_extend(uint64_t h, WordId w) {
    uint64_t x = h * 0x7C9A5E7C2B14A8F5ULL ^ (uint64_t(w) + 1) * 0xF8594ED1A3B1D0B7ULL;
    return x ^ (x >> 29);
}

// Key of the forward n-gram words[0..n).
inline uint64_t ngram_key(const WordId* words, int n) {
    uint64_t h = hash_start(words[n - 1]);
    for (int i = n - 2; i >= 0; --i) h = hash_extend(h, words[i]);
    return h ? h : 1;  // 0 marks an empty slot
}

inline uint64_t hash_string(const char* s, size_t n) {  // FNV-1a then mixed
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; ++i) { h ^= uint8_t(s[i]); h *= 0x100000001b3ULL; }
    return mix64(h);
}

// Fast range reduction of a 64-bit hash into [0, n).
inline uint64_t reduce(uint64_t h, uint64_t n) { return uint64_t((unsigned __int128)h * n >> 64); }

// Allocator of large randomly-accessed arrays (hash tables): transparent huge pages cut the TLB
// misses that otherwise dominate lookups.
template <class T> struct HugeAlloc {
    using value_type = T;
    HugeAlloc() = default;
    template <class U> HugeAlloc(const HugeAlloc<U>&) {}
    static constexpr size_t kHuge = size_t(1) << 21;
    T* allocate(size_t n) {
        size_t bytes = n * sizeof(T);
        if (bytes < kHuge) return static_cast<T*>(::operator new(bytes));
        void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) throw std::bad_alloc();
        ::madvise(p, bytes, MADV_HUGEPAGE);
        return static_cast<T*>(p);
    }
    void deallocate(T* p, size_t n) {
        size_t bytes = n * sizeof(T);
        if (bytes < kHuge) ::operator delete(p);
        else ::munmap(p, bytes);
    }
    template <class U> bool operator==(const HugeAlloc<U>&) const { return true; }
    template <class U> bool operator!=(const HugeAlloc<U>&) const { return false; }
};
template <class T> using HugeVector = std::vector<T, HugeAlloc<T>>;

}  // namespace ngram
