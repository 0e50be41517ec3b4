"""Brute-force reference: exact top-k and statistics over every activation seen, in plain Python."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Seen:
    """One collected micro-batch: its step, rank, row offset within the step, tokens and dense latents."""

    step: int
    rank: int
    row_offset: int
    tokens: torch.Tensor  # [B, T]
    latents: torch.Tensor  # [B, T, F] float (dense view of whatever the SAE returned)
    mask: torch.Tensor | None = None  # [B, T] attention mask, 0/False at padding

    def padding(self, b: int, p: int) -> bool:
        """Padding: masked out, or a negative token id."""
        return int(self.tokens[b, p]) < 0 or (self.mask is not None and not bool(self.mask[b, p]))


@dataclass
class RowsSeen:
    """One collected batch of shuffled rows: each row's ref into a token source, and its dense latents ``[N, F]``.

    ``source``: the source's tokens ``[S, T]`` as a plain tensor (negative ids and ``pad_id`` are padding) for
    an array source, where a ref is ``s * T + t``; for a ring, ``ring`` lists its batches ``(first_ref, [B, T])``
    and ``source`` is unused. ``call`` numbers the update calls: de-duplication's first stage groups the rows of
    one sequence within one call (as the sequence path groups a row of one micro-batch).
    """

    step: int
    rank: int
    refs: list
    latents: torch.Tensor  # [N, F]
    source: torch.Tensor | None = None
    pad_id: int | None = None
    ring: list | None = None
    call: int = 0
    mask: list | None = None  # [N] 0/False: the row is padding

    def locate(self, ref: int) -> tuple[list, int, int]:
        """(the ref's sequence as a list of ids with None at padding, its position, a sequence key)."""
        if self.ring is None:
            seq_len = self.source.shape[1]
            s, t = divmod(ref, seq_len)
            row = [None if (v < 0 or v == self.pad_id) else v for v in self.source[s].tolist()]
            return row, t, s
        for first, tokens in self.ring:
            if first <= ref < first + tokens.numel():
                b, t = divmod(ref - first, tokens.shape[1])
                row = [None if v < 0 else v for v in tokens[b].tolist()]
                return row, t, first + b * tokens.shape[1]
        raise AssertionError(f"ref {ref} is in no ring batch")


def tokens_seen(seen: list) -> int:
    """Tokens that count as seen: every position (or row) that is not padding."""
    total = 0
    for s in seen:
        if isinstance(s, RowsSeen):
            total += sum(_row_token(s, i) is not None for i in range(len(s.refs)))
        else:
            total += sum(not s.padding(b, p) for b in range(s.tokens.shape[0]) for p in range(s.tokens.shape[1]))
    return total


def _row_token(item: RowsSeen, i: int):
    if item.mask is not None and not item.mask[i]:
        return None
    row, t, _ = item.locate(item.refs[i])
    return row[t]


@dataclass
class OracleFeature:
    count: int = 0
    values: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # (value, step, rank, row, pos, context_tokens, acts, ctx_pos)
    every: list = field(default_factory=list)  # (value, step, order, pos) of every activation above threshold
    first_step: int | None = None
    last_step: int | None = None


def deduplicate(samples: list, radius: int) -> list:
    """The two-stage rule of lightning_sae_samples.engine.dedup, written plainly."""
    by_sequence: dict = {}
    for s in samples:
        by_sequence.setdefault(s[8] if len(s) > 8 else (s[1], s[2], s[3]), []).append(s)
    survivors = []
    for group in by_sequence.values():
        accepted = []
        for s in sorted(group, key=lambda s: (-s[0], s[4])):
            if all(abs(s[4] - a[4]) > radius for a in accepted):
                accepted.append(s)
        survivors.extend(accepted)
    best: dict = {}
    for s in sorted(survivors, key=lambda s: (-s[0], s[1], s[2], s[3], s[4])):
        best.setdefault(tuple(s[5]), s)
    return list(best.values())


def _fold_rows(item: RowsSeen, feats: dict, half: int, threshold: float, exclude: tuple) -> None:
    """A batch of rows: the window of each from its source, the row's own activation known, the others NaN.

    Ties go by order key: the ref (array source), or ``rank << 40 | ref`` (a per-process ring); as
    (step, rank, sequence, position) tuples that is the same order.
    """
    lat = item.latents.double()
    for i, ref in enumerate(item.refs):
        token = _row_token(item, i)
        if token is None or token in exclude:
            continue
        row, p, sequence = item.locate(ref)
        lo, hi = p, p + 1
        while lo > max(0, p - half) and row[lo - 1] is not None:
            lo -= 1
        while hi < min(len(row), p + half + 1) and row[hi] is not None:
            hi += 1
        ctx = row[lo:hi]
        rank = 0 if item.ring is None else item.rank
        order = (rank << 40) + ref
        for f in range(lat.shape[1]):
            v = float(lat[i, f])
            if not math.isfinite(v) or not v > threshold:
                continue
            feat = feats[f]
            feat.count += 1
            feat.values.append(v)
            feat.first_step = item.step if feat.first_step is None else min(feat.first_step, item.step)
            feat.last_step = item.step if feat.last_step is None else max(feat.last_step, item.step)
            acts = [v if q == p else math.nan for q in range(lo, hi)]
            group = (item.step, item.rank, item.call, sequence)
            feat.samples.append((v, item.step, rank, sequence, p, ctx, acts, p - lo, group))
            feat.every.append((v, item.step, order, p, (item.rank, item.call), sequence, ctx))


def oracle(seen: list, num_latents: int, k: int, context_size: int, threshold: float,
           dedup: bool = False, exclude: tuple = ()) -> dict[int, OracleFeature]:
    """Every activation above threshold at a position that is neither padding nor an excluded token id.

    A context window runs up to ``context_size // 2`` tokens each side, stopping before the sequence's edge
    and before the nearest padding position on each side. ``seen`` may mix ``[B, T]`` batches and rows.
    """
    half = context_size // 2
    feats = {f: OracleFeature() for f in range(num_latents)}
    for item in seen:
        if isinstance(item, RowsSeen):
            _fold_rows(item, feats, half, threshold, exclude)
    seen = [item for item in seen if not isinstance(item, RowsSeen)]
    # A token's order key is its offset among the tokens its rank folded at its step, micro-batches in row order
    # (their sequence lengths may differ).
    token_offset, folded = {}, {}
    for item in sorted(seen, key=lambda s: (s.step, s.rank, s.row_offset)):
        key = (item.step, item.rank)
        token_offset[id(item)] = folded.get(key, 0)
        folded[key] = folded.get(key, 0) + item.tokens.numel()
    for item in seen:
        tokens = item.tokens.tolist()
        lat = item.latents.double()
        batch, seq = item.tokens.shape
        for b in range(batch):
            for p in range(seq):
                if item.padding(b, p) or tokens[b][p] in exclude:
                    continue
                lo, hi = p, p + 1
                while lo > max(0, p - half) and not item.padding(b, lo - 1):
                    lo -= 1
                while hi < min(seq, p + half + 1) and not item.padding(b, hi):
                    hi += 1
                for f in range(num_latents):
                    v = float(lat[b, p, f])
                    if not math.isfinite(v) or not v > threshold:
                        continue
                    feat = feats[f]
                    feat.count += 1
                    feat.values.append(v)
                    feat.first_step = item.step if feat.first_step is None else min(feat.first_step, item.step)
                    feat.last_step = item.step if feat.last_step is None else max(feat.last_step, item.step)
                    ctx = tokens[b][lo:hi]
                    acts = [float(lat[b, q, f]) if math.isfinite(float(lat[b, q, f])) else 0.0 for q in range(lo, hi)]
                    feat.samples.append((v, item.step, item.rank, item.row_offset + b, p, ctx, acts, p - lo))
                    order = (item.rank << 40) + token_offset[id(item)] + b * seq + p
                    feat.every.append((v, item.step, order, p, item.rank, item.row_offset + b, ctx))
    for feat in feats.values():
        if dedup:
            feat.samples = deduplicate(feat.samples, 2 * half)
        feat.samples.sort(key=lambda s: (-s[0], s[1], s[2], s[3], s[4]))
        feat.samples = feat.samples[:k]
    return feats


def assert_groups_match(record: dict, feat: OracleFeature, config: dict, last_step: int, n: int) -> None:
    """Interval samples (uniform by hash priority) and the recent window's top, against the oracle."""
    from lightning_sae_samples.engine.bins import interval_edges
    from lightning_sae_samples.engine.priority import sample_priority

    if config.get("samples_per_interval"):
        # Intervals and histogram bins hold exactly the values v with edge_i <= v < edge_i+1 (float64 edges).
        edges = [float(e) for e in interval_edges(config["activation_threshold"], config["num_intervals"])[1:-1]]
        groups = record["interval_samples"]
        assert len(groups) == config["num_intervals"]
        for i, group in enumerate(groups):
            members = [s for s in feat.every if sum(1 for e in edges if float(torch.tensor(s[0])) >= e) == i]
            assert group["count"] == len(members)
            ranked = sorted(members, key=lambda s: (-float(sample_priority(s[1], torch.tensor([s[2]]),
                                                                           config["seed"])[0]), s[1], s[2]))
            want = ranked[: min(n, config["samples_per_interval"])]
            got = [(x["activation_value"], x["step"], x["position"]) for x in group["samples"]]
            assert got == [(float(torch.tensor(w[0], dtype=torch.float32)), w[1], w[3]) for w in want]
    else:
        assert "interval_samples" not in record
    if config.get("recent_window_steps"):
        block = last_step // config["recent_window_steps"]
        recent = [s for s in feat.every if s[1] // config["recent_window_steps"] >= block - 1]
        if config.get("deduplicate_contexts"):
            as_samples = [(s[0], s[1], s[4], s[5], s[3], s[6], s) for s in recent]
            recent = [t[-1] for t in deduplicate(as_samples, 2 * (config["context_size"] // 2))]
        want = sorted(recent, key=lambda s: (-s[0], s[1], s[2]))[: min(n, config["recent_samples_per_feature"])]
        got = [(x["activation_value"], x["step"], x["position"]) for x in record["recent_samples"]]
        assert got == [(float(torch.tensor(w[0], dtype=torch.float32)), w[1], w[3]) for w in want]
        assert 0.0 <= record["statistics"]["recent_overlap"] <= 1.0
    else:
        assert "recent_samples" not in record


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
    inner = [float(e) for e in stats["histogram"]["bin_edges"][1:-1]]
    want_hist = [0] * (len(inner) + 1)
    for v in feat.values:
        want_hist[sum(1 for e in inner if float(torch.tensor(v, dtype=torch.float32)) >= e)] += 1
    assert stats["histogram"]["counts"] == want_hist
    got = record["top_samples"]
    want = feat.samples[:n]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        value, step, _rank, _row, pos, ctx, acts, ctx_pos = w[:8]
        assert g["activation_value"] == float(torch.tensor(value, dtype=torch.float32))
        assert (g["step"], g["position"], g["context_tokens"], g["context_position"]) == (step, pos, ctx, ctx_pos)
        assert g["tokens"][-1] == ctx[ctx_pos]
        # Unknown activations (a shuffled row's neighbours) are null in the file, NaN in the oracle.
        got_acts = [math.nan if a is None else a for a in g["context_activations"]]
        assert torch.allclose(torch.tensor(got_acts), torch.tensor(acts, dtype=torch.float32), equal_nan=True)


def assert_dir_matches_oracle(files: dict, seen: list[Seen], num_latents: int, k: int, context_size: int,
                              threshold: float, *, exclude: tuple = (), n: Optional[int] = None) -> dict:
    """A samples directory (``files`` as ``helpers.read_dir`` reads it) holds exactly what the oracle keeps.

    ``n``: samples per feature file (default ``k``).
    """
    n = k if n is None else n
    summary = files["collection_summary.json"]
    feats = oracle(seen, num_latents, k, context_size, threshold, dedup=summary["config"]["deduplicate_contexts"],
                   exclude=exclude)
    seen_tokens = tokens_seen(seen)
    assert summary["tokens_seen"] == seen_tokens
    folded = [s for s in seen if (s.refs if isinstance(s, RowsSeen) else s.tokens.numel())]
    assert summary["steps_collected"] == len({s.step for s in folded})
    alive = [f for f, feat in feats.items() if feat.count]
    assert summary["alive_features"] == len(alive)
    assert summary["never_fired_features"] == num_latents - len(alive)
    assert summary["total_samples_seen"] == sum(feat.count for feat in feats.values())
    assert {e["feature_idx"] for e in summary["top_features_by_activation"]} == set(alive)
    if summary["config"]["rank_features_by"] == "max_activation":
        ranked = [e["max_activation"] for e in summary["top_features_by_activation"]]
        assert ranked == sorted(ranked, reverse=True)
    last_step = max(s.step for s in seen)
    for f in alive:
        record = files[f"feature_{f:05d}_samples.json"]
        assert_feature_file_matches(record, feats[f], seen_tokens, n)
        assert_groups_match(record, feats[f], summary["config"], last_step, n)
    for f in set(range(num_latents)) - set(alive):
        assert f"feature_{f:05d}_samples.json" not in files
    return files


def assert_state_matches(state: dict, seen: list[Seen], num_latents: int, k: int, context_size: int, threshold: float,
                         exclude: tuple = ()) -> None:
    """A collector state (compact or padded) holds the oracle's statistics and exact top-k with their windows."""
    import pytest

    from lightning_sae_samples.state.tables import padded_state

    state = padded_state(state)
    feats = oracle(seen, num_latents, k, context_size, threshold, exclude=exclude)
    half = context_size // 2
    assert int(state["tokens_seen"]) == tokens_seen(seen)
    for f, feat in feats.items():
        assert int(state["count"][f]) == feat.count, f"latent {f}: count"
        kept = int(torch.isfinite(state["top_values"][f]).sum())
        assert kept == len(feat.samples), f"latent {f}: kept"
        for j, (value, step, _rank, _row, pos, ctx, acts, ctx_pos) in enumerate(s[:8] for s in feat.samples):
            assert float(state["top_values"][f, j]) == float(torch.tensor(value, dtype=torch.float32))
            assert int(state["top_step"][f, j]) == step
            assert int(state["top_position"][f, j]) == pos
            window = state["top_context_tokens"][f, j].tolist()
            assert window[half - ctx_pos : half - ctx_pos + len(ctx)] == ctx
            assert [t for t in window if t >= 0] == ctx
            got_acts = [a for a, t in zip(state["top_context_acts"][f, j].tolist(), window) if t >= 0]
            assert got_acts == pytest.approx(acts, nan_ok=True)
        if feat.count:
            values = torch.tensor(feat.values, dtype=torch.float64)
            assert float(state["sum"][f]) == pytest.approx(float(values.sum()))
            assert float(state["max"][f]) == float(values.max())
            assert float(state["min"][f]) == float(values.min())
        else:
            assert int(state["first_step"][f]) == -1
