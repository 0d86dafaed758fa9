"""`midpo` console script: one subcommand per stage.

    midpo synth --out DIR                       # the embedded tiny default (data, tokenizer, model)
    midpo prep INPUT... --tokenizer DIR --out DIR
    midpo prep --config tiny                    # inputs and settings from a recipe
    midpo <cmd> --config RECIPE key.sub=value   # any `key.sub=value` token overrides the recipe
    midpo config show RECIPE [key.sub=value]    # the resolved config, each key with its help

Each stage module provides `add_arguments(parser)` and `run(args) -> int`; this file only routes,
so `midpo --help` stays fast (stage modules are imported on use).

Errors: a user error (`midpo.errors.MidpoError`: bad recipe, missing or foreign input, output in the way) is
printed as one line, `midpo <stage>: error: <message>`, exit code 1; usage errors exit 2 (argparse). Anything
else is a bug and keeps its traceback. `run_stage` is that one place, for `midpo` and for the stage modules
that torchrun runs (`midpo.stages.ref.cli`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable

from midpo.errors import MidpoError

# One registry of subcommands: name -> (module, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("midpo.demo.synthetic", "build the embedded tiny default: verifiable task data, tokenizer, tiny Llama"),
    "prep": ("midpo.stages.prep", "stage 1: raw preference files -> validated, tokenized, sharded Arrow + manifest"),
    "sft": ("midpo.demo.sft", "a minimal supervised warm start on the chosen responses (the tiny default needs it)"),
    "sample": ("midpo.demo.onpolicy", "on-policy pairs: the model's own answers, labelled by the task checker"),
    "ref": ("midpo.stages.ref", "stage 2: offline per-token reference log-prob cache (resumable, multi-process)"),
    "weights": ("midpo.stages.weights", "TIS-DPO per-token weights from a forward and a reverse DPO model"),
    "train": ("midpo.stages.train", "stage 3: DeepSpeed ZeRO-3 training from the reference cache (auto-resume, export)"),
    "export": ("midpo.runtime.export", "a consolidated Hugging Face folder from a ZeRO-3 checkpoint (default: latest)"),
    "run": ("midpo.demo.run", "the whole pipeline on one machine (synth, prep, sft, ref, train, eval) + summary"),
    "config": ("midpo.stages.config_cmd", "show a recipe's resolved config with each key's help; list the shipped recipes"),
}

# Appended to every stage's --help: the ~100 config keys are too many for flags, so each stage points to where they
# are documented (`midpo config show`, from the fields' help in midpo/config.py) and to the override syntax.
CONFIG_EPILOG = (
    "Config keys: `midpo config show RECIPE` prints the resolved config with each key's help (`midpo config list`: "
    "the shipped recipes). Override any key on the command line as key.sub=value, e.g. train.lr=1e-5 "
    "loss.prior=simpo; precedence: defaults < recipe < overrides."
)

# `section.key=value`, or one of the top-level keys (`run_dir=...`, `seed=...`).
_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+|run_dir|seed)=")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Pull `key.sub=value` tokens out of argv (they may appear anywhere after the subcommand)."""
    rest, overrides = [], []
    for tok in argv:
        (overrides if _OVERRIDE.match(tok) else rest).append(tok)
    return rest, overrides


def stage_name(module: str) -> str:
    """The subcommand that runs `module` (`midpo.stages.train` -> `train`), or the module's own name."""
    return next((name for name, (mod, _) in COMMANDS.items() if mod == module), module)


def run_stage(stage: str, run: Callable[[], int | None]) -> int:
    """Run a stage: its exit code, or 1 after printing a user error as one line (no traceback). Under torchrun
    every rank that fails prints its line, prefixed with its rank: an error seen on one rank only is not lost."""
    try:
        return int(run() or 0)
    except MidpoError as e:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        where = f"[rank {os.environ.get('RANK', '?')}] " if world > 1 else ""
        # the whole line in one write (print() writes the text and the newline apart): ranks sharing a stderr
        # pipe must not interleave mid-line
        sys.stderr.write(f"midpo {stage}: error: {where}{e}\n")
        sys.stderr.flush()
        return 1


class _ParagraphsFormatter(argparse.HelpFormatter):
    """argparse's default formatter, except that blank lines in a description or epilog separate paragraphs (the
    default joins them all into one)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # super() with its arguments: the zero-argument form does not work inside a generator expression
        return "\n\n".join(super(_ParagraphsFormatter, self)._fill_text(p, width, indent)
                             for p in re.split(r"\n\s*\n", text.strip()))


def add_config_epilog(parser: argparse.ArgumentParser) -> None:
    """Point a stage's --help to `midpo config show` and the override syntax (after the stage's own epilog)."""
    parser.epilog = f"{parser.epilog}\n\n{CONFIG_EPILOG}" if parser.epilog else CONFIG_EPILOG
    parser.formatter_class = _ParagraphsFormatter


def build_parser(load_commands: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="midpo",
        description="midpo: preference alignment with the generalized MI-DPO loss. "
        "Every subcommand accepts `key.sub=value` overrides of the recipe.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if load_commands is None or name in load_commands:
            importlib.import_module(module).add_arguments(p)
            if name != "config":
                add_config_epilog(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = split_overrides(argv)
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser([command] if command else [])
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args.overrides = overrides
    return run_stage(args.command, lambda: importlib.import_module(COMMANDS[args.command][0]).run(args))


if __name__ == "__main__":
    sys.exit(main())
