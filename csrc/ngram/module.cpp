// pybind11 entry point of mmfuse._ngram (n-gram counting and Kneser-Ney estimation).
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_ngram, m) {
    m.doc() = "mmfuse n-gram language model core (C++)";
}
