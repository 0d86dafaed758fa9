"""Where a run's inputs and outputs live: every path resolved once, from the config alone.

    layout = RunLayout.resolve(cfg)        # pure: never looks at what exists on disk
    layout = claim_run(cfg)                # the same, checked against (or recorded in) <run_dir>/config.yaml

Every stage takes its paths from here, so stages run by hand (as Slurm runs them, one process each)
agree with `midpo run`: the policy that `midpo ref` scores as the reference is the one `midpo train`
starts from. The first stage writes the layout into `<run_dir>/config.yaml` (section `layout`); a later
stage whose recipe resolves to other paths is refused, naming each path that differs, instead of
silently reading or writing another run's files.

Resolution rules (docs/architecture.md):
- init_model: `model.policy`, else the embedded default `<run_dir>/synth/model`.
- policy (what preference training starts from): `<run_dir>/sft` when `sft.steps > 0`, else init_model.
- reference: `model.reference`, else the policy.
- tokenizer: `data.tokenizer`, else init_model (the data is tokenized before any SFT).
- inputs: `data.inputs`, else `<run_dir>/synth/pairs.jsonl` (the embedded default).
- sft_data: `<run_dir>/sft_data` when on-policy pairs replace the given ones (`onpolicy.enabled`), else data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from midpo.config import Config, ConfigError

LAYOUT_KEY = "layout"  # the section of <run_dir>/config.yaml that holds it


@dataclass(frozen=True)
class RunLayout:
    run_dir: Path
    synth: Path  # the embedded default's folder (used when data.inputs is empty)
    inputs: tuple[str, ...]  # raw preference files of `midpo prep`
    init_model: Path  # what SFT starts from; the policy itself without SFT
    policy: Path  # the policy's initial weights for preference training
    reference: Path  # pi_ref: scored by `midpo ref`, the online reference, the prior's init
    tokenizer: Path  # the tokenizer the data is built with (and exported with the policy)
    sft_data: Path  # prepared data SFT trains on
    sft: Path  # SFT's output folder
    onpolicy: Path  # `midpo sample`'s output folder
    data: Path  # prepared preference data (stage 1)
    cache: Path  # reference cache (stage 2)
    weights: Path  # TIS-DPO token weights (`midpo weights`)
    checkpoints: Path
    logs: Path
    tensorboard: Path
    export: Path
    config: Path  # <run_dir>/config.yaml

    @classmethod
    def resolve(cls, cfg: Config) -> RunLayout:
        run = Path(cfg.run_dir)
        synth = run / "synth"
        init = Path(cfg.model.policy) if cfg.model.policy else synth / "model"
        policy = run / "sft" if cfg.sft.steps > 0 else init
        return cls(
            run_dir=run, synth=synth,
            inputs=tuple(cfg.data.inputs) if cfg.data.inputs else (str(synth / "pairs.jsonl"),),
            init_model=init, policy=policy,
            reference=Path(cfg.model.reference) if cfg.model.reference else policy,
            tokenizer=Path(cfg.data.tokenizer) if cfg.data.tokenizer else init,
            sft_data=run / "sft_data" if cfg.onpolicy.enabled else run / "data", sft=run / "sft",
            onpolicy=run / "onpolicy", data=run / "data", cache=run / "ref", weights=run / "weights",
            checkpoints=run / "checkpoints", logs=run / "logs", tensorboard=run / "tensorboard",
            export=run / "export", config=run / "config.yaml",
        )

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else str(v))
                for f in dataclasses.fields(self)}

    def differences(self, recorded: dict) -> list[str]:
        """`key: recorded -> now` for every path that differs from a recorded layout."""
        now = self.to_dict()
        return [f"{k}: {recorded.get(k)!r} -> {now[k]!r}" for k in now if recorded.get(k) != now[k]]


def claim_run(cfg: Config) -> RunLayout:
    """The run's layout, checked against `<run_dir>/config.yaml` when an earlier stage wrote one (a
    ConfigError names every path that differs), else recorded there. Call on one process (rank 0) or
    on all: it only reads, or writes atomically the same content."""
    from midpo.config import read_run_config, write_run_config

    layout = RunLayout.resolve(cfg)
    recorded = read_run_config(layout.config)
    if recorded is not None and recorded.get(LAYOUT_KEY):
        diff = layout.differences(recorded[LAYOUT_KEY])
        if diff:
            raise ConfigError(
                f"{layout.config} records this run's paths, and this recipe resolves to others: " + "; ".join(diff)
                + ". Stages of one run must agree on them (one recipe, or `--config " + str(layout.config) + "`); "
                "for another run, set another run_dir.")
    write_run_config(cfg, layout)
    return layout
