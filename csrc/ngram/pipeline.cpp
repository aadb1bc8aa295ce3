// Build pipeline: wires counting, estimation, ARPA writing and model building, timing each stage.
#include "pipeline.hh"

#include <cstdio>
#include <ctime>

namespace ngram {

Pipeline::Pipeline(PipelineConfig config) : config_(std::move(config)) {
    config_.count.verbose = config_.verbose;
    counter_ = Counter::make(config_.count);
}

PipelineResult Pipeline::finish() {
    Counter& c = *counter_;
    EstimateOptions eo = config_.estimate;
    eo.verbose = config_.verbose;
    normalise_prune(eo.prune, c.order());  // refuse bad thresholds before the merge
    const double t0 = now_seconds();
    auto stage = [&](const char* what) {
        const double t = now_seconds() - t0;
        if (config_.verbose)
            std::fprintf(stderr, "[mmfuse.ngram] %s (%.1f s, %.1f s of CPU in all)\n", what, t,
                         double(std::clock()) / CLOCKS_PER_SEC);
        return t;
    };
    PipelineResult out;
    CountedGrams grams = c.finish();
    out.merge_seconds = stage("counts merged");
    const size_t V = c.vocab.size();
    EstimateResult res = estimate(std::move(grams), V, eo);
    stage("estimated");
    if (!config_.arpa_path.empty()) {
        write_arpa(res.orders, c.vocab, config_.arpa_path);
        stage("ARPA written");
    }
    out.discounts = res.discounts;
    out.count_of_counts = std::move(res.count_of_counts);
    for (auto& t : res.orders) out.counts.push_back(t.size());
    out.warnings = std::move(res.warnings);
    if (config_.build_model) {
        out.model = Model::build(std::move(res.orders), std::move(c.vocab), &out.warnings);
        out.model->discounts = std::move(res.discounts);
        stage("query tables built");
    }
    return out;
}

}  // namespace ngram
