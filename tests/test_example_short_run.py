"""Short runs with a long run's schedule: the callback warns that almost nothing will be collected.

The default example collects ``{0: 500, 1000: 2}``; ``--trainer.max_steps 500`` would collect only step 0,
from an untrained SAE. ``CollectionSchedule.num_due_before`` counts the collected steps before a stop by
arithmetic over the schedule's segments; ``ActivationSampleCallback.setup`` warns when it is below 2.
"""

from __future__ import annotations

import warnings

import pytest
from helpers import SyntheticSAE, loader, trainer

from lightning_sae_samples import ActivationSampleCallback
from lightning_sae_samples.schedule import CollectionSchedule

SCHEDULES = [1, 3, 500, {0: 500, 1000: 2}, {0: 4, 10: 1, 13: 5}, {7: 2}, {2: 3, 5: 1, 6: 100}]


@pytest.mark.parametrize("frequency", SCHEDULES, ids=str)
def test_num_due_before_matches_counting_every_step(frequency):
    schedule = CollectionSchedule(frequency)
    for stop in [0, 1, 2, 5, 7, 10, 11, 13, 14, 40, 499, 500, 501, 1000, 1001, 1002, 1500]:
        expected = sum(schedule.is_due(step) for step in range(stop))
        assert schedule.num_due_before(stop) == expected, (frequency, stop)


def test_num_due_before_is_arithmetic_for_huge_runs():
    # Counting a billion steps one by one would take minutes; the segments' arithmetic is instant.
    assert CollectionSchedule({0: 500, 1000: 2}).num_due_before(10**9 + 1000) == 2 + 10**9 // 2


def fit(tmp_path, frequency, max_steps: int, max_epochs: int = -1) -> list[str]:
    callback = ActivationSampleCallback(
        collection_freq=frequency, max_samples_per_feature=3, samples_per_feature_to_save=3, context_size=4,
        dirpath=tmp_path / "samples", write_report=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [callback], max_steps=max_steps, max_epochs=max_epochs).fit(SyntheticSAE(), loader())
    return [str(w.message) for w in caught if "collection_freq" in str(w.message)]


def test_warns_when_a_short_run_collects_only_step_0(tmp_path):
    callback = ActivationSampleCallback(collection_freq={0: 500, 1000: 2}, dirpath=tmp_path / "s", write_report=False)
    with pytest.warns(UserWarning, match=r"collects only step 0 before `max_steps`=8") as record:
        trainer(tmp_path, [callback], max_steps=8, max_epochs=-1).fit(SyntheticSAE(), loader())
    message = next(str(w.message) for w in record if "collection_freq" in str(w.message))
    assert "{0: 500, 1000: 2}" in message and "raise `max_steps`" in message


def test_warns_when_nothing_is_collected(tmp_path):
    messages = fit(tmp_path, {20: 1}, max_steps=6)
    assert len(messages) == 1 and "collects no step" in messages[0]


@pytest.mark.parametrize("frequency", [2, {0: 500, 4: 1}])
def test_no_warning_when_the_schedule_fits_the_run(tmp_path, frequency):
    assert fit(tmp_path, frequency, max_steps=8) == []


def test_no_warning_when_the_run_is_too_short_for_more(tmp_path):
    # One step, collected: there is nothing the schedule could do better.
    assert fit(tmp_path, 1, max_steps=1) == []
    assert "collects no step" in CollectionSchedule({1: 1}).sparse_run_warning(1)


def test_no_warning_without_max_steps(tmp_path):
    # max_steps=-1 (epoch-based run): the number of steps is not known at setup; no guess, no warning.
    assert fit(tmp_path, {0: 500}, max_steps=-1, max_epochs=1) == []
