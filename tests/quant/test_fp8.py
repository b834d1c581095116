import pytest
import torch

from nvila.core.errors import NvilaError
from nvila.core.specs import build
from nvila.quant.fp8 import fp8_capable_gpu


def small_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32),
                               torch.nn.Linear(32, 10))  # the last one (10 outputs) is not eligible


@pytest.mark.skipif(fp8_capable_gpu() is not None, reason="this machine can run FP8 for real")
def test_fp8_without_a_capable_gpu_is_refused_before_training(registry):
    backend = build("precision", {"name": "fp8"}, registry)
    with pytest.raises(NvilaError, match="compute capability 8.9.*emulate=true"):
        backend.check_available()


def test_emulated_fp8_converts_eligible_linears_and_trains(registry):
    backend = build("precision", {"name": "fp8", "emulate": True}, registry)
    backend.check_available()
    model = backend.prepare(small_mlp())
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Float8Linear", "GELU", "Float8Linear", "Linear"]
    reference = small_mlp()
    x = torch.randn(8, 32)
    out, ref = model(x), reference(x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # fp8 rounding, not garbage
    out.square().mean().backward()
    assert model[0].weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(fp8_capable_gpu() is None, reason="needs a CUDA GPU with compute capability >= 8.9")
def test_real_fp8_trains_on_a_capable_gpu(registry):
    backend = build("precision", {"name": "fp8"}, registry)
    backend.check_available()
    model = backend.prepare(small_mlp().cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(torch.randn(16, 32, device="cuda")).float().square().mean()
    loss.backward()
    assert torch.isfinite(model[0].weight.grad).all()


def test_fp8_under_peft_converts_the_base_layers_and_leaves_the_adapters(registry, tiny_spec):
    from nvila.core.model import NvilaModel
    from nvila.workflows.peft import apply_peft, parse_peft

    spec = {**tiny_spec, "llm": {**tiny_spec["llm"], "hidden_size": 64, "intermediate_size": 128}}
    model = NvilaModel(spec, registry)
    apply_peft(model, parse_peft({"lora": {"r": 16}}))
    build("precision", {"name": "fp8", "emulate": True}, registry).prepare(model)
    converted = {n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"}
    assert any(n.endswith("q_proj.base_layer") for n in converted)
    assert not any("lora_" in n for n in converted)
    assert any("lora_A" in n for n, _ in model.named_modules())
