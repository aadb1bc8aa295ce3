"""mmfuse.envs: every setting read lazily from the environment, validated on use, never at import;
the typed errors of the settings and of unavailable backends."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmfuse import envs
from mmfuse.errors import BackendUnavailableError, MMFuseError, SettingError
from mmfuse.kernels import attention, attention_reference, clip_loss, cpu_linear, get_backend, set_backend

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.parametrize("name", sorted(envs.ENV_VARS))
def test_every_setting_reads_lazily_and_names_itself_when_bad(name, monkeypatch):
    setting = envs.ENV_VARS[name]
    monkeypatch.delenv(name, raising=False)
    assert getattr(envs, name) == setting.parse(setting.default)
    for value in setting.allowed:
        monkeypatch.setenv(name, value.upper())  # case-insensitive
        assert getattr(envs, name) == setting.parse(value)
    monkeypatch.setenv(name, "bogus")
    with pytest.raises(SettingError, match=re.escape(name) + ".*'bogus'.*expected one of " + re.escape(
            ", ".join(setting.allowed))):
        getattr(envs, name)
    assert name in (ROOT / "README.md").read_text(), f"{name} is not in the README's settings table"


def test_flags_parse_like_triton(monkeypatch):
    for value, want in (("1", True), ("yes", True), ("On", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert envs.TRITON_INTERPRET is want
    monkeypatch.setenv("MMFUSE_CPU_GEMV", "")  # empty = unset: the default
    assert envs.MMFUSE_CPU_GEMV is True
    with pytest.raises(AttributeError):
        envs.MMFUSE_NO_SUCH_SETTING


def test_backends_follow_the_environment_at_call_time(monkeypatch):
    set_backend(None)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    monkeypatch.setenv("MMFUSE_ATTENTION", "reference")
    assert get_backend() == "reference"
    torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v))
    monkeypatch.setenv("MMFUSE_ATTENTION", "flash")
    with pytest.raises(SettingError, match="MMFUSE_ATTENTION='flash'"):
        attention(q, k, v)
    set_backend("sdpa")  # an explicit choice wins over the environment
    try:
        assert get_backend() == "sdpa"
        torch.testing.assert_close(attention(q, k, v), attention_reference(q, k, v), atol=1e-6, rtol=1e-6)
    finally:
        set_backend(None)
    with pytest.raises(SettingError, match="backend 'flash'"):
        set_backend("flash")
    monkeypatch.setenv("MMFUSE_CONTRASTIVE", "cuda")
    with pytest.raises(SettingError, match="MMFUSE_CONTRASTIVE='cuda'"):
        clip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0)
    monkeypatch.setenv("MMFUSE_CPU_PACKED", "0")
    assert not cpu_linear.packs(torch.float32)


def test_bad_values_do_not_raise_at_import():
    code = ("import mmfuse.kernels, mmfuse.kernels.cpu_linear, mmfuse.kernels.contrastive\n"
            "from mmfuse.errors import SettingError\n"
            "import torch\n"
            "try:\n"
            "    mmfuse.kernels.attention(*(torch.randn(1, 1, 2, 4) for _ in range(3)))\n"
            "except SettingError as e:\n"
            "    print('raised on use:', e)\n")
    out = run_python(code, MMFUSE_ATTENTION="bogus", MMFUSE_CONTRASTIVE="bogus", MMFUSE_CPU_GEMV="bogus",
                     MMFUSE_CPU_PACKED="bogus")
    assert out.returncode == 0, out.stderr
    assert "raised on use: environment variable MMFUSE_ATTENTION='bogus'" in out.stdout


def test_envs_imports_nothing_heavy():
    out = run_python("import sys, mmfuse.envs\n"
                     "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton', 'numpy', 'numba')"
                     " or m.startswith('mmfuse')))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['mmfuse', 'mmfuse.envs', 'mmfuse.errors']"


def test_only_envs_reads_the_environment():
    """Every MMFUSE_* / TRITON_INTERPRET read goes through mmfuse.envs (one place, one timing rule)."""
    readers = []
    for folder in ("engine", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != ROOT / "engine" / "envs.py" and re.search(r"os\.environ|os\.getenv|getenv\(", path.read_text()):
                readers.append(str(path.relative_to(ROOT)))
    assert not readers, f"read the environment outside mmfuse.envs: {readers}"


def test_triton_backends_on_cpu_without_the_interpreter_raise_one_typed_error():
    code = ("import torch\n"
            "from mmfuse.errors import BackendUnavailableError\n"
            "from mmfuse.kernels import attention, clip_loss, set_backend\n"
            "set_backend('triton')\n"
            "for call in (lambda: attention(*(torch.randn(1, 2, 20, 16) for _ in range(3))),\n"
            "             lambda: clip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0, backend='triton')):\n"
            "    try:\n"
            "        call()\n"
            "    except BackendUnavailableError as e:\n"
            "        print(isinstance(e, RuntimeError), e)\n")
    out = run_python(code, TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("True ") and "TRITON_INTERPRET=1" in line for line in lines), lines
    assert "attention backend 'triton'" in lines[0] and "contrastive loss backend 'triton'" in lines[1]
    assert issubclass(BackendUnavailableError, MMFuseError) and issubclass(SettingError, ValueError)
