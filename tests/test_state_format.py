"""The compact collector state: files hold what was seen, round trips are exact, readers need no engine."""

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import SyntheticSAE, assert_same, engine_config, loader, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from oracle import Seen, oracle

from lightning_sae_samples import ActivationSampleAnalyzer, ActivationSampleCallback, SamplesDirectoryError
from lightning_sae_samples.engine.memory import estimate_state_bytes
from lightning_sae_samples.engine.sample_collector import SampleCollector
from lightning_sae_samples.engine.sample_table import MergePolicy
from lightning_sae_samples.samples_dir.names import FULL_STATE_NAME
from lightning_sae_samples.samples_dir.writer import write_samples_dir
from lightning_sae_samples.state.merge import merge_states
from lightning_sae_samples.state.schema import STATE_FORMAT_VERSION
from lightning_sae_samples.state.tables import padded_state

F, K, CTX, THR = 6, 3, 4, 0.5
WRITE = dict(config={}, tokenizer=None, top_features=F, samples_per_feature=2, rank_by="max_activation")


def batches(n, seed=0, batch=2, seq=5, density=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, 20, (batch, seq), generator=gen)
        latents = torch.round(torch.rand(batch, seq, F, generator=gen) * 8) / 2
        latents[torch.rand(batch, seq, F, generator=gen) > density] = 0.0
        latents[..., 0] = 0.0  # never fires
        out.append((tokens, latents))
    return out


def config():
    return engine_config(F, K, CTX, THR, samples_per_interval=2, num_intervals=3, recent_window_steps=2,
                         deduplicate_contexts=True)


# fill levels: nothing seen; a few sparse batches (rows partly filled); many dense batches (firing rows full);
# samples still staged when exported (a stage limit no batch reaches)
FILLS = {"empty": (0, 0.3, None), "partial": (2, 0.2, None), "full": (12, 1.0, None), "staged": (3, 0.5, 10**6)}


@pytest.mark.parametrize("fill", FILLS)
def test_compact_round_trip_through_a_weights_only_file(tmp_path, fill):
    n, density, stage_limit = FILLS[fill]
    c = SampleCollector(config(), policy=MergePolicy(stage_limit=stage_limit))
    data = batches(n, seed=3, density=density)
    for step, (tokens, latents) in enumerate(data):
        c.update_dense(tokens, latents, step)
    if fill == "staged":
        assert c.tables["top"]._staged_count > 0
    state = c.state_dict()
    assert state["format_version"] == STATE_FORMAT_VERSION

    # The top table holds exactly what was seen (up to K per latent), packed best first.
    fired = torch.cat([lat.reshape(-1, F) for _, lat in data]) if data else torch.zeros(0, F)
    per_latent = (fired > THR).sum(0).clamp(max=K)
    top = state["top"]
    assert top["capacity"] == K and torch.equal(top["count"].long(), per_latent)
    assert len(top["values"]) == int(per_latent.sum()) == len(top["context_tokens"])
    if fill == "full":
        assert int(top["count"][1:].min()) == K
    # counts per latent and bin are stored by what was counted
    assert len(state["hist"]["index"]) <= int((fired > THR).sum())
    assert torch.equal(padded_state(state)["hist"].sum(1), state["count"])
    if fill == "empty":
        assert all(len(state[t]["values"]) == 0 for t in ("top", "interval", "recent", "recent_prev"))

    path = tmp_path / "state.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert_same(state, loaded)
    restored = SampleCollector.from_state_dict(loaded)
    assert_same(state, restored.state_dict())

    # and continues exactly as an uninterrupted collector
    more = batches(3, seed=4, density=0.7)
    for step, (tokens, latents) in enumerate(more, start=n):
        c.update_dense(tokens, latents, step)
        restored.update_dense(tokens, latents, step)
    assert_same(c.state_dict(), restored.state_dict())


def test_merged_compact_states_equal_the_oracle_and_one_process():
    single, ranks = SampleCollector(config()), [SampleCollector(config()) for _ in range(2)]
    seen = []
    for i, (tokens, latents) in enumerate(batches(8, seed=5, density=0.6)):
        step, rank = i // 2, i % 2
        ranks[rank].update_dense(tokens, latents, step, order_base=rank << 40)
        single.update_dense(tokens, latents, step, order_base=rank << 40)
        seen.append(Seen(step, rank, 0, tokens, latents))
    merged = merge_states(ranks[0].state_dict(), ranks[1].state_dict())
    assert_same(merged, merge_states(ranks[1].state_dict(), ranks[0].state_dict()))
    want = single.state_dict()
    assert_same({k: merged[k] for k in ("top", "interval", "count", "hist")},
                {k: want[k] for k in ("top", "interval", "count", "hist")})
    feats = oracle(seen, F, K, CTX, THR, dedup=True)
    padded = padded_state(merged)
    for f, feat in feats.items():
        kept = [float(v) for v in padded["top_values"][f] if v > float("-inf")]
        assert kept == pytest.approx([s[0] for s in feat.samples]), f


def test_old_dense_full_state_is_rejected_with_a_clear_error(tmp_path):
    c = SampleCollector(config())
    for step, (tokens, latents) in enumerate(batches(2)):
        c.update_dense(tokens, latents, step)
    write_samples_dir(tmp_path, c.state_dict(), global_step=2, **{**WRITE, "top_features": 1})
    analyzer = ActivationSampleAnalyzer(tmp_path)
    unsaved = next(f for f in range(1, F) if f not in analyzer.saved_features)
    assert analyzer.feature(unsaved).stats.feature_idx == unsaved  # read from the compact full state

    old = padded_state(c.state_dict())  # the version 1 layout: dense [F, K] tables
    old["format_version"] = 1
    torch.save(old, tmp_path / FULL_STATE_NAME)
    with pytest.raises(SamplesDirectoryError, match="format_version 1.*reads 2"):
        ActivationSampleAnalyzer(tmp_path).feature(unsaved)
    with pytest.raises(ValueError, match="format_version 1"):
        SampleCollector.from_state_dict(old)


BLOCKED = textwrap.dedent(
    """
    import sys

    ENGINE = {{"engine", "collector", "callback", "inputs"}}

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.startswith("lightning_sae_samples.") and name.split(".")[1] in ENGINE:
                raise ImportError(f"{{name}} is blocked")
            return None

    sys.meta_path.insert(0, Block())
    from lightning_sae_samples import ActivationSampleAnalyzer

    analyzer = ActivationSampleAnalyzer({path!r})
    features = analyzer.features(limit=None)
    unsaved = [f.feature_idx for f in features if f.feature_idx not in analyzer.saved_features]
    feature = analyzer.feature(unsaved[0], num_examples=2)
    assert feature.samples and feature.interval_groups
    loaded = sorted(m for m in sys.modules if m.startswith("lightning_sae_samples."))
    print(len(features), loaded)
    """
)


def test_analyzer_reads_a_samples_directory_without_the_tensor_engine(tmp_path):
    c = SampleCollector(config())
    for step, (tokens, latents) in enumerate(batches(4, density=0.8)):
        c.update_dense(tokens, latents, step)
    write_samples_dir(tmp_path, c.state_dict(), global_step=4, **{**WRITE, "top_features": 2})
    script = BLOCKED.format(path=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, loaded = proc.stdout.split(" ", 1)
    assert int(count) == F - 1
    for engine in ("collector", "sample_table", "dedup", "distributed", "inputs"):
        assert f"lightning_sae_samples.{engine}" not in loaded


def test_a_state_larger_than_memory_is_refused_before_training_with_what_to_lower(tmp_path):
    module = SyntheticSAE(num_latents=F)
    cb = ActivationSampleCallback(collection_freq=1, max_samples_per_feature=10**9, dirpath=tmp_path / "samples")
    with pytest.raises(ValueError, match=r"needs [\d,]+ bytes up front on cpu, which has [\d,]+ bytes available.*"
                                         r"Lower `max_samples_per_feature` \(now 1000000000\)"):
        trainer(tmp_path, [cb], max_steps=2).fit(module, loader())
    assert module.seen == []  # refused in setup, before any step
    # a dense SAE whose latent count is only known from its outputs is refused at its first collection
    anonymous = SyntheticSAE(num_latents=F)
    del anonymous.num_latents
    anonymous.width = F
    cb = ActivationSampleCallback(collection_freq=1, samples_per_interval=10**9, dirpath=tmp_path / "samples")
    with pytest.raises(ValueError, match=r"Lower `samples_per_interval`"):
        trainer(tmp_path, [cb], max_steps=2).fit(anonymous, loader())


def test_state_estimate_counts_the_pools_by_what_is_stored():
    cfg = engine_config(1 << 20, 100, 20, 0.1, samples_per_interval=2, num_intervals=8)
    empty, full = estimate_state_bytes(cfg, stored_samples=0), estimate_state_bytes(cfg)
    assert empty["samples"] == 0 and empty["fixed"] == full["fixed"]
    assert full["total"] > 10 * 2**30  # a full pool of a million latents x 100 windows is large ...
    assert empty["fixed"] / (1 << 20) < 3 * 1024  # ... the part allocated up front is under 3 KB per latent
    c = SampleCollector(engine_config(64, 4, 4, 0.5, samples_per_interval=1, num_intervals=2))
    tensors = [t for t in c.__dict__.values() if torch.is_tensor(t)]
    tensors += [t for table in c.tables.values() for t in (*table.__dict__.values(), *table.pool.values())
                if torch.is_tensor(t)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}  # views counted once
    measured = sum(storages.values())
    small = estimate_state_bytes(c.config, stored_samples=0)
    assert measured <= small["total"] <= measured * 1.1


class FullStateProbe(Callback):
    """After the sample callback wrote a checkpoint's samples directory: is ``full_state.pt`` there?"""

    def __init__(self, dirpath):
        self.path, self.seen = dirpath / FULL_STATE_NAME, []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.seen.append(self.path.exists())


@pytest.mark.parametrize("when, at_checkpoints, at_end", [("every", True, True), ("end", False, True),
                                                         ("never", False, False)])
def test_save_full_state_chooses_which_saves_write_it(tmp_path, when, at_checkpoints, at_end):
    samples = tmp_path / "samples"
    cb = ActivationSampleCallback(collection_freq=1, max_samples_per_feature=3, samples_per_feature_to_save=2,
                                  top_features_to_save=2, dirpath=samples, save_full_state=when)
    probe = FullStateProbe(samples)
    trainer(tmp_path, [cb, probe, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_epochs=2,
            enable_checkpointing=True).fit(SyntheticSAE(num_latents=F), loader())
    assert probe.seen and all(seen == at_checkpoints for seen in probe.seen)
    assert (samples / FULL_STATE_NAME).exists() == at_end
    analyzer = ActivationSampleAnalyzer(samples)
    assert analyzer.summary.has_full_state == at_end
    assert analyzer.feature(analyzer.saved_features[0]).samples
    # the checkpoint holds the state whatever the choice
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][cb.state_key]["collector"]
    assert state["format_version"] == STATE_FORMAT_VERSION and int(state["top"]["count"].sum()) > 0


def test_save_full_state_is_validated():
    with pytest.raises(ValueError, match=r"`save_full_state` must be one of \('every', 'end', 'never'\), got 'al"):
        ActivationSampleCallback(save_full_state="always")


@pytest.mark.parametrize("tamper, rule", [
    ("first_unset", "EMPTY \\(-1\\) exactly where `last_step` is"),
    ("last_unset", "EMPTY \\(-1\\) exactly where `last_step` is"),
    ("first_after_last", "steps no later than `last_step`"),
])
def test_a_full_state_whose_first_and_last_steps_disagree_is_refused(tmp_path, tamper, rule):
    from lightning_sae_samples.samples_dir.reader import load_full_state

    c = SampleCollector(config())
    for step, (tokens, latents) in enumerate(batches(4, seed=5, density=0.5)):
        c.update_dense(tokens, latents, step + 10)
    state = c.state_dict()
    path = tmp_path / FULL_STATE_NAME
    torch.save(state, path)
    assert torch.equal(load_full_state(path)["first_step"], state["first_step"])  # as written, it loads
    fired = int(torch.nonzero(state["count"])[0])
    if tamper == "first_unset":
        state["first_step"][fired] = -1
    elif tamper == "last_unset":
        state["last_step"][fired] = -1
    else:
        state["first_step"][fired] = state["last_step"][fired] + 1
    torch.save(state, path)
    with pytest.raises(SamplesDirectoryError, match=rf"`first_step` must hold {rule}; entry {fired} does not"):
        load_full_state(path)
