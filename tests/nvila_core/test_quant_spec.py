"""Quantization per part in the model's spec: validated with the rest of the spec, applied when the model is built,
written into checkpoints, and loaded back into the same quantized model without unpickling anything."""

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from nvila.core.checkpoint import WEIGHTS_FILE, load_checkpoint, read_spec, save_checkpoint
from nvila.core.engine import ChatRequest, DecodingConfig, Engine
from nvila.core.errors import NvilaError
from nvila.core.model import ModelSpec, NvilaModel

QUANT = {"encoder": "w8a8", "llm": {"name": "w4a16", "group_size": 32, "method": "rtn"}}  # the tiny LLM is 32 wide
REQUEST = ChatRequest([{"role": "user", "content": "<image>\nWhat color is it?"}],
                      images=[Image.new("RGB", (32, 32), (200, 30, 30))])


def test_spec_takes_names_or_specs_per_part_and_round_trips(tiny_spec):
    spec = ModelSpec.from_dict({**tiny_spec, "quant": {"encoder": "w8a8", "llm": {"name": "w4a16"}}})
    assert spec.quant == {"encoder": {"name": "w8a8"}, "llm": {"name": "w4a16"}}
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert ModelSpec.from_dict({**tiny_spec, "quant": None}).quant == {}


def test_a_part_that_does_not_exist_and_a_bad_quantizer_are_refused_together(tiny_spec, registry):
    spec = ModelSpec.from_dict({**tiny_spec, "quant": {"vision": "w8a8", "llm": "w4a61"}})
    with pytest.raises(NvilaError) as caught:
        spec.validate(registry, prefix="model.")
    message = str(caught.value)
    assert "model.quant.vision: the model has no part 'vision'" in message
    assert "the vision tower is 'encoder'" in message
    assert "Unknown quantizer 'w4a61'. Did you mean 'w4a16'?" in message


def test_a_part_without_linear_layers_is_refused(tiny_spec, registry):
    with pytest.raises(NvilaError, match="model.quant.temporal: quantizer 'w8a8' .* found nothing to quantize"):
        NvilaModel({**tiny_spec, "quant": {"temporal": "w8a8"}}, registry)


def test_a_group_size_that_does_not_divide_the_llm_is_refused_naming_the_part(tiny_spec, registry):
    with pytest.raises(NvilaError, match=r"model.quant.llm: W4A16: group_size 128 does not divide .*q_proj"):
        NvilaModel({**tiny_spec, "quant": {"llm": "w4a16"}}, registry)


def test_quantize_records_full_specs_leaves_the_callers_spec_alone_and_refuses_twice(tiny_spec, registry):
    spec = ModelSpec.from_dict(tiny_spec)
    model = NvilaModel(spec, registry).eval()
    done = model.quantize(QUANT, registry=registry)
    assert set(done) == {"encoder", "llm"} and all(done.values())
    assert spec.quant == {}
    assert model.spec.quant["encoder"] == {"name": "w8a8", "kernel": "auto", "dtype": "auto", "skip": []}
    assert model.spec.quant["llm"]["group_size"] == 32 and model.spec.quant["llm"]["dtype"] == "bf16"
    with pytest.raises(NvilaError, match="llm already quantized"):
        model.quantize({"llm": "w4a16"}, registry=registry)


def test_a_quantized_checkpoint_is_safetensors_plus_spec_and_loads_to_the_same_model(tiny_spec, registry, tmp_path):
    torch.manual_seed(0)
    model = NvilaModel(tiny_spec, registry).eval()
    engine = Engine(model)
    inputs = engine.inputs([REQUEST])
    full = engine.prefill(inputs).logits
    model.quantize({**QUANT, "projector": {"name": "w16a16", "dtype": "bf16"}}, registry=registry)  # the serving mix
    quantized = engine.prefill(inputs).logits  # the layers pack on this first run
    assert quantized.argmax(-1).tolist() == full.argmax(-1).tolist()
    save_checkpoint(model, tmp_path)
    assert read_spec(tmp_path).quant == model.spec.quant
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes["llm.model.model.layers.0.mlp.up_proj.qweight"] == "U8"
    assert dtypes["encoder.vision.encoder.layers.0.mlp.fc1.weight"] == "I8"
    assert {dtype for key, dtype in dtypes.items() if key.startswith("projector.")} == {"BF16"}
    loaded = load_checkpoint(tmp_path, registry)
    assert {p.dtype for p in loaded.projector.parameters()} == {torch.bfloat16}
    again = Engine(loaded)
    assert torch.equal(again.prefill(again.inputs([REQUEST])).logits, quantized)
    (answer,) = again.generate([REQUEST], DecodingConfig(max_new_tokens=3))
    assert answer.completion_tokens == 3
