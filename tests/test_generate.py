"""Answer generation: batching with left padding, seeded sampling, the JSONL cache and adapter routing."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from analysis.generate import (
    GenerationCache,
    GenerationSettings,
    cached_answers,
    generate_replies,
    group_by_adapter,
    load_runs,
    run_generator,
)
from analysis.runs import AdapterInfo, load_run
from probe.models import load_model
from tests.analysis_runs import make_run

os.environ["HF_HUB_OFFLINE"] = "1"

PROMPTS = [
    {"id": "syntax:1", "capability": "syntax", "prompt": "Fix the grammar: he go home."},
    {"id": "logic:1", "capability": "logic", "prompt": "All cats are animals. Tom is a cat. Is Tom an animal?"},
    {"id": "facts:1", "capability": "facts", "prompt": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def conversations(prompts):
    return [[{"role": "user", "content": prompt["prompt"]}] for prompt in prompts]


def test_settings_key_ignores_seed_when_greedy():
    assert GenerationSettings(seed=1).key() == GenerationSettings(seed=2).key()
    assert GenerationSettings(sampling="sample", seed=1).key() != GenerationSettings(sampling="sample", seed=2).key()
    assert GenerationSettings(max_new_tokens=8).key() != GenerationSettings(max_new_tokens=9).key()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "`max_new_tokens` must be at least 1, got 0"),
        ({"sampling": "beam"}, "`sampling` must be one of greedy, sample, got 'beam'"),
        ({"batch_size": 0}, "`batch_size` must be at least 1, got 0"),
    ],
)
def test_settings_reject_invalid_values(kwargs, message):
    with pytest.raises(ValueError) as error:
        GenerationSettings(**kwargs)
    assert str(error.value) == message


def test_batched_greedy_matches_one_by_one(tiny):
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    batched = generate_replies(tiny.model, tiny.tokenizer, conversations(PROMPTS), settings)
    single = [
        generate_replies(tiny.model, tiny.tokenizer, conversations([prompt]), settings)[0] for prompt in PROMPTS
    ]
    assert batched == single
    assert tiny.tokenizer.padding_side == "right"  # restored after generation


def test_seeded_sampling_is_reproducible(tiny):
    first = generate_replies(tiny.model, tiny.tokenizer, conversations(PROMPTS), GenerationSettings(8, "sample", seed=3))
    again = generate_replies(tiny.model, tiny.tokenizer, conversations(PROMPTS), GenerationSettings(8, "sample", seed=3))
    other = generate_replies(tiny.model, tiny.tokenizer, conversations(PROMPTS), GenerationSettings(8, "sample", seed=4))
    assert first == again
    assert first != other


def test_cache_roundtrip_and_settings_key(tmp_path):
    path = tmp_path / "gen" / "base.jsonl"
    cache = GenerationCache(path, model_id="tiny-llama", settings=GenerationSettings())
    cache.put(PROMPTS[0], "answer one")
    cache.save()

    reloaded = GenerationCache(path, model_id="tiny-llama", settings=GenerationSettings())
    other_settings = GenerationCache(path, model_id="tiny-llama", settings=GenerationSettings(max_new_tokens=9))
    other_model = GenerationCache(path, model_id="smollm2", settings=GenerationSettings())
    edited_prompt = {**PROMPTS[0], "prompt": "A different question?"}
    assert reloaded.get(PROMPTS[0]) == "answer one"
    assert other_settings.get(PROMPTS[0]) is None
    assert other_model.get(PROMPTS[0]) is None
    assert reloaded.get(edited_prompt) is None


def test_cache_skips_invalid_lines(tmp_path, caplog):
    path = tmp_path / "base.jsonl"
    cache = GenerationCache(path, model_id="m", settings=GenerationSettings())
    cache.put(PROMPTS[0], "kept")
    cache.save()
    with path.open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")

    with caplog.at_level(logging.WARNING):
        reloaded = GenerationCache(path, model_id="m", settings=GenerationSettings())
    assert reloaded.get(PROMPTS[0]) == "kept"
    assert "skipping invalid line 2" in caplog.text


def test_cached_answers_generates_only_missing(tmp_path):
    cache = GenerationCache(tmp_path / "base.jsonl", model_id="m", settings=GenerationSettings())
    cache.put(PROMPTS[1], "cached")
    requested = []

    def generate_missing(prompts):
        requested.append([prompt["id"] for prompt in prompts])
        return [f"new {prompt['id']}" for prompt in prompts]

    answers = cached_answers(PROMPTS, cache, generate_missing, desc="test")
    again = cached_answers(PROMPTS, cache, generate_missing, desc="test")
    assert answers == ["new syntax:1", "cached", "new facts:1"]
    assert again == answers
    assert requested == [["syntax:1", "facts:1"]]
    lines = [json.loads(line) for line in (tmp_path / "base.jsonl").read_text().splitlines()]
    assert sorted(line["prompt_id"] for line in lines) == ["facts:1", "logic:1", "syntax:1"]


def test_routed_run_groups_prompts_by_capability(tmp_path):
    run = load_run(make_run(tmp_path, "routed"))
    run.adapters = [
        AdapterInfo("local", Path("a"), capability="syntax"),
        AdapterInfo("global", Path("b"), capability="facts"),
    ]
    groups = group_by_adapter(run, PROMPTS)
    assert [index for index, _ in groups["local"]] == [0, 1]  # logic has no adapter: the first answers it
    assert [index for index, _ in groups["global"]] == [2]


def test_run_generator_answers_with_adapter(tmp_path):
    run = load_run(make_run(tmp_path, "local"))
    answers = run_generator(run, GenerationSettings(max_new_tokens=4))(PROMPTS)
    assert len(answers) == len(PROMPTS)
    assert all(isinstance(answer, str) for answer in answers)


def test_load_runs_rejects_other_base_model(tmp_path):
    run_dir = make_run(tmp_path, "local")
    with pytest.raises(ValueError) as error:
        load_runs([run_dir], "smollm2")
    assert "trained on base model 'tiny-llama', but the base model is 'smollm2'" in str(error.value)


def test_heldout_prompts_from_suite():
    suite = pytest.importorskip("probe.suite")
    from analysis.generate import load_heldout_prompts

    prompts = load_heldout_prompts(2)
    assert [prompt["capability"] for prompt in prompts] == [c for c in suite.CAPABILITIES for _ in range(2)]
    assert len({prompt["id"] for prompt in prompts}) == len(prompts)
