"""Brute-force reference of one history window: every activation of the window's steps, in plain Python."""

from __future__ import annotations

import math

from oracle import Seen, oracle


def window_oracle(seen: list[Seen], num_latents: int, threshold: float, context_size: int, top_tokens: int,
                  samples: int) -> dict[int, dict]:
    """Per latent that fired: count, max, sum, its ``top_tokens`` most frequent token ids and its top samples."""
    feats = oracle(seen, num_latents, samples, context_size, threshold)
    tokens: dict[int, dict[int, int]] = {}
    for item in seen:
        ids = item.tokens.tolist()
        for b in range(item.tokens.shape[0]):
            for p in range(item.tokens.shape[1]):
                if item.padding(b, p):
                    continue
                for f in range(num_latents):
                    v = float(item.latents[b, p, f])
                    if math.isfinite(v) and v > threshold:
                        per = tokens.setdefault(f, {})
                        per[ids[b][p]] = per.get(ids[b][p], 0) + 1
    out = {}
    for f, feat in feats.items():
        if not feat.count:
            continue
        ranked = sorted(tokens[f].items(), key=lambda item: (-item[1], item[0]))[:top_tokens]
        out[f] = {"count": feat.count, "max": max(feat.values), "sum": sum(feat.values), "tokens": ranked,
                  "samples": [(s[0], s[5]) for s in feat.samples]}
    return out


def assert_window_matches(window: dict, expected: dict[int, dict], saved: set[int]) -> None:
    """A history window (see ``state.history``) equals :func:`window_oracle`'s result."""
    assert window["latent"].tolist() == sorted(expected)
    for row, latent in enumerate(window["latent"].tolist()):
        want = expected[latent]
        assert int(window["count"][row]) == want["count"], latent
        assert float(window["max"][row]) == want["max"], latent
        assert math.isclose(float(window["sum"][row]), want["sum"], rel_tol=1e-12), latent
        got = [(int(t), int(c)) for t, c in zip(window["token_ids"][row], window["token_counts"][row]) if t >= 0]
        assert got == want["tokens"], latent
    samples = window["samples"]
    by_latent: dict[int, list] = {}
    for i, latent in enumerate(samples["latent"].tolist()):
        context = [t for t in samples["context_tokens"][i].tolist() if t >= 0]
        by_latent.setdefault(latent, []).append((float(samples["values"][i]), context))
    assert by_latent == {f: expected[f]["samples"] for f in sorted(saved) if f in expected}
