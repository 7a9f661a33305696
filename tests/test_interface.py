"""predict.py as Cog reads it: the input names, defaults and choices the hosted API exposes."""

from __future__ import annotations

import ast
from pathlib import Path

from cog import _inspector

PREDICT = Path(__file__).resolve().parent.parent / "predict.py"


def test_cog_reads_the_fixed_inputs_with_literal_defaults_and_choices():
    info = _inspector.create_predictor("predict", "Predictor")
    inputs = info.inputs
    assert list(inputs) == [
        "prompt",
        "negative_prompt",
        "image",
        "mask",
        "reference_images",
        "strength",
        "num_inference_steps",
        "guidance_scale",
        "width",
        "height",
        "num_outputs",
        "seed",
        "output_format",
        "vae",
        "output_quality",
        "control_image",
        "controlnet",
        "controlnet_conditioning_scale",
        "control_preprocess",
        "lora_weights",
        "lora_scale",
        "extra_lora",
        "extra_lora_scale",
        "disable_safety_checker",
    ]
    assert (inputs["output_format"].choices, inputs["output_format"].default) == (["webp", "jpg", "png"], "webp")
    assert (inputs["vae"].choices, inputs["vae"].default) == (["full", "tiny"], None)
    assert (inputs["controlnet"].choices, inputs["controlnet"].default) == (["canny", "depth"], None)
    assert inputs["control_preprocess"].default is True
    assert inputs["disable_safety_checker"].default is False
    assert (inputs["lora_scale"].default, inputs["extra_lora_scale"].default) == (1.0, 1.0)
    assert (inputs["num_outputs"].default, inputs["output_quality"].default, inputs["negative_prompt"].default) == (
        1,
        80,
        "",
    )
    for name in (
        "num_inference_steps",
        "guidance_scale",
        "width",
        "height",
        "seed",
        "image",
        "mask",
        "reference_images",
        "lora_weights",
        "extra_lora",
    ):
        assert inputs[name].default is None, name


def test_every_input_has_a_literal_description():
    """cog build reads the source without importing it: Input() arguments must be literals."""
    tree = ast.parse(PREDICT.read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Input"]
    assert len(calls) == 24
    for call in calls:
        keywords = {keyword.arg: keyword.value for keyword in call.keywords}
        assert "description" in keywords
        for value in keywords.values():
            ast.literal_eval(value)  # raises for anything computed


def test_the_runner_uses_the_current_cog_api():
    source = PREDICT.read_text()
    assert "class Predictor(BaseRunner)" in source and "def run(" in source
    assert "BasePredictor" not in source and "def predict(" not in source


def readme_variants_table() -> list[list[str]]:
    readme = (PREDICT.parent / "README.md").read_text()
    section = readme.split("## Variants\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("| variant |", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_the_readme_variants_table_is_the_catalogue():
    from fastsd import variants

    rows = readme_variants_table()
    assert [row[0].strip("`") for row in rows] == list(variants.VARIANTS)
    for row in rows:
        variant = variants.VARIANTS[row[0].strip("`")]
        assert variant.model.endswith(row[1]), row
        guidance = f"{variant.guidance_scale:g}"
        assert row[-1] == f"{variant.num_inference_steps} / {guidance} / {variant.width}x{variant.height}", row
        scheduler = variant.recipe.scheduler
        if scheduler.eta is not None:
            assert f"eta {scheduler.eta:g}" in row[3], row
        if scheduler.timesteps:
            assert ", ".join(map(str, scheduler.timesteps)) in row[3], row
