"""Model inputs made in the decoding threads: bit-identical to the processor's, captions unchanged,
one torch thread per decoding thread, and the nvJPEG path's choices of which files it takes."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import made_in_threads
import pytest
import tiny
import torch
from PIL import Image
from transformers import BlipImageProcessor, CLIPImageProcessor

import captionkit.models.hf as hf
from captionkit import preprocess, sources
from captionkit.execute import Decoding, LocalExecutor, Predictor, WorkItem
from captionkit.models import load
from captionkit.options import GenerationOptions, LoadOptions
from captionkit.pipeline import Pipeline, RunOptions
from captionkit.preprocess import FixedSize

FP32 = LoadOptions(device="cpu", dtype="float32")
GEN = GenerationOptions(max_new_tokens=8)
FAST = ("blip", "blip2", "blip2-t5", "instructblip", "vit-gpt2", "florence2", "git", "kosmos2")
PROMPTS = {"blip": "a picture of", "blip2": "Question: what is this? Answer:",
           "blip2-t5": "Question: what is this? Answer:", "instructblip": "Describe the image.",
           "vit-gpt2": None, "florence2": "<DETAILED_CAPTION>", "git": "what is in the picture?",
           "kosmos2": "<grounding> Describe this image in detail:"}


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    return {**tiny_models, "instructblip": tiny.build_instructblip(tmp_path_factory.mktemp("iblip")),
            "florence2": tiny.build_florence2(tmp_path_factory.mktemp("florence2")),
            "kosmos2": tiny.build_kosmos2(tmp_path_factory.mktemp("kosmos2")),
            "llava": tiny.build_llava(tmp_path_factory.mktemp("llava"))}


@pytest.fixture(scope="module")
def loaded(models):
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load(str(models[family]), FP32)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def shapes(photos) -> list[Image.Image]:
    """Photos as the decoder hands them over: big and small, wide and tall, already at 384."""
    chelsea, astronaut, camera = photos[1], photos[0], photos[4]
    return [chelsea, astronaut.resize((1000, 750)), camera.resize((120, 300)),
            astronaut.resize((384, 384)), camera.convert("L").convert("RGB"), chelsea.resize((41, 17))]


@pytest.fixture
def mixed_folder(tmp_path, photo_dir) -> Path:
    """PNG photos, a big JPEG (drafted by the decoder), a duplicate and a broken file."""
    folder = tmp_path / "images"
    shutil.copytree(photo_dir, folder)
    Image.open(photo_dir / "astronaut.png").resize((1600, 1200)).save(folder / "big.jpg", quality=90)
    shutil.copy(folder / "coffee.png", folder / "coffee again.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.mark.parametrize(("processor", "declared"), [
    (BlipImageProcessor(size={"height": 384, "width": 384}), (384, 384, "bicubic", None)),
    (BlipImageProcessor(size={"height": 32, "width": 32}), (32, 32, "bicubic", None)),
    (CLIPImageProcessor(), (224, 224, "bicubic", 224)),  # GIT's: the shorter side, then the centre
    (CLIPImageProcessor(size={"shortest_edge": 225}, crop_size={"height": 223, "width": 221}),
     (223, 221, "bicubic", 225)),  # odd margins: the crop's offsets truncate
    (CLIPImageProcessor(size={"shortest_edge": 224}, use_square_size=True), (224, 224, "bicubic", None)),
], ids=["blip-384", "blip-32", "git", "odd-crop", "kosmos-2"])
def test_fixed_size_gives_the_processors_pixels_bit_for_bit(shapes, processor, declared):
    spec = FixedSize.of(processor)
    assert spec is not None
    assert (spec.height, spec.width, spec.interpolation, spec.shortest_edge) == declared
    for image in shapes:
        expected = processor(images=[image], return_tensors="pt")["pixel_values"][0]
        made = spec(image)
        assert made.dtype == torch.float32 and made.is_contiguous()
        assert torch.equal(made, expected), image.size


def test_fixed_size_declines_processors_it_does_not_reproduce():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    assert FixedSize.of(CLIPImageProcessor(do_center_crop=False)) is None  # each image its own size
    assert FixedSize.of(CLIPImageProcessor(size={"shortest_edge": 200})) is None  # a crop that pads
    assert FixedSize.of(CLIPImageProcessor(size={"height": 256, "width": 256})) is None  # then 224
    assert FixedSize.of(BlipImageProcessor(do_normalize=False)) is None
    assert FixedSize.of(BlipImageProcessor(resample=1)) is None  # Lanczos
    # Pillow's resize rounds differently from torchvision's: the probe images catch it
    assert FixedSize.of(BlipImageProcessorPil()) is None


def test_families_that_keep_their_processor_declare_nothing(loaded):
    assert loaded("llava").preprocess is None  # a chat VLM: its processor also expands the prompt
    for family in FAST:
        assert isinstance(loaded(family).preprocess, FixedSize)


@pytest.mark.parametrize("family", FAST)
def test_encode_from_attached_pixels_equals_the_processors_inputs(loaded, photos, family):
    captioner = loaded(family)
    images = [image.copy() for image in photos[:3]]
    rows = preprocess.stacked([captioner.preprocess(image) for image in images], pin=False)
    for index, image in enumerate(images):
        preprocess.attach(image, captioner.preprocess, rows, index)
    for prompt in dict.fromkeys((None, PROMPTS[family])):
        fast = captioner.encode(images, prompt)
        fresh = [image.copy() for image in images]  # copies carry the info but are other images
        reference = captioner.encode(fresh, prompt)
        assert fast["pixel_values"].data_ptr() == rows.data_ptr(), "the stacked batch, not a copy"
        assert set(fast) == set(reference), prompt
        for key in reference:
            assert torch.equal(fast[key], reference[key]), (prompt, key)


def test_gathered_takes_consecutive_rows_as_a_view_and_refuses_strangers():
    spec = FixedSize(2, 2, "bicubic", (0.0,) * 3, (1.0,) * 3)
    images = [Image.new("RGB", (4, 4), color) for color in ("red", "green", "blue")]
    rows = torch.arange(3 * 12, dtype=torch.float32).reshape(3, 3, 2, 2)
    for index, image in enumerate(images):
        preprocess.attach(image, spec, rows, index)
    tail = preprocess.gathered(images[1:], spec)
    assert tail.data_ptr() == rows[1].data_ptr() and torch.equal(tail, rows[1:])
    swapped = preprocess.gathered([images[2], images[0]], spec)
    assert torch.equal(swapped, torch.stack([rows[2], rows[0]]))
    other = FixedSize(2, 2, "bilinear", (0.0,) * 3, (1.0,) * 3)
    assert preprocess.gathered(images, other) is None
    # a crop inherits the info dict, but its pixels are not the row's
    assert preprocess.gathered([images[0].crop((0, 0, 2, 2))], spec) is None
    assert preprocess.gathered([*images, Image.new("RGB", (4, 4))], spec) is None


def _thread_ids() -> set[str]:
    """The process's threads now (threads ending meanwhile do not hide new ones, as a count would)."""
    return set(os.listdir("/proc/self/task"))


def _in_thread(work):
    """Run `work` in a fresh thread and return what it returned."""
    answer: list = []
    thread = threading.Thread(target=lambda: answer.append(work()))
    thread.start()
    thread.join()
    return answer[0]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="with one torch thread there is no team")
def test_one_torch_thread_pins_only_the_calling_thread():
    shared = torch.get_num_threads()

    def pinned_then_busy() -> tuple[int, int]:
        preprocess.one_torch_thread()
        before = _thread_ids()
        big = torch.ones(8_000_000)
        for _ in range(5):
            big.mul_(1.0001)  # parallel above torch's grain size: an unpinned thread starts a team
        return torch.get_num_threads(), len(_thread_ids() - before)

    threads, started = _in_thread(pinned_then_busy)
    assert threads == 1 and started == 0
    assert torch.get_num_threads() == shared
    # a thread that first runs torch afterwards gets the process's count, not the pinned one
    assert _in_thread(lambda: (torch.ones(10).sum(), torch.get_num_threads())[1]) == shared

    def unpinned_busy() -> int:
        before = _thread_ids()
        torch.ones(8_000_000).mul_(1.0001)
        return len(_thread_ids() - before)

    assert _in_thread(unpinned_busy) > 0, "the check above would not see a team"


def run(captioner, folder: Path, out: Path, **options):
    return Pipeline(captioner, GEN, RunOptions(output_dir=out, progress=False, **options)).run([str(folder)])


@pytest.mark.parametrize("family", FAST)
def test_captions_are_identical_with_inputs_made_in_the_decoding_threads(loaded, mixed_folder,
                                                                        tmp_path, monkeypatch, family):
    captioner = loaded(family)
    made_in, used = made_in_threads.record(monkeypatch, captioner, hf)
    fast = run(captioner, mixed_folder, tmp_path / "fast", batch_size=3)
    assert made_in == {"captionkit-decode"} and used and all(used)
    monkeypatch.setattr(captioner, "preprocess", None)
    used.clear()
    today = run(captioner, mixed_folder, tmp_path / "today", batch_size=3)
    assert not any(used)
    assert (fast.done, fast.duplicates, len(fast.failed)) == (today.done, today.duplicates, 1) == (10, 1, 1)
    captions = (tmp_path / "fast" / "captions.txt").read_text()
    assert captions == (tmp_path / "today" / "captions.txt").read_text()
    assert len(set(captions.splitlines())) > 5, "random-weight captions that differ per image"


def test_per_image_prompts_share_batches_with_attached_pixels(loaded, photo_dir, tmp_path, monkeypatch):
    captioner = loaded("blip2")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("".join(f"{photo_dir / name},{PROMPTS['blip2'] if i % 2 else 'A photo of'}\n"
                               for i, name in enumerate(sorted(os.listdir(photo_dir)))))
    run(captioner, photo_dir, tmp_path / "fast", batch_size=4, prompt_file=prompts)
    monkeypatch.setattr(captioner, "preprocess", None)
    run(captioner, photo_dir, tmp_path / "today", batch_size=4, prompt_file=prompts)
    fast, today = ([(record["image"], record["prompt"], record["caption"]) for record in
                    map(json.loads, (tmp_path / way / "captions.jsonl").read_text().splitlines())]
                   for way in ("fast", "today"))
    assert fast == today and {prompt for _, prompt, _ in fast} == {"A photo of", PROMPTS["blip2"]}


def test_out_of_memory_halves_batches_already_stacked_once(loaded, photo_dir, tmp_path, monkeypatch):
    """The batch after the one that ran out of memory was stacked meanwhile, at the old size: it
    goes to the model in pieces of the new size, not halved a second time."""
    captioner = loaded("blip")
    sizes: list[int] = []
    generate = captioner._generate

    def small_memory(inputs, options):
        sizes.append(len(inputs["pixel_values"]))
        if sizes[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (pretend)")
        return generate(inputs, options)

    monkeypatch.setattr(captioner, "_generate", small_memory)
    summary = run(captioner, photo_dir, tmp_path / "out", batch_size=4)
    # one failure only; how the rest splits depends on when the stacking thread saw the new size
    assert summary.done == 8 and [size for size in sizes if size > 2] == [4]
    assert sum(size for size in sizes if size <= 2) == 8
    monkeypatch.setattr(captioner, "_generate", generate)
    run(captioner, photo_dir, tmp_path / "plain", batch_size=4)
    assert (tmp_path / "out" / "captions.txt").read_text() == (
        tmp_path / "plain" / "captions.txt").read_text()


def test_stopping_early_ends_the_decoding_and_stacking_threads(loaded, photo_dir):
    captioner = loaded("blip")
    items = [WorkItem(ref) for ref in sources.discover([str(photo_dir)])[0]]
    executor = LocalExecutor(Predictor(captioner, GEN, batch_size=2), Decoding(workers=2), {}, {})
    batches = executor.execute(items)
    first = next(batches)
    assert len(first) == 2 and all(outcome.prediction for outcome in first)
    batches.close()
    deadline = time.monotonic() + 10
    while any(t.name.startswith(("captionkit-decode", "captionkit-stack")) for t in threading.enumerate()):
        assert time.monotonic() < deadline, "threads left running"
        time.sleep(0.05)


def _jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **save)
    return buffer.getvalue()


def test_jpeg_header_sends_only_plain_upright_jpegs_to_nvjpeg(photos):
    photo = photos[1]
    header = preprocess.jpeg_header(_jpeg(photo), sources.DEFAULT_MAX_PIXELS)
    assert header is not None and header.size == photo.size
    assert header.info[sources.FULL_SIZE] == photo.size and header.tile, "not decoded"
    assert preprocess.jpeg_header(_jpeg(photo.convert("L")), sources.DEFAULT_MAX_PIXELS) is not None
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: the CPU path turns it upright
    refused = [_jpeg(photo, exif=exif), _jpeg(photo.convert("CMYK")), b"\xff\xd8\xff garbage"]
    png = io.BytesIO()
    photo.save(png, "PNG")
    refused.append(png.getvalue())
    for data in refused:
        assert preprocess.jpeg_header(data, sources.DEFAULT_MAX_PIXELS) is None
    assert preprocess.jpeg_header(_jpeg(photo), photo.width * photo.height - 1) is None


def test_jpegs_take_the_gpu_path_and_everything_else_falls_back(loaded, photos, tmp_path):
    """The routing, run on the CPU: `from_jpeg` decodes on the device it is given (here the CPU's
    torchvision decoder, on CUDA nvJPEG), other files and failures take `sources.decode`."""
    captioner = loaded("blip")
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "plain.jpg").write_bytes(_jpeg(photos[1]))
    exif = Image.Exif()
    exif[0x0112] = 3
    (folder / "turned.jpg").write_bytes(_jpeg(photos[2], exif=exif))
    photos[3].save(folder / "rocket.png")
    good = _jpeg(photos[0])
    (folder / "cut.jpg").write_bytes(good[: len(good) // 3])  # libjpeg and torchvision both refuse
    executor = LocalExecutor(Predictor(captioner, GEN, batch_size=8), Decoding(gpu_jpeg=True), {}, {})
    assert not executor.gpu_jpeg, "on a CPU model the option is off"
    executor.gpu_jpeg = True
    items = {item.ref.name: executor._load(WorkItem(item.ref))
             for item in (WorkItem(ref) for ref in sources.discover([str(folder)])[0])}
    plain = items["plain.jpg"]
    assert plain.image.tile and plain.pixels, "decoded by from_jpeg, not Pillow"
    assert not any(getattr(items[name].image, "tile", None) for name in ("turned.jpg", "rocket.png"))
    assert items["cut.jpg"].error and not items["cut.jpg"].pixels
    # the two decoders agree to within rounding on this photo
    cpu = captioner.preprocess(sources.decode(good, "x.jpg"))
    device = captioner.preprocess.from_jpeg(good, torch.device("cpu"))
    assert (cpu - device).abs().mean() < 0.05


def test_static_cache_steps_give_the_eager_captions(loaded, photos):
    """The cache transformers compiles into CUDA graphs on a GPU, run eagerly on the CPU."""
    blip2 = loaded("blip2")
    assert not blip2.capture_steps(), "CUDA only"
    eager = blip2.caption(photos[:4], GEN)
    blip2.captured_steps = True
    try:
        assert blip2.caption(photos[:4], GEN) == eager
    finally:
        blip2.captured_steps = False


@pytest.mark.parametrize("generation", [
    GEN, GenerationOptions(max_new_tokens=9, prompt="a photo of"),
    GenerationOptions(max_new_tokens=7, num_beams=3, candidates=2)], ids=["greedy", "prompt", "beams"])
def test_blip_steps_from_its_two_static_caches_give_the_eager_captions(loaded, photos, generation):
    """BLIP keeps the image's keys in a cache of their own; each batch shape gets its caches once,
    and later batches of that shape write into the same buffers."""
    blip = loaded("blip")
    assert not blip.capture_steps(), "CUDA only"
    blip._step_caches.cache_clear()
    eager = [blip.caption(batch, generation) for batch in (photos[:3], photos[3:6], photos[:2])]
    blip.captured_steps = True
    try:
        static = [blip.caption(batch, generation) for batch in (photos[:3], photos[3:6], photos[:2])]
        inputs = blip.encode(photos[:3], generation.prompt)
        with torch.inference_mode():
            first = blip.static_steps(inputs, generation)
            again = blip.static_steps(inputs, generation)
    finally:
        blip.captured_steps = False
    assert static == eager
    (cache,) = first.values()
    assert again == first and cache.cross_attention_cache.layers[0].keys is not None
    assert cache.self_attention_cache.get_seq_length() == 0, "emptied before each batch"
    assert blip._step_caches.cache_info().currsize == 2, "one per batch shape"


def test_gpu_jpeg_and_cuda_graphs_are_run_options_in_the_resume_key(loaded, models, monkeypatch):
    """Both change the pixels or the rounding, so a run with them is kept apart from one without;
    where they do not apply (the CPU, a scorer, a model without the steps) nothing changes."""
    from captionkit.pipeline import run_identity

    blip, blip2 = loaded("blip"), loaded("blip2")
    plain = run_identity(blip, GEN)
    assert run_identity(blip, GEN, gpu_jpeg=True) == plain, "on the CPU nvJPEG does not run"
    monkeypatch.setattr(blip, "device", torch.device("cuda"))
    assert run_identity(blip, GEN, gpu_jpeg=True) == {**plain, "decoder": "nvjpeg"}
    assert "decoder" not in run_identity(blip, GEN, SimpleNamespace(name="clip", scale=2.5), gpu_jpeg=True)
    on_cpu = load(str(models["blip2"]), LoadOptions(device="cpu", dtype="float32", cuda_graphs=True))
    assert not on_cpu.captured_steps and on_cpu.identity() == blip2.identity()
    monkeypatch.setattr(blip2, "captured_steps", True)
    assert blip2.identity() == {**on_cpu.identity(), "steps": "cuda-graphs"}


def test_a_ray_driver_plans_nvjpeg_as_its_workers_do(loaded, models, monkeypatch):
    """Under `--engine ray` the driver keys the run from a worker's report of the model, which
    says whether its preprocessing takes JPEG bytes: the key is the one a worker computes."""
    from captionkit import ray_engine
    from captionkit.pipeline import run_identity

    blip = loaded("blip")
    described = ray_engine._describe(ray_engine.ModelRecipe(str(models["blip"]), FP32))
    assert described["takes_jpeg_bytes"]
    monkeypatch.setattr(blip, "device", torch.device("cuda"))
    remote = ray_engine.RemoteCaptioner({**described, "device": "cuda"})
    assert run_identity(remote, GEN, gpu_jpeg=True) == run_identity(blip, GEN, gpu_jpeg=True)
    assert run_identity(remote, GEN, gpu_jpeg=True)["decoder"] == "nvjpeg"
    objects = ray_engine.RemoteCaptioner({**ray_engine._describe(ray_engine.ModelRecipe("objects")),
                                          "device": "cuda"})
    assert not objects.takes_jpeg_bytes() and "decoder" not in run_identity(objects, GEN, gpu_jpeg=True)


def test_gpu_jpeg_and_cuda_graphs_are_caption_flags():
    from typer.testing import CliRunner

    from captionkit.cli import app

    shown = " ".join(CliRunner().invoke(app, ["caption", "--help"], terminal_width=200).output.split())
    assert "--gpu-jpeg" in shown and "--cuda-graphs" in shown
