// The build pipeline, KenLM-builder style: count -> adjusted counts -> discounts -> interpolate ->
// ARPA file and/or query model. Each step lives in the file named after it; this only wires them.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "count.hh"
#include "estimate.hh"
#include "model.hh"

namespace ngram {

// Everything a build takes. The counting fields are read when the pipeline starts, the others by
// finish() (they may be set until then).
struct PipelineConfig {
    CountOptions count;                // order, memory budget, temp dir, threads, skip_symbols
    EstimateOptions estimate;          // pruning, unigram interpolation, discount fallback
    std::string arpa_path;             // write the model as ARPA here (empty: no ARPA)
    bool build_model = true;           // build the query tables (false: ARPA and statistics only)
    bool verbose = false;              // counting and stage lines on stderr (else the core prints nothing)
};

struct PipelineResult {
    std::unique_ptr<Model> model;                         // null unless build_model
    std::vector<Discount> discounts;                      // per order
    std::vector<std::vector<uint64_t>> count_of_counts;   // per order: n1..n4
    std::vector<uint64_t> counts;                         // n-grams per order
    std::vector<std::string> warnings;                    // estimation's, then the model's
    double merge_seconds = 0;                             // from finish() to merged counts
};

class Pipeline {
  public:
    explicit Pipeline(PipelineConfig config);  // checks the counting options and starts the counter

    PipelineConfig& config() { return config_; }
    Counter& counter() { return *counter_; }  // feed the corpus here

    // Merges the counts, estimates, writes ARPA and builds the model as configured. Once only.
    PipelineResult finish();

  private:
    PipelineConfig config_;
    std::unique_ptr<Counter> counter_;
};

}  // namespace ngram
