import pytest
import torch

from nvila.core.errors import NvilaError
from nvila.core.model import NvilaModel
from nvila.core.processor import collate
from nvila.workflows.peft import apply_peft, merge_lora, parse_peft


@pytest.fixture
def model(registry, tiny_spec):
    torch.manual_seed(0)
    return NvilaModel(tiny_spec, registry)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_on_the_llm_and_layernorm_tuning_on_the_encoder(model):
    apply_peft(model, parse_peft({"lora": {"r": 4}, "vision": "layernorm"}))
    names = trainable(model)
    llm = {n for n in names if n.startswith("llm.")}
    encoder = {n for n in names if n.startswith("encoder.")}
    assert llm and all("lora_" in n for n in llm)
    assert encoder and all("layer_norm" in n or "layernorm" in n for n in encoder)
    assert any(n.startswith("projector.") for n in names)
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if n in names) < 0.5 * total


def test_merged_adapters_give_the_same_outputs_in_the_plain_layout(model, tiny_spec, registry):
    apply_peft(model, parse_peft({"lora": {"r": 4}}))
    model.eval()  # no adapter dropout
    for name, p in model.named_parameters():  # make the adapters do something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    batch = collate([model.processor.encode([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}])],
                    model.tokenizer.pad_token_id)
    with torch.no_grad():
        before = model(**batch)["logits"]
        merge_lora(model)
        after = model(**batch)["logits"]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    plain = NvilaModel(tiny_spec, registry)
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_a_lora_target_that_matches_nothing_is_refused(model):
    with pytest.raises(NvilaError, match="match nothing.*q_proj"):
        apply_peft(model, parse_peft({"lora": {"target_modules": ["query"]}}))


def test_bad_peft_settings_are_reported_with_their_keys():
    with pytest.raises(NvilaError, match="vision must be one of layernorm, frozen, full"):
        parse_peft({"vision": "norms"})
    with pytest.raises(NvilaError, match="Key 'rank' not in 'LoraSettings'"):
        parse_peft({"lora": {"rank": 4}})


def test_adapters_merge_into_bf16_frozen_weights_without_rounding_away(model, registry):
    from nvila.quant.full_precision import BF16, BF16Config

    apply_peft(model, parse_peft({"lora": {"r": 4}}))
    BF16(BF16Config(frozen_in_bf16=True)).prepare(model)
    q_proj = model.llm.model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(q_proj.lora_B["default"].weight, std=1e-4)  # a fine-tuning-sized update
    base = q_proj.base_layer.weight.detach().clone()
    assert base.dtype == torch.bfloat16
    expected = base.float() + q_proj.get_delta_weight("default")
    merge_lora(model)
    merged = model.llm.model.model.layers[0].self_attn.q_proj.weight
    assert merged.dtype == torch.float32 and torch.equal(merged, expected)
    assert (expected.bfloat16().float() == base.float()).float().mean() > 0.1  # a bf16 merge would lose them
