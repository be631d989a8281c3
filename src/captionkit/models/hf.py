"""Adapters for the Hugging Face captioning families: BLIP, BLIP-2, InstructBLIP, GIT, ViT-GPT2.

Each adapter differs only in how it builds inputs and which tokens of `generate`'s output are the
caption; batching, device placement and decoding live in `HFCaptioner`.
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

from captionkit import hub
from captionkit.device import pick_device, pick_dtype, quantize_int8
from captionkit.errors import ModelUnavailableError, OptionError
from captionkit.models.base import Caption, Captioner
from captionkit.options import GenerationOptions, LoadOptions
from captionkit.preprocess import FixedSize, gathered


class HFCaptioner(Captioner):
    """A transformers model whose `generate` turns pixel values (and maybe a prompt) into text."""

    model_class: str = ""
    accepts_prompt: bool = True
    default_prompt: str | None = None
    """What an image without a prompt is asked."""
    detail_prompts: dict[str, str] = {}
    """The prompt asking for each --detail level; families without levels leave it empty."""
    pixels_in_threads: bool = False
    """True where `encode` takes model inputs made in the decoding threads (`preprocess`): families
    whose processor turns the image into pixel values alone, at a fixed size."""
    static_cache_steps: bool = False
    """True where `generate` can run the decoder's steps from a static cache (see `capture_steps`)."""

    def __init__(self, path: Path, model_id: str, options: LoadOptions) -> None:
        import transformers

        self.model_id = model_id
        # A local checkpoint (its model id is its path) can be replaced in place, say by a
        # fine-tuning loop saving into it, so its files are part of the store's key. Taken before
        # the weights load: a checkpoint that changes during the load is captioned again next time.
        self.fingerprint = hub.fingerprint(path) if Path(model_id).is_absolute() else ""
        # int8 quantization runs on the CPU from float32 weights, whatever `auto` would pick.
        self.device = torch.device("cpu") if options.quantize else pick_device(options.device)
        self.dtype = torch.float32 if options.quantize else pick_dtype(options.dtype, self.device)
        # Part of the store's key: int8 or half-precision captions are not the float32 model's.
        self.variant = _variant(options, self.dtype)
        self.processor = self.load_processor(path)
        model_cls = getattr(transformers, self.model_class)
        self.model = model_cls.from_pretrained(path, **_weight_kwargs(options, self.device,
                                                                      self.dtype))
        if not (options.load_in_8bit or options.load_in_4bit):
            self.model.to(self.device)
        self.model.eval()
        if options.quantize:
            quantize_int8(self.model)
        self.input_size = _input_size(self.image_processor)
        self._check_tokenizer(path)
        self.preprocess = FixedSize.of(self.image_processor) if self.pixels_in_threads else None
        """How the decoding threads make this model's pixel values; None: `encode` makes them."""
        self._prompt_inputs = functools.lru_cache(maxsize=64)(self._inputs_beside_pixels)
        self.captured_steps = False
        """Whether `generate` runs from a static cache, compiled into CUDA graphs."""
        if options.cuda_graphs:
            self.capture_steps()

    def _check_tokenizer(self, path: Path) -> None:
        """Refuse the near-empty tokenizer transformers builds when a checkpoint's tokenizer files
        are missing: it would caption every image with noise, silently."""
        if self.tokenizer is self.processor:
            return
        try:
            vocab = self.model.config.get_text_config(decoder=True).vocab_size
        except AttributeError:
            return
        if vocab and len(self.tokenizer) < vocab // 2:
            raise ModelUnavailableError(
                f"{path}: its tokenizer has {len(self.tokenizer)} tokens for a model of {vocab}: the "
                "tokenizer files (tokenizer.json, vocab.txt, ...) are missing; copy them from the "
                "original checkpoint")

    def load_processor(self, path: Path):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)

    @property
    def image_processor(self):
        return getattr(self.processor, "image_processor", self.processor)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def encode(self, images: list[Image.Image], prompt: str | None) -> dict:
        """Model inputs for a batch sharing one prompt: the pixel values the decoding threads made,
        when every image carries them, else the processor's."""
        pixels = self.pixels_made_in_threads(images)
        if pixels is not None:
            beside = self._prompt_inputs(prompt, tuple(pixels.shape[1:]))
            return {**{key: value.repeat(len(images), *[1] * (value.dim() - 1))
                       for key, value in beside.items()}, "pixel_values": pixels}
        if prompt is None:
            return self.processor(images=images, return_tensors="pt")
        return self.processor(images=images, text=[prompt] * len(images), return_tensors="pt")

    def pixels_made_in_threads(self, images: list[Image.Image]) -> torch.Tensor | None:
        """The batch's pixel values as the decoding threads made them (a view of the stacked
        batch); None when the family makes its own or an image came without them."""
        return gathered(images, self.preprocess) if self.preprocess is not None else None

    def _inputs_beside_pixels(self, prompt: str | None, shape: tuple[int, ...]) -> dict:
        """What the processor gives besides pixel values for one image asked `prompt` (token ids,
        masks, BLIP-2's image tokens): it depends on the prompt alone, so a blank image of the
        pixel values' `shape` stands in."""
        text = None if prompt is None else [prompt]
        inputs = self.processor(images=[torch.zeros(shape)], text=text, do_resize=False, do_rescale=False,
                                do_normalize=False, return_tensors="pt")
        return {key: value for key, value in inputs.items() if key != "pixel_values"}

    def capture_steps(self) -> bool:
        """On CUDA, have `generate` run the decoder's per-token steps from a static cache, which
        transformers compiles with CUDA graphs (torch.compile's "reduce-overhead"): a step is one
        graph launch instead of hundreds of kernel launches. The first batch of each size pays the
        compilation. True when it took effect; elsewhere the eager steps stay."""
        self.captured_steps = self.static_cache_steps and self.device.type == "cuda"
        return self.captured_steps

    def static_steps(self, inputs: dict, options: GenerationOptions) -> dict:
        """`generate`'s arguments for running the decoder's steps from a static cache."""
        return {"cache_implementation": "static"}

    def identity(self) -> dict:
        # static-cache steps may round differently from the eager ones in half precision
        own = super().identity()
        return {**own, "steps": "cuda-graphs"} if self.captured_steps else own

    def instruction(self, prompt: str | None, options: GenerationOptions) -> str | None:
        """The image's own prompt, else the one asking for the --detail level, else the default."""
        if prompt is not None:
            return prompt
        if options.detail is None:
            return self.default_prompt
        if options.detail not in self.detail_prompts:
            levels = ", ".join(self.detail_prompts) or "none"
            raise OptionError(f"{self.model_id} has no --detail {options.detail} "
                              f"(its levels: {levels})")
        return self.detail_prompts[options.detail]

    def prompt_for(self, prompt: str | None, options: GenerationOptions) -> str | None:
        """The text the model is given; chat models override this to apply their template."""
        if options.system is not None or options.language is not None:
            raise OptionError(f"{self.model_id}: --system and --language need a chat model "
                              "(an image-text-to-text VLM such as qwen2-vl-2b)")
        return self.instruction(prompt, options)

    def new_tokens(self, output: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The part of `generate`'s output that is the answer (decoder-only models echo inputs)."""
        return output

    def caption(self, images: list[Image.Image], options: GenerationOptions,
                prompts: list[str | None] | None = None) -> list[Caption]:
        """Caption a batch; images asked different prompts share a `generate` call when they can."""
        prompts = prompts or [options.prompt] * len(images)
        if not self.accepts_prompt and any(p is not None for p in prompts):
            raise OptionError(f"{self.model_id} does not take a text prompt: drop --prompt")
        asked = {prompt: self.prompt_for(prompt, options) for prompt in set(prompts)}
        texts: list[list[str]] = [[]] * len(images)
        for indices, inputs in self.batched_inputs(images, [asked[p] for p in prompts]):
            for index, found in zip(indices, self._generate(inputs, options), strict=True):
                texts[index] = found
        return [Caption(found[0], {"candidates": [{"text": text} for text in found]}
                        if len(found) > 1 else {}) for found in texts]

    def batched_inputs(self, images: list[Image.Image],
                       prompts: list[str | None]) -> list[tuple[list[int], dict]]:
        """(image indices, model inputs) for each `generate` call the batch needs.

        Each prompt's images are encoded together; then prompts whose inputs have the same shapes
        (the same token length) are stacked into one call. Nothing is padded, so every caption is
        the one its image would get alone.
        """
        groups: dict[str | None, list[int]] = defaultdict(list)
        for index, prompt in enumerate(prompts):
            groups[prompt].append(index)
        stacks: dict[object, tuple[list[int], list[dict]]] = {}
        for prompt, indices in groups.items():
            inputs = self.encode([images[i] for i in indices], prompt)
            key = _row_shapes(inputs, len(indices)) or ("alone", prompt)
            stack = stacks.setdefault(key, ([], []))
            stack[0].extend(indices)
            stack[1].append(inputs)
        return [(indices, _stacked(parts)) for indices, parts in stacks.values()]

    def _generate(self, inputs: dict, options: GenerationOptions) -> list[list[str]]:
        """Each input row's `options.candidates` captions, the model's best first."""
        inputs = {key: _to(value, self.device, self.dtype) for key, value in inputs.items()}
        if options.seed is not None:
            torch.manual_seed(options.seed)
        with torch.inference_mode():  # where the static caches are made, and emptied
            steps = self.static_steps(inputs, options) if self.captured_steps else {}
            output = self.model.generate(**inputs, **options.generate_kwargs(), **steps)
        texts = [text.strip() for text in self.tokenizer.batch_decode(
            self.new_tokens(output, inputs), skip_special_tokens=True)]
        # generate returns image-major rows: image i's sequences are rows i*n .. i*n+n-1.
        n = options.candidates
        return [texts[start:start + n] for start in range(0, len(texts), n)]


class BlipCaptioner(HFCaptioner):
    """BLIP: a prompt is the start of the caption, and stays in it."""

    model_class = "BlipForConditionalGeneration"
    pixels_in_threads = True
    static_cache_steps = True

    def __init__(self, path: Path, model_id: str, options: LoadOptions) -> None:
        super().__init__(path, model_id, options)
        _fuse_vision_attention(self.model.vision_model)
        if self.device.type == "cpu":
            _one_image_at_a_time(self.model.vision_model)
        self._step_caches = functools.lru_cache(maxsize=2)(self._new_step_cache)  # full, last batch

    def static_steps(self, inputs: dict, options: GenerationOptions) -> dict:
        """BLIP's decoder keeps the image's cross-attention keys in the cache it is given, beside
        its own, so `cache_implementation="static"` would write them into a cache sized for the
        caption. It gets one static cache of each kind instead, kept per batch shape and emptied
        before each batch, so that its buffers stay where the CUDA graphs read them."""
        prompt = inputs["input_ids"].shape[1] - 1 if "input_ids" in inputs else 1  # less its [SEP]
        shape = (tuple(inputs["pixel_values"].shape), prompt + options.max_new_tokens,
                 options.num_beams, options.candidates, options.do_sample)
        cache = self._step_caches(shape)
        cache.reset()
        return {_cache_argument(self.model.text_decoder): cache}

    def _new_step_cache(self, shape: tuple):
        from transformers import EncoderDecoderCache, StaticCache

        (_, _, height, width), caption_length = shape[0], shape[1]
        patch = self.model.config.vision_config.patch_size
        image_tokens = (height // patch) * (width // patch) + 1  # and the class token
        text = self.model.config.text_config
        return EncoderDecoderCache(StaticCache(config=text, max_cache_len=caption_length),
                                   StaticCache(config=text, max_cache_len=image_tokens))


class Blip2Captioner(HFCaptioner):
    """BLIP-2 with an OPT or Flan-T5 language model; a prompt is a question, not part of the answer."""

    model_class = "Blip2ForConditionalGeneration"
    pixels_in_threads = True
    static_cache_steps = True

    def encode(self, images: list[Image.Image], prompt: str | None) -> dict:
        # A T5 config has no bos token for generate to start the prompt from: give it an empty one.
        if prompt is None and self.model.config.text_config.is_encoder_decoder:
            prompt = ""
        return super().encode(images, prompt)

    def new_tokens(self, output: torch.Tensor, inputs: dict) -> torch.Tensor:
        if self.model.config.text_config.is_encoder_decoder or "input_ids" not in inputs:
            return output
        return output[:, inputs["input_ids"].shape[1]:]


class InstructBlipCaptioner(Blip2Captioner):
    """InstructBLIP: BLIP-2 whose Q-Former also reads the instruction, so it always gets one."""

    model_class = "InstructBlipForConditionalGeneration"
    default_prompt = "A short image description:"
    detail_prompts = {"brief": "A short image description:",
                      "detailed": "Write a detailed description of the image."}


class GitCaptioner(HFCaptioner):
    """GIT: a decoder-only model whose prompt follows the [CLS] token, as in its VQA recipe."""

    model_class = "GitForCausalLM"
    pixels_in_threads = True

    def encode(self, images: list[Image.Image], prompt: str | None) -> dict:
        pixels = self.pixels_made_in_threads(images)
        inputs = ({"pixel_values": pixels} if pixels is not None
                  else dict(self.processor(images=images, return_tensors="pt")))
        if prompt is not None:
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            ids = [self.tokenizer.cls_token_id, *ids]
            inputs["input_ids"] = torch.tensor([ids] * len(images))
        return inputs

    def new_tokens(self, output: torch.Tensor, inputs: dict) -> torch.Tensor:
        return output[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else output


class VisionEncoderDecoderCaptioner(HFCaptioner):
    """An image encoder glued to a text decoder (ViT-GPT2 and kin); no prompt."""

    model_class = "VisionEncoderDecoderModel"
    accepts_prompt = False
    pixels_in_threads = True

    def load_processor(self, path: Path):
        from transformers import AutoImageProcessor, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(path)
        return AutoImageProcessor.from_pretrained(path)

    @property
    def tokenizer(self):
        return self._tokenizer

    def encode(self, images: list[Image.Image], prompt: str | None) -> dict:
        pixels = self.pixels_made_in_threads(images)
        if pixels is None:
            pixels = self.processor(images=images, return_tensors="pt").pixel_values
        return {"pixel_values": pixels}


def _cache_argument(model: torch.nn.Module) -> str:
    """The name `generate` takes a cache under: `cache` in the transformers releases whose models
    take it so, else `past_key_values` (which those still take, with a warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _fuse_vision_attention(vision_model) -> None:
    """Run BLIP's vision attention through torch's fused `scaled_dot_product_attention`.

    transformers runs it eagerly (scores written out, scaled, then softmaxed, one pass each) and
    refuses `attn_implementation="sdpa"` for BLIP; fused, the vision encoder is ~1.4x faster on a
    CPU and float32 results differ only in rounding (benchmarks/RESULTS.md).
    """
    for layer in vision_model.encoder.layers:
        attention = layer.self_attn
        if all(hasattr(attention, name) for name in ("qkv", "projection", "num_heads", "scale")):
            attention.forward = functools.partial(_sdpa_attention, attention)


def _one_image_at_a_time(encoder: torch.nn.Module) -> None:
    """On a CPU, have a vision encoder take a batch's images one at a time.

    BLIP's encoder is compute-bound already at one image, so batching it gains nothing here, while
    a batch's activations (100+ MB tensors) would come fresh from the OS, a page fault per 4 KiB,
    on every call. One image's activations stay under the size glibc recycles
    (`device.set_malloc_thresholds`): BLIP-base captions ~1.06x faster, and every image's features
    are exactly the ones it gets alone.
    """
    forward = encoder.forward

    def one_at_a_time(pixel_values: torch.Tensor, *args, **kwargs):
        if len(pixel_values) == 1:
            return forward(pixel_values, *args, **kwargs)
        return _concatenated([forward(row, *args, **kwargs) for row in pixel_values.split(1)])

    encoder.forward = one_at_a_time


def _concatenated(outputs: list):
    """Per-image encoder outputs (ModelOutputs or tuples) joined back into one batch's."""
    def join(parts: list):
        if isinstance(parts[0], torch.Tensor):
            return torch.cat(parts)
        if isinstance(parts[0], tuple):
            return tuple(join(list(group)) for group in zip(*parts, strict=True))
        return parts[0]  # None

    first = outputs[0]
    if isinstance(first, tuple):
        return join(outputs)
    for key in first:
        first[key] = join([output[key] for output in outputs])
    return first


def _sdpa_attention(attention, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
    batch, length, width = hidden_states.shape
    qkv = attention.qkv(hidden_states).reshape(batch, length, 3, attention.num_heads, -1)
    query, key, value = qkv.permute(2, 0, 3, 1, 4)
    context = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=attention.scale)
    return attention.projection(context.transpose(1, 2).reshape(batch, length, width)), None


def _row_shapes(inputs: dict, rows: int) -> tuple | None:
    """What inputs must share to be stacked: every value a tensor of `rows` rows, these shapes."""
    if not all(isinstance(v, torch.Tensor) and v.dim() and len(v) == rows for v in inputs.values()):
        return None  # e.g. Qwen2-VL's pixel values are patches, not one row per image
    return tuple(sorted((key, tuple(value.shape[1:]), value.dtype) for key, value in inputs.items()))


def _stacked(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def _to(value, device: torch.device, dtype: torch.dtype):
    if not isinstance(value, torch.Tensor):
        return value
    # from page-locked memory the copy is queued without blocking this thread; the cast to the
    # model's dtype then runs on the device, where converting first would run it on the host
    moved = value.to(device, non_blocking=value.is_pinned())
    return moved.to(dtype) if moved.is_floating_point() else moved


def _variant(options: LoadOptions, dtype: torch.dtype) -> str:
    """How the weights run, for the store's key: int8, 8-bit or 4-bit, and the dtype unless float32.

    The effective dtype is named, not `--dtype`: `auto` is bf16 on a GPU and float32 on most CPUs,
    so a store made on one and resumed on the other captions again instead of mixing precisions.
    float32 adds nothing, so a float32 run keeps the key it had before dtypes were part of it and
    stores made with the CPU default still resume. The price: bf16 and fp16 results recorded before
    then have that key too, so a float32 run still takes them (a bf16 run captions them again).
    The hardware is not named: float32 on a GPU and on a CPU differ by kernel rounding, as torch
    versions do.
    """
    quantized = options.quantize or ("bnb-8bit" if options.load_in_8bit else
                                     "bnb-4bit" if options.load_in_4bit else "")
    precision = "" if dtype == torch.float32 else str(dtype).removeprefix("torch.")
    return "+".join(part for part in (quantized, precision) if part)


def _weight_kwargs(options: LoadOptions, device: torch.device, dtype: torch.dtype) -> dict:
    kwargs: dict = {"dtype": dtype}
    if options.load_in_8bit or options.load_in_4bit:
        if device.type != "cuda":
            raise OptionError("--load-in-8bit/--load-in-4bit need a CUDA GPU (bitsandbytes)")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as err:
            raise OptionError("--load-in-8bit/--load-in-4bit need bitsandbytes: "
                              "pip install bitsandbytes") from err
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=options.load_in_8bit,
                                                           load_in_4bit=options.load_in_4bit)
        kwargs["device_map"] = {"": device.index or 0}
    return kwargs


def _input_size(image_processor) -> int | None:
    """The side the processor resizes to, so the decoder can shrink big photos to about that."""
    size = getattr(image_processor, "size", None)
    if size is None:
        return None
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    shortest, longest = get("shortest_edge"), get("longest_edge")
    if shortest and longest and shortest > longest ** 0.5:
        # Qwen2-VL-style processors keep pixel budgets here, not sides: decode to the budget's side
        return int(longest ** 0.5)
    for key in ("shortest_edge", "height", "width"):
        if get(key):
            return int(get(key))
    return None
