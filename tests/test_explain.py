"""``explain``: prompts, held-out scoring, resume, the request budget, the endpoint's retries, imports and export.

The explainer here is a rule (``KeywordBackend``): it explains a latent by its most often marked token and
answers a detection prompt with whether that token is in the text. It is exact where a model is not, so the
tests can check what the runner does with answers; the slow tests run real models (tests/test_explain_models.py).
"""

import gzip
import io
import json
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
from helpers import SyntheticSAE, TokenDataset, loader, trainer
from rich.console import Console

from lightning_sae_samples import ActivationSampleAnalyzer, ActivationSampleCallback
from lightning_sae_samples.analysis import neuronpedia as npx
from lightning_sae_samples.analysis.explanations import (
    ExplanationRecord,
    append_explanations,
    iter_explanation_records,
    read_explanations,
)
from lightning_sae_samples.analysis.records import ContextToken, Sample
from lightning_sae_samples.explain.backends import EndpointBackend, EndpointError
from lightning_sae_samples.explain.imports import ImportFormatError, import_explanations
from lightning_sae_samples.explain.prompts import (
    PROMPT_VERSION,
    context_text,
    highlighted,
    parse_detection,
    parse_explanation,
)
from lightning_sae_samples.explain.runner import ExplainSettings, RequestBudgetError, explain_latents
from lightning_sae_samples.explain.scoring import balanced_accuracy, split_samples

NUM_LATENTS = 12
SETTINGS = dict(shown_top=6, shown_interval=2, positives=3, negatives=3)


class KeywordBackend:
    """Explains by the most often marked token; says yes when the explanation's token is in the text."""

    def __init__(self, name="keyword", interrupt_after=None):
        self.model_name = name
        self.conversations = []
        self.interrupt_after = interrupt_after

    def answers(self, conversations, max_tokens):
        for i, conversation in enumerate(conversations):
            if self.interrupt_after is not None and len(self.conversations) == self.interrupt_after:
                raise KeyboardInterrupt
            self.conversations.append(conversation)
            user = conversation[-1]["content"]
            if user.startswith("Example 1:"):
                marked = Counter(re.findall(r"<<(.*?)>>", user))
                yield i, f"Looking at the examples.\n[EXPLANATION]: {marked.most_common(1)[0][0]}"
            else:
                explanation = re.search(r"Explanation: (.*)", user).group(1)
                text = re.search(r"Text: (.*)", user).group(1)
                yield i, "Yes" if explanation.split()[0] in text.split() else "No."

    def close(self):
        pass


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    cb = ActivationSampleCallback(
        dirpath=root / "samples", collection_freq=1, max_samples_per_feature=20, context_size=4,
        activation_threshold=0.5, samples_per_feature_to_save=10, write_report=False,
    )
    trainer(root, [cb], max_steps=4).fit(SyntheticSAE(num_latents=NUM_LATENTS), loader(TokenDataset(num_sequences=48)))
    return root / "samples"


@pytest.fixture
def fresh(samples, tmp_path):
    """A copy of the samples directory without a sidecar."""
    copy = tmp_path / "samples"
    shutil.copytree(samples, copy, ignore=shutil.ignore_patterns("explanations"))
    return copy


def _sample(texts, acts, position):
    return Sample(0, acts[position], 1, position, tuple(ContextToken(i, t, a) for i, (t, a) in
                                                         enumerate(zip(texts, acts))), position, "".join(texts))


def test_firing_tokens_are_marked_and_given_on_a_0_to_10_scale():
    sample = _sample([" And", " God", " said", ",", " Let"], [0.0, 5.0, 4.0, 0.5, 0.0], 1)
    text, levels = highlighted(sample, scale=5.0)
    assert text == "And <<God said>>, Let"
    assert levels == [("God", 10), ("said", 8)]
    wordpiece = _sample(["the", "begin", "##ning", "of"], [0.0, 3.0, 0.1, 0.0], 1)
    assert highlighted(wordpiece, 3.0)[0] == "the <<begin>>ning of"
    assert context_text(_sample(["the", " begin", "ning"], [0, 1, 0], 1)) == "the beginning"


def test_answers_are_read_leniently():
    assert parse_explanation("Some thinking\n[EXPLANATION]: Names of prophets\nmore") == "Names of prophets"
    assert parse_explanation('  "the word Lord"  ') == "the word Lord"
    assert len(parse_explanation("word " * 100)) <= 203
    assert parse_detection("Yes, it does") and parse_detection(" yes.")
    assert not parse_detection("No") and not parse_detection("") and not parse_detection("Maybe yes")


def test_balanced_accuracy_weighs_both_classes_alike():
    assert balanced_accuracy([True, False, False, False], [True, False, False, False]) == 1.0
    assert balanced_accuracy([True, False, False, False], [False, False, False, False]) == 0.5
    assert balanced_accuracy([True, True, False], [True, False, True]) == 0.25


def test_held_out_contexts_are_never_in_the_prompt(samples):
    analyzer = ActivationSampleAnalyzer(samples)
    for idx in analyzer.saved_features:
        split = split_samples(analyzer.feature(idx, 20), 6, 2, 5)
        shown = {context_text(s) for s in split.shown}
        held = {context_text(s) for s in split.held_out}
        assert split.shown and not shown & held and all(s.feature_idx == idx for s in split.held_out)


def test_explain_scores_every_latent_and_a_perfect_rule_beats_a_random_explanation(fresh):
    backend = KeywordBackend()
    result = explain_latents(fresh, backend, ExplainSettings(top=5, **SETTINGS))
    records = read_explanations(fresh)
    assert sorted(records) == sorted(result.latents) and len(result.latents) == 5
    for record in records.values():
        assert record.model == "keyword" and record.prompt_version == PROMPT_VERSION and record.source == "explain"
        assert record.samples_step == 4 and record.kind == "explanation"
        assert record.score_contexts == 6 and 0 <= record.score <= 1 and record.random_score is not None
        assert record.text.startswith("[")  # a token of this run, e.g. "[13]"
    mean = sum(r.score for r in records.values()) / 5
    baseline = sum(r.random_score for r in records.values()) / 5
    assert mean > baseline
    assert result.requests == 5 + 5 * 6 * 2
    # Each context is asked twice: with the latent's explanation, then with a decoy: tokens another latent fires on.
    analyzer = ActivationSampleAnalyzer(fresh)
    fired_on = {}
    for i in analyzer.saved_features:
        feature = analyzer.feature(i)
        kept = list(feature.samples) + [s for group in feature.interval_groups for s in group.samples]
        fired_on[i] = {s.activating_token.text for s in kept}
    for k, latent in enumerate(result.latents):
        asked = [re.search(r"Explanation: (.*)", c[-1]["content"]).group(1)
                 for c in backend.conversations[5 + 12 * k: 5 + 12 * (k + 1)]]
        assert set(asked[0::2]) == {records[latent].text}
        (baseline,) = set(asked[1::2])
        assert baseline != records[latent].text
        assert any(set(baseline.split()) <= tokens for i, tokens in fired_on.items() if i != latent)
    # Held-out contexts of a latent are not in its explanation prompt; some of its own contexts are asked about.
    for k, latent in enumerate(result.latents):
        own = {context_text(s) for s in analyzer.feature(latent, 30).samples}
        prompt_texts = {" ".join(t.replace("<<", "").replace(">>", "").split())
                        for t in re.findall(r"Example \d+: (.*)", backend.conversations[k][-1]["content"])}
        asked = {re.search(r"Text: (.*)", c[-1]["content"]).group(1)
                 for c in backend.conversations[5 + 12 * k: 5 + 12 * (k + 1)]}
        assert asked & own and not asked & prompt_texts and len(prompt_texts) >= 6


def test_a_rerun_skips_what_is_done_and_another_model_explains_again(fresh):
    explain_latents(fresh, KeywordBackend(), ExplainSettings(top=3, **SETTINGS))
    again = KeywordBackend()
    result = explain_latents(fresh, again, ExplainSettings(top=3, **SETTINGS))
    assert again.conversations == [] and result.requests == 0 and len(result.skipped) == 3
    other = KeywordBackend("another-model")
    explain_latents(fresh, other, ExplainSettings(top=3, score=False, **SETTINGS))
    assert len(other.conversations) == 3
    assert {r.model for r in read_explanations(fresh).values()} == {"another-model"}


def test_an_interrupted_run_keeps_what_arrived_and_the_next_run_does_the_rest(fresh):
    with pytest.raises(KeyboardInterrupt):
        explain_latents(fresh, KeywordBackend(interrupt_after=2), ExplainSettings(top=4, **SETTINGS))
    assert len(read_explanations(fresh)) == 2 and all(r.score is None for r in read_explanations(fresh).values())
    with pytest.raises(KeyboardInterrupt):  # interrupted while scoring: 2 explanations, then 12 of 48 answers
        explain_latents(fresh, KeywordBackend(interrupt_after=14), ExplainSettings(top=4, **SETTINGS))
    records = read_explanations(fresh)
    assert len(records) == 4 and sum(r.score is not None for r in records.values()) == 1
    rest = KeywordBackend()
    result = explain_latents(fresh, rest, ExplainSettings(top=4, **SETTINGS))
    assert result.explained == [] and len(result.scored) == 3 and len(rest.conversations) == 3 * 12
    assert all(r.score is not None for r in read_explanations(fresh).values())


def _scores(samples_dir):
    return {i: (r.text, r.score, r.random_score, r.score_contexts) for i, r in read_explanations(samples_dir).items()}


def test_scores_are_the_same_in_one_go_by_parts_and_resumed(fresh, tmp_path):
    settings = dict(top=6, **SETTINGS)
    explain_latents(fresh, KeywordBackend(), ExplainSettings(**settings))
    whole = _scores(fresh)
    parts, resumed = tmp_path / "parts", tmp_path / "resumed"
    for copy in (parts, resumed):
        shutil.copytree(fresh, copy, ignore=shutil.ignore_patterns("explanations"))
    latents = list(whole)
    explain_latents(parts, KeywordBackend(), ExplainSettings(features=latents[4:], **SETTINGS))
    explain_latents(parts, KeywordBackend(), ExplainSettings(features=latents[1:3], **SETTINGS))
    explain_latents(parts, KeywordBackend(), ExplainSettings(**settings))  # the rest
    with pytest.raises(KeyboardInterrupt):  # 6 explanations, then the scores of one latent and a half
        explain_latents(resumed, KeywordBackend(interrupt_after=6 + 18), ExplainSettings(**settings))
    explain_latents(resumed, KeywordBackend(), ExplainSettings(**settings))
    assert len(whole) == 6 and all(score is not None for _, score, _, _ in whole.values())
    assert _scores(parts) == whole
    assert _scores(resumed) == whole


def test_more_requests_than_allowed_are_refused_unless_yes(fresh):
    with pytest.raises(RequestBudgetError, match=r"up to 26 requests.*--max-requests 10.*--yes"):
        explain_latents(fresh, KeywordBackend(), ExplainSettings(top=2, max_requests=10, **SETTINGS))
    assert read_explanations(fresh) == {}
    explain_latents(fresh, KeywordBackend(), ExplainSettings(top=2, max_requests=10, yes=True, **SETTINGS))
    assert len(read_explanations(fresh)) == 2


def test_features_and_min_frequency_choose_the_latents(fresh):
    analyzer = ActivationSampleAnalyzer(fresh)
    stats = {s.feature_idx: s for s in analyzer.features()}
    result = explain_latents(fresh, KeywordBackend(), ExplainSettings(features=[7, 3, 7], score=False, **SETTINGS))
    assert result.latents == [7, 3]
    cut = sorted(s.frequency for s in stats.values())[len(stats) // 2]
    result = explain_latents(fresh, KeywordBackend(), ExplainSettings(min_frequency=cut, score=False, **SETTINGS))
    assert result.latents and all(stats[i].frequency >= cut for i in result.latents)


def test_the_command_refuses_a_large_run_before_sending_anything(fresh):
    # Port 9 (discard) is never contacted: the budget check comes first.
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_sae_samples", "explain", str(fresh), "--endpoint", "http://127.0.0.1:9/v1",
         "--model", "m", "--top", "3", "--max-requests", "5"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "more than --max-requests 5" in proc.stderr and "--yes" in proc.stderr
    assert not (fresh / "explanations").exists()


class FakeClock:
    """Seconds that pass only when a backend answers (``KeywordBackend`` answers at once)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class TimedKeywordBackend(KeywordBackend):
    """``KeywordBackend`` taking ``seconds`` of ``clock`` per answer."""

    def __init__(self, clock, seconds=2.0):
        super().__init__()
        self.clock, self.seconds = clock, seconds

    def answers(self, conversations, max_tokens):
        for answer in super().answers(conversations, max_tokens):
            self.clock.now += self.seconds
            yield answer


def test_progress_outside_a_terminal_is_a_line_every_few_requests_with_rate_and_time_left(fresh, monkeypatch):
    from types import SimpleNamespace

    from lightning_sae_samples.explain import progress as progress_module

    clock = FakeClock()
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=clock))
    out = io.StringIO()
    result = explain_latents(fresh, TimedKeywordBackend(clock), ExplainSettings(top=5, **SETTINGS),
                             console=Console(file=out, width=200))  # a file: not a terminal
    lines = out.getvalue().splitlines()
    assert lines[0] == ("explain: 65 requests for 0/5 latents explained, 0/5 latents scored; a line every 3 requests"
                        " or 60 s")
    # Two seconds an answer: 0.5 requests/s, and the time left is what is left at that rate.
    assert lines[1] == ("explain: 3/65 requests, 3/5 latents explained, 0/5 latents scored, 0.50 requests/s,"
                        " about 2 min 4 s left")
    assert lines[3].endswith("9/65 requests, 5/5 latents explained, 0/5 latents scored, 0.50 requests/s, about 1 min"
                             " 52 s left")
    assert lines[-1] == "explain: 65/65 requests, 5/5 latents explained, 5/5 latents scored, 0.50 requests/s"
    assert len(lines) == 1 + 65 // 3 + 1 and result.requests == 65
    # Each latent counts as scored once its last answer is in and its score is written.
    scored = [int(re.search(r"(\d)/5 latents scored", line).group(1)) for line in lines[1:]]
    assert scored == sorted(scored) and scored[-1] == 5


def test_progress_on_a_terminal_is_a_live_display_of_latents_and_requests(fresh):
    from lightning_sae_samples.explain.progress import ExplainProgress

    clock = FakeClock()
    progress = ExplainProgress(Console(file=io.StringIO(), force_terminal=True, width=150), requests=65,
                               to_explain=5, to_score=5, clock=clock)
    try:
        for _ in range(3):
            clock.now += 2.0
            progress.advance("explained")
        shown = Console(file=io.StringIO(), width=150, record=True)
        shown.print(progress.display.get_renderable())
        rows = shown.export_text().splitlines()
    finally:
        progress.stop()
    assert [row.split()[0] for row in rows] == ["Latents", "Latents", "Requests"]
    explained, scored, requests = rows
    assert "3/5" in explained and "0/5" in scored
    assert "3/65" in requests and "0.50 requests/s" in requests
    assert "0:00:06 elapsed" in requests and "0:02:04 left" in requests  # the time left at 0.5 requests/s


def test_the_whole_run_shows_on_a_terminal_and_is_taken_down_at_the_end(fresh):
    out = io.StringIO()
    explain_latents(fresh, KeywordBackend(), ExplainSettings(top=3, **SETTINGS),
                    console=Console(file=out, force_terminal=True, width=150))
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "Latents explained" in text and "Latents scored" in text and "3/3" in text and "39/39" in text
    assert "requests/s" in text
    assert out.getvalue().rstrip().endswith(("\x1b[2K", "\x1b[?25h"))  # transient: erased, cursor back


# ------------------------------------------------------------------------------------------------ endpoint
def _chat(content):
    return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": content}}]})


def test_endpoint_retries_with_backoff_and_honours_retry_after():
    calls, sleeps = [], []

    def handler(request):
        calls.append(json.loads(request.content))
        if len(calls) == 1:
            return httpx.Response(503, text="busy")
        if len(calls) == 2:
            return httpx.Response(429, headers={"Retry-After": "7"}, text="slow down")
        if len(calls) == 3:
            raise httpx.ConnectError("refused")
        return _chat("an answer")

    backend = EndpointBackend("http://x/v1", "m", api_key="k", retries=3, backoff=1.0, sleep=sleeps.append,
                              transport=httpx.MockTransport(handler))
    assert list(backend.answers([[{"role": "user", "content": "hi"}]], 5)) == [(0, "an answer")]
    assert len(calls) == 4 and calls[0]["model"] == "m" and calls[0]["max_tokens"] == 5
    assert 1.0 <= sleeps[0] <= 1.25 and sleeps[1] == 7.0 and 4.0 <= sleeps[2] <= 5.0


def test_endpoint_gives_up_after_the_retries_and_fails_at_once_on_a_client_error():
    sleeps = []
    backend = EndpointBackend("http://x/v1/chat/completions", "m", retries=2, sleep=sleeps.append,
                              transport=httpx.MockTransport(lambda r: httpx.Response(500, text="boom")))
    with pytest.raises(EndpointError, match="failed 3 times.*HTTP 500"):
        list(backend.answers([[{"role": "user", "content": "hi"}]], 5))
    assert len(sleeps) == 2
    calls = []
    backend = EndpointBackend("http://x/v1", "m", sleep=sleeps.append,
                              transport=httpx.MockTransport(lambda r: calls.append(r) or httpx.Response(401)))
    with pytest.raises(EndpointError, match="refused the request.*HTTP 401"):
        list(backend.answers([[{"role": "user", "content": "hi"}]], 5))
    assert len(calls) == 1 and str(calls[0].url) == "http://x/v1/chat/completions"


def test_endpoint_keeps_several_requests_in_flight():
    barrier = threading.Barrier(4, timeout=20)

    def handler(request):
        barrier.wait()  # only passes when 4 requests are in flight at once
        return _chat(json.loads(request.content)["messages"][0]["content"])

    backend = EndpointBackend("http://x/v1", "m", concurrency=4, transport=httpx.MockTransport(handler))
    conversations = [[{"role": "user", "content": str(i)}] for i in range(8)]
    assert sorted(backend.answers(conversations, 5)) == [(i, str(i)) for i in range(8)]


# ------------------------------------------------------------------------------------------- import, export
def test_delphi_explanations_and_detection_scores_are_imported(fresh, tmp_path):
    run = tmp_path / "results"
    (run / "explanations").mkdir(parents=True)
    (run / "scores" / "detection").mkdir(parents=True)
    (run / "explanations" / "layers.3_latent5.txt").write_text(json.dumps("Numbers  in\nverses"))
    (run / "explanations" / "layers.3_latent9.txt").write_text(json.dumps("the token [3]"))
    contexts = [{"activating": a, "prediction": p} for a, p in [(True, True), (True, False), (False, False),
                                                                  (False, False), (False, None)]]
    (run / "scores" / "detection" / "layers.3_latent5.txt").write_text(json.dumps(contexts))
    assert import_explanations(fresh, run / "explanations") == (2, "delphi")
    records = read_explanations(fresh)
    assert records[5].text == "Numbers in verses" and records[5].source == "delphi"
    assert records[5].score == 0.75 and records[5].score_contexts == 4 and records[9].score is None


def test_neuronpedia_exports_are_imported_and_bad_rows_refused_whole(fresh, tmp_path):
    rows = [{"modelId": "gpt2-small", "layer": "6-res-jb", "index": "3", "description": "old",
             "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"},
            {"modelId": "gpt2-small", "layer": "6-res-jb", "index": 3, "description": "Bible names",
             "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"}]
    batch = tmp_path / "explanations" / "batch-0.jsonl.gz"
    batch.parent.mkdir()
    batch.write_bytes(gzip.compress("\n".join(map(json.dumps, rows)).encode()))
    assert import_explanations(fresh, tmp_path) == (2, "neuronpedia")
    assert read_explanations(fresh)[3].text == "Bible names" and read_explanations(fresh)[3].model == "gpt-4o-mini"
    array = tmp_path / "export.json"
    array.write_text(json.dumps([{"index": "4", "description": "x"}, {"index": str(NUM_LATENTS), "description": "y"}]))
    with pytest.raises(ImportFormatError, match=r"export.json, row 1: latent 12 does not exist"):
        import_explanations(fresh, array)
    array.write_text(json.dumps({"explanations": [{"index": "-1", "description": "x"}]}))
    with pytest.raises(ImportFormatError, match=r"row 0: field `index`"):
        import_explanations(fresh, array)
    assert len(list(iter_explanation_records(fresh))) == 2


def test_the_import_command(fresh, tmp_path):
    export = tmp_path / "np.jsonl"
    export.write_text(json.dumps({"index": "2", "description": "commas", "explanationModelName": "m"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "lightning_sae_samples", "import-explanations", str(fresh),
                           str(export)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Imported 1 neuronpedia explanations" in proc.stdout and read_explanations(fresh)[2].text == "commas"


def test_neuronpedia_export_carries_the_explanations(fresh, tmp_path):
    analyzer = ActivationSampleAnalyzer(fresh)
    first, second = analyzer.saved_features[:2]
    append_explanations(fresh, [
        ExplanationRecord(latent=first, text="old", model="m", prompt_version="1", samples_step=4),
        ExplanationRecord(latent=first, text="the token [13]", score=0.9, score_contexts=10, random_score=0.5,
                          model="m", prompt_version="1", samples_step=4, embedding_score=0.75, embedding_contexts=40,
                          embedding_random_score=0.5),
        ExplanationRecord(latent=NUM_LATENTS - 1, text="not exported", source="label", kind="label"),
    ])
    source = npx.NeuronpediaSource(model_id="kjv-model", source_set="sae", layer=3)
    result = npx.export_neuronpedia(analyzer, tmp_path / "np", source)
    assert result.explanations == 1
    rows = npx.read_explanation_batches(result.source_dir)
    assert len(rows) == 1
    row = rows[0]
    assert {k: row[k] for k in ("modelId", "layer", "index", "description", "typeName", "explanationModelName")} == {
        "modelId": "kjv-model", "layer": "3-sae", "index": str(first), "description": "the token [13]",
        "typeName": "lightning-sae-samples", "explanationModelName": "m"}
    notes = json.loads(row["notes"])
    assert notes["score"] == 0.9 and notes["score_contexts"] == 10 and notes["random_score"] == 0.5
    assert notes["embedding_score"] == 0.75 and notes["embedding_contexts"] == 40
    assert notes["embedding_random_score"] == 0.5
    features = [f for batch in npx.package_features(result.source_dir) for f in batch]
    by_index = {f.index: f for f in features}
    assert by_index[first].explanations[0].text == "the token [13]" and by_index[second].explanations is None
    assert Path(result.source_dir / "explanations" / "batch-0.jsonl.gz").is_file()
