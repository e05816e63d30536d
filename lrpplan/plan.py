"""The plan IR: plain frozen records, a msgpack codec and a checker.

A plan is a straight-line program over integer node ids (positions in the canonical walk of
:mod:`lrpplan.graph`), relevance slots and value slots. Every step is an equation (STYLE.md
point 13): what it computes is fixed by its kind, its static params and its input slots.

``ValueOp``  puts values into value slots. Graph reads (:data:`READ_KINDS`) are the only ops that
             touch the live autograd graph: ``leaf`` (a leaf's variable), ``saved`` (a saved
             attribute of a node: a tensor, or plain data such as sizes and bounds), ``base``
             (the ``_base`` of a saved view), ``rec`` (output ``attr`` of a node as recorded
             during the forward pass: :mod:`lrpplan.recording`), ``meta`` (the ``in_shapes`` or
             ``out_shapes`` of a node) and ``backward`` (the node's own backward function, for
             the few rules that route through an op without a pure gradient). Pure ops compute
             from slots and params alone: ``fwd`` (re-run a node type's forward op: one link of
             a Promise's forward chain), ``unview`` (a view's or copy's input from its output)
             and ``sub`` (an operand of an addition: its output minus the other operand).
``Step``     ``rule``    apply a rule: read relevance slots ``rel_in`` (one per forward output),
                         write or accumulate into ``rel_out`` (one per input, -1 = none); its
                         values are ``vals``, (key, slot) pairs: an input position, ``"out"``
                         (the node's own output) or an attribute name;
             ``fused``   one resolved Promise path: its forward ``chain`` of value ops, then the
                         origin's rule and the backward chain through the Promise's internal nodes
                         (``body``, rule steps);
             ``collect`` hand the relevance of slot ``rel_in[0]`` to result ``params['target']``.

Value slots are freed after their last use (``free_val``), computed once at compile time;
relevance slots are read once, by the step of the edge's producer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Mapping, Optional, Union

import msgpack
import xxhash

from .errors import PlanError

SCHEMA_VERSION = 2
STEP_KINDS = ("rule", "fused", "collect")
#: value ops that read the live graph (gathered outside a compiled replay)
READ_KINDS = ("leaf", "saved", "base", "rec", "meta", "backward")
#: value ops computed from value slots and params alone
PURE_KINDS = ("fwd", "unview", "sub")
VALUE_KINDS = READ_KINDS + PURE_KINDS
META_ATTRS = ("in_shapes", "out_shapes")
MAGIC = "lrpplan-plan"

ValKey = Union[int, str]  # input position, "out", or an attribute name


@dataclass(frozen=True, slots=True)
class ValueOp:
    """Put one or more values into value slots (see the module docstring for the kinds).

    ``fwd`` and ``unview`` take their input values first in ``ins`` and then the run-time
    attributes they read (``params["reads"]`` names them); ``params["node_type"]`` names the op
    and ``params["attrs"]`` its static attributes."""

    kind: str
    node: int
    attr: str = ""             # "saved"/"base": the attribute; "rec": output nr; "meta": which
    ins: tuple[int, ...] = ()  # value slots read (-1: none)
    outs: tuple[int, ...] = ()  # value slots written (-1: unused)
    params: Mapping[str, Any] = field(default_factory=dict)

    def format(self) -> str:
        if self.kind == "fwd":
            op = self.params.get("node_type")
            return f"v{list(self.outs)} = {op}(#{self.node})({list(self.ins)})"
        if self.kind == "sub":
            return f"v{self.outs[0]} = v{self.ins[0]} - v{self.ins[1]}  (#{self.node})"
        if self.kind == "unview":
            return f"v{self.outs[0]} = inverse {self.params.get('node_type')}(v{self.ins[0]})"
        if self.kind == "rec":
            return f"v{self.outs[0]} = recorded(#{self.node}:{self.attr})"
        what = {"leaf": "variable", "base": f"{self.attr}._base",
                "backward": "backward"}.get(self.kind, self.attr)
        return f"v{self.outs[0]} = #{self.node}.{what}"


@dataclass(frozen=True, slots=True)
class Step:
    """One plan step (see the module docstring for the kinds)."""

    kind: str
    node: int
    rule: str = ""
    rel_in: tuple[int, ...] = ()
    rel_out: tuple[int, ...] = ()
    vals: tuple[tuple[ValKey, int], ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    chain: tuple[ValueOp, ...] = ()
    body: tuple["Step", ...] = ()
    free_val: tuple[int, ...] = ()

    def format(self) -> str:
        if self.kind == "collect":
            return f"collect r{self.rel_in[0]} -> result[{self.params.get('target')}]  (#{self.node})"
        if self.kind == "fused":
            inner = "; ".join(s.format() for s in self.body)
            return f"fused[{len(self.chain)} fwd] {inner}"
        return f"#{self.node} {self.rule}: r{list(self.rel_in)} -> r{list(self.rel_out)}"


@dataclass(frozen=True)
class Plan:
    """A compiled explanation of one graph structure with one rule configuration."""

    key: str
    header: Mapping[str, Any]
    steps: tuple[Step, ...]
    n_rel: int
    n_val: int
    targets: tuple[Mapping[str, Any], ...]
    assumptions: tuple[str, ...] = ()
    stats: Mapping[str, Any] = field(default_factory=dict)

    def format(self) -> str:
        """One line per step, like ``torch.fx.Graph.print_tabular``."""
        lines = [f"plan {self.key} ({len(self.steps)} steps, {self.n_rel} relevance slots, "
                 f"{self.n_val} value slots)"]
        lines += [f"{i:5d}  {s.format()}" for i, s in enumerate(self.steps)]
        return "\n".join(lines)

    def iter_rule_steps(self) -> Iterable[Step]:
        for s in self.steps:
            if s.kind == "fused":
                yield from s.body
            elif s.kind == "rule":
                yield s

    def value_ops(self) -> Iterable[ValueOp]:
        """Every value op, in execution order."""
        for s in self.steps:
            yield from s.chain
            for b in s.body:
                yield from b.chain

    @cached_property
    def graph_reads(self) -> tuple[ValueOp, ...]:
        """The value ops that read the live graph (:data:`READ_KINDS`), in execution order:
        what a vmapped or compiled replay gathers before running the pure steps."""
        return tuple(op for op in self.value_ops() if op.kind in READ_KINDS)


# ---------------------------------------------------------------------------------------------
# codec


def _enc_value_op(v: ValueOp) -> list:
    return [v.kind, v.node, v.attr, list(v.ins), list(v.outs), dict(v.params)]


def _enc_step(s: Step) -> list:
    return [s.kind, s.node, s.rule, list(s.rel_in), list(s.rel_out),
            [[k, slot] for k, slot in s.vals], dict(s.params),
            [_enc_value_op(v) for v in s.chain], [_enc_step(b) for b in s.body],
            list(s.free_val)]


def encode(plan: Plan) -> bytes:
    """Serialize a plan to msgpack bytes (schema :data:`SCHEMA_VERSION`)."""
    doc = {
        "magic": MAGIC,
        "schema": SCHEMA_VERSION,
        "key": plan.key,
        "header": dict(plan.header),
        "n_rel": plan.n_rel,
        "n_val": plan.n_val,
        "targets": [dict(t) for t in plan.targets],
        "assumptions": list(plan.assumptions),
        "stats": dict(plan.stats),
        "steps": [_enc_step(s) for s in plan.steps],
    }
    doc["checksum"] = _checksum(doc)
    return msgpack.packb(doc, use_bin_type=True)


def _checksum(doc: dict) -> str:
    """xxh3-64 over the msgpack encoding of every field but ``checksum`` itself."""
    body = {k: v for k, v in doc.items() if k != "checksum"}
    return xxhash.xxh3_64_hexdigest(msgpack.packb(body, use_bin_type=True))


def _t(x: Any) -> tuple:
    if not isinstance(x, list):
        raise PlanError(f"expected a list, got {type(x).__name__}")
    return tuple(x)


def _dec_value_op(d: Any) -> ValueOp:
    kind, node, attr, ins, outs, params = d
    if not isinstance(params, dict):
        raise PlanError("value-op params must be a map")
    return ValueOp(str(kind), int(node), str(attr), _t(ins), _t(outs), params)


def _dec_key(k: Any) -> ValKey:
    if isinstance(k, bool) or not isinstance(k, (int, str)):
        raise PlanError(f"value key {k!r} is neither an input position nor a name")
    return k


def _dec_step(d: Any) -> Step:
    (kind, node, rule, rel_in, rel_out, vals, params, chain, body, free_val) = d
    if not isinstance(params, dict):
        raise PlanError("step params must be a map")
    return Step(str(kind), int(node), str(rule), _t(rel_in), _t(rel_out),
                tuple((_dec_key(k), int(slot)) for k, slot in vals), params,
                tuple(_dec_value_op(v) for v in chain), tuple(_dec_step(b) for b in body),
                _t(free_val))


def decode(data: bytes) -> Plan:
    """Parse msgpack bytes into a :class:`Plan` and run :func:`check_plan` on it."""
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise PlanError(f"not a msgpack document: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
        raise PlanError("not an lrpplan plan (bad magic)")
    if doc.get("schema") != SCHEMA_VERSION:
        raise PlanError(f"plan schema {doc.get('schema')!r}, expected {SCHEMA_VERSION}")
    if doc.get("checksum") != _checksum(doc):
        raise PlanError("plan checksum mismatch (the file was altered or damaged)")
    try:
        plan = Plan(
            key=str(doc["key"]), header=dict(doc["header"]),
            steps=tuple(_dec_step(s) for s in doc["steps"]),
            n_rel=int(doc["n_rel"]), n_val=int(doc["n_val"]),
            targets=tuple(dict(t) for t in doc["targets"]),
            assumptions=tuple(str(a) for a in doc["assumptions"]),
            stats=dict(doc["stats"]),
        )
    except PlanError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"malformed plan: {exc!r}") from exc
    check_plan(plan)
    return plan


# ---------------------------------------------------------------------------------------------
# checker


def check_plan(plan: Plan, n_nodes: Optional[int] = None, key: Optional[str] = None) -> None:
    """Validate a plan before any step runs.

    Invariants checked:

    1. every step kind is in :data:`STEP_KINDS`, every value-op kind in :data:`VALUE_KINDS`;
    2. every rule name is registered in :data:`lrpplan.rules.RULES`, every node type a ``fwd``
       or ``unview`` op runs in :data:`lrpplan.rules.OPS`; attributes read are plain names
       (no dunders), ``meta`` reads one of :data:`META_ATTRS`;
    3. node ids are in ``[0, n_nodes)`` (when ``n_nodes`` is given) and non-negative;
    4. relevance slots are in ``[-1, n_rel)``, value slots in ``[-1, n_val)``;
    5. a value slot is written before it is read; a relevance slot read by a step was written
       by an earlier step;
    6. the plan's key equals ``key`` (when given) and the header names the plan format version.
    """
    from .fingerprint import PLAN_FORMAT_VERSION
    from .rules import OPS, RULES

    if key is not None and plan.key != key:
        raise PlanError(f"plan key {plan.key} does not match the graph's fingerprint {key}")
    if plan.header.get("format") != PLAN_FORMAT_VERSION:
        raise PlanError(f"plan format {plan.header.get('format')!r}, "
                        f"expected {PLAN_FORMAT_VERSION}")
    written_rel: set[int] = set(plan.header.get("roots", ()))  # filled by the seeds
    written_val: set[int] = set()
    n_targets = len(plan.targets)

    def node_ok(i: int, where: str) -> None:
        if i < 0 or (n_nodes is not None and i >= n_nodes):
            raise PlanError(f"{where}: node id {i} out of range")

    def check_vop(v: ValueOp, where: str) -> None:
        if v.kind not in VALUE_KINDS:
            raise PlanError(f"{where}: unknown value op {v.kind!r}")
        node_ok(v.node, where)
        if v.kind in ("saved", "base") and not (v.attr.isidentifier() and "__" not in v.attr):
            raise PlanError(f"{where}: attribute {v.attr!r} is not a node attribute name")
        if v.kind == "meta" and v.attr not in META_ATTRS:
            raise PlanError(f"{where}: meta read {v.attr!r} is not one of {META_ATTRS}")
        if v.kind in ("fwd", "unview") and v.params.get("node_type") not in OPS:
            raise PlanError(f"{where}: {v.kind} of unknown node type "
                            f"{v.params.get('node_type')!r}")
        if v.kind == "rec" and not v.attr.isdigit():
            raise PlanError(f"{where}: recorded output {v.attr!r} is not an output number")
        for s in v.ins:
            if s != -1 and s not in written_val:
                raise PlanError(f"{where}: value slot {s} read before it is written")
        for s in v.outs:
            if not -1 <= s < plan.n_val:
                raise PlanError(f"{where}: value slot {s} out of range")
            written_val.add(s)

    def check_step(s: Step, where: str) -> None:
        if s.kind not in STEP_KINDS:
            raise PlanError(f"{where}: unknown step kind {s.kind!r}")
        node_ok(s.node, where)
        for v in s.chain:
            check_vop(v, where)
        if s.kind == "fused":
            if not s.body:
                raise PlanError(f"{where}: fused step without body")
            for j, b in enumerate(s.body):
                if b.kind != "rule":
                    raise PlanError(f"{where}.{j}: fused body holds a {b.kind!r} step")
                check_step(b, f"{where}.{j}")
            return
        for r in s.rel_in:
            if r != -1 and r not in written_rel:
                raise PlanError(f"{where}: relevance slot {r} read before it is written")
        if s.kind == "collect":
            t = s.params.get("target")
            if not isinstance(t, int) or not 0 <= t < n_targets:
                raise PlanError(f"{where}: collect target {t!r} out of range")
            return
        if s.rule not in RULES:
            raise PlanError(f"{where}: unknown rule {s.rule!r}")
        for _, slot in s.vals:
            if slot not in written_val:
                raise PlanError(f"{where}: value slot {slot} read before it is written")
        for r in s.rel_out:
            if not -1 <= r < plan.n_rel:
                raise PlanError(f"{where}: relevance slot {r} out of range")
            if r != -1:
                written_rel.add(r)

    for r in written_rel:
        if not isinstance(r, int) or not 0 <= r < max(plan.n_rel, 1):
            raise PlanError(f"root relevance slot {r!r} out of range")
    for i, s in enumerate(plan.steps):
        check_step(s, f"step {i}")
