"""Fine-tuning the tiny BLIP: validation loss goes down, and the result is a standard checkpoint."""

from __future__ import annotations

import pytest
import torch

from captionkit.train import BlipOptions, TrainOptions, synthetic, train

pytest.importorskip("pycocoevalcap")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a loaded machine more threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
