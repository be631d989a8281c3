"""Training learns: a small CNN-LSTM beats the nearest-neighbour baseline on held-out scenes.

The full-size comparison (CNN-LSTM and ClipCap, 1500 training scenes) is benchmarks/train.py; its
figures are in docs/training.md and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import pytest
import torch

from captionkit.train import CnnLstmOptions, TrainOptions, synthetic, train

pytest.importorskip("pycocoevalcap")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.slow  # 20 s on a quiet 2-core machine, minutes on a busy one
def test_cnn_lstm_beats_nearest_neighbour_retrieval(tmp_path):
    import captionkit
    from captionkit.train.data import load_folder, load_splits
    from captionkit.train.encoders import build_encoder
    from captionkit.train.retrieval import nearest_captions
    from captionkit.train.validation import score

    data = synthetic.write_dataset(tmp_path / "scenes", train=300, test=40, size=64)
    options = TrainOptions(dataset="folder", root=data.train, output=tmp_path / "run", epochs=10,
                           batch_size=32, learning_rate=3e-3, progress=False, patience=None,
                           max_val_images=40)
    result = train(options, CnnLstmOptions(image_size=64, embed_dim=64, attention_dim=64, hidden_dim=128,
                                           dropout=0.1, min_word_count=1))
    test = load_folder(data.test)
    model = captionkit.load(str(result.best), device="cpu")
    trained = score(dict(zip([e.name for e in test], model.caption([str(e.path) for e in test]),
                             strict=True)), test)
    splits = load_splits(options)  # the same seeded split the run trained on
    nearest = score(nearest_captions(build_encoder("efficientnet-lite0", 64), splits.train, test,
                                     tmp_path / "run" / "cache", torch.device("cpu"),
                                     cached_with=splits.train + splits.val), test)
    assert trained["BLEU-4"] > nearest["BLEU-4"]
    assert trained["CIDEr-D"] > nearest["CIDEr-D"]
