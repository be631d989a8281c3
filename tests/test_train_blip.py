"""Fine-tuning the tiny BLIP: validation loss goes down, and the result is a standard checkpoint."""

from __future__ import annotations

import pytest
import torch

from captionkit.train import BlipOptions, TrainOptions, synthetic, train

pytest.importorskip("pycocoevalcap")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    import tiny

    return tiny.build_blip(tmp_path_factory.mktemp("blip"))


def test_blip_fine_tune_lowers_validation_loss_and_reloads(tiny_blip, tmp_path):
    from transformers import BlipForConditionalGeneration

    import captionkit

    scenes = synthetic.write_dataset(tmp_path / "scenes", train=16, test=2, size=64)
    options = TrainOptions(dataset="folder", root=scenes.train, output=tmp_path / "run", epochs=3,
                           batch_size=8, learning_rate=1e-3, monitor="loss", progress=False,
                           val_fraction=0.25)
    # 48 px, not the tiny model's 32: the position embeddings are interpolated and saved that way
    result = train(options, BlipOptions(model=str(tiny_blip), image_size=48, warmup_steps=2))
    losses = [row["val_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    assert result.best_epoch == 1 + losses.index(min(losses))
    plain = BlipForConditionalGeneration.from_pretrained(result.best)  # a standard checkpoint
    assert plain.config.vision_config.image_size == 48
    assert plain.vision_model.embeddings.position_embedding.shape[1] == (48 // 8) ** 2 + 1
    model = captionkit.load(str(result.best), device="cpu", dtype="float32")
    assert model.captioner.input_size == 48
    text = model.caption(str(next(scenes.test.glob("*.png"))), max_new_tokens=6)
    assert isinstance(text, str)
    with torch.no_grad():  # the weights changed from the starting checkpoint's
        start = BlipForConditionalGeneration.from_pretrained(tiny_blip)
        assert not torch.equal(start.text_decoder.cls.predictions.decoder.weight,
                               plain.text_decoder.cls.predictions.decoder.weight)


def test_blip2_trains_lora_adapters_merges_them_and_resumes(tmp_path, monkeypatch):
    import tiny
    from safetensors.torch import load_file
    from transformers import Blip2ForConditionalGeneration

    import captionkit
    from captionkit.train import resume_options

    start = tiny.build_blip2(tmp_path / "blip2")
    scenes = synthetic.write_dataset(tmp_path / "scenes", train=12, test=2, size=64)

    def run(output, epochs, **changes):
        options = TrainOptions(dataset="folder", root=scenes.train, output=output, epochs=epochs,
                               batch_size=6, learning_rate=5e-3, monitor="loss", progress=False,
                               val_fraction=0.25, **changes)
        return train(options, BlipOptions(model=str(start), augment=False, warmup_steps=0, lora_rank=4))

    straight = run(tmp_path / "straight", 2)
    assert straight.history[-1]["val_loss"] < straight.history[0]["val_loss"]
    before = load_file(str(start / "model.safetensors"))
    after = load_file(str(straight.last / "model.safetensors"))
    assert before.keys() == after.keys()  # merged: the plain model's names, no adapter weights
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("q_proj.weight" in k or "v_proj.weight" in k for k in changed)
    assert (straight.last / "lora" / "adapter_model.safetensors").is_file()
    Blip2ForConditionalGeneration.from_pretrained(straight.best)  # a standard checkpoint
    model = captionkit.load(str(straight.best), device="cpu", dtype="float32")
    assert isinstance(model.caption(str(next(scenes.test.glob("*.png"))), max_new_tokens=5), str)

    from captionkit.train import loop

    def interrupt(run):  # Ctrl-C right after epoch 1's checkpoint
        checkpoint(run)
        raise KeyboardInterrupt

    checkpoint = loop._checkpoint
    monkeypatch.setattr(loop, "_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", 2)
    monkeypatch.setattr(loop, "_checkpoint", checkpoint)
    options, arch = resume_options(tmp_path / "stopped")
    resumed = train(options, arch)
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in straight.history]
    again = load_file(str(resumed.last / "model.safetensors"))
    assert all(torch.equal(after[k], again[k]) for k in after)
