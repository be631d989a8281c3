"""Random-weight captioning models built from configs, saved like Hub checkpoints.

Tiny sizes for the tests (and the benchmarks' `--quick` runs); the benchmarks' full-size
architectures live in benchmarks/models.py. Tokenizers are made from scratch with `tokenizers`.
"""

from __future__ import annotations

import itertools
import string
from pathlib import Path

import torch

WORDS = tuple((
    "a an the two three man woman person dog cat horse bird car bus train boat plane "
    "street field beach table room kitchen tree sky water snow grass road building "
    "sitting standing running riding walking holding eating looking playing flying "
    "red blue green white black small large young old of on in with next to near at "
    "front under over and is are photo picture image close up view group"
).split())


def corpus(lines: int = 400) -> list[str]:
    """Caption-like sentences from a fixed vocabulary, deterministic."""
    cycle = itertools.cycle(WORDS)
    out = []
    for n in range(lines):
        out.append(" ".join(next(cycle) for _ in range(5 + n % 7)))
    out.append(" ".join(WORDS))
    return out


def wordpiece_tokenizer(extra_special: tuple[str, ...] = ()):
    """A BERT-style WordPiece tokenizer (BLIP, GIT): the corpus's words, and characters for the rest.

    Built, not trained: `tokenizers`' WordPiece trainer breaks ties in hash-map order, which changes
    from process to process, so a trained vocabulary (and every model sized by it) would too.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *extra_special]
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens = [*specials, *chars, *(f"##{c}" for c in chars), *sorted(set(WORDS) - set(chars))]
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                             pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                             model_max_length=512)


def bpe_tokenizer(extra_special: tuple[str, ...] = ()):
    """A GPT-2-style byte-level BPE tokenizer (GPT-2, OPT) trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", *extra_special],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                             model_max_length=512)
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return fast


def _vision(image_size: int = 32, patch_size: int = 8) -> dict:
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size}


def _bert_text(vocab: int) -> dict:
    return {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64}


def build_blip(directory: Path, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """BLIP for conditional generation (at `image_size` px, as big BLIPs are at 384)."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tokenizer = wordpiece_tokenizer(extra_special=("[DEC]",))
    tokenizer.bos_token = "[DEC]"
    text = _bert_text(len(tokenizer))
    text.update(bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
                sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = _vision(image_size, patch_size)
    config = BlipConfig(text_config=text, vision_config=vision)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer)
    return _save(directory, model, processor)


def build_git(directory: Path, seed: int = 0) -> Path:
    """GIT."""
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = wordpiece_tokenizer()
    image_size = 32
    vision = _vision(image_size)
    text = _bert_text(len(tokenizer))
    config = GitConfig(vision_config=vision, bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                       **text)
    torch.manual_seed(seed)
    model = GitForCausalLM(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return _save(directory, model, GitProcessor(image_processor, tokenizer))


def build_vit_gpt2(directory: Path, seed: int = 0) -> Path:
    """A ViT encoder + GPT-2 decoder (the nlpconnect/vit-gpt2 recipe)."""
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tokenizer = bpe_tokenizer()
    image_size = 32
    vision = _vision(image_size)
    decoder = {"vocab_size": len(tokenizer), "n_embd": 32, "n_layer": 2, "n_head": 2,
               "n_positions": 64}
    eos = tokenizer.eos_token_id
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(**vision), GPT2Config(bos_token_id=eos, eos_token_id=eos, **decoder))
    config.decoder_start_token_id = eos
    config.pad_token_id = eos
    config.eos_token_id = eos
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config).eval()
    model.generation_config.decoder_start_token_id = eos
    model.generation_config.pad_token_id = eos
    model.generation_config.eos_token_id = eos
    _spread(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def build_blip2(directory: Path, seed: int = 0) -> Path:
    """BLIP-2 with an OPT language model."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
    )

    tokenizer = bpe_tokenizer(extra_special=("<image>",))
    num_query, image_size = 4, 32
    vision = _vision(image_size)
    qformer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "encoder_hidden_size": 32, "vocab_size": 64}
    opt = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)
    eos = tokenizer.eos_token_id
    opt.bos_token_id = opt.eos_token_id = opt.pad_token_id = eos
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=opt.to_dict(),
                         num_query_tokens=num_query,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(BlipImageProcessor(size={"height": image_size,
                                                        "width": image_size}),
                               tokenizer, num_query_tokens=num_query)
    return _save(directory, model, processor)


def unigram_tokenizer(extra_special: tuple[str, ...] = ()):
    """A T5-style Unigram tokenizer (Flan-T5): the corpus's words, and characters for the rest.

    Built, not trained, for the reason `wordpiece_tokenizer` gives: words score above characters,
    so the corpus's words stay whole.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    specials = ["<pad>", "</s>", "<unk>", *extra_special]
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    pieces = [(token, 0.0) for token in specials] + [(f"\u2581{word}", -1.0) for word in WORDS]
    pieces += [("\u2581", -2.0)] + [(char, -5.0) for char in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=specials.index("<unk>")))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, additional_special_tokens=list(extra_special))


def build_blip2_t5(directory: Path, seed: int = 0) -> Path:
    """BLIP-2 with a Flan-T5 language model (an encoder-decoder: generate returns only new tokens)."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        T5Config,
    )

    tokenizer = unigram_tokenizer(extra_special=("<image>",))
    t5 = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                  decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    qformer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "encoder_hidden_size": 32, "vocab_size": 64}
    config = Blip2Config(vision_config=_vision(), qformer_config=qformer,
                         text_config=t5.to_dict(), num_query_tokens=4,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer,
                               num_query_tokens=4)
    return _save(directory, model, processor)


BUILDERS = {"blip": build_blip, "git": build_git, "vit-gpt2": build_vit_gpt2,
            "blip2": build_blip2, "blip2-t5": build_blip2_t5}


def _spread(model) -> None:
    """Tiny models at the default init ignore their input; wider weights make captions differ."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(std=0.2)


def _save(directory: Path, model, processor, spread: bool = True) -> Path:
    if spread:
        _spread(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


# Builders for the families of tests/test_families.py (tiny sizes only).

PROMPT_LINES = ["An image of", "Describe this image in detail:", "A short image description:",
                "Describe this image in one sentence.", "What does the image describe?",
                "Question: what is in the picture? Answer:"]


def _byte_level_bpe(specials: list[str]):
    """A byte-level BPE model trained on the corpus and the prompts the families use."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=400, special_tokens=specials,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus() + PROMPT_LINES, trainer)
    return tok


def build_kosmos2(directory: Path, seed: int = 0) -> Path:
    """Kosmos-2 with a sentencepiece-style tokenizer; the processor adds the grounding tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import (
        CLIPImageProcessor,
        Kosmos2Config,
        Kosmos2ForConditionalGeneration,
        Kosmos2Processor,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus() + PROMPT_LINES, BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", model_max_length=512)
    words = len(tokenizer)
    processor = Kosmos2Processor(CLIPImageProcessor(size={"shortest_edge": 32},
                                                    crop_size={"height": 32, "width": 32}),
                                 tokenizer)
    text = {"vocab_size": len(tokenizer), "embed_dim": 32, "layers": 2, "ffn_dim": 64,
            "attention_heads": 2, "max_position_embeddings": 256,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}
    config = Kosmos2Config(text_config=text, vision_config=_vision(),
                           latent_query_num=processor.num_image_tokens)
    torch.manual_seed(seed)
    model = Kosmos2ForConditionalGeneration(config).eval()
    _spread(model)
    with torch.no_grad():
        # zero embeddings (tied to the output layer) keep the processor's grounding tokens from
        # winning most steps of a random model, which would leave the captions empty
        model.get_input_embeddings().weight[words:] = 0
        # normalized image features are small next to token embeddings: louder, so captions
        # follow the photo
        for parameter in model.image_to_text_projection.parameters():
            if parameter.dim() > 1:
                parameter.mul_(3)
    return _save(directory, model, processor, spread=False)  # spread above, then adjusted


def build_florence2(directory: Path, seed: int = 0) -> Path:
    """Florence-2 (DaViT + BART) in transformers' native layout."""
    from transformers import (
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        PreTrainedTokenizerFast,
    )

    tok = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>", "<image>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                        image_token="<image>", model_max_length=512)
    # one stage of stride 4 turns 32x32 pixels into 8x8 tokens; the projector adds a pooled one
    image_processor = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False,
                                         image_seq_length=8 * 8 + 1)
    processor = Florence2Processor(image_processor, tokenizer)
    text = {"model_type": "bart", "vocab_size": len(tokenizer), "d_model": 32,
            "encoder_layers": 1, "decoder_layers": 1, "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
            "max_position_embeddings": 256, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "decoder_start_token_id": tokenizer.eos_token_id,
            "forced_eos_token_id": tokenizer.eos_token_id}
    vision = {"depths": [1], "patch_size": [7], "patch_stride": [4], "patch_padding": [3],
              "patch_prenorm": [False], "embed_dim": [16], "num_heads": [1], "num_groups": [1],
              "window_size": 4, "projection_dim": 32}
    config = Florence2Config(text_config=text, vision_config=vision,
                             image_token_id=tokenizer.image_token_id)
    torch.manual_seed(seed)
    return _save(directory, Florence2ForConditionalGeneration(config).eval(), processor)


def build_instructblip(directory: Path, seed: int = 0) -> Path:
    """InstructBLIP with an OPT language model and a BERT tokenizer for the Q-Former."""
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        OPTConfig,
    )

    tokenizer = bpe_tokenizer(extra_special=("<image>",))
    qformer_tokenizer = wordpiece_tokenizer()
    eos = tokenizer.eos_token_id
    opt = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=128, word_embed_proj_dim=32,
                    bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    qformer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "encoder_hidden_size": 32,
               "vocab_size": len(qformer_tokenizer), "pad_token_id": qformer_tokenizer.pad_token_id}
    config = InstructBlipConfig(vision_config=_vision(), qformer_config=qformer,
                                text_config=opt.to_dict(), num_query_tokens=4,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    processor = InstructBlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}),
                                      tokenizer, qformer_tokenizer, num_query_tokens=4)
    return _save(directory, model, processor)


# A LLaVA-1.5-like template written for the tests: "SYSTEM: ...\nUSER: <image> ...\nASSISTANT:".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{{ message['role'].upper() + ':' }}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{ ' <image>' }}{%- else -%}{{ ' ' + part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def build_llava(directory: Path, seed: int = 0) -> Path:
    """LLaVA-1.5 layout (CLIP vision tower + Llama) with a chat template."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tok = _byte_level_bpe(["<s>", "</s>", "<unk>", "<pad>", "<image>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>",
                                        image_token="<image>", model_max_length=512)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32},
                                         crop_size={"height": 32, "width": 32})
    # 32/8 = 4x4 patches; the CLS token is dropped ("default" strategy): 16 image tokens
    processor = LlavaProcessor(image_processor, tokenizer, patch_size=8,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    text = {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "max_position_embeddings": 256,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}
    config = LlavaConfig(vision_config={"model_type": "clip_vision_model", **_vision()},
                         text_config=text, image_token_index=tokenizer.image_token_id,
                         image_seq_length=16, vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
    torch.manual_seed(seed)
    return _save(directory, LlavaForConditionalGeneration(config).eval(), processor)


# A ChatML template like Qwen2-VL's, written for the tests.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_qwen2_vl(directory: Path, seed: int = 0) -> Path:
    """Qwen2-VL: dynamic resolution, so photos of other shapes get other numbers of image tokens."""
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vision_tokens = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                     "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    tok = _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                           *vision_tokens.values()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", model_max_length=1024,
                                        **vision_tokens)
    # 4-pixel patches merged 2x2, between 16x16 and 48x48 pixels: 4 to 36 image tokens
    sizes = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2,
             "min_pixels": 16 * 16, "max_pixels": 48 * 48}
    processor = Qwen2VLProcessor(Qwen2VLImageProcessor(**sizes), tokenizer,
                                 Qwen2VLVideoProcessor(**sizes), chat_template=CHATML_TEMPLATE)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 512, "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            # head_dim 16: the rotary half (8) split over time, height and width
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [2, 3, 3]}}
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
              "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2}
    ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(token)
           for name, token in vision_tokens.items()}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    torch.manual_seed(seed)
    return _save(directory, Qwen2VLForConditionalGeneration(config).eval(), processor)


def build_paligemma(directory: Path, seed: int = 0) -> Path:
    """PaliGemma (SigLIP + Gemma): no chat template; the processor puts the image tokens first."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        PreTrainedTokenizerFast,
        SiglipImageProcessor,
    )

    tok = _byte_level_bpe(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        image_token="<image>", model_max_length=512)
    words = len(tokenizer)
    # 32/8 = 4x4 patches, one image token each
    image_processor = SiglipImageProcessor(size={"height": 32, "width": 32}, image_seq_length=16)
    processor = PaliGemmaProcessor(image_processor, tokenizer)  # adds <loc>/<seg> tokens
    text = {"model_type": "gemma", "vocab_size": len(tokenizer), "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 256,
            "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}
    vision = {"model_type": "siglip_vision_model", **_vision(), "projection_dim": 32}
    config = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=32,
                             hidden_size=32, image_token_index=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    _spread(model)
    with torch.no_grad():
        # as for Kosmos-2: keep the 1,152 location and segmentation tokens from crowding out words
        model.get_input_embeddings().weight[words:] = 0
    return _save(directory, model, processor, spread=False)  # spread above, then adjusted


# The CLIP scorer of tests/test_scoring.py and tests/test_gate.py.

CLIP_CONTEXT = 16  # small, so that ordinary captions already overflow the text encoder


def clip_tokenizer():
    """A word-level CLIP-style tokenizer trained from scratch: <|startoftext|> words <|endoftext|>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from captionkit.scoring import PREFIX

    lines = [*corpus(), PREFIX, ". , ; ! ? cup coffee suit"]
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=[bos, eos, "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)),
                                                  (eos, tok.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token=eos, unk_token="<unk>", model_max_length=CLIP_CONTEXT)


def clip_tower_sizes(vocab: int) -> tuple[dict, dict]:
    text = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": CLIP_CONTEXT}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    return text, vision


def build_clip(directory: Path) -> Path:
    """A CLIP model for the CLIPScore tests, saved like a Hub checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    text, vision = clip_tower_sizes(len(tokenizer))
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def build_llama_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama in one GGUF file, laid out as llama.cpp writes SmolLM2: `bpe_tokenizer()`'s
    vocabulary as a "gpt2" tokenizer, the embedding in F32, the blocks' matrices in Q4_1."""
    import json

    import gguf
    import numpy as np

    tokenizer = bpe_tokenizer()
    tokens = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    hidden, ffn, layers, heads = 32, 64, 2, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_types([gguf.TokenType.CONTROL if i == tokenizer.eos_token_id else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    rng = np.random.default_rng(seed)

    def q4_1(name: str, rows: int, cols: int) -> None:
        values = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        quantized = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_1)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q4_1)

    writer.add_tensor("token_embd.weight", (rng.standard_normal((len(tokens), hidden)) * 0.05)
                      .astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for block in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{block}.{norm}.weight", np.ones(hidden, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            q4_1(f"blk.{block}.{name}.weight", hidden, hidden)
        q4_1(f"blk.{block}.ffn_gate.weight", ffn, hidden)
        q4_1(f"blk.{block}.ffn_up.weight", ffn, hidden)
        q4_1(f"blk.{block}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
