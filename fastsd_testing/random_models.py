"""Random-weight models in the exact on-disk layout of the real hub repos.

The hub cannot be reached from CI, and timing does not depend on weight values, so tests build
tiny models and benchmarks full-size ones here. Each repo is written the way the hub lays it
out: model_index.json, one folder per component, full-precision and fp16 safetensors where the
real repo has both, tokenizers, scheduler configs; a replacement UNet as one file in diffusers'
keys; LoRA files in their publishers' key formats (kohya, peft, diffusers' older one).

    python -m fastsd_testing.random_models --size tiny sd-turbo hyper-sdxl   # into ./weights, ./lora
"""

from __future__ import annotations

import argparse
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastsd import variants
from fastsd.pipelines import quiet_library_noise
from fastsd.weights import layout as disk
from fastsd.weights.layout import Source

from . import transformer_models

TINY = "tiny"
FULL = "full"


@dataclass(frozen=True)
class RepoLayout:
    pipeline: str  # diffusers pipeline class written to model_index.json
    architecture: str  # variants.SD15, SD2 or SDXL
    scheduler: tuple[str, dict]
    fp16_files: bool = True  # the repo carries *.fp16.safetensors beside the full-precision files
    safety_checker: bool = False  # SD1.5-era repos ship safety_checker/ and feature_extractor/
    time_cond_proj_dim: int | None = None  # the distilled LCM UNet takes guidance as an embedding
    extra_model_index: dict = field(default_factory=dict)

    @property
    def cross_attention_dim(self) -> int:
        return _CROSS_ATTENTION_DIM[self.architecture]


_CROSS_ATTENTION_DIM = {variants.SD15: 768, variants.SD2: 1024, variants.SDXL: 2048}
# The SDXL repos' model_index.json: the watermarker switched off, the optional components null.
_SDXL_INDEX = {"force_zeros_for_empty_prompt": True, "add_watermarker": None}


_SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

REPOS: dict[str, RepoLayout] = {
    "stabilityai/sd-turbo": RepoLayout(
        "StableDiffusionPipeline",
        variants.SD2,
        ("EulerDiscreteScheduler", dict(_SD_SCHEDULER, timestep_spacing="trailing", prediction_type="epsilon")),
    ),
    "stabilityai/sdxl-turbo": RepoLayout(
        "StableDiffusionXLPipeline",
        variants.SDXL,
        ("EulerAncestralDiscreteScheduler", dict(_SD_SCHEDULER, timestep_spacing="trailing")),
        extra_model_index=_SDXL_INDEX,
    ),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": RepoLayout(
        "StableDiffusionPipeline",
        variants.SD15,
        ("PNDMScheduler", dict(_SD_SCHEDULER, skip_prk_steps=True, steps_offset=1)),
        safety_checker=True,
    ),
    "stabilityai/stable-diffusion-xl-base-1.0": RepoLayout(
        "StableDiffusionXLPipeline",
        variants.SDXL,
        ("EulerDiscreteScheduler", dict(_SD_SCHEDULER, timestep_spacing="leading", steps_offset=1)),
        extra_model_index=_SDXL_INDEX,
    ),
    "SimianLuo/LCM_Dreamshaper_v7": RepoLayout(
        "LatentConsistencyModelPipeline",
        variants.SD15,
        ("LCMScheduler", dict(_SD_SCHEDULER, original_inference_steps=50, set_alpha_to_one=True)),
        fp16_files=False,
        safety_checker=True,
        time_cond_proj_dim=256,
    ),
}
VAE_REPOS = {variants.SDXL_VAE_FP16_FIX}  # a bare AutoencoderKL at the repo root
TINY_VAE_REPOS = set(variants.TINY_VAE_FOR.values())  # a bare AutoencoderTiny at the repo root
# ControlNet repos by hub id -> architecture. The SD 2.1 ones publish only a pickle
# (diffusion_pytorch_model.bin, fp16): build_controlnet_repo(hub_layout=True) writes that, and by
# default what download_weights.py leaves once it has converted it (safetensors).
CONTROLNET_REPOS = {repo: arch for by_arch in variants.CONTROLNETS.values() for arch, repo in by_arch.items()}
PICKLED_CONTROLNETS = {repo for repo, arch in CONTROLNET_REPOS.items() if arch == variants.SD2}
# The config repo of a ControlNet published as one file, -> that ControlNet's repo (built together).
CONTROLNET_OF_CONFIG = {single.config_repo: repo for repo, single in variants.SINGLE_FILE_CONTROLNETS.items()}
# The base each architecture's acceleration files are made for (LoRAs, replacement UNets).
BASE_FOR = {
    variants.SD15: "stable-diffusion-v1-5/stable-diffusion-v1-5",
    variants.SD2: "stabilityai/sd-turbo",
    variants.SDXL: "stabilityai/stable-diffusion-xl-base-1.0",
}
# The key format each publisher's LoRA files use (diffusers reads them all): kohya
# (lora_unet_<path>.lora_down/lora_up/alpha), peft (unet.<path>.lora_A/lora_B, diffusers' current
# training scripts) and diffusers' older format (unet.<path>.lora.down/lora.up).
KOHYA, PEFT, DIFFUSERS_OLD = "kohya", "peft", "diffusers-old"
LORA_FORMAT = {
    "latent-consistency": KOHYA,
    "ByteDance": KOHYA,
    "h1t": PEFT,
    "tianweiy": DIFFUSERS_OLD,
}


# --- component configs, per size ------------------------------------------------------------


def _unet_config(layout: RepoLayout, size: str) -> dict:
    xl = layout.architecture == variants.SDXL
    config = dict(cross_attention_dim=layout.cross_attention_dim, time_cond_proj_dim=layout.time_cond_proj_dim)
    if size == TINY:
        config.update(
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
        )
        if xl:
            config.update(
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=8 * 6 + 32,
                use_linear_projection=True,
            )
        return config
    if xl:  # the published SDXL UNet
        config.update(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    else:  # SD1.5 (768) and SD2.1 (1024) differ in heads and projections
        config.update(sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280))
        if layout.cross_attention_dim == 1024:
            config.update(attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
        else:
            config.update(attention_head_dim=8)
    return config


def _vae_config(architecture: str, size: str) -> dict:
    scaling = 0.13025 if architecture == variants.SDXL else 0.18215
    blocks = 4  # three downsamples: latents are 1/8 of the image, as in every real SD VAE
    channels = (16,) * blocks if size == TINY else (128, 256, 512, 512)
    return dict(
        block_out_channels=channels,
        layers_per_block=1 if size == TINY else 2,
        latent_channels=4,
        norm_num_groups=8 if size == TINY else 32,
        scaling_factor=scaling,
        sample_size=64 if size == TINY else (1024 if architecture == variants.SDXL else 512),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
    )


def _text_config(hidden: int, size: str, projection_dim: int, vocab_size: int) -> dict:
    # Real encoders: CLIP-L (768, 12 layers), OpenCLIP-H (1024, 23), OpenCLIP-bigG (1280, 32).
    layers = {768: 12, 1024: 23, 1280: 32}[hidden]
    heads = {768: 12, 1024: 16, 1280: 20}[hidden]
    if size == TINY:
        return dict(
            hidden_size=hidden,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            projection_dim=projection_dim,
        )
    return dict(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="quick_gelu" if hidden == 768 else "gelu",
    )


# --- tokenizer ------------------------------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins that byte-level BPE (CLIP's tokenizer) uses for raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins, extra = [], 0
    for byte in range(256):
        if byte in printable:
            stand_ins.append(chr(byte))
        else:
            stand_ins.append(chr(256 + extra))
            extra += 1
    return stand_ins


def write_clip_tokenizer(folder: Path, size: str) -> int:
    """A working CLIP BPE tokenizer in the hub's files: the byte alphabet and a few merges. Sizes
    share it: timing does not depend on the vocabulary (the encoder's embedding table is sized
    separately). Returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_level_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet]
    merges = [f"{a} {b}" for a in string.ascii_lowercase[:6] for b in "aeiou"]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(dict(special, tokenizer_class="CLIPTokenizer", model_max_length=77, do_lower_case=True))
    )
    return len(tokens)


# --- repos ----------------------------------------------------------------------------------


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def _text_encoders(layout: RepoLayout, folder: Path, size: str) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    components = {}
    if layout.architecture == variants.SDXL:
        encoders = [
            ("", 768, CLIPTextModel, 768),
            ("_2", 1280, CLIPTextModelWithProjection, 32 if size == TINY else 1280),
        ]
    else:
        encoders = [("", layout.cross_attention_dim, CLIPTextModel, 512)]
    for suffix, hidden, model_class, projection in encoders:
        vocab_size = write_clip_tokenizer(folder / f"tokenizer{suffix}", size)
        components[f"tokenizer{suffix}"] = CLIPTokenizer.from_pretrained(folder / f"tokenizer{suffix}")
        # CLIP pools the text at the end-of-text token: its id must be the tokenizer's.
        config = CLIPTextConfig(
            **_text_config(hidden, size, projection, vocab_size),
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
        components[f"text_encoder{suffix}"] = model_class(config).eval()
    return components


def _safety_components(size: str) -> dict:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    vision = (
        dict(tiny, image_size=32, patch_size=8)
        if size == TINY
        else dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
        )
    )
    config = CLIPConfig(
        # The checker reads only images; its text tower's special tokens must still be in its vocabulary.
        text_config=dict(tiny, vocab_size=99, bos_token_id=97, eos_token_id=98, pad_token_id=1),
        vision_config=vision,
        projection_dim=32 if size == TINY else 768,
    )
    processor = CLIPImageProcessor(crop_size=vision["image_size"], size=vision["image_size"])
    return {"safety_checker": StableDiffusionSafetyChecker(config).eval(), "feature_extractor": processor}


FLAG_NOTHING, FLAG_EVERYTHING = "nothing", "everything"
SAFE, UNSAFE = "safe", "unsafe"


def build_safety_checker(
    folder: Path, size: str = TINY, flags: str = FLAG_NOTHING, seed: int = 0, fp16_only: bool = False
) -> Path:
    """safety_checker/ and feature_extractor/ as the SD1.5 repo holds them (fp32 and fp16 weights).

    The checker flags an image when the cosine of its embedding with a concept's, less that
    concept's threshold, is above 0: thresholds of 1 (the initial ones) flag nothing, thresholds
    of -2 flag everything."""
    _seeded(seed)
    components = _safety_components(size)
    checker = components["safety_checker"]
    if flags == FLAG_EVERYTHING:
        with torch.no_grad():
            checker.concept_embeds_weights.fill_(-2.0)
            checker.special_care_embeds_weights.fill_(-2.0)
    if not fp16_only:
        checker.save_pretrained(folder / "safety_checker", safe_serialization=True)
    checker.to(torch.float16).save_pretrained(folder / "safety_checker", safe_serialization=True, variant="fp16")
    components["feature_extractor"].save_pretrained(folder / "feature_extractor")
    return folder


def build_nsfw_classifier(folder: Path, size: str = TINY, verdict: str = SAFE, seed: int = 0) -> Path:
    """Falconsai/nsfw_image_detection's layout: a ViT image classifier (labels normal, nsfw) with its
    preprocessor_config.json. Its head is set to call every image safe or unsafe."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    _seeded(seed)
    shape = (
        dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
        if size == TINY
        else dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    )
    config = ViTConfig(**shape, id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([10.0, -10.0] if verdict == SAFE else [-10.0, 10.0]))
    model.save_pretrained(folder, safe_serialization=True)
    side = config.image_size
    ViTImageProcessor(size={"height": side, "width": side}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )
    return folder


def build_model_repo(hub_id: str, folder: Path, size: str = TINY, seed: int = 0, fp16_only: bool = False) -> Path:
    import diffusers

    layout = REPOS[hub_id]
    _seeded(seed)
    staging = folder / ".staging-tokenizers"
    components = _text_encoders(layout, staging, size)
    components["unet"] = diffusers.UNet2DConditionModel(**_unet_config(layout, size)).eval()
    components["vae"] = diffusers.AutoencoderKL(**_vae_config(layout.architecture, size)).eval()
    scheduler_class, scheduler_config = layout.scheduler
    with torch.device("cpu"):  # schedulers build numpy arrays, whatever device the weights are made on
        components["scheduler"] = getattr(diffusers, scheduler_class)(**scheduler_config)
    if layout.architecture != variants.SDXL:
        if layout.safety_checker:
            components.update(_safety_components(size))
        else:
            components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if layout.pipeline != "StableDiffusionXLPipeline":
        components["image_encoder"] = None
    pipeline = getattr(diffusers, layout.pipeline)(**components)
    if layout.extra_model_index:
        pipeline.register_to_config(**layout.extra_model_index)
    if not (fp16_only and layout.fp16_files):
        pipeline.save_pretrained(folder, safe_serialization=True)
    if layout.fp16_files:
        pipeline.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
    # The hub repos carry the slow-tokenizer files (vocab.json, merges.txt), not tokenizer.json.
    for tokenizer in folder.glob("tokenizer*"):
        _remove_tree(tokenizer)
        write_clip_tokenizer(tokenizer, size)
    _remove_tree(staging)
    return folder


def build_vae_repo(hub_id: str, folder: Path, size: str = TINY, seed: int = 0) -> Path:
    import diffusers

    _seeded(seed)
    vae = diffusers.AutoencoderKL(**dict(_vae_config(variants.SDXL, size), force_upcast=False))
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def build_tiny_vae_repo(hub_id: str, folder: Path, size: str = TINY, seed: int = 0) -> Path:
    import diffusers

    _seeded(seed)
    config = (
        {}
        if size == FULL
        else dict(
            encoder_block_out_channels=(8,) * 4,
            decoder_block_out_channels=(8,) * 4,
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
        )
    )
    diffusers.AutoencoderTiny(**config).save_pretrained(folder, safe_serialization=True)
    return folder


LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "conv",
)


def _lora_modules(unet, targets: tuple[str, ...]):
    for name, module in unet.named_modules():
        if name.endswith(targets) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            yield name, module


def _lora_factors(module, rank: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(module, torch.nn.Linear):
        down_shape, up_shape = (rank, module.in_features), (module.out_features, rank)
    else:
        down_shape = (rank, module.in_channels, *module.kernel_size)
        up_shape = (module.out_channels, rank, 1, 1)
    return torch.randn(down_shape, generator=generator) * 0.1, torch.randn(up_shape, generator=generator) * 0.1


_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


# kohya's default network (LierLa): no 3x3 convolutions; what most published style LoRAs train.
LINEAR_LORA_TARGETS = tuple(name for name in LORA_TARGETS if name not in ("conv1", "conv2", "conv_shortcut", "conv"))


def lora_state_dict(
    unet, rank: int, key_format: str = KOHYA, seed: int = 0, targets: tuple[str, ...] = LORA_TARGETS
) -> dict[str, torch.Tensor]:
    """Random LoRA factors for a UNet, keyed the way a publisher's files are (key_format).

    kohya (the LCM-LoRA, Lightning and Hyper-SD files) covers attention, feed-forward and ResNet
    layers (targets=LINEAR_LORA_TARGETS leaves the convolutions out), with an alpha per layer; the
    diffusers-trained files (TCD: peft keys; DMD2: the older diffusers keys) cover the attention
    projections.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    if key_format == KOHYA:
        for name, module in _lora_modules(unet, targets):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = _lora_factors(module, rank, generator)
            state[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    else:
        down, up = ("lora_A", "lora_B") if key_format == PEFT else ("lora.down", "lora.up")
        for name, module in _lora_modules(unet, _ATTENTION_TARGETS):
            state[f"unet.{name}.{down}.weight"], state[f"unet.{name}.{up}.weight"] = _lora_factors(
                module, rank, generator
            )
    return {k: v.to(torch.float16) for k, v in state.items()}


def _shapes_only_unet(architecture: str, size: str):
    import diffusers

    with torch.device("meta"):  # only the layer shapes are needed: no memory, no initialisation
        return diffusers.UNet2DConditionModel(**_unet_config(REPOS[BASE_FOR[architecture]], size))


def _architecture_of(file: variants.HubFile) -> str:
    """The architecture a catalogue file is made for, from the recipes that use it."""
    for variant in variants.VARIANTS.values():
        if file == variant.recipe.unet or file in (lora.file for lora in variant.recipe.loras):
            return variant.architecture
    for by_architecture in variants.ACCELERATIONS.values():
        for architecture, recipe in by_architecture.items():
            if file == recipe.unet or file in (lora.file for lora in recipe.loras):
                return architecture
    raise KeyError(f"{file} is not in the catalogue")


def build_lora_file(file: variants.HubFile, root: Path, size: str = TINY, seed: int = 0) -> Path:
    """lora/<repo>/<filename>: a LoRA for the base of its architecture, in its publisher's key format."""
    from safetensors.torch import save_file

    unet = _shapes_only_unet(_architecture_of(file), size)
    path = root / "lora" / file.repo / file.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    key_format = LORA_FORMAT[file.repo.split("/")[0]]
    save_file(lora_state_dict(unet, rank=4 if size == TINY else 64, key_format=key_format, seed=seed), path)
    return path


def build_unet_file(file: variants.HubFile, root: Path, size: str = TINY, seed: int = 0) -> Path:
    """weights/<repo>/<filename>: a whole UNet in diffusers' keys, fp16, without a config of its own
    (it takes the base's unet/config.json), as SDXL-Lightning publishes its UNets."""
    import diffusers
    from safetensors.torch import save_file

    _seeded(seed + 1)
    unet = diffusers.UNet2DConditionModel(**_unet_config(REPOS[BASE_FOR[_architecture_of(file)]], size))
    path = root / "weights" / file.repo / file.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.to(torch.float16).contiguous() for name, tensor in unet.state_dict().items()}, path)
    return path


def build(hub_id: str, root: Path, size: str = TINY, seed: int = 0, fp16_only: bool = False) -> Path:
    """Write the repo hub_id (a pipeline, a VAE, a tiny VAE) under root/weights/<hub id>.

    fp16_only writes what download_weights.py fetches (the fp16 files where the repo has them),
    half the bytes of the full repo: quicker to build on a machine rented by the minute.
    """
    if hub_id in transformer_models.PIPELINE_REPOS or hub_id in transformer_models.TINY_VAE_REPOS:
        return transformer_models.build(hub_id, root, size, seed)
    if hub_id in VAE_REPOS:
        return build_vae_repo(hub_id, root / "weights" / hub_id, size, seed)
    if hub_id in TINY_VAE_REPOS:
        return build_tiny_vae_repo(hub_id, root / "weights" / hub_id, size, seed)
    return build_model_repo(hub_id, root / "weights" / hub_id, size, seed, fp16_only)


def build_controlnet_repo(hub_id: str, root: Path, size: str = TINY, seed: int = 0, hub_layout: bool = False) -> Path:
    """weights/<hub id>/: a ControlNet for the base of its architecture (from that base's UNet
    config), config.json with full-precision and fp16 safetensors, or as its repo publishes it."""
    import diffusers

    if CONTROLNET_REPOS[hub_id] == variants.FLUX1:
        from .transformer_models import build_flux_controlnet_repo

        return build_flux_controlnet_repo(root / "weights" / hub_id, size, seed)
    if CONTROLNET_REPOS[hub_id] == variants.ZIMAGE:
        from .transformer_models import build_zimage_controlnet

        return build_zimage_controlnet(root, size, seed)
    _seeded(seed + 2)
    base = diffusers.UNet2DConditionModel(**_unet_config(REPOS[BASE_FOR[CONTROLNET_REPOS[hub_id]]], size))
    controlnet = diffusers.ControlNetModel.from_unet(
        base, conditioning_embedding_out_channels=(8, 8, 8, 16) if size == TINY else (16, 32, 96, 256)
    )
    # A trained ControlNet's zero convolutions are no longer zero; random ones would leave the
    # picture as it is, and no test could tell a ControlNet that is used from one that is not.
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                parameter.normal_(0.0, 0.05)
    folder = root / "weights" / hub_id
    if hub_id in PICKLED_CONTROLNETS:
        # fp16 in one file: a pickle as the hub has it, or the safetensors download_weights.py makes of it.
        controlnet.to(torch.float16).save_pretrained(folder, safe_serialization=not hub_layout)
        return folder
    controlnet.save_pretrained(folder, safe_serialization=True)
    controlnet.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
    return folder


def build_source(source: Source, root: Path, size: str = TINY, fp16_only: bool = False) -> Path:
    """What a Source (fastsd.weights.layout) loads, in its place under root."""
    if source.role == disk.LORA:
        return build_lora_file(variants.HubFile(source.repo, source.filename), root, size)
    if source.role == disk.UNET:
        return build_unet_file(variants.HubFile(source.repo, source.filename), root, size)
    if source.role == disk.CONTROLNET:
        return build_controlnet_repo(CONTROLNET_OF_CONFIG.get(source.repo, source.repo), root, size)
    if source.role == disk.SAFETY_CHECKER:
        return build_safety_checker(root / source.relative_folder, size, fp16_only=fp16_only)
    if source.role == disk.NSFW_CLASSIFIER:
        return build_nsfw_classifier(root / source.relative_folder, size)
    return build(source.repo, root, size, fp16_only=fp16_only)


def build_variant(
    variant: variants.Variant, root: Path, size: str = TINY, tiny_vae: bool = True, fp16_only: bool = False
) -> None:
    """Every source of the variant that is not there yet (the same repo serves many variants)."""
    for source in disk.sources(variant, tiny_vae):
        if not source.is_local and not (root / source.relative_folder / source.marker_name).exists():
            build_source(source, root, size, fp16_only)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def quiet() -> None:
    """Random weights in tiny configs: the libraries' advice about them is noise on a newcomer's screen."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    quiet_library_noise()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", nargs="+", help="variant names (see fastsd.variants)")
    parser.add_argument("--size", choices=(TINY, FULL), default=TINY)
    parser.add_argument("--root", type=Path, help="default: FASTSD_WEIGHTS_ROOT, else the project folder")
    parser.add_argument("--fp16-only", action="store_true", help="only the fp16 files, as download_weights.py fetches")
    args = parser.parse_args()
    quiet()
    from fastsd.settings import Settings

    args.root = args.root or Settings.from_environment().weights_root
    for name in args.variant:
        variant = variants.get_variant(name)
        build_variant(variant, args.root, args.size, fp16_only=args.fp16_only)
        write_manifests(variant, args.root)
        print(f"built {name} ({args.size}) under {args.root}")


def write_manifests(variant: variants.Variant, root: Path) -> None:
    """A manifest in each folder the variant loads, as download_weights.py leaves one: the server's
    boot check then verifies the files (and has nothing to warn about)."""
    from fastsd.weights import manifest

    origin = "fastsd_testing.random_models"
    for source in disk.sources(variant):
        folder = root / source.relative_folder
        if source.is_local or not folder.is_dir():
            continue
        existing = manifest.load(folder)
        if existing is None or existing.get("origin") == origin:  # never over a download's manifest
            manifest.write(folder, manifest.describe_local(folder), origin=origin)


if __name__ == "__main__":
    main()
