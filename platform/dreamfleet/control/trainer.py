"""The ``TorchTrainer`` every worker group runs as: Ray Train's own, less two fixed costs that
Ray 2.60 adds to each ``fit()`` and that a worker group which takes no Ray Datasets never uses.

Measured on a 2-core CPU machine (an empty training function, one worker, `benchmarks/
fit_overhead.py`): every ``fit()`` waited ~12 s after the function returned, and spawned one
Python process more than it needed, before its workers started.

- **The placement-group cleaner's stop.** Train V2 starts a detached ``PlacementGroupCleaner``
  per run that polls the State API for the controller's liveness, and at the end waits up to
  ``2 * check_interval + get_actor_timeout`` = 12 s for that poll to return. The State API goes
  through the dashboard's address: on an embedded Ray without a dashboard, or where a stale
  ``/tmp/ray/ray_current_cluster`` names a cluster that is gone, the poll blocks for 40 s and
  every run pays the full 12 s (upstream: ray-project/ray#62516's review notes the same gap).
  Here the cleaner keeps its job (removing a dead controller's placement group) and the stop
  waits 2 s; an exiting cleaner takes its blocked thread with it.
- **The Ray Data manager.** ``DatasetsCallback`` starts a ``DatasetManager`` actor (a process
  importing Ray Data) for every worker group, datasets or not. A group given no ``datasets``
  does without it.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

CLEANER_STOP_S = 2.0


class WorkerGroupTrainer(TorchTrainer):
    """``TorchTrainer`` with the cleaner's stop bounded and no Ray Data manager without datasets."""

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        kinds = {type(c) for c in callbacks}
        missing = {PlacementGroupCleanerCallback, DatasetsCallback} - kinds
        if missing:  # a Ray upgrade moved them: say so rather than silently keep the old costs
            raise RuntimeError(f"Ray Train's default callbacks no longer include {sorted(c.__name__ for c in missing)}; "
                               "update dreamfleet.control.trainer for this Ray version")
        out = []
        for c in callbacks:
            if isinstance(c, PlacementGroupCleanerCallback):
                out.append(PlacementGroupCleanerCallback(stop_timeout=CLEANER_STOP_S))
            elif not (isinstance(c, DatasetsCallback) and not self.datasets):
                out.append(c)
        return out
