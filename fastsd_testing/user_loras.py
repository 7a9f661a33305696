"""Users' LoRA files as people publish them, for a model folder's shapes, and a loopback server for them.

- kohya files (Civitai's usual format): lora_unet_* and, optionally, text-encoder layers
  (lora_te_* for SD1.5/2.x, lora_te1_*/lora_te2_* for SDXL) with the transformers 4 module names
  (text_model_encoder_...) that every published file carries;
- diffusers/peft files (unet.<path>.lora_A/lora_B), as diffusers' training scripts save them;
- a Replicate SDXL LoRA training's .tar: lora.safetensors under attention-processor names,
  embeddings.pti for two new tokens, and special_params.json mapping TOK to them;
- for the transformers (FLUX.1, FLUX.2 [klein], Z-Image): diffusers/peft files
  (transformer.<path>.lora_A/lora_B, as ai-toolkit and diffusers' scripts save them), FLUX.1's
  kohya files (lora_unet_double_blocks_<i>_img_attn_qkv..., BFL's layer names, Civitai's usual
  FLUX format), and the .tar Replicate's FLUX LoRA trainer outputs (the trigger word is text the
  LoRA learned: nothing to map).

The shapes come from the configs in a model folder (weights/<hub id>), on the meta device, so the
same code makes a tiny test LoRA and a full-size one for the benchmark.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
from pathlib import Path

import torch

from . import random_models
from .loopback import LoopbackServer, reply
from .random_models import KOHYA, PEFT, lora_state_dict

_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _meta_modules(model_folder: Path) -> dict:
    """The UNet and text encoders of a model folder, shapes only."""
    import diffusers
    import transformers

    modules = {}
    with torch.device("meta"):
        unet_config = diffusers.UNet2DConditionModel.load_config(model_folder / "unet")
        modules["unet"] = diffusers.UNet2DConditionModel.from_config(unet_config)
        for name in ("text_encoder", "text_encoder_2"):
            if (model_folder / name / "config.json").is_file():
                config = transformers.CLIPTextConfig.from_pretrained(model_folder / name)
                modules[name] = transformers.CLIPTextModel(config)
    return modules


def _text_encoder_state(encoder, prefix: str, rank: int, generator) -> dict[str, torch.Tensor]:
    state = {}
    for name, module in encoder.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(_TEXT_TARGETS):
            # Published files name layers as transformers 4 did: text_model.encoder.layers...
            path = name if name.startswith("text_model.") else f"text_model.{name}"
            key = f"{prefix}_{path.replace('.', '_')}"
            state[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.2
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.2
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    return state


def write_user_lora(
    model_folder: Path,
    path: Path,
    rank: int = 4,
    key_format: str = KOHYA,
    text_encoder: bool = False,
    seed: int = 1,
    convolutions: bool = True,
) -> Path:
    """A style LoRA for the model in model_folder, in a publisher's format; fp16, as published.
    convolutions=False: a kohya LoRA without the ResNet convolutions (kohya's default network)."""
    from safetensors.torch import save_file

    modules = _meta_modules(model_folder)
    targets = random_models.LORA_TARGETS if convolutions else random_models.LINEAR_LORA_TARGETS
    state = lora_state_dict(modules["unet"], rank, key_format=key_format, seed=seed, targets=targets)
    state = {key: value * 3 for key, value in state.items() if not key.endswith(".alpha")} | {
        key: value for key, value in state.items() if key.endswith(".alpha")
    }  # strong enough to change a tiny model's image visibly
    if text_encoder:
        generator = torch.Generator().manual_seed(seed + 100)
        encoders = [name for name in ("text_encoder", "text_encoder_2") if name in modules]
        for index, name in enumerate(encoders):
            prefix = "lora_te" if len(encoders) == 1 else f"lora_te{index + 1}"
            state |= _text_encoder_state(modules[name], prefix, rank, generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.to(torch.float16).contiguous() for key, value in state.items()}, path)
    return path


def replicate_training_tar(model_folder: Path, seed: int = 2) -> bytes:
    """A Replicate SDXL LoRA training output: lora.safetensors (attention-processor names),
    embeddings.pti (two new tokens per text encoder) and special_params.json ({"TOK": "<s0><s1>"})."""
    from safetensors.torch import save

    modules = _meta_modules(model_folder)
    unet, generator = modules["unet"], torch.Generator().manual_seed(seed)
    lora = {}
    for name, module in unet.named_modules():
        if name.endswith((".attn1", ".attn2")):
            projections = (("to_q", module.to_q), ("to_k", module.to_k), ("to_v", module.to_v))
            for short, linear in (*projections, ("to_out", module.to_out[0])):
                key = f"{name}.processor.{short}_lora"
                lora[f"{key}.down.weight"] = torch.randn(4, linear.in_features, generator=generator) * 0.3
                lora[f"{key}.up.weight"] = torch.randn(linear.out_features, 4, generator=generator) * 0.3
    embeddings = {
        f"text_encoders_{index}": torch.randn(2, modules[name].config.hidden_size, generator=generator)
        for index, name in enumerate(("text_encoder", "text_encoder_2"))
    }
    files = {
        "lora.safetensors": save({k: v.to(torch.float16) for k, v in lora.items()}),
        "embeddings.pti": save(embeddings),
        "special_params.json": json.dumps({"TOK": "<s0><s1>"}).encode(),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


# What the transformers' LoRAs train: the attention projections and the feed-forward layers.
_TRANSFORMER_TARGETS = ("attn", "attention", "ff", "feed_forward")


def meta_transformer(model_folder: Path):
    """A model folder's transformer, shapes only."""
    import diffusers

    config = json.loads((model_folder / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        return getattr(diffusers, config["_class_name"]).from_config(config)


def transformer_lora(model_folder: Path, key_format: str = PEFT, rank: int = 4, seed: int = 1) -> dict:
    """A style LoRA's tensors for the transformer in model_folder: PEFT (diffusers' names) for any
    of them, KOHYA (BFL's names, FLUX.1's double blocks) for FLUX.1."""
    transformer = meta_transformer(model_folder)
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def factors(key: str, inputs: int, outputs: int, down: str, up: str) -> None:
        state[f"{key}.{down}.weight"] = torch.randn(rank, inputs, generator=generator) * 0.5
        state[f"{key}.{up}.weight"] = torch.randn(outputs, rank, generator=generator) * 0.5

    if key_format == KOHYA:
        hidden = transformer.inner_dim
        layers = {"attn_qkv": (hidden, 3 * hidden), "attn_proj": (hidden, hidden), "mlp_0": (hidden, 4 * hidden),
                  "mlp_2": (4 * hidden, hidden)}  # fmt: skip
        for index in range(len(transformer.transformer_blocks)):
            for stream in ("img", "txt"):
                for layer, (inputs, outputs) in layers.items():
                    key = f"lora_unet_double_blocks_{index}_{stream}_{layer}"
                    factors(key, inputs, outputs, "lora_down", "lora_up")
                    state[f"{key}.alpha"] = torch.tensor(float(rank))
        return state
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(part in name for part in _TRANSFORMER_TARGETS):
            factors(f"transformer.{name}", module.in_features, module.out_features, "lora_A", "lora_B")
    return state


def write_transformer_lora(
    model_folder: Path, path: Path, key_format: str = PEFT, rank: int = 4, seed: int = 1
) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = transformer_lora(model_folder, key_format, rank, seed=seed)
    save_file({key: value.to(torch.bfloat16).contiguous() for key, value in tensors.items()}, path)
    return path


def flux_training_tar(model_folder: Path, seed: int = 3) -> bytes:
    """What Replicate's FLUX LoRA trainer outputs: output/flux_train_replicate/lora.safetensors
    (diffusers' names) beside the run's config.yaml."""
    from safetensors.torch import save

    lora = {key: value.to(torch.bfloat16) for key, value in transformer_lora(model_folder, seed=seed).items()}
    files = {
        "output/flux_train_replicate/lora.safetensors": save(lora),
        "output/flux_train_replicate/config.yaml": b"config:\n  trigger_word: TOK\n",
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


class FileServer(LoopbackServer):
    """Serves files by path, counts requests per path; `redirects` maps a path to a URL it answers
    302 with. The Hugging Face API shape is there too: /api/models/<repo> lists the files under
    <repo>/resolve/main/."""

    def __init__(self, files: dict[str, bytes] | None = None, redirects: dict[str, str] | None = None):
        self.files = dict(files or {})
        self.redirects = dict(redirects or {})
        self.requests: dict[str, int] = {}
        self.lock = threading.Lock()
        super().__init__()

    def respond(self, handler, send_body: bool) -> None:
        path = handler.path.split("?")[0]
        with self.lock:
            self.requests[path] = self.requests.get(path, 0) + 1
        if path in self.redirects:
            reply(handler, 302, headers={"Location": self.redirects[path]})
            return
        body = self.files.get(path) if path in self.files else self._listing(path)
        reply(handler, 404) if body is None else reply(handler, 200, body, send_body=send_body)

    def _listing(self, path: str) -> bytes | None:
        if not path.startswith("/api/models/"):
            return None
        repo = path.removeprefix("/api/models/")
        prefix = f"/{repo}/resolve/main/"
        siblings = [{"rfilename": name.removeprefix(prefix)} for name in self.files if name.startswith(prefix)]
        return json.dumps({"id": repo, "siblings": siblings}).encode() if siblings else None

    def url(self, path: str) -> str:
        return self.root + path


__all__ = [
    "KOHYA",
    "PEFT",
    "FileServer",
    "flux_training_tar",
    "replicate_training_tar",
    "transformer_lora",
    "write_transformer_lora",
    "write_user_lora",
]


def pickle_lora() -> bytes:
    """A torch pickle of LoRA-like keys: what fastsd must refuse by its first bytes, whatever its name."""
    buffer = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, buffer)
    return buffer.getvalue()


def oversized_lora(max_mb: float) -> bytes:
    """A valid safetensors file of just over max_mb (a server's FASTSD_LORA_MAX_MB)."""
    from safetensors.torch import save

    return save({"lora_unet_big.lora_down.weight": torch.zeros(int(max_mb * 2**20) // 4 + 1024)})
