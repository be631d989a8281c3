"""ClipCap: trained with a tiny GPT-2 built from a config, saved self-contained, served by path."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from captionkit.options import GenerationOptions
from captionkit.train import ClipCapOptions, TrainOptions, synthetic, train

pytest.importorskip("pycocoevalcap")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_gpt2(directory: Path) -> Path:
    """A 2-layer GPT-2 with tests/tiny.py's byte-level BPE tokenizer, saved like a Hub checkpoint."""
    import tiny
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny.bpe_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> synthetic.SyntheticDataset:
    return synthetic.write_dataset(tmp_path_factory.mktemp("scenes"), train=16, test=3, size=64)


def options(scenes, output: Path, **changes) -> TrainOptions:
    settings = {"dataset": "folder", "root": scenes.train, "output": output, "epochs": 2, "batch_size": 8,
                "learning_rate": 1e-3, "progress": False, "val_fraction": 0.25}
    return TrainOptions(**{**settings, **changes})


@pytest.fixture(scope="module")
def mlp_run(scenes, gpt2, tmp_path_factory):
    output = tmp_path_factory.mktemp("clipcap") / "mlp"
    return train(options(scenes, output), ClipCapOptions(lm=str(gpt2), image_size=64, prefix_length=4,
                                                         max_length=16, warmup_steps=2))


def test_mlp_mapper_fine_tunes_the_lm_and_serves_by_path(mlp_run, gpt2, scenes):
    import captionkit

    first, second = mlp_run.history
    assert second["train_loss"] < first["train_loss"]
    best = mlp_run.best
    assert {"config.json", "model.safetensors", "lm"} <= {p.name for p in best.iterdir()}
    original = load_file(str(gpt2 / "model.safetensors"))
    tuned = load_file(str(best / "lm" / "model.safetensors"))
    assert any(not torch.equal(original[k], tuned[k]) for k in original)  # the LM was trained
    model = captionkit.load(str(best), device="cpu")
    image = Image.open(next(scenes.test.glob("*.png"))).convert("RGB")
    predictions = model.captioner.caption([image], GenerationOptions(max_new_tokens=8, num_beams=3,
                                                                     candidates=2, repetition_penalty=1.3))
    assert len(predictions[0].extras["candidates"]) == 2
    assert isinstance(model.caption(image, max_new_tokens=8), str)


def test_transformer_mapper_keeps_the_lm_frozen_and_reports_clipscore(scenes, gpt2, tiny_clip, tmp_path):
    """A CLIP tower as the encoder (saved into the checkpoint) and CLIPScore at validation."""
    import captionkit

    result = train(options(scenes, tmp_path / "run", epochs=1, clip_model=str(tiny_clip)),
                   ClipCapOptions(image_encoder=str(tiny_clip), lm=str(gpt2), mapping="transformer",
                                  prefix_length=4, mapper_layers=1, max_length=16, warmup_steps=0))
    original = load_file(str(gpt2 / "model.safetensors"))
    kept = load_file(str(result.best / "lm" / "model.safetensors"))
    assert all(torch.equal(original[k], kept[k]) for k in original)
    assert (result.best / "encoder" / "config.json").is_file()
    with open(result.output / "metrics.csv", newline="") as file:
        row = next(csv.DictReader(file))
    assert 0 <= float(row["CLIPScore"]) <= 2.5
    model = captionkit.load(str(result.best), device="cpu")
    assert model.captioner.input_size == 32  # the tiny CLIP's
    assert isinstance(model.caption(str(next(scenes.test.glob("*.png"))), max_new_tokens=6), str)


def test_resume_restores_mapper_and_lm(mlp_run, scenes, gpt2):
    """Two more epochs from last/: the run goes on from its step, not from scratch."""
    from captionkit.train import resume_options

    options, model = resume_options(mlp_run.output, epochs=3)
    result = train(options, model)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert result.history[2]["step"] == 3 * result.history[0]["step"]
    assert result.history[2]["train_loss"] < result.history[0]["train_loss"]


def test_a_gguf_lm_trains_and_saves_as_a_plain_checkpoint(scenes, tmp_path):
    """`--lm model.gguf` (SmolLM2's route): the Q4_1 blocks load dequantized to float32, and the saved
    checkpoint holds them as a plain transformers LM that captionkit serves by path."""
    import json

    import tiny
    from transformers import AutoTokenizer

    import captionkit

    gguf = pytest.importorskip("gguf")  # transformers reads GGUF files through it
    path = tiny.build_llama_gguf(tmp_path / "tiny-llama.gguf")
    result = train(options(scenes, tmp_path / "run", epochs=1),
                   ClipCapOptions(lm=str(path), image_size=64, mapping="transformer", prefix_length=4,
                                  mapper_layers=1, max_length=16, warmup_steps=0))
    lm = result.best / "lm"
    config = json.loads((lm / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    saved = load_file(str(lm / "model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    embedding, up = tensors["token_embd.weight"], tensors["blk.1.ffn_up.weight"]
    assert up.tensor_type == gguf.GGMLQuantizationType.Q4_1
    # the LM is frozen under a transformer mapper: what was saved is what the file held
    assert torch.equal(saved["model.embed_tokens.weight"], torch.from_numpy(embedding.data.copy()))
    assert saved["model.layers.1.mlp.up_proj.weight"].dtype == torch.float32
    assert torch.equal(saved["model.layers.1.mlp.up_proj.weight"],
                       torch.from_numpy(gguf.quants.dequantize(up.data, up.tensor_type)))
    text = "two red circles left of a blue square"
    assert AutoTokenizer.from_pretrained(lm)(text).input_ids == tiny.bpe_tokenizer()(text).input_ids
    model = captionkit.load(str(result.best), device="cpu")
    assert isinstance(model.caption(str(next(scenes.test.glob("*.png"))), max_new_tokens=6), str)
