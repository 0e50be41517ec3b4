import csv
import math

import pytest
import torch
from helpers import SyntheticSAE, TokenDataset, callback_factory, loader, trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_sae_samples import ActivationSampleCallback
from lightning_sae_samples.health import health_metrics

F, THR = 10, 0.5
NAMES = ("never_fired_frac", "alive_frac", "dense_frac", "dead_frac", "l0")


make_callback = callback_factory(
    collection_freq=3, max_samples_per_feature=4, context_size=2, activation_threshold=THR, top_features_to_save=3,
    samples_per_feature_to_save=2, write_report=False, dead_window_steps=4,
)


def read_rows(logger):
    with open(logger.experiment.metrics_file_path, newline="") as handle:
        return list(csv.DictReader(handle))


def expected_by_step(module, window, freq=3):
    """Metrics at each collected step, derived by hand from every batch the SAE returned."""
    count = torch.zeros(F, dtype=torch.long)
    last = torch.full((F,), -1)
    tokens_seen = 0
    out = {}
    for seen in module.seen:
        if seen.step % freq:
            continue
        fired = (seen.latents > THR).reshape(-1, F)
        count += fired.sum(0)
        last = torch.where(fired.any(0), seen.step, last)
        tokens_seen += seen.tokens.numel()
        step = seen.step
        row = {
            "never_fired_frac": float((count == 0).float().mean()),
            "alive_frac": float((count > 0).float().mean()),
            "dense_frac": float((count / tokens_seen > 0.1).float().mean()),
            "l0": float(fired.sum()) / seen.tokens.numel(),
        }
        if step - window + 1 >= 0:
            row["dead_frac"] = float((last <= step - window).float().mean())
        out[step] = row
    return out


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_health_metrics_reach_csv_logger_at_collection_steps_only(tmp_path, mode):
    module = SyntheticSAE(num_latents=F, mode=mode)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [make_callback(tmp_path)], logger=logger, max_steps=11, log_every_n_steps=1).fit(
        module, loader(TokenDataset(num_sequences=48))
    )
    rows = [r for r in read_rows(logger) if r.get("feature_health/never_fired_frac")]
    assert [int(r["step"]) for r in rows] == [0, 3, 6, 9]
    expected = expected_by_step(module, window=4)
    for row in rows:
        want = expected[int(row["step"])]
        for name in NAMES:
            cell = row[f"feature_health/{name}"]
            if name in want:
                assert math.isclose(float(cell), want[name], rel_tol=1e-6, abs_tol=1e-9), (row["step"], name)
            else:
                assert cell == ""  # dead_frac waits for a whole window of collection
    assert "dead_frac" not in expected[0] and "dead_frac" in expected[3]
    # latents 0 and 1 never fire: they count as never fired and as dead
    assert all(float(r["feature_health/never_fired_frac"]) >= 0.2 for r in rows)


def test_gradient_accumulation_logs_once_per_step_with_l0_over_all_micro_batches(tmp_path):
    module = SyntheticSAE(num_latents=F)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [make_callback(tmp_path, collection_freq=2)], logger=logger, max_steps=4,
            accumulate_grad_batches=3, log_every_n_steps=1).fit(module, loader(TokenDataset(num_sequences=48)))
    rows = [r for r in read_rows(logger) if r.get("feature_health/l0")]
    assert [int(r["step"]) for r in rows] == [0, 2]
    for row in rows:
        step = int(row["step"])
        batches = [s for s in module.seen if s.step == step]
        assert len(batches) == 3
        active = sum(int((s.latents > THR).sum()) for s in batches)
        tokens = sum(s.tokens.numel() for s in batches)
        assert math.isclose(float(row["feature_health/l0"]), active / tokens, rel_tol=1e-6)


def test_disabled_or_without_logger_logs_nothing(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [make_callback(tmp_path, log_feature_health=False)], logger=logger, max_steps=4,
            log_every_n_steps=1).fit(SyntheticSAE(num_latents=F), loader())
    logger.save()
    path = logger.experiment.metrics_file_path
    text = open(path).read() if __import__("os").path.exists(path) else ""
    assert "feature_health" not in text
    # No logger at all: training runs and the samples are written.
    trainer(tmp_path, [make_callback(tmp_path, dirpath=tmp_path / "b")], logger=False, max_steps=4).fit(
        SyntheticSAE(num_latents=F), loader()
    )
    assert (tmp_path / "b" / "collection_summary.json").exists()


def test_tensorboard_gets_scalars_and_frequency_histogram(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, [make_callback(tmp_path)], logger=logger, max_steps=7, log_every_n_steps=1).fit(
        SyntheticSAE(num_latents=F), loader(TokenDataset(num_sequences=48))
    )
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {f"feature_health/{n}" for n in NAMES} <= set(scalars)
    assert [e.step for e in events.Scalars("feature_health/l0")] == [0, 3, 6]
    hist = events.Histograms("feature_health/log10_frequency")
    assert [h.step for h in hist] == [0, 3, 6]
    alive = 1 - events.Scalars("feature_health/never_fired_frac")[-1].value
    assert round(hist[-1].histogram_value.num) == round(alive * F)
    assert hist[-1].histogram_value.max <= 0.0


def test_health_metrics_function_edges():
    count = torch.tensor([0, 5, 50, 0])
    last = torch.tensor([-1, 3, 9, -1])
    m = health_metrics(count, last, tokens_seen=100, step=9, dead_window_steps=5)
    assert m["feature_health/never_fired_frac"] == 0.5 and m["feature_health/dense_frac"] == 0.25
    assert m["feature_health/dead_frac"] == 0.75  # fired last at step 3 < 5: dead, with the two never fired
    m = health_metrics(count, last, tokens_seen=100, step=9, dead_window_steps=5, first_collected_step=6)
    assert "feature_health/dead_frac" not in m


def test_dead_window_is_validated():
    with pytest.raises(ValueError, match="`dead_window_steps` must be an integer >= 1"):
        ActivationSampleCallback(dead_window_steps=0)
