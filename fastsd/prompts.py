"""Prompts as people write them: weighted words and prompts longer than CLIP's 77 tokens.

One rule set (docs/prompts.md): compel's syntax, `word+`, `word-`, `(words)1.3`, `.blend()`,
`.and()`, plus the Automatic1111 forms people paste, translated into it first: `(words:1.3)`,
`(words)` = 1.1, `((words))` = 1.21, `[words]` = 1/1.1, `\\(` for a literal parenthesis.

A prompt without weighting that fits in 77 tokens is encoded by the pipeline's own encode_prompt,
exactly as before this module existed. Anything else goes through compel, which encodes the text
in 77-token chunks (each chunk one text-encoder call on a [1, 77] tensor) and pads the prompt and
the negative prompt to the same number of chunks with the empty prompt's embedding.
"""

from __future__ import annotations

import functools
import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import pyparsing
import torch
from compel import Compel, PromptParser, ReturnedEmbeddingsType
from compel.prompt_parser import Blend, Conjunction, CrossAttentionControlSubstitute, FlattenedPrompt

from .errors import InputError

MAX_CHUNKS = 8  # 8 x 75 words' tokens: several times what Civitai prompts use, a bounded cost
MAX_WEIGHT = 10.0  # far past where images break down (about 1.6 for SD1.5), short of overflowing
A1111_EMPHASIS = 1.1  # (words) multiplies by this, [words] divides by it

OUTPUT_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")

# A prompt with none of these is plain text, read as it is (no parsing): brackets, escapes, and
# compel's signs, a run of + or - straight after a character and not followed by a letter or digit
# ("cat+", "dog--,"; not "x-ray", "a - b").
_BRACKETS = set("()[]\\")
_SIGN_WEIGHT = re.compile(r"\S[+-]+(?!\w)")
_ESCAPABLE = "()[]"
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# What compel reads as a weight right after a closing parenthesis: a number, +/-, or an operator.
_COMPEL_WEIGHT = re.compile(r"[+-]|\d|\.\d|\.(?:blend|and|swap)\(")
_OPERATOR_BEFORE = re.compile(r"\.(?:blend|and|swap)$")


@dataclass(frozen=True)
class Prompt:
    """A prompt as written, and how it is encoded."""

    text: str  # as written: the cache keys on this
    plain: str | None  # the text the pipeline's encode_prompt reads, when nothing in it is weighted
    words: str  # the text with the syntax taken out: what SDXL's pooled embedding reads
    conjunction: Conjunction  # compel's parse of the translated text


@functools.lru_cache(maxsize=256)  # Engine.validate reads a prompt first, then the encoder
def parse(text: str, name: str = "prompt") -> Prompt:
    """Read a prompt by the rules above; bad syntax is one InputError sentence naming the input."""
    if not _BRACKETS.intersection(text) and not _SIGN_WEIGHT.search(text):
        return Prompt(text, text, text, Conjunction([FlattenedPrompt([(text, 1.0)])]))
    translated, has_syntax = translate(text, name)
    try:
        conjunction = Compel.parse_prompt_string(translated)
    except (ValueError, TypeError, IndexError, PromptParser.ParsingException, pyparsing.ParseBaseException) as error:
        raise InputError(f"{name} could not be read as weighted text ({error}); see docs/prompts.md.") from None
    if not conjunction.prompts:  # only empty groups, "()" or "[]": nothing to weigh
        conjunction = Conjunction([FlattenedPrompt([("", 1.0)])])
    if conjunction.lora_weights:
        raise InputError(f"{name}: withLora() is not read here; send the LoRA as lora_weights or extra_lora.")
    parts = [part for prompt in conjunction.prompts for part in _flattened(prompt)]
    fragments = [fragment for part in parts for fragment in part.children]
    if any(isinstance(fragment, CrossAttentionControlSubstitute) for fragment in fragments):
        raise InputError(f"{name}: .swap() (prompt-to-prompt editing) is not supported; use .blend() or weights.")
    for fragment in fragments:
        if not 0 <= fragment.weight <= MAX_WEIGHT:
            raise InputError(
                f"{name}: the weight of {fragment.text!r} comes to {fragment.weight:g}; a weight must come to "
                f"between 0 and {MAX_WEIGHT:g}."
            )
    words = " ".join(fragment.text for fragment in fragments if fragment.text)
    unweighted = (
        len(conjunction.prompts) == 1
        and isinstance(conjunction.prompts[0], FlattenedPrompt)
        and conjunction.weights == [1.0]
        and all(fragment.weight == 1.0 for fragment in fragments)
    )
    plain = (text if not has_syntax else words) if unweighted else None
    return Prompt(text, plain, plain if plain is not None else words, conjunction)


def _flattened(prompt) -> list[FlattenedPrompt]:
    return list(prompt.prompts) if isinstance(prompt, Blend) else [prompt]


def translate(text: str, name: str = "prompt") -> tuple[str, bool]:
    """The Automatic1111 forms rewritten in compel's syntax; compel's own syntax passes unchanged.
    Returns (compel text, whether any bracket or escape was read as syntax). An unmatched bracket
    is read as the character itself."""
    pairs = _matched_brackets(text)
    translated = _translate_range(text, 0, len(text), pairs, name)
    return translated, bool(pairs) or bool(re.search(r"\\[()\[\]]", text))


def _matched_brackets(text: str) -> dict[int, int]:
    """Opening index -> closing index of each matched ( ) and [ ] pair, escaped ones skipped."""
    stack: list[int] = []
    pairs: dict[int, int] = {}
    index = 0
    while index < len(text):
        character = text[index]
        if character == "\\" and index + 1 < len(text) and text[index + 1] in _ESCAPABLE:
            index += 2
            continue
        if character in "([":
            stack.append(index)
        elif character in ")]":
            opening = "(" if character == ")" else "["
            if stack and text[stack[-1]] == opening:
                pairs[stack.pop()] = index
            elif opening in (text[i] for i in stack):
                # A closing bracket of another kind inside: the ones opened since are unmatched.
                while text[stack[-1]] != opening:
                    stack.pop()
                pairs[stack.pop()] = index
        index += 1
    return pairs


def _translate_range(text: str, start: int, end: int, pairs: dict[int, int], name: str) -> str:
    out: list[str] = []
    index = start
    while index < end:
        character = text[index]
        close = pairs.get(index)
        escape = character == "\\" and index + 1 < end and text[index + 1] in _ESCAPABLE
        if escape or close is None or close >= end:  # escaped, or unmatched: the character itself
            literal = text[index + 1] if escape else character
            index += 2 if escape else 1
            out.append("\\" + literal if literal in "()" else literal)  # compel reads [ ] as text already
            if literal in "()" and index < end and text[index] in "(\\":
                out.append(" ")  # compel reads "\\((a)1.1" all as text; "\\( (a)1.1" as meant
            continue
        explicit = character == "(" and _has_explicit_weight(text, index, close, pairs)
        if character == "(" and (
            _OPERATOR_BEFORE.search(text, 0, index) or (not explicit and _COMPEL_WEIGHT.match(text, close + 1))
        ):
            # compel's own: (words)1.3, (words)+, ("a", "b").blend(...), and the operators' arguments
            out.append("(" + _translate_range(text, index + 1, close, pairs, name) + ")")
        else:
            out.append(_emphasis(text, index, close, pairs, name))
            if close + 1 < end and not text[close + 1].isspace() and text[close + 1] not in ")]":
                out.append(" ")  # so that what follows is not read as part of the weight
        index = close + 1
    return "".join(out)


def _emphasis(text: str, opening: int, close: int, pairs: dict[int, int], name: str) -> str:
    """An Automatic1111 group in compel's syntax: (words:w) -> (words)w, (words) -> (words)1.1,
    [words] -> (words)0.909..."""
    weight = A1111_EMPHASIS if text[opening] == "(" else 1 / A1111_EMPHASIS
    colon = _last_top_level_colon(text, opening, close, pairs)
    inner_end = close
    if colon is not None:
        after = text[colon + 1 : close].strip()
        if text[opening] == "[":
            raise InputError(
                f"{name}: {text[opening : close + 1]!r} is Automatic1111's prompt editing, which is not supported; "
                "write [words] to weaken words, or \\[ for a literal bracket."
            )
        if _NUMBER.fullmatch(after):
            weight, inner_end = float(after), colon
        elif after[:1].isdigit() or after[:1] in "+-.":
            raise InputError(
                f"{name}: the weight in {text[opening : close + 1]!r} is not a number; write it like (words:1.3)."
            )
    if text[opening] == "[" and "|" in text[opening + 1 : close]:
        raise InputError(
            f"{name}: {text[opening : close + 1]!r} is Automatic1111's alternation, which is not supported; "
            "write \\[ for a literal bracket."
        )
    if weight < 0 or not math.isfinite(weight):
        raise InputError(f"{name}: the weight in {text[opening : close + 1]!r} must be from 0 to {MAX_WEIGHT:g}.")
    return "(" + _translate_range(text, opening + 1, inner_end, pairs, name) + ")" + repr(weight)


def _has_explicit_weight(text: str, opening: int, close: int, pairs: dict[int, int]) -> bool:
    colon = _last_top_level_colon(text, opening, close, pairs)
    return colon is not None and _NUMBER.fullmatch(text[colon + 1 : close].strip()) is not None


def _last_top_level_colon(text: str, opening: int, close: int, pairs: dict[int, int]) -> int | None:
    found, index = None, opening + 1
    while index < close:
        if text[index] == "\\":
            index += 2
            continue
        if index in pairs:
            index = pairs[index] + 1
            continue
        if text[index] == ":":
            found = index
        index += 1
    return found


class _AsThePipelineCalls:
    """A text encoder as compel sees it, called the way the pipeline's encode_prompt calls it:
    int64 token ids, no attention mask where it is all ones (the same numbers), SDXL's hidden
    states. So a captured 77-token graph of the encoder (fastsd.gpu) replays for compel's chunks
    too. Only a weight below 1 needs a mask (compel masks those words out): that call differs."""

    def __init__(self, module: torch.nn.Module, hidden_states: bool):
        self.module = module
        self._hidden_states = hidden_states

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    def __getattr__(self, name: str):
        return getattr(self.module, name)

    def __call__(self, input_ids, attention_mask=None, output_hidden_states=False, return_dict=True):
        masked = {} if attention_mask is None or bool(attention_mask.all()) else {"attention_mask": attention_mask}
        if self._hidden_states:
            return self.module(input_ids.long(), **masked, output_hidden_states=True)
        return self.module(input_ids.long(), attention_mask=masked.get("attention_mask"))


class PromptEncoder:
    """Prompt and negative prompt -> the embeddings the pipelines take (OUTPUT_NAMES)."""

    def __init__(self, pipeline, device: str):
        self._pipeline = pipeline
        self._device = device
        components = pipeline.components
        self._encoders = [
            (components[tokenizer], components[encoder])
            for tokenizer, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
            if components.get(tokenizer) is not None and components.get(encoder) is not None
        ]
        # SDXL: both encoders' penultimate hidden states, and text_encoder_2's pooled output.
        self._pooled = components.get("text_encoder_2") is not None
        self._hidden_states = (
            ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
            if self._pooled
            else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
        )
        self._zero_negative = bool(getattr(pipeline.config, "force_zeros_for_empty_prompt", False))
        # compel keeps the empty prompt's embedding (what weights scale from, what pads): one set of
        # Compels per state of the text encoders, which their LoRAs change.
        self._compels: OrderedDict[tuple, list[Compel]] = OrderedDict()

    def encode(
        self, prompt: str, negative_prompt: str | None, guidance: bool, loras: tuple = ()
    ) -> dict[str, torch.Tensor]:
        """negative_prompt None: none given (SDXL then uses zeros where the model says so). loras:
        the text-encoder LoRAs active (engine.PromptCache's key), () for none."""
        positive = parse(prompt, "prompt")
        negative = parse(negative_prompt, "negative_prompt") if guidance and negative_prompt is not None else None
        if all(self._fits(text) for text in (positive, negative) if text is not None):
            encoded = self._pipeline.encode_prompt(
                prompt=positive.plain,
                device=self._device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guidance,
                negative_prompt=negative.plain if negative is not None else None,
            )
            # SD pipelines return two tensors, SDXL four (with the pooled embeddings): zip stops at the shorter.
            return {name: tensor for name, tensor in zip(OUTPUT_NAMES, encoded, strict=False) if tensor is not None}
        return self._chunked(positive, negative, guidance, self._compels_for(loras))

    def _fits(self, prompt: Prompt) -> bool:
        """Unweighted and within every tokenizer's 77 tokens (start and end markers included)."""
        return prompt.plain is not None and all(
            len(tokenizer(prompt.plain, verbose=False).input_ids) <= tokenizer.model_max_length
            for tokenizer, _ in self._encoders
        )

    def _compels_for(self, loras: tuple) -> list[Compel]:
        if loras not in self._compels:
            self._compels[loras] = [
                Compel(
                    tokenizer=tokenizer,
                    text_encoder=_AsThePipelineCalls(encoder, self._pooled),
                    returned_embeddings_type=self._hidden_states,
                    truncate_long_prompts=False,
                    device=self._device,
                )
                for tokenizer, encoder in self._encoders
            ]
            if len(self._compels) > 8:
                self._compels.popitem(last=False)
        self._compels.move_to_end(loras)
        return self._compels[loras]

    def _chunked(
        self, positive: Prompt, negative: Prompt | None, guidance: bool, compels: list[Compel]
    ) -> dict[str, torch.Tensor]:
        zero_negative = guidance and negative is None and self._zero_negative
        if guidance and negative is None and not zero_negative:
            negative = parse("", "negative_prompt")  # what encode_prompt uses for none
        texts = [positive] + ([negative] if negative is not None else [])
        for text, name in zip(texts, ("prompt", "negative_prompt"), strict=False):
            chunks = self._chunk_count(compels[0], text)
            if chunks > MAX_CHUNKS:
                raise InputError(
                    f"{name} takes {chunks} chunks of 77 tokens; at most {MAX_CHUNKS} (about {MAX_CHUNKS * 75} "
                    "tokens) are encoded: shorten it."
                )
        per_encoder = []
        for compel in compels:
            built = [compel.build_conditioning_tensor_for_conjunction(text.conjunction)[0] for text in texts]
            per_encoder.append(compel.pad_conditioning_tensors_to_same_length(built))
        length = max(tensor.shape[1] for built in per_encoder for tensor in built)
        for compel, built in zip(compels, per_encoder, strict=True):
            # The two SDXL tokenizers split alike; should a model's not, pad like compel does.
            if any(tensor.shape[1] < length for tensor in built):
                padding = compel.conditioning_provider.empty_z
                chunks = [(length - tensor.shape[1]) // padding.shape[1] for tensor in built]
                built[:] = [torch.cat([t, *[padding] * n], dim=1) for t, n in zip(built, chunks, strict=True)]
        embeds = [torch.cat(parts, dim=-1).to(self._device) for parts in zip(*per_encoder, strict=True)]
        result = {"prompt_embeds": embeds[0]}
        if self._pooled:
            provider = compels[-1].conditioning_provider  # one text at a time: the [1, 77] call
            pooled = torch.cat([provider.get_pooled_embeddings([text.words], device=self._device) for text in texts])
            result["pooled_prompt_embeds"] = pooled[:1]
        if negative is not None:
            result["negative_prompt_embeds"] = embeds[1]
            if self._pooled:
                result["negative_pooled_prompt_embeds"] = pooled[1:]
        elif zero_negative:
            result["negative_prompt_embeds"] = torch.zeros_like(embeds[0])
            result["negative_pooled_prompt_embeds"] = torch.zeros_like(result["pooled_prompt_embeds"])
        return result

    @staticmethod
    def _chunk_count(compel: Compel, prompt: Prompt) -> int:
        """The 77-token chunks compel will encode (it splits at sentence ends where it can)."""
        provider = compel.conditioning_provider
        counts = []
        for part in prompt.conjunction.prompts:
            lengths = [
                provider.get_token_ids_and_expand_weights(
                    [f.text for f in flat.children], [f.weight for f in flat.children], device="cpu"
                )[0].shape[0]
                for flat in _flattened(part)
            ]
            counts.append(max(lengths) // provider.max_token_count)
        return sum(counts)
