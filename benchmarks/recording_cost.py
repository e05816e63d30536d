"""What recording the forward costs (lrpplan.recording, issue 15).

:func:`lrpplan.explain` records the forward pass only for models whose plan reads a value
autograd keeps nowhere; every other model pays nothing. For such a model, this prints the median
wall time of, in one process, interleaved:

``forward``           the model's forward with gradients enabled;
``recorded forward``  the same forward under :class:`lrpplan.recording.ForwardRecording`;
``gradient``          forward + ``torch.autograd.grad`` (the baseline of benchmarks/performance.py);
``replay``            an Explainer's replay of a plan without recorded values;
``recorded replay``   the same replay with the forward recorded (the model marked as needing it);

and the bytes the recording copied on write. Models: the demo CNN (batch 1 and 32) and ResNet-18
at 64x64 (torchvision, when installed), GPT-2 with 4 layers, width 256, 32 tokens (transformers,
when installed). None of them needs recording: the point is the price of turning it on.

Usage::

    python benchmarks/recording_cost.py [--reps 20]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

import lrpplan
from lrpplan import api
from lrpplan.recording import ForwardRecording


def _demo(batch: int):
    from lrpplan.demo import load
    model, digits = load()
    return f"demo CNN, batch {batch}", model.eval(), digits.images[:batch].clone()


def _resnet18(batch: int):
    import torchvision
    torch.manual_seed(0)
    return (f"ResNet-18 64x64, batch {batch}", torchvision.models.resnet18(weights=None).eval(),
            torch.randn(batch, 3, 64, 64))


def _gpt2(batch: int):
    import transformers

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, inputs_embeds):
            return self.m(inputs_embeds=inputs_embeds).logits

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000,
                                  bos_token_id=0, eos_token_id=0, use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return f"GPT-2 4x256, 32 tokens, batch {batch}", Logits(model), torch.randn(batch, 32, 256)


def _median(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, model: torch.nn.Module, x: torch.Tensor, reps: int) -> dict:
    plain = lrpplan.Explainer(model, cache=False)
    plain(x)
    recorded = lrpplan.Explainer(model, cache=False)

    def forward():
        with torch.enable_grad():
            model(x.clone().requires_grad_(True))

    copied = []

    def recorded_forward():
        rec = ForwardRecording()
        with torch.enable_grad(), rec:
            model(x.clone().requires_grad_(True))
        copied.append(rec.copied_bytes)
        rec.clear()

    def gradient():
        xx = x.clone().requires_grad_(True)
        out = model(xx)
        out = out[:, -1] if out.dim() == 3 else out
        torch.autograd.grad(out.max(-1).values.sum(), xx)

    def recorded_replay():
        api._RECORDING_MODELS.add(model)
        try:
            recorded(x)
        finally:
            api._RECORDING_MODELS.discard(model)

    recorded_replay()
    t = {k: _median(f, reps) for k, f in [("forward", forward),
                                          ("recorded forward", recorded_forward),
                                          ("gradient", gradient), ("replay", lambda: plain(x)),
                                          ("recorded replay", recorded_replay)]}
    return {"name": name, **t, "copied": max(copied, default=0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    builders = [lambda: _demo(1), lambda: _demo(32)]
    try:
        import torchvision  # noqa: F401
        builders.append(lambda: _resnet18(1))
    except ImportError:
        pass
    try:
        import transformers  # noqa: F401
        builders.append(lambda: _gpt2(1))
    except ImportError:
        pass
    print("| model | forward ms | recorded forward | gradient ms | replay / gradient "
          "| recorded replay / gradient | copied on write |")
    print("|---|---|---|---|---|---|---|")
    for build in builders:
        r = measure(*build(), reps=args.reps)
        g = r["gradient"]
        print(f"| {r['name']} | {1e3 * r['forward']:.2f} | "
              f"{r['recorded forward'] / r['forward']:.2f}x forward | {1e3 * g:.2f} | "
              f"{r['replay'] / g:.2f} | {r['recorded replay'] / g:.2f} | {r['copied']} B |")


if __name__ == "__main__":
    main()
