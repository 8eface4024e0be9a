"""Speculative rejection's bookkeeping on real tokenizers: candidates are fixed token ids
(ScriptedPolicy), so the test knows every text it must produce, whichever way the backend is
driven (rounds through `generate`, or live candidates streamed and aborted).

The tokenizers are built here with `tokenizers`: a byte-level BPE (GPT-2/Llama-3/SmolLM2
style, where a multi-byte character spans several tokens) and a SentencePiece-style one
(Metaspace, where a word's leading space lives in its token). Chunk boundaries fall inside
characters and before spaced words, where decoding chunk by chunk goes wrong.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from policies import LiveScriptedPolicy, ScriptedPolicy
from rewardserve.bon.speculative import Ended, SpeculativeRejection, candidate_seed
from rewardserve.config import default_cache_dir
from rewardserve.policy.base import Generation, Sampling

# The first character is the candidate's quality; texts start distinct (ScriptedPolicy).
TEXTS = [
    ["9 héllo 世界 🎉 done", "7 naïve café 日本語 ok", "5 ümlaut ✓ fine", "3 żółć 😀😀 no"],
    ["8 Grüße aus Köln ☕", "6 año niño 한국어", "4 œuvre déjà vu", "2 ß ẞ ø"],
]
SENTENCES = [
    ["9 the quick brown fox jumps", "7 a lazy dog sleeps here now", "5 she said no", "3 go"],
    ["8 why not ask them first", "6 it is late at night", "4 call a friend", "2 no way"],
]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on ASCII only: every non-ASCII character stays split into
    its UTF-8 bytes, one token each."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello done ok fine no the café" * 3, "naive lumber"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style: a word's leading space is the ▁ of its token."""
    words = sorted({w for group in SENTENCES for s in group for w in s.split()})
    vocab = {"<unk>": 0, "<eos>": 1} | {f"▁{w}": i + 2 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def default_policy_tokenizer() -> PreTrainedTokenizerFast:
    """The default policy's own tokenizer (SmolLM2, byte-level BPE), where `make models`
    built it."""
    folder = Path(os.environ.get("REWARDSERVE_CACHE_DIR") or default_cache_dir())
    folder /= "smollm2-135m-instruct"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"no default policy in {folder} (make models)")
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", params=["byte-level", "metaspace", "smollm2"])
def case(request: pytest.FixtureRequest) -> tuple[PreTrainedTokenizerFast, list[list[str]]]:
    if request.param == "byte-level":
        return byte_level_tokenizer(), TEXTS
    if request.param == "smollm2":
        return default_policy_tokenizer(), TEXTS
    return metaspace_tokenizer(), SENTENCES


def scripts_of(tok: PreTrainedTokenizerFast, texts: list[list[str]]) -> list[list[list[int]]]:
    scripts = [[tok(t, add_special_tokens=False)["input_ids"] for t in group] for group in texts]
    for group, ids in zip(texts, scripts, strict=True):
        assert [tok.decode(s) for s in ids] == group  # the tokenizer round-trips the texts
    return scripts


PROMPTS = [[0], [1]]  # token ids; base prompts only need to differ


def make_policy(case, mode: str) -> ScriptedPolicy:
    tok, texts = case
    scripts = scripts_of(tok, texts)
    if mode == "rounds":
        return ScriptedPolicy(tok, PROMPTS, scripts)
    return LiveScriptedPolicy(tok, PROMPTS, scripts, burst=int(mode.split("-")[1]))


async def speculate(
    policy: ScriptedPolicy, chunk: int = 2, max_tokens: int = 64, alpha: float = 0.5
) -> tuple[SpeculativeRejection, list[Ended], Counter]:
    calls: Counter = Counter()

    async def score(gen: Generation) -> float:
        calls[(gen.prompt_index, gen.index, len(gen.token_ids))] += 1
        return int(gen.text[0]) + len(gen.text) / 1000

    spec = SpeculativeRejection(
        policy, PROMPTS, 4, Sampling(max_tokens=max_tokens, seed=3), alpha, chunk, score
    )
    return spec, [e async for e in spec.run()], calls


MODES = ["rounds", "live-1", "live-3", "live-100"]


@pytest.mark.parametrize("mode", MODES)
async def test_text_is_decoded_once_from_all_the_ids(case, mode: str) -> None:
    tok, texts = case
    scripts = scripts_of(tok, texts)
    # chunk by chunk, these texts come apart: the test can tell the two ways of decoding
    for ids, text in zip(scripts[0], texts[0], strict=True):
        by_chunks = "".join(tok.decode(ids[k : k + 2]) for k in range(0, len(ids), 2))
        assert by_chunks != text or len(ids) <= 2
    _, ended, _ = await speculate(make_policy(case, mode))
    assert sorted((e.generation.prompt_index, e.generation.index) for e in ended) == [
        (p, i) for p in range(2) for i in range(4)
    ]  # every candidate ends once
    for e in ended:
        g = e.generation
        script = scripts[g.prompt_index][g.index]
        assert g.token_ids == script[: len(g.token_ids)]  # the ids as generated
        assert g.text == tok.decode(g.token_ids)  # one decode of all of them
        if g.finish_reason == "rejected":
            assert len(g.token_ids) % 2 == 0 and len(g.token_ids) < len(script)
        else:
            assert g.finish_reason == "stop" and g.text == texts[g.prompt_index][g.index]
    # the best of each prompt survives: partial rewards predict final ones here
    for p, top in ((0, "9"), (1, "8")):
        finished = [e.generation for e in ended if e.generation.finish_reason != "rejected"]
        assert max(g.text[0] for g in finished if g.prompt_index == p) == top


@pytest.mark.parametrize("mode", MODES)
async def test_each_candidate_is_scored_once_per_boundary(case, mode: str) -> None:
    _, ended, calls = await speculate(make_policy(case, mode))
    assert max(calls.values()) == 1, calls  # a rejected candidate is not scored again
    for e in ended:
        g = e.generation
        # its reward is the one its own (partial) text got
        assert e.reward == int(g.text[0]) + len(g.text) / 1000


async def test_live_decisions_do_not_depend_on_how_far_candidates_ran_ahead(case) -> None:
    def outcome(ended: list[Ended]) -> list[tuple]:
        return sorted(
            (e.generation.prompt_index, e.generation.index, e.generation.text,
             e.generation.finish_reason, e.reward)
            for e in ended
        )  # fmt: skip

    results = [outcome((await speculate(make_policy(case, mode)))[1]) for mode in MODES]
    assert all(r == results[0] for r in results)  # and the same as in rounds


async def test_live_rejected_candidates_are_aborted_and_their_run_ahead_counted(case) -> None:
    policy = make_policy(case, "live-3")
    assert isinstance(policy, LiveScriptedPolicy)
    spec, ended, _ = await speculate(policy, chunk=2)
    rejected = [e.generation for e in ended if e.generation.finish_reason == "rejected"]
    assert rejected
    at_first = [g for g in rejected if len(g.token_ids) == 2]
    # each one rejected at the first boundary had 3 tokens there, not the 2 it was judged on
    kept = sum(len(e.generation.token_ids) for e in ended)
    assert spec.generated_tokens >= kept + len(at_first)
    assert spec.generated_tokens <= policy.emitted
    still_running = {4 * g.prompt_index + g.index for g in rejected}
    assert policy.aborted <= still_running and policy.aborted
    # one engine request per candidate, each with its own reproducible seed
    seeds = [s.seed for s in policy.samplings]
    assert seeds == [candidate_seed(3, p, i) for p in range(2) for i in range(4)]
    assert len(set(seeds)) == 8


@pytest.mark.parametrize("mode", ["rounds", "live-1"])
async def test_max_tokens_cuts_at_a_chunk_boundary_inside_a_character(case, mode: str) -> None:
    tok, _ = case
    _, ended, _ = await speculate(make_policy(case, mode), chunk=3, max_tokens=5)
    for e in ended:
        g = e.generation
        assert g.text == tok.decode(g.token_ids)
        assert len(g.token_ids) <= 5 and g.finish_reason in ("stop", "length", "rejected")
    assert any(e.generation.finish_reason == "length" for e in ended)


def test_sample_seeds_of_different_prompts_do_not_overlap() -> None:
    # vLLM seeds sample i of a request with seed + i: prompt seeds one apart would share them
    seeds = {candidate_seed(s, p, i) for s in (0, 1, 1234) for p in range(64) for i in range(64)}
    assert len(seeds) == 3 * 64 * 64
    assert candidate_seed(None, 0, 1) is None
