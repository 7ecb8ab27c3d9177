"""Shared-prefix prefill: a batch of few-shot prompts generates exactly what each would alone."""

from __future__ import annotations

import pytest

from ml_core.config import GenerationConfig
from ml_core.generation.backends import MIN_SHARED_PREFIX, TransformersGenerator, load_generator

SYSTEM = "You write one short search query for the passage. Respond only with the query. " * 3
SHOTS = [
    {"role": "user", "content": "Passage: coral bleaching happens when water is too warm"},
    {"role": "assistant", "content": "why do corals bleach"},
    {"role": "user", "content": "Passage: a database index keeps a sorted copy of columns"},
    {"role": "assistant", "content": "what does a database index do"},
]
PASSAGES = [
    "the lift of a swept wing at supersonic speed depends on the sweep angle",
    "boundary layer transition on a flat plate",
    "heat transfer to a blunt body in hypersonic flow was measured in a shock tunnel at mach 8",
]


@pytest.fixture(scope="module")
def generator(registry) -> TransformersGenerator:  # noqa: ANN001 - the conftest fixture
    # fp32: exact equality with the plain path is the claim; bf16 rounds by matrix shape.
    loaded = load_generator(GenerationConfig(precision="fp32"), registry.get("tiny-generator"),
                            registry)
    assert isinstance(loaded, TransformersGenerator)
    return loaded


def _conversations() -> list[list[dict[str, str]]]:
    return [
        [
            {"role": "system", "content": SYSTEM},
            *SHOTS,
            {"role": "user", "content": f"Passage: {p}"},
        ]
        for p in PASSAGES
    ]


def test_the_batch_really_shares_a_cached_prefix(generator: TransformersGenerator) -> None:
    prompts = [generator.render(c) for c in _conversations()]
    batch, cache = generator._encode_sharing_prefix(prompts)
    assert cache is not None
    assert cache.get_seq_length() >= MIN_SHARED_PREFIX
    assert batch["input_ids"].shape[0] == len(PASSAGES)


# The cache is passed under the installed transformers' own name: the deprecated one warns.
@pytest.mark.filterwarnings("error::FutureWarning")
def test_shared_prefix_generation_equals_each_prompt_alone(
    generator: TransformersGenerator,
) -> None:
    conversations = _conversations()
    together = generator.complete(conversations, temperature=0.0, max_new_tokens=8, seed=0)
    alone = [
        generator.complete([c], temperature=0.0, max_new_tokens=8, seed=0)[0] for c in conversations
    ]
    assert together == alone


def test_prompts_without_a_shared_prefix_take_the_plain_path(
    generator: TransformersGenerator,
) -> None:
    prompts = ["alpha beta gamma", "delta epsilon"]
    batch, cache = generator._encode_sharing_prefix(prompts)
    assert cache is None and batch["input_ids"].shape[0] == 2
