// pybind11 bindings of mmfuse._ngram, and nothing else: the build pipeline (Builder, over
// pipeline.hh), the query model (Model, State) and the constants Python shares with the core (special
// words, the binary format's magic). Bad input raises NGramError (C++ InputError); no call crashes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <charconv>
#include <cstring>
#include <thread>
#include <unordered_map>

#include "model.hh"
#include "pipeline.hh"

namespace py = pybind11;
using namespace ngram;

namespace {

using IdArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using TokArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// A model plus what Python needs around it: build statistics and the token-id <-> word-id maps of
// models whose words are integer token ids (built from numpy arrays).
class PyModel {
  public:
    explicit PyModel(std::unique_ptr<Model> m) : m_(std::move(m)) {}
    Model& m() { return *m_; }
    const Model& m() const { return *m_; }
    std::vector<std::string> warnings;
    py::object stats;  // dict of build statistics (None until set, with the GIL held)

    void check_ids(const int32_t* ids, size_t n) const {
        const size_t V = m_->vocab_size();
        for (size_t i = 0; i < n; ++i)
            if (ids[i] < 0 || size_t(ids[i]) >= V)
                throw InputError("word id " + std::to_string(ids[i]) + " at position " + std::to_string(i) +
                                 " is outside the vocabulary [0, " + std::to_string(V) + ")");
    }

    // States are plain values: one made by another model may hold words or lengths this one lacks.
    void check_state(const State& st) const {
        if (st.length < 0 || st.length > std::max(0, m_->order() - 1))
            throw InputError("state of length " + std::to_string(st.length) + " does not fit a model of order " + std::to_string(m_->order()));
        for (int i = 0; i < st.length; ++i)
            if (st.words[i] >= m_->vocab_size()) throw InputError("state holds word id " + std::to_string(st.words[i]) + " outside this model's vocabulary");
    }

    // State after the context (bos: the context follows <s>), the ids checked.
    State state_after(const int32_t* ids, size_t n, bool bos) const {
        check_ids(ids, n);
        return m_->state_after(reinterpret_cast<const WordId*>(ids), n, bos);
    }

    bool is_token_model() {
        build_token_maps();
        return token_model_;
    }
    const std::vector<int64_t>& word_to_token() { build_token_maps(); return word_to_token_; }
    int32_t token_to_word(int64_t t) {
        build_token_maps();
        if (t < 0) throw InputError("token ids must be non-negative, got " + std::to_string(t));
        if (size_t(t) < token_to_word_.size()) return token_to_word_[t];
        auto it = token_sparse_.find(t);
        return it == token_sparse_.end() ? int32_t(kUNK) : it->second;
    }

  private:
    void build_token_maps() {
        if (maps_built_) return;
        maps_built_ = true;
        const size_t V = m_->vocab_size();
        word_to_token_.assign(V, kEosToken);  // </s> (and non-numeric words) -> kEosToken
        word_to_token_[kUNK] = kUnkToken;
        word_to_token_[kBOS] = kBosToken;
        token_model_ = V > 3;
        int64_t max_tok = -1;
        for (WordId w = 3; w < V; ++w) {
            std::string_view s = m_->vocab.word(w);
            int64_t t = -1;
            auto r = std::from_chars(s.data(), s.data() + s.size(), t);
            bool ok = r.ec == std::errc() && r.ptr == s.data() + s.size() && t >= 0 && std::to_string(t) == s;
            if (!ok) { token_model_ = false; continue; }
            word_to_token_[w] = t;
            max_tok = std::max(max_tok, t);
        }
        // Dense below a bound set by the vocabulary size, a hash map above: a numeric word such as
        // 9223372036854775807 costs one entry, not an array up to it.
        const int64_t cap = int64_t(4 * V + 1024);
        const int64_t dense = max_tok < cap ? max_tok + 1 : cap;  // max_tok + 1 may overflow
        token_to_word_.assign(size_t(std::max<int64_t>(dense, 0)), int32_t(kUNK));
        for (WordId w = 3; w < V; ++w) {
            const int64_t t = word_to_token_[w];
            if (t < 0) continue;
            if (t < dense) token_to_word_[size_t(t)] = int32_t(w);
            else token_sparse_.emplace(t, int32_t(w));
        }
    }
    std::unique_ptr<Model> m_;
    bool maps_built_ = false, token_model_ = false;
    std::vector<int64_t> word_to_token_;
    std::vector<int32_t> token_to_word_;
    std::unordered_map<int64_t, int32_t> token_sparse_;
};

// Words are bytes; ones that are not UTF-8 (a Latin-1 corpus) come back with surrogate escapes,
// as Python's os functions do, instead of failing.
py::str decode_word(std::string_view w) {
    PyObject* o = PyUnicode_DecodeUTF8(w.data(), Py_ssize_t(w.size()), "surrogateescape");
    if (!o) throw py::error_already_set();
    return py::reinterpret_steal<py::str>(o);
}

template <class T> py::array_t<T> to_numpy(const std::vector<T>& v) {
    py::array_t<T> a(v.size());
    if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(T));
    return a;
}

// Splits a sentence on KenLM's whitespace (is_space) into word ids (appended to ids).
void encode_into(const Model& m, std::string_view s, std::vector<int32_t>& ids) {
    size_t p = 0;
    while (p < s.size()) {
        while (p < s.size() && is_space(s[p])) ++p;
        size_t b = p;
        while (p < s.size() && !is_space(s[p])) ++p;
        if (p > b) ids.push_back(int32_t(m.index(s.substr(b, p - b))));
    }
}

std::vector<int32_t> encode_sentence(const Model& m, std::string_view s) {
    std::vector<int32_t> ids;
    encode_into(m, s, ids);
    return ids;
}

void score_ids_into(const Model& m, const int32_t* ids, size_t n, bool bos, bool eos, float* probs, int32_t* lens) {
    m.score_sequence(reinterpret_cast<const WordId*>(ids), n, bos, eos, probs, lens);
}

// A sentence total summed in float, as KenLM's query tool and Python module do (corpus sums of
// these totals are double, as in KenLM's query).
float sum_like_kenlm(const float* probs, size_t n) {
    float total = 0.0f;
    for (size_t i = 0; i < n; ++i) total += probs[i];
    return total;
}

py::tuple top_k_py(PyModel& pm, const State& st, int k) {
    if (k < 0) throw InputError("k must be >= 0");
    std::vector<WordId> ids;
    std::vector<float> probs;
    pm.m().top_k(st, k, ids, probs);
    std::vector<int32_t> out(ids.begin(), ids.end());
    return py::make_tuple(to_numpy(out), to_numpy(probs));
}

}  // namespace

PYBIND11_MODULE(_ngram, mod) {
    mod.doc() = "mmfuse n-gram language model core (C++): counting, modified Kneser-Ney, queries";
    mod.attr("MAX_ORDER") = kMaxOrder;
    mod.attr("MAX_THREADS") = kMaxThreads;
    // The special words: vocabulary ids, spellings, and ids in the token-id space of token models.
    mod.attr("UNK") = kUNK;
    mod.attr("BOS") = kBOS;
    mod.attr("EOS") = kEOS;
    mod.attr("UNK_WORD") = py::str(kUnkWord.data(), kUnkWord.size());
    mod.attr("BOS_WORD") = py::str(kBosWord.data(), kBosWord.size());
    mod.attr("EOS_WORD") = py::str(kEosWord.data(), kEosWord.size());
    mod.attr("UNK_TOKEN") = kUnkToken;
    mod.attr("BOS_TOKEN") = kBosToken;
    mod.attr("EOS_TOKEN") = kEosToken;
    mod.attr("BINARY_MAGIC") = py::bytes(kBinaryMagic, sizeof(kBinaryMagic) - 1);
    mod.attr("BINARY_VERSION") = kBinaryVersion;
    mod.attr("PROGRESS_BYTES") = kProgressBytes;
    // C++ failures become mmfuse's typed errors (all MMFuseError): bad input NGramError, a failed
    // write OutputError, a refused thread ResourceError.
    static PyObject* input_error = py::object(py::module_::import("mmfuse.errors").attr("NGramError")).release().ptr();
    static PyObject* output_error = py::object(py::module_::import("mmfuse.errors").attr("OutputError")).release().ptr();
    static PyObject* resource_error = py::object(py::module_::import("mmfuse.errors").attr("ResourceError")).release().ptr();
    mod.attr("InputError") = py::handle(input_error);
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const InputError& e) {
            PyErr_SetString(input_error, e.what());
        } catch (const OutputFailure& e) {
            PyErr_SetString(output_error, e.what());
        } catch (const ResourceFailure& e) {
            PyErr_SetString(resource_error, e.what());
        } catch (const std::system_error& e) {  // a thread the machine refused (query helpers)
            PyErr_SetString(resource_error, e.what());
        }
    });

    py::class_<State>(mod, "State")
        .def_property_readonly("length", [](const State& s) { return s.length; })
        .def_property_readonly("words", [](const State& s) { return std::vector<WordId>(s.words, s.words + s.length); })
        .def("__eq__", [](const State& a, const State& b) { return a == b; })
        .def("__hash__", [](const State& s) {
            uint64_t h = uint64_t(s.length);
            for (int i = 0; i < s.length; ++i) h = hash_extend(h, s.words[i]);
            return h;
        })
        .def("__repr__", [](const State& s) {
            std::string r = "State(words=[";
            for (int i = 0; i < s.length; ++i) r += (i ? ", " : "") + std::to_string(s.words[i]);
            return r + "])";
        });

    py::class_<Pipeline>(mod, "Builder")
        .def(py::init([](int order, uint64_t memory_bytes, std::string tmp_dir, int threads, bool skip_symbols, bool verbose) {
                 PipelineConfig cfg;
                 cfg.count.order = order; cfg.count.memory_bytes = memory_bytes; cfg.count.tmp_dir = tmp_dir;
                 cfg.count.threads = threads; cfg.count.skip_symbols = skip_symbols; cfg.verbose = verbose;
                 return std::make_unique<Pipeline>(std::move(cfg));
             }),
             py::arg("order"), py::arg("memory_bytes"), py::arg("tmp_dir"), py::arg("threads"),
             py::arg("skip_symbols"), py::arg("verbose"))
        // A Builder is fed from one thread at a time: a second one entering is refused (NGramError).
        .def("add_file", [](Pipeline& p, const std::string& path, py::object progress) {
            ExclusiveUse use(p.counter().busy, "this Builder");
            // Between blocks, with the GIL: pending signals (Ctrl-C raises here and stops the
            // counting), then progress(consumed, total) when given.
            const Progress report = [&progress](uint64_t consumed, uint64_t total) {
                py::gil_scoped_acquire gil;
                if (PyErr_CheckSignals() != 0) throw py::error_already_set();
                if (!progress.is_none()) progress(consumed, total);
            };
            py::gil_scoped_release nogil;
            p.counter().add_file(path, report);
        }, py::arg("path"), py::arg("progress") = py::none(),
           "Counts a text file; progress(bytes consumed, total bytes) is called every PROGRESS_BYTES and at the end.")
        .def("add_text", [](Pipeline& p, const std::string& text) {
            ExclusiveUse use(p.counter().busy, "this Builder");
            py::gil_scoped_release nogil;
            p.counter().add_text(text.data(), text.size());
        })
        .def("add_token_ids", [](Pipeline& p, TokArray ids) {
            if (ids.ndim() != 1) throw InputError("token ids must be a 1-D array, got shape with " + std::to_string(ids.ndim()) + " dims");
            ExclusiveUse use(p.counter().busy, "this Builder");
            p.counter().add_token_ids(ids.data(), size_t(ids.size()));
        })
        .def_property_readonly("tokens", [](Pipeline& p) { return p.counter().tokens; })
        .def_property_readonly("lines", [](Pipeline& p) { return p.counter().lines; })
        .def_property_readonly("bytes", [](Pipeline& p) { return p.counter().bytes; })
        .def_property_readonly("spilled_runs", [](Pipeline& p) { return p.counter().spilled_runs; })
        .def_property_readonly("vocab_size", [](Pipeline& p) { return p.counter().vocab.size(); })
        .def("finish", [](Pipeline& p, std::vector<uint64_t> prune, bool interpolate_unigrams,
                          std::optional<std::vector<float>> fallback, bool verbose, std::string arpa_path,
                          bool build_model) -> py::object {
            ExclusiveUse use(p.counter().busy, "this Builder");
            PipelineConfig& cfg = p.config();
            cfg.estimate.prune = prune;
            cfg.estimate.interpolate_unigrams = interpolate_unigrams;
            cfg.estimate.fallback = fallback ? make_fallback(*fallback) : DiscountFallback{};
            cfg.verbose = verbose;
            cfg.arpa_path = arpa_path;
            cfg.build_model = build_model;
            PipelineResult res;
            {
                py::gil_scoped_release nogil;
                res = p.finish();
            }
            if (!res.model) {  // only the ARPA file was asked for
                py::dict stats;
                stats["count_of_counts"] = py::cast(res.count_of_counts);
                py::list disc;
                for (auto& d : res.discounts) disc.append(py::make_tuple(d.amount[1], d.amount[2], d.amount[3]));
                stats["discounts"] = disc;
                stats["counts"] = res.counts;
                stats["warnings"] = res.warnings;
                return std::move(stats);
            }
            auto pm = std::make_unique<PyModel>(std::move(res.model));
            pm->warnings = std::move(res.warnings);
            py::dict stats;
            stats["count_of_counts"] = py::cast(res.count_of_counts);
            stats["merge_seconds"] = res.merge_seconds;
            pm->stats = stats;
            return py::cast(std::move(pm));
        }, py::arg("prune"), py::arg("interpolate_unigrams"), py::arg("discount_fallback"), py::arg("verbose"),
           py::arg("arpa_path") = "", py::arg("build_model") = true,
           "Merges the counts and estimates the model; writes ARPA to arpa_path when given. Returns the "
           "Model, or (build_model=False) a dict of statistics.");

    py::class_<PyModel>(mod, "Model")
        .def_static("load_binary", [](const std::string& path) {
            std::unique_ptr<Model> m;
            {
                py::gil_scoped_release nogil;
                m = Model::load_binary(path);
            }
            return std::make_unique<PyModel>(std::move(m));
        })
        .def_static("read_arpa_bytes", [](py::bytes data) {
            std::string_view s = data;
            std::vector<std::string> w;
            std::unique_ptr<Model> m;
            {
                py::gil_scoped_release nogil;
                m = Model::read_arpa(s.data(), s.size(), &w);
            }
            auto pm = std::make_unique<PyModel>(std::move(m));
            pm->warnings = w;
            return pm;
        })
        .def("save_binary", [](const PyModel& pm, const std::string& path) { pm.m().save_binary(path); },
             py::call_guard<py::gil_scoped_release>())
        .def("write_arpa", [](const PyModel& pm, const std::string& path) { pm.m().write_arpa(path); },
             py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("order", [](const PyModel& pm) { return pm.m().order(); })
        .def_property_readonly("vocab_size", [](const PyModel& pm) { return pm.m().vocab_size(); })
        .def_property_readonly("counts", [](const PyModel& pm) {
            std::vector<uint64_t> c;
            for (int n = 1; n <= pm.m().order(); ++n) c.push_back(pm.m().count(n));
            return c;
        })
        .def_property_readonly("discounts", [](const PyModel& pm) -> py::object {
            if (pm.m().discounts.empty()) return py::none();
            py::list l;
            for (auto& d : pm.m().discounts) l.append(py::make_tuple(d.amount[1], d.amount[2], d.amount[3]));
            return l;
        })
        .def_readonly("warnings", &PyModel::warnings)
        .def_property_readonly("stats", [](const PyModel& pm) { return pm.stats ? pm.stats : py::dict(); })
        .def_property_readonly("is_token_model", [](PyModel& pm) { return pm.is_token_model(); })
        .def("index", [](const PyModel& pm, const std::string& w) { return int32_t(pm.m().index(w)); })
        .def("word", [](const PyModel& pm, int64_t id) {
            if (id < 0 || size_t(id) >= pm.m().vocab_size()) throw InputError("word id " + std::to_string(id) + " is outside the vocabulary");
            return decode_word(pm.m().vocab.word(WordId(id)));
        })
        .def("vocab", [](const PyModel& pm) {
            py::list v;
            for (WordId w = 0; w < pm.m().vocab_size(); ++w) v.append(decode_word(pm.m().vocab.word(w)));
            return v;
        })
        .def("encode", [](const PyModel& pm, const std::string& sentence) { return to_numpy(encode_sentence(pm.m(), sentence)); })
        .def("tokens_to_ids", [](PyModel& pm, TokArray toks) {
            std::vector<int32_t> out(size_t(toks.size()));
            const int64_t* t = toks.data();
            for (size_t i = 0; i < out.size(); ++i) out[i] = pm.token_to_word(t[i]);
            return to_numpy(out);
        })
        .def("ids_to_tokens", [](PyModel& pm, IdArray ids) {
            pm.check_ids(ids.data(), size_t(ids.size()));
            const auto& w2t = pm.word_to_token();
            std::vector<int64_t> out(size_t(ids.size()));
            for (size_t i = 0; i < out.size(); ++i) out[i] = w2t[ids.data()[i]];
            return to_numpy(out);
        })
        .def("score_ids", [](const PyModel& pm, IdArray ids, bool bos, bool eos) {
            if (ids.ndim() != 1) throw InputError("ids must be a 1-D array");
            size_t n = size_t(ids.size());
            pm.check_ids(ids.data(), n);
            py::array_t<float> probs(n + eos);
            py::array_t<int32_t> lens(n + eos);
            score_ids_into(pm.m(), ids.data(), n, bos, eos, probs.mutable_data(), lens.mutable_data());
            return py::make_tuple(probs, lens);
        }, py::arg("ids"), py::arg("bos"), py::arg("eos"))
        .def("score_sentence", [](const PyModel& pm, std::string_view s, bool bos, bool eos) {
            thread_local std::vector<int32_t> ids;  // reused: this is the per-sentence hot path
            thread_local std::vector<float> probs;
            ids.clear();
            encode_into(pm.m(), s, ids);
            probs.resize(ids.size() + eos);
            score_ids_into(pm.m(), ids.data(), ids.size(), bos, eos, probs.data(), nullptr);
            return sum_like_kenlm(probs.data(), probs.size());
        })
        .def("score_batch", [](const PyModel& pm, IdArray ids, TokArray lengths, bool bos, bool eos, int threads) {
            if (ids.ndim() != 2) throw InputError("batch ids must be a 2-D array (B, T)");
            const size_t B = size_t(ids.shape(0)), T = size_t(ids.shape(1));
            if (lengths.ndim() != 1 || size_t(lengths.size()) != B)
                throw InputError("lengths must be a 1-D array of " + std::to_string(B) + " entries");
            for (size_t b = 0; b < B; ++b)
                if (lengths.data()[b] < 0 || size_t(lengths.data()[b]) > T)
                    throw InputError("lengths[" + std::to_string(b) + "] = " + std::to_string(lengths.data()[b]) + " is outside [0, " + std::to_string(T) + "]");
            for (size_t b = 0; b < B; ++b) pm.check_ids(ids.data() + b * T, size_t(lengths.data()[b]));
            py::array_t<double> totals(B);
            double* out = totals.mutable_data();
            const int32_t* data = ids.data();
            const int64_t* len = lengths.data();
            {
                py::gil_scoped_release nogil;
                auto rows = [&](size_t begin, size_t end) {
                    std::vector<float> probs(T + 1);
                    for (size_t b = begin; b < end; ++b) {
                        size_t n = size_t(len[b]);
                        score_ids_into(pm.m(), data + b * T, n, bos, eos, probs.data(), nullptr);
                        out[b] = sum_like_kenlm(probs.data(), n + eos);
                    }
                };
                // Rows are independent: split them over the threads (the model is read-only).
                uint64_t total = 0;  // a thread pays off from some 10^5 tokens on
                for (size_t b = 0; b < B; ++b) total += uint64_t(len[b]);
                const size_t workers = std::max<size_t>(1, std::min<size_t>({size_t(threads), size_t(kMaxThreads), B, size_t(total / 100000) + 1}));
                std::vector<std::thread> pool;
                std::string refused;
                try {
                    for (size_t t = 1; t < workers; ++t) pool.emplace_back(rows, B * t / workers, B * (t + 1) / workers);
                } catch (const std::system_error& e) {  // the machine refused a thread: finish and report
                    refused = e.what();
                }
                if (refused.empty()) rows(0, B / workers);
                for (auto& th : pool) th.join();
                if (!refused.empty())
                    throw ResourceFailure("cannot start " + std::to_string(workers) + " scoring threads (threads): " + refused);
            }
            return totals;
        }, py::arg("ids"), py::arg("lengths"), py::arg("bos"), py::arg("eos"), py::arg("threads") = 2)
        .def("corpus_stats", [](const PyModel& pm, const std::string& text, bool bos, bool eos) {
            // Sums over lines: (total log10, log10 of OOV tokens, tokens scored, OOVs, lines).
            double total = 0, oov_total = 0;
            uint64_t tokens = 0, oovs = 0, lines = 0;
            {
                py::gil_scoped_release nogil;
                std::vector<float> probs;
                size_t p = 0;
                while (p < text.size()) {
                    size_t e = text.find('\n', p);
                    if (e == std::string::npos) e = text.size();
                    std::vector<int32_t> ids = encode_sentence(pm.m(), std::string_view(text).substr(p, e - p));
                    probs.resize(ids.size() + eos);
                    score_ids_into(pm.m(), ids.data(), ids.size(), bos, eos, probs.data(), nullptr);
                    total += sum_like_kenlm(probs.data(), probs.size());
                    for (size_t i = 0; i < ids.size(); ++i)
                        if (ids[i] == int32_t(kUNK)) { oov_total += probs[i]; ++oovs; }
                    tokens += probs.size();
                    ++lines;
                    p = e + 1;
                }
            }
            return py::make_tuple(total, oov_total, tokens, oovs, lines);
        })
        .def("begin_state", [](const PyModel& pm) { return pm.m().begin_state(); })
        .def("null_state", [](const PyModel& pm) { return pm.m().null_state(); })
        .def("state_after", [](const PyModel& pm, IdArray ids, bool bos) {
            return pm.state_after(ids.data(), size_t(ids.size()), bos);
        })
        .def("score_word", [](const PyModel& pm, const State& st, int64_t id) {
            pm.check_state(st);
            if (id < 0 || size_t(id) >= pm.m().vocab_size()) throw InputError("word id " + std::to_string(id) + " is outside the vocabulary");
            State out;
            Score s = pm.m().score(st, WordId(id), out);
            return py::make_tuple(s.prob, s.ngram_length, out);
        })
        .def("distribution", [](const PyModel& pm, const State& st) {
            pm.check_state(st);
            py::array_t<float> d(pm.m().vocab_size());
            pm.m().distribution(st, d.mutable_data());
            return d;
        })
        .def("top_k", [](PyModel& pm, const State& st, int k) {
            pm.check_state(st);
            return top_k_py(pm, st, k);
        })
        .def("greedy", [](PyModel& pm, IdArray ctx, int k, bool bos, bool stop_at_eos) {
            if (k < 0) throw InputError("k must be >= 0");
            std::vector<WordId> ids;
            std::vector<float> probs;
            pm.m().greedy(pm.state_after(ctx.data(), size_t(ctx.size()), bos), k, stop_at_eos, ids, probs);
            return py::make_tuple(to_numpy(std::vector<int32_t>(ids.begin(), ids.end())), to_numpy(probs));
        })
        .def("sample", [](PyModel& pm, IdArray ctx, int max_words, uint64_t seed, bool bos) {
            if (max_words < 0) throw InputError("max_words must be >= 0");
            State st = pm.state_after(ctx.data(), size_t(ctx.size()), bos);
            std::vector<WordId> words;
            {
                py::gil_scoped_release nogil;
                words = pm.m().sample_words(st, max_words, seed);
            }
            return to_numpy(std::vector<int32_t>(words.begin(), words.end()));
        });
}
