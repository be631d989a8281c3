"""Full-size captioning architectures with random weights, saved like Hub checkpoints.

Speed does not depend on weight values, but two things about them matter to a benchmark: every
weight is drawn at a trained model's scale (BLIP's default vision init of 1e-10 drives activations
into float32 denormals, which are ~10x slower to multiply), and the tokenizer covers the whole
vocabulary, so every generated token decodes to a word and captions can be compared as text.
`--quick` runs use the tiny models of `tests/tiny.py` instead.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
INIT_STD = 0.02
CONSONANTS = "bdfghklmnprstvz"
VOWELS = "aeiou"

# The released checkpoints whose architectures (numbers from their configs) these reproduce.
FULL = {
    "blip-base": "Salesforce/blip-image-captioning-base",
    "blip-large": "Salesforce/blip-image-captioning-large",
    "git-base": "microsoft/git-base-coco",
    "vit-gpt2": "nlpconnect/vit-gpt2-image-captioning",
    "blip2-opt-2.7b": "Salesforce/blip2-opt-2.7b",
}
TINY = {"blip-base": "blip", "blip-large": "blip", "git-base": "git", "vit-gpt2": "vit-gpt2",
        "blip2-opt-2.7b": "blip2"}
VIT_BASE = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "patch_size": 16}
VIT_LARGE = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
             "num_attention_heads": 16, "patch_size": 16}


def words(count: int) -> list[str]:
    """`count` distinct pronounceable words ("ba", "be", ..., "baba", ...), deterministic."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    out: list[str] = []
    for length in itertools.count(1):
        for parts in itertools.product(syllables, repeat=length):
            out.append("".join(parts))
            if len(out) == count:
                return out
    return out


def wordpiece_tokenizer(vocab_size: int):
    """A BERT-style tokenizer whose `vocab_size` ids are all whole words (BLIP, GIT)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {token: index for index, token in
             enumerate(specials + words(vocab_size - len(specials)))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]",
                             pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                             bos_token="[DEC]", model_max_length=512)


def bpe_tokenizer(vocab_size: int, extra_special: tuple[str, ...] = ()):
    """A GPT-2-style byte-level tokenizer whose ids beyond the bytes are whole words (GPT-2, OPT)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    base = ["<|endoftext|>", *extra_special, *alphabet]
    # "Ġ" is byte-level BPE's space, so each word token decodes with a space before it.
    vocab = {token: index for index, token in
             enumerate(base + ["Ġ" + w for w in words(vocab_size - len(base))])}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                             model_max_length=512)
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special)})
    return fast


def build(name: str, directory: Path, quick: bool = False) -> Path:
    """The checkpoint for `name` in `directory`, built once (full size unless `quick`)."""
    if (directory / "config.json").is_file():
        return directory
    if quick:
        sys.path.insert(0, str(TESTS))
        import tiny

        return tiny.BUILDERS[TINY[name]](directory)
    builders = {"blip-base": _blip, "blip-large": _blip, "git-base": _git, "vit-gpt2": _vit_gpt2,
                "blip2-opt-2.7b": _blip2}
    torch.manual_seed(0)
    model, processor = builders[name](name)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    for part in processor:
        part.save_pretrained(directory)
    return directory


def _blip(name: str):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = wordpiece_tokenizer(30524)
    vision = {**(VIT_LARGE if name == "blip-large" else VIT_BASE), "image_size": 384,
              "initializer_range": INIT_STD}
    text = {"vocab_size": 30524, "num_attention_heads": 12, "encoder_hidden_size": vision["hidden_size"],
            "bos_token_id": tokenizer.bos_token_id, "sep_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id, "initializer_range": INIT_STD}
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).eval()
    image_processor = BlipImageProcessor(size={"height": 384, "width": 384})
    return model, [BlipProcessor(image_processor, tokenizer)]


def _git(name: str):
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    tokenizer = wordpiece_tokenizer(30522)
    config = GitConfig(vision_config={**VIT_BASE, "image_size": 224}, vocab_size=30522,
                       num_hidden_layers=6, bos_token_id=tokenizer.cls_token_id,
                       eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GitForCausalLM(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 224},
                                         crop_size={"height": 224, "width": 224})
    return model, [GitProcessor(image_processor, tokenizer)]


def _vit_gpt2(name: str):
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tokenizer = bpe_tokenizer(50257)
    eos = tokenizer.eos_token_id
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(**VIT_BASE, image_size=224), GPT2Config(bos_token_id=eos, eos_token_id=eos))
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = eos
    model = VisionEncoderDecoderModel(config).eval()
    generation = model.generation_config
    generation.decoder_start_token_id = generation.pad_token_id = generation.eos_token_id = eos
    return model, [tokenizer, ViTImageProcessor(size={"height": 224, "width": 224})]


def _blip2(name: str):
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
    )

    tokenizer = bpe_tokenizer(50272, extra_special=("<image>",))
    eos = tokenizer.eos_token_id
    vision = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39,
              "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
              "initializer_range": INIT_STD}
    opt = OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                    vocab_size=50272, word_embed_proj_dim=2560, bos_token_id=eos, eos_token_id=eos,
                    pad_token_id=eos)
    config = Blip2Config(vision_config=vision, text_config=opt.to_dict(), num_query_tokens=32,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    # 3.7B parameters: built in bfloat16, on the GPU when there is one (random init of 3.7B
    # weights takes minutes on a CPU, seconds on a GPU).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Blip2ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    image_processor = BlipImageProcessor(size={"height": 224, "width": 224})
    return model, [Blip2Processor(image_processor, tokenizer, num_query_tokens=32)]
