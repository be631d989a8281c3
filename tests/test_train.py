"""captionkit.train: the synthetic dataset, the data reader, search, checkpoints and a CNN-LSTM trained
end to end, then served by `captionkit.load(path)` and `captionkit caption --model path`."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import captionkit
from captionkit import flags
from captionkit.errors import ModelNotFoundError, ModelUnavailableError, OptionError
from captionkit.options import GenerationOptions
from captionkit.train import (
    BlipOptions,
    ClipCapOptions,
    CnnLstmOptions,
    TrainOptions,
    checkpoint,
    decoding,
    synthetic,
    train,
)
from captionkit.train.data import load_splits
from captionkit.train.vocab import Vocabulary

pytest.importorskip("pycocoevalcap")


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small enough for a loaded 2-core machine: a 2x2 EfficientNet map and a 32-unit LSTM.
TINY = CnnLstmOptions(image_size=64, embed_dim=16, attention_dim=16, hidden_dim=32, min_word_count=1,
                      dropout=0.0)


def tiny_options(root: Path, output: Path, **changes) -> TrainOptions:
    settings = {"dataset": "folder", "root": root, "output": output, "epochs": 2, "batch_size": 16,
                "learning_rate": 3e-3, "progress": False, "val_fraction": 0.25, "seed": 0}
    return TrainOptions(**{**settings, **changes})


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> synthetic.SyntheticDataset:
    return synthetic.write_dataset(tmp_path_factory.mktemp("scenes"), train=24, test=6, size=64)


@pytest.fixture(scope="module")
def trained(scenes, tmp_path_factory):
    """A CNN-LSTM trained two epochs on the synthetic scenes (shared by the serving tests)."""
    output = tmp_path_factory.mktemp("run") / "lstm"
    return train(tiny_options(scenes.train, output), TINY)


# The synthetic dataset.

def test_scene_pixels_match_their_caption():
    """Each group's shapes are drawn in its colour, in its half, as many as the caption says."""
    from scipy import ndimage

    scene = synthetic.Scene((synthetic.Group(2, "red", "circle"), synthetic.Group(3, "blue", "square")),
                            "horizontal")
    image = np.asarray(synthetic.render(scene, __import__("random").Random(3), size=128)).astype(int)
    assert scene.captions()[0] == "two red circles left of three blue squares"
    for colour, half, count in (("red", slice(0, 64), 2), ("blue", slice(64, 128), 3)):
        target = np.array(synthetic.COLOURS[colour])
        mask = np.abs(image - target).sum(-1) < 60
        assert mask[:, half].sum() == mask.sum() > 0  # all of the colour lies in its half
        assert ndimage.label(mask)[1] == count


def test_dataset_folder_is_the_lora_layout(scenes):
    images = sorted(scenes.train.glob("*.png"))
    assert len(images) == 24 and len(list(scenes.test.glob("*.png"))) == 6
    lines = images[0].with_suffix(".txt").read_text().splitlines()
    assert len(lines) == 3 and all(lines)
    splits = load_splits(tiny_options(scenes.train, scenes.root / "unused"))
    assert len(splits.val) == 6 and len(splits.train) == 18 and not splits.problems
    assert not {e.name for e in splits.val} & {e.name for e in splits.train}
    again = load_splits(tiny_options(scenes.train, scenes.root / "unused"))
    assert [e.name for e in again.val] == [e.name for e in splits.val]  # seeded


# Vocabulary and search.

def test_vocabulary_counts_and_round_trip(tmp_path):
    vocab = Vocabulary.build(["A red circle.", "a red square", "a blue circle"], min_count=2)
    assert vocab.words[4:] == ["a", "circle", "red"]  # "blue" and "square" are seen once
    ids = vocab.encode("a blue circle", max_length=10)
    assert ids == [vocab.start, vocab.index["a"], vocab.unk, vocab.index["circle"], vocab.end]
    assert vocab.decode(ids[1:]) == "a circle"
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").words == vocab.words


class _Toy(torch.nn.Module):
    """A random GRU language model over 5 tokens (0 starts, 1 ends)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.cell = torch.nn.Embedding(5, 8), torch.nn.GRUCell(8, 8)
        self.out = torch.nn.Linear(8, 5)
        with torch.no_grad():
            self.out.weight.mul_(4)

    def step(self, tokens, state):
        h = self.cell(self.embed(tokens), state[0])
        return self.out(h), (h,)

    def score(self, sequence: list[int], penalty: float, ends: bool = True) -> float:
        """generate's beam score: log probability / generated length ** penalty (a sequence cut
        at the length limit has no end token)."""
        state, total, last = (torch.zeros(1, 8),), 0.0, 0
        tokens = [*sequence, 1] if ends else sequence
        for token in tokens:
            logits, state = self.step(torch.tensor([last]), state)
            total += torch.log_softmax(logits, -1)[0, token].item()
            last = token
        return total / len(tokens) ** penalty


@pytest.mark.parametrize("penalty", [1.0, 0.0, 2.0])
def test_wide_beam_search_finds_the_best_sequence(penalty):
    """With more beams than sequences, beam search returns the exhaustive search's best."""
    import itertools

    toy = _Toy(seed=int(penalty * 10))
    tokens = decoding.Tokens(start=0, end=1, banned=(0,))
    options = GenerationOptions(max_new_tokens=3, num_beams=40, length_penalty=penalty)
    with torch.no_grad():
        found = decoding.beam_search(toy.step, (torch.zeros(1, 8),), tokens, options)
        ended = [(list(s), True) for n in range(0, 3) for s in itertools.product((2, 3, 4), repeat=n)]
        cut = [(list(s), False) for s in itertools.product((2, 3, 4), repeat=3)]
        best, ends = max(ended + cut, key=lambda c: toy.score(c[0], penalty, c[1]))
    assert found[0][0] == best
    assert found[0][1] == pytest.approx(toy.score(best, penalty, ends), abs=1e-5)


def test_one_beam_is_greedy_and_candidates_differ():
    toy = _Toy(seed=1)
    tokens = decoding.Tokens(start=0, end=1, banned=(0,))
    state = (torch.randn(4, 8),)
    with torch.no_grad():
        greedy = decoding.search(toy.step, state, tokens, GenerationOptions(max_new_tokens=6))
        one_beam = [decoding.beam_search(toy.step, (state[0][i:i + 1],), tokens,
                                         GenerationOptions(max_new_tokens=6))[0][0] for i in range(4)]
        three = decoding.search(toy.step, state, tokens, GenerationOptions(max_new_tokens=6, num_beams=3,
                                                                           candidates=3))
    assert [g[0] for g in greedy] == one_beam
    assert all(len(c) == 3 and len({tuple(s) for s in c}) == 3 for c in three)


def test_repetition_penalty_reaches_the_search():
    toy = _Toy(seed=2)
    tokens = decoding.Tokens(start=0, end=1, banned=(0, 1))  # never ends: only the penalty varies words
    state = (torch.randn(1, 8),)
    with torch.no_grad():
        plain = decoding.search(toy.step, state, tokens, GenerationOptions(max_new_tokens=8))[0][0]
        penalised = decoding.search(toy.step, state, tokens, GenerationOptions(
            max_new_tokens=8, repetition_penalty=50.0))[0][0]
        blocked = decoding.search(toy.step, state, tokens, GenerationOptions(
            max_new_tokens=8, no_repeat_ngram_size=1))[0][0]
    assert len(set(plain[:3])) < 3  # greedy repeats a word early
    assert len(set(penalised[:3])) == len(set(blocked[:3])) == 3


# Checkpoints.

@pytest.mark.parametrize(("folders", "survivor"), [
    ({"last": "1", "last.tmp": "2"}, "1"),   # killed while writing: the old checkpoint stands
    ({"last": "1", "last.new": "2"}, "2"),   # written, not yet swapped in
    ({"last.old": "1", "last.new": "2"}, "2"),  # between the two renames
    ({"last": "2", "last.old": "1"}, "2"),   # swapped, the old one not yet deleted
])
def test_recover_keeps_the_last_complete_checkpoint(tmp_path, folders, survivor):
    """Whatever a kill during a checkpoint swap left, `recover` ends with one complete `last`."""
    for name, epoch in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "epoch").write_text(epoch)
    checkpoint.recover(tmp_path / "last")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert (tmp_path / "last" / "epoch").read_text() == survivor


def test_a_failed_write_leaves_the_checkpoint_alone(tmp_path):
    target = tmp_path / "best"
    with checkpoint.checkpoint_dir(target) as folder:
        (folder / "weights").write_text("good")
    with pytest.raises(OSError), checkpoint.checkpoint_dir(target) as folder:
        (folder / "weights").write_text("half")
        raise OSError(28, "No space left on device")
    assert (target / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


# Training end to end.

def test_training_writes_checkpoints_metrics_and_curves(trained):
    out = trained.output
    assert {"best", "last", "metrics.csv", "curves.png", "train.json", "problems.txt"} <= {
        p.name for p in out.iterdir()}
    with open(out / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(float(r["train_loss"]) > 0 and r["CIDEr-D"] and r["BLEU-4"] and float(r["images_per_s"]) > 0
               for r in rows)
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    with Image.open(out / "curves.png") as curves:
        assert curves.format == "PNG" and curves.width > 500
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["model_type"] == "captionkit-cnn-lstm"
    assert (out / "last" / "trainer_state.pt").is_file()
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.new"))


def test_features_are_cached_once(trained, scenes, tmp_path, monkeypatch):
    """A second run over the same images reads the cached features; the encoder never runs."""
    from captionkit.train import encoders

    cache = trained.output / "cache"
    assert len(list(cache.glob("*.npy"))) == 1
    monkeypatch.setattr(encoders.EfficientNetEncoder, "forward", lambda *a: pytest.fail("encoder ran"))
    result = train(tiny_options(scenes.train, tmp_path / "again", epochs=1, cache_dir=cache), TINY)
    assert result.history[0]["train_loss"] > 0


def test_progress_bar_shows_loss_speed_and_eta(trained, scenes, tmp_path, capsys, monkeypatch):
    """With progress on, each epoch ends with its bar on stderr: batches, running loss, img/s, ETA."""
    monkeypatch.setenv("COLUMNS", "200")  # rich folds a bar that does not fit 80 columns
    options = tiny_options(scenes.train, tmp_path / "shown", epochs=1, progress=True,
                           cache_dir=trained.output / "cache")
    result = train(options, TINY)
    captured = capsys.readouterr()
    bar = next(line for line in captured.err.splitlines() if line.startswith("epoch 1/1"))
    assert re.search(r" (\d+)/\1 ", bar), bar  # every batch done
    assert re.search(r" loss \d+\.\d{3} ", bar) and re.search(r" \d+\.\d img/s ", bar), bar
    assert re.search(r" eta \d+:\d\d:\d\d$", bar.rstrip()), bar
    # the bar's mean over batches, metrics.csv's over images: near, not equal
    assert float(bar.split(" loss ")[1].split()[0]) == pytest.approx(result.history[0]["train_loss"],
                                                                     abs=0.2)
    assert "epoch" not in captured.out


def test_patience_stops_a_real_run_on_bleu(trained, scenes, tmp_path):
    """A rate too small to change a caption leaves BLEU-4 flat: --patience 1 ends the run after
    epoch 2, whose checkpoint is last/ while best/ stays at epoch 1."""
    options = tiny_options(scenes.train, tmp_path / "flat", epochs=5, learning_rate=1e-9, patience=1,
                           monitor="BLEU-4", cache_dir=trained.output / "cache")
    result = train(options, TINY)
    assert result.stopped_early and [row["epoch"] for row in result.history] == [1, 2]
    assert result.best_epoch == 1 and result.best_score == result.history[0]["BLEU-4"]
    assert [row["improved"] for row in result.history] == [True, False]
    with open(result.output / "metrics.csv", newline="") as file:
        assert [r["epoch"] for r in csv.DictReader(file)] == ["1", "2"]
    assert json.loads((result.best / "training.json").read_text())["epoch"] == 1
    assert json.loads((result.last / "training.json").read_text())["epoch"] == 2


def test_trained_model_loads_by_path_and_captions(trained, scenes):
    import captionkit

    model = captionkit.load(str(trained.best), device="cpu")
    assert model.model_id == str(trained.best.resolve())
    image = str(next(scenes.test.glob("*.png")))
    text = model.caption(image, max_new_tokens=5)
    assert isinstance(text, str) and 0 < len(text.split()) <= 5
    predictions = model.captioner.caption([Image.open(image).convert("RGB")], GenerationOptions(
        max_new_tokens=6, num_beams=3, candidates=3, repetition_penalty=1.2, length_penalty=0.5))
    assert len(predictions[0].extras["candidates"]) == 3
    with pytest.raises(OptionError, match="--prompt"):
        model.caption(image, prompt="a photo of")


def test_the_run_folder_points_to_its_checkpoint(trained):
    import captionkit

    with pytest.raises(ModelNotFoundError, match="a training run's folder, not a checkpoint; pass its "
                       f"best checkpoint, {re.escape(str(trained.best))}"):
        captionkit.load(str(trained.output), device="cpu")


def test_a_trained_checkpoint_refuses_quantization(trained):
    import captionkit

    for option in ({"quantize": "int8"}, {"load_in_8bit": True}):
        with pytest.raises(OptionError, match="a CNN-LSTM checkpoint runs in float32; drop --quantize"):
            captionkit.load(str(trained.best), device="cpu", **option)


def test_caption_command_takes_the_checkpoint(trained, scenes, tmp_path):
    out = tmp_path / "captions"
    proc = subprocess.run([sys.executable, "-m", "captionkit", "caption", str(scenes.test), "--model",
                           str(trained.best), "--num-beams", "2", "--repetition-penalty", "1.2",
                           "--output-dir", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = (out / "captions.txt").read_text().splitlines()
    assert len(lines) == 6 and all(": " in line for line in lines)


def test_evaluate_command_takes_the_checkpoint(trained, scenes, tmp_path):
    """`captionkit evaluate --dataset flickr8k --model PATH` on the test scenes in Flickr8k's layout."""
    import shutil

    root = tmp_path / "flickr8k"
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    tokens, names = [], []
    for image in sorted(scenes.test.glob("*.png")):
        shutil.copy(image, root / "Flicker8k_Dataset" / image.name)
        lines = image.with_suffix(".txt").read_text().splitlines()
        tokens += [f"{image.name}#{k}\t{line}" for k, line in enumerate(lines)]
        names.append(image.name)
    (root / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    (root / "Flickr_8k.testImages.txt").write_text("\n".join(names) + "\n")
    proc = subprocess.run([sys.executable, "-m", "captionkit", "evaluate", "--dataset", "flickr8k", "--root",
                           str(root), "--model", str(trained.best), "--metrics", "bleu,cider",
                           "-o", str(tmp_path / "eval"), "--quiet"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["images_scored"] == 6 and {"BLEU-4", "CIDEr-D"} <= set(metrics["corpus"])


def test_bad_data_trains_on_the_rest_and_names_each_problem(scenes, tmp_path):
    import shutil

    root = tmp_path / "messy"
    shutil.copytree(scenes.train, root)
    (root / "train-00000.png").unlink()  # its sidecar names a missing image
    (root / "train-00001.txt").write_text("\n\n")  # empty caption file
    long = " ".join(["word"] * 80)
    (root / "train-00002.txt").write_text(f"a red circle\n{long}\n")
    (root / "train-00003.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    result = train(tiny_options(root, tmp_path / "out", epochs=1), TINY)
    problems = "\n".join(result.problems)
    assert f"{root / 'train-00000.txt'}: no image train-00000.* beside this caption file" in problems
    assert f"{root / 'train-00001.txt'}: empty caption file" in problems
    assert f"{root / 'train-00002.txt'}:2: caption of 80 words" in problems
    assert "train-00003.png" in problems and "image left out" in problems
    assert (tmp_path / "out" / "problems.txt").read_text().count("\n") == len(result.problems)
    assert result.history[0]["train_loss"] > 0


def test_resume_refuses_options_that_change_the_model(trained, scenes):
    from captionkit.train.run import check_resumable

    with pytest.raises(OptionError, match="--batch-size 8 differs from the run's 16"):
        check_resumable(tiny_options(scenes.train, trained.output, batch_size=8, resume=True), TINY)
    check_resumable(tiny_options(scenes.train, trained.output, epochs=5, resume=True), TINY)
    with pytest.raises(OptionError, match="already holds a training run"):
        train(tiny_options(scenes.train, trained.output), TINY)


def test_resnet_weights_come_only_from_the_cache(tmp_path, monkeypatch):
    import torchvision

    from captionkit.train.encoders import build_encoder

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # a hub folder set by an earlier test (torch.hub.set_dir) would hide TORCH_HOME
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(ModelUnavailableError, match="not in torch's cache"):
        build_encoder("resnet18")
    path = tmp_path / "hub" / "checkpoints" / Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    encoder = build_encoder("resnet18", image_size=64)
    features = encoder(encoder.preprocess([Image.new("RGB", (80, 60), "red")]))
    assert features.shape == (1, 4, 512)


HELP_PROBE = """
import sys
from captionkit.cli import main
sys.argv = ["captionkit", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
print("torch" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize("architecture", ["cnn-lstm", "clipcap", "blip"])
def test_command_line_help_comes_from_the_dataclasses(architecture):
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, "train", architecture, "--help"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "False"  # --help waits for no torch
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    text = " ".join(proc.stdout.replace("│", " ").split())  # each help text joined up again
    model_class, panel = {"cnn-lstm": (CnnLstmOptions, "CNN-LSTM"), "clipcap": (ClipCapOptions, "ClipCap"),
                          "blip": (BlipOptions, "BLIP")}[architecture]
    for item in (*flags.declared(TrainOptions), *flags.declared(model_class)):
        assert item.spellings[0].split("/")[0] in text and " ".join(item.flag.help.split()) in text, item.name
    assert "--val-fraction" in text and "held out for validation" in text
    assert "--resume" in text and "Continue the run in DIR" in text
    panels = ["Data", "Training loop", "Validation and checkpoints", panel]
    where = [text.index(f"─ {name} ─") for name in panels]
    assert where == sorted(where)
    if architecture == "cnn-lstm":
        assert "--fine-tune-encoder" in text and "Train the CNN too" in text


def test_every_training_option_has_a_flag_and_python_gets_its_bounds_checked():
    for cls in (TrainOptions, CnnLstmOptions, ClipCapOptions, BlipOptions):
        assert [item.name for item in flags.declared(cls)] == [f.name for f in dataclasses.fields(cls)]
    with pytest.raises(OptionError, match="^--epochs must be at least 1$"):
        TrainOptions(epochs=0)
    with pytest.raises(OptionError, match=r"^--val-fraction must be in \[0, 1\)$"):
        TrainOptions(val_fraction=1.0)
    with pytest.raises(OptionError, match="^--learning-rate must be above 0$"):
        TrainOptions(learning_rate=0.0)
    with pytest.raises(OptionError, match=r"^--lr-factor must be in \(0, 1\)$"):
        CnnLstmOptions(lr_factor=1.0)
    with pytest.raises(OptionError, match="^--warmup-steps must be at least 0$"):
        ClipCapOptions(warmup_steps=-1)
    with pytest.raises(OptionError, match="--mapping 'cnn': choose from mlp, transformer"):
        ClipCapOptions(mapping="cnn")
    assert TrainOptions(max_images=None, patience=None).patience is None  # unset passes any bound
    # 0 is how the command line says "no limit"
    assert (TrainOptions(patience=0).patience, TrainOptions(max_val_images=0).max_val_images) == (None, None)
    with pytest.raises(OptionError, match="^--patience must be at least 0$"):
        TrainOptions(patience=-1)


NEW_FIELD = """    glossiness: float = flag(0.5, "How glossy the LSTM's words are (a test's new option).",
                             panel=CNN_LSTM, min=0)
"""


def test_an_option_added_to_a_dataclass_reaches_the_train_command(tmp_path):
    """One new field in train/options.py and no other edit: `train cnn-lstm` lists it, and takes it."""
    package = tmp_path / "captionkit"
    shutil.copytree(Path(captionkit.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    options = package / "train" / "options.py"
    anchor = "    lr_patience: int = flag("
    assert anchor in options.read_text()
    options.write_text(options.read_text().replace(anchor, NEW_FIELD + anchor, 1))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "COLUMNS": "100"}
    shown = subprocess.run([sys.executable, "-m", "captionkit", "train", "cnn-lstm", "--help"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "--glossiness" in shown.stdout
    assert "How glossy the LSTM's words are (a test's new option)." in " ".join(
        shown.stdout.replace("│", " ").split())
    for value, error in (("-1", "Invalid value for '--glossiness'"), ("0.7", "holds no train.json")):
        taken = subprocess.run([sys.executable, "-m", "captionkit", "train", "cnn-lstm", "--glossiness",
                                value, "--resume", str(tmp_path / "no-run")], env=env,
                               capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert taken.returncode == 2 and error in taken.stderr, taken.stderr


@pytest.mark.parametrize(("args", "error"), [
    (["cnn-lstm", "--dataset", "imagenet"], "error: --dataset 'imagenet': choose from folder, flickr8k"),
    (["clipcap", "--mapping", "cnn"], "error: --mapping 'cnn': choose from mlp, transformer"),
    (["blip", "--dataset", "file"], "error: --dataset file needs --captions FILE"),
    (["cnn-lstm", "--dropout", "1"], "error: --dropout must be in [0, 1)"),
])
def test_bad_options_exit_2_with_one_line(args, error):
    proc = subprocess.run([sys.executable, "-m", "captionkit.train", *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and error in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_takes_the_saved_options_and_only_the_flags_given(trained, scenes):
    proc = subprocess.run([sys.executable, "-m", "captionkit", "train", "clipcap", "--resume",
                           str(trained.output)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "trains cnn-lstm, not clipcap" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "captionkit", "train", "cnn-lstm", "--resume",
                           str(trained.output), "--hidden-dim", "512"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--hidden-dim 512 differs from the run's 32" in proc.stderr, proc.stderr


# The dataset readers behind --dataset.

def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (i * 20 % 256, 80, 160)).save(folder / name)


def test_karpathy_splits_are_kept_and_coco_restval_trains(tmp_path):
    splits = {"train": 4, "restval": 2, "val": 2, "test": 3}
    entries, names = [], []
    for split, count in splits.items():
        for i in range(count):
            name = f"COCO_{split}_{i}.jpg"
            names.append(name)
            entries.append({"filepath": "val2014", "filename": name, "split": split, "cocoid": len(entries),
                            "sentences": [{"raw": f"a {split} picture number {i}"}]})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": entries}))
    _images(tmp_path / "val2014", names)
    loaded = load_splits(TrainOptions(dataset="coco", root=tmp_path))
    assert (len(loaded.train), len(loaded.val), len(loaded.test)) == (6, 2, 3)
    assert {e.name for e in loaded.test} == {f"COCO_test_{i}.jpg" for i in range(3)}
    assert all(e.path.is_file() for e in loaded.train)


def test_flickr8k_lists_give_the_splits(tmp_path):
    names = [f"{1000 + i}_a.jpg" for i in range(8)]
    _images(tmp_path / "Flicker8k_Dataset", names)
    (tmp_path / "Flickr8k.token.txt").write_text(
        "".join(f"{n}#{k}\tA dog number {i} runs .\n" for i, n in enumerate(names) for k in range(2)))
    for split, chosen in (("train", names[:5]), ("dev", names[5:6]), ("test", names[6:])):
        (tmp_path / f"Flickr_8k.{split}Images.txt").write_text("\n".join(chosen) + "\n")
    loaded = load_splits(TrainOptions(dataset="flickr8k", root=tmp_path))
    assert [len(loaded.train), len(loaded.val), len(loaded.test)] == [5, 1, 2]
    assert len(loaded.train[0].captions) == 2


def test_a_csv_file_gets_a_carved_validation_split(tmp_path):
    names = [f"photo{i}.png" for i in range(10)]
    _images(tmp_path / "pics", names)
    rows = "".join(f"{n},a photo of thing {i}\n" for i, n in enumerate(names))
    # line 12 names a missing image; line 13 names a missing image whose name ends another's
    (tmp_path / "captions.csv").write_text("image,caption\n" + rows + "ghost.png,a missing photo\n"
                                           "hoto1.png,another missing photo\n")
    loaded = load_splits(TrainOptions(dataset="file", captions=tmp_path / "captions.csv",
                                      root=tmp_path / "pics", val_fraction=0.2))
    assert (len(loaded.train), len(loaded.val), loaded.test) == (8, 2, [])
    csv_file, pics = tmp_path / "captions.csv", tmp_path / "pics"
    assert f"{csv_file}:12: image {pics / 'ghost.png'} missing" in loaded.problems
    assert f"{csv_file}:13: image {pics / 'hoto1.png'} missing" in loaded.problems


def test_fine_tuned_encoder_is_saved_and_served(scenes, tmp_path):
    """--fine-tune-encoder reads pixels every epoch (through DataLoader workers here) and saves the
    CNN's weights in the checkpoint."""
    from safetensors.torch import load_file

    import captionkit
    from captionkit.train.encoders import EfficientNetEncoder

    model = CnnLstmOptions(**{**TINY.__dict__, "fine_tune_encoder": True, "encoder_learning_rate": 1e-2})
    result = train(tiny_options(scenes.train, tmp_path / "tuned", epochs=1, workers=1), model)
    config = json.loads((result.best / "config.json").read_text())
    assert config["encoder_trained"] is True
    saved = load_file(str(result.best / "model.safetensors"))
    pretrained = EfficientNetEncoder(64).state_dict()
    assert any(not torch.equal(saved[f"encoder.{k}"], v) for k, v in pretrained.items()
               if v.is_floating_point())
    assert not (tmp_path / "tuned" / "cache").exists()  # a trained CNN's features are not cached
    captioner = captionkit.load(str(result.best), device="cpu").captioner
    stem = "net._conv_stem.weight"
    assert torch.equal(captioner.encoder.state_dict()[stem], saved[f"encoder.{stem}"])


def test_plateau_lowers_the_rate_and_patience_stops():
    """ReduceLROnPlateau multiplies the rate by --lr-factor each epoch CIDEr-D stalls (lr patience 0),
    and --patience epochs without a better value end the run."""
    from captionkit.train import loop

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.8, patience=0)
    options = TrainOptions(patience=2)
    state = {"epoch": 0, "best": None, "best_epoch": None, "bad_epochs": 0, "history": []}
    rates = []
    for epoch, cider in enumerate([1.0, 2.0, 1.5, 2.5, 2.4, 2.4, 3.0], start=1):
        loop._update(state, {"epoch": epoch, "CIDEr-D": cider, "val_loss": 0.0}, options, scheduler)
        rates.append(optimizer.param_groups[0]["lr"])
        if loop._patience_spent(state, options):
            break
    assert state["best"] == 2.5 and state["best_epoch"] == 4 and state["epoch"] == 6  # 3.0 never came
    assert rates == pytest.approx([1e-3, 1e-3, 8e-4, 8e-4, 6.4e-4, 5.12e-4])
    assert [row["improved"] for row in state["history"]] == [True, True, False, True, False, False]


def test_the_training_guide_lists_every_option():
    guide = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    for cls in (TrainOptions, CnnLstmOptions, ClipCapOptions, BlipOptions):
        for item in flags.declared(cls):
            assert f"`{item.spellings[0].split('/')[0]}`" in guide, item.name
