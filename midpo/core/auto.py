"""`auto` training settings chosen from the plan (pure: the attention kernel, the plan's memory and the device's
free memory in; a choice and its reason out). runtime.planning.resolve_auto builds the inputs from a recipe and
the trainer probes the device; `midpo plan` calls the same functions for the hardware it is given.

- layout (`train.layout=auto`): packed under flash-attn (its varlen kernel takes packed rows with no mask and no
  padding); shared under sdpa/eager (the prompt computed once per pair, through a dense 4-D mask: on CPU the
  fastest layout measured, bench/train_bench.py); padded when the model's attention may not take a 4-D mask (a
  remote-code model: padded needs only the 2-D padding mask every model takes).
- ZeRO stage (`train.ds_config=auto`): the first candidate, cheapest first (stage 0: one gradient all-reduce per
  step; ZeRO-2: a reduce-scatter per micro-step; ZeRO-3: gathers per micro-step; offload: host Adam and PCIe
  copies), whose predicted device memory (core.plan.memory at the run's widest micro-batch, headroom included)
  fits the free memory less AUTO_MARGIN and, on GPUs, whose host memory per node (core.plan.host_memory: loading,
  the offloaded partitions) fits the host's available memory less the same margin; when none fits, the one that
  needs least device memory (ZeRO-3 need not be it: for a small model its gathered weights and buckets outweigh
  what its sharding saves), with a reason that says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from midpo.core.plan import GIB, ModelShape, Settings, host_memory, memory, rank_steps, widest

# Of the device's free memory, the share `auto` leaves unplanned: nobody reviews its choice before the run, and the
# plan's calibration errs by up to -8% on CPU (-2% on the H100) at its known configurations (docs/plan.md). A
# setting planned within this margin is still what `midpo plan` calls fitting; auto takes the next stage instead.
AUTO_MARGIN = 0.10


@dataclass(frozen=True)
class Pick:
    value: str
    reason: str
    needed_gib: dict[str, float] | None = None  # per candidate tried (ZeRO choice)

    def to_json(self) -> dict:
        out = {"value": self.value, "reason": self.reason}
        if self.needed_gib:
            out["needed_gib"] = {k: round(v, 3) for k, v in self.needed_gib.items()}
        return out


def choose_layout(attn: str, dense_mask: bool) -> Pick:
    """The layout the attention kernel `attn` (flash_attention_2 | sdpa | eager) serves best; `dense_mask`: the
    model's attention is known to take a 4-D mask (a transformers model class; False for remote code)."""
    if "flash" in attn:
        return Pick("packed", f"attention {attn}: its varlen kernel takes packed rows (no padding, no mask)")
    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attention must be flash_attention_2, sdpa or eager, got {attn!r}")
    if not dense_mask:
        return Pick("padded", f"attention {attn}, but the model's code is not transformers' own (remote code): "
                    "whether it takes a 4-D mask (shared, packed under a dense kernel) is unknown, and padded needs "
                    "only the 2-D padding mask")
    return Pick("shared", f"attention {attn} takes a dense 4-D mask: one row per pair, the prompt computed once "
                "(2P+C+R -> P+C+R tokens per pair)")


def stage_name(s: Settings) -> str:
    return f"ZeRO-{s.zero_stage}" + (" + offload" if s.offload_optimizer else "") if s.zero_stage else "stage 0"


def choose_zero(shape: ModelShape, candidates: Sequence[tuple[str, Settings]], lengths: list[tuple[int, int, int]],
                device_gib: float, memory_source: str = "free", margin: float = AUTO_MARGIN, *,
                host_gib: float | None = None, ranks_per_node: int = 1, host_source: str = "host memory") -> Pick:
    """The first of `candidates` ((ds_config name, its planner Settings), cheapest first) whose predicted device
    memory fits (1 - `margin`) x `device_gib` and, given `host_gib` (a GPU node's available host memory; its
    `ranks_per_node` processes share it), whose host memory per node fits (1 - `margin`) x `host_gib`; none
    fitting: the one that needs least device memory, said so in the reason. `lengths`: (prompt, chosen, rejected)
    of the pairs the run trains on (its widest micro-batch sets the activations)."""
    if not candidates:
        raise ValueError("no ZeRO candidates to choose from")
    usable = device_gib * (1.0 - margin)
    needed: dict[str, float] = {}
    host: dict[str, float] = {}
    for name, s in candidates:
        batch = widest([b for step in rank_steps(lengths, s) for b in step])
        needed[name] = memory(shape, s, batch).needed_gib
        host[name] = sum(host_memory(shape, s, ranks_per_node).values()) / GIB
        host_ok = host_gib is None or host[name] <= host_gib * (1.0 - margin)
        if needed[name] <= usable and host_ok:
            tried = [f"{stage_name(c)} ({n}) needs {needed[n]:.2f} GiB" + (
                f" and {host[n]:.1f} GiB of host memory per node" if host_gib is not None else "")
                for n, c in candidates if n in needed and n != name]
            why = f"; cheaper ones do not fit: {', '.join(tried)}" if tried else ""
            host_why = (f"; {host[name]:.1f} GiB of host memory per node fits {1 - margin:.0%} of the "
                        f"{host_gib:.1f} GiB {host_source}" if host_gib is not None else "")
            return Pick(name, f"{stage_name(s)}: predicted {needed[name]:.2f} GiB per device fits "
                        f"{1 - margin:.0%} of the {device_gib:.2f} GiB {memory_source}{host_why}{why}", needed)
    name, s = min(candidates, key=lambda c: needed[c[0]])  # the first of equals: the cheaper
    host_said = f" and of the {host_gib:.1f} GiB {host_source}" if host_gib is not None else ""
    return Pick(name, f"nothing fits {1 - margin:.0%} of the {device_gib:.2f} GiB {memory_source}{host_said} (" + ", ".join(
        f"{stage_name(c)} {needed[n]:.2f} GiB" + (f", host {host[n]:.1f} GiB" if host_gib is not None else "")
        for n, c in candidates) + f"): {stage_name(s)}, the one that needs "
        "least; expect an out-of-memory error unless the prediction is high (`midpo plan` lists what fits: "
        "smaller micro-batches, a token budget, gradient checkpointing)", needed)
