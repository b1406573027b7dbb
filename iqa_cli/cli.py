"""The `iqa` command line: parses arguments, calls library functions, prints with rich.

No logic lives here. Heavy libraries (torch, transformers) are imported inside the commands so that
`iqa --help` and shell completion stay fast.
"""

import functools
import inspect
import os
import sys
from collections.abc import Callable

import typer
from rich.console import Console

from iqa_cli import __version__, completion, interrupts
from iqa_cli.cli_options import (
    HelpCommand,
    HelpGroup,
    flow_parameter_help,
    flowed,
    with_config_options,
    with_model_options,
)
from iqa_cli.errors import UserError, speak_flags
from iqa_cli.model_options import ModelSpec
from iqa_cli.prepare_config import PrepareConfig
from iqa_cli.prepare_report import prepare_help
from iqa_cli.scoring.config import ScoreConfig
from iqa_cli.serving.config import ServeConfig
from iqa_cli.training.config import TrainConfig

PROG, COMPLETE_VAR = completion.PROG, completion.COMPLETE_VAR

app = typer.Typer(
    name=PROG,
    cls=HelpGroup,
    help=flowed(
        """Score image quality with multimodal LLMs (DeQA-Score, Q-Align, Q-Scorer, GRPO-trained reasoning models).

        \b
        Start with `iqa demo` (a CPU, two minutes, no download), or score a folder:
          iqa score ./photos --out scores.parquet
        `iqa COMMAND -h` explains each command, with examples."""
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",  # option panels; help texts are `flowed` (brackets escaped)
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,  # its --install-completion takes no shell name: ours below does
)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False)


def _show_table(table) -> None:
    """A rich table on stdout; piped or redirected, without the spaces that pad its cells at the ends of lines."""
    if out_console.is_terminal:
        out_console.print(table)
        return
    with out_console.capture() as captured:
        out_console.print(table)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))


def _say(text: str) -> None:
    """A message line on stderr, printed literally (paths and image names may hold rich markup brackets)."""
    err_console.print(text, markup=False)


def command(*args, examples: str = "", panels: dict | None = None, **kwargs) -> Callable[[Callable], Callable]:
    """`app.command` whose help reads as prose with `examples` at its end, and whose run turns SIGINT/SIGTERM/SIGHUP,
    at any moment, into one line on stderr and the exit code a shell reports for that signal (128 + its number); a
    command's own interruption (score's, train's) says what was saved and how to resume."""

    def decorate(function: Callable) -> Callable:
        flow_parameter_help(function, panels)
        kwargs["help"] = flowed(kwargs.get("help") or function.__doc__)
        if examples:
            lines = "\n".join(f"$ {line}" for line in inspect.cleandoc(examples).splitlines())
            kwargs["epilog"] = flowed(f"\b\nExamples:\n{lines}")

        @functools.wraps(function)
        def run(*a, **k):
            restore = interrupts.install()
            try:
                return function(*a, **k)
            except interrupts.Interrupted as exc:
                if getattr(exc, "is_main", os.environ.get("RANK", "0") == "0"):  # under torchrun, rank 0 speaks
                    _say(str(exc))
                raise typer.Exit(exc.exit_code) from None
            except Exception as exc:  # an output place that filled up or turned read-only during the work (an
                # OSError, or a library's own error that says so: safetensors' SafetensorError)
                from iqa_cli.paths import write_error

                error = write_error(exc, _output_place(k))
                if error is None:
                    raise
                raise error from None
            finally:
                restore()

        return app.command(*args, cls=HelpCommand, **kwargs)(run)

    return decorate


def _output_place(arguments: dict) -> str | None:
    """The output a command was given (its --out, --data-dir, --json or folder), for a failed write's message."""
    options = arguments.get("options") or {}
    for value in (options.get("out"), *(arguments.get(k) for k in ("out", "data_dir", "directory", "json_out"))):
        if value:
            return str(value)
    return None


def _version_callback(value: bool) -> None:
    if value:
        from iqa_cli.about import describe_runtime

        out_console.print(f"iqa {__version__}\n{describe_runtime()}", markup=False, soft_wrap=True)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the version, the torch and transformers versions and the device, and exit.",
        callback=_version_callback, is_eager=True,
    ),
    install_completion: str | None = typer.Option(
        None, "--install-completion", metavar="[SHELL]", expose_value=False,
        callback=completion.install_callback, is_eager=True,
        help="Install tab completion for SHELL (bash, zsh, fish, powershell) or, without one, for this shell.",
    ),
    show_completion: str | None = typer.Option(
        None, "--show-completion", metavar="[SHELL]", expose_value=False,
        callback=completion.show_callback, is_eager=True,
        help="Print the completion script for SHELL (or this shell), to install it by hand.",
    ),
) -> None:  # fmt: skip
    pass


flow_parameter_help(_root)


# --- prepare -------------------------------------------------------------------------------------
# `iqa prepare`: the work lives in iqa_cli/prepare.py, what it prints in iqa_cli/prepare_report.py.
def _print_prepare_summary(summary: dict) -> None:
    from iqa_cli.prepare_report import headline, label_table, reference_lines

    out_console.print(headline(summary), markup=False, soft_wrap=True)
    _show_table(label_table(summary))
    out_console.print(reference_lines(summary), markup=False, soft_wrap=True)


@command(
    help=prepare_help(),
    examples="""
    iqa prepare koniq --csv koniq10k_scores_and_distributions.csv --images img/
    iqa prepare custom --csv my.csv --images pics --image-col file --mos-col mos
    """,
    panels={"Output": ("json_output", "quiet")},
)
@with_config_options(PrepareConfig, into="options")
def prepare(
    dataset: str = typer.Argument(
        ...,
        metavar="DATASET",
        autocompletion=completion.dataset_presets,
        help="Dataset preset (see above) or 'custom'.",
    ),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No warnings on stderr."),
    options: dict | None = None,  # the flags `PrepareConfig` declares
) -> None:
    import json

    from iqa_cli.prepare import prepare_dataset

    config = PrepareConfig.from_options(dataset, **options)
    result = prepare_dataset(config)
    if not quiet:
        for note in result.notes:
            _say(f"warning: {note}")
    if json_output:
        print(json.dumps(result.summary, indent=2))
    else:
        _print_prepare_summary(result.summary)


# --- train ---------------------------------------------------------------------------------------
# `iqa train`'s flags are its config's fields (`iqa_cli.training.config`: help, default, metavar, panel).
@command(
    examples="""
    iqa train --datasets koniq --out runs/koniq --lora
    iqa train --datasets koniq,spaq --out runs/mix --epochs 2 --save-minutes 10
    torchrun --nproc-per-node 4 $(which iqa) train --datasets koniq --out runs/k
    """
)
@with_model_options(names=(), into="family")
@with_config_options(TrainConfig, into="options")
def train(options: dict | None = None, family: ModelSpec | None = None) -> None:  # flags: the decorators
    """Fine-tune a multimodal LLM on prepared datasets, into a folder that `iqa score --model` loads.

    mPLUG-Owl2, Qwen-VL, LLaVA-OneVision or Idefics3, with the DeQA-Score, Q-Align or Q-Scorer objective;
    or a reasoning model (Qwen2.5-VL) with GRPO (--method grpo, through TRL).

    Running the same command again resumes an interrupted run from its last checkpoint. Under torchrun,
    --lora runs and GRPO use DDP, full tuning of the other methods FSDP2; --batch-size stays global.
    """
    from iqa_cli.training import train as run_training

    out, quiet = options["out"], options["quiet"]
    config = TrainConfig.from_options(**options, **family.family)  # the family's own: Qwen-VL's pixel budget
    result = run_training(config, console=err_console)  # TrainInterrupted: `command` prints its message
    if not result.is_main or quiet:
        return
    if result.already_complete:
        _say(
            f"{out} holds a finished run of this configuration ({result.steps} steps); nothing to do "
            "(--overwrite retrains)"
        )
        return
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    _say(
        f"trained {result.method}: {result.steps} steps{resumed} in {result.seconds:.1f} s, "
        f"{result.samples_per_second:.2f} samples/s, {result.images_per_second:.2f} images/s -> {out}"
    )
    if result.merged is not None:
        _say(f"merged full checkpoint -> {result.merged}")


# --- score ---------------------------------------------------------------------------------------
@command(
    examples="""
    iqa score ./photos --out scores.parquet
    iqa score iqa-demo/data/images --out scores/ --model iqa-demo/run
    iqa score 'shards/{00000..00099}.tar' --out scores/ --keep caption
    iqa score --from list.csv --out scores.csv --batch-size 32
    """
)
@with_model_options()
@with_config_options(ScoreConfig, into="options")
def score(options: dict | None = None, model: ModelSpec | None = None) -> None:  # flags: the decorators
    """Score images into a Parquet file: one row per image with score, std, level probabilities and errors.

    An interrupted run (Ctrl-C, kill, crash) resumes when the same command is run again; finished images
    are kept in OUT.parts/ until the output is written. Under torchrun, ranks split the images.
    """
    from iqa_cli.scoring.config import ScoreInterrupted
    from iqa_cli.scoring.driver import score_images

    config = ScoreConfig(**options, model=model)
    out, quiet = options["out"], config.quiet
    if not config.inputs and config.from_file is None:
        raise UserError("no inputs: give image folders or files, or --from FILE")
    try:
        summary = score_images(config, console=err_console)
    except ScoreInterrupted as exc:
        exc.message += "; run the same command to resume"
        raise
    if not summary.is_main:
        return
    if not quiet:
        for note in summary.warnings:
            _say(f"warning: {note}")
        if summary.already_complete:
            _say(f"{out} is complete ({summary.total} rows); nothing to do (--overwrite recomputes it)")
            return
        resumed = f", {summary.resumed} rows from the interrupted run" if summary.resumed else ""
        frames = ""
        if summary.frame_rows:
            frames = f", {summary.frame_rows - summary.frames_failed} of {summary.frame_rows} sampled frames"
        unit = "rows" if " " in summary.noun or summary.frame_rows else summary.noun
        rate = f"{summary.images_per_second:.1f} {unit}/s"
        _say(
            f"scored {summary.inputs - summary.inputs_failed} of {summary.inputs} {summary.noun} "
            f"({summary.inputs_failed} failed{resumed}){frames} in {summary.seconds:.1f} s, {rate} -> {out}"
        )
        for image, reason in summary.first_errors:
            _say(f"  failed: {image}: {reason}")
        if summary.unit_errors:
            _say(f"{len(summary.unit_errors)} shard(s) could not be read to the end (their rows before it are kept):")
            for unit, reason in summary.unit_errors[:20]:
                _say(f"  broken shard: {unit}: {reason}")
    if summary.total and summary.failed == summary.total:
        _say(f"error: none of the {summary.inputs} {summary.noun} could be read")
        raise typer.Exit(1)


# --- eval ----------------------------------------------------------------------------------------
# `iqa eval`: the work lives in iqa_cli/evaluate.py.
@command(
    "eval",
    examples="""
    iqa eval scores.parquet --gt iqa-data/koniq.parquet
    iqa eval scores/ --gt iqa-data/koniq.parquet --json m.json --plot m.png
    """,
    panels={"Input": ("gt", "split", "column"), "Output": ("json_out", "plot", "quiet")},
)
def eval_(
    predictions: str = typer.Argument(
        ..., metavar="FILE", help="Predictions written by `iqa score` (Parquet; CSV/JSONL also read)."
    ),
    gt: str | None = typer.Option(
        None,
        "--gt",
        metavar="FILE",
        help="Ground truth: a meta from `iqa prepare` (Parquet) or a CSV with image,mos[,std,dataset].",
    ),
    json_out: str | None = typer.Option(
        None,
        "--json",
        metavar="FILE",
        help="Also write the numbers to this JSON file ('-': to stdout, instead of the tables).",
    ),
    plot: str | None = typer.Option(
        None,
        "--plot",
        metavar="FILE",
        help="Draw predicted vs human scores per dataset to this image (PNG unless the suffix says .pdf, .svg, ...; "
        "needs matplotlib).",
    ),
    split: str | None = typer.Option(
        None,
        "--split",
        metavar="SPLIT",
        autocompletion=completion.splits,
        help="test, train or all [default: test if the ground truth has test rows, else all].",
    ),
    column: str = typer.Option(
        "score",
        "--column",
        metavar="COLUMN",
        autocompletion=completion.prediction_columns,
        help="Prediction column to evaluate: score or score_reg.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No notes on stderr (unmatched rows, files written)."),
) -> None:
    """Compare predicted scores with human opinion scores: PLCC, SRCC, KRCC, RMSE, KL/JS/W2."""
    from pathlib import Path

    from iqa_cli.eval_report import check_outputs, plot_report, report_messages, report_tables
    from iqa_cli.evaluate import evaluate

    plot_path = check_outputs(json_out, plot)  # before any work, so no table precedes an error
    report = evaluate(Path(predictions), Path(gt) if gt else None, split=split, column=column)
    say = (lambda line: None) if quiet else _say
    for line in report_messages(report):
        say(line)
    if json_out == "-":
        print(report.to_json(), end="")
    else:
        for table in report_tables(report):
            _show_table(table)
        if json_out is not None:
            report.write_json(Path(json_out))
            say(f"wrote {json_out}")
    if plot_path is not None:
        plot_report(report, plot_path)
        say(f"wrote {plot_path}")


# --- demo ----------------------------------------------------------------------------------------
# `iqa demo`: the work lives in iqa_cli/demo.py.
@command(
    examples="""
    iqa demo
    iqa demo /tmp/iqa-demo
    """
)
def demo(
    directory: str = typer.Argument("iqa-demo", metavar="DIR", help="New or empty folder for the demo's files."),
) -> None:
    """Run the whole loop on a CPU in a few minutes, with no download.

    Writes synthetic data and a tiny random-init model, then runs prepare -> train -> score -> eval on them,
    printing each command it runs. Run it again in the same folder to go on where it stopped."""
    from pathlib import Path

    from iqa_cli.demo import run_demo

    run_demo(Path(directory), say=lambda line: out_console.print(line, markup=False, soft_wrap=True))


def entry() -> None:
    """The `iqa` console script and `python -m iqa_cli`: `main`, then the process ends without the interpreter's
    teardown (`iqa_cli.process.run_then_exit`)."""
    from iqa_cli.process import run_then_exit

    run_then_exit(main)


# --- serve ---------------------------------------------------------------------------------------
# `iqa serve`: the work lives in iqa_cli/serving/.
@command(
    examples="""
    iqa serve --model iqa-demo/run --device cpu
    iqa serve --devices 0,1 --token SECRET --host 0.0.0.0
    """,
)
@with_model_options()
@with_config_options(ServeConfig, into="options")
def serve(options: dict | None = None, model: ModelSpec | None = None) -> None:  # flags: the decorators
    """Serve a model over HTTP: POST /score (JSON), POST / (Flow-GRPO's pickle protocol), GET /health, /metrics.

    One worker process per device holds one model; the images (and videos, sampled as --fps/--frames say) of
    concurrent requests are batched together and a score never depends on which requests shared its batch.
    SIGTERM drains in-flight requests, then exits 0.
    """
    try:
        from iqa_cli.serving.server import ServeError
        from iqa_cli.serving.server import serve as run_server
    except ImportError as err:
        raise UserError(
            f"iqa serve needs the serve extra ({err.name} is missing): pip install 'iqa-cli[serve]'"
        ) from None
    try:
        run_server(ServeConfig(**options, model=model), say=_say)
    except ServeError as exc:
        _say(f"error: {exc}")
        raise typer.Exit(exc.exit_code) from None


def _fail(error: UserError) -> None:
    message = " ".join(str(error).split())
    _say(f"error: {message}")
    sys.exit(error.exit_code)


def main() -> None:
    """Entry point: user mistakes (ours and the command line's) become one line on stderr and exit code 2."""
    from typer._click.exceptions import ClickException, NoArgsIsHelpError  # Typer's own copy of click

    from iqa_cli.process import configure_process

    configure_process()  # before any command imports torch
    spoken = speak_flags()  # the library's errors name this command line's flags (until main returns)
    if COMPLETE_VAR in os.environ:  # the shell asks for completions: Typer's classes answer (add_completion=False)
        completion.answer_the_shell()
    try:
        code = app(
            args=completion.with_optional_shell(sys.argv[1:]),
            prog_name=PROG,
            complete_var=COMPLETE_VAR,
            standalone_mode=False,
        )
    except UserError as exc:
        _fail(exc)
    except NoArgsIsHelpError as exc:  # `iqa` alone: its help is printed
        sys.exit(exc.exit_code)
    except ClickException as exc:  # an unknown option, a missing value, a value of the wrong type
        where = getattr(getattr(exc, "ctx", None), "command_path", PROG)
        error = UserError(f"{exc.format_message()} (see `{where} -h`)")
        error.exit_code = exc.exit_code
        _fail(error)
    except KeyboardInterrupt:
        _say("interrupted")
        sys.exit(130)
    finally:
        speak_flags(spoken)
    sys.exit(code if isinstance(code, int) else 0)
