"""One home for every setting: CollectionConfig / CallbackConfig drive the callback, the collector and the docs."""

import dataclasses
import sys
from pathlib import Path

import pytest

from lightning_sae_samples import ActivationSampleCallback, ActivationSampleCollector, CollectionConfig
from lightning_sae_samples.config import (
    SETTINGS_BEGIN,
    SETTINGS_END,
    CallbackConfig,
    engine_fields,
    field_docs,
    settings_table,
)

README = Path(__file__).parents[1] / "README.md"


def test_the_readme_table_is_the_generated_one():
    text = README.read_text(encoding="utf-8")
    assert SETTINGS_BEGIN in text and SETTINGS_END in text, "README.md lost its settings block"
    block = text.split(SETTINGS_BEGIN)[1].split(SETTINGS_END)[0].strip()
    assert block == settings_table(), "README's settings table is stale: run `python scripts/settings_table.py`"
    for f in dataclasses.fields(CallbackConfig):
        assert f"| `{f.name}` | `{f.default!r}` |" in block


def test_every_setting_is_documented_once():
    docs = field_docs(CallbackConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(CallbackConfig)}
    assert all(text.strip() for text in docs.values())
    for name in docs:  # the generated Args section is what help() and LightningCLI show
        assert f"        {name}: " in CallbackConfig.__doc__


@pytest.mark.parametrize(
    "owner", [ActivationSampleCallback, ActivationSampleCollector], ids=["callback", "collector"]
)
def test_the_callback_and_the_collector_read_the_same_settings_object(owner):
    made = owner(context_size=4, max_samples_per_feature=7, samples_per_feature_to_save=3)
    settings = made.settings
    assert (settings.context_size, settings.max_samples_per_feature, settings.recent_samples_per_feature) == (4, 7, 3)
    engine = made.engine if owner is ActivationSampleCallback else made
    assert engine.settings is settings
    assert engine.engine_config(12).num_latents == 12 and settings.num_latents is None


@pytest.mark.parametrize(
    "owner", [ActivationSampleCallback, ActivationSampleCollector], ids=["callback", "collector"]
)
def test_an_unknown_keyword_names_the_closest_setting(owner):
    with pytest.raises(TypeError, match=r"`context_sise` \(did you mean `context_size`\?\)"):
        owner(context_sise=4)


@pytest.mark.parametrize(
    "name, value, fix",
    [
        ("rank_features_by", "max", "max_activation"),
        ("save_full_state", "always", "every"),
        ("on_save_error", "ignore", "Use 'log'"),
        ("context_size", -1, "Use 0 for the activating token alone"),
        ("samples_per_feature_to_save", 200, "cannot exceed `max_samples_per_feature`"),
        ("state_device", "no-such-device", "must name a torch device"),
        ("collection_freq", 0, "collection_freq=1000"),
        ("latents_key", "", "non-empty strings"),
    ],
)
def test_a_bad_value_is_refused_with_its_name_and_the_fix(name, value, fix):
    with pytest.raises(ValueError, match=name) as err:
        CallbackConfig(**{name: value})
    assert fix in str(err.value)


def test_literal_choices_are_validated_by_lightning_cli_too():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ActivationSampleCallback, "cb")
    parsed = parser.parse_args(["--cb.rank_features_by=frequency", "--cb.context_size=4"])
    assert parsed.cb.rank_features_by == "frequency" and parsed.cb.context_size == 4
    with pytest.raises(jsonargparse.ArgumentError):
        parser.parse_args(["--cb.save_full_state=sometimes"])
    shown = {action.dest for action in parser._actions}
    assert {f"cb.{f.name}" for f in dataclasses.fields(CallbackConfig)} <= shown


def test_the_summary_block_and_the_state_entries_follow_the_metadata():
    settings = CallbackConfig(context_size=4, exclude_token_ids=(5, 2, 5), collection_freq={0: 3, 10: 2})
    summary = settings.summary()
    assert summary["exclude_token_ids"] == [2, 5] and summary["collection_freq"] == {0: 3, 10: 2}
    assert "write_report" not in summary and "on_save_error" not in summary and "state_device" not in summary
    entries = dataclasses.replace(settings, num_latents=8).state_entries()
    assert entries == {f.metadata["state"]: getattr(settings, f.name) if f.name != "num_latents" else 8
                       for f in engine_fields()}
    assert entries["max_samples"] == 100 and entries["threshold"] == 0.1


def test_a_setting_read_from_a_state_is_checked_like_an_argument():
    with pytest.raises(ValueError, match="max_samples_per_feature"):
        CollectionConfig.from_state({"num_latents": 4, "max_samples": 0, "context_size": 2, "threshold": 0.1})


def test_resume_compares_exactly_the_resume_settings():
    settings = CollectionConfig(seed=1)
    resume = [f.name for f in dataclasses.fields(CollectionConfig) if f.metadata.get("resume")]
    assert "seed" in resume and "top_features_to_save" not in resume
    assert settings.resume_mismatch({"seed": 2, "top_features_to_save": 1}) == ("seed", 2, 1)
    assert settings.resume_mismatch({"top_features_to_save": 1}) is None


def test_the_settings_module_imports_nothing_heavy():
    import subprocess

    code = "import lightning_sae_samples.config, sys; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
