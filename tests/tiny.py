"""Random-weight captioning models built from configs, saved like Hub checkpoints.

Tests use the tiny sizes; benchmarks use the same builders with full-size configs (speed does not
depend on weight values). Tokenizers are trained from scratch with `tokenizers`.
"""

from __future__ import annotations

import itertools
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
    """A BERT-style WordPiece tokenizer (BLIP, GIT) trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *extra_special]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(corpus(), WordPieceTrainer(vocab_size=200, special_tokens=specials))
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


def _vision(size: str, image_size: int) -> dict:
    if size == "full":
        return {}
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": image_size, "patch_size": 8}


def _bert_text(size: str, vocab: int) -> dict:
    if size == "full":
        return {"vocab_size": max(vocab, 30524)}
    return {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64}


def build_blip(directory: Path, size: str = "tiny", seed: int = 0) -> Path:
    """BLIP for conditional generation (BLIP-base architecture when size='full')."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    tokenizer = wordpiece_tokenizer(extra_special=("[DEC]",))
    tokenizer.bos_token = "[DEC]"
    image_size = 384 if size == "full" else 32
    text = _bert_text(size, len(tokenizer))
    text.update(bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
                sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = _vision(size, image_size)
    vision["image_size"] = image_size
    config = BlipConfig(text_config=text, vision_config=vision)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(BlipImageProcessor(size={"height": image_size, "width": image_size}),
                              tokenizer)
    return _save(directory, model, processor, size)


def build_git(directory: Path, size: str = "tiny", seed: int = 0) -> Path:
    """GIT (GIT-base architecture when size='full')."""
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = wordpiece_tokenizer()
    image_size = 224 if size == "full" else 32
    vision = _vision(size, image_size)
    vision.update(image_size=image_size, patch_size=16 if size == "full" else 8)
    text = _bert_text(size, len(tokenizer))
    config = GitConfig(vision_config=vision, bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                       **text)
    torch.manual_seed(seed)
    model = GitForCausalLM(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return _save(directory, model, GitProcessor(image_processor, tokenizer), size)


def build_vit_gpt2(directory: Path, size: str = "tiny", seed: int = 0) -> Path:
    """A ViT encoder + GPT-2 decoder (nlpconnect/vit-gpt2 architecture when size='full')."""
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tokenizer = bpe_tokenizer()
    image_size = 224 if size == "full" else 32
    vision = _vision(size, image_size)
    vision.update(image_size=image_size, patch_size=16 if size == "full" else 8)
    decoder = {"vocab_size": max(len(tokenizer), 50257) if size == "full" else len(tokenizer)}
    if size != "full":
        decoder.update(n_embd=32, n_layer=2, n_head=2, n_positions=64)
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
    _spread(model, size)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return directory


def build_blip2(directory: Path, size: str = "tiny", seed: int = 0) -> Path:
    """BLIP-2 with an OPT language model (BLIP-2 OPT-2.7b architecture when size='full')."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
    )

    tokenizer = bpe_tokenizer(extra_special=("<image>",))
    num_query = 32 if size == "full" else 4
    image_size = 224 if size == "full" else 32
    if size == "full":
        vision = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
                  "num_attention_heads": 16, "image_size": 224, "patch_size": 14}
        qformer: dict = {}
        opt = OPTConfig.from_dict({"hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                                   "num_attention_heads": 32, "vocab_size": 50272,
                                   "word_embed_proj_dim": 2560})
    else:
        vision = _vision(size, image_size)
        qformer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "encoder_hidden_size": 32, "vocab_size": 64}
        opt = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64,
                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                        word_embed_proj_dim=32)
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
    return _save(directory, model, processor, size)


def unigram_tokenizer(extra_special: tuple[str, ...] = ()):
    """A T5-style Unigram tokenizer (Flan-T5) trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = UnigramTrainer(vocab_size=150, unk_token="<unk>",
                             special_tokens=["<pad>", "</s>", "<unk>", *extra_special])
    tok.train_from_iterator(corpus(), trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, additional_special_tokens=list(extra_special))


def build_blip2_t5(directory: Path, size: str = "tiny", seed: int = 0) -> Path:
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
    config = Blip2Config(vision_config=_vision(size, 32), qformer_config=qformer,
                         text_config=t5.to_dict(), num_query_tokens=4,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    processor = Blip2Processor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer,
                               num_query_tokens=4)
    return _save(directory, model, processor, size)


BUILDERS = {"blip": build_blip, "git": build_git, "vit-gpt2": build_vit_gpt2,
            "blip2": build_blip2, "blip2-t5": build_blip2_t5}


def _spread(model, size: str) -> None:
    """Tiny models at the default init ignore their input; wider weights make captions differ."""
    if size == "full":
        return
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(std=0.2)


def _save(directory: Path, model, processor, size: str) -> Path:
    _spread(model, size)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
