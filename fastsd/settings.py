"""Every setting of a deployment, read once from the environment: the one module that reads it.

`Settings.from_environment()` runs at the start of setup (predict.py), of the realtime server and
of each script; everything else is handed the Settings (or the values it needs). One parser per
kind of value, and one rule for switches: 1/0, on/off, true/false, yes/no, in any case. A value
that is not allowed stops setup with one sentence naming the variable and what it allows.

docs/settings.md lists them all (tests/test_settings.py checks that table against VARIABLES).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import ConfigurationError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ON = ("1", "on", "true", "yes")
OFF = ("0", "off", "false", "no")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
REGIONAL = "regional"  # FASTSD_COMPILE=regional: the repeated blocks only
BEST = "best"  # FASTSD_COMPILE=on: the device's best measured mode (fastsd.pipelines)
DTYPES = ("float32", "float16", "bfloat16")


# --- one parser per kind of value: (variable, text) -> value; text "" means unset ------------------


def switch(default: bool) -> Callable[[str, str], bool]:
    def parse(name: str, text: str) -> bool:
        lowered = text.lower()
        if not lowered:
            return default
        if lowered in ON or lowered in OFF:
            return lowered in ON
        raise ConfigurationError(f"{name}={text!r} is not allowed; write on or off (or 1/0, true/false, yes/no).")

    return parse


def number(kind: type, default: float | None, low: float, high: float | None = None) -> Callable[[str, str], Any]:
    """An int or float from low to high (high None: no bound); default when unset."""

    def parse(name: str, text: str) -> Any:
        if not text:
            return default
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value or (high is not None and value > high):
            what = "a whole number" if kind is int else "a number"
            bound = f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}"
            raise ConfigurationError(f"{name} must be {what} {bound}, got {text!r}.")
        return value

    return parse


def text(default: str | None = None) -> Callable[[str, str], str | None]:
    def parse(name: str, given: str) -> str | None:
        return given or default

    return parse


def choice(default: str | None, allowed: tuple[str, ...]) -> Callable[[str, str], str | None]:
    def parse(name: str, given: str) -> str | None:
        if not given:
            return default
        if given.lower() not in allowed:
            raise ConfigurationError(f"{name}={given!r} is not allowed; choose one of: {', '.join(allowed)}.")
        return given.lower()

    return parse


def path(default: Path | None) -> Callable[[str, str], Path | None]:
    def parse(name: str, given: str) -> Path | None:
        return Path(given).expanduser() if given else default

    return parse


def names(name: str, given: str) -> tuple[str, ...]:
    """A list separated by commas or spaces (FASTSD_CONTROLNETS, FASTSD_REALTIME_ORIGINS)."""
    return tuple(dict.fromkeys(part for part in given.replace(",", " ").split() if part))


def compile_mode(name: str, given: str) -> str | None:
    """off (None), on (BEST), regional, or a torch.compile mode."""
    lowered = given.lower()
    if not lowered or lowered in OFF:
        return None
    if lowered in ON:
        return BEST
    if lowered in (REGIONAL, *COMPILE_MODES):
        return lowered
    raise ConfigurationError(
        f"{name}={given!r} is not allowed; write off (the default), on, {REGIONAL}, or a torch.compile mode: "
        f"{', '.join(COMPILE_MODES)}."
    )


def port(name: str, given: str) -> int | None:
    return number(int, None, 1, 65535)(name, given)


# --- the variables ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Variable:
    """One environment variable: the Settings field it sets, its parser, and its documentation."""

    name: str
    field: str
    parse: Callable[[str, str], Any]
    default: str  # as docs/settings.md shows it
    allowed: str
    what: str


VARIABLES: tuple[Variable, ...] = (
    Variable("FASTSD_VARIANT", "variant", text("sd-turbo"), "`sd-turbo`", "a preset (README: Variants)",
             "the preset this server runs"),
    Variable("FASTSD_MODEL", "model", text(), "unset", "a hub id or a local diffusers folder",
             "a fine-tune to serve instead of a preset (its architecture is read from its configs)"),
    Variable("FASTSD_ACCELERATION", "acceleration", text(), "unset", "`none`, `lcm-lora`, `lightning`, `hyper`, "
             "`tcd`, `dmd2`", "an SD fine-tune's acceleration (unset: `lcm-lora`); FLUX and Z-Image models run "
             "their own schedule"),
    Variable("FASTSD_WEIGHTS_ROOT", "weights_root", path(PROJECT_ROOT), "the project folder", "a folder",
             "where `weights/` and `lora/` are"),
    Variable("FASTSD_WEIGHTS_URL", "weights_url", text(), "unset", "an http(s) URL, `file://` or a path",
             "a weights tar fetched at start where weights are missing (docs/weights.md)"),
    Variable("FASTSD_DTYPE", "dtype", choice(None, DTYPES), "fp16 on CUDA/MPS, bf16 on CPUs with AVX512-BF16/AMX, "
             "else fp32", "`float32`, `float16`, `bfloat16`", "the precision the models run in"),
    Variable("FASTSD_CONTROLNETS", "controlnets", names, "none", "`canny`, `depth`, comma-separated",
             "the ControlNets this deployment serves"),
    Variable("FASTSD_SAFETY_CHECKER", "safety_checker", switch(True), "on", "a switch",
             "off: no safety checking, the checkers not loaded (docs/safety.md)"),
    Variable("FASTSD_GRAPHS", "graphs", switch(False), "off", "a switch",
             "the GPU fast path: captured CUDA graphs, images kept on the GPU (docs/performance.md)"),
    Variable("FASTSD_COMPILE", "compile", compile_mode, "off",
             f"off, on, `{REGIONAL}`, or a mode: {', '.join(f'`{mode}`' for mode in COMPILE_MODES)}",
             "torch.compile (on: the device's best mode; regional: the repeated blocks only)"),
    Variable("FASTSD_ATTENTION", "attention", text(), "unset", "a diffusers attention backend: `_native_cudnn`, "
             "`_native_flash`, `flash`, `_flash_3`, `sage`, ...",
             "the transformers' attention kernel (unset: PyTorch's SDPA choice)"),
    Variable("FASTSD_FP8", "fp8", switch(False), "off", "a switch",
             "the transformers' weights in fp8 (torchao): fp8 matmuls on GPUs that compute them (H100 and newer)"),
    Variable("FASTSD_METRICS_PORT", "metrics_port", port, "unset", "a port",
             "the queue as Prometheus metrics on that port (docs/deploy.md)"),
    Variable("FASTSD_LORA_MAX_MB", "lora_max_mb", number(float, 2048.0, 0.001), "2048", "a number of MiB",
             "the largest user LoRA fetched"),
    Variable("FASTSD_LORA_CACHE", "lora_cache", path(None), "`weights/.lora-cache`", "a folder",
             "where user LoRAs are cached"),
    Variable("FASTSD_LORA_CACHE_GB", "lora_cache_gb", number(float, 20.0, 0.001), "20", "a number of GiB",
             "the cache's size; the least recently used go first"),
    Variable("FASTSD_LORA_TIMEOUT_S", "lora_timeout_s", number(float, 300.0, 0.001), "300", "seconds",
             "one deadline for a LoRA's whole download"),
    Variable("FASTSD_LORAS_LOADED", "loras_loaded", number(int, 4, 1, 64), "4", "1 to 64",
             "user LoRAs kept loaded between requests"),
    Variable("FASTSD_LORA_MAX_RANK", "lora_max_rank", number(int, 64, 0, 1024), "64", "0 to 1024",
             "the rank of a compiled UNet's or transformer's LoRA slots; 0: none, and no user LoRAs there"),
    Variable("FASTSD_ALLOW_PRIVATE_URLS", "allow_private_urls", switch(False), "off", "a switch",
             "on: LoRAs may be fetched from private addresses and over http (tests only)"),
    Variable("FASTSD_DOWNLOAD_WORKERS", "download_workers", number(int, 8, 1, 64), "8", "1 to 64",
             "parallel range requests for a weights tar"),
    Variable("FASTSD_NO_PGET", "no_pget", switch(False), "off", "a switch",
             "on: fetch a weights tar without pget even where it is installed"),
    Variable("FASTSD_HUB_TIMEOUT", "hub_timeout_s", number(float, 10.0, 0.001), "10", "seconds",
             "how long the hub's file listing may take"),
    Variable("FASTSD_REALTIME_TOKEN", "realtime_token", text(), "unset", "text",
             "the token every realtime client gives; needed on any address but loopback"),
    Variable("FASTSD_REALTIME_ORIGINS", "realtime_origins", names, "none", "origins, comma-separated",
             "other pages allowed to open the realtime websocket"),
    Variable("FASTSD_REALTIME_BACKEND_TOKEN", "realtime_backend_token", text(), "unset", "text",
             "the token --backend sends (else REPLICATE_API_TOKEN)"),
    Variable("FASTSD_REALTIME_MAX_CONNECTIONS", "realtime_max_connections", number(int, None, 1), "8",
             "a whole number", "websockets served at once"),
    Variable("FASTSD_REALTIME_MAX_FRAME_BYTES", "realtime_max_frame_bytes", number(int, None, 1), "2097152",
             "a whole number", "bytes of one frame"),
    Variable("FASTSD_REALTIME_MAX_FRAME_PIXELS", "realtime_max_frame_pixels", number(int, None, 1), "4194304",
             "a whole number", "pixels of one frame"),
    Variable("FASTSD_REALTIME_MAX_MESSAGES_PER_SECOND", "realtime_max_messages_per_second",
             number(float, None, 0.001), "60", "a number", "messages per connection and second"),
    Variable("FASTSD_REALTIME_IDLE_TIMEOUT", "realtime_idle_timeout", number(float, None, 0.001), "300",
             "seconds", "a connection silent this long is closed"),
    Variable("REPLICATE_API_TOKEN", "replicate_api_token", text(), "unset", "text",
             "Replicate's API token, for the realtime --backend"),
    Variable("HF_ENDPOINT", "hub_endpoint", text("https://huggingface.co"), "`https://huggingface.co`", "a URL",
             "the Hugging Face hub (huggingface_hub's own variable)"),
    Variable("HF_TOKEN", "hub_token", text(), "unset", "text", "a hub token, for gated or private repos"),
    Variable("HF_HUB_OFFLINE", "hub_offline", switch(False), "off", "a switch", "on: never ask the hub"),
)  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """A deployment's settings (docs/settings.md); the defaults are those of an unset environment."""

    variant: str = "sd-turbo"
    model: str | None = None
    acceleration: str | None = None  # None: fastsd.variants.DEFAULT_ACCELERATION for SD models
    weights_root: Path = PROJECT_ROOT
    weights_url: str | None = None
    dtype: str | None = None
    controlnets: tuple[str, ...] = ()
    safety_checker: bool = True
    graphs: bool = False
    compile: str | None = None
    attention: str | None = None
    fp8: bool = False
    metrics_port: int | None = None
    lora_max_mb: float = 2048.0
    lora_cache: Path | None = None
    lora_cache_gb: float = 20.0
    lora_timeout_s: float = 300.0
    loras_loaded: int = 4
    lora_max_rank: int = 64
    allow_private_urls: bool = False
    download_workers: int = 8
    no_pget: bool = False
    hub_timeout_s: float = 10.0
    realtime_token: str | None = None
    realtime_origins: tuple[str, ...] = ()
    realtime_backend_token: str | None = None
    realtime_max_connections: int | None = None  # None: fastsd.realtime.settings.Limits' defaults
    realtime_max_frame_bytes: int | None = None
    realtime_max_frame_pixels: int | None = None
    realtime_max_messages_per_second: float | None = None
    realtime_idle_timeout: float | None = None
    replicate_api_token: str | None = None
    hub_endpoint: str = "https://huggingface.co"
    hub_token: str | None = None
    hub_offline: bool = False

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Every variable read and checked at once; overrides (a script's options) win."""
        environment = os.environ if environment is None else environment
        values = {
            variable.field: variable.parse(variable.name, environment.get(variable.name, "").strip())
            for variable in VARIABLES
        }
        return cls(**{**values, **overrides})

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @property
    def lora_cache_folder(self) -> Path:
        return self.lora_cache or self.weights_root / "weights" / ".lora-cache"

    @property
    def compile_cache_folder(self) -> Path:
        """Inductor's cache, kept beside the weights so that the next boot reuses it."""
        return self.weights_root / "weights" / ".torch-compile-cache"

    @property
    def hub(self) -> str:
        return self.hub_endpoint.rstrip("/")


def configure_libraries(settings: Settings, compiling: bool = False, downloading: bool = False) -> None:
    """What the libraries read from the environment themselves, set where fastsd has a default
    (a value the person set wins): Inductor's cache beside the weights when compiling; Xet's
    high-performance mode (every core, more memory) for a command that only downloads."""
    if compiling:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.compile_cache_folder))
    if downloading:
        os.environ.setdefault("HF_XET_HIGH_PERFORMANCE", "1")


def child_environment(**changes: str) -> dict[str, str]:
    """This process's environment with changes: for a process a script starts (a Cog server)."""
    return {**os.environ, **changes}
