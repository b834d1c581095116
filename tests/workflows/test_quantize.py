"""`nvila quantize`: a checkpoint in, a quantized checkpoint out that generate and eval take like any other."""

import pytest
import torch
from PIL import Image

from nvila.core.checkpoint import load_checkpoint, read_spec, save_checkpoint
from nvila.core.engine import ChatRequest, Engine
from nvila.core.errors import NvilaError
from nvila.core.model import ModelSpec
from nvila.workflows.commands import main
from nvila.workflows.quantize import part_bytes, quantize_checkpoint

LLM = "{name: w4a16, group_size: 32}"  # the tiny language model is 32 wide
RTN = {"name": "w4a16", "group_size": 32, "method": "rtn"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, varied_model):
    path = tmp_path_factory.mktemp("quantize") / "ckpt"
    save_checkpoint(varied_model, path)
    return path


def test_nvila_quantize_writes_a_checkpoint_that_generate_and_eval_take(ckpt, synth_data, tmp_path, capsys):
    out = tmp_path / "w8a8-w4a16"
    assert main(["quantize", "--ckpt", str(ckpt), "--vision", "w8a8", "--llm", LLM, "--calib",
                 str(synth_data / "train"), "--calib-samples", "8", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "(8 calibration samples)" in report
    assert "| encoder | w8a8 | 6 |" in report and "| llm | w4a16 | 7 |" in report
    assert "| projector | w16a16 |" in report  # the serving mix's default: computes as the parts around it
    spec = read_spec(out)
    assert spec.quant["llm"]["method"] == "awq" and spec.quant["encoder"]["name"] == "w8a8"
    assert spec.quant["projector"] == {"name": "w16a16", "dtype": "auto"}
    assert main(["generate", "--ckpt", str(out), "--prompt", "What color?", "--max-new-tokens", "3"]) == 0
    assert main(["eval", "--ckpt", str(out), "--shards", str(synth_data / "val"), "--limit", "4",
                 "--batch-size", "2"]) == 0
    assert "accuracy:" in capsys.readouterr().out


def test_the_report_counts_weight_bytes_per_part(ckpt, tmp_path):
    report = quantize_checkpoint(ckpt, tmp_path / "q", {"encoder": "w8a8", "llm": RTN})
    parts = {p.part: p for p in report.parts}
    assert parts["encoder"].layers == 6 and parts["llm"].layers == 7 and parts["projector"].quantizer is None
    assert parts["projector"].ratio == 1.0
    assert parts["encoder"].ratio < 0.7  # its linears drop to a quarter, its embeddings stay
    model = load_checkpoint(tmp_path / "q")
    assert part_bytes(model) == {p.part: p.bytes_after for p in report.parts} | {"compressor": 0, "temporal": 0}


def test_the_projector_follows_the_parts_around_it_unless_told(ckpt, tmp_path, capsys, monkeypatch):
    from nvila.quant import w8a8

    for fast, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(w8a8, "bf16_is_fast", lambda fast=fast: fast)
        out = tmp_path / f"fast-{fast}"
        assert main(["quantize", "--ckpt", str(ckpt), "--vision", "w8a8", "--out", str(out)]) == 0
        model = load_checkpoint(out)  # the spec's w16a16 decides again on the machine that loads it
        assert {p.dtype for p in model.projector.parameters()} == {expected}
        assert {p.dtype for p in model.encoder.parameters() if p.is_floating_point()} == {expected}
    # written where bf16 is fast, loaded where it is not: the bf16 weights load into an fp32 projector
    assert {p.dtype for p in load_checkpoint(tmp_path / "fast-True").projector.parameters()} == {torch.float32}
    capsys.readouterr()
    assert main(["quantize", "--ckpt", str(ckpt), "--vision", "w8a8", "--projector", "none",
                 "--out", str(tmp_path / "kept")]) == 0
    assert "projector" not in read_spec(tmp_path / "kept").quant
    assert "| projector | - |" in capsys.readouterr().out
    # the language model alone: a start for QLoRA-style PEFT, which trains the projector, so it stays as trained
    assert main(["quantize", "--ckpt", str(ckpt), "--llm", LLM.replace("}", ", method: rtn}"),
                 "--out", str(tmp_path / "llm-only")]) == 0
    assert set(read_spec(tmp_path / "llm-only").quant) == {"llm"}


def test_awq_without_calibration_shards_is_refused_naming_the_quick_option(ckpt, tmp_path):
    with pytest.raises(NvilaError, match=r"give --calib SHARDS.*method: rtn"):
        quantize_checkpoint(ckpt, tmp_path / "q", {"llm": {**RTN, "method": "awq"}})


def test_a_part_that_does_not_exist_is_refused(ckpt, tmp_path, capsys):
    assert main(["quantize", "--ckpt", str(ckpt), "--out", str(tmp_path / "q"), "--llm", "w8a8"]) == 0
    with pytest.raises(NvilaError, match="no part 'vision'"):
        quantize_checkpoint(ckpt, tmp_path / "q2", {"vision": "w8a8"})
    with pytest.raises(NvilaError, match="llm already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "q3", {"llm": "w8a8"})


def test_a_device_without_the_kernel_is_refused_before_any_work(ckpt, tmp_path, capsys):
    # a kernel this machine cannot run the layers with: tinygemm without a CUDA GPU; with one, nvila's CPU kernel,
    # which takes no groups of 32 anywhere
    kernel, said = ("avx512_bf16", "groups of 64 or 128") if torch.cuda.is_available() else ("cuda", "needs a CUDA GPU")
    assert main(["quantize", "--ckpt", str(ckpt), "--out", str(tmp_path / "q"),
                 "--llm", f"{{name: w4a16, group_size: 32, method: rtn, kernel: {kernel}}}"]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_quantized_answers_agree_with_full_precision_ones(ckpt, varied_model, tmp_path):
    quantize_checkpoint(ckpt, tmp_path / "q", {"encoder": "w8a8", "llm": RTN})
    request = ChatRequest([{"role": "user", "content": "<image>\nWhat color?"}],
                          images=[Image.new("RGB", (32, 32), (30, 200, 30))])
    full, quantized = Engine(varied_model), Engine(load_checkpoint(tmp_path / "q"))
    a = full.prefill(full.inputs([request])).logits
    b = quantized.prefill(quantized.inputs([request])).logits
    assert a.argmax(-1).tolist() == b.argmax(-1).tolist()


def test_training_refuses_a_quantized_spec(tiny_spec):
    from nvila.workflows.module import NvilaModule

    with pytest.raises(NvilaError, match="is for serving"):
        NvilaModule(ModelSpec.from_dict({**tiny_spec, "quant": {"encoder": "w8a8"}}))
