"""Contiguous layer ranges that balance the pipeline ranks' predicted time.

Any vector of positive layer counts, stage by stage, is a contiguous split, so the choice
is one count per stage. A rank runs every one of its stages for each microbatch, so what
bounds the step is the slowest rank's total; with one stage per rank that is the slowest
stage.
"""

from typing import Callable, NamedTuple, Optional, Sequence


class _Split(NamedTuple):
    totals: tuple[float, ...]  # per rank, slowest first
    times: tuple[float, ...]  # per stage, slowest first
    counts: tuple[tuple[int, int], ...]  # (stage, layers)

    def __add__(self, other: "_Split") -> "_Split":
        return _Split(
            _slowest_first(self.totals + other.totals),
            _slowest_first(self.times + other.times),
            self.counts + other.counts,
        )


def _slowest_first(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(sorted(values, reverse=True))


def balanced_split(
    n_layers: int,
    ranks: Sequence[Sequence[int]],
    stage_ms: Callable[[int, int], float],
    fits: Optional[Callable[[int, int], bool]] = None,
) -> tuple[int, ...]:
    """Layers per stage (each at least one); ``ranks[r]``: the stages rank r runs, in stage order.

    Among the splits whose every stage ``fits(stage, layers)``, the one whose rank totals
    (``stage_ms(stage, layers)`` summed over a rank's stages), sorted slowest first, are
    lexicographically smallest: the slowest rank as fast as it can be, then the second
    slowest, and so on; then the same over the stage times (the warm-up and drain of the
    schedule go stage by stage). Min-max alone would leave ties: with a heavy last stage,
    any split of the rest that stays under it. Equal splits: earlier ranks, and within a
    rank earlier stages, take the extra layer, as the even split does. When no split fits,
    the best one without ``fits`` (the memory estimate then shows which rank is over).

    Two dynamic programs, over each rank's stages and then over the ranks: inserting the
    same value into two sorted vectors keeps their order, so the best split of the later
    parts is part of the best split.
    """
    n_stages = sum(map(len, ranks))
    times = {(s, k): stage_ms(s, k) for s in range(n_stages) for k in range(1, n_layers - n_stages + 2)}
    best = None if fits is None else _over_ranks(n_layers, ranks, times, {key: fits(*key) for key in times})
    if best is None:
        best = _over_ranks(n_layers, ranks, times, dict.fromkeys(times, True))
    return tuple(k for _, k in sorted(best.counts))


def _over_ranks(n_layers, ranks, times, allowed) -> Optional[_Split]:
    n_stages = sum(map(len, ranks))

    def one_stage(s: int, k: int) -> Optional[_Split]:
        return _Split((times[(s, k)],), (times[(s, k)],), ((s, k),)) if allowed.get((s, k)) else None

    def rank_total(best: _Split) -> _Split:
        return best._replace(totals=(round(sum(best.totals), 9),))

    most = n_layers - n_stages  # layers beyond one per stage
    per_rank = {}
    for r, stages in enumerate(ranks):
        table = _best(
            stages, lambda s: 1, one_stage, key=lambda x: (round(sum(x.totals), 9), x.times), most=len(stages) + most
        )
        per_rank[r] = {k: rank_total(split) for k, split in table.items()}
    best = _best(
        range(len(ranks)),
        lambda r: len(ranks[r]),
        lambda r, k: per_rank[r].get(k),
        key=lambda x: (x.totals, x.times),
        most=n_layers,
    )
    return best.get(n_layers)


def _best(parts: Sequence, minimum: Callable, value: Callable, key: Callable, most: int) -> dict[int, _Split]:
    """The best way to give each total of up to ``most`` layers to ``parts`` in order, each part at
    least ``minimum(part)``: ``value(part, layers)`` is that part's _Split (None: not allowed);
    smallest ``key`` wins, and on a tie the earlier part keeps the larger share. One table over
    every total at once (total -> best split)."""
    parts = list(parts)
    suffix: dict[int, _Split] = {0: _Split((), (), ())}  # layers given to the later parts -> their best split
    for i in reversed(range(len(parts))):
        current: dict[int, tuple] = {}  # total -> (key, -share of this part, split)
        for rest, later in suffix.items():
            for k in range(most - rest, minimum(parts[i]) - 1, -1):
                mine = value(parts[i], k)
                if mine is None:
                    continue
                candidate = mine + later
                ranked = (key(candidate), -k)  # on a tie, this part's larger share
                if rest + k not in current or ranked < current[rest + k][:2]:
                    current[rest + k] = (*ranked, candidate)
        suffix = {total: entry[2] for total, entry in current.items()}
    return suffix
