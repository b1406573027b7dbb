"""What a newcomer reads first: `iqa --help`, each command's `--help`, `--version`, and shell completion values."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata

import pytest

from tests.conftest import run_iqa

COMMANDS = ("prepare", "train", "score", "eval", "demo", "serve")


def test_root_help_lists_commands_in_the_order_a_user_meets_them(iqa):
    code, out, _ = iqa("--help")
    assert code == 0
    listed = [m.group(1) for m in re.finditer(r"^  (\w+)  ", out.split("Commands:")[1], re.M)]
    assert listed == list(COMMANDS)
    assert "--install-completion" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_shows_a_named_placeholder_not_a_python_type(iqa, command):
    code, out, _ = iqa(command, "--help")
    assert code == 0
    options = out.split("Options:")[1]
    # An option line: "  -o, --out FILE   help" or a flag "  --lora   help"; never "--out <str>".
    assert not re.search(r"--[\w-]+ <", options), re.findall(r"--[\w-]+ <[^>]*>", options)
    assert not re.search(r"\{[a-z_]+\}", out.splitlines()[0]), out.splitlines()[0]  # usage: {DATASET}, not {dataset}
    for line in re.findall(r"^ +(?:-\w, )?--[\w-]+ [^\s/]+", options, re.M):  # "--x / --no-x" is a flag
        placeholder = line.split()[-1]
        assert placeholder.isupper() or placeholder.startswith("N,"), line


def test_placeholders_name_what_goes_there(iqa):
    _, out, _ = iqa("prepare", "--help")
    assert re.search(r"--csv FILE\b", out) and re.search(r"--images DIR\b", out) and "{DATASET}" in out
    _, out, _ = iqa("score", "--help")
    assert re.search(r"--model MODEL\b", out) and re.search(r"--workers N\b", out) and "[PATH]..." in out
    _, out, _ = iqa("train", "--help")
    assert re.search(r"--method METHOD\b", out) and re.search(r"--epochs N\b", out)


def _complete(iqa, monkeypatch, words: str) -> list[str]:
    """The bash completion protocol answered in-process (tests/test_completions.py runs it in a subprocess)."""
    monkeypatch.setenv("_IQA_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", words)
    monkeypatch.setenv("COMP_CWORD", str(len(words.split()) - (0 if words.endswith(" ") else 1)))
    code, out, _ = iqa()
    assert code == 0
    return out.split()


def test_completion_offers_each_options_values(iqa, monkeypatch):
    from iqa_cli.datasets import DATASETS
    from iqa_cli.evaluate import PREDICTION_COLUMNS, SPLITS
    from iqa_cli.labels import DENSITIES, LABEL_RULES
    from iqa_cli.model_options import DTYPES, QUANTIZE_MODES
    from iqa_cli.scoring.output import FORMATS
    from iqa_cli.training import LAYOUTS, METHODS, STRATEGIES

    expected = {
        "iqa train --method ": METHODS,
        "iqa train --layout ": LAYOUTS,
        "iqa train --strategy ": STRATEGIES,
        "iqa score --dtype ": DTYPES,
        "iqa serve --quantize ": QUANTIZE_MODES,
        "iqa score --format ": FORMATS,
        "iqa prepare --density ": DENSITIES,
        "iqa prepare --label-rule ": LABEL_RULES,
        "iqa prepare ": tuple(DATASETS),
        "iqa eval p.parquet --split ": SPLITS,
        "iqa eval p.parquet --column ": PREDICTION_COLUMNS,
    }
    for words, values in expected.items():
        assert _complete(iqa, monkeypatch, words) == list(values), words
    assert "koniq" in DATASETS and "reference" in LABEL_RULES and "deqa" in METHODS  # the lists are the real ones
    assert _complete(iqa, monkeypatch, "iqa prepare kon") == ["koniq", "konvid1k"]
    assert _complete(iqa, monkeypatch, "iqa train --method q") == ["qalign", "qscorer"]
    assert _complete(iqa, monkeypatch, "iqa score x --dtype bf") == ["bfloat16"]


def test_completion_offers_only_devices_this_machine_has(iqa, monkeypatch):
    import torch

    devices = _complete(iqa, monkeypatch, "iqa score x --device ")
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    assert devices == ["auto", "cpu", *(["cuda", *cuda] if torch.cuda.is_available() else [])]
    assert _complete(iqa, monkeypatch, "iqa train --device c")[:1] == ["cpu"]


def test_version_names_torch_transformers_and_the_device():
    import torch

    result = run_iqa("--version")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    from iqa_cli import __version__

    assert lines[0] == f"iqa {__version__}"
    versions = f"torch {torch.__version__}, transformers {metadata.version('transformers')}, Python "
    assert lines[1].startswith(versions) and lines[1].endswith(".".join(map(str, sys.version_info[:3])))
    if torch.version.cuda or torch.version.hip:  # what torch itself says about its build
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}"
        assert lines[2] == f"device (--device auto): cuda:0 when a GPU is visible, else cpu (torch built with {built})"
    else:
        assert lines[2] == "device (--device auto): cpu (this torch build has no CUDA)"
    assert len(lines) == 3


def test_version_imports_neither_torch_nor_transformers():
    """`iqa --version` stays well under half a second: torch alone takes 1-2 s to import."""
    code = "import sys; from iqa_cli.cli import main; sys.argv = ['iqa', '--version']\n"
    code += "try:\n    main()\nexcept SystemExit:\n    pass\n"
    code += "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_every_model_option_is_a_flag_of_score_and_serve_and_the_family_ones_of_train():
    from iqa_cli.model_options import COMMON, family_options

    helps = {command: run_iqa(command, "--help").stdout for command in ("score", "serve", "train")}
    for option in (*COMMON, *family_options()):
        assert option.flag in helps["score"] and option.flag in helps["serve"], option.flag
    for option in family_options():
        assert option.flag in helps["train"], option.flag
    assert "--device" in helps["serve"] and "--devices" in helps["serve"]  # both spellings
