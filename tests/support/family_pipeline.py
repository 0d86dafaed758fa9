"""Stages 2 and 3 of several model families in ONE torchrun launch (each launch costs two interpreters importing
torch, transformers and DeepSpeed): for every recipe given, `midpo ref` then `midpo train` in the same process
group, as `python -m midpo.stages.ref/train` would run them. Used by tests/stages/test_families_pipeline.py.

    torchrun --nproc_per_node 2 tests/support/family_pipeline.py RECIPE...
"""

from __future__ import annotations

import sys


def main(recipes: list[str]) -> int:
    from midpo.config import load_config
    from midpo.runtime import dist as pdist
    from midpo.stages import ref, train

    pdist.init_distributed()
    try:
        for recipe in recipes:
            cfg = load_config(recipe, [])
            ref.main(cfg)
            train.main(cfg)
            if pdist.is_main():
                print(f"family pipeline: done {recipe}", flush=True)
    finally:
        pdist.cleanup()
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
