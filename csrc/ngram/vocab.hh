// Vocabulary: word string <-> id, ids in order of first appearance after <unk>, <s>, </s>.
#pragma once
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "common.hh"

namespace ngram {

class Vocab {
  public:
    Vocab() { clear(); }

    void clear() {
        blob_.clear(); offsets_.assign(1, 0); hashes_.clear(); slots_.assign(64, Slot{0, 0});
        add(kUnkWord); add(kBosWord); add(kEosWord);
    }

    size_t size() const { return hashes_.size(); }

    std::string_view word(WordId id) const {
        return std::string_view(blob_.data() + offsets_[id], offsets_[id + 1] - offsets_[id]);
    }

    // Id of a word, or -1 when absent.
    int64_t find(std::string_view w) const {
        uint64_t h = hash_string(w.data(), w.size());
        for (size_t s = h & (slots_.size() - 1);; s = (s + 1) & (slots_.size() - 1)) {
            const Slot& v = slots_[s];
            if (!v.id) return -1;
            if (v.hash == h && word(v.id - 1) == w) return v.id - 1;
        }
    }

    // Id of a word, adding it when absent.
    WordId add(std::string_view w) {
        uint64_t h = hash_string(w.data(), w.size());
        size_t s = h & (slots_.size() - 1);
        for (;; s = (s + 1) & (slots_.size() - 1)) {
            const Slot& v = slots_[s];
            if (!v.id) break;
            if (v.hash == h && word(v.id - 1) == w) return v.id - 1;
        }
        WordId id = WordId(hashes_.size());
        blob_.append(w.data(), w.size());
        offsets_.push_back(blob_.size());
        hashes_.push_back(h);
        slots_[s] = Slot{h, id + 1};
        if (hashes_.size() * 2 > slots_.size()) grow();
        return id;
    }

    const std::string& blob() const { return blob_; }
    const std::vector<uint64_t>& offsets() const { return offsets_; }

    // Rebuild from a blob of concatenated words and their offsets (binary model load).
    void assign(const char* blob, const uint64_t* offsets, size_t n) {
        blob_.clear(); offsets_.assign(1, 0); hashes_.clear();
        slots_.assign(64, Slot{0, 0});
        while (slots_.size() < n * 2 + 2) slots_.resize(slots_.size() * 2, Slot{0, 0});
        for (size_t i = 0; i < n; ++i) {
            std::string_view w(blob + offsets[i], offsets[i + 1] - offsets[i]);
            if (add(w) != i) throw InputError("vocabulary has a duplicate word '" + std::string(w) + "'");
        }
    }

  private:
    void grow() {
        std::vector<Slot> slots(slots_.size() * 2, Slot{0, 0});
        for (size_t id = 0; id < hashes_.size(); ++id) {
            size_t s = hashes_[id] & (slots.size() - 1);
            while (slots[s].id) s = (s + 1) & (slots.size() - 1);
            slots[s] = Slot{hashes_[id], uint32_t(id + 1)};
        }
        slots_.swap(slots);
    }

    std::string blob_;
    std::vector<uint64_t> offsets_;
    std::vector<uint64_t> hashes_;
    struct Slot {
        uint64_t hash;
        uint32_t id;  // word id + 1, 0 = empty
    };
    std::vector<Slot> slots_;
};

}  // namespace ngram
