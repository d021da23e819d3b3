"""LoRA experts on a tiny Llama: the merged checkpoint is the base plus B @ A * alpha / rank
in the adapted projections and the base elsewhere, and two builds agree bit for bit."""

from __future__ import annotations

import hashlib

import pytest
import torch
from support import build_family

pytest.importorskip("peft")

from mergesearch.demo.lora import (  # noqa: E402
    LoraPlan,
    build_lora_expert,
    encode_pairs,
    save_merged,
    train_adapter,
)
from mergesearch.merging.checkpoint import Checkpoint  # noqa: E402

PAIRS = [(f"{a}+{b}=", str(a + b)) for a in range(6) for b in range(6)]
PLAN = LoraPlan(steps=6, lr=5e-3, rank=4, alpha=8.0, batch=4, seed=3,
                targets=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("lora"), "llama", n_sources=0)["base"]


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager"),
            AutoTokenizer.from_pretrained(folder))


def test_merged_expert_is_base_plus_the_low_rank_delta(base, tmp_path):
    model, tok = load(base)
    adapted = train_adapter(model, tok, PAIRS, PLAN)
    lora = {k: v.detach().clone() for k, v in adapted.state_dict().items() if "lora_" in k}
    save_merged(adapted, tok, tmp_path / "expert")

    before = Checkpoint.open(base).load_tensors()
    after = Checkpoint.open(str(tmp_path / "expert")).load_tensors()
    assert set(after) == set(before)
    scale = PLAN.alpha / PLAN.rank
    adapted_names = set()
    for a_key in (k for k in lora if ".lora_A." in k):
        # base_model.model.<module>.lora_A.default.weight -> <module>.weight
        module = a_key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = lora[a_key.replace(".lora_A.", ".lora_B.")]
        delta = b @ lora[a_key] * scale
        assert delta.abs().max() > 0, module  # B starts at zero: training moved it
        torch.testing.assert_close(after[f"{module}.weight"], before[f"{module}.weight"] + delta,
                                   atol=1e-6, rtol=0)
        adapted_names.add(f"{module}.weight")
    n_layers = Checkpoint.open(base).num_layers
    assert len(adapted_names) == n_layers * len(PLAN.targets)
    for name in set(before) - adapted_names:
        assert torch.equal(after[name], before[name]), name


def test_two_builds_are_bit_identical(base, tmp_path):
    digests = []
    for i in range(2):
        out = build_lora_expert(base, PAIRS, tmp_path / f"e{i}", PLAN)
        digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
        assert Checkpoint.open(str(out)).vocab == Checkpoint.open(base).vocab  # the base's tokenizer
        assert not (out / "adapter_config.json").exists()  # an ordinary checkpoint
    assert digests[0] == digests[1]


def test_the_loss_falls_on_the_answer_and_eos_only(base):
    _, tok = load(base)
    (ids, labels), = encode_pairs(tok, [("2+3=", "5")])
    prompt = tok("2+3=", add_special_tokens=False).input_ids
    assert ids == prompt + tok("5", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert labels == [-100] * len(prompt) + ids[len(prompt):]
