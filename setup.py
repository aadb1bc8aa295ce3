"""Build script: maps engine/ -> mmfuse and kernels/ -> mmfuse.kernels, builds the C++ extensions in csrc/."""
import glob

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
]

packages = (["mmfuse"] + ["mmfuse." + p for p in find_packages("engine")]
            + ["mmfuse.kernels"] + ["mmfuse.kernels." + p for p in find_packages("kernels")])

setup(
    packages=packages,
    package_dir={"mmfuse": "engine", "mmfuse.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
