"""Replay at the cost of a gradient? Ratios for real architectures (issues 5 and 14).

For each model and batch size, in one process, interleaved (one run of every mode per round,
``--reps`` rounds after one warm-up round), the median wall time of:

``forward``       the model's forward with gradients enabled;
``gradient``      forward + ``torch.autograd.grad(score, input)``: the baseline;
``trace``         ``lrpplan.explain(..., cache=False)``: forward, capture, fingerprint, Promise
                  traversal, plan compilation (a first explanation);
``replay``        an ``Explainer`` from its second call on: forward, capture, fingerprint, replay;
``fingerprint``   capture + fingerprint alone on a fresh graph (its forward not timed);
``zennit-egb`` / ``zennit-epf``  Zennit's EpsilonGammaBox / EpsilonPlusFlat attributors
                  (VGG16, ResNet-50; with Zennit's canonizer), where Zennit is installed;
``replay-egb`` / ``replay-epf``  lrpplan's replay with the matching presets, for a like-for-like
                  comparison with Zennit;
``replay-compiled``  with ``--compiled``: an ``Explainer(compile=True)`` from its third call on
                  (the first traces, the second compiles; the compile time is reported apart).

``--kernels`` counts instead of timing, at batch 1: the kernel-launching ATen ops of the
gradient's backward (the forward's counted apart and subtracted) and of a replayed explanation
(its whole call, forward subtracted), with ``benchmarks/kernel_count.py``'s counter. GPT-2 explains
16 tokens there, as in issue 14's table.

``--tiny`` times the tiny-input regime, one thread, where per-step Python overhead dominates as
kernel launches do on a GPU: ResNet-50 and ViT-B/16 at 32×32, GPT-2 at 4 tokens; gradient,
eager replay and compiled replay.

Peak memory is measured in a separate process (one untimed call per mode after a warm-up
call): on CPU the peak of the resident set size above the level before the call, sampled every
0.5 ms, with glibc's mmap threshold pinned to 64 KiB so that freed blocks go back to the system
(that setting slows allocation, which is why timings come from a process without it); on CUDA
``torch.cuda.max_memory_allocated`` above the level before the call.

The explained score is the argmax logit (the last position for language models), summed over
the batch for the gradient. Transformers are fed ``inputs_embeds`` (random-weight models built
from configs, sdpa attention) so that the gradient and lrpplan explain the same float input.

Usage::

    python benchmarks/performance.py                      # every model, CPU batch 1 and 8
    python benchmarks/performance.py --models gpt2,bert --batches 1 --reps 3
    python benchmarks/performance.py --device cuda        # batch 1 and 32
    python benchmarks/performance.py --kernels            # kernels per replay vs per backward
    python benchmarks/performance.py --tiny               # 1 thread, tiny inputs, + compiled
    python benchmarks/performance.py --models resnet50 --batches 1 --compiled

Needs torchvision and transformers (the ``zoo`` extra); Zennit (``compare`` extra) is optional.
Writes ``benchmarks/results/performance.json`` and prints a table of ratios.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import lrpplan
from lrpplan.fingerprint import fingerprint
from lrpplan.graph import capture

RESULTS = Path(__file__).resolve().parent / "results" / "performance.json"


# ---------------------------------------------------------------------------------------------
# models


class EmbedsToLogits(nn.Module):
    """A transformers model fed ``inputs_embeds``; returns its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=embeds).logits


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    make_input: Callable[[nn.Module, int], torch.Tensor]
    zennit_canonizer: Optional[str] = None  # "resnet" / "vgg": Zennit applies


def _image(model: nn.Module, batch: int, size: int = 224) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def _small_image(model: nn.Module, batch: int) -> torch.Tensor:
    return _image(model, batch, size=32)


def _tokens(seq: int) -> Callable[[nn.Module, int], torch.Tensor]:
    def make(model: nn.Module, batch: int) -> torch.Tensor:
        inner = model.model
        vocab = inner.config.vocab_size
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            return inner.get_input_embeddings()(ids).detach()
    return make


def _torchvision(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
        head = getattr(getattr(model, "heads", None), "head", None)
        if head is not None:  # torchvision's ViT starts with a zero head: every logit 0
            nn.init.normal_(head.weight, std=0.02)
        return model
    return build


def _transformers(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as tf
        torch.manual_seed(0)
        if kind == "gpt2":
            cfg = tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024)
            model = tf.GPT2LMHeadModel(cfg)
        elif kind == "bert":
            cfg = tf.BertConfig(num_labels=2)  # BERT-base: 12 layers, width 768, 12 heads
            model = tf.BertForSequenceClassification(cfg)
        elif kind == "llama":
            cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                 num_hidden_layers=16, num_attention_heads=16,
                                 num_key_value_heads=8, max_position_embeddings=1024)
            model = tf.LlamaForCausalLM(cfg)
        else:  # pragma: no cover - table below is the only caller
            raise KeyError(kind)
        model.config._attn_implementation = "sdpa"
        return EmbedsToLogits(model.eval())
    return build


CASES: dict[str, Case] = {
    "resnet50": Case("resnet50", _torchvision("resnet50"), _image, "resnet"),
    "vgg16": Case("vgg16", _torchvision("vgg16"), _image, "vgg"),
    "vit_b_16": Case("vit_b_16", _torchvision("vit_b_16"), _image),
    "gpt2": Case("gpt2", _transformers("gpt2"), _tokens(128)),
    "bert": Case("bert", _transformers("bert"), _tokens(128)),
    "llama": Case("llama", _transformers("llama"), _tokens(512)),
}

INPUT_DESC = {"resnet50": "3x224x224", "vgg16": "3x224x224", "vit_b_16": "3x224x224",
              "gpt2": "128 tokens", "bert": "128 tokens", "llama": "512 tokens"}

#: the models of issue 14's kernel table (GPT-2 at 16 tokens)
KERNEL_CASES: dict[str, Case] = {
    "resnet50": CASES["resnet50"], "vit_b_16": CASES["vit_b_16"],
    "gpt2": Case("gpt2", _transformers("gpt2"), _tokens(16)), "vgg16": CASES["vgg16"],
}
KERNEL_DESC = {"resnet50": "3x224x224", "vit_b_16": "3x224x224", "gpt2": "16 tokens",
               "vgg16": "3x224x224"}

#: the tiny-input regime: per-step overhead dominates, as launches do on a GPU
TINY_CASES: dict[str, Case] = {
    "resnet50": Case("resnet50", _torchvision("resnet50"), _small_image),
    "vit_b_16": Case("vit_b_16", _torchvision("vit_b_16", image_size=32), _small_image),
    "gpt2": Case("gpt2", _transformers("gpt2"), _tokens(4)),
}
TINY_DESC = {"resnet50": "3x32x32", "vit_b_16": "3x32x32", "gpt2": "4 tokens"}


# ---------------------------------------------------------------------------------------------
# measurement


def _score(out: torch.Tensor) -> torch.Tensor:
    logits = out if out.dim() <= 2 else out[:, -1]
    return logits.gather(-1, logits.detach().argmax(-1, keepdim=True)).sum()


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak bytes above the level before ``fn`` (CUDA allocator or sampled RSS), in MiB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], _rss())
    return (peak[0] - base) / 2**20


def modes_for(case: Case, model: nn.Module, x: torch.Tensor, with_zennit: bool,
              compiled: bool = False, traced: bool = True) -> dict[str, Callable[[], Any]]:
    """The measured callables of one model and input, by mode name (``compiled``: also the
    compiled replay; ``traced``: also the traced run and the fingerprint walk)."""
    rules_cfg = lrpplan.RuleSet.preset("epsilon").config()

    def forward() -> None:
        with torch.enable_grad():
            model(x.detach().requires_grad_(True))

    def gradient() -> None:
        with torch.enable_grad():
            h = x.detach().requires_grad_(True)
            torch.autograd.grad(_score(model(h)), h)

    def trace() -> None:
        assert not lrpplan.explain(model, x, cache=False).cached

    explainer = lrpplan.Explainer(model, cache=False)
    explainer(x)

    def replay() -> None:
        assert explainer(x).cached

    def fingerprint_walk() -> float:
        with torch.enable_grad():
            h = x.detach().requires_grad_(True)
            score = _score(model(h))
            t0 = time.perf_counter()
            ge = torch.autograd.graph.get_gradient_edge(score)
            graph = capture([(ge.node, ge.output_nr)])
            fingerprint(graph, [[list(graph.edge_of(h)), "tensor", 0]], rules_cfg)
            return (time.perf_counter() - t0) * 1e3

    modes: dict[str, Callable[[], Any]] = {"forward": forward, "gradient": gradient}
    if traced:
        modes.update({"trace": trace, "replay": replay, "fingerprint": fingerprint_walk})
    else:
        modes["replay"] = replay
    if compiled:
        modes["replay-compiled"] = _compiled_mode(model, x)
    if case.zennit_canonizer and with_zennit:
        modes.update(_zennit_modes(case, model, x))
    return modes


#: seconds the compiled replays' compiles took, by model (reported apart from the timings)
COMPILE_SECONDS: dict[str, list[float]] = {}


def _compiled_mode(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    """An ``Explainer(compile=True)`` past its trace and its compile."""
    explainer = lrpplan.Explainer(model, cache=False, compile=True)
    explainer(x)  # traces
    t0 = time.perf_counter()
    if not explainer(x).cached:  # compiles
        raise RuntimeError("the compiled explainer did not replay")
    COMPILE_SECONDS[type(model).__name__] = [time.perf_counter() - t0]

    def replay_compiled() -> None:
        assert explainer(x).cached
    return replay_compiled


def _zennit_modes(case: Case, model: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    try:
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonGammaBox, EpsilonPlusFlat
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    except ImportError:
        return {}
    canon = {"resnet": ResNetCanonizer, "vgg": VGGCanonizer}[case.zennit_canonizer]
    with torch.no_grad():
        n_out = model(x[:1]).shape[-1]
    modes: dict[str, Callable[[], Any]] = {}
    presets = {"egb": (lambda: EpsilonGammaBox(low=-3.0, high=3.0, canonizers=[canon()]),
                       lrpplan.RuleSet.preset("epsilon-gamma-box", low=-3.0, high=3.0)),
               "epf": (lambda: EpsilonPlusFlat(canonizers=[canon()]),
                       lrpplan.RuleSet.preset("epsilon-plus-flat"))}
    for short, (make_composite, ruleset) in presets.items():
        def zennit_run(make_composite=make_composite) -> None:
            with torch.no_grad():
                target = model(x).argmax(-1)
            one_hot = torch.nn.functional.one_hot(target, n_out).to(x.dtype)
            with Gradient(model=model, composite=make_composite()) as attributor:
                attributor(x, one_hot)

        ex = lrpplan.Explainer(model, rules=ruleset, cache=False)
        ex(x)

        def replay_preset(ex=ex) -> None:
            assert ex(x).cached

        modes[f"zennit-{short}"] = zennit_run
        modes[f"replay-{short}"] = replay_preset
    return modes


def bench(case: Case, batch: int, reps: int, device: torch.device, with_zennit: bool,
          memory: bool, compiled: bool = False, traced: bool = True,
          input_desc: Optional[str] = None) -> dict:
    model = case.build().to(device)
    x = case.make_input(model, batch).to(device)
    modes = modes_for(case, model, x, with_zennit, compiled, traced)
    clock = _Clock(device)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rnd in range(reps + 1):  # round 0 warms up
        for name, fn in modes.items():
            if name == "fingerprint":
                clock.sync()
                t = fn()
            else:
                t = clock.time(fn)
            if rnd:
                times[name].append(t)
    row: dict[str, Any] = {"model": case.name, "input": input_desc or INPUT_DESC[case.name],
                           "batch": batch, "device": device.type, "reps": reps,
                           "threads": torch.get_num_threads()}
    if compiled:
        row["compile_s"] = COMPILE_SECONDS.get(type(model).__name__)
    explanation = lrpplan.explain(model, x, cache=False)
    row["nodes"] = explanation.plan.stats["nodes"]
    row["promises"] = explanation.plan.stats["promises"]
    row["ms"] = {m: statistics.median(t) for m, t in times.items()}
    row["all_ms"] = times
    del explanation, modes, model, x
    gc.collect()
    _give_memory_back()
    if memory:
        row["peak_mib"] = _memory_in_subprocess(case.name, batch, device)
    return row


MEMORY_MODES = ("gradient", "replay", "trace")


def _give_memory_back() -> None:
    """Return freed heap memory to the OS (glibc keeps it otherwise) before the next model."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def _memory_in_subprocess(name: str, batch: int, device: torch.device) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 16))
    cmd = [sys.executable, __file__, "--memory-worker", "--models", name, "--batches",
           str(batch), "--device", str(device), "--threads", str(torch.get_num_threads())]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_worker(name: str, batch: int, device: torch.device) -> dict[str, float]:
    """Peak memory per mode (MiB above the level before the call), one process, no timing."""
    case = CASES[name]
    model = case.build().to(device)
    x = case.make_input(model, batch).to(device)
    modes = modes_for(case, model, x, with_zennit=False)
    out = {}
    for m in MEMORY_MODES:
        modes[m]()  # warm-up: allocator caches, lazy initialisation
        out[m] = peak_memory(modes[m], device)
    return out


def ratios(row: dict) -> dict[str, float]:
    ms, base = row["ms"], row["ms"]["gradient"]
    out = {f"{m}/gradient": v / base for m, v in ms.items() if m not in ("gradient",)}
    if "trace" in ms:
        out["trace/replay"] = ms["trace"] / ms["replay"]
        out["fingerprint/replay"] = ms["fingerprint"] / ms["replay"]
    for short in ("egb", "epf"):
        if f"zennit-{short}" in ms:
            out[f"zennit-{short}/replay-{short}"] = ms[f"zennit-{short}"] / ms[f"replay-{short}"]
            out[f"zennit-{short}/replay"] = ms[f"zennit-{short}"] / ms["replay"]
    if "peak_mib" in row and row["peak_mib"].get("gradient"):
        out["memory replay/gradient"] = row["peak_mib"]["replay"] / row["peak_mib"]["gradient"]
    return out


def kernel_row(case: Case, desc: str) -> dict:
    """Kernel-launching ops (``benchmarks/kernel_count.py``) of the gradient's backward and of a
    replayed explanation, at batch 1, each with its forward's ops subtracted."""
    from kernel_count import count_dispatched

    model = case.build()
    x = case.make_input(model, 1)

    def forward() -> None:
        with torch.enable_grad():
            _score(model(x.detach().requires_grad_(True)))

    def gradient() -> None:
        with torch.enable_grad():
            h = x.detach().requires_grad_(True)
            torch.autograd.grad(_score(model(h)), h)

    explainer = lrpplan.Explainer(model, cache=False)
    # traced under the counter too: a dispatch mode can change which kernels a forward picks
    # (and so the graph), and the counted replay must replay the plan of that graph
    count_dispatched(lambda: explainer(x))

    def replay() -> None:
        assert explainer(x).cached

    fwd, grad, rep = (count_dispatched(f) for f in (forward, gradient, replay))
    n_fwd = sum(fwd.values())
    top = rep.copy()
    top.subtract(fwd)
    return {"model": case.name, "input": desc, "backward": sum(grad.values()) - n_fwd,
            "replay": sum(rep.values()) - n_fwd,
            "top": [[op, n] for op, n in top.most_common(8) if n > 0]}


def kernel_table(rows: list[dict]) -> str:
    """Markdown: kernels per gradient backward and per replay, their ratio, the top ops."""
    lines = ["| model | input | gradient backward | replay | ratio | replay's most frequent ops |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        top = ", ".join(f"{op} {n}" for op, n in r["top"][:6])
        lines.append(f"| {r['model']} | {r['input']} | {r['backward']} | {r['replay']} | "
                     f"{r['replay'] / r['backward']:.2f}x | {top} |")
    return "\n".join(lines)


def tiny_table(rows: list[dict]) -> str:
    """Markdown: the tiny-input regime, gradient vs eager and compiled replay."""
    lines = ["| model | input | threads | gradient | replay (eager) | replay (compiled) "
             "| compile |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ms, q = r["ms"], ratios(r)
        comp = (f"{ms['replay-compiled']:.1f} ms ({q['replay-compiled/gradient']:.2f}x)"
                if "replay-compiled" in ms else "—")
        secs = r.get("compile_s") or []
        lines.append(f"| {r['model']} | {r['input']} | {r['threads']} | {ms['gradient']:.1f} ms "
                     f"| {ms['replay']:.1f} ms ({q['replay/gradient']:.2f}x) | {comp} "
                     f"| {' + '.join(f'{t:.0f} s' for t in secs) or '—'} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """A Markdown table of the rows (the README shows this)."""
    head = ("| model | batch | nodes | gradient | replay | replay compiled | trace "
            "| trace/replay | fingerprint | peak mem replay/grad | Zennit EGB / replay "
            "| Zennit EGB / lrpplan EGB | Zennit EPF / lrpplan EPF |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        q, ms = ratios(r), r["ms"]

        def cell(key: str, fmt: str = "{:.2f}x") -> str:
            return fmt.format(q[key]) if key in q else "—"

        compiled = (f"{ms['replay-compiled']:.0f} ms ({q['replay-compiled/gradient']:.2f}x)"
                    if "replay-compiled" in ms else "—")
        lines.append(
            f"| {r['model']} ({r['input']}) | {r['batch']} | {r['nodes']} "
            f"| {ms['gradient']:.0f} ms | {ms['replay']:.0f} ms ({q['replay/gradient']:.2f}x) "
            f"| {compiled} "
            f"| {ms['trace']:.0f} ms ({q['trace/gradient']:.2f}x) | {q['trace/replay']:.2f} "
            f"| {100 * q['fingerprint/replay']:.1f} % | {cell('memory replay/gradient')} "
            f"| {cell('zennit-egb/replay')} | {cell('zennit-egb/replay-egb')} "
            f"| {cell('zennit-epf/replay-epf')} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(CASES), help="comma list of " + ", ".join(CASES))
    ap.add_argument("--batches", default=None, help="comma list (default: 1,8 CPU; 1,32 CUDA)")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds after one warm-up round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-zennit", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--table", nargs="+", type=Path, metavar="JSON",
                    help="print the Markdown table of earlier result files and exit")
    ap.add_argument("--compiled", action="store_true",
                    help="also time the compiled replay (Explainer(compile=True))")
    ap.add_argument("--kernels", action="store_true",
                    help="count kernels per replay vs per gradient backward instead of timing")
    ap.add_argument("--tiny", action="store_true",
                    help="time the tiny-input regime (1 thread; eager and compiled replay)")
    args = ap.parse_args(argv)
    if args.table:
        docs = [json.loads(f.read_text()) for f in args.table]
        for d in docs:
            e = d["env"]
            print(f"<!-- {e['machine']}, {e['threads']} threads, torch {e['torch']}"
                  + (f", {e['card']}" if e.get("card") else "") + " -->")
            kind = d.get("kind", "timing")
            print({"kernels": kernel_table, "tiny": tiny_table}.get(kind, table)(d["rows"]))
        return
    if args.tiny:
        args.threads = args.threads or 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = [int(b) for b in (args.batches or ("1,32" if device.type == "cuda" else "1,8"))
               .split(",")]
    if args.memory_worker:
        print(json.dumps(memory_worker(args.models, batches[0], device)))
        return
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "machine": machine(), "threads": torch.get_num_threads(),
           "card": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print(f"torch {env['torch']}, {env['machine']}, {env['threads']} threads"
          + (f", {env['card']}" if env["card"] else ""), flush=True)
    rows: list[dict] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    names = args.models.split(",")
    if args.kernels or args.tiny:
        kind = "kernels" if args.kernels else "tiny"
        cases = KERNEL_CASES if args.kernels else TINY_CASES
        names = [n for n in names if n in cases] or list(cases)
        out = args.out.with_name(f"performance-{kind}.json") if args.out == RESULTS else args.out
        for name in names:
            if args.kernels:
                row = kernel_row(cases[name], KERNEL_DESC[name])
            else:
                row = bench(cases[name], 1, args.reps, device, False, False, compiled=True,
                            traced=False, input_desc=TINY_DESC[name])
            rows.append(row)
            print(json.dumps(row if args.kernels else {"model": name, "ms": row["ms"],
                                                       "compile_s": row.get("compile_s")}),
                  flush=True)
            out.write_text(json.dumps({"env": env, "kind": kind, "rows": rows}, indent=2) + "\n")
        print((kernel_table if args.kernels else tiny_table)(rows))
        print(f"written: {out}")
        return
    for name in names:
        for batch in batches:
            row = bench(CASES[name], batch, args.reps, device, not args.no_zennit,
                        not args.no_memory, compiled=args.compiled)
            rows.append(row)
            print(json.dumps({"model": name, "batch": batch, "ms": row["ms"],
                              "peak_mib": row.get("peak_mib"),
                              "ratios": ratios(row)}, indent=None), flush=True)
            args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    print(table(rows))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
