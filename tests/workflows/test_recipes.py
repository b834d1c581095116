"""Every shipped recipe loads and builds through the Lightning CLI (without training)."""

import inspect

import pytest
import torch
import yaml

from nvila.core.errors import NvilaError
from nvila.workflows.cli import NvilaCLI, recipe_fragments, recipe_path, refuse_import_paths, shipped_recipes
from nvila.workflows.module import build_module

# Released-size presets (nvila-8b has 8 billion parameters) are built through the same CLI on PyTorch's meta
# device: every module gets its real class and shapes but no storage, so a wrong key, type or shape fails here
# as it would on a GPU. Recipes below REAL_BUILD_LIMIT parameters are then built again with real weights.
REAL_BUILD_LIMIT = 50_000_000


@pytest.mark.parametrize("recipe", shipped_recipes(), ids=lambda p: p.stem)
def test_shipped_recipe_builds(recipe, synth_data):
    args = ["--config", str(recipe), f"--data.train={synth_data / 'train'}", f"--data.val={synth_data / 'val'}"]
    with torch.device("meta"):
        cli = NvilaCLI(args=args, run=False)
    assert cli.model.model.tokens_per_block > 0
    assert cli.trainer.precision == cli.model.precision_backend.lightning_precision
    if sum(p.numel() for p in cli.model.parameters()) < REAL_BUILD_LIMIT:
        cli = NvilaCLI(args=args, run=False)
        assert next(cli.model.parameters()).device.type == "cpu" and cli.model.model.tokens_per_block > 0


def test_overrides_reach_the_component_specs_as_typed_values(synth_data):
    cli = NvilaCLI(args=["--config", recipe_path("demo"), f"--data.train={synth_data / 'train'}",
                         f"--data.val={synth_data / 'val'}", "--model.compressor.ratio=1",
                         "--model.encoder.num_layers=1"], run=False)
    assert cli.model.model.compressor.k == 1
    assert len(cli.model.model.encoder.vision.encoder.layers) == 1


def test_the_demo_sees_one_visual_token_per_quadrant_and_its_lr_falls_to_zero_at_the_last_step(synth_data):
    """What the demo recipe's comments claim (issue 15): 16-px patches on 64-px images make a 4x4 grid and STC
    2x2 one token per quadrant; warm-up to the peak lr, then a cosine decay that ends at 0 on max_steps."""
    cli = NvilaCLI(args=["--config", recipe_path("demo"), f"--data.train={synth_data / 'train'}",
                         f"--data.val={synth_data / 'val'}"], run=False)
    assert cli.model.model.tokens_per_block == 4
    cli.model.trainer = cli.trainer
    optimizers = cli.model.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(cli.trainer.max_steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    peak, warmup = cli.model.settings.lr, cli.model.settings.warmup_steps
    assert lrs[warmup] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)
    assert lrs[:warmup] == sorted(lrs[:warmup]) and lrs[warmup:] == sorted(lrs[warmup:], reverse=True)
    assert lrs[-1] < 1e-4 * peak


def test_a_misspelt_key_fails_before_anything_is_built(synth_data):
    with pytest.raises(NvilaError, match="Did you mean 'ratio'"):
        NvilaCLI(args=["--config", recipe_path("demo"), f"--data.train={synth_data / 'train'}",
                       f"--data.val={synth_data / 'val'}", "--model.compressor.ratoi=3"], run=False)


def test_recipes_and_overrides_may_not_name_import_paths(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  encoder: {class_path: os.system}\n")
    with pytest.raises(NvilaError, match="may not name import paths.*model.encoder.class_path"):
        refuse_import_paths(["fit", "--config", str(bad)])
    with pytest.raises(NvilaError, match="may not name import paths"):
        refuse_import_paths(["fit", "--trainer.callbacks.class_path=os.system"])


def test_unknown_recipe_names_list_the_shipped_ones():
    with pytest.raises(NvilaError, match="neither a file nor a shipped recipe.*demo"):
        recipe_path("dmeo")


def test_a_folder_named_like_a_shipped_recipe_does_not_hide_it(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()  # what `nvila demo --out demo` leaves in the working folder
    monkeypatch.chdir(tmp_path)
    assert recipe_path("demo").endswith("recipes/demo.yaml")


@pytest.mark.parametrize("fragment", recipe_fragments(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_fragment_opens_with_how_to_launch_it_and_names_known_keys(fragment):
    text = fragment.read_text()
    assert text.startswith("#") and "nvila fit --config" in text
    config = yaml.safe_load(text)
    assert set(config) <= {"model", "data", "trainer", "checkpoint"}
    module_args = set(inspect.signature(build_module).parameters)
    assert set(config.get("model", {})) <= module_args, set(config.get("model", {})) - module_args


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA GPUs")
def test_fsdp_fragment_builds_a_sharded_trainer(synth_data):
    cli = NvilaCLI(args=["--config", recipe_path("demo"), "--config", recipe_path("strategies/fsdp"),
                         f"--data.train={synth_data / 'train'}", f"--data.val={synth_data / 'val'}",
                         "--trainer.devices=1"], run=False)
    assert type(cli.trainer.strategy).__name__ == "FSDPStrategy"


def test_a_temporal_group_larger_than_the_sampled_frames_is_refused_before_building(synth_data):
    with pytest.raises(NvilaError, match=r"model.temporal.group = 16 is larger than data.video_frames = 8.*1..8"):
        NvilaCLI(args=["--config", recipe_path("demo"), f"--data.train={synth_data / 'train'}",
                       f"--data.val={synth_data / 'val'}", "--data.video_frames=8",
                       "--model.temporal={name: temporal-average, group: 16}"], run=False)


def test_fsdp_refuses_parameters_of_mixed_dtypes(synth_data):
    with pytest.raises(NvilaError, match=r"fsdp flattens.*bfloat16 and float32.*frozen_in_bf16=false"):
        NvilaCLI(args=["--config", recipe_path("demo"), f"--data.train={synth_data / 'train'}",
                       f"--data.val={synth_data / 'val'}", "--trainer.strategy=fsdp",
                       "--model.precision={name: bf16, frozen_in_bf16: true}", "--model.freeze=[llm]"], run=False)


def training_state_bytes(model: torch.nn.Module) -> int:
    """Weights as stored, plus an fp32 gradient and two fp32 AdamW moments per trainable parameter."""
    return sum(p.numel() * (p.element_size() + (12 if p.requires_grad else 0)) for p in model.parameters())


def test_nvila_8b_peft_keeps_its_training_state_within_24_gb(synth_data):
    """The paper fine-tunes NVILA-8B in 24 GB; weights, gradients and optimizer state, counted on the meta
    device, leave room for checkpointed activations only under PEFT with frozen weights in bf16."""
    data = [f"--data.train={synth_data / 'train'}", f"--data.val={synth_data / 'val'}"]
    states = {}
    for name, extra in {"full": [], "peft": ["--config", recipe_path("stages/peft")]}.items():
        with torch.device("meta"):
            cli = NvilaCLI(args=["--config", recipe_path("nvila-8b"), *extra, *data], run=False)
        states[name] = training_state_bytes(cli.model.model) / 2**30
    assert states["peft"] < 18 < 24 < states["full"]  # 17.5 GiB against 120 GiB
    assert states["full"] / states["peft"] > 6
