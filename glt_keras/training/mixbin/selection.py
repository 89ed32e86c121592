"""From per-layer scores to a set of real layers within the budget: the exact knapsack, the
greedy rule, and the :class:`Selection` they return."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


from .costs import _check_budget, _check_by, _exact_fraction, _fits, _unit_costs, candidates


def knapsack(costs: dict, values: dict, fits: Callable[[int], bool]) -> list[str]:
    """Exact 0/1 knapsack: the subset of largest total value whose summed cost ``fits``.

    ``costs``: name -> non-negative integer cost (insertion order is the tie order);
    ``values``: name -> score (items with score <= 0 are never taken); ``fits(total)``:
    monotone feasibility of a total cost. Dynamic programming over the Pareto frontier of
    (cost, value) pairs of the subsets built so far: exact, and small for a few dozen
    items. Ties: higher value, then lower cost, then the earlier subset.

    Example:
        >>> knapsack({"a": 3, "b": 2, "c": 2}, {"a": 5.0, "b": 3.0, "c": 3.0}, lambda t: t <= 4)
        ['b', 'c']
    """
    frontier = [(0, 0.0, ())]
    for name, cost in costs.items():
        value = float(values.get(name, 0.0))
        if value <= 0 or not fits(cost):
            continue
        grown = [(c + cost, v + value, s + (name,)) for c, v, s in frontier if fits(c + cost)]
        merged = sorted(frontier + grown, key=lambda t: (t[0], -t[1]))
        frontier, best = [], -np.inf
        for state in merged:
            if state[1] > best + 1e-12:
                frontier.append(state)
                best = state[1]
    cost, value, chosen = max(frontier, key=lambda t: (t[1], -t[0]))
    return [n for n in costs if n in chosen]


def greedy_by_ratio(costs: dict, values: dict, fits: Callable[[int], bool]) -> list[str]:
    """Add items by decreasing value per unit cost (value > 0) while the total fits."""
    order = sorted((n for n in costs if values.get(n, 0) > 0),
                   key=lambda n: -values[n] / max(costs[n], 1))
    total, chosen = 0, set()
    for n in order:
        if fits(total + costs[n]):
            chosen.add(n)
            total += costs[n]
    return [n for n in costs if n in chosen]


@dataclass
class Selection:
    """The layers kept real-valued, and why."""

    layers: list
    cost: float
    budget: float
    by: str
    method: str
    #: candidate -> score (higher: more worth keeping real)
    scores: dict
    #: candidate -> its own cost fraction (``by``)
    costs: dict
    #: candidate -> {"params", "macs"}
    sizes: dict = field(default_factory=dict)
    #: method-specific numbers: learned gates, losses, ...
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _json_safe(dataclasses.asdict(self))

    def to_markdown(self) -> str:
        lines = [f"MixBin selection ({self.method}, budget {self.budget:g} of {self.by}): "
                 f"real layers {self.layers or 'none (fully binary)'}, cost {self.cost:.4f}", "",
                 "| layer | params | MACs | cost | score | real |", "|---|---:|---:|---:|---:|:---:|"]
        for name, cost in self.costs.items():
            size = self.sizes.get(name, {})
            lines.append(f"| {name} | {size.get('params', '')} | {size.get('macs', '')} | {cost:.4f} | "
                         f"{self.scores.get(name, 0.0):.4g} | {'yes' if name in self.layers else ''} |")
        gates = self.details.get("gates")
        if gates:
            lines += ["", "learned gates: " + ", ".join(f"{k} {v:.3f}" for k, v in gates.items())]
        return "\n".join(lines) + "\n"


def select_from_scores(model_or_config, scores: dict, budget: float, *, by: str = "macs",
                       rule: str = "knapsack", method: str = "custom", details=None) -> Selection:
    """The :class:`Selection` that ``scores`` give under ``budget`` (``rule``: knapsack or greedy)."""
    by = _check_by(by)
    budget = _check_budget(budget)
    cands = candidates(model_or_config)
    if any(c.precision != "binary" for c in cands):
        raise ValueError("Layer selection starts from the fully binary network; these layers are "
                         f"real already: {[c.name for c in cands if c.precision != 'binary']}.")
    units = _unit_costs(cands, by)
    total = sum(units.values())
    fits = lambda t: _fits(t, total, by, budget)  # noqa: E731
    values = {c.name: float(scores.get(c.name, 0.0)) for c in cands}
    if rule == "knapsack":
        layers = knapsack(units, values, fits)
    elif rule == "greedy":
        layers = greedy_by_ratio(units, values, fits)
    else:
        raise ValueError(f"rule must be 'knapsack' or 'greedy', got {rule!r}.")
    chosen_units = sum(units[n] for n in layers)
    assert fits(chosen_units), "selection over budget"  # by construction
    return Selection(
        layers=layers,
        cost=float(_exact_fraction(chosen_units, total, by)),
        budget=budget,
        by=by,
        method=method,
        scores=values,
        costs={c.name: float(_exact_fraction(units[c.name], total, by)) for c in cands},
        sizes={c.name: {"params": c.params, "macs": c.macs} for c in cands},
        details=dict(details or {}),
    )


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value
