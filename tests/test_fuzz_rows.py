"""Property test: shuffled rows, mixed across steps, with refs into an array or a ring, collect what the oracle keeps.

Hypothesis draws the corpus (with padding), the latents (on a 0.5 grid: many ties), a random permutation of the
rows cut into consecutive steps (one update each; rows of a ring batch may come steps after it was added), the
source, dense or sparse latents, bf16/fp16/fp32, excluded ids, sizes and thresholds, how kept samples hold their
windows (``row_windows``: refs into an array source, or tokens) and a resume from a checkpoint written to disk; with
de-duplication the written samples directory is compared. With an array source the other ``row_windows`` runs
too, and both keep the same samples with the same windows. Profiles as in tests/test_fuzz_collector.py.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import read_dir
from oracle import RowsSeen, assert_dir_matches_oracle, assert_state_matches

from lightning_sae_samples import ActivationSampleCollector, LatentInputError
from lightning_sae_samples.state.tables import padded_state
from lightning_sae_samples.token_sources import ArrayTokenSource, TokenRing

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@st.composite
def shuffles(draw):
    num_seq, seq, num_latents = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    n = num_seq * seq
    ids = draw(st.lists(st.integers(-1, 9), min_size=n, max_size=n))  # -1: padding; 0: the pad id of some runs
    values = draw(st.lists(st.integers(-2, 6), min_size=n * num_latents, max_size=n * num_latents))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    return dict(
        tokens=torch.tensor(ids).view(num_seq, seq),
        latents=(torch.tensor(values, dtype=torch.float32) / 2).view(n, num_latents),
        perm=torch.tensor(draw(st.permutations(range(n))), dtype=torch.int64),
        cuts=cuts,
        step_gaps=draw(st.lists(st.integers(1, 2), min_size=len(cuts) + 1, max_size=len(cuts) + 1)),
        source=draw(st.sampled_from(("array", "ring"))),
        pad_id=draw(st.sampled_from((None, 0))),
        mode=draw(st.sampled_from(("dense", "sparse"))),
        k=draw(st.integers(1, num_latents)),
        dtype=draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16))),
        threshold=draw(st.sampled_from((0.0, 0.5, 1.0))),
        context_size=draw(st.integers(0, 6)),
        max_samples=draw(st.integers(1, 4)),
        exclude=tuple(draw(st.sets(st.integers(1, 9), max_size=2))),
        dedup=draw(st.booleans()),
        ring_batch=draw(st.integers(1, num_seq)),
        row_windows=draw(st.sampled_from(("auto", "tokens", "refs"))),
        resume_at=draw(st.integers(0, len(cuts) + 1)),  # before this update (past the last: no resume)
    )


def collect(case, row_windows):
    """Run the case with this ``row_windows``: the collector (resumed where the case says) and what it saw."""
    tokens, latents, perm = case["tokens"], case["latents"].to(case["dtype"]), case["perm"]
    num_seq, seq = tokens.shape
    num_latents = latents.shape[1]
    ring_batches, ring = [], None
    if case["source"] == "array":
        source = ArrayTokenSource(tokens, pad_token_id=case["pad_id"])
    else:
        # Sequences enter the ring a few at a time, and a step's rows may be of any batch added so far.
        ring = TokenRing(tokens.numel(), pad_token_id=case["pad_id"])
        source = ring

    def new_collector():
        return ActivationSampleCollector(
            num_latents=num_latents, max_samples_per_feature=case["max_samples"], samples_per_feature_to_save=1,
            context_size=case["context_size"], activation_threshold=case["threshold"],
            exclude_token_ids=case["exclude"], deduplicate_contexts=case["dedup"], samples_per_interval=1,
            token_source=source, write_report=False, row_windows=row_windows,
        )

    collector = new_collector()
    seen, step, start = [], 0, 0
    bounds = [*case["cuts"], len(perm)]
    for call, (gap, stop) in enumerate(zip(case["step_gaps"], bounds)):
        if call == case["resume_at"]:
            # A checkpoint on disk, loaded as an untrusted file is, into a new collector over the same source.
            buffer = io.BytesIO()
            torch.save(collector.state_dict(), buffer)
            buffer.seek(0)
            collector = new_collector()
            collector.load_state_dict(torch.load(buffer, weights_only=True))
        step += gap
        part = perm[start:stop]
        start = stop
        refs = part.clone()
        if ring is not None:
            # Add the batches the rows need; ring refs then follow the order the batches were added in.
            while len(ring_batches) * case["ring_batch"] < num_seq and (
                not len(part) or int(part.max()) // seq >= len(ring_batches) * case["ring_batch"]
            ):
                lo = len(ring_batches) * case["ring_batch"]
                batch = tokens[lo : lo + case["ring_batch"]]
                ring_batches.append((ring.add(batch), batch.where(batch != case["pad_id"], -1)
                                     if case["pad_id"] is not None else batch))
            refs = ring_batches[0][0] + part  # sequences were added in order: the ring's refs are the flat indices
        given = latents[part]
        if case["mode"] == "sparse":
            values, indices = given.topk(case["k"], dim=-1)
            collector.update(token_refs=refs, latent_indices=indices, latent_values=values, step=step)
            rows = torch.zeros(given.shape).scatter(-1, indices, values.float())
        else:
            collector.update(token_refs=refs, latents=given, step=step)
            rows = given.float()
        seen.append(RowsSeen(step, 0, refs.tolist(), rows, source=tokens, pad_id=case["pad_id"],
                             ring=list(ring_batches) if ring is not None else None, call=len(seen)))
    return collector, seen


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal entries, NaN equal to NaN (the window dtypes may differ: tokens mode keeps the latents' own)."""
    if a.is_floating_point():
        return torch.equal(a.double().nan_to_num(-7.0), b.double().nan_to_num(-7.0))
    return torch.equal(a.long(), b.long())


def run_case(case):
    if case["source"] == "ring" and case["row_windows"] == "refs":
        case = {**case, "row_windows": "tokens"}  # refused: see test_rows.py
    collector, seen = collect(case, case["row_windows"])
    num_latents = case["latents"].shape[1]
    kept = collector.state_dict()["collector"]
    if kept is None:
        return
    state = collector.with_windows(kept)
    if case["source"] == "array":
        # Array refs last: "auto" keeps them, and the other way of keeping windows keeps the same samples.
        assert ("token_ref" in kept["top"]) == (case["row_windows"] != "tokens")
        assert ("context_tokens" in kept["top"]) == (case["row_windows"] == "tokens")
        other, _ = collect(case, "tokens" if case["row_windows"] != "tokens" else "refs")
        want = padded_state(other.with_windows(other.state_dict()["collector"]))
        got = padded_state(state)
        assert got.keys() == want.keys()
        for name, value in got.items():
            if isinstance(value, torch.Tensor):
                assert same_values(value, want[name]), name
            else:
                assert value == want[name], name
    if not case["dedup"]:
        assert_state_matches(state, seen, num_latents, case["max_samples"], case["context_size"], case["threshold"],
                             exclude=case["exclude"])
        return
    with tempfile.TemporaryDirectory() as tmp:
        collector.save(Path(tmp) / "samples")
        assert_dir_matches_oracle(read_dir(Path(tmp) / "samples"), seen, num_latents, case["max_samples"],
                                  case["context_size"], case["threshold"], exclude=case["exclude"], n=1)


@hypothesis.given(shuffles())
def test_shuffled_rows_from_any_source_collect_what_the_oracle_keeps(case):
    run_case(case)


@hypothesis.given(shuffles(), st.integers(0, 1 << 20))
def test_a_bad_ref_changes_nothing(case, offset):
    tokens, latents = case["tokens"], case["latents"]
    collector = ActivationSampleCollector(num_latents=latents.shape[1], context_size=case["context_size"],
                                          token_source=ArrayTokenSource(tokens), activation_threshold=0.0)
    collector.update(token_refs=case["perm"], latents=latents[case["perm"]], step=0)
    before = collector.state_dict()
    bad = case["perm"].clone()
    bad[len(bad) // 2] = tokens.numel() + offset if offset % 2 else -1 - offset
    with pytest.raises(LatentInputError, match=rf"ref {int(bad[len(bad) // 2])}\b.*\[0, {tokens.numel()}\)"):
        collector.update(token_refs=bad, latents=latents[case["perm"]], step=1)
    after = collector.state_dict()
    assert after["collector"]["last_collected_step"] == before["collector"]["last_collected_step"]
    for name in ("count", "sum", "tokens_seen", "max"):
        assert torch.equal(after["collector"][name], before["collector"][name])
