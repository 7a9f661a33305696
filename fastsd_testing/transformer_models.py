"""Random-weight FLUX.2 [klein], Z-Image and FLUX.1 repos in the hub's layouts (tiny or full size).

Each repo is written as its hub repo lays it out: model_index.json, one folder per component,
the text encoders and transformers in as many safetensors shards as the hub's (with their index
files), the tokenizers built offline from a byte-level alphabet (Qwen3's with its special tokens
and the Qwen3 chat template the real tokenizer_config.json carries; T5's as a Unigram
tokenizer.json: the hub repo also holds spiece.model, which T5's fast tokenizer does not read and
which cannot be made here without sentencepiece). Configs are the real repos' with the sizes
shrunk for TINY (layers, widths; the structural numbers stay: FLUX.2's 32 latent channels and 2x2
patches, the Qwen3 layers 9, 18 and 27 klein reads, FLUX.1's 16 channels and the latent shift and
scale). The tiny autoencoders (TAEF1, fal's FLUX.2 one) are bare models at their repo's root.

FULL builds the published architectures (klein 4B, Z-Image 6B, FLUX.1 12B with their encoders)
in bfloat16, for the GPU benchmark; in this 24 GiB machine's fp32 none of them fits.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

from fastsd import variants

TINY, FULL = "tiny", "full"
KLEIN_REPO, ZIMAGE_REPO, SCHNELL_REPO = (
    "black-forest-labs/FLUX.2-klein-4B",
    "Tongyi-MAI/Z-Image-Turbo",
    "black-forest-labs/FLUX.1-schnell",
)
TAEF1_REPO, FLUX2_TINY_REPO = variants.TINY_VAE_FOR[variants.FLUX1], variants.TINY_VAE_FOR[variants.FLUX2_KLEIN]
PIPELINE_REPOS = (KLEIN_REPO, ZIMAGE_REPO, SCHNELL_REPO)
TINY_VAE_REPOS = (TAEF1_REPO, FLUX2_TINY_REPO)
CHAT_TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Shards of each component as the hub repos publish them.
SHARDS = {
    KLEIN_REPO: {"text_encoder": 2},
    ZIMAGE_REPO: {"text_encoder": 3, "transformer": 2},
    SCHNELL_REPO: {"text_encoder_2": 2, "transformer": 3},
}
# model_index.json entries as the hub repos have them (diffusers 0.42 writes the slow names, and
# FluxPipeline's optional IP-adapter components, which the 2024 repo predates).
MODEL_INDEX = {
    KLEIN_REPO: {"tokenizer": ["transformers", "Qwen2TokenizerFast"]},
    SCHNELL_REPO: {"tokenizer_2": ["transformers", "T5TokenizerFast"], "feature_extractor": None,
                   "image_encoder": None},
}  # fmt: skip
FLOW_SCHEDULERS = {
    KLEIN_REPO: dict(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential"),
    ZIMAGE_REPO: dict(shift=3.0, use_dynamic_shifting=False),
    SCHNELL_REPO: dict(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096),
}  # fmt: skip


# --- tokenizers -----------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2's, Qwen's)."""
    from .random_models import _byte_level_alphabet

    return _byte_level_alphabet()


def write_qwen_tokenizer(folder: Path) -> int:
    """Qwen3's tokenizer files (tokenizer.json, tokenizer_config.json with the chat template,
    vocab.json, merges.txt): byte-level BPE over the byte alphabet and a few merges. Returns the
    vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    merges = [(a, b) for a in string.ascii_lowercase[:8] for b in "aeiou"]
    vocab = {token: index for index, token in enumerate(alphabet + [a + b for a, b in merges])}
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    model.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=model, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        model_max_length=131072, chat_template=CHAT_TEMPLATE,
    )  # fmt: skip
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL[1:]})
    tokenizer.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("chat_template", CHAT_TEMPLATE)  # where the hub's Qwen3 repos keep it
    config_path.write_text(json.dumps(config, indent=2))
    return len(tokenizer)


def write_t5_tokenizer(folder: Path) -> int:
    """T5's fast tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json): a
    Unigram model over single characters, "</s>" appended as T5 does. Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{c}", -3.0) for c in string.ascii_lowercase] + [(c, -4.0) for c in string.printable.strip()]
    model = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    model.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])  # fmt: skip
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=512)  # fmt: skip
    tokenizer.save_pretrained(folder)
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return len(tokenizer)


# --- component configs ----------------------------------------------------------------------


def _qwen3_config(size: str, vocab_size: int, layers: int):
    from transformers import Qwen3Config

    if size == FULL:  # Qwen3-4B
        return Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                           rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)  # fmt: skip
    return Qwen3Config(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=40960,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)  # fmt: skip


def _flux_vae(size: str, **extra):
    """FLUX.1's autoencoder (Z-Image's too): 16 latent channels, no quant convs, shift and scale."""
    from diffusers import AutoencoderKL

    channels = (128, 256, 512, 512) if size == FULL else (16,) * 4
    return AutoencoderKL(
        block_out_channels=channels, layers_per_block=2 if size == FULL else 1, latent_channels=16,
        norm_num_groups=32 if size == FULL else 8, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024, force_upcast=True, **extra,
    )  # fmt: skip


def _flow_scheduler(repo: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    with torch.device("cpu"):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **FLOW_SCHEDULERS[repo])


def _klein(folder: Path, size: str) -> dict:
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM

    vocab = write_qwen_tokenizer(folder / "tokenizer")
    encoder = Qwen3ForCausalLM(_qwen3_config(size, vocab, 28))  # klein reads layers 9, 18 and 27
    hidden = encoder.config.hidden_size
    transformer = (
        Flux2Transformer2DModel(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                                num_attention_heads=24, joint_attention_dim=3 * hidden, mlp_ratio=3.0,
                                axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)
        if size == FULL
        else Flux2Transformer2DModel(in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                     num_attention_heads=2, joint_attention_dim=3 * hidden, mlp_ratio=3.0,
                                     axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=False)
    )  # fmt: skip
    vae = AutoencoderKLFlux2(
        block_out_channels=(128, 256, 512, 512) if size == FULL else (16,) * 4,
        layers_per_block=2 if size == FULL else 1, norm_num_groups=32 if size == FULL else 8, latent_channels=32,
    )  # fmt: skip
    with torch.no_grad():  # a trained batch norm's statistics: the tests see them used or not
        vae.bn.running_mean.normal_(0.0, 0.3)
        vae.bn.running_var.uniform_(0.5, 2.0)
    pipeline = Flux2KleinPipeline(
        scheduler=_flow_scheduler(KLEIN_REPO), vae=vae, text_encoder=encoder,
        tokenizer=Qwen2TokenizerFast.from_pretrained(folder / "tokenizer"), transformer=transformer, is_distilled=True,
    )  # fmt: skip
    return {"pipeline": pipeline}


def _zimage(folder: Path, size: str) -> dict:
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2TokenizerFast, Qwen3Model

    vocab = write_qwen_tokenizer(folder / "tokenizer")
    encoder = Qwen3Model(_qwen3_config(size, vocab, 2))
    transformer = (
        ZImageTransformer2DModel(cap_feat_dim=encoder.config.hidden_size)
        if size == FULL
        else ZImageTransformer2DModel(dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                      cap_feat_dim=encoder.config.hidden_size, axes_dims=[8, 4, 4])
    )  # fmt: skip
    pipeline = ZImagePipeline(
        scheduler=_flow_scheduler(ZIMAGE_REPO), vae=_flux_vae(size), text_encoder=encoder,
        tokenizer=Qwen2TokenizerFast.from_pretrained(folder / "tokenizer"), transformer=transformer,
    )  # fmt: skip
    return {"pipeline": pipeline}


def _schnell(folder: Path, size: str) -> dict:
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    from .random_models import write_clip_tokenizer

    clip_vocab = write_clip_tokenizer(folder / "tokenizer", TINY)
    t5_vocab = write_t5_tokenizer(folder / "tokenizer_2")
    if size == FULL:  # CLIP-L, T5-XXL (its vocabulary), the 12B transformer
        clip = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              vocab_size=49408, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
        t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
        transformer = FluxTransformer2DModel(joint_attention_dim=4096, pooled_projection_dim=768)
    else:
        clip = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                              vocab_size=clip_vocab, projection_dim=32)  # fmt: skip
        t5 = T5Config(vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
        transformer = FluxTransformer2DModel(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                             axes_dims_rope=(4, 6, 6))  # fmt: skip
    clip.bos_token_id, clip.eos_token_id, clip.pad_token_id = clip_vocab - 2, clip_vocab - 1, clip_vocab - 1
    pipeline = FluxPipeline(
        scheduler=_flow_scheduler(SCHNELL_REPO), vae=_flux_vae(size), text_encoder=CLIPTextModel(clip),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=T5TokenizerFast.from_pretrained(folder / "tokenizer_2"), transformer=transformer,
    )  # fmt: skip
    return {"pipeline": pipeline}


_BUILDERS = {KLEIN_REPO: _klein, ZIMAGE_REPO: _zimage, SCHNELL_REPO: _schnell}


def build_pipeline_repo(hub_id: str, folder: Path, size: str = TINY, seed: int = 0) -> Path:
    """weights/<hub id>/ for one of PIPELINE_REPOS, in its layout (module docstring)."""
    import shutil

    torch.manual_seed(seed)
    staging = folder.with_name(folder.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    default_dtype = torch.get_default_dtype()
    if size == FULL:  # made in bf16, as published: half the memory of fp32 (FLUX.1's 17B: 34 GB)
        torch.set_default_dtype(torch.bfloat16)
    try:
        pipeline = _BUILDERS[hub_id](staging, size)["pipeline"]
    finally:
        torch.set_default_dtype(default_dtype)
    pipeline.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    for key, value in MODEL_INDEX.get(hub_id, {}).items():
        if value is None:
            index.pop(key, None)
        else:
            index[key] = value
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    for component, shards in SHARDS[hub_id].items():
        _save_sharded(getattr(pipeline, component), folder / component, shards)
    # The tokenizers as written above (the hub's files), not as save_pretrained rewrites them.
    for tokenizer in staging.iterdir():
        shutil.rmtree(folder / tokenizer.name, ignore_errors=True)
        shutil.copytree(tokenizer, folder / tokenizer.name)
    shutil.rmtree(staging, ignore_errors=True)
    if hub_id == SCHNELL_REPO:  # the original single-file checkpoints beside the diffusers folders
        for name in ("flux1-schnell.safetensors", "ae.safetensors"):
            _placeholder_checkpoint(folder / name)
    return folder


def _save_sharded(module, folder: Path, shards: int) -> None:
    """Save a component again in as many shards as the hub's (its weights files replaced)."""
    for old in [*folder.glob("*.safetensors"), *folder.glob("*.index.json")]:
        old.unlink()
    module.save_pretrained(folder, safe_serialization=True, max_shard_size=_shard_size(module.state_dict(), shards))


def _shard_size(state: dict, shards: int) -> int:
    """The smallest shard size (bytes) that splits state into exactly `shards` files, as the
    libraries split (huggingface_hub's split, in order, a file closed before it would overflow)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    def count(size: int) -> int:
        return len(split_torch_state_dict_into_shards(state, max_shard_size=size).filename_to_tensors)

    low, high = 1, sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    while low < high:  # the count falls as the size grows: the smallest size giving at most `shards`
        middle = (low + high) // 2
        low, high = (middle + 1, high) if count(middle) > shards else (low, middle)
    if count(low) != shards:
        raise ValueError(f"no shard size splits these weights into exactly {shards} files")
    return low


def _placeholder_checkpoint(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"placeholder": torch.zeros(1)}, path)


def build_tiny_vae_repo(hub_id: str, folder: Path, size: str = TINY, seed: int = 0) -> Path:
    """TAEF1 (a diffusers AutoencoderTiny with 16 latent channels) or fal's FLUX.2 tiny autoencoder
    (its config.json and diffusion_pytorch_model.safetensors), at the repo's root."""
    torch.manual_seed(seed)
    small = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                 num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)  # fmt: skip
    if hub_id == FLUX2_TINY_REPO:
        from fastsd.families.flux2_tiny_vae import Flux2TinyAutoencoder

        model = Flux2TinyAutoencoder(**({} if size == FULL else small))
        model.save_pretrained(folder, safe_serialization=True)
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        # As fal publishes it: its class name (run there by trust_remote_code), no klein-facing keys.
        config.update(_class_name="Flux2TinyAutoEncoder")
        for key in ("block_out_channels", "batch_norm_eps"):
            config.pop(key, None)
        config_path.write_text(json.dumps(config, indent=2))
        return folder
    from diffusers import AutoencoderTiny

    taef1 = AutoencoderTiny(latent_channels=16, **({} if size == FULL else small))
    taef1.save_pretrained(folder, safe_serialization=True)
    return folder


def build_flux_controlnet_repo(folder: Path, size: str = TINY, seed: int = 0) -> Path:
    """The FLUX.1 union ControlNet (config.json and one safetensors at the root, as published): six
    double-stream blocks, guidance embedded ([dev]'s), no mode embedding; tiny, it fits the tiny
    [schnell]'s transformer."""
    from diffusers import FluxControlNetModel

    torch.manual_seed(seed + 2)
    if size == FULL:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            controlnet = FluxControlNetModel(num_layers=6, num_single_layers=0, joint_attention_dim=4096,
                                             pooled_projection_dim=768, guidance_embeds=True)  # fmt: skip
        controlnet = controlnet.to(torch.bfloat16)
    else:
        controlnet = FluxControlNetModel(in_channels=64, num_layers=1, num_single_layers=0, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                         axes_dims_rope=(4, 6, 6), guidance_embeds=True)  # fmt: skip
    # Trained, its zero-initialised projections are no longer zero: random ones would leave the
    # picture as it is, and no test could tell a ControlNet that is used from one that is not.
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                parameter.normal_(0.0, 0.05)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


def build_zimage_controlnet(root: Path, size: str = TINY, seed: int = 0) -> Path:
    """VideoX-Fun's Z-Image union ControlNet as published: one checkpoint (diffusers' keys are its
    own for 2.x) in its repo, and the config diffusers' single-file loader reads from another."""
    from diffusers import ZImageControlNetModel
    from safetensors.torch import save_file

    from fastsd.variants import SINGLE_FILE_CONTROLNETS, ZIMAGE_UNION_CONTROLNET

    single = SINGLE_FILE_CONTROLNETS[ZIMAGE_UNION_CONTROLNET]
    torch.manual_seed(seed + 2)
    shape = (dict(control_layers_places=list(range(0, 30, 2)), control_refiner_layers_places=[0, 1])
             if size == FULL else
             dict(control_layers_places=[0], control_refiner_layers_places=[0], dim=32, n_refiner_layers=1,
                  n_heads=2, n_kv_heads=2))  # fmt: skip
    with torch.device("cuda" if size == FULL and torch.cuda.is_available() else "cpu"):
        controlnet = ZImageControlNetModel(control_in_dim=33, add_control_noise_refiner="control_noise_refiner",
                                           **shape)  # fmt: skip
    # Trained, its zero-initialised projections are no longer zero (as build_flux_controlnet_repo).
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.endswith(("before_proj.weight", "after_proj.weight")):
                parameter.normal_(0.0, 0.05)
    if size == FULL:
        controlnet = controlnet.to(torch.bfloat16)
    folder = root / "weights" / ZIMAGE_UNION_CONTROLNET
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in controlnet.state_dict().items()}, folder / single.filename)
    controlnet.save_config(root / "weights" / single.config_repo)
    return folder


def full_parameters(hub_id: str) -> int:
    """The published model's parameter count (every component), from its configs on the meta
    device: nothing allocated."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch, torch.device("meta"):
        pipeline = _BUILDERS[hub_id](Path(scratch), FULL)["pipeline"]
    return sum(
        parameter.numel() for module in pipeline.components.values() if isinstance(module, torch.nn.Module)
        for parameter in module.parameters()
    )  # fmt: skip


def build(hub_id: str, root: Path, size: str = TINY, seed: int = 0) -> Path:
    folder = root / "weights" / hub_id
    if hub_id in TINY_VAE_REPOS:
        return build_tiny_vae_repo(hub_id, folder, size, seed)
    return build_pipeline_repo(hub_id, folder, size, seed)
