"""Token and cost plans against what the model really does, for every registered compressor."""

import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nvila.core.model import NvilaModel
from nvila.core.planning import Planner
from nvila.core.plugins import load_plugins
from nvila.workflows.cli import NvilaCLI, model_spec, read_recipe, refuse_import_paths
from nvila.workflows.commands import main

COMPRESSORS = load_plugins(strict=True).registry.names("compressor")
# tall, wide, square, tiny and huge images, as (width, height)
SIZES = [(60, 200), (200, 60), (90, 90), (16, 16), (8000, 300)]
# NVILA-8B's shape at toy widths: DynS2 over three scales, 9 to 12 tiles at the largest
TINY_DYNS2 = {"name": "dyns2", "scales": [32, 64, 96], "max_tiles": 12,
              "base": {"name": "siglip", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "feature_layer": -2}}
TINY_LLM = {"name": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
            "num_kv_heads": 1}


def spec(compressor="stc", encoder=TINY_DYNS2):
    return {"encoder": dict(encoder), "compressor": {"name": compressor}, "projector": {"name": "mlp"},
            "llm": dict(TINY_LLM)}


@pytest.fixture(scope="module")
def built():
    """A real tiny model and its meta-device planner, per compressor (built once)."""
    cache = {}

    def get(compressor):
        if compressor not in cache:
            torch.manual_seed(0)
            cache[compressor] = (NvilaModel(spec(compressor)).eval(),
                                 Planner(spec(compressor), dtype="fp32", measure_memory=False))
        return cache[compressor]
    return get


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("size", SIZES, ids=["tall", "wide", "square", "tiny", "huge"])
def test_planned_tokens_are_what_the_model_produces(built, compressor, size):
    model, planner = built(compressor)
    image = Image.new("RGB", size, (120, 30, 200))
    encoded = model.processor.encode([{"from": "human", "value": "<image>\nwhat?"}], [image])
    placeholders = int((encoded.input_ids == model.image_token_id).sum())
    with torch.no_grad():
        visual = model.visual_tokens(encoded.pixels, encoded.grids)  # (N, D)
    plan = planner.image(*size)
    assert placeholders == visual.shape[0]
    assert plan.visual_tokens == planner.image_tokens(*size) == model.processor.image_tokens(encoded.grids[0])
    ends = len(model.processor.image_end_ids) * (encoded.grids[0][1] if model.processor.end_per_block else 1)
    assert plan.visual_tokens == placeholders + ends  # the image-end newline(s) count as the image's tokens
    assert plan.tiles == encoded.pixels.shape[0] and plan.block_grid == encoded.grids[0]
    assert plan.stage("projector").tokens == visual.shape[0] and plan.stage("projector").width == visual.shape[1]


def test_planned_flops_are_counted_on_the_real_forward(built):
    model, planner = built("stc")
    image = Image.new("RGB", (200, 60))
    prepared = model.processor.image_processor(image)
    plan = planner.image(200, 60, text_tokens=7)
    # SDPA's fused CPU kernel has no FLOP formula in torch; its math path counts the attention matmuls
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as encoder:
            blocks = model.encoder(prepared.pixels, [prepared.grid])
        with FlopCounterMode(display=False) as projector:
            model.projector(model.compressor(blocks))
        embeds = torch.randn(1, plan.llm_tokens, model.llm.hidden_size)
        with FlopCounterMode(display=False) as llm:
            hidden = model.llm.hidden_states(embeds, attention_mask=torch.ones(1, plan.llm_tokens))
            model.llm.output_layer()(hidden[:, -1:])
    assert plan.stage("encoder").flops == encoder.get_total_flops() > 0
    assert plan.stage("projector").flops == projector.get_total_flops() > 0
    assert plan.stage("llm prefill").flops == llm.get_total_flops() > 0
    assert plan.llm_tokens == plan.visual_tokens + 7


def test_video_frames_are_one_base_tile_each_and_pooled_over_time(built):
    model, planner = built("stc")  # the default temporal slot: NVILA's 8-frame average, a newline per frame
    frames = [model.processor.image_processor.frame(Image.new("RGB", (64, 48), (i, 0, 0))) for i in range(5)]
    with torch.no_grad():
        visual = model.video_tokens(torch.cat([f.pixels for f in frames]), [(5, *frames[0].grid)])
    encoded = model.processor.encode([{"from": "human", "value": "<video>"}], videos=[[Image.new("RGB", (64, 48))] * 5])
    ends = len(model.processor.frame_end_ids)
    plan = planner.video(5)
    assert visual.shape[0] == 1 * 4  # 5 frames -> 1 pooled frame of 4 tokens
    assert plan.tiles == 5 and plan.visual_tokens == planner.video_tokens(5) == visual.shape[0] + ends
    assert int((encoded.input_ids == model.video_token_id).sum()) == visual.shape[0]
    assert plan.stage("encoder").flops * 17 == pytest.approx(planner.image(200, 60).stage("encoder").flops * 5,
                                                             rel=0.05)  # 17 tiles for the image, 1 per frame


def test_activation_memory_and_kv_cache_are_planned():
    plan = Planner(spec(), dtype="fp32").image(200, 60)
    assert all(s.activation_bytes is not None for s in plan.stages)
    assert plan.stage("encoder").activation_bytes > 0 and plan.stage("llm prefill").activation_bytes > 0
    assert plan.kv_cache_bytes == 2 * 1 * 1 * 16 * plan.llm_tokens * 4  # K and V, 1 layer, 1 kv head of 16, fp32


@pytest.mark.parametrize("recipe,size,tiles,grid,tokens", [
    # each image ends with a newline token (image_end); each NVILA-Lite tile is an image of its own
    ("nvila-8b", (1920, 1080), 17, (3, 4), 12 * 256 + 1),  # 16:9 -> 4 x 3 tiles at 1344, 256 tokens each
    ("nvila-8b", (448, 448), 14, (3, 3), 9 * 256 + 1),     # square -> the minimum of 9 tiles
    ("nvila-lite-2b", (1920, 1080), 9, (1, 9), 9 * 122),    # 4 x 2 tiles (2:1 ties 2 x 1, image large) + thumbnail
    ("nvila-lite-2b", (448, 448), 1, (1, 1), 122),           # one tile, no thumbnail
])
def test_released_presets_plan_without_weights(recipe, size, tiles, grid, tokens):
    planner = Planner(model_spec(read_recipe(['--config', recipe])), measure_memory=False)
    assert next(planner.model.parameters()).device.type == "meta"
    plan = planner.image(*size)
    assert (plan.tiles, plan.block_grid, plan.visual_tokens) == (tiles, grid, tokens)


def test_nvila_plan_prints_a_table(capsys):
    assert main(["plan", "--config", "nvila-8b-tiny", "--image-size", "300x20", "--text-tokens", "5",
                 "--model.encoder.max_tiles=9"]) == 0
    out = capsys.readouterr().out
    assert "image 300 wide x 20 high" in out and "largest-scale grid 1 x 9" in out
    assert "llm prefill" in out and "prefill length 42" in out  # 9 blocks x 4 tokens + newline + 5 text


@pytest.mark.parametrize("args,message", [
    (["--image-size", "wide"], "WIDTHxHEIGHT"),
    (["--image-size", "1920x1080x3"], "WIDTHxHEIGHT"),
    (["--image-size", "1920*1080"], "WIDTHxHEIGHT"),
    (["--model.encoder.max_tiles=4"], "max_tiles 4 is below"),
    (["--frames", "0"], "at least one frame"),
    (["--image-size", "0x10"], "WIDTHxHEIGHT"),
    (["--bogus"], "unrecognised argument"),
])
def test_nvila_plan_reports_bad_input_in_one_line(capsys, args, message):
    assert main(["plan", "--config", "nvila-8b-tiny", *args]) == 2
    assert message in capsys.readouterr().err


def test_landscape_sizes_are_width_first(capsys):
    assert main(["plan", "--config", "nvila-8b", "--image-size", "1920x1080"]) == 0
    out = capsys.readouterr().out
    assert "image 1920 wide x 1080 high" in out and "largest-scale grid 3 x 4" in out  # 3 rows, 4 columns
    assert "visual tokens into the LLM: 3,073" in out  # 12 x 256 and the image's end newline


def test_plan_reads_stacked_recipes_and_overrides_exactly_as_fit(tmp_path, capsys, synth_data):
    args = ["--config", "demo", "--config", "stages/peft", "--model.compressor.ratio=4", "--model.max_length=300"]
    data = [f"--data.train={synth_data / 'train'}", f"--data.val={synth_data / 'val'}"]
    fit = NvilaCLI(args=refuse_import_paths([*args, *data, f"--trainer.default_root_dir={tmp_path}"]), run=False)
    planned = model_spec(read_recipe(args))
    assert planned == fit.model.spec
    assert planned.compressor == {"name": "stc", "ratio": 4} and planned.max_length == 300
    assert main(["plan", "-c", "demo", "-c", "stages/peft", "--model.compressor.ratio=4", "--image-size", "64x64"]) == 0
    assert "demo + peft" in capsys.readouterr().out
