"""`midpo config`: what a run will use, and what each key means.

    midpo config show [RECIPE] [key.sub=value ...]   the resolved config as YAML, each key's help as a comment
    midpo config show RECIPE --keys-only             one `key.sub=value` line per key (override syntax)
    midpo config show RECIPE --json                  the resolved config as JSON
    midpo config list                                the shipped recipes and DeepSpeed configs

`show` resolves exactly as every stage does (defaults < recipe < overrides, `midpo.config.load_config`),
so what it prints is what a stage given the same arguments runs with; its YAML reads back to an equal
config. The help text is the fields' metadata in midpo/config.py (`knob`), the one place keys are documented.
A thin stage: it imports neither torch nor DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from midpo.config import (
    DS_CONFIGS_DIR,
    RECIPES_DIR,
    TrainConfig,
    field_help,
    find_recipe,
    load_config,
    render_config,
    render_overrides,
    to_dict,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = sub.add_parser(
        "show", help="print a recipe's resolved config with each key's help",
        description="Print the resolved config (defaults < RECIPE < key.sub=value overrides) as YAML, each key's "
        "help as a comment above it and each section's description as its header. The output is itself a "
        "recipe: save it, edit it, pass it as --config.")
    show.add_argument("recipe", nargs="?", default=None, metavar="RECIPE",
                      help="a recipe file or the name of a shipped one (`midpo config list`); none: the defaults")
    fmt = show.add_mutually_exclusive_group()
    fmt.add_argument("--keys-only", action="store_true",
                     help="one key.sub=value line per key, no help (each line is a valid override)")
    fmt.add_argument("--json", action="store_true", help="the resolved config as JSON, no help")
    sub.add_parser("list", help="the shipped recipes and DeepSpeed configs, one line each",
                   description="The recipes (usable as --config NAME) and DeepSpeed configs (train.ds_config=NAME) "
                   "shipped with midpo, with their one-line descriptions.")


def run(args: Any) -> int:
    if args.action == "list":
        print(listing())
        return 0
    overrides = list(getattr(args, "overrides", []) or [])
    cfg = load_config(args.recipe, overrides)  # a bad recipe or key: ConfigError, one `midpo config: error:` line
    if args.keys_only:
        print("\n".join(render_overrides(cfg)))
    elif args.json:
        print(json.dumps(to_dict(cfg), indent=2))
    else:
        source = f"recipe {find_recipe(args.recipe)}" if args.recipe else "the defaults (no recipe)"
        print(f"# midpo config show: {source}" + (f" + {' '.join(overrides)}" if overrides else ""))
        print("# Override any key on a stage's command line as key.sub=value (e.g. train.lr=1e-5).\n#")
        print(render_config(cfg), end="")
    return 0


# ---------------------------------------------------------------------------------------------
# `midpo config list`


def recipe_description(path: Path) -> str:
    """The first sentence of a recipe's leading `#` comment block (its description by convention)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(x for x in lines if x)
    if not text:
        return "(no description: a recipe describes itself in a leading # comment)"
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text


def ds_config_description(path: Path) -> str:
    """What a DeepSpeed config template does, read from its contents: ZeRO stage, precision, offload."""
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        return f"(unreadable JSON: {e})"
    zero = ds.get("zero_optimization", {})
    precision = next((p for p in ("bf16", "fp16") if ds.get(p, {}).get("enabled") is True), "fp32")
    parts = [f"ZeRO stage {zero.get('stage', 0)}", precision]
    offload = [what for what in ("optimizer", "param")
               if zero.get(f"offload_{what}", {}).get("device") not in (None, "none")]
    if offload:
        parts.append("offloads " + " and ".join(offload) + " to " + zero[f"offload_{offload[0]}"]["device"])
    return ", ".join(parts)


def listing() -> str:
    recipes = sorted(RECIPES_DIR.glob("*.yaml"))
    ds_configs = sorted(DS_CONFIGS_DIR.glob("*.json"))
    width = max((len(p.stem) for p in recipes + ds_configs), default=0)
    out = [f"recipes ({RECIPES_DIR}; use as --config NAME, see `midpo config show NAME`):"]
    out += [f"  {p.stem:<{width}}  {recipe_description(p)}" for p in recipes] or ["  (none)"]
    out += ["", f"DeepSpeed configs ({DS_CONFIGS_DIR}; use as train.ds_config=NAME; train.ds_config: "
            f"{field_help(TrainConfig)['ds_config']}):"]
    out += [f"  {p.stem:<{width}}  {ds_config_description(p)}" for p in ds_configs] or ["  (none)"]
    return "\n".join(out)
