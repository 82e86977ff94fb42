"""Phase inference: is a process in prefill, decode, idle or mixed during an interval, and
what share of its busy time went to prefill.

An *iteration* is the work a process dispatches between two synchronisations (a forward
pass, in a serving engine). Three signals say what an iteration was, strongest first:

  aclnn     the attention operators it called in libopapi.so: aclnnPromptFlashAttention*
            (prefill), aclnnIncreFlashAttention* (decode). aclnnFusedInferAttentionScore*
            serves both phases (the query's length decides inside, and its tensors are
            opaque to a probe): it names no phase and the next signal decides.
  kernel    the names of the kernels it launched: a handle made by aclrtBinaryGetFunction
            is classed by its kernel name (NAME_TABLE) and every launch of it counted so.
  shape     span and launches, for programs whose work names nothing: see ShapeModel.

For the two named signals the BPF program sorts ended iterations into: held prefill-named
work only, decode-named only, both (a chunked-prefill step), neither. The prefill share of
the interval is the time of the first, plus the prefill part of the third; that part is
estimated from the process's own pure decode steps (their time per decode-named call), so
a step holding decode attention for n calls spends about n such costs on decode and the
rest on its prefill chunk. Without pure steps to learn from, the calls' ratio is used.

An interval is then
  idle     nothing dispatched, no iteration ended and none open;
  <role>   FLEXNPU_ROLE=prefill|decode given to the shim, whenever not idle;
  prefill  when the prefill share is at least 1 - mixed_share, decode at most mixed_share,
  mixed    in between.
The iteration still open at the end of an interval counts with what it has done so far.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

PHASES = ("prefill", "decode", "idle", "mixed")
SOURCES = ("role", "aclnn", "kernel", "shape", "idle")

# Kernel and operator names, lower-cased with every non-alphanumeric dropped, are matched
# in this order against these fragments (so "PromptFlashAttention_fp16_tiling3",
# "prompt_flash_attention" and "aclnnPromptFlashAttentionV3" are one name).
NAME_TABLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("either", ("fusedinferattentionscore",)),
    ("prefill", ("promptflashattention", "attentionprefill", "prefillattention", "contextattention",
                 "prefillattn")),
    ("decode", ("increflashattention", "pagedattention", "attentiondecode", "decodeattention",
                "flashdecoding", "decodeattn")),
    ("prefill", ("flashattentionscore", "flashattentionvarlenscore")),
)


def classify_name(name: str) -> str | None:
    """'prefill', 'decode', 'either' (attention of both phases) or None (not attention)."""
    key = re.sub(r"[^0-9a-z]", "", name.lower())
    for cls, fragments in NAME_TABLE:
        if any(f in key for f in fragments):
            return cls
    return None


@dataclass(frozen=True)
class PhaseRules:
    mixed_share: float = 0.2  # an interval is mixed when neither phase holds 1 - this
    # shape: the one absolute, for a process whose passes are all of one kind. Decode
    # kernels carry one token per sequence and are bound by reading the weights (tens of
    # us each on a 910B-class device); prefill kernels carry the prompt and are compute
    # bound. A pass whose kernels average this much device time each is prefill.
    prefill_ns_per_launch: float = 250_000.0
    mode_gap_octaves: float = 2.0  # two span modes whose means are 4x apart: the longer is prefill
    min_mode_share: float = 0.05  # ... when each holds this share of the process's time
    history_half_life_s: float = 5.0  # how fast the shape history forgets
    # interval totals only (the shim's counters, no histograms)
    long_iter_ms: float = 16.0
    prefill_launches: int = 100
    prefill_h2d_bytes: int = 1 << 20
    decode_min_rate: float = 20.0


@dataclass(frozen=True)
class NamedWork:
    """One signal's named work in an interval (deltas), as struct fx_stats keeps it."""

    iters: tuple[int, int, int, int]  # iterations that ended, by what they held: none, P, D, both
    ns: tuple[int, int, int, int]  # their spans
    mix: tuple[int, int]  # in the both-iterations: prefill calls, decode calls
    calls: tuple[int, int, int]  # named calls: prefill, decode, either
    open_calls: tuple[int, int, int] = (0, 0, 0)  # of the iteration open now
    prev_open_calls: tuple[int, int, int] = (0, 0, 0)  # of the one open at the previous read


@dataclass(frozen=True)
class Shape:
    """Iterations of one histogram bucket that ended in the interval."""

    bucket: tuple[int, int, int]  # (span bucket, launch bucket, contended)
    iters: int
    ns: int
    launches: int


@dataclass(frozen=True)
class IntervalFeatures:
    """What one process did on one device during one interval. Missing data is None."""

    dt_s: float
    dispatches: int  # calls that sent work to the device
    launches: int
    iterations: int  # iterations that ended in the interval
    iter_ns: int  # their spans
    h2d_bytes: int
    open_iter_ns: int = 0  # how long the iteration open at the end has run (0: none open)
    open_launches: int = 0  # what it has dispatched so far
    open_h2d_bytes: int = 0
    kernel: NamedWork | None = None
    aclnn: NamedWork | None = None
    shapes: tuple[Shape, ...] | None = None  # None: no histogram (shim counters)


@dataclass(frozen=True)
class PhaseVerdict:
    phase: str
    source: str  # one of SOURCES
    prefill_share: float  # of the process's busy time, the part that was prefill
    reason: str


@dataclass
class _Point:
    span_ns: float
    launches: float
    weight: float  # time


@dataclass
class _ProcessState:
    hist: dict[tuple[int, int, int], list[float]] = field(default_factory=dict)  # iters, ns, launches
    cost: dict[tuple[str, str], float] = field(default_factory=dict)  # (signal, P|D) -> ns per call
    seen: PhaseVerdict | None = None  # the last verdict some work gave evidence for


class ShapeModel:
    """Classes iterations by their shape, against the process's own recent history.

    The history is the process's iterations (span, launches), time-weighted and decayed
    with history_half_life_s. Iterations that another process's iteration on the same
    device overlapped are left out of it: their span measures that work too.
      - two span modes (the best two-way split of the time-weighted log spans) whose means
        are mode_gap_octaves apart, each with min_mode_share of the time: the longer is prefill; the shorter is decode unless its own kernels
        average prefill_ns_per_launch (a process serving short and long prompts);
      - one mode: the process runs one kind of pass; it is prefill when its typical pass
        averages prefill_ns_per_launch per kernel, else decode, and every pass follows it
        (a decode batch that grows does not turn prefill step by step);
      - an overlapped iteration takes the class of the nearest own iteration, by launches
        first (a pass held up behind another's carries what it always carries).
    Iterations without kernel launches (copies only) are no phase's work.
    """

    def __init__(self, rules: PhaseRules) -> None:
        self.r = rules

    def update(self, st: _ProcessState, shapes: tuple[Shape, ...], dt_s: float) -> None:
        decay = 0.5 ** (dt_s / self.r.history_half_life_s)
        for k in list(st.hist):
            v = st.hist[k]
            v[:] = [x * decay for x in v]
            if v[0] < 0.01:
                del st.hist[k]
        for s in shapes:
            v = st.hist.setdefault(s.bucket, [0.0, 0.0, 0.0])
            v[0] += s.iters
            v[1] += s.ns
            v[2] += s.launches

    def _per_launch(self, p: _Point) -> float:
        return p.span_ns / max(p.launches, 1.0)

    def model(self, st: _ProcessState) -> tuple[list[tuple[_Point, bool]], str]:
        """Reference points with their class (True: prefill), and a description."""
        pts = [(_Point(v[1] / v[0], v[2] / v[0], v[1]), k[2]) for k, v in st.hist.items() if v[2] > 0]
        ref = [p for p, c in pts if not c] or [p for p, _ in pts]
        if not ref:
            return [], "no kernel launches"
        total = sum(p.weight for p in ref)
        ref.sort(key=lambda p: p.span_ns)
        # the best split of the time-weighted log spans in two (Otsu's criterion): a stray
        # pass between the modes moves the means little, where it would fill a gap
        xs = [math.log2(max(p.span_ns, 1.0)) for p in ref]
        best, at, gap = 0.0, -1, 0.0
        for i in range(len(ref) - 1):
            w0 = sum(p.weight for p in ref[:i + 1])
            w1 = total - w0
            if w0 <= 0 or w1 <= 0:
                continue
            m0 = sum(p.weight * x for p, x in zip(ref[:i + 1], xs[:i + 1])) / w0
            m1 = sum(p.weight * x for p, x in zip(ref[i + 1:], xs[i + 1:])) / w1
            score = w0 * w1 * (m1 - m0) ** 2
            if score > best:
                best, at, gap = score, i, m1 - m0
        if at >= 0 and gap >= self.r.mode_gap_octaves:
            lo, hi = ref[:at + 1], ref[at + 1:]
            wl, wh = sum(p.weight for p in lo), sum(p.weight for p in hi)
            if min(wl, wh) >= self.r.min_mode_share * total:
                lo_pre = self._mode_is_prefill(lo)
                out = [(p, True) for p in hi] + [(p, lo_pre) for p in lo]
                return out, (f"two modes, ~{_ms(_median(lo).span_ns)} and ~{_ms(_median(hi).span_ns)} ms "
                             f"a pass: the longer is prefill, the shorter "
                             f"{'prefill too' if lo_pre else 'decode'}")
        pre = self._mode_is_prefill(ref)
        m = _median(ref)
        return [(p, pre) for p in ref], (f"one mode, ~{_ms(m.span_ns)} ms and {m.launches:.0f} launches a pass, "
                                         f"{self._per_launch(m) / 1e3:.0f} us per launch: "
                                         f"{'prefill' if pre else 'decode'}")

    def _mode_is_prefill(self, pts: list[_Point]) -> bool:
        return self._per_launch(_median(pts)) >= self.r.prefill_ns_per_launch

    @staticmethod
    def nearest(ref: list[tuple[_Point, bool]], span_ns: float, launches: float) -> bool:
        def dist(p: _Point) -> float:
            return 4 * abs(math.log2((p.launches + 1) / (launches + 1))) + \
                abs(math.log2(max(p.span_ns, 1.0) / max(span_ns, 1.0)))
        return min(ref, key=lambda pc: dist(pc[0]))[1]

    def classify(self, ref: list[tuple[_Point, bool]], span_ns: float, launches: float,
                 contended: bool) -> bool:
        if not contended:
            for p, c in ref:  # an iteration of a reference bucket takes its class
                if abs(math.log2(max(p.span_ns, 1.0) / max(span_ns, 1.0))) < 0.5 and \
                        abs(math.log2((p.launches + 1) / (launches + 1))) < 0.5:
                    return c
            return min(ref, key=lambda pc: abs(math.log2(max(pc[0].span_ns, 1.0) / max(span_ns, 1.0))))[1]
        return self.nearest(ref, span_ns, launches)


def _median(pts: list[_Point]) -> _Point:
    s = sorted(pts, key=lambda p: p.span_ns)
    half, acc = sum(p.weight for p in s) / 2, 0.0
    for p in s:
        acc += p.weight
        if acc >= half:
            return p
    return s[-1]


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3g}"


class PhaseClassifier:
    """Per process (key) state: the shape history and the learned cost of named calls.
    `last[key]` holds, after each classify, every signal's own verdict (None where it had
    no evidence): what the accuracy harness scores per source."""

    def __init__(self, rules: PhaseRules | None = None) -> None:
        self.rules = rules or PhaseRules()
        self.shape = ShapeModel(self.rules)
        self.state: dict[object, _ProcessState] = {}
        self.last: dict[object, dict[str, PhaseVerdict | None]] = {}

    def seen(self, key: object) -> PhaseVerdict | None:
        """The last verdict a signal gave on key's work (what stands while none has evidence)."""
        st = self.state.get(key)
        return st.seen if st is not None else None

    def forget(self, key: object) -> None:
        self.state.pop(key, None)
        self.last.pop(key, None)

    def classify(self, f: IntervalFeatures, role: str | None = None, key: object = None) -> PhaseVerdict:
        st = self.state.setdefault(key, _ProcessState())
        if f.shapes is not None:
            self.shape.update(st, f.shapes, f.dt_s)
        idle = f.dispatches == 0 and f.iterations == 0 and f.open_iter_ns == 0
        by: dict[str, PhaseVerdict | None] = {
            "aclnn": None if idle or f.aclnn is None else self._named("aclnn", f.aclnn, f, st),
            "kernel": None if idle or f.kernel is None else self._named("kernel", f.kernel, f, st),
            "shape": None if idle else (self._by_shape(f, st) if f.shapes is not None else self._by_totals(f)),
        }
        self.last[key] = by
        if idle:
            return PhaseVerdict("idle", "idle", 0.0, "no work dispatched or pending")
        ev = next((by[s] for s in ("aclnn", "kernel", "shape") if by[s] is not None), None)
        if ev is not None:
            st.seen = ev  # declared or not: what the work showed last stands while nothing shows
        if role in ("prefill", "decode"):
            return PhaseVerdict(role, "role", 1.0 if role == "prefill" else 0.0, f"FLEXNPU_ROLE={role}")
        if ev is not None:
            return ev
        # work pending (copies, a synchronisation) but no kernel launched: no evidence of a
        # phase. What the process ran before stands; a process that has launched nothing yet
        # is not called decode (under flexpd that would put a new, unknown process first).
        # Kernels launched in an iteration still too short to tell are no evidence either.
        launched = bool(f.launches or f.open_launches)
        what = (f"an iteration under way, {f.open_iter_ns / 1e6:.1f} ms so far: too short to tell" if launched
                else "no kernel launched")
        if st.seen is not None:
            v = st.seen
            return PhaseVerdict(v.phase, v.source, v.prefill_share, f"{what}; as before ({v.reason})")
        return PhaseVerdict("idle", "idle", 0.0, what if launched else f"{what} yet")

    # ---------------------------------------------------------------- verdicts
    def _verdict(self, source: str, p_ns: float, d_ns: float, why: str) -> PhaseVerdict | None:
        if p_ns + d_ns <= 0:
            return None
        share = p_ns / (p_ns + d_ns)
        m = self.rules.mixed_share
        phase = "prefill" if share >= 1 - m else "decode" if share <= m else "mixed"
        return PhaseVerdict(phase, source, round(share, 4), f"{why}; {share:.0%} of the time prefill")

    def _named(self, source: str, w: NamedWork, f: IntervalFeatures, st: _ProcessState) -> PhaseVerdict | None:
        p_ns, d_ns, both = float(w.ns[1]), float(w.ns[2]), float(w.ns[3])
        mix_p, mix_d = float(w.mix[0]), float(w.mix[1])
        # learn the cost of a named call from the iterations that held only that phase
        for i, (tag, ns) in enumerate((("P", w.ns[1]), ("D", w.ns[2]))):
            calls = w.calls[i] - w.mix[i] - w.open_calls[i] + w.prev_open_calls[i]
            if ns > 0 and calls > 0:
                old = st.cost.get((source, tag))
                st.cost[(source, tag)] = ns / calls if old is None else 0.7 * old + 0.3 * ns / calls
        op, od = w.open_calls[0], w.open_calls[1]
        if f.open_iter_ns and (op or od):
            o = min(f.open_iter_ns, f.dt_s * 1e9)
            if op and od:
                both, mix_p, mix_d = both + o, mix_p + op, mix_d + od
            elif op:
                p_ns += o
            else:
                d_ns += o
        n_p, n_d, n_b = w.iters[1], w.iters[2], w.iters[3]
        why = f"{n_p} prefill-named, {n_d} decode-named, {n_b} mixed iterations"
        if both > 0:
            wd, wp = st.cost.get((source, "D")), st.cost.get((source, "P"))
            if wd:
                dpart = min(both, mix_d * wd)
                how = "decode part from its pure decode steps"
            elif wp:
                dpart = both - min(both, mix_p * wp)
                how = "prefill part from its pure prefill passes"
            else:
                dpart = both * mix_d / max(mix_p + mix_d, 1.0)
                how = "split by calls"
            p_ns, d_ns = p_ns + both - dpart, d_ns + dpart
            why += f" ({how})"
        if p_ns + d_ns <= 0 and w.calls[2]:
            return None  # fused attention only: names no phase
        label = "aclnn attention operators" if source == "aclnn" else "attention kernel names"
        return self._verdict(source, p_ns, d_ns, f"{label}: {why}")

    def _by_shape(self, f: IntervalFeatures, st: _ProcessState) -> PhaseVerdict | None:
        ref, desc = self.shape.model(st)
        if not ref and f.open_iter_ns and f.open_launches:  # a first pass, still running
            # its span so far is a lower bound: long enough already, it is prefill; short,
            # it is no evidence of decode (its kernels may have only just been queued)
            pt = _Point(float(f.open_iter_ns), float(f.open_launches), 1.0)
            if not self.shape._mode_is_prefill([pt]):
                return None
            ref, desc = [(pt, True)], f"first pass, {self.shape._per_launch(pt) / 1e3:.0f} us per launch so far"
        if not ref:
            return None
        p_ns = d_ns = 0.0
        n_p = n_d = 0
        for s in f.shapes or ():
            if s.launches == 0:
                continue
            pre = self.shape.classify(ref, s.ns / s.iters, s.launches / s.iters, bool(s.bucket[2]))
            if pre:
                p_ns, n_p = p_ns + s.ns, n_p + s.iters
            else:
                d_ns, n_d = d_ns + s.ns, n_d + s.iters
        if f.open_iter_ns and f.open_launches:
            o = min(f.open_iter_ns, f.dt_s * 1e9)
            if self.shape.classify(ref, f.open_iter_ns, f.open_launches, False):
                p_ns, n_p = p_ns + o, n_p + 1
            else:
                d_ns, n_d = d_ns + o, n_d + 1
        return self._verdict("shape", p_ns, d_ns, f"{n_p} prefill-shaped, {n_d} decode-shaped iterations ({desc})")

    def _by_totals(self, f: IntervalFeatures) -> PhaseVerdict | None:
        """Interval totals only (the shim's counters): per-iteration averages vote; the
        time per launch decides alone, the others need three of four."""
        r = self.rules
        if f.launches == 0:
            return None  # nothing launched: the shape of no work tells nothing
        n = f.iterations + (1 if f.open_iter_ns else 0)
        per_iter = max(n, 1)
        span_ns = (f.iter_ns + f.open_iter_ns) / per_iter
        launches = f.launches / per_iter
        rate = f.iterations / f.dt_s if f.dt_s > 0 else 0.0
        dense = launches > 0 and span_ns / launches >= r.prefill_ns_per_launch
        votes = {"span": span_ns >= r.long_iter_ms * 1e6, "launches": launches >= r.prefill_launches,
                 "h2d": f.h2d_bytes / per_iter >= r.prefill_h2d_bytes, "cadence": rate <= r.decode_min_rate}
        prefill = dense or sum(votes.values()) >= 3
        if not prefill and f.iterations == 0:
            # only an iteration still open: its span, launches and bytes so far are lower
            # bounds, each of which can only grow towards prefill. Past a prefill bound they
            # prove it; short of them they are no evidence of decode (its kernels may only
            # just have been queued: a new prefill process is not to be put first for that)
            return None
        why = ", ".join(f"{k}:{'P' if v else 'D'}" for k, v in votes.items())
        why = (f"span {span_ns / 1e6:.1f} ms, {launches:.0f} launches/iter, {rate:.0f} iter/s, "
               f"per launch {'>=' if dense else '<'} {r.prefill_ns_per_launch / 1e3:.0f} us ({why})")
        return PhaseVerdict("prefill" if prefill else "decode", "shape", 1.0 if prefill else 0.0, why)
