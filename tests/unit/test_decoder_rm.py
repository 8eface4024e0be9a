"""A Llama-3-style reward model served through the real loader: chat templates rendered and
tokenized once (one BOS), raw text that already carries its BOS, template refusals, pooling
at the last real token when the text ends in EOS = pad, and training scoring like serving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from builders import BOS, EOT, build_tiny_llama_rm, build_tiny_rm
from rewardserve.config import Settings
from rewardserve.engine.inputs import Encoded, TemplatedText, TextEncoder
from rewardserve.engine.loader import load_reward_model
from rewardserve.engine.scorer import RewardScorer
from rewardserve.engine.scoring import ScoringEngine
from rewardserve.registry.manifest import ManifestError, load_manifest
from rewardserve.schemas.errors import InvalidArgument
from rewardserve.schemas.scoring import ScoreRequest
from rewardserve.training.reward.trainer import score_encoded

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "is the sky blue?"},
    {"role": "assistant", "content": "yes, it is blue"},
]
OUT_OF_ORDER = [
    {"role": "user", "content": "hello"},
    {"role": "user", "content": "hello again"},
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("decoder") / "models"
    build_tiny_llama_rm(root, "llama-rm", max_length=64)
    build_tiny_rm(root, "bert-rm", default=True)
    return root


def load(repo: Path, name: str) -> RewardScorer:
    return load_reward_model(load_manifest(repo / name), repo / name, repo.parent, False)


@pytest.fixture(scope="module")
def llama(repo: Path) -> RewardScorer:
    return load(repo, "llama-rm")


@pytest.fixture(scope="module")
def hf_tok(repo: Path):
    """The tokenizer as transformers loads it, untouched by the loader."""
    return AutoTokenizer.from_pretrained(repo / "llama-rm" / "weights")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(repo: Path) -> AsyncIterator[ScoringEngine]:
    eng = ScoringEngine(Settings(model_repository=repo, cache_dir=repo.parent / "cache"))
    await eng.start()
    yield eng
    await eng.close()


def score_req(*items: dict, model: str = "llama-rm") -> ScoreRequest:
    return ScoreRequest.model_validate({"model": model, "items": list(items)})


def bos_id(tok) -> int:
    return tok.convert_tokens_to_ids(BOS)


# ---- one BOS ---------------------------------------------------------------------------


def test_the_fixture_reproduces_the_double_bos(hf_tok) -> None:
    """Rendering and then tokenizing with special tokens gives two BOS with this tokenizer,
    as with the real Llama-3 one: the case the encoder must not repeat."""
    rendered = hf_tok.apply_chat_template(CHAT, tokenize=False)
    assert rendered.startswith(BOS)
    assert hf_tok(rendered)["input_ids"][:2] == [bos_id(hf_tok)] * 2


async def test_messages_are_tokenized_as_apply_chat_template_does(engine, hf_tok) -> None:
    want = list(hf_tok.apply_chat_template(CHAT, tokenize=True)["input_ids"])
    assert want.count(bos_id(hf_tok)) == 1 and want[0] == bos_id(hf_tok)
    model = engine.resolve("llama-rm")
    rendered = engine.render(model, score_req({"messages": CHAT}).items[0])
    (enc,) = model.encode([rendered])
    assert enc == Encoded(want, truncated=False)
    resp = await engine.score(score_req({"messages": CHAT}))
    assert resp.results[0].tokens == len(want)


async def test_raw_text_that_starts_with_bos_gets_no_second(engine, hf_tok) -> None:
    """OpenRLHF's query: the policy's output decoded with its special tokens."""
    rendered = hf_tok.apply_chat_template(CHAT, tokenize=False)
    want = list(hf_tok(rendered, add_special_tokens=False)["input_ids"])
    model = engine.resolve("llama-rm")
    (enc,) = model.encode([rendered])
    assert enc.input_ids == want and enc.input_ids.count(bos_id(hf_tok)) == 1
    by_text, by_messages = (
        await engine.score(score_req({"text": rendered}, {"messages": CHAT}))
    ).results
    assert by_text.tokens == by_messages.tokens == len(want)
    assert by_text.reward == pytest.approx(by_messages.reward, abs=1e-6)


def test_plain_text_still_gets_the_models_bos(llama, hf_tok) -> None:
    (enc,) = llama.encode(["is the sky blue?"])
    assert enc.input_ids == hf_tok("is the sky blue?")["input_ids"]
    assert enc.input_ids[0] == bos_id(hf_tok) and enc.input_ids.count(bos_id(hf_tok)) == 1


def test_templated_text_gets_no_specials_added(llama, hf_tok) -> None:
    """A template that writes no BOS gets none, as apply_chat_template(tokenize=True)."""
    (enc,) = llama.encode([TemplatedText("is the sky blue?")])
    assert enc.input_ids == hf_tok("is the sky blue?", add_special_tokens=False)["input_ids"]


def test_truncation_keeps_the_texts_own_bos_in_front(llama, hf_tok) -> None:
    long_chat = [{"role": "user", "content": "tell me a story " * 40}, CHAT[2]]
    rendered = llama.apply_chat_template(long_chat)
    full = hf_tok(rendered, add_special_tokens=False)["input_ids"]
    assert len(full) > 64
    (enc,) = llama.encode([rendered])
    assert enc.truncated and len(enc) == 64
    assert enc.input_ids[0] == bos_id(hf_tok) and enc.input_ids.count(bos_id(hf_tok)) == 1
    assert enc.input_ids[1:] == full[-63:]  # left truncation: the reply is kept


def test_bert_text_that_already_has_cls_and_sep_gets_them_once(repo: Path) -> None:
    bert = load(repo, "bert-rm")
    (plain, marked) = bert.encode(["red blue", "[CLS] red blue [SEP]"])
    assert plain == marked
    assert plain.input_ids[0] == 101 and plain.input_ids[-1] == 102 and len(plain) == 4


def test_slow_path_handles_specials_alike(llama) -> None:
    fast = TextEncoder(llama.tokenizer, 64)
    slow = TextEncoder(llama.tokenizer, 64)
    slow.backend = None
    assert (
        (slow.prefix, slow.suffix) == (fast.prefix, fast.suffix) == ([bos_id(llama.tokenizer)], [])
    )
    texts = ["plain", llama.apply_chat_template(CHAT), TemplatedText("bare")]
    assert slow(texts) == fast(texts)


# ---- template refusals --------------------------------------------------------------------


async def test_a_template_that_raises_is_a_400_naming_the_item(engine) -> None:
    with pytest.raises(InvalidArgument) as info:
        await engine.score(score_req({"messages": CHAT}, {"messages": OUT_OF_ORDER}))
    assert info.value.field == "items.1.messages"
    assert "alternate" in info.value.message


def test_a_chat_template_manifest_without_a_template_is_refused(repo: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "llama-rm"  # a manifest is named like its folder
    shutil.copytree(repo / "llama-rm", folder)
    (folder / "weights" / "chat_template.jinja").unlink()
    with pytest.raises(ManifestError) as info:
        load_reward_model(load_manifest(folder), folder, tmp_path, False)
    assert info.value.field == "chat_template"


# ---- pooling at the last real token ---------------------------------------------------------


def true_reward(scorer: RewardScorer, ids: list[int]) -> float:
    """Unpadded single-sequence forward, read at its last position (transformers pools a
    one-row batch there when it has no pad id)."""
    model = scorer.model
    pad, model.config.pad_token_id = model.config.pad_token_id, None
    try:
        with torch.inference_mode():
            return float(model(input_ids=torch.tensor([ids])).logits[0, 0])
    finally:
        model.config.pad_token_id = pad


def test_a_text_ending_in_eos_is_pooled_at_the_eos(llama) -> None:
    assert (
        llama.pad_id == llama.tokenizer.eos_token_id == llama.tokenizer.convert_tokens_to_ids(EOT)
    )
    (chat,) = llama.encode([llama.apply_chat_template(CHAT)])
    assert chat.input_ids[-1] == llama.pad_id  # the turn ends in <|eot_id|>
    want = true_reward(llama, chat.input_ids)
    # transformers' own pooling skips that EOS as if it were padding
    with torch.inference_mode():
        hf = float(llama.model(input_ids=torch.tensor([chat.input_ids])).logits[0, 0])
    assert hf != pytest.approx(want, abs=1e-3)

    (alone,) = llama.forward([chat])
    assert alone == pytest.approx(want, abs=1e-5)
    longer = llama.encode(["a much longer text " * 6, "short", "another long one here " * 4])
    batched = llama.forward([longer[0], chat, longer[1], longer[2]])
    assert batched[1] == pytest.approx(want, abs=1e-5)
    assert batched[2] == pytest.approx(true_reward(llama, longer[1].input_ids), abs=1e-5)


# ---- training scores as serving does -----------------------------------------------------------


@pytest.mark.parametrize("name", ["llama-rm", "bert-rm"])
def test_trainer_and_scorer_give_identical_rewards(repo: Path, name: str) -> None:
    scorer = load(repo, name)
    texts = ["short", "a somewhat longer text " * 3, "mid length text here", "x " * 30]
    if name == "llama-rm":
        texts.append(scorer.apply_chat_template(CHAT))  # ends in EOS = pad
    encoded = sorted(scorer.encode(texts), key=len)  # score_encoded's own order
    served = scorer.forward(encoded)
    model = AutoModelForSequenceClassification.from_pretrained(
        repo / name / "weights", num_labels=1
    )
    trained = score_encoded(model, encoded, scorer.pad_id, batch_size=len(encoded))
    assert trained.tolist() == served
