"""Prompts for the transformers' text encoders (Qwen3, T5), which read a prompt whole.

These encoders take up to 512 tokens (FLUX.1 [schnell]'s T5: 256), so a long prompt needs no
chunks; a longer one is refused with its token count, never cut short in silence. The weighting
syntax of the SD presets (docs/prompts.md) has no counterpart here: an LLM's hidden states are
not a sum of per-token vectors that a weight could scale, and compel's masking trick has nothing
published to show it works on them. So a weighted prompt is read by the same parser, encoded as
its words with the syntax taken out, and the request's log says so; `.blend()` and `.and()`,
which mean several encodings, are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compel.prompt_parser import Blend

from ..errors import InputError
from ..prompts import Prompt, parse
from ..variants import ARCHITECTURE_NAMES, Variant


class PlainPrompts:
    """A family's encoder calls (embed: text -> the call's arguments for it) behind the Prompts
    interface: syntax read and stripped, the token budget checked."""

    def __init__(
        self,
        variant: Variant,
        encoder_name: str,
        budget: int,
        count_tokens: Callable[[str], int],
        embed: Callable[[str, str | None], dict[str, Any]],
    ):
        self._model = ARCHITECTURE_NAMES[variant.architecture] if variant.is_custom else variant.name
        self._encoder_name = encoder_name
        self.budget = budget
        self._count_tokens = count_tokens
        self._embed = embed

    def encode(self, prompt: str, negative_prompt: str | None, guidance: bool, loras: tuple = ()) -> dict[str, Any]:
        """negative_prompt: only with classifier-free guidance (the caller decides); loras unused."""
        negative = parse(negative_prompt or "", "negative_prompt").words if guidance else None
        return self._embed(parse(prompt, "prompt").words, negative)

    def check(self, prompt: Prompt, name: str) -> None:
        parts = prompt.conjunction.prompts
        if len(parts) > 1 or isinstance(parts[0], Blend):
            raise InputError(
                f"{name} uses .blend() or .and(), which combine several CLIP encodings; {self._model}'s "
                f"{self._encoder_name} reads one text: write it as one prompt.",
                field=name,
            )
        tokens = self._count_tokens(prompt.words)
        if tokens > self.budget:
            raise InputError(
                f"{name} takes {tokens} tokens; {self._model}'s {self._encoder_name} reads at most {self.budget}: "
                "shorten it.",
                field=name,
            )

    def note(self, prompt: Prompt, name: str) -> str | None:
        if prompt.words == prompt.text:
            return None
        return (
            f"{name}: weighting is not applied by {self._model}'s {self._encoder_name}; encoded as the words "
            f"{prompt.words[:200]!r}"
        )
