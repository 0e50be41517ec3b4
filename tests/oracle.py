"""Brute-force reference: exact top-k and statistics over every activation seen, in plain Python."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Seen:
    """One collected micro-batch: its step, rank, row offset within the step, tokens and dense latents."""

    step: int
    rank: int
    row_offset: int
    tokens: torch.Tensor  # [B, T]
    latents: torch.Tensor  # [B, T, F] float (dense view of whatever the SAE returned)


@dataclass
class OracleFeature:
    count: int = 0
    values: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # (value, step, rank, row, pos, context_tokens, acts, ctx_pos)
    first_step: int | None = None
    last_step: int | None = None


def oracle(seen: list[Seen], num_latents: int, k: int, context_size: int, threshold: float) -> dict[int, OracleFeature]:
    half = context_size // 2
    feats = {f: OracleFeature() for f in range(num_latents)}
    for item in seen:
        tokens = item.tokens.tolist()
        lat = item.latents.double()
        batch, seq = item.tokens.shape
        for b in range(batch):
            for p in range(seq):
                for f in range(num_latents):
                    v = float(lat[b, p, f])
                    if not math.isfinite(v) or not v > threshold:
                        continue
                    feat = feats[f]
                    feat.count += 1
                    feat.values.append(v)
                    feat.first_step = item.step if feat.first_step is None else min(feat.first_step, item.step)
                    feat.last_step = item.step if feat.last_step is None else max(feat.last_step, item.step)
                    lo, hi = max(0, p - half), min(seq, p + half + 1)
                    ctx = tokens[b][lo:hi]
                    acts = [float(lat[b, q, f]) if math.isfinite(float(lat[b, q, f])) else 0.0 for q in range(lo, hi)]
                    feat.samples.append((v, item.step, item.rank, item.row_offset + b, p, ctx, acts, p - lo))
    for feat in feats.values():
        feat.samples.sort(key=lambda s: (-s[0], s[1], s[2], s[3], s[4]))
        feat.samples = feat.samples[:k]
    return feats


def assert_feature_file_matches(record: dict, feat: OracleFeature, tokens_seen: int, n: int) -> None:
    stats = record["statistics"]
    assert stats["activation_count"] == feat.count
    assert stats["num_samples"] == len(feat.samples)
    vals = torch.tensor(feat.values, dtype=torch.float64)
    assert stats["all_time_max"] == float(torch.tensor(max(feat.values), dtype=torch.float32))
    assert stats["min_activation"] == float(torch.tensor(min(feat.values), dtype=torch.float32))
    assert math.isclose(stats["mean_activation"], float(vals.mean()), rel_tol=1e-6, abs_tol=1e-6)
    assert math.isclose(stats["std_activation"], float(vals.std(unbiased=False)), rel_tol=1e-5, abs_tol=1e-5)
    assert stats["tokens_seen"] == tokens_seen
    assert stats["first_step"] == feat.first_step and stats["last_step"] == feat.last_step
    inner = [float(torch.tensor(e, dtype=torch.float32)) for e in stats["histogram"]["bin_edges"][1:-1]]
    want_hist = [0] * (len(inner) + 1)
    for v in feat.values:
        want_hist[sum(1 for e in inner if float(torch.tensor(v, dtype=torch.float32)) >= e)] += 1
    assert stats["histogram"]["counts"] == want_hist
    got = record["top_samples"]
    want = feat.samples[:n]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        value, step, _rank, _row, pos, ctx, acts, ctx_pos = w
        assert g["activation_value"] == float(torch.tensor(value, dtype=torch.float32))
        assert (g["step"], g["position"], g["context_tokens"], g["context_position"]) == (step, pos, ctx, ctx_pos)
        assert g["tokens"][-1] == ctx[ctx_pos]
        assert torch.allclose(torch.tensor(g["context_activations"]), torch.tensor(acts, dtype=torch.float32))
