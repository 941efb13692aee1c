"""Contiguous layer ranges whose slowest stage is as fast as it can be."""

from typing import Callable, Optional


def balanced_split(n_layers: int, n_stages: int, stage_ms: Callable[[int, int], float],
                   fits: Optional[Callable[[int, int], bool]] = None) -> tuple[int, ...]:
    """Layers per stage (each at least one) given ``stage_ms(stage, layers)``.

    Among the splits whose every stage ``fits(stage, layers)``, the one whose stage times,
    sorted slowest first, are lexicographically smallest: the slowest stage as fast as it can
    be, then the second slowest, and so on (the slowest alone leaves ties: with a heavy last
    stage, any split of the rest that stays under it). Splits with equal times: earlier stages
    take the extra layer, as the even split does. When no split fits, the best one without
    ``fits`` (the memory estimate then shows which rank is over).

    A dynamic program over (stage, first layer): inserting one time into two sorted vectors
    keeps their order, so the best split of the later stages is part of the best split.
    """
    times = {(s, k): stage_ms(s, k) for s in range(n_stages) for k in range(1, n_layers - n_stages + 2)}
    allowed = {key: fits is None or fits(*key) for key in times}
    best = _solve(n_layers, n_stages, times, allowed)
    if best is None:
        best = _solve(n_layers, n_stages, times, dict.fromkeys(times, True))
    return best


def _solve(n_layers, n_stages, times, allowed) -> Optional[tuple[int, ...]]:
    # suffix[i]: (sorted times slowest first, layers per stage) of the best split of layers
    # i.. over the stages after the current one.
    suffix: dict[int, tuple[tuple[float, ...], tuple[int, ...]]] = {n_layers: ((), ())}
    for s in reversed(range(n_stages)):
        current = {}
        for start in range(s, n_layers - (n_stages - s) + 1):
            for k in range(n_layers - start - (n_stages - s - 1), 0, -1):  # most layers first: ties keep it
                rest = suffix.get(start + k)
                if rest is None or not allowed[(s, k)]:
                    continue
                candidate = (tuple(sorted((times[(s, k)], *rest[0]), reverse=True)), (k, *rest[1]))
                if start not in current or candidate[0] < current[start][0]:
                    current[start] = candidate
        suffix = current
    return suffix[0][1] if 0 in suffix else None
