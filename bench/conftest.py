import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m pytest bench/...` from the repository root: the root leaves sys.path, as in tests/conftest.py
# (its kernels/ folder would shadow Hugging Face's `kernels`, which transformers imports)
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != os.path.realpath(_ROOT)]
sys.path.insert(0, os.path.dirname(__file__))  # bench scripts import each other by name
