"""The vocabulary of runtime profiles: what a symbol does and where its arguments are."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Op(IntEnum):
    """What a call does. Values are shared with C (FX_OP_* in the generated header) and
    index the per-process counters, so only append."""

    KERNEL = 0  # dispatch: a kernel launch
    MEMCPY_ASYNC = 1  # dispatch: an asynchronous copy
    MEMSET_ASYNC = 2  # dispatch: an asynchronous memset
    EVENT_RECORD = 3  # dispatch: an event record
    STREAM_WAIT = 4  # dispatch: a stream waits on an event
    MEMCPY = 5  # a synchronous copy (device work, host waits)
    MEMSET = 6  # a synchronous memset
    ALLOC = 7
    FREE = 8
    SYNC = 9  # the host waits for device work
    DEVICE_SET = 10
    DEVICE_GET = 11
    DEVICE_COUNT = 12
    DEVICE_RESET = 13
    CONTEXT_CREATE = 14
    CONTEXT_SET = 15
    MEMINFO = 16
    CONTEXT_DESTROY = 17

    @property
    def dispatches(self) -> bool:
        """Sends work to the device, so it passes the dispatch gate."""
        return self in _DISPATCHING


_DISPATCHING = {Op.KERNEL, Op.MEMCPY_ASYNC, Op.MEMSET_ASYNC, Op.EVENT_RECORD, Op.STREAM_WAIT, Op.MEMCPY, Op.MEMSET}


class Direction(IntEnum):
    """Copy direction, as counted. Values are shared with C (FX_DIR_*)."""

    H2H = 0
    H2D = 1
    D2H = 2
    D2D = 3
    UNKNOWN = 4


@dataclass(frozen=True)
class Symbol:
    """One function of a runtime library.

    params: (C type, name) pairs, exactly as the runtime's header declares them.
    The *_arg fields name the parameter that carries that quantity.
    """

    name: str
    op: Op
    returns: str
    params: tuple[tuple[str, str], ...]
    bytes_arg: str | None = None
    kind_arg: str | None = None  # the copy-kind argument, mapped through the profile's directions
    stream_arg: str | None = None
    device_arg: str | None = None
    ptr_arg: str | None = None  # alloc: the out-pointer; free: the pointer
    func_arg: str | None = None  # kernel launch: the function handle it runs (its name is learned
    #                              where the handle was made, see Namer)
    hand_written: bool = False  # the shim wraps it by hand (device maps, quota views)
    wrap: bool = True  # False: observed by probes only, not wrapped by the shim

    def index(self, arg: str | None) -> int | None:
        """0-based position of a named parameter (None if arg is None)."""
        if arg is None:
            return None
        for i, (_, n) in enumerate(self.params):
            if n == arg:
                return i
        raise KeyError(f"{self.name} has no parameter {arg}")


@dataclass(frozen=True)
class Namer:
    """A probe-only function that says what device work *is*, for phase inference.

    kind "kernel_handle": makes a kernel function handle from a kernel name
        (aclrtBinaryGetFunction): name_arg is the name, handle_arg the out-pointer the
        handle is written to; launches of that handle are then classed by the name.
    kind "operator": an operator's entry point (aclnnXxx in libopapi.so); the symbol's own
        name says what it computes, so no argument is read.
    Never wrapped by the shim and never counted as a dispatch: the kernels it leads to are
    counted where they are launched.
    """

    name: str
    returns: str
    params: tuple[tuple[str, str], ...]
    kind: str  # "kernel_handle" or "operator"
    name_arg: str | None = None
    handle_arg: str | None = None

    def index(self, arg: str | None) -> int | None:
        if arg is None:
            return None
        for i, (_, n) in enumerate(self.params):
            if n == arg:
                return i
        raise KeyError(f"{self.name} has no parameter {arg}")


@dataclass(frozen=True)
class RuntimeProfile:
    name: str
    library: str  # soname programs load
    headers: tuple[str, ...]  # what the generated C includes
    success: str  # the value of a successful call
    symbols: tuple[Symbol, ...]
    directions: dict[int, Direction] = field(default_factory=dict)  # copy kind value -> direction
    errors: dict[str, int] = field(default_factory=dict)  # codes the shim itself returns
    namers: tuple[Namer, ...] = ()  # probe-only calls that name the work (phase inference)

    def symbol(self, name: str) -> Symbol:
        for s in self.symbols:
            if s.name == name:
                return s
        raise KeyError(name)

    def by_op(self, *ops: Op) -> list[Symbol]:
        return [s for s in self.symbols if s.op in ops]
