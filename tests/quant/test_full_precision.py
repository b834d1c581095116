import pytest
import torch

from nvila.core.model import NvilaModel
from nvila.core.processor import collate
from nvila.core.specs import build
from nvila.workflows.peft import apply_peft, parse_peft


def conversation_batch(model):
    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 30, 30))
    sample = model.processor.encode([{"from": "human", "value": "<image>\nWhat color?"},
                                     {"from": "gpt", "value": "red, a red square"}], [image])
    return collate([sample, sample], model.tokenizer.pad_token_id)


def peft_step(model, batch):
    """Loss and trainable gradients of one bf16-autocast step (the PEFT step under bf16-mixed)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("compressor,projector", [({"name": "stc", "ratio": 2}, {"name": "mlp-3x3", "reduction": 4}),
                                                  ({"name": "perceiver", "num_latents": 4}, {"name": "mlp"}),
                                                  ({"name": "tokenlearner", "num_tokens": 4}, {"name": "linear"})])
def test_frozen_weights_in_bf16_change_no_result_under_autocast(registry, tiny_spec, compressor, projector):
    spec = {**tiny_spec, "compressor": compressor, "projector": projector}
    models = []
    for frozen_in_bf16 in (False, True):
        torch.manual_seed(0)
        model = NvilaModel(spec, registry)
        apply_peft(model, parse_peft({"lora": {"r": 4, "dropout": 0.0}, "vision": "layernorm",
                                      "train_projector": False}))
        build("precision", {"name": "bf16", "frozen_in_bf16": frozen_in_bf16}, registry).prepare(model)
        models.append(model.train())
    assert any(p.dtype == torch.bfloat16 for p in models[1].parameters())  # the comparison compares something
    batch = conversation_batch(models[0])
    (loss_fp32, grads_fp32), (loss_bf16, grads_bf16) = (peft_step(m, batch) for m in models)
    assert torch.equal(loss_fp32, loss_bf16)
    assert grads_fp32.keys() == grads_bf16.keys()
    for name in grads_fp32:
        assert torch.equal(grads_fp32[name], grads_bf16[name]), name


def test_only_frozen_matmul_weights_move_to_bf16(registry, tiny_spec):
    model = NvilaModel(tiny_spec, registry)
    apply_peft(model, parse_peft({"lora": {"r": 4}, "vision": "layernorm"}))
    build("precision", {"name": "bf16", "frozen_in_bf16": True}, registry).prepare(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["llm.model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert all(dtypes[n] == torch.float32 for n, p in model.named_parameters() if p.requires_grad)  # LoRA, norms
    assert all(dtype == torch.float32 for n, dtype in dtypes.items() if "norm" in n)
    # the output layer is tied to the embeddings, which are not a matmul layer: both stay fp32
    assert dtypes["llm.model.base_model.model.model.embed_tokens.weight"] == torch.float32
    frozen = sum(p.numel() for p in model.parameters() if p.dtype == torch.bfloat16)
    assert frozen > 0.5 * sum(p.numel() for p in model.parameters() if not p.requires_grad)


def test_off_by_default_and_under_true_bf16(registry, tiny_spec):
    for spec in ({"name": "bf16"}, {"name": "bf16", "true_bf16": True, "frozen_in_bf16": True}):
        model = NvilaModel(tiny_spec, registry).requires_grad_(False)
        build("precision", spec, registry).prepare(model)
        assert all(p.dtype == torch.float32 for p in model.parameters())
