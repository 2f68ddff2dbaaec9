"""The worker groups' ``TorchTrainer`` (dreamfleet.control.trainer): Ray Train's own callbacks,
the placement-group cleaner's stop bounded, and no Ray Data manager for a group without datasets."""

from __future__ import annotations

import pytest
from ray.train import ScalingConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from dreamfleet.control.trainer import CLEANER_STOP_S, WorkerGroupTrainer

pytestmark = pytest.mark.usefixtures("ray_local")  # a trainer is made on a running Ray


def _callbacks(**kw):
    trainer = WorkerGroupTrainer(lambda config: None, scaling_config=ScalingConfig(num_workers=1), **kw)
    return trainer._create_default_callbacks()


def test_the_cleaner_stays_with_a_bounded_stop_and_no_data_manager_without_datasets():
    callbacks = _callbacks()
    cleaners = [c for c in callbacks if isinstance(c, PlacementGroupCleanerCallback)]
    assert len(cleaners) == 1 and cleaners[0]._stop_timeout == CLEANER_STOP_S
    assert not any(isinstance(c, DatasetsCallback) for c in callbacks)


def test_a_group_given_datasets_keeps_the_data_manager():
    import ray.data

    callbacks = _callbacks(datasets={"train": ray.data.range(4)})
    assert sum(isinstance(c, DatasetsCallback) for c in callbacks) == 1
