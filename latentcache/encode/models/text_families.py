"""How each family's pipeline turns a prompt into what its transformer is handed: one `TextFamily` record each.

For HunyuanVideo, HunyuanVideo 1.5, Mochi and LTX-2 latentcache builds the family's own diffusers pipeline with only
its text components (the other modules None) and calls its `encode_prompt`, one prompt per call: the cached tensors
are what that pipeline computes for that prompt, under the names it returns them, by construction, and a diffusers
release that fixes its recipe fixes the cache too. CogVideoX, Wan and LTX-Video keep latentcache's copy of their
`_get_t5_prompt_embeds` (tested equal to it), stored as `prompt_embeds` and `attention_mask` as before.

Where the pipeline's text path goes on through trainable parts of the transformer (LTX-2's `connectors`), what
is cached is what comes before them: the trainer runs them, as they train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from latentcache.encode.models import tiny_text

Tensors = dict[str, torch.Tensor]


@dataclass(slots=True, frozen=True)
class TextFamily:
    """Everything that differs between families' prompt encoding; `TEXT_FAMILIES` holds one per VAE family."""

    # The diffusers pipeline whose prompt encoding is cached (built with its text components only).
    pipeline: str
    # Its text components: pipeline attribute (also the subfolder of a pipeline directory) -> transformers class.
    components: dict[str, str]
    # The pipeline's default number of tokens per prompt (`--text-max-length` overrides it); None where the
    # pipeline takes the prompt whole (MiniMax-H3).
    max_length: int | None
    # (pipeline, prompts, max_length, device) -> the tensors it hands the transformer, batched, by their names.
    encode: Callable[[Any, list[str], int | None, torch.device], Tensors]
    # The built-in `--text-encoder tiny-random`: the same components, random weights, built offline.
    tiny: Callable[[], dict[str, Any]]
    # Tensors stored only at the positions their mask keeps (name -> mask name); readers put them back, zeros
    # elsewhere. Only where everything downstream masks those positions out first (see each family's entry).
    trimmed: dict[str, str] = field(default_factory=dict)
    # Builds the pipeline from the loaded parts where it is not a plain diffusers pipeline class (MiniMax-H3's
    # modular text encoder block); None: `pipeline` names the class.
    build: Callable[[dict[str, Any]], Any] | None = None
    # Whether the pipeline encodes the empty prompt, what a clip without a caption gets. MiniMax-H3's does not (a
    # prompt of no tokens fails in its Qwen3-VL; the checkpoint is guidance-distilled, with no unconditional branch):
    # such a clip gets no prompt tensors.
    encodes_empty: bool = True


def _t5_recipe(wan_style: bool) -> Callable[[Any, list[str], int, torch.device], Tensors]:
    """CogVideoX/LTX-Video (`wan_style` False: the encoder sees the padded ids alone) and Wan (the mask reaches the
    encoder and positions past each prompt are zeros), as their `_get_t5_prompt_embeds`."""
    def encode(pipe: Any, prompts: list[str], max_length: int, device: torch.device) -> Tensors:
        if wan_style:
            from diffusers.pipelines.wan.pipeline_wan import prompt_clean

            prompts = [prompt_clean(p) for p in prompts]
        tokens = pipe.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        if wan_style:
            embeds = pipe.text_encoder(ids, mask).last_hidden_state
            embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        else:
            embeds = pipe.text_encoder(ids)[0]
        return {"prompt_embeds": embeds, "attention_mask": mask.bool()}
    return encode


def _hunyuanvideo(pipe: Any, prompts: list[str], max_length: int, device: torch.device) -> Tensors:
    embeds, pooled, mask = pipe.encode_prompt(prompts, max_sequence_length=max_length, device=device)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask}


def _mochi(pipe: Any, prompts: list[str], max_length: int, device: torch.device) -> Tensors:
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                            max_sequence_length=max_length, device=device)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def _ltx2(pipe: Any, prompts: list[str], max_length: int, device: torch.device) -> Tensors:
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                            max_sequence_length=max_length, device=device)
    return {"prompt_embeds": embeds, "prompt_attention_mask": mask}


def _hunyuanvideo15(pipe: Any, prompts: list[str], max_length: int, device: torch.device) -> Tensors:
    pipe.tokenizer_max_length = max_length  # the pipeline's own knob for the Qwen prompt length
    embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(prompts, device=device, batch_size=len(prompts))
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "prompt_embeds_2": embeds_2,
            "prompt_embeds_mask_2": mask_2}


def _minimax_h3(pipe: Any, prompts: list[str], max_length: int | None, device: torch.device) -> Tensors:
    (prompt,) = prompts  # its block takes one prompt: MiniMax-H3 packs one request into one sequence
    out = pipe(prompt=prompt, output=["prompt_embeds", "text_token_tags"])
    return {"prompt_embeds": out["prompt_embeds"], "text_token_tags": out["text_token_tags"][None]}


def _minimax_h3_block(parts: dict[str, Any]) -> Any:
    from diffusers.modular_pipelines.minimax_h3.encoders import MiniMaxH3TextEncoderStep

    pipe = MiniMaxH3TextEncoderStep().init_pipeline()
    pipe.update_components(**parts)
    return pipe


T5 = {"tokenizer": "AutoTokenizer", "text_encoder": "T5EncoderModel"}

TEXT_FAMILIES: dict[str, TextFamily] = {
    "cogvideox": TextFamily("CogVideoXPipeline", T5, 226, _t5_recipe(False), tiny_text.tiny_t5),
    "wan": TextFamily("WanPipeline", {**T5, "text_encoder": "UMT5EncoderModel"}, 512, _t5_recipe(True),
                      lambda: tiny_text.tiny_t5("UMT5EncoderModel", "UMT5Config")),
    "ltx": TextFamily("LTXPipeline", T5, 128, _t5_recipe(False), tiny_text.tiny_t5),
    "hunyuanvideo": TextFamily(
        "HunyuanVideoPipeline", {"tokenizer": "AutoTokenizer", "text_encoder": "LlamaModel",
                                 "tokenizer_2": "AutoTokenizer", "text_encoder_2": "CLIPTextModel"},
        256, _hunyuanvideo, tiny_text.tiny_hunyuanvideo),
    "mochi": TextFamily("MochiPipeline", T5, 256, _mochi, tiny_text.tiny_t5),
    # The Gemma hidden states of every layer, stacked: (layers + 1) x 3840 values a token for Gemma 3 12B, 385 MB a
    # prompt at 1024 tokens in bf16. LTX2TextConnectors zeroes the padded positions before anything reads them
    # (masked_fill in LTX-2.0's per-layer norm, torch.where in 2.3's), so only the prompt's own tokens are stored.
    "ltx2": TextFamily("LTX2Pipeline", {"tokenizer": "AutoTokenizer", "text_encoder": "Gemma3ForConditionalGeneration"},
                       1024, _ltx2, tiny_text.tiny_ltx2, trimmed={"prompt_embeds": "prompt_attention_mask"}),
    "hunyuanvideo15": TextFamily(
        "HunyuanVideo15Pipeline", {"tokenizer": "AutoTokenizer", "text_encoder": "Qwen2_5_VLTextModel",
                                   "tokenizer_2": "AutoTokenizer", "text_encoder_2": "T5EncoderModel"},
        1000, _hunyuanvideo15, tiny_text.tiny_hunyuanvideo15),
    # MiniMaxH3ModularPipeline's text encoder block (MiniMaxH3TextEncoderStep): the prompt verbatim (no template, no
    # special tokens, no padding) through Qwen3-VL, `hidden_states[50]`, and each row's modality tag (all text).
    "minimax-h3": TextFamily(
        "MiniMaxH3TextEncoderStep", {"tokenizer": "AutoTokenizer", "text_encoder": "Qwen3VLForConditionalGeneration",
                                     "processor": "AutoProcessor"},
        None, _minimax_h3, tiny_text.tiny_minimax_h3, build=_minimax_h3_block, encodes_empty=False),
}
