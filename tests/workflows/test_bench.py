"""``nvila bench`` configurations run end to end (at toy sizes here; the real sizes are benchmarks)."""

import pytest
import torch

from nvila.workflows.bench import SUITES, markdown, run_one

TOY_SIZES = {
    "encoder_overrides": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                          "num_layers": 1, "num_heads": 2},
    "llm_overrides": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1},
}


def test_peft_and_full_fine_tuning_in_bf16_run_side_by_side():
    names = ["full fine-tuning, bf16 mixed", "PEFT, bf16 mixed, frozen weights in bf16"]
    # (PEFT's bf16 frozen weights meet fp32 activations: its steps run only under bf16 autocast, as in Lightning)
    results = [run_one(name, {**SUITES["peft"][name], **TOY_SIZES, "steps": 1}) for name in names]
    full, peft = results
    assert full.trainable_params == full.total_params
    assert 0 < peft.trainable_params < 0.5 * peft.total_params
    assert full.step_seconds > 0 and peft.tokens_per_second > 0
    table = markdown("peft", results)
    assert f"| {peft.name} |" in table and "| full fine-tuning, bf16 mixed | " in table.splitlines()[-1]


def test_the_command_offers_every_suite():
    from nvila.workflows.commands import _parser

    bench = next(a for a in _parser()._subparsers._group_actions[0].choices["bench"]._actions if a.dest == "suite")
    assert set(bench.choices) == set(SUITES)


def test_largest_fitting_batch_is_found_by_doubling_then_bisection():
    from nvila.workflows.bench import largest_fitting

    tried = []

    def fits_up_to(limit):
        return lambda size: tried.append(size) or size <= limit

    assert largest_fitting(fits_up_to(13)) == 13
    assert tried == [1, 2, 4, 8, 16, 12, 14, 13]
    assert largest_fitting(fits_up_to(0)) == 0
    assert largest_fitting(fits_up_to(10_000), limit=100) == 100


def test_the_fp8_configurations_train_in_emulation_on_the_cpu():
    """The `fp8` suite's own settings, at toy sizes and in torchao's emulation (the real one needs sm >= 8.9)."""
    settings = {**SUITES["fp8"]["fp8 (tensorwise scaling)"], **TOY_SIZES, "steps": 1, "question_words": 20,
                "answer_words": 5, "precision": {"name": "fp8", "emulate": True}}
    result = run_one("fp8", settings)
    assert result.trainable_params == result.total_params and result.tokens_per_second > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these run for real")
def test_gpu_only_benchmarks_say_what_they_need(capsys):
    from nvila.core.errors import NvilaError
    from nvila.workflows.commands import main

    assert main(["bench", "fp8"]) == 2
    assert "needs an NVIDIA GPU with compute capability 8.9" in capsys.readouterr().err
    with pytest.raises(NvilaError, match="needs a CUDA GPU"):
        run_one("largest", {**SUITES["fp8"]["bf16 mixed, largest batch"], **TOY_SIZES})
