"""The zip schedule as plain data, computed up front from the unit spaces (MTZ Algorithm 1 with
residual streams): after calibrating each layer, which writers of which unit space are tied, whether
that space is paired there or follows a pairing made earlier, and what that means for the caches."""

from __future__ import annotations

from dataclasses import dataclass

from .spaces import Spaces


@dataclass(frozen=True)
class Step:
    """What happens after layer ``layer`` is calibrated."""

    layer: int
    space: int  # the unit space the layer writes
    ties: tuple[int, ...]  # the writers of ``space`` tied now (empty: the layer waits for its space)
    pairs: bool  # the space is paired now, from these writers' costs; else they follow its pairing
    # A writer tied now lies before this layer: the tensors cached downstream of it are stale.
    stale: bool
    # No writer is left waiting for its space and every space paired so far has all its writers tied: the
    # networks are consistent with the plan so far (retraining may run).
    settled: bool


def schedule(spaces: Spaces) -> tuple[Step, ...]:
    """The steps of one pass over the layers: a space is paired at Spaces.decided_at (its writers up
    to then tied together), and each later writer is tied as soon as it is calibrated. A step is
    settled once no paired space has a writer still to come (a residual stream: after its last writer)
    or a grouped conv reading it still to come (its groups follow that pairing, spaces.py)."""
    steps: list[Step] = []
    waiting: list[int] = []
    paired: set[int] = set()
    for k, space in enumerate(spaces.space):
        waiting.append(k)
        ties: tuple[int, ...] = ()
        follows = space in paired
        if follows or k == spaces.decided_at(space):
            ties = tuple(w for w in waiting if spaces.space[w] == space)
            waiting = [w for w in waiting if spaces.space[w] != space]
            paired.add(space)
        open_streams = any(max(spaces.writers(s)) > k for s in paired) or \
            any(f > k and leader in paired for f, leader in spaces.follows)
        steps.append(Step(k, space, ties, bool(ties) and not follows, any(w < k for w in ties),
                          not waiting and not open_streams))
    return tuple(steps)


def late_writers(spaces: Spaces) -> bool:
    """True when some space has writers after the layer where it is paired (a residual stream read early)."""
    return any(k > spaces.decided_at(s) for s in spaces.spaces for k in spaces.writers(s))
