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
else is a bug and keeps its traceback. `midpo.runtime.launch.run_stage` is that one place, for `midpo` and for
the stage modules that torchrun runs (`midpo.runtime.launch.stage_cli`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from midpo.config import split_overrides
from midpo.runtime.launch import add_config_epilog, run_stage

# One registry of subcommands: name -> (module, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("midpo.demo.synthetic", "build the embedded tiny default: verifiable task data, tokenizer, tiny Llama"),
    "prep": ("midpo.stages.prep", "stage 1: raw preference files -> validated, tokenized, sharded Arrow + manifest"),
    "sft": ("midpo.demo.sft", "a minimal supervised warm start on the chosen responses (the tiny default needs it)"),
    "sample": ("midpo.demo.onpolicy", "on-policy pairs: the model's own answers, labelled by the task checker"),
    "ref": ("midpo.stages.ref", "stage 2: offline per-token reference log-prob cache (resumable, multi-process)"),
    "weights": ("midpo.stages.weights", "TIS-DPO per-token weights from a forward and a reverse DPO model"),
    "train": ("midpo.stages.train", "stage 3: DeepSpeed ZeRO-3 training from the reference cache (auto-resume, export)"),
    "export": ("midpo.stages.export", "a consolidated Hugging Face folder from a ZeRO-3 checkpoint (default: latest)"),
    "iterate": ("midpo.demo.iterate", "rounds of on-policy preference training: sample, label, select, prep, ref, train, "
                "export (DICE; iterative DPO)"),
    "run": ("midpo.demo.run", "the whole pipeline on one machine (synth, prep, sft, ref, train, eval) + summary"),
    "plan": ("midpo.stages.plan", "will a recipe fit, how fast, what to change: memory per device and step time, "
             "as written and the best settings"),
    "config": ("midpo.stages.config_cmd", "show a recipe's resolved config with each key's help; list the shipped recipes"),
}


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
