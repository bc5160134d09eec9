"""The sharing plan: which units of which tasks are one unit, per layer. Plain data, JSON round-trip."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

SHARED = "shared"
# LayerPlan.shared's entry for a task that does not share the layer.
NOT_A_MEMBER = -1


@dataclass(frozen=True)
class LayerPlan:
    """Sharing in one layer's output unit space.

    ``shared[k][t]`` is the index, in task t's own layer, of shared unit k, or NOT_A_MEMBER for a
    task that does not share this layer (its layers stopped aligning earlier; every shared unit has
    the same members). Units of a task that are not shared keep their original order after the
    shared ones. ``note`` says what did not run as
    asked, e.g. a correction skipped for lack of memory ("" when everything did; then it is left out
    of the JSON, and JSON without it parses as "").
    """

    name: str
    kind: str
    units: tuple[int, ...]
    shared: tuple[tuple[int, ...], ...] = ()
    cost: float = 0.0
    rel_error: tuple[float, ...] = ()
    corrected: bool = False
    note: str = ""

    @property
    def n_shared(self) -> int:
        """Number of shared units."""
        return len(self.shared)

    @property
    def members(self) -> frozenset:
        """The tasks that share this layer's shared units (all tasks when nothing is shared)."""
        if not self.shared:
            return frozenset(range(len(self.units)))
        return frozenset(t for t, i in enumerate(self.shared[0]) if i != NOT_A_MEMBER)

    def shared_units(self, t: int) -> np.ndarray:
        """Task t's indices of the shared units, in shared order (none for a task that is no member)."""
        if t not in self.members:
            return np.zeros(0, dtype=np.int64)
        return np.array([s[t] for s in self.shared], dtype=np.int64)

    def own_units(self, t: int) -> np.ndarray:
        """Task t's units that are not shared, ascending."""
        mask = np.ones(self.units[t], dtype=bool)
        mask[self.shared_units(t)] = False
        return np.flatnonzero(mask)

    def groups(self, t: int) -> list[tuple[frozenset, np.ndarray]]:
        """Task t's output unit groups: (set of owning tasks, t's unit indices); empty ones left out."""
        out = []
        if self.shared and t in self.members:
            out.append((self.members, self.shared_units(t)))
        own = self.own_units(t)
        if own.size:
            out.append((frozenset([t]), own))
        return out


@dataclass(frozen=True)
class SharingPlan:
    """Tasks and per-layer sharing; everything the emitter needs besides the tied weights."""

    tasks: tuple[str, ...]
    layers: tuple[LayerPlan, ...]

    def group_name(self, owners: frozenset) -> str:
        """Readable name of a unit group: 'shared' or 'task_<name>'."""
        if len(owners) == len(self.tasks):
            return SHARED
        return "task_" + "_".join(self.tasks[t] for t in sorted(owners))

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps({"tasks": list(self.tasks), "layers": [_layer_json(l) for l in self.layers]})

    @staticmethod
    def from_json(text: str) -> "SharingPlan":
        """Parse the JSON written by to_json."""
        raw = json.loads(text)
        layers = tuple(LayerPlan(name=l["name"], kind=l["kind"], units=tuple(l["units"]),
                                 shared=tuple(tuple(s) for s in l["shared"]), cost=l["cost"],
                                 rel_error=tuple(l["rel_error"]), corrected=l.get("corrected", False),
                                 note=l.get("note", ""))
                       for l in raw["layers"])
        return SharingPlan(tuple(raw["tasks"]), layers)


def _layer_json(layer: LayerPlan) -> dict:
    """A layer's plan as a JSON-ready dict; an empty note is left out (the plan's JSON stays as it was)."""
    out = asdict(layer)
    if not out["note"]:
        del out["note"]
    return out


def unshared_plan(tasks: tuple[str, ...], widths: list[tuple[str, str, tuple[int, ...]]]) -> SharingPlan:
    """A plan that shares nothing, for layers given as (name, kind, units per task)."""
    return SharingPlan(tasks, tuple(LayerPlan(n, k, u) for n, k, u in widths))
