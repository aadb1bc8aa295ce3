// Python bindings of the fused decode step (mmfuse._decode). Tensors cross as data pointers
// (`tensor.data_ptr()`): engine/decoder/fused_step.py checks their dtypes, shapes and contiguity
// and keeps them alive as long as the plan.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <vector>

#include "decode.hh"

namespace py = pybind11;
using namespace mmdecode;

template <class T>
static const T* ptr(std::uintptr_t p) { return reinterpret_cast<const T*>(p); }

// (bits, weight, scales, zeros, bias, n, k, group_size, groups); pointers 0 where absent
static Linear linear(const py::tuple& t) {
    Linear l;
    l.bits = t[0].cast<int>();
    l.w = ptr<void>(t[1].cast<std::uintptr_t>());
    l.scales = ptr<float>(t[2].cast<std::uintptr_t>());
    l.zeros = ptr<void>(t[3].cast<std::uintptr_t>());
    l.bias = ptr<float>(t[4].cast<std::uintptr_t>());
    l.n = t[5].cast<int>();
    l.k = t[6].cast<int>();
    l.g = t[7].cast<int>();
    l.groups = t[8].cast<int>();
    return l;
}

static Norm norm(const py::tuple& t) {  // (weight, bias or 0)
    return Norm{ptr<float>(t[0].cast<std::uintptr_t>()), ptr<float>(t[1].cast<std::uintptr_t>())};
}

PYBIND11_MODULE(_decode, m) {
    m.doc() = "The fused CPU decode step of mmfuse's decoders (see engine/decoder/fused_step.py).";
    m.def("has_vnni", &cpu_has_vnni, "whether this CPU runs the AVX-512 VNNI integer kernels");
    m.def("linear",
          [](const py::tuple& spec, std::uintptr_t x, int ldx, int rows, std::uintptr_t y, bool int_dots) {
              // One linear layer on one thread, bias left out (tests): x (rows, ldx) zero-padded to Kp.
              Linear l = linear(spec);
              l.vnni = int_dots && l.bits < 16 && cpu_has_vnni() && vnni_fits(l);
              l.dpbf16 = int_dots && l.bits == 16 && cpu_has_bf16();
              QuantRows qr;
              qr.resize(rows, l.kp());
              prepare_input(l, ptr<float>(x), ldx, rows, l.k, qr);
              std::vector<float> tmp(size_t(rows) * std::max(1, l.groups));
              linear_rows(l, ptr<float>(x), ldx, &qr, rows, 0, l.n, reinterpret_cast<float*>(y), l.n, tmp.data());
              return l.vnni || l.dpbf16;
          },
          "y (rows, n) = x @ W.T of one layer (bias left out); int_dots: integer dot products (int8 / int4) or "
          "AVX-512 BF16 ones (bf16, x rounded to bf16 either way) where the CPU has them; returns whether they ran");
    m.def("has_bf16", &cpu_has_bf16, "whether this CPU runs the AVX-512 BF16 dot products");
    py::class_<Plan>(m, "Plan")
        .def(py::init([](int batch, int d_model, int n_head, int n_kv_head, int head_dim, int d_ff, int vocab,
                         int act, bool gated, bool rope, float eps, bool int_dots, bool kv_bf16, bool bf16_dots) {
            return new Plan(Config{batch, d_model, n_head, n_kv_head, head_dim, d_ff, vocab, act, gated, rope, eps,
                                   int_dots, kv_bf16, bf16_dots});
        }))
        .def("set_embed", [](Plan& p, std::uintptr_t table, const py::object& quantized, std::uintptr_t positions) {
            p.set_embed(ptr<float>(table), quantized.is_none() ? Linear{} : linear(quantized), ptr<float>(positions));
        })
        .def("add_layer", [](Plan& p, const py::tuple& n1, const py::tuple& n2, const py::tuple& qkv,
                             const py::tuple& o, const py::tuple& up, const py::tuple& down) {
            p.add_layer(Layer{norm(n1), norm(n2), linear(qkv), linear(o), linear(up), linear(down)});
        })
        .def("set_head", [](Plan& p, const py::tuple& nf, const py::tuple& head) { p.set_head(norm(nf), linear(head)); })
        .def("vnni_layers", &Plan::vnni_layers)
        .def("step",
             [](Plan& p, int rows, std::uintptr_t tokens, std::uintptr_t cache_rows, std::uintptr_t positions,
                std::uintptr_t k, std::uintptr_t v, int tmax, std::uintptr_t cos, std::uintptr_t sin, int rope_len,
                std::uintptr_t logits, int threads, int outs, std::uintptr_t out_index) {
                 p.step(rows, ptr<int64_t>(tokens), ptr<int64_t>(cache_rows), ptr<int64_t>(positions),
                        reinterpret_cast<void*>(k), reinterpret_cast<void*>(v), tmax, ptr<float>(cos),
                        ptr<float>(sin), rope_len, reinterpret_cast<float*>(logits), threads, outs,
                        ptr<int64_t>(out_index));
             },
             py::call_guard<py::gil_scoped_release>());
}
