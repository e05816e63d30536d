"""Train the CNN of ``lrpplan demo`` and export it to ``lrpplan/demo/digits.npz``.

Reproducible: the split, the initial weights and the batch order are seeded (``--seed``,
default 0) and training is single-threaded, so the same seed, torch build and machine give the
same file. Needs scikit-learn (the data) at export time only; the demo itself reads the npz.

Run from the repository root (about 10 s on 2 CPU cores)::

    python benchmarks/train_demo_digits.py [--seed 0] [--epochs 12] [--out lrpplan/demo/digits.npz]

It prints the test accuracy on the 450 held-out digits and stores it in the file's ``meta``
(JSON), with the weights (float32, by ``state_dict`` name), all 450 held-out images (uint8,
0..16), their labels, the exported model's predictions and the indices the demo explains: the
first correctly classified test image of each digit in ``SHOWN_CLASSES``, then the
``N_WRONG`` misclassified images the model is most confident about.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import digits  # noqa: E402  (benchmarks/digits.py: data split, model, training)

from lrpplan.demo import INTENSITY_MAX, make_model  # noqa: E402

SHOWN_CLASSES = (0, 2, 3, 4, 6, 7)
N_WRONG = 2


def export(seed: int = 0, epochs: int = 12, out: Path = ROOT / "lrpplan" / "demo" / "digits.npz"
           ) -> float:
    """Train, check, write ``out``; returns the test accuracy."""
    torch.set_num_threads(1)  # one thread: the same float sums on every run
    data = digits.load_data(seed)
    model = make_model()
    # the same architecture and initialisation as benchmarks/digits.make_model
    model.load_state_dict(digits.make_model(seed).state_dict())
    t0 = time.perf_counter()
    acc = digits.train(model, data, epochs=epochs, seed=seed)
    model.eval()
    with torch.no_grad():
        logits = model(data.x_test)
    predicted = logits.argmax(1)
    confidence = logits.softmax(1).max(1).values
    labels = data.y_test
    correct = predicted == labels
    shown = [int(torch.nonzero(correct & (labels == c))[0]) for c in SHOWN_CLASSES]
    wrong = torch.nonzero(~correct).flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True)][:N_WRONG]
    shown += [int(i) for i in wrong]

    raw = torch.round(data.x_test[:, 0] * INTENSITY_MAX)
    assert torch.equal(raw / INTENSITY_MAX, data.x_test[:, 0]), "intensities are not k/16"
    meta = {"seed": seed, "epochs": epochs, "test_accuracy": round(acc, 6),
            "n_test": len(labels), "n_train": len(data.y_train), "torch": torch.__version__,
            "data": "sklearn.datasets.load_digits / 16, stratified 75/25 split, "
                    f"random_state={seed}",
            "script": "benchmarks/train_demo_digits.py"}
    arrays = {f"param.{k}": v.detach().numpy().astype(np.float32)
              for k, v in model.state_dict().items()}
    arrays.update(test_images=raw.numpy().astype(np.uint8),
                  test_labels=labels.numpy().astype(np.int64),
                  test_predicted=predicted.numpy().astype(np.int64),
                  shown=np.array(shown, dtype=np.int64),
                  meta=np.array(json.dumps(meta, sort_keys=True)))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"trained in {time.perf_counter() - t0:.1f} s ({epochs} epochs, seed {seed}): "
          f"test accuracy {acc:.4f} ({int(correct.sum())}/{len(labels)} held-out digits)")
    print(f"shown: {shown} (true {labels[shown].tolist()}, predicted "
          f"{predicted[shown].tolist()})")
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB)")
    return acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--out", type=Path, default=ROOT / "lrpplan" / "demo" / "digits.npz")
    args = p.parse_args(argv)
    export(args.seed, args.epochs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
