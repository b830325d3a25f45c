"""`--text-encoder tiny-random`: each family's text components as real `transformers` classes with random weights
and tokenizers built here from a small vocabulary, so prompt caching runs offline, with no download (demos, tests).

The tokenizers keep what the pipelines rely on: T5's closing `</s>`, Llama's and Gemma's leading BOS, CLIP's start
and end tokens, a Qwen chat template, and prompt templates whose prefix is exactly as many tokens as the pipeline
crops (`crop_start` 95 for HunyuanVideo, 108 for HunyuanVideo 1.5), so the crop lands where it does for the released
tokenizers. Words outside the vocabulary become `<unk>`; the embeddings mean nothing either way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

# Caption words of the demo and the tests, plus common ones; anything else is <unk>.
WORDS = ("a red square crosses the frame blue circle spins slowly green night white text on sign reads hello "  # noqa: SIM905
         "cat dog walks grass in at of and with video an sunny day city street car drives").split()
# Widths the family tests' tiny transformers take: the main text stream 16 wide, CLIP's pooled output 8.
WIDTH = 16
POOLED_WIDTH = 8


def _pieces(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    return [p for p, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def _tokenizer(specials: list[str], words: list[str], *, single: str, pad: str, unk: str,
               split: tuple[str, ...] = (), model_max_length: int = 4096, **named: str) -> Any:
    """A WordPiece tokenizer over `words` (each word whole, except those in `split`, which become two pieces).

    `single` is the post-processor template ("$A </s>" for T5), `named` the special tokens transformers knows by
    role (bos_token, eos_token...).
    """
    import transformers
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab: dict[str, int] = {}
    for token in [pad, unk, *specials]:
        vocab.setdefault(token, len(vocab))
    for word in [*WORDS, *words]:
        if word in split:
            vocab.setdefault(word[: len(word) // 2], len(vocab))
            vocab.setdefault("##" + word[len(word) // 2:], len(vocab))
        else:
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in [pad, unk, *specials]])
    used = re.findall(r"\S+", single.replace("$A", ""))
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[(t, vocab[t]) for t in used])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk,
                                                model_max_length=model_max_length, **named)


def _fitted(build: Callable[[tuple[str, ...]], Any], prefix: Callable[[Any], int], target: int,
            candidates: list[str]) -> Any:
    """The tokenizer `build(split)` whose template prefix is `target` tokens: words of `candidates` (each seen once
    in the prefix) are split into two pieces one by one until the count is reached."""
    split: tuple[str, ...] = ()
    tok = build(split)
    for word in candidates:
        if prefix(tok) >= target:
            break
        split = (*split, word)
        tok = build(split)
    if prefix(tok) != target:  # a diffusers release with another template: this module needs updating
        raise RuntimeError(f"the tiny tokenizer's template prefix is {prefix(tok)} tokens, the pipeline crops {target}")
    return tok


def _once(text: str) -> list[str]:
    pieces = _pieces(text)
    return sorted({p for p in pieces if pieces.count(p) == 1 and p.isalpha() and len(p) > 3})


def _t5(words: list[str]) -> Any:
    return _tokenizer(["</s>"], words, single="$A </s>", pad="<pad>", unk="<unk>", eos_token="</s>")


def t5_encoder(vocab_size: int, cls: str = "T5EncoderModel", config: str = "T5Config", width: int = WIDTH) -> Any:
    import transformers

    cfg = getattr(transformers, config)(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=32, num_layers=1,
                                        num_heads=2, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    return getattr(transformers, cls)(cfg)


def _seeded(build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    # Fixed seed: every rank and every rerun builds the same weights, so the cached embeddings are reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        parts = build()
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.eval().requires_grad_(False)
    return parts


def tiny_t5(cls: str = "T5EncoderModel", config: str = "T5Config") -> dict[str, Any]:
    """CogVideoX and LTX-Video (T5), Wan (UMT5 in `cls`), Mochi: one T5 and its tokenizer."""
    def build() -> dict[str, Any]:
        tok = _t5([])
        return {"tokenizer": tok, "text_encoder": t5_encoder(len(tok), cls, config)}
    return _seeded(build)


def tiny_hunyuanvideo() -> dict[str, Any]:
    """HunyuanVideoPipeline: a LlamaModel under the prompt template (crop 95) and a CLIPTextModel (pooled)."""
    import transformers
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    template = DEFAULT_PROMPT_TEMPLATE["template"]
    prefix_text = template.split("{}")[0]
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

    def llama_tok(split: tuple[str, ...]) -> Any:
        tok = _tokenizer(specials, _pieces(template.replace("{}", " ")), single="<|begin_of_text|> $A",
                         pad="<|end_of_text|>", unk="<unk>", split=split, bos_token="<|begin_of_text|>",
                         eos_token="<|eot_id|>")
        tok.add_tokens(["\n\n"])  # Llama 3 has a token for the blank line after each header
        return tok

    def build() -> dict[str, Any]:
        tok = _fitted(llama_tok, lambda t: len(t(prefix_text).input_ids), DEFAULT_PROMPT_TEMPLATE["crop_start"],
                      _once(prefix_text))
        llama = transformers.LlamaModel(transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=2048, pad_token_id=tok.pad_token_id))
        clip_tok = _tokenizer(["<|startoftext|>", "<|endoftext|>"], [], single="<|startoftext|> $A <|endoftext|>",
                              pad="<|pad|>", unk="<|unk|>", model_max_length=77, bos_token="<|startoftext|>",
                              eos_token="<|endoftext|>")
        clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=POOLED_WIDTH, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, pad_token_id=clip_tok.pad_token_id,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id))
        return {"tokenizer": tok, "text_encoder": llama, "tokenizer_2": clip_tok, "text_encoder_2": clip}
    return _seeded(build)


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_hunyuanvideo15() -> dict[str, Any]:
    """HunyuanVideo15Pipeline: a Qwen2.5-VL text model under its chat template (crop 108) and a ByT5 glyph encoder
    (transformers' ByT5Tokenizer needs no files)."""
    import transformers

    message = _hv15_system_message()
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    words = _pieces(message) + ["system", "user", "assistant"]

    def qwen_tok(split: tuple[str, ...]) -> Any:
        tok = _tokenizer(specials, words, single="$A", pad="<|endoftext|>", unk="<unk>", split=split,
                         eos_token="<|im_end|>")
        tok.add_tokens(["\n"])
        tok.chat_template = QWEN_CHAT_TEMPLATE
        return tok

    def prefix(tok: Any) -> int:
        convo = [{"role": "system", "content": message}, {"role": "user", "content": "cat"}]
        ids = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        return ids.index(tok.convert_tokens_to_ids("cat"))

    def build() -> dict[str, Any]:
        tok = _fitted(qwen_tok, prefix, 108, _once(message))
        rope = {"rope_type": "default", "mrope_section": [2, 1, 1], "type": "default"}
        qwen = transformers.Qwen2_5_VLTextModel(transformers.Qwen2_5_VLTextConfig(
            vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=2048, rope_scaling=rope, bos_token_id=None,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        byt5_tok = transformers.ByT5Tokenizer()
        byt5 = t5_encoder(len(byt5_tok))
        return {"tokenizer": tok, "text_encoder": qwen, "tokenizer_2": byt5_tok, "text_encoder_2": byt5}
    return _seeded(build)


def _hv15_system_message() -> str:
    """The system message HunyuanVideo15Pipeline sets in __init__ (its `_get_mllm_prompt_embeds` default)."""
    import inspect

    from diffusers import HunyuanVideo15Pipeline

    return inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default


def tiny_ltx2() -> dict[str, Any]:
    """LTX2Pipeline: a Gemma3ForConditionalGeneration (a 2-layer text model, a 1-layer vision tower it never runs)."""
    import transformers

    def build() -> dict[str, Any]:
        tok = _tokenizer(["<bos>", "<eos>"], [], single="<bos> $A", pad="<pad>", unk="<unk>", bos_token="<bos>",
                         eos_token="<eos>")
        text = dict(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
                    sliding_window=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        gemma = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=len(tok) + 10,
            boi_token_index=len(tok) + 11, eoi_token_index=len(tok) + 12))
        return {"tokenizer": tok, "text_encoder": gemma}
    return _seeded(build)


def tiny_minimax_h3() -> dict[str, Any]:
    """MiniMax-H3's text encoder block: a Qwen3VLForConditionalGeneration with 51 text layers (its pipeline reads
    `hidden_states[50]`, and refuses a stack without a layer after it), a Qwen tokenizer and a Qwen3VLProcessor.

    The processor's only use on a text prompt is `create_mm_token_type_ids` (every token text); its image and video
    processors need torchvision, which latentcache does not install, so the tiny processor is the real class
    without them (built without its __init__, the tokenizer and the vision token ids set as __init__ sets them).
    """
    import transformers

    vision = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

    def build() -> dict[str, Any]:
        tok = _tokenizer(["<|im_start|>", "<|im_end|>", *vision], [], single="$A", pad="<|endoftext|>",
                         unk="<unk>", eos_token="<|im_end|>")
        image_id, video_id = tok.convert_tokens_to_ids("<|image_pad|>"), tok.convert_tokens_to_ids("<|video_pad|>")
        text = dict(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=51,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                    rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True})
        vision_config = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=WIDTH,
                             patch_size=16, deepstack_visual_indexes=[0])
        model = transformers.Qwen3VLForConditionalGeneration(transformers.Qwen3VLConfig(
            text_config=text, vision_config=vision_config, image_token_id=image_id, video_token_id=video_id))
        processor = transformers.Qwen3VLProcessor.__new__(transformers.Qwen3VLProcessor)
        processor.tokenizer = tok
        processor.image_token_ids, processor.video_token_ids, processor.audio_token_ids = [image_id], [video_id], []
        return {"tokenizer": tok, "text_encoder": model, "processor": processor}
    return _seeded(build)
