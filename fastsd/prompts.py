"""Prompts as people write them: weighted words and prompts longer than CLIP's 77 tokens.

The rules are those of fastsd.prompt_syntax (docs/prompts.md): Automatic1111's forms and compel's,
read in one linear scan into compel's own structures, which compel then encodes.

A prompt without weighting that fits in 77 tokens is encoded by the pipeline's own encode_prompt,
exactly as before this module existed. Anything else goes through compel, which encodes the text
in 77-token chunks (each chunk one text-encoder call on a [1, 77] tensor) and pads the prompt and
the negative prompt to the same number of chunks with the empty prompt's embedding.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from compel import Compel, ReturnedEmbeddingsType
from compel.prompt_parser import Blend, Conjunction, FlattenedPrompt, Fragment
from transformers import PreTrainedModel

from . import prompt_syntax
from .errors import InputError
from .prompt_syntax import MAX_WEIGHT

MAX_CHUNKS = 8  # 8 x 75 words' tokens: several times what Civitai prompts use, a bounded cost
# Text-encoder passes for one prompt: one per 77-token chunk, and one more per chunk for each group
# weighted below 1 (compel encodes the prompt again without it), for each part of a .blend() or
# .and(). A plain 8-chunk prompt takes 8; the bound keeps the worst prompt a few times that.
MAX_ENCODER_PASSES = 32

OUTPUT_NAMES = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")

# A prompt with none of these is plain text, read as it is (no parsing): brackets, escapes, and
# compel's signs, a run of + or - straight after a character and not followed by a letter or digit
# ("cat+", "dog--,"; not "x-ray", "a - b").
_BRACKETS = set("()[]\\")
_SIGN_WEIGHT = re.compile(r"\S[+-]+(?!\w)")


@dataclass(frozen=True)
class Prompt:
    """A prompt as written, and how it is encoded."""

    text: str  # as written: the cache keys on this
    plain: str | None  # the text the pipeline's encode_prompt reads, when nothing in it is weighted
    words: str  # the text with the syntax taken out: what SDXL's pooled embedding reads
    conjunction: Conjunction  # compel's structure: the parts, their fragments and weights


def _fragment(text: str, weight: float) -> Fragment:
    fragment = Fragment("", 1.0)
    # Set, not passed: Fragment's constructor would read backslash sequences in the text again. A
    # blank run has no tokens; weighed below 1 it would still cost compel an encoder pass.
    fragment.text, fragment.weight = text, weight if text.strip() else 1.0
    return fragment


@functools.lru_cache(maxsize=256)  # Engine.validate reads a prompt first, then the encoder
def parse(text: str, name: str = "prompt") -> Prompt:
    """Read a prompt by the rules above; bad syntax is one InputError sentence naming the input."""
    if not _BRACKETS.intersection(text) and not _SIGN_WEIGHT.search(text):
        return Prompt(text, text, text, Conjunction([FlattenedPrompt([(text, 1.0)])]))
    parsed = prompt_syntax.parse(text, name)
    for runs in parsed.parts:
        for words, weight in runs:
            if words.strip() and not 0 <= weight <= MAX_WEIGHT:
                raise InputError(
                    f"{name}: the weight of {words.strip()[:60]!r} comes to {weight:g}; a weight must come to "
                    f"between 0 and {MAX_WEIGHT:g}.",
                    field=name,
                )
    flat = [FlattenedPrompt([_fragment(words, weight) for words, weight in runs]) for runs in parsed.parts]
    if parsed.operator == "blend":
        conjunction = Conjunction([Blend(flat, list(parsed.weights), normalize_weights=parsed.normalize)])
    else:
        conjunction = Conjunction(flat, list(parsed.weights))
    texts = ["".join(words for words, _ in runs) for runs in parsed.parts]
    unweighted = parsed.operator is None and all(fragment.weight == 1.0 for fragment in flat[0].children)
    return Prompt(text, texts[0] if unweighted else None, " ".join(texts), conjunction)


def _flattened(prompt) -> list[FlattenedPrompt]:
    return list(prompt.prompts) if isinstance(prompt, Blend) else [prompt]


class _AsThePipelineCalls:
    """A text encoder as compel sees it, called the way the pipeline's encode_prompt calls it:
    int64 token ids, no attention mask where it is all ones (the same numbers), SDXL's hidden
    states. So a captured 77-token graph of the encoder (fastsd.gpu) replays for compel's chunks
    too. Only a weight below 1 needs a mask (compel masks those words out): that call differs."""

    def __init__(self, module: PreTrainedModel, hidden_states: bool):
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
            self._check(compels[0], text, name)
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

    def note(self, prompt: Prompt, name: str) -> str | None:
        """Nothing to say: CLIP reads every form of the syntax (fastsd.families.base.Prompts)."""
        return None

    def check(self, prompt: Prompt, name: str) -> None:
        """Refuse, with one sentence, a prompt past MAX_CHUNKS or MAX_ENCODER_PASSES (tokenizing only)."""
        if prompt.plain is None or not self._fits(prompt):
            self._check(self._compels_for(())[0], prompt, name)

    @staticmethod
    def _check(compel: Compel, prompt: Prompt, name: str) -> None:
        """The 77-token chunks compel will encode (it splits at sentence ends where it can: a .and()'s
        parts end to end, a .blend()'s side by side) and its text-encoder passes (MAX_ENCODER_PASSES)."""
        provider = compel.conditioning_provider
        chunks = passes = 0
        for part in prompt.conjunction.prompts:
            lengths = []
            for flat in _flattened(part):
                texts, weights = [f.text for f in flat.children], [f.weight for f in flat.children]
                length = provider.get_token_ids_and_expand_weights(texts, weights, device="cpu")[0].shape[0]
                lengths.append(length // provider.max_token_count)
                weakened = sum(1 for f in flat.children if f.weight < 1 and f.text.strip())
                passes += lengths[-1] * (1 + weakened)
            chunks += max(lengths)
        if chunks > MAX_CHUNKS:
            raise InputError(
                f"{name} takes {chunks} chunks of 77 tokens; at most {MAX_CHUNKS} (about {MAX_CHUNKS * 75} "
                "tokens) are encoded: shorten it.",
                field=name,
            )
        if passes > MAX_ENCODER_PASSES:
            raise InputError(
                f"{name} takes {passes} text-encoder passes (one per 77-token chunk of each part, and one more "
                f"for each group weighted below 1); at most {MAX_ENCODER_PASSES}: shorten it or weaken fewer groups.",
                field=name,
            )


class PromptCache:
    """Encoded prompts for the most recent (prompt, negative prompt, guidance) requests.

    The realtime case sends the same prompt with every new frame or seed: the text encoders then
    run once, not per request. Bounded, least recently used out first. Keyed on the text as written;
    fastsd.prompts reads its weighting and its chunks past 77 tokens.
    """

    def __init__(self, encoder, capacity: int = 32):
        self._encoder = encoder  # a family's Prompts (fastsd.families): PromptEncoder for the SD presets
        self._capacity = capacity
        self._entries: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()  # the batch worker and a direct caller may both ask

    def get(
        self, prompt: str, negative_prompt: str | None, guidance: bool, loras: tuple = ()
    ) -> dict[str, torch.Tensor]:
        """loras: the (adapter, scale) pairs active while encoding: a LoRA with text-encoder layers
        or new tokens encodes the same prompt differently, so it is part of the key."""
        with self._lock:
            return self._get(prompt, negative_prompt, guidance, loras)

    def check(self, prompt: str, negative_prompt: str | None, count_tokens: bool = True) -> None:
        """Refuse bad syntax and (count_tokens) prompts past fastsd.prompts' limits, with one sentence."""
        texts = [(parse(prompt, "prompt"), "prompt")]
        if negative_prompt is not None:
            texts.append((parse(negative_prompt, "negative_prompt"), "negative_prompt"))
        if count_tokens:
            with self._lock:  # the tokenizers are the encoder's: one thread at a time
                for parsed, name in texts:
                    self._encoder.check(parsed, name)

    def notes(self, prompt: str, negative_prompt: str | None) -> list[str]:
        """Log lines for prompts the encoder reads otherwise than written (syntax it drops)."""
        texts = [(prompt, "prompt"), *([(negative_prompt, "negative_prompt")] if negative_prompt else [])]
        return [line for text, name in texts if (line := self._encoder.note(parse(text, name), name))]

    def _get(self, prompt: str, negative_prompt: str | None, guidance: bool, loras: tuple) -> dict[str, torch.Tensor]:
        key = (prompt, negative_prompt, guidance, loras)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        with torch.inference_mode():
            embeddings = self._encoder.encode(prompt, negative_prompt, guidance, loras)
        self._entries[key] = embeddings
        if len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return embeddings
