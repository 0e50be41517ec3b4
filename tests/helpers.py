"""Small synthetic SAEs and data for driving a real Trainer in tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from oracle import Seen, assert_dir_matches_oracle
from torch.utils.data import DataLoader, Dataset

from lightning_sae_samples import ActivationSampleCallback
from lightning_sae_samples.samples_dir.names import PENDING_DIR


class TokenDataset(Dataset):
    """Fixed random token sequences, as dicts ``{"tokens": LongTensor[T]}``."""

    def __init__(self, num_sequences: int = 24, seq_len: int = 9, vocab: int = 30, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (num_sequences, seq_len), generator=gen)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"tokens": self.tokens[i]}


def latent_table(vocab: int, num_latents: int, seed: int = 1) -> torch.Tensor:
    """Per-token latent values on a 0.5 grid (ties and values equal to 0.5), with dead latents 0 and 1."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.round(torch.randn(vocab, num_latents, generator=gen) * 3) / 2
    table[:, :2] = 0.0
    return table


class SyntheticSAE(L.LightningModule):
    """Latents are a fixed function of the tokens plus a position term; records what it returned.

    ``mode``: ``"dense"`` ([B,T,F]), ``"flat"`` ([B*T,F]) or ``"sparse"`` (top-``k`` indices and values).
    """

    def __init__(self, vocab: int = 30, num_latents: int = 10, mode: str = "dense", k: int = 3,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.mode, self.k, self.num_latents = mode, k, num_latents
        self.latent_dtype = dtype
        self.register_buffer("table", latent_table(vocab, num_latents), persistent=False)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.seen: list[Seen] = []
        self.eval_runs: list[list[Seen]] = []
        self._row_offset: dict[int, int] = {}

    def latents_for(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device) % 3 == 0
        return self.table[tokens] + 0.5 * pos.view(1, -1, 1)

    def _outputs(self, tokens):
        """The step's outputs in this module's mode, and the dense view of its latents."""
        lat = (self.latents_for(tokens) * self.scale).to(self.latent_dtype)
        out = {"loss": (self.scale - 1.0) ** 2 + 0.0 * lat.float().sum()}
        if self.mode == "sparse":
            vals, idx = torch.topk(lat, self.k, dim=-1)
            dense = torch.zeros_like(lat).scatter(-1, idx, vals)
            out.update(latent_indices=idx, latent_values=vals)
        else:
            dense = lat
            out["latents"] = lat if self.mode == "dense" else lat.reshape(-1, lat.shape[-1])
        return out, dense.detach().float().cpu()

    def training_step(self, batch, batch_idx):
        tokens = batch["tokens"]
        step = self.trainer.global_step
        offset = self._row_offset.get(step, 0)
        self._row_offset[step] = offset + tokens.shape[0]
        out, dense = self._outputs(tokens)
        self.seen.append(Seen(step, self.global_rank, offset, tokens.detach().cpu(), dense))
        return out

    def _evaluate(self, batch):
        """An evaluation step: the same outputs, kept per evaluation run in ``eval_runs`` (not the sanity check)."""
        tokens = batch["tokens"]
        out, dense = self._outputs(tokens)
        if not self.trainer.sanity_checking:
            run = self.eval_runs[-1]
            rows = sum(s.tokens.shape[0] for s in run)
            run.append(Seen(self.trainer.global_step, self.global_rank, rows, tokens.detach().cpu(), dense))
        return out

    def validation_step(self, batch, batch_idx):
        return self._evaluate(batch)

    def test_step(self, batch, batch_idx):
        return self._evaluate(batch)

    def on_validation_epoch_start(self):
        if not self.trainer.sanity_checking:
            self.eval_runs.append([])

    on_test_epoch_start = on_validation_epoch_start

    def on_train_end(self):
        if getattr(self, "seen_dir", None):  # under ddp_spawn the parent never sees the workers' module
            torch.save(self.seen, Path(self.seen_dir) / f"seen_spawn_{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class DriftingSAE(SyntheticSAE):
    """From ``drift_step`` on, odd latents fire on other tokens (a permuted table) at 60% strength."""

    def __init__(self, drift_step: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.drift_step = drift_step
        gen = torch.Generator().manual_seed(7)
        moved = self.table.clone()
        odd = torch.arange(1, self.num_latents, 2)
        moved[:, odd] = self.table[torch.randperm(self.table.shape[0], generator=gen)][:, odd] * 0.6
        self.register_buffer("moved", moved, persistent=False)

    def latents_for(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.moved if self.trainer.global_step >= self.drift_step else self.table
        pos = torch.arange(tokens.shape[1], device=tokens.device) % 3 == 0
        return table[tokens] + 0.5 * pos.view(1, -1, 1)


class SwitchingSAE(DriftingSAE):
    """Each live latent fires on two tokens of its own. From ``drift_step`` on, latents 1 mod 4 fire on two
    other tokens (a meaning change), latents 3 mod 8 stop firing (a death) and latents 7 mod 8 start (a birth).

    Unlike :class:`DriftingSAE`'s broad latents, whose top tokens differ between windows by chance, these changes
    stand out of sampling noise at a few dozen activations per window (``FeatureHistory``'s meaning changes).
    """

    def __init__(self, drift_step: int = 2, **kwargs) -> None:
        super().__init__(drift_step=drift_step, **kwargs)
        vocab, num_latents = self.table.shape
        latents = torch.arange(2, num_latents)
        first = (2 * latents) % vocab
        self.table.zero_()
        self.table[first, latents], self.table[(first + 1) % vocab, latents] = 2.0, 1.5
        self.moved.copy_(self.table)
        switching = latents[latents % 4 == 1]
        self.moved[:, switching] = 0.0
        moved_first = (2 * switching + vocab // 2) % vocab
        self.moved[moved_first, switching], self.moved[(moved_first + 1) % vocab, switching] = 2.0, 1.5
        self.moved[:, latents[latents % 8 == 3]] = 0.0
        self.table[:, latents[latents % 8 == 7]] = 0.0


def loader(dataset: Dataset | None = None, batch_size: int = 4) -> DataLoader:
    return DataLoader(dataset or TokenDataset(), batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


def read_dir(path: Path) -> dict[str, object]:
    """Every JSON file of a samples directory, parsed, and the full state."""
    out: dict[str, object] = {}
    for file in sorted(Path(path).iterdir()):
        if file.suffix == ".json":
            out[file.name] = json.loads(file.read_text())
        elif file.name == "full_state.pt":
            out[file.name] = torch.load(file, weights_only=True)
    return out


def assert_same(a, b, where="state"):
    """Two collector states (nested dicts of tensors and numbers) are identical, dtypes included."""
    assert a.keys() == b.keys(), where
    for key, value in a.items():
        if isinstance(value, dict):
            assert_same(value, b[key], f"{where}.{key}")
        elif torch.is_tensor(value):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), f"{where}.{key}"
        else:
            assert value == b[key], f"{where}.{key}"


def callback_factory(subdir: str | None = "samples", **defaults):
    """``make_callback(root, **settings)``: a callback on ``defaults`` updated by ``settings``.

    It writes into ``root / subdir`` (``root`` itself when ``subdir`` is None). Each test module states the small
    settings it is written for once, here, instead of a copy of this function.
    """

    def make_callback(root, **settings):
        dirpath = Path(root) / subdir if subdir else root
        return ActivationSampleCallback(**{**defaults, "dirpath": dirpath, **settings})

    return make_callback


#: A callback on small settings that collects every step into the given directory (no report).
make_callback = callback_factory(
    None, collection_freq=1, max_samples_per_feature=3, context_size=2, activation_threshold=0.5,
    top_features_to_save=6, samples_per_feature_to_save=2, write_report=False,
)

#: The small collection of the Trainer oracle tests (test_callback, test_padding, the DDP scripts).
F, K, CTX, THR = 10, 4, 4, 0.5


def check_against_oracle(dirpath, seen, n=K, exclude=()):
    """The samples directory at ``dirpath`` equals the brute-force oracle over ``seen`` (the small collection)."""
    return assert_dir_matches_oracle(read_dir(dirpath), seen, F, K, CTX, THR, n=n, exclude=exclude)


def to_sparse(latents, k=3):
    """TopK of dense latents: ``(indices, values, the dense latents with only those kept)``."""
    values, indices = torch.topk(latents, k, dim=-1)
    return indices, values, torch.zeros_like(latents).scatter(-1, indices, values)


PAD = -100
PAD_ACTIVATION = 9.0


def padded_batches(n, batch=3, seq=8, seed=0, vocab=12, num_latents=9, pad_id=PAD):
    """Token batches with right padding (``PAD`` and mask 0) of random length, and latents on a 0.5 grid."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
        lengths = torch.randint(1, seq + 1, (batch,), generator=gen)
        mask = torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)
        mask[0, 2] = False  # a hole inside a sequence: windows stop at it from both sides
        tokens = torch.where(mask, tokens, pad_id)
        latents = torch.round(torch.randn(batch, seq, num_latents, generator=gen) * 2) / 2
        latents[..., 0] = 0.0
        latents[~mask] = PAD_ACTIVATION  # padding holds activations above any real one: never to be collected
        out.append((tokens, mask, latents))
    return out


#: The plain-loop collection of test_activation_collector and its DDP script: 9 latents, top 4, context 6.
COLLECTOR_SETTINGS = dict(
    max_samples_per_feature=4, context_size=6, activation_threshold=0.5, top_features_to_save=9,
    samples_per_feature_to_save=4, samples_per_interval=2, recent_window_steps=3, write_report=False,
)


def make_collector(**settings):
    """An ``ActivationSampleCollector`` on ``COLLECTOR_SETTINGS`` updated by ``settings``."""
    from lightning_sae_samples import ActivationSampleCollector

    return ActivationSampleCollector(**{**COLLECTOR_SETTINGS, **settings})


#: Arguments of ``write_samples_dir`` for a small state (test_storage and its subprocess script).
WRITE = dict(config={}, tokenizer=None, top_features=3, samples_per_feature=2, rank_by="max_activation")


def state_after(steps, seed=0):
    """The compact state of a small engine after ``steps`` dense updates of random latents."""
    from lightning_sae_samples.engine import SampleCollector

    gen = torch.Generator().manual_seed(seed)
    c = SampleCollector(engine_config(8, 3, 2, 0.5))
    for step in range(steps):
        c.update_dense(torch.randint(0, 9, (2, 5), generator=gen), torch.randn(2, 5, 8, generator=gen) * 2, step)
    return c.state_dict()


def engine_config(num_latents, max_samples, context_size, threshold, *, recent_samples=10, **settings):
    """The engine's settings in the short positional form the engine tests use (no interval samples by default)."""
    from lightning_sae_samples.config import CollectionConfig

    settings.setdefault("samples_per_interval", 0)
    return CollectionConfig(
        num_latents=num_latents, max_samples_per_feature=max_samples, context_size=context_size,
        activation_threshold=threshold, samples_per_feature_to_save=min(max_samples, 10),
        recent_samples_per_feature=recent_samples, **settings,
    )


class BlockPendingDir(Callback):
    """From step ``block`` a regular file sits where the samples save creates its pending directory (this
    stops root as well as a user); it is taken away at step ``unblock``."""

    def __init__(self, samples, block, unblock):
        self.path, self.block, self.unblock = Path(samples) / PENDING_DIR, block, unblock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.block:
            self.path.write_text("in the way")
        elif trainer.global_step == self.unblock and self.path.is_file():
            self.path.unlink()


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_sae.py"


def run_example(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="120")
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "fit", "--config", str(config)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def fit_dirs(out, names):
    """The fits a one-launch test script runs, each with its folder: ``out`` for one fit, ``out/<name>`` for several."""
    return [(name, out if len(names) == 1 else out / name) for name in names]


def end_process_group() -> None:
    """Destroy the default process group, if any, before the interpreter exits.

    A process that exits with a gloo process group alive can abort (SIGABRT: "terminate called without an active
    exception") while the interpreter shuts down (pytorch/pytorch#190489); Lightning leaves the group to its caller.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
