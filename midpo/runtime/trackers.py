"""Where metrics go (`train.report_to`): TensorBoard, a JSONL file, Weights & Biases, MLflow. Rank 0 only.

    trackers = Trackers.open(cfg, run_dir=..., logs=..., tensorboard=...)   # rank 0; elsewhere Trackers([])
    trackers.scalars({"loss": 0.69, ...}, step, prefix="train/")
    trackers.close()

Every sink gets the same names (`train/<metric>`, `eval/<metric>`: TRL's metric names under the prefixes TRL's
runs log to W&B), and W&B and MLflow get the resolved config as run parameters (`section.key`). No network is
needed: W&B honours WANDB_MODE (`offline` writes the run under <logs>/wandb), MLflow logs to
MLFLOW_TRACKING_URI, by default the file store <run_dir>/mlruns. A resumed run continues the same W&B / MLflow
run (their ids are kept in <logs>/<sink>_run_id).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from midpo.errors import MidpoError

log = logging.getLogger(__name__)


class TrackerError(MidpoError, RuntimeError):
    """A sink of train.report_to that cannot start; the message says what to install or set."""


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackerError(f"train.report_to lists {extra}, but {module} is not installed: "
                           f"pip install 'midpo[{extra}]'") from None


class _TensorBoard:
    def __init__(self, logdir: Path):
        from midpo.runtime.metrics import TBLogger

        self.tb = TBLogger(logdir)

    def log(self, values: dict[str, float], step: int) -> None:
        self.tb.scalars(values, step)

    def close(self) -> None:
        self.tb.close()


class _Jsonl:
    """<logs>/metrics.jsonl: {"step": N, "<prefix><metric>": value, ...} per call."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, values: dict[str, float], step: int) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")

    def close(self) -> None:
        pass


def _run_id(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class _Wandb:
    def __init__(self, run_dir: Path, logs: Path, params: dict):
        wandb = _require("wandb", "wandb")
        id_file = logs / "wandb_run_id"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "midpo"), name=run_dir.resolve().name,
                                  dir=str(logs), config=params, id=_run_id(id_file), resume="allow")
        except Exception as e:  # no API key and not offline, no network...
            raise TrackerError(f"wandb could not start a run ({type(e).__name__}: {e}); log in (`wandb login`) or "
                               "set WANDB_MODE=offline") from None
        id_file.write_text(self.run.id + "\n")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, run_dir: Path, logs: Path, params: dict):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 keeps its file store only on request; it is what needs no server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        _require("mlflow", "mlflow")
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "midpo")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        id_file = logs / "mlflow_run_id"
        self.run_id = _run_id(id_file)
        if self.run_id is None:
            self.run_id = self.client.create_run(exp_id, run_name=run_dir.resolve().name).info.run_id
            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow's per-batch limit of parameters
                self.client.log_batch(self.run_id, params=items[i:i + 100])
            logs.mkdir(parents=True, exist_ok=True)
            id_file.write_text(self.run_id + "\n")
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        log.info("mlflow: run %s in %s", self.run_id, uri)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """The sinks of train.report_to (none on ranks other than 0)."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    @classmethod
    def open(cls, report_to: list[str], *, run_dir: Path, logs: Path, tensorboard: Path, params: dict) -> Trackers:
        """Rank 0: the sinks of `report_to`; `params`: the resolved config (`section.key` -> value)."""
        sinks: list = []
        for name in dict.fromkeys(report_to):
            if name == "tensorboard":
                sinks.append(_TensorBoard(tensorboard))
            elif name == "jsonl":
                sinks.append(_Jsonl(logs / "metrics.jsonl"))
            elif name == "wandb":
                sinks.append(_Wandb(run_dir, logs, params))
            elif name == "mlflow":
                sinks.append(_Mlflow(run_dir, logs, params))
        return cls(sinks)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        named = {f"{prefix}{k}": float(v) for k, v in values.items()}
        for s in self.sinks:
            s.log(named, step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
        self.sinks = []
