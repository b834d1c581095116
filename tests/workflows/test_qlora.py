"""PEFT over a W4A16 language model (QLoRA-style): LoRA adapters train around frozen int4 layers, which stay int4;
the stage recipe trains, saves, resumes and exports; quantized specs that cannot train are refused."""

import pytest
import torch
from PIL import Image

from nvila.core.checkpoint import load_checkpoint, read_spec, save_checkpoint
from nvila.core.errors import NvilaError
from nvila.core.model import ModelSpec
from nvila.core.processor import collate
from nvila.quant.w4a16 import Int4WeightOnlyLinear
from nvila.workflows.cli import run_cli
from nvila.workflows.module import NvilaModule, TrainingSettings
from nvila.workflows.peft import merge_lora
from nvila.workflows.qlora import Int4LoraLinear

RTN = {"name": "w4a16", "method": "rtn", "group_size": 32}  # the tiny language model is 32 wide
QLORA = ["--config", "stages/peft", "--config", "stages/qlora", "--model.quant.llm={name: w4a16, method: rtn, "
         "group_size: 32}"]


def module(tiny_spec, quant=RTN, peft=None, **settings):
    torch.manual_seed(0)
    spec = ModelSpec.from_dict({**tiny_spec, "quant": {"llm": quant} if quant else {}})
    peft = {"lora": {"r": 4, "dropout": 0.0}} if peft is None else peft
    return NvilaModule(spec, TrainingSettings(peft=peft or None, **settings))


def batch_of(model, size=4):
    samples = [model.processor.encode([{"from": "human", "value": "<image>\nWhat color is the shape?"},
                                       {"from": "gpt", "value": "red"}], [Image.new("RGB", (32, 32), (200, 20, 20))])
               for _ in range(size)]
    return collate(samples, model.tokenizer.pad_token_id)


def int4_state(model):
    return {k: v.clone() for k, v in model.llm.state_dict().items() if k.endswith(("qweight", "scales", "zeros"))}


def test_lora_trains_over_int4_layers_that_stay_int4(tiny_spec):
    m = module(tiny_spec, lr=1e-2)
    model = m.model
    layers = [x for x in model.llm.modules() if isinstance(x, Int4LoraLinear)]
    assert layers and all(isinstance(x.get_base_layer(), Int4WeightOnlyLinear) for x in layers)
    before = int4_state(model)
    batch = batch_of(model)
    optimizer = torch.optim.AdamW(m.parameter_groups())
    losses = []
    for step in range(12):
        loss = m.training_step(batch, step)
        loss.backward()
        if step == 1:  # B starts at zero, so A's gradient shows from the second step on
            lora = {n: p.grad for n, p in model.llm.named_parameters() if "lora_" in n}
            assert lora and all(g is not None and g.abs().sum() > 0 for g in lora.values())
            assert model.projector[0].weight.grad.abs().sum() > 0  # through every int4 layer back to the projector
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    after = int4_state(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.uint8 for k, v in after.items() if k.endswith("qweight"))
    # no 16- or 32-bit copy of an int4 weight anywhere: the language model's only floating (N, K) tensors are
    # its embeddings (and the output layer, kept in 16 bits by W4A16's `skip`)
    trainable = {n for n, p in model.llm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    dense = [n for n, t in model.llm.state_dict().items() if t.is_floating_point() and t.ndim == 2
             and not n.endswith(("scales", "zeros")) and "lora_" not in n and "embed_tokens" not in n
             and "lm_head" not in n]
    assert dense == []


def test_int4_layers_without_adapters_pass_gradients_through_too(tiny_spec):
    m = module(tiny_spec, peft={"lora": {"r": 4, "target_modules": ["q_proj"]}})
    int4 = [x for x in m.model.llm.modules() if isinstance(x, Int4WeightOnlyLinear)]
    assert len(int4) > len([x for x in m.model.llm.modules() if isinstance(x, Int4LoraLinear)])
    assert all(x.kernel == "reference" for x in int4)  # training's kernel: dequantizes plain nibbles
    m.training_step(batch_of(m.model), 0).backward()
    assert m.model.projector[0].weight.grad.abs().sum() > 0


def test_the_int4_layer_gives_the_input_gradient_of_its_dequantized_weight():
    from nvila.core.specs import build

    torch.manual_seed(0)
    part = torch.nn.Sequential(torch.nn.Linear(64, 48))
    build("quantizer", {**RTN, "kernel": "reference"}).quantize(part)
    layer = part[0]
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().pow(2).sum().backward()
    weight = layer.to_linear(torch.float32)  # the same product as a plain fp32 layer
    x32 = x.detach().float().requires_grad_()
    weight(x32).pow(2).sum().backward()
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=0.05, atol=0.05)
    assert not any(p.requires_grad for p in layer.parameters())


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_training_and_no_grad_calls_compute_the_same_output(kernel):
    from nvila.core.specs import build

    torch.manual_seed(0)
    part = torch.nn.Sequential(torch.nn.Linear(64, 48))
    build("quantizer", {**RTN, "kernel": kernel}).quantize(part)
    x = torch.randn(300, 64, dtype=torch.bfloat16)  # past dense_rows: the CPU's dense path
    with torch.no_grad():
        served = part(x)
    trained = part(x.requires_grad_())
    assert trained.requires_grad
    torch.testing.assert_close(trained.detach(), served)


def test_export_merges_adapters_into_the_dequantized_weights(tiny_spec, registry, tmp_path):
    m = module(tiny_spec)
    model = m.model.eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # adapters that change the answer
    batch = batch_of(model, 1)
    with torch.no_grad():
        before = model(**batch)["logits"].float()
        merge_lora(model)
        after = model(**batch)["logits"].float()
    torch.testing.assert_close(after, before, rtol=0.05, atol=0.05)  # int4 layers compute in bf16, merged in fp32
    assert model.spec.quant == {} and not any(isinstance(x, Int4WeightOnlyLinear) for x in model.modules())
    assert all(p.dtype == torch.float32 for p in model.llm.parameters())
    save_checkpoint(model, tmp_path / "ckpt")
    assert read_spec(tmp_path / "ckpt").quant == {}
    with torch.no_grad():
        reloaded = load_checkpoint(tmp_path / "ckpt", registry)(**batch)["logits"]
    torch.testing.assert_close(reloaded, after, rtol=0, atol=0)


def test_the_stage_recipe_trains_saves_resumes_and_exports(tiny_fit_args, tmp_path):
    first = run_cli([*tiny_fit_args(tmp_path, steps=2), *QLORA, "--checkpoint.every_n_train_steps=1"])
    assert isinstance(first.model.model.spec.quant, dict)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    qweights = [k for k in state if k.endswith("qweight")]
    assert qweights and all(state[k].dtype == torch.uint8 for k in qweights)
    assert not [k for k in state if k.endswith("base_layer.weight")]  # no dense copy of an int4 layer saved
    resumed = run_cli([*tiny_fit_args(tmp_path, steps=4), *QLORA, "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 4
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora
    exported = load_checkpoint(resumed.export.path)
    assert read_spec(resumed.export.path).quant == {}  # a full-precision checkpoint: adapters merged
    assert all(p.dtype == torch.float32 for p in exported.parameters())


def test_training_starts_from_a_checkpoint_that_nvila_quantize_wrote(tiny_fit_args, synth_data, varied_model,
                                                                      tmp_path):
    from nvila.workflows.quantize import quantize_checkpoint

    save_checkpoint(varied_model, tmp_path / "full")
    quantize_checkpoint(tmp_path / "full", tmp_path / "awq", {"llm": {"name": "w4a16", "group_size": 32}},
                        str(synth_data / "train"), 4)
    cli = run_cli([*tiny_fit_args(tmp_path / "run", steps=1), *QLORA, f"--model.init_from={tmp_path / 'awq'}"])
    assert cli.model.spec.quant["llm"]["method"] == "awq"  # the checkpoint's AWQ scales, not the recipe's rtn
    assert cli.trainer.global_step == 1
    # a full-precision start is quantized with round-to-nearest scales when training begins (within half a step)
    module = NvilaModule(ModelSpec.from_dict({**varied_model.spec.to_dict(), "quant": {"llm": RTN}}),
                         TrainingSettings(init_from=str(tmp_path / "full"), peft={"lora": {"r": 4}}))
    q_proj = module.model.llm.model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer()
    dense = varied_model.llm.model.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(q_proj.to_linear().weight, dense, atol=0.1 * float(dense.abs().max()), rtol=0)


@pytest.mark.parametrize("quant,peft,message", [
    (RTN, {}, "cannot be fully fine-tuned.*set model.peft"),
    ({"name": "w8a8"}, None, "'w8a8' does not train"),
    ({"name": "w4a16", "group_size": 32}, None, "AWQ's scales come from calibration.*method: rtn"),
])
def test_quantized_specs_that_cannot_train_are_refused_naming_what_does(tiny_spec, quant, peft, message):
    with pytest.raises(NvilaError, match=message) as found:
        module(tiny_spec, quant, peft)
    assert "stages/qlora" in str(found.value)


def test_a_quantized_vision_tower_does_not_train(tiny_spec):
    spec = ModelSpec.from_dict({**tiny_spec, "quant": {"encoder": "w8a8", "llm": RTN}})
    with pytest.raises(NvilaError, match="quant.encoder .w8a8. is for serving.*stages/qlora"):
        NvilaModule(spec, TrainingSettings(peft={"lora": {"r": 4}}))
