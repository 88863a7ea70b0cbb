"""Týr's search space and evolutionary search (pure Python over level indices).

Every prunable attention block (a head group) and MLP block (a channel group) of every
layer is one *variable*. A variable has a ladder of candidate widths (its *levels*, densest
first) around a centre; a *state* is one level index per variable. The parameter cost of a
state is the sum of the kept parameters of the chosen levels.

Budget-exact mutation (the reference code's "one layer a level denser, another a level
sparser", generalised to unequal costs): variable ``i`` moves one level denser, gaining
``d`` parameters, and a partner ``j`` moves to a sparser level of its ladder that frees
exactly ``d`` parameters; only exact matches are allowed, so every child costs what its
parent costs. The number of such swaps per child is ``min`` of two uniform draws in
``[1, max_flips]`` (biased towards few, as in the code).

Selection: children are scored in stages on growing numbers of calibration tokens; each
stage keeps its best ``survivors``; the parent joins the last stage (elitism) and the best of
that stage becomes the next parent. Earlier stages draw new windows every generation (as
the code does); the last stage uses one fixed set of windows for the whole iteration, so the
parent's fitness is comparable from one generation to the next and never gets worse (our
choice; the code redraws it too).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

State = tuple[int, ...]


@dataclasses.dataclass
class Variable:
    """One searchable block: a layer's heads or MLP channels.

    Attributes:
        name: the dependency-graph group name.
        kind: ``heads`` or ``channels``.
        layer: block index.
        consumers: modules whose input columns the group's units own (refitted).
        total: kept parameters when dense.
        costs: kept parameters of each level, densest first (this iteration's ladder).
        widths: each level's width: kept channels, or a ``(kv heads, query heads per kv)`` layout.
        center: index of the level the ladder was built around.
    """

    name: str
    kind: str
    layer: int
    consumers: list[str]
    total: int
    costs: list[int] = dataclasses.field(default_factory=list)
    widths: list[Any] = dataclasses.field(default_factory=list)
    center: int = 0


def channel_ladder(n: int, unit_cost: int, center: int, step: int, levels: int, round_to: int) -> list[int]:
    """Kept channel counts ``center + i * step`` for ``i`` in ``[-levels//2, levels//2]``,
    densest first, within ``[round_to, n]``.

    Example:
        >>> channel_ladder(16, 1, 8, 4, 5, 1)
        [16, 12, 8, 4]
    """
    half = levels // 2
    out = []
    for i in range(half, -half - 1, -1):
        k = center + i * step
        if max(1, round_to) <= k <= n and k not in out:
            out.append(k)
    return out


def head_ladder(
    options: Sequence[tuple[int, int, int]], center_cost: float, step: int, levels: int
) -> list[int]:
    """Indices into ``options`` (``(cost, g, r)`` with distinct costs, densest first) of the
    ladder: the option nearest ``center_cost`` and ``levels // 2`` more on each side, ``step``
    options apart."""
    c = min(range(len(options)), key=lambda i: (abs(options[i][0] - center_cost), -options[i][0]))
    half = levels // 2
    return [c + i * step for i in range(-half, half + 1) if 0 <= c + i * step < len(options)]


def cost(variables: Sequence[Variable], state: State) -> int:
    """Kept parameters of ``state``."""
    return sum(v.costs[s] for v, s in zip(variables, state))


def mutate(variables: Sequence[Variable], parent: State, rng: random.Random, max_flips: int) -> State:
    """A child of ``parent`` with the same parameter cost (see the module docstring)."""
    child = list(parent)
    flips = min(rng.randint(1, max_flips), rng.randint(1, max_flips))
    n = len(variables)
    for _ in range(flips):
        for _attempt in range(64):
            i = rng.randrange(n)
            if child[i] == 0:
                continue  # already the densest level
            vi = variables[i]
            gain = vi.costs[child[i] - 1] - vi.costs[child[i]]
            partners = [
                (j, lv)
                for j, vj in enumerate(variables)
                if j != i
                for lv in range(child[j] + 1, len(vj.costs))
                if vj.costs[child[j]] - vj.costs[lv] == gain
            ]
            if not partners:
                continue
            j, lv = partners[rng.randrange(len(partners))]
            child[i] -= 1
            child[j] = lv
            break
    return tuple(child)


Fitness = Callable[[list[State], int, int, State], list[float]]


@dataclasses.dataclass
class SearchLog:
    """What one evolutionary search did.

    Attributes:
        start_fitness: the starting parent's fitness on the last stage's fixed windows.
        best_fitness: the parent's fitness after each generation (same windows).
        evaluations: fitness evaluations per stage.
        tokens: calibration tokens evaluated in total.
    """

    start_fitness: float = float("nan")
    best_fitness: list[float] = dataclasses.field(default_factory=list)
    evaluations: list[int] = dataclasses.field(default_factory=list)
    tokens: int = 0
    starts: dict[str, float] = dataclasses.field(default_factory=dict)


def evolve(
    variables: Sequence[Variable],
    start: State,
    fitness: Fitness,
    *,
    generations: int,
    offspring: int,
    survivors: Sequence[int],
    stage_tokens: Sequence[int],
    max_flips: int,
    rng: random.Random,
    on_generation: Callable[[int, float], None] | None = None,
) -> tuple[State, SearchLog]:
    """Elitist staged evolutionary search from ``start``.

    Args:
        variables: the search variables with this iteration's ladders.
        start: the first parent.
        fitness: ``fitness(states, stage, generation, parent) -> values`` (lower is better);
            the caller decides which windows a stage/generation uses (the last stage: always
            the same) and may reuse the parent's computation (the children differ from it in a
            few blocks).
        generations / offspring / survivors / stage_tokens / max_flips: see :class:`TyrConfig`.
        rng: the search's random generator.
        on_generation: called with ``(generation, best fitness)`` after each generation.

    Returns:
        The best state and a :class:`SearchLog`.
    """
    log = SearchLog(evaluations=[0] * len(survivors))
    last = len(survivors) - 1
    parent = tuple(start)
    parent_fit = fitness([parent], last, -1, parent)[0]
    log.start_fitness = parent_fit
    log.evaluations[last] += 1
    log.tokens += stage_tokens[last]
    for gen in range(generations):
        children: list[State] = []
        tries = 0
        while len(children) < offspring and tries < 50 * offspring:
            tries += 1
            c = mutate(variables, parent, rng, max_flips)
            if c != parent and c not in children:
                children.append(c)
        if not children:
            break
        cands = children
        fits: list[float] = []
        for stage, keep in enumerate(survivors):
            fits = fitness(cands, stage, gen, parent)
            log.evaluations[stage] += len(cands)
            log.tokens += len(cands) * stage_tokens[stage]
            if stage == last:
                cands = cands + [parent]
                fits = fits + [parent_fit]
            order = sorted(range(len(cands)), key=lambda k: (fits[k], k))[:keep]
            cands = [cands[k] for k in order]
            fits = [fits[k] for k in order]
        parent, parent_fit = cands[0], fits[0]
        log.best_fitness.append(parent_fit)
        if on_generation is not None:
            on_generation(gen, parent_fit)
    return parent, log


def proxy_start(
    variables: Sequence[Variable], start: State, errors: Sequence[Sequence[float]], max_moves: int
) -> State:
    """Greedy budget-exact descent on the summed local errors of the candidates.

    From ``start``, repeatedly apply the swap (one variable a level denser, a partner to a
    sparser level freeing exactly the same parameters) that lowers ``sum(errors[i][level])``
    the most, until none does. A cheap, data-driven starting point for the search (ours; the
    code starts from the uniform distribution, and :func:`evolve` is given the better of the two).

    Example:
        >>> v = [Variable("a", "channels", 0, [], 4, [4, 2, 0], [4, 2, 0], 1),
        ...      Variable("b", "channels", 1, [], 4, [4, 2, 0], [4, 2, 0], 1)]
        >>> proxy_start(v, (1, 1), [[0, 5, 9], [0, 1, 2]], 10)
        (0, 2)
    """
    state = list(start)
    for _ in range(max_moves):
        best = (0.0, None)
        for i, vi in enumerate(variables):
            if state[i] == 0:
                continue
            gain = vi.costs[state[i] - 1] - vi.costs[state[i]]
            d_i = errors[i][state[i] - 1] - errors[i][state[i]]
            for j, vj in enumerate(variables):
                if j == i:
                    continue
                for lv in range(state[j] + 1, len(vj.costs)):
                    if vj.costs[state[j]] - vj.costs[lv] == gain:
                        delta = d_i + errors[j][lv] - errors[j][state[j]]
                        if delta < best[0] - 1e-15:
                            best = (delta, (i, j, lv))
        if best[1] is None:
            break
        i, j, lv = best[1]
        state[i] -= 1
        state[j] = lv
    return tuple(state)


def split_starts(variables: Sequence[Variable], start: State) -> dict[str, State]:
    """Uniform attention/MLP splits of ``start``'s budget: one state per attention width.

    For each kept fraction ``f`` that a head ladder offers, the attention variables move, in
    layer order, to their level nearest ``f``; the parameters they gain (or free) are paid by
    one MLP variable (the nearest layer's first) moving to a level that frees (or takes)
    exactly that many, as soon as such a level exists: moves that one MLP step cannot pay
    alone are paid together (SmolLM2 at 20%: two layers' +3 head units = one 6-unit MLP
    step). Moves still unpaid at the end are undone, so every state costs what ``start``
    costs. Our mutations can trade attention for MLP parameters one swap at a time, but a
    split far from ``start`` (e.g. all heads kept, the MLPs pruned harder) is dozens of swaps
    away; these states let the fitness pick the split first (ours; the code's mutations
    trade within a kind, so its split stays the uniform one).

    Example:
        >>> v = [Variable("h", "heads", 0, [], 4, [4, 2], [4, 2], 1),
        ...      Variable("m", "channels", 0, [], 8, [8, 6, 4, 2], [8, 6, 4, 2], 1)]
        >>> split_starts(v, (1, 1))
        {'attention 0%': (0, 2)}
    """
    heads = sorted(
        (i for i, v in enumerate(variables) if v.kind == "heads"), key=lambda i: variables[i].layer
    )
    chans = [i for i, v in enumerate(variables) if v.kind == "channels"]
    if not heads or not chans:
        return {}
    fractions = sorted({c / variables[i].total for i in heads for c in variables[i].costs}, reverse=True)
    out: dict[str, State] = {}
    for f in fractions:
        state = list(start)
        pending: list[tuple[int, int]] = []  # (variable, its level before the move), not yet paid
        debt = 0  # parameters the moved attention gained (> 0) or freed (< 0) since the last payment
        for i in heads:
            vi = variables[i]
            to = min(range(len(vi.costs)), key=lambda lv: (abs(vi.costs[lv] / vi.total - f), lv))
            if to == state[i]:
                continue
            debt += vi.costs[to] - vi.costs[state[i]]
            pending.append((i, state[i]))
            state[i] = to
            for j in sorted(chans, key=lambda j: (abs(variables[j].layer - vi.layer), variables[j].layer)):
                vj = variables[j]
                lv = next((k for k in range(len(vj.costs)) if vj.costs[state[j]] - vj.costs[k] == debt), None)
                if lv is not None:
                    state[j], debt, pending = lv, 0, []
                    break
        for i, before in pending:
            state[i] = before
        label = f"attention {round(100 * (1 - f))}%"
        if tuple(state) != tuple(start) and tuple(state) not in out.values():
            out[label] = tuple(state)
    return out
