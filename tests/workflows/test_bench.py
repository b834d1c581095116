"""``nvila bench`` configurations run end to end (at toy sizes here; the real sizes are benchmarks)."""

from workflows.bench import SUITES, markdown, run_one

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
    from nvila_core.cli import _parser

    bench = next(a for a in _parser()._subparsers._group_actions[0].choices["bench"]._actions if a.dest == "suite")
    assert set(bench.choices) == set(SUITES)
