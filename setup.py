"""Build script: maps engine/ -> mmfuse and kernels/ -> mmfuse.kernels, builds the C++ extensions in
csrc/. Both are optional: where one cannot be compiled (no C++17 compiler, no OpenMP), the install
goes on without it and says so. Without mmfuse._ngram `mmfuse ngram` explains what is missing;
without mmfuse._decode CPU decoding takes the per-op PyTorch path."""
import glob
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext_modules = [
    Pybind11Extension(
        "mmfuse._ngram",
        sorted(glob.glob("csrc/ngram/*.cpp")),
        include_dirs=["csrc/ngram"],
        cxx_std=17,
        extra_compile_args=["-O3", "-pthread"],
        extra_link_args=["-pthread"],
    ),
    # The fused CPU decode step: portable code with runtime dispatch (no -march=native), so one build
    # runs on AVX2-only and AVX-512 machines alike.
    Pybind11Extension(
        "mmfuse._decode",
        sorted(glob.glob("csrc/decode/*.cpp")),
        include_dirs=["csrc/decode"],
        cxx_std=17,
        extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros",
                            "-fassociative-math"],
        extra_link_args=["-fopenmp"],
    ),
]

CONSEQUENCES = {
    "mmfuse._ngram": "the decoder and encoder commands work; the n-gram models\n(`mmfuse ngram`, mmfuse.ngram) need it.",
    "mmfuse._decode": "everything works; CPU decoding takes the slower per-op\nPyTorch path.",
}
WARNING = """
==============================================================================
mmfuse: could not build the C++ extension {name} ({error}).
Installing without it: {consequence} Install a C++17 compiler
with OpenMP (e.g. `apt-get install g++`) and reinstall to get it.
==============================================================================
"""


class optional_build_ext(build_ext):
    """build_ext that turns a failed compile into a clear warning instead of a failed install."""

    def build_extensions(self):
        self._failed = set()
        super().build_extensions()
        self.extensions = [e for e in self.extensions if e.name not in self._failed]  # nothing to copy or record

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # CompileError, LinkError, DistutilsExecError, OSError
            self._failed.add(ext.name)
            self._warn(ext.name, e)

    @staticmethod
    def _warn(name, error):
        print(WARNING.format(name=name, error=f"{type(error).__name__}: {error}", consequence=CONSEQUENCES[name]),
              file=sys.stderr)


packages = (["mmfuse"] + ["mmfuse." + p for p in find_packages("engine")]
            + ["mmfuse.kernels"] + ["mmfuse.kernels." + p for p in find_packages("kernels")])

setup(
    packages=packages,
    package_dir={"mmfuse": "engine", "mmfuse.kernels": "kernels"},
    # the trained world models (`mmfuse world train --install`), so that pip install brings them
    package_data={"mmfuse.world": ["shipped/MODEL_CARD.md", "shipped/training.json", "shipped/*/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": optional_build_ext},
    zip_safe=False,
)
