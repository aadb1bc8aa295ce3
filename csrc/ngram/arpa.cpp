// ARPA reading (KenLM's, SRILM's, any conforming file) and writing in lmplz's layout.
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>

#include "model.hh"

namespace ngram {

namespace {

class LineReader {
  public:
    LineReader(const char* data, size_t len) : p_(data), end_(data + len) {}
    bool next(std::string_view& line) {
        if (p_ >= end_) return false;
        const char* eol = static_cast<const char*>(std::memchr(p_, '\n', end_ - p_));
        if (!eol) eol = end_;
        size_t n = eol - p_;
        if (n && p_[n - 1] == '\r') --n;
        line = std::string_view(p_, n);
        p_ = eol + 1;
        ++line_no_;
        return true;
    }
    size_t line_no() const { return line_no_; }

  private:
    const char* p_;
    const char* end_;
    size_t line_no_ = 0;
};

bool blank(std::string_view s) {
    for (char c : s)
        if (c != ' ' && c != '\t') return false;
    return true;
}

std::string_view trim(std::string_view s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
    return s;
}

bool parse_uint(std::string_view s, uint64_t& v) {
    auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    return r.ec == std::errc() && r.ptr == s.data() + s.size() && !s.empty();
}

bool parse_float(std::string_view s, float& v) {
    if (!s.empty() && s[0] == '+') s.remove_prefix(1);
    auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    return r.ec == std::errc() && r.ptr == s.data() + s.size() && !s.empty() && !std::isnan(v);
}

[[noreturn]] void fail(size_t line, const std::string& why) {
    throw InputError("ARPA line " + std::to_string(line) + ": " + why);
}

// Formats like lmplz (KenLM's util::ToString: double-conversion's ToShortestSingle with decimal
// notation for exponents in [-6, 21), else "<digits>e<exp>"): the shortest digits that read back
// as the same float, so -7.328936e-05 is written -0.00007328936 and 1e-07 is written 1e-7.
void append_float(std::string& out, float v) {
    if (v == 0.0f) { out += '0'; return; }  // no "-0"
    if (std::isinf(v)) { out += v < 0 ? "-inf" : "inf"; return; }
    char buf[48];
    auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);  // shortest, "-d.ddde-XX"
    std::string_view sci(buf, size_t(r.ptr - buf));
    const bool negative = sci[0] == '-';
    if (negative) sci.remove_prefix(1);
    const size_t e_at = sci.find('e');
    std::string digits(sci.substr(0, e_at));
    if (digits.size() > 1) digits.erase(1, 1);  // drop the '.'
    int exponent = 0;
    std::from_chars(sci.data() + e_at + 1 + (sci[e_at + 1] == '+'), sci.data() + sci.size(), exponent);
    if (negative) out += '-';
    if (exponent >= -6 && exponent < 21) {
        if (exponent < 0) {
            out += "0.";
            out.append(size_t(-exponent - 1), '0');
            out += digits;
        } else if (size_t(exponent) + 1 >= digits.size()) {
            out += digits;
            out.append(size_t(exponent) + 1 - digits.size(), '0');
        } else {
            out.append(digits, 0, size_t(exponent) + 1);
            out += '.';
            out.append(digits, size_t(exponent) + 1, std::string::npos);
        }
    } else {
        out += digits[0];
        if (digits.size() > 1) { out += '.'; out.append(digits, 1, std::string::npos); }
        out += 'e';
        out += std::to_string(exponent);
    }
}

}  // namespace

std::unique_ptr<Model> Model::read_arpa(const char* data, size_t len, std::vector<std::string>* warnings) {
    LineReader in(data, len);
    std::string_view line;
    auto next_nonblank = [&]() {
        while (in.next(line))
            if (!blank(line)) return true;
        return false;
    };
    if (!next_nonblank()) throw InputError("ARPA file is empty");
    if (trim(line) != "\\data\\") fail(in.line_no(), "expected \\data\\, found '" + std::string(line.substr(0, 60)) + "'");
    std::vector<uint64_t> counts;
    while (in.next(line) && !blank(line)) {
        std::string_view t = trim(line);
        size_t eq = t.find('=');
        uint64_t n = 0, c = 0;
        if (t.substr(0, 6) != "ngram " || eq == std::string_view::npos || !parse_uint(trim(t.substr(6, eq - 6)), n) ||
            !parse_uint(trim(t.substr(eq + 1)), c))
            fail(in.line_no(), "expected 'ngram N=count', found '" + std::string(line.substr(0, 60)) + "'");
        if (n != counts.size() + 1) fail(in.line_no(), "ngram orders must be listed as 1, 2, 3, ...");
        if (c > len / 4)  // every n-gram line takes at least 4 bytes ("0\ta\n")
            fail(in.line_no(), "'ngram " + std::to_string(n) + "=" + std::to_string(c) + "' counts more n-grams than a file of " +
                                   std::to_string(len) + " bytes can hold");
        counts.push_back(c);
    }
    if (counts.empty()) fail(in.line_no(), "the \\data\\ section lists no n-gram counts");
    const int N = int(counts.size());
    if (N > kMaxOrder) fail(in.line_no(), "order " + std::to_string(N) + " is above the supported " + std::to_string(kMaxOrder));

    Vocab vocab;
    std::vector<OrderTable> orders(N);
    std::vector<uint8_t> seen;
    std::vector<std::string_view> fields;
    for (int n = 1; n <= N; ++n) {
        const std::string header = "\\" + std::to_string(n) + "-grams:";
        if (n == 1 && !next_nonblank()) fail(in.line_no(), "missing section " + header);
        if (trim(line) != header) fail(in.line_no(), "expected " + header + ", found '" + std::string(line.substr(0, 60)) + "'");
        OrderTable& t = orders[n - 1];
        t.n = n;
        t.words.reserve(counts[n - 1] * n);
        t.prob.reserve(counts[n - 1]);
        t.backoff.reserve(counts[n - 1]);
        for (uint64_t i = 0; i < counts[n - 1]; ++i) {
            if (!in.next(line) || blank(line) || line[0] == '\\')
                fail(in.line_no(), "the header says " + std::to_string(counts[n - 1]) + " " + std::to_string(n) +
                                       "-grams but the section has " + std::to_string(i));
            fields.clear();
            for (size_t p = 0; p < line.size();) {
                while (p < line.size() && (line[p] == ' ' || line[p] == '\t')) ++p;
                size_t b = p;
                while (p < line.size() && line[p] != ' ' && line[p] != '\t') ++p;
                if (p > b) fields.push_back(line.substr(b, p - b));
            }
            const size_t nf = fields.size();
            if (nf != size_t(n) + 1 && !(nf == size_t(n) + 2 && n < N))
                fail(in.line_no(), "expected " + std::to_string(n) + " words between the probability and " +
                                       (n < N ? "an optional backoff" : "the end of the line") + ", found " +
                                       std::to_string(nf) + " fields");
            float prob, bo = 0.0f;
            if (!parse_float(fields[0], prob)) fail(in.line_no(), "bad probability '" + std::string(fields[0]) + "'");
            // Like KenLM: a log10 probability above 0 (a probability above 1, or +inf) is refused;
            // -inf (probability 0) is allowed. Backoffs may be positive but not +inf.
            if (prob > 0.0f)
                fail(in.line_no(), "positive log10 probability " + std::string(fields[0]) + " (a probability above 1)");
            if (nf == size_t(n) + 2 && !parse_float(fields[n + 1], bo))
                fail(in.line_no(), "bad backoff '" + std::string(fields[n + 1]) + "'");
            if (bo == std::numeric_limits<float>::infinity()) fail(in.line_no(), "infinite backoff '" + std::string(fields[n + 1]) + "'");
            for (int j = 1; j <= n; ++j) {
                WordId id;
                if (n == 1) {
                    id = vocab.add(fields[j]);
                    if (seen.size() <= id) seen.resize(id + 1, 0);
                    if (seen[id]) fail(in.line_no(), "duplicate unigram '" + std::string(fields[j]) + "'");
                    seen[id] = 1;
                } else {
                    int64_t f = vocab.find(fields[j]);
                    if (f < 0) fail(in.line_no(), "word '" + std::string(fields[j]) + "' is not among the unigrams");
                    id = WordId(f);
                }
                t.words.push_back(id);
            }
            t.prob.push_back(prob);
            t.backoff.push_back(bo);
        }
        // The next non-blank line starts the next section (checked at the top of the loop) or ends the file.
        if (!next_nonblank()) fail(in.line_no(), n < N ? "missing section \\" + std::to_string(n + 1) + "-grams:" : "missing \\end\\");
        if (line[0] != '\\')
            fail(in.line_no(), "the section of " + std::to_string(n) + "-grams has more lines than the " +
                                   std::to_string(counts[n - 1]) + " its header says");
    }
    if (trim(line) != "\\end\\") fail(in.line_no(), "expected \\end\\, found '" + std::string(line.substr(0, 60)) + "'");
    try {
        return build(std::move(orders), std::move(vocab), warnings, true);
    } catch (const InputError& e) {
        throw InputError(std::string("ARPA file: ") + e.what());
    }
}

namespace {

void append_line(std::string& o, float prob, const WordId* w, int n, const Vocab& vocab, bool with_backoff, float backoff) {
    append_float(o, prob);
    o += '\t';
    for (int j = 0; j < n; ++j) {
        if (j) o += ' ';
        o += vocab.word(w[j]);
    }
    if (with_backoff) { o += '\t'; append_float(o, backoff); }
    o += '\n';
}

// Writes an ARPA file in lmplz's layout. format(n, begin, end, out) appends the lines of n-grams
// [begin, end) of order n; two threads format alternate blocks, written in order.
template <class Format>
void write_arpa_file(const std::string& path, const std::vector<uint64_t>& counts, Format&& format) {
    std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen(path.c_str(), "wb"), &std::fclose);
    if (!file) throw OutputFailure("cannot open " + path + " for writing: " + errno_text(errno));
    FILE* f = file.get();
    auto put = [&](const std::string& s) {
        if (std::fwrite(s.data(), 1, s.size(), f) != s.size()) throw OutputFailure("cannot write " + path + ": " + errno_text(errno));
    };
    std::string head = "\\data\\\n";
    for (size_t n = 1; n <= counts.size(); ++n) head += "ngram " + std::to_string(n) + "=" + std::to_string(counts[n - 1]) + "\n";
    put(head);
    constexpr size_t kBlock = 1 << 17;
    std::string bufs[2];
    std::exception_ptr fmt_err;
    for (int n = 1; n <= int(counts.size()); ++n) {
        put("\n\\" + std::to_string(n) + "-grams:\n");
        const size_t total = counts[n - 1];
        for (size_t at = 0; at < total; at += 2 * kBlock) {
            size_t mid = std::min(total, at + kBlock), end = std::min(total, at + 2 * kBlock);
            std::thread helper([&] {
                try { bufs[1].clear(); format(n, mid, end, bufs[1]); } catch (...) { fmt_err = std::current_exception(); }
            });
            std::exception_ptr main_err;
            try { bufs[0].clear(); format(n, at, mid, bufs[0]); } catch (...) { main_err = std::current_exception(); }
            helper.join();
            if (main_err || fmt_err) std::rethrow_exception(main_err ? main_err : fmt_err);
            put(bufs[0]);
            put(bufs[1]);
        }
    }
    put("\n\\end\\\n");
    if (std::fclose(file.release()) != 0) throw OutputFailure("cannot write " + path + ": " + errno_text(errno));
}

}  // namespace

void write_arpa(const std::vector<OrderTable>& orders, const Vocab& vocab, const std::string& path) {
    std::vector<uint64_t> counts;
    for (const OrderTable& t : orders) counts.push_back(t.size());
    const int N = int(orders.size());
    write_arpa_file(path, counts, [&](int n, size_t begin, size_t end, std::string& o) {
        const OrderTable& t = orders[n - 1];
        for (size_t i = begin; i < end; ++i) append_line(o, t.prob[i], &t.words[i * n], n, vocab, n < N, t.backoff[i]);
    });
}

void Model::write_arpa(const std::string& path) const {
    std::vector<uint64_t> counts;
    for (int n = 1; n <= order_; ++n) counts.push_back(count(n));
    write_arpa_file(path, counts, [&](int n, size_t begin, size_t end, std::string& o) {
        if (n == 1) {
            for (size_t i = begin; i < end; ++i) {
                WordId w = WordId(i);
                append_line(o, uni_prob_[w], &w, 1, vocab, order_ > 1, uni_backoff_[w]);
            }
            return;
        }
        const WordId* words = words_[n].data();
        constexpr size_t kAhead = 16;  // slots are prefetched this many lines ahead
        uint64_t keys[kAhead];
        for (size_t i = begin; i < std::min(end, begin + kAhead); ++i) {
            keys[i % kAhead] = ngram_key(words + i * n, n);
            tables_[n].prefetch(keys[i % kAhead]);
        }
        for (size_t i = begin; i < end; ++i) {
            const Slot* s = tables_[n].find(keys[i % kAhead]);
            if (!s) throw InputError("corrupt model: an n-gram of order " + std::to_string(n) + " is missing from its hash table");
            if (i + kAhead < end) {
                keys[i % kAhead] = ngram_key(words + (i + kAhead) * n, n);
                tables_[n].prefetch(keys[i % kAhead]);
            }
            append_line(o, s->prob, words + i * n, n, vocab, n < order_, s->backoff);
        }
    });
}

}  // namespace ngram
