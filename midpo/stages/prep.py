"""Stage 1 (`midpo prep`): raw preference files -> validated, tokenized, sharded Arrow + manifest.

    midpo prep --config RECIPE [key.sub=value ...]          # the run's inputs -> <run_dir>/data
    midpo prep INPUT... --tokenizer DIR --out DIR           # standalone: any files, any output folder
    python -m midpo.stages.prep --config RECIPE             # the same (Slurm: slurm/prep.sbatch)

The work is midpo.data.prepare.prepare (formats, templating, truncation, rejects, shards, manifest); this module
resolves its arguments: inputs (`data.inputs`, else the embedded default's pairs), the tokenizer and the output
folder from the run's layout (midpo.runtime.layout), every DataConfig key also as a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from midpo.config import PAIRINGS, DataConfig, field_help
from midpo.data import formats as fmts
from midpo.data.prepare import prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    helps = field_help(DataConfig)  # the one place keys are documented: their metadata in midpo/config.py
    defaults = DataConfig()
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help=f"data.inputs: {helps['inputs']}; .jsonl/.json/.parquet/.arrow files, globs or "
                        "datasets.save_to_disk folders (default: <run_dir>/synth/pairs.jsonl)")
    parser.add_argument("--config", default=None, help="recipe YAML (a path or a name in recipes/)")
    parser.add_argument("--out", default=None, help="output folder (default: <run_dir>/data)")
    parser.add_argument("--force", action="store_true",
                        help="rebuild even when the output is up to date (same fingerprint, files match their hashes)")
    for f in dataclasses.fields(DataConfig):
        if f.name == "inputs":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        text = f"data.{f.name}: {helps[f.name]} (default: {default})"
        if f.name == "tokenizer":
            text = (f"data.tokenizer: {helps['tokenizer']}; falls back to model.policy, then "
                    "<run_dir>/synth/model")
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text, "dest": f.name}
        if f.name == "format":
            kw["choices"] = ["auto", *fmts.FORMATS]
        elif f.name in ("prompt_overflow", "response_overflow"):
            kw["choices"] = ["drop", "truncate"]
        elif f.name == "pairing":
            kw["choices"] = list(PAIRINGS)
        if f.name == "columns":
            kw["help"] += "; as field=column,field=column"
            parser.add_argument(flag, type=parse_columns, metavar="FIELD=COLUMN,...", **kw)
        elif f.name == "mix":
            kw["help"] += "; on the command line as YAML, e.g. '[{path: a.jsonl, weight: 2}, {path: b.parquet}]'"
            parser.add_argument(flag, type=_yaml, metavar="YAML", **kw)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, int):
            parser.add_argument(flag, type=int, **kw)
        elif isinstance(default, float):
            parser.add_argument(flag, type=float, **kw)
        else:
            parser.add_argument(flag, type=str, **kw)
    parser.epilog = ("Precedence: defaults < --config recipe < data.KEY=VALUE overrides < explicit options. "
                     "Reject reasons: " + ", ".join(fmts.REJECT_REASONS))


def parse_columns(text: str) -> dict[str, str]:
    """`prompt=question,chosen=answer_good` -> {"prompt": "question", "chosen": "answer_good"}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        field, sep, column = part.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise argparse.ArgumentTypeError(f"{part!r} must look like field=column (e.g. prompt=question)")
        out[field.strip()] = column.strip()
    return out


def _yaml(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def resolve(args: Any):
    """(DataConfig, inputs, tokenizer_dir, out_dir, model folders the recipe names) from CLI args, recipe and
    overrides."""
    from midpo.config import load_config
    from midpo.runtime.layout import RunLayout, claim_run

    cfg = load_config(getattr(args, "config", None), list(getattr(args, "overrides", []) or []))
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)
             if f.name != "inputs" and hasattr(args, f.name)}
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **given))  # re-runs DataConfig's validation
    # into the run's own data folder: the run's paths (checked against, or recorded in, <run_dir>/config.yaml);
    # with --out: a standalone use, no run involved
    layout = RunLayout.resolve(cfg) if args.out else claim_run(cfg, needs=("tokenizer",))
    if cfg.data.mix and getattr(args, "inputs", None):
        from midpo.errors import ConfigError

        raise ConfigError("data.mix lists the inputs; do not also pass INPUT paths")
    inputs = list(getattr(args, "inputs", None) or cfg.data.inputs or layout.default_inputs)
    out = args.out or str(layout.data)
    models = tuple(m for m in (cfg.model.policy, cfg.model.reference) if m)
    return cfg.data, inputs, str(layout.tokenizer), out, models


def run(args: Any) -> int:
    data, inputs, tokenizer, out, models = resolve(args)  # a MidpoError: one `midpo prep: error:` line (run_stage)
    manifest = prepare(data, inputs, tokenizer, out, model_dirs=models, force=getattr(args, "force", False))
    s = manifest["splits"]
    print(f"prep: {out}: train {s['train']['rows']} rows, eval {s['eval']['rows']} rows, "
          f"{manifest['rows']['rejected']} rejected, fingerprint {manifest['fingerprint'][:12]}")
    return 0


if __name__ == "__main__":
    from midpo.runtime.launch import stage_cli

    sys.exit(stage_cli("prep", add_arguments, run))
