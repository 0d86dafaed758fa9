"""Where a run's inputs and outputs live: every path resolved once, from the config alone.

    layout = RunLayout.resolve(cfg)        # pure: never looks at what exists on disk
    layout = claim_run(cfg)                # the same, checked against (or recorded in) <run_dir>/config.yaml

Every stage takes its paths from here, so stages run by hand (as Slurm runs them, one process each)
agree with `midpo run`: the policy that `midpo ref` scores as the reference is the one `midpo train`
starts from. The first stage writes the layout into `<run_dir>/config.yaml` (section `layout`; paths inside
the run folder as `<run_dir>/...`, so a moved run keeps it); a later stage whose recipe resolves to other
paths is refused, naming each path that differs, instead of silently reading or writing another run's files.

Resolution rules (docs/architecture.md):
- init_model: `model.policy`, else the embedded default `<run_dir>/synth/model`.
- policy (what preference training starts from): `<run_dir>/sft` when `sft.steps > 0`, else init_model.
- reference: `model.reference`, else the policy.
- tokenizer: `data.tokenizer`, else init_model (the data is tokenized before any SFT).
- sft_data: `<run_dir>/sft_data` when on-policy pairs replace the given ones (`onpolicy.enabled`), else data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from midpo.config import Config, ConfigError
from midpo.errors import MidpoError, MissingPathError
from midpo.runtime.files import update_saved_config

LAYOUT_KEY = "layout"  # the section of <run_dir>/config.yaml that holds it
RUN_DIR_TOKEN = Path("<run_dir>")  # how a recorded layout writes paths inside the run folder


@dataclass(frozen=True)
class RunLayout:
    run_dir: Path
    synth: Path  # the embedded default's folder (used when data.inputs is empty)
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

    @property
    def default_inputs(self) -> list[str]:
        """`midpo prep`'s inputs when data.inputs is empty: the embedded default's pairs."""
        return [str(self.synth / "pairs.jsonl")]

    @classmethod
    def resolve(cls, cfg: Config) -> RunLayout:
        run = Path(cfg.run_dir)
        synth = run / "synth"
        init = Path(cfg.model.policy) if cfg.model.policy else synth / "model"
        policy = run / "sft" if cfg.sft.steps > 0 else init
        return cls(
            run_dir=run, synth=synth,
            init_model=init, policy=policy,
            reference=Path(cfg.model.reference) if cfg.model.reference else policy,
            tokenizer=Path(cfg.data.tokenizer) if cfg.data.tokenizer else init,
            sft_data=run / "sft_data" if cfg.onpolicy.enabled else run / "data", sft=run / "sft",
            onpolicy=run / "onpolicy", data=run / "data", cache=run / "ref", weights=run / "weights",
            checkpoints=run / "checkpoints", logs=run / "logs", tensorboard=run / "tensorboard",
            export=run / "export", config=run / "config.yaml",
        )

    def to_dict(self) -> dict:
        """Paths as recorded in config.yaml: those inside the run folder relative to it (`<run_dir>/sft`), so a
        moved or copied run folder keeps its layout; the others (models, inputs) as given."""
        def rel(v) -> str:
            p = Path(v)
            try:
                return str(RUN_DIR_TOKEN / p.relative_to(self.run_dir))
            except ValueError:
                return str(v)

        return {f.name: rel(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "run_dir"}

    def differences(self, recorded: dict) -> list[str]:
        """`key: recorded -> now` for every path that differs from a recorded layout."""
        now = self.to_dict()
        return [f"{k}: {recorded.get(k)!r} -> {now[k]!r}" for k in now if recorded.get(k) != now[k]]


MODEL_ROLES = ("init_model", "policy", "reference", "tokenizer")


def origin(cfg: Config, role: str) -> str:
    """Where the path of a model role comes from, for error messages."""
    key = {"init_model": "model.policy", "policy": "model.policy", "reference": "model.reference",
           "tokenizer": "data.tokenizer"}[role]
    given = {"model.policy": cfg.model.policy, "model.reference": cfg.model.reference,
             "data.tokenizer": cfg.data.tokenizer}[key]
    if given:
        return f"{key}={given}"
    if role == "policy" and cfg.sft.steps > 0:
        return "the SFT output (sft.steps > 0): run `midpo sft` first"
    if role == "reference":
        return "model.reference is not set, so the policy's initial weights: " + origin(cfg, "policy")
    if role == "tokenizer":
        return "data.tokenizer is not set, so the initial model's: " + origin(cfg, "init_model")
    return ("model.policy is not set, so the embedded default's model: run `midpo synth` first, or set "
            "model.policy to a Hugging Face folder")


def check_models(layout: RunLayout, cfg: Config, needs: tuple[str, ...]) -> None:
    """Refuse (MissingPathError) when a model folder a stage reads is missing, saying where its path came from."""
    for role in needs:
        path = getattr(layout, role)
        if not (path / "config.json").is_file() and not (role == "tokenizer" and path.is_dir()):
            raise MissingPathError(f"the {role.replace('_', ' ')} folder {path} does not exist or holds no "
                                   f"config.json ({origin(cfg, role)})")


def claim_run(cfg: Config, needs: tuple[str, ...] = ()) -> RunLayout:
    """The run's layout, checked against `<run_dir>/config.yaml` when an earlier stage wrote one (a
    ConfigError names every path that differs), else recorded there with this config, once the model folders
    the stage `needs` (MODEL_ROLES) exist: a stage refused at start leaves no record. An existing record's
    settings are left as they are (record_settings updates them). One process (rank 0):
    `claim_run_on_all_ranks` under a process group."""
    layout = RunLayout.resolve(cfg)
    check_models(layout, cfg, needs)
    recorded = recorded_layout(layout.config)
    if recorded:
        diff = layout.differences(recorded)
        if diff:
            raise ConfigError(
                f"{layout.config} records this run's paths, and this recipe resolves to others: " + "; ".join(diff)
                + ". Stages of one run must agree on them (one recipe, or `--config " + str(layout.config) + "`); "
                "for another run, set another run_dir. To change them for this run on purpose, delete the `layout` "
                "section of that file (outputs built from the old paths are then rebuilt or refused by their "
                "fingerprints).")
    else:  # the first stage of this run (or a run folder from before layouts were recorded)
        update_saved_config(cfg, layout.config, {LAYOUT_KEY: layout.to_dict()})
    return layout


def record_settings(cfg: Config, layout: RunLayout, records: dict | None = None) -> None:
    """Rewrite <run_dir>/config.yaml's settings with `cfg` (a warning names every changed key; untouched when equal),
    its layout kept, `records` (other RECORD_SECTIONS: training's `auto` picks) beside them: for a stage that has
    checked that this config may continue this run (training, after its resume check), so the file never says what
    did not run."""
    update_saved_config(cfg, layout.config, {LAYOUT_KEY: layout.to_dict(), **(records or {})})


def claim_run_on_all_ranks(cfg: Config, needs: tuple[str, ...] = ()) -> RunLayout:
    """Collective `claim_run`: rank 0 claims, every rank gets the layout or raises the same error (none is left
    waiting in a collective)."""
    from midpo.runtime import dist as pdist

    result: RunLayout | Exception | None = None
    if pdist.is_main():
        try:
            result = claim_run(cfg, needs)
        except MidpoError as e:
            result = e
    result = pdist.broadcast_object(result)
    if isinstance(result, Exception):
        raise result
    return result


def recorded_layout(config_path: str | Path) -> dict | None:
    """The layout section of a run's config.yaml, or None (no file yet, or one written before layouts)."""
    import yaml

    try:
        saved = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return None
    except yaml.YAMLError as e:
        raise ConfigError(f"{config_path}: unreadable ({e}); it records this run's settings and paths") from None
    return saved.get(LAYOUT_KEY) if isinstance(saved, dict) else None
