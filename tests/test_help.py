"""What a newcomer reads first: `iqa --help`, each command's `--help`, `--version`, and shell completion values."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata

import pytest

from tests.conftest import run_iqa

COMMANDS = ("prepare", "train", "score", "eval", "demo", "serve")


def _rows(text: str) -> list[str]:
    """The rows of rich's help panels, without their borders."""
    return [line.strip("│ ").rstrip() for line in text.splitlines() if line.startswith("│")]


def test_root_help_lists_commands_in_the_order_a_user_meets_them_with_whole_summaries(iqa):
    code, out, _ = iqa("--help")
    assert code == 0
    commands = out.split("─ Commands ─")[1]
    listed = [m.group(1) for m in re.finditer(r"^│ (\w+)  ", commands, re.M)]
    assert listed == list(COMMANDS)
    summaries = " ".join(_rows(commands))
    for command in COMMANDS:  # each summary is a whole sentence: nothing cut with "..."
        summary = summaries.split(f"{command}  ", 1)[1].split(".")[0]
        assert "..." not in summary and len(summary) > 20, summary
    assert "--install-completion" in out and "iqa demo" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_placeholders_shows_no_python_type_and_ends_with_examples(iqa, command):
    code, out, _ = iqa(command, "-h")
    assert code == 0
    assert iqa(command, "--help")[1] == out  # -h is --help
    assert not re.search(r"<(bool|str|int|float|list\[\w+\]|path)>", out), re.findall(r"<[^>\s]*>", out)
    usage = out.split("Usage: ")[1].splitlines()[0]
    assert "{" not in usage, usage  # `iqa eval FILE`, not Typer's `{FILE}`
    for row in _rows(out):  # "--out -o FILE help", "--lora help": a value's placeholder is a word in capitals
        found = re.match(r"\*?\s*(--[\w-]+)(?:,--[\w-]+)?(?:\s+-\w)?(?:\s+--no-[\w-]+)?\s+(\S+)", row)
        if found and found.group(2).isupper():
            continue
        assert not found or not found.group(2).startswith("<"), row
    examples = out.split("Examples:")[1].split()
    assert examples[:3] in (["$", "iqa", command], ["$", "torchrun", "--nproc-per-node"]), examples[:3]


def test_every_default_is_shown_and_explained(iqa):
    """Each option that is not off by default says what it is when not given: its value, or what that means."""
    import typer

    from iqa_cli.cli import app

    group = typer.main.get_command(app)
    missing = []
    for name, command in group.commands.items():
        for param in command.params:
            if param.param_type_name != "option" or param.is_flag or param.required:
                continue
            told = "[default:" in (param.help or "") or (param.default is not None and param.show_default)
            if not told and param.name not in UNSET_IS_OFF:
                missing.append(f"iqa {name} {param.opts[0]}")
    assert not missing, f"no default shown: {missing}"


# Options whose absence simply leaves the feature off (no file written, no filter, no base, no token).
UNSET_IS_OFF = {"from_file", "from_column", "root", "keep", "revision", "gt", "json_out", "plot", "split", "token",
                "lora_targets", "data_weights", "images", "csv", "level_names", "name", "out", "data_dir", "image_col",
                "mos_col"}  # fmt: skip


def test_defaults_are_not_split_and_piped_help_is_plain_text():
    result = run_iqa("score", "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0 and "\x1b[" not in result.stdout  # no colour codes when piped
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "[default: zhiyuanyou/DeQA-Score-Mix3]" in result.stdout
    assert "[default: one per core, at most 8]" in " ".join(" ".join(_rows(result.stdout)).split())


@pytest.mark.parametrize("command", ["train", "serve", "prepare", "eval", "demo"])
def test_no_command_cuts_a_flag_or_a_default_in_an_80_column_terminal(command):
    """Rich cuts what cannot wrap with an ellipsis: a long --x/--no-x pair once left the help column 20
    characters wide and cut `iqa train`'s flags and its model default."""
    result = run_iqa(command, "--help", env={"COLUMNS": "80"})
    assert result.returncode == 0 and "\u2026" not in result.stdout, result.stdout


def test_install_completion_installs_the_named_shells_completion(tmp_path):
    env = {"HOME": str(tmp_path), "SHELL": "/bin/bash"}
    result = run_iqa("--install-completion", "zsh", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"zsh completion installed in {tmp_path / '.zfunc' / '_iqa'}")
    assert "_IQA_COMPLETE" in (tmp_path / ".zfunc" / "_iqa").read_text() and not (tmp_path / ".bashrc").exists()
    result = run_iqa("--install-completion", "tcsh", env=env)
    assert result.returncode == 2 and result.stderr.startswith("error: unknown shell 'tcsh': use one of bash, zsh")
    result = run_iqa("--show-completion", "fish", env=env)
    assert result.returncode == 0 and "complete --command iqa" in result.stdout


def test_command_line_mistakes_are_one_line_naming_the_help(iqa):
    code, _, err = iqa("score", "--batch-siz", "4")
    assert code == 2 and err == (
        "error: No such option: --batch-siz (Possible options: --batch-size) (see `iqa score -h`)\n"
    )
    code, _, err = iqa("eval")
    assert code == 2 and err == "error: Missing argument 'FILE'. (see `iqa eval -h`)\n"


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
