"""Token-budget micro-batches (train.micro_batch_tokens): what a micro-batch of pairs costs in tokens as a layout
lays it out, and the cut of a rank's pairs into micro-batches under a budget. Pure Python (no torch): the sampler
and the planner (`midpo plan`) use the same cut."""

from __future__ import annotations


def budget_cost(lengths: list[tuple[int, int, int]], layout: str) -> int:
    """Tokens a micro-batch of pairs with these (prompt, chosen, rejected) lengths lays out in `layout`, what a
    token budget (train.micro_batch_tokens) bounds: padded 2B rows of the longest sequence, shared B rows of the
    longest prompt + chosen + rejected, packed every sequence's tokens (rows of a dense mask may add a little)."""
    if not lengths:
        return 0
    if layout == "padded":
        return 2 * len(lengths) * max(p + max(c, r) for p, c, r in lengths)
    if layout == "shared":
        return len(lengths) * max(p + c + r for p, c, r in lengths)
    return sum(2 * p + c + r for p, c, r in lengths)


def fill_to_budget(lengths: list[tuple[int, int, int]], budget: int, layout: str) -> list[list[int]]:
    """Positions 0..n-1 of `lengths` in order, cut into consecutive micro-batches of at most `budget` tokens
    (`budget_cost`); a pair over the budget alone is a micro-batch of its own."""
    groups: list[list[int]] = []
    for i in range(len(lengths)):
        if groups and budget_cost([lengths[j] for j in groups[-1]] + [lengths[i]], layout) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
