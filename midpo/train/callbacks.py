"""Extension points of the training loop: `Trainer(cfg, callbacks=[...])`, `midpo.stages.train.main(cfg,
callbacks=...)`. Every rank calls them, in the same order. Documented as the one seam for fault injection: the
test suite's faults (a NaN loss on one rank at chosen steps, a pause after a step for kill tests) are callbacks
(tests/support/faults.py), not switches inside the loop."""

from __future__ import annotations

import torch


class Callback:
    """Override what you need; the defaults do nothing."""

    def on_micro_loss(self, step: int, micro: int, loss: torch.Tensor) -> torch.Tensor:
        """The mean loss of micro-step `micro` (0-based) of optimizer step `step` (1-based), before the finiteness
        vote; return the loss to use."""
        return loss

    def on_step_end(self, step: int) -> None:
        """After optimizer step `step` (1-based) is logged, evaluated and checkpointed as scheduled."""
