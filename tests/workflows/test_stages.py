"""NVILA's training stages as recipes, chained through checkpoint directories on the tiny model."""

import pytest
import torch

from nvila.core.errors import NvilaError
from nvila.workflows.cli import NvilaCLI, recipe_path, run_cli

STAGES = ["align", "encoder-pretrain", "pretrain", "sft", "peft"]
# which parts each stage must leave untouched (PEFT trains LoRA adapters and norms, merged on export)
FROZEN = {"align": ["encoder", "llm"], "encoder-pretrain": ["llm"], "pretrain": [], "sft": [], "peft": []}


def tiny_args(synth_data, tiny_overrides, root):
    return [f"--data.train={synth_data / 'train'}", f"--data.val={synth_data / 'val'}",
            f"--trainer.default_root_dir={root}", "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false", "--data.batch_size=8",
            "--data.num_workers=0", "--model.warmup_steps=1",
            *tiny_overrides]


def weights(cli):
    return {k: v.detach().clone() for k, v in cli.model.model.state_dict().items()}


def test_stages_chain_through_checkpoints_and_train_only_their_parts(synth_data, tiny_overrides, tmp_path):
    previous = None
    for stage in STAGES:
        args = ["fit", "--config", recipe_path("demo"), "--config", recipe_path(f"stages/{stage}"),
                *tiny_args(synth_data, tiny_overrides, tmp_path / stage), "--model.lr=1e-2"]
        if previous is not None:
            args.append(f"--model.init_from={previous}")
        cli = run_cli(args)
        after = weights(cli)
        if previous is not None:
            from safetensors.torch import load_file

            before = load_file(previous / "model.safetensors")
            for part in ("encoder", "projector", "llm"):
                # (tied weights are stored once in the safetensors file, so compare the keys it holds)
                keys = [k for k in before if k.startswith(part + ".")]
                assert keys
                changed = any(not torch.equal(before[k], after[k]) for k in keys)
                assert changed == (part not in FROZEN[stage]), f"{stage}: {part} changed={changed}"
        previous = cli.export.path


def test_peft_with_frozen_weights_in_bf16_exports_a_plain_checkpoint(synth_data, tiny_overrides, tmp_path):
    from nvila.core.checkpoint import load_checkpoint

    cli = run_cli(["fit", "--config", recipe_path("demo"), "--config", recipe_path("stages/peft"),
                   *tiny_args(synth_data, tiny_overrides, tmp_path), "--model.lr=1e-2",
                   "--model.precision={name: bf16, frozen_in_bf16: true}"])
    assert cli.trainer.precision == "bf16-mixed"
    trained = cli.model.model  # after export: adapters merged into their base weights, raised to fp32
    assert trained.llm.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert trained.encoder.vision.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16  # frozen, no adapter
    assert trained.projector[0].weight.dtype == torch.float32  # trained: fp32 master weights
    model = load_checkpoint(cli.export.path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained.state_dict()[name].float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("preset,stage", [("nvila-8b-tiny", "peft"), ("nvila-lite-2b-tiny", "sft")])
def test_tiny_presets_train_a_few_steps(synth_data, tmp_path, preset, stage):
    """The released architectures' tiny twins (DynS2 and dynamic tiles, untied and tied embeddings) train."""
    cli = run_cli(["fit", "--config", recipe_path(preset), "--config", recipe_path(f"stages/{stage}"),
                   f"--data.train={synth_data / 'train'}", f"--data.val={synth_data / 'val'}",
                   f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                   "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false", "--data.batch_size=4",
                   "--data.num_workers=0", "--model.warmup_steps=1"])
    assert cli.trainer.global_step == 2
    assert (cli.export.path / "model.safetensors").exists()


def test_lr_multipliers_give_each_part_its_learning_rate(synth_data, tiny_overrides, tmp_path):
    cli = NvilaCLI(args=["--config", recipe_path("demo"), "--config", recipe_path("stages/peft"),
                         *tiny_args(synth_data, tiny_overrides, tmp_path)], run=False)
    groups = {g["name"]: g["lr"] for g in cli.model.parameter_groups()}
    assert groups["encoder"] == pytest.approx(0.1 * groups["llm"])
    assert groups["projector"] == groups["llm"] == pytest.approx(1e-4)


@pytest.mark.parametrize("override,message", [
    ("--model.freeze=[encoder.nothing]", "Cannot freeze 'encoder.nothing': no such module"),
    ("--model.lr_multipliers={vision: 0.1}", r"lr_multipliers names \['vision'\]"),
    ("--model.loss=lean", "model.loss 'lean' is unknown"),
    ("--model.precision={name: fp8}", "compute capability 8.9"),
])
def test_bad_training_settings_are_refused_before_training(synth_data, tiny_overrides, tmp_path, override, message):
    with pytest.raises(NvilaError, match=message):
        NvilaCLI(args=["--config", recipe_path("demo"), *tiny_args(synth_data, tiny_overrides, tmp_path), override],
                 run=False)


def test_a_checkpoint_of_another_architecture_is_refused(synth_data, tiny_overrides, tmp_path):
    first = run_cli(["fit", "--config", recipe_path("demo"), *tiny_args(synth_data, tiny_overrides, tmp_path / "a")])
    with pytest.raises(NvilaError, match="do not fit this model's architecture"):
        NvilaCLI(args=["--config", recipe_path("demo"), *tiny_args(synth_data, tiny_overrides, tmp_path / "b"),
                       "--model.llm.hidden_size=64", f"--model.init_from={first.export.path}"], run=False)


def test_memory_savers_leave_the_loss_unchanged(synth_data, tiny_overrides, tmp_path):
    def first_loss(*extra):
        torch.manual_seed(0)
        cli = NvilaCLI(args=["--config", recipe_path("demo"), *tiny_args(synth_data, tiny_overrides, tmp_path), *extra],
                       run=False)
        batch = next(iter(_loader(cli)))
        cli.model.train()
        loss = cli.model.training_step(batch, 0)
        loss.backward()
        grad = cli.model.model.projector[1].weight.grad.clone()
        return loss.detach(), grad

    base_loss, base_grad = first_loss()
    for extra in (["--model.loss=chunked", "--model.loss_chunk_size=7"], ["--model.gradient_checkpointing=true"]):
        loss, grad = first_loss(*extra)
        torch.testing.assert_close(loss, base_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, base_grad, rtol=1e-4, atol=1e-6)


def _loader(cli):
    from nvila.core.data.shards import sample_stream
    from nvila.core.processor import collator

    model = cli.model.model
    stream = sample_stream(cli.datamodule.train_shards, model.processor)
    return torch.utils.data.DataLoader(stream, batch_size=4, collate_fn=collator(model.tokenizer.pad_token_id))
