"""The captioning loop: bad input, resume, dedupe, batching, error isolation and OOM halving."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captionkit.gate import GateOptions
from captionkit.models.base import Captioner, CaptionerWrapper
from captionkit.options import GenerationOptions
from captionkit.pipeline import Pipeline, RunOptions, default_batch_size

GEN = GenerationOptions(max_new_tokens=6)


@pytest.fixture(scope="module")
def captioner(blip_fp32):
    return blip_fp32


@pytest.fixture
def folder(tmp_path, photo_dir) -> Path:
    """Real photos plus every kind of bad file a crawl turns up."""
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    shutil.copy(images / "coffee.png", images / "coffee copy.png")
    (images / "empty.jpg").write_bytes(b"")
    (images / "notes.jpg").write_text("this is not an image\n")
    data = (images / "rocket.png").read_bytes()
    (images / "cut.png").write_bytes(data[: len(data) // 2])
    return images


def run(captioner, inputs, output_dir, **options):
    return Pipeline(captioner, GEN, RunOptions(output_dir=output_dir, progress=False,
                                               **options)).run([str(i) for i in inputs])


def captions_txt(output_dir: Path) -> dict[str, str]:
    lines = (output_dir / "captions.txt").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines)


def test_bad_files_are_recorded_and_good_ones_captioned(captioner, folder, tmp_path):
    out = tmp_path / "out"
    summary = run(captioner, [folder], out)
    assert summary.done == 9 and summary.duplicates == 1
    assert summary.model_failures == 0, "unreadable files are not the model's failures"
    reasons = dict(summary.failed)
    assert set(reasons) == {"empty.jpg", "notes.jpg", "cut.png"}
    assert "empty" in reasons["empty.jpg"] and "truncated" in reasons["cut.png"]
    captions = captions_txt(out)
    assert len(captions) == 9 and captions["coffee copy.png"] == captions["coffee.png"]
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert {r["image"] for r in records if r["status"] == "failed"} == set(reasons)


def test_rerun_resumes_and_flags_control_retries(captioner, folder, tmp_path):
    out = tmp_path / "out"
    first = run(captioner, [folder], out)
    again = run(captioner, [folder], out)
    assert (again.done, again.skipped, again.failed_earlier) == (0, 9, 3)
    assert captions_txt(out) == captions_txt(out)  # outputs rebuilt from the store
    retried = run(captioner, [folder], out, retry_failed=True)
    assert retried.done == 0 and len(retried.failed) == 3
    (folder / "empty.jpg").write_bytes((folder / "horse.png").read_bytes())
    fixed = run(captioner, [folder], out)
    assert fixed.done == 1, "a changed file is captioned again"
    redo = run(captioner, [folder], out, overwrite=True)
    assert redo.done == first.done + 1
    assert captions_txt(out)["empty.jpg"] == captions_txt(out)["horse.png"]


def test_images_deleted_since_leave_captions_txt_and_take_their_caption_files(captioner, photo_dir,
                                                                              tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    shutil.copytree(photo_dir, images)
    options = {"formats": ("captions.txt", "txt", "jsonl"), "sidecars_beside_images": True}
    run(captioner, [images], out, **options)
    (images / "horse.png").unlink()
    (images / "coins.png").unlink()
    (images / "coins.txt").write_text("notes of mine\n")  # no longer captionkit's: stays
    again = run(captioner, [images], out, **options)
    assert (again.done, again.skipped, again.missing) == (0, 6, ["coins.png", "horse.png"])
    assert set(captions_txt(out)) == {p.name for p in images.glob("*.png")}
    assert not (images / "horse.txt").exists()
    assert (images / "coins.txt").read_text() == "notes of mine\n"
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(records) == 8  # the record of every caption stays
    shutil.copy2(photo_dir / "horse.png", images / "horse.png")  # back again: listed, nothing to caption
    back = run(captioner, [images], out, **options)
    assert (back.done, back.missing) == (0, ["coins.png"]) and "horse.png" in captions_txt(out)
    assert (images / "horse.txt").is_file()


def test_copies_and_caption_files_under_the_output_folder_outlive_their_originals(captioner, photo_dir,
                                                                                  tmp_path):
    images, out, mirrored = tmp_path / "images", tmp_path / "out", tmp_path / "mirrored"
    shutil.copytree(photo_dir, images)
    options = {"formats": ("captions.txt",), "gate": GateOptions(copy_images=True)}
    run(captioner, [images], out, **options)
    run(captioner, [images], mirrored, formats=("captions.txt", "txt"))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".png", ".txt")}
    kept = {p.name: p.read_bytes() for p in mirrored.glob("*.txt")}
    shutil.rmtree(images)  # the user keeps the dataset folder and drops the originals
    images.mkdir()
    shutil.copy2(photo_dir / "horse.png", images / "horse.png")
    again = run(captioner, [images], out, **options)
    assert again.missing == []  # each still has its copy in the output folder
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".png", ".txt")} == before
    elsewhere = run(captioner, [images], mirrored, formats=("captions.txt", "txt"))
    assert len(elsewhere.missing) == 7 and set(captions_txt(mirrored)) == {"horse.png"}
    assert {p.name: p.read_bytes() for p in mirrored.glob("*.txt")} == kept | {
        "captions.txt": (mirrored / "captions.txt").read_bytes()}  # no caption file removed


def test_same_names_in_two_input_folders_get_a_caption_file_each(captioner, photo_dir, tmp_path):
    first, second, out = tmp_path / "A", tmp_path / "B", tmp_path / "out"
    first.mkdir()
    second.mkdir()
    shutil.copy(photo_dir / "horse.png", first / "x.png")
    shutil.copy(photo_dir / "rocket.png", second / "x.png")
    run(captioner, [first], out, formats=("captions.txt", "txt"))
    assert set(captions_txt(out)) == {"x.png"}
    run(captioner, [second], out, formats=("captions.txt", "txt"))  # a second folder, the same store
    captions = captions_txt(out)
    assert set(captions) == {"A/x.png", "B/x.png"}
    assert (out / "A" / "x.txt").read_text() == captions["A/x.png"] + "\n"
    assert (out / "B" / "x.txt").read_text() == captions["B/x.png"] + "\n"


def test_batch_size_does_not_change_captions(captioner, photo_dir, tmp_path):
    run(captioner, [photo_dir], tmp_path / "one", batch_size=1)
    run(captioner, [photo_dir], tmp_path / "many", batch_size=5)
    assert captions_txt(tmp_path / "one") == captions_txt(tmp_path / "many")


def test_generation_options_are_kept_apart_in_the_store(captioner, photo_dir, tmp_path):
    out = tmp_path / "out"
    run(captioner, [photo_dir], out)
    other = Pipeline(captioner, GenerationOptions(max_new_tokens=3),
                     RunOptions(output_dir=out, progress=False)).run([str(photo_dir)])
    assert other.done == 8 and other.skipped == 0


def test_output_folder_inside_the_input_is_not_captioned(captioner, photo_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    out = images / "captions-out"
    out.mkdir()
    shutil.copy(images / "horse.png", out / "copied.png")
    summary = run(captioner, [images], out, recursive=True)
    assert summary.done == 8
    assert "captions-out/copied.png" not in captions_txt(out)


class Flaky(CaptionerWrapper):
    """Wraps a real captioner and fails on solid red images or on batches above a size."""

    def __init__(self, inner, oom_above: int | None = None):
        super().__init__(inner)
        self.oom_above = oom_above
        self.batch_sizes: list[int] = []

    def caption(self, images, options, prompts=None):
        self.batch_sizes.append(len(images))
        if self.oom_above and len(images) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any(image.getextrema() == ((255, 255), (0, 0), (0, 0)) for image in images):
            raise ValueError("solid red images upset this model")
        return self.inner.caption(images, options, prompts)


def test_a_model_error_fails_only_the_image_that_caused_it(captioner, photo_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    from PIL import Image

    Image.new("RGB", (20, 20), "red").save(images / "tiny.png")
    summary = run(Flaky(captioner), [images], tmp_path / "out", batch_size=4)
    assert summary.done == 8 and summary.model_failures == 1
    assert summary.failed == [("tiny.png", "captioning failed: ValueError: solid red images upset "
                                           "this model")]


def test_out_of_memory_halves_the_batch_and_loses_nothing(captioner, photo_dir, tmp_path):
    flaky = Flaky(captioner, oom_above=2)
    summary = run(flaky, [photo_dir], tmp_path / "out", batch_size=8)
    assert summary.done == 8 and not summary.failed
    assert flaky.batch_sizes[:3] == [8, 4, 2] and max(flaky.batch_sizes[2:]) == 2
    run(captioner, [photo_dir], tmp_path / "plain", batch_size=8)
    assert captions_txt(tmp_path / "out") == captions_txt(tmp_path / "plain")


def test_default_batch_size_follows_the_device(captioner):
    # 16 on a CPU; 64 on CUDA, halved on out-of-memory (above) for models too big for it
    assert captioner.device.type == "cpu" and default_batch_size(captioner) == 16
    on_gpu = type("OnGpu", (Captioner,), {"device": torch.device("cuda")})()
    assert default_batch_size(on_gpu) == 64


@pytest.mark.skipif(not shutil.which("taskset"), reason="needs util-linux's taskset")
def test_default_workers_follow_the_cpus_this_process_may_use():
    # under `taskset -c 0` (as under a container's cpuset) one CPU is usable, whatever the machine has
    code = "from captionkit.pipeline import default_workers; print(default_workers())"
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code],
                            capture_output=True, text=True, check=True)
    assert int(pinned.stdout) == 3
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(free.stdout) == min(8, len(os.sched_getaffinity(0)) + 2)


def test_non_utf8_file_names_go_all_the_way_through(captioner, photo_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    odd = images / os.fsdecode(b"caf\xe9.png")
    shutil.copy(photo_dir / "chelsea.png", odd)
    out = tmp_path / "out"
    summary = run(captioner, [images], out, formats=("captions.txt", "jsonl", "csv", "txt"))
    assert summary.done == 1 and not summary.failed
    assert list(captions_txt(out)) == ["caf\ufffd.png"]
    record = json.loads((out / "captions.jsonl").read_text(encoding="utf-8"))
    assert record["status"] == "done" and record["image"] == "caf\ufffd.png"
    assert run(captioner, [images], out).skipped == 1, "resume finds the file by its real bytes"


def test_rows_for_file_names_that_are_not_utf8_name_their_files_exactly(captioner, photo_dir, tmp_path):
    # The path field had `?` for each such byte, and two broken links shared one row of the store.
    images = tmp_path / "images"
    images.mkdir()
    odd = [images / os.fsdecode(name) for name in (b"bad\xfe.png", b"bad\xff.png")]
    links = [images / os.fsdecode(name) for name in (b"gone\xfe.png", b"gone\xff.png")]
    for image, link in zip(odd, links, strict=True):
        shutil.copy(photo_dir / "chelsea.png", image)
        link.symlink_to(images / "nowhere.png")
    out = tmp_path / "out"
    summary = run(captioner, [images], out, formats=("jsonl", "csv"))
    assert summary.done == 2 and summary.duplicates == 1
    assert sorted(summary.failed) == [(f"{images}/gone\ufffd.png", "broken symbolic link")] * 2
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    named = [re.sub(rb"\\x([0-9a-f]{2})", lambda match: bytes([int(match[1], 16)]), r["path"].encode())
             for r in records]
    assert sorted(named) == sorted(map(os.fsencode, odd + links))
    assert sorted(r["image"] for r in records if r["status"] == "failed") == [
        f"{images}/gone\\xfe.png", f"{images}/gone\\xff.png"]  # told apart, as names that clash are
    assert run(captioner, [images], out).skipped == 2


def test_copies_and_caption_files_keep_the_bytes_of_names_that_are_not_utf8(captioner, photo_dir,
                                                                            tmp_path):
    # They were named as the printable name, U+FFFD for each such byte: neither paired with the image.
    images, out = tmp_path / "images", tmp_path / "out"
    images.mkdir()
    odd = images / os.fsdecode(b"caf\xe9.png")
    shutil.copy(photo_dir / "chelsea.png", odd)
    shutil.copy(photo_dir / "coffee.png", images)
    options = {"formats": ("captions.txt", "txt"), "gate": GateOptions(copy_images=True)}
    run(captioner, [images], out, **options)
    assert sorted(name for name in os.listdir(os.fsencode(out)) if not name.startswith(b"captionkit")) == [
        b"caf\xe9.png", b"caf\xe9.txt", b"captions.txt", b"coffee.png", b"coffee.txt"]
    odd.unlink()
    again = run(captioner, [images], out, **options)
    assert again.missing == [] and "caf\ufffd.png" in captions_txt(out), "its copy is found by its bytes"


def test_full_decode_gives_the_model_every_pixel(captioner, photos, tmp_path, monkeypatch):
    from PIL import Image

    big = tmp_path / "big" / "astronaut.jpg"
    big.parent.mkdir()
    photos[0].resize((2048, 2048)).save(big, quality=92)
    seen: list[tuple[int, int]] = []
    caption = captioner.caption

    def spy(images, options, prompts=None):
        seen.extend(image.size for image in images)
        return caption(images, options, prompts)

    monkeypatch.setattr(captioner, "caption", spy)
    run(captioner, [big], tmp_path / "drafted")
    run(captioner, [big], tmp_path / "full", full_decode=True)
    drafted, full = seen
    assert full == (2048, 2048) and captioner.input_size <= min(drafted) < 2048 // 2
    reference = caption([Image.open(big).convert("RGB")], GEN)[0].text
    assert captions_txt(tmp_path / "full") == {"astronaut.jpg": reference}


def test_full_decode_captions_again_only_the_images_it_changes(captioner, photos, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    photos[0].resize((2048, 2048)).save(images / "big.jpg", quality=92)
    # a short side under twice the model's input size: drafted or not, the same pixels
    photos[1].resize((60, 48)).save(images / "small.jpg", quality=92)
    assert 48 < 2 * captioner.input_size <= 2048 // 2
    out = tmp_path / "out"
    run(captioner, [images], out)
    drafted = captions_txt(out)
    full = run(captioner, [images], out, full_decode=True)
    assert (full.done, full.skipped, full.duplicates) == (1, 1, 0)
    reference = captioner.caption([Image.open(images / "big.jpg").convert("RGB")], GEN)[0].text
    assert drafted["big.jpg"] != reference
    assert captions_txt(out) == {"big.jpg": reference, "small.jpg": drafted["small.jpg"]}
    assert run(captioner, [images], out, full_decode=True).skipped == 2
    again = run(captioner, [images], out)
    assert again.skipped == 2 and captions_txt(out) == drafted, "the drafted captions are kept apart"
    redo = run(captioner, [images], out, full_decode=True, overwrite=True)
    assert redo.done == 2 and captions_txt(out)["big.jpg"] == reference


def test_captions_in_another_precision_are_not_reused(captioner, blip_dir, photo_dir, tmp_path):
    from captionkit.models import load
    from captionkit.options import LoadOptions

    bf16 = load(str(blip_dir), LoadOptions(device="cpu", dtype="bfloat16"))
    out = tmp_path / "out"
    run(captioner, [photo_dir], out)
    first, again = run(bf16, [photo_dir], out), run(bf16, [photo_dir], out)
    assert (first.done, first.skipped, again.skipped) == (8, 0, 8)
    assert run(captioner, [photo_dir], out).skipped == 8


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_malloc_recycles_small_frees_and_returns_big_ones():
    # Pipeline.run sets these thresholds: blocks under 16 MiB are reused without new page faults,
    # bigger ones go back to the OS when freed (glibc's defaults keep them after the first big free;
    # returning every block of 1 MiB or more, as captionkit once did, faults on each reuse).
    script = """
import ctypes, resource, sys
from captionkit.device import M_MMAP_THRESHOLD, set_malloc_thresholds
if sys.argv[1] == "tuned":
    assert set_malloc_thresholds()
if sys.argv[1] == "return-all":
    assert ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
first = bytearray(24 << 20); del first
before = faults()
for _ in range(4):
    block = bytearray(8 << 20); del block
recycling_faults = faults() - before
before = rss_mib()
blocks = [bytearray(20 << 20) for _ in range(2)]; del blocks
print(recycling_faults, rss_mib() - before)
"""
    found = {}
    for mode in ("plain", "return-all", "tuned"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                             check=True).stdout.split()
        found[mode] = {"faults": int(out[0]), "retained_mib": int(out[1])}
    pages = (8 << 20) // 4096
    assert found["return-all"]["faults"] >= 4 * pages  # every reuse of the 8 MiB block faults
    assert found["tuned"]["faults"] <= 1.5 * pages  # only its first use does
    assert found["plain"]["retained_mib"] >= 20  # glibc's defaults keep freed 20 MiB blocks
    assert found["tuned"]["retained_mib"] <= 2


def test_a_shell_glob_naming_caption_files_beside_images_skips_them(captioner, photo_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    (images / "coffee.xmp").write_text("<x:xmpmeta/>")  # another tool's companion file
    options = {"sidecars_beside_images": True, "formats": ("txt", "jsonl")}
    first = run(captioner, sorted(images.iterdir()), tmp_path / "out", **options)
    assert first.done == 8 and not first.failed
    again = run(captioner, sorted(images.iterdir()), tmp_path / "out", **options)  # `images/*` again
    assert (again.done, again.skipped, again.failed) == (0, 8, [])
    assert (images / "coffee.txt").is_file() and (images / "coffee.xmp").read_text() == "<x:xmpmeta/>"


def test_a_glob_or_list_does_not_find_our_own_copies_in_the_output_folder(captioner, photo_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(photo_dir, images)
    out = images / "out"
    options = {"gate": GateOptions(copy_images=True)}
    pattern = str(images / "**" / "*.png")
    assert run(captioner, [pattern], out, **options).done == 8
    again = run(captioner, [pattern], out, **options)
    assert (again.done, again.skipped) == (0, 8)
    listed = tmp_path / "list.txt"  # as `find images -name '*.png' > list.txt` writes it
    listed.write_text("\n".join(str(p) for p in sorted(images.rglob("*.png"))) + "\n")
    assert run(captioner, [listed], out, **options).done == 0
    assert len(captions_txt(out)) == 8 and not (out / "out").exists()
    # pointed at the output folder itself, its images are captioned (another model's pass, say)
    assert run(captioner, [out], tmp_path / "second").done == 8
