"""What a compiled XLA:GPU program does, read from its scheduled HLO text: kernel launches, bytes, slice copies.

`compile_for_target(...).as_text()` (`qlora_jax.gpu_target`) is the program XLA:GPU would run on the chip: every
fusion, custom call (Pallas/Triton, cuBLAS, cuDNN) and copy is one kernel launch, in schedule order, inside the
while loops that `lax.scan` / `lax.while_loop` become. Deviceless compiles give no `cost_analysis()`, so the bytes
are counted here from the HLO itself, launch by launch, the way XLA's own cost model counts them:

- a fusion reads each operand whole, except an operand that the fused computation only slices (`dynamic-slice`,
  `slice`, `gather`): then it reads the slices; and an operand updated in place (the buffer operand of a root
  `dynamic-update-slice`) is not read at all; it writes its result, or only the update of an in-place root;
- a custom call reads its operands and writes its results, unless the kernel states what it touches
  (`KERNEL_BYTES_KEY` in its `serialized_metadata`, which `pallas_call(metadata=...)` sets): a kernel that reads
  one layer of a stacked weight says so, since its operand is the whole stack; cuBLAS' workspace is not counted;
- a copy reads and writes its operand.

Launches inside a while loop count once per iteration (XLA's `known_trip_count`; a loop without one counts once).
A launch that only moves data (no arithmetic) and slices one of the program's parameters is a *slice copy*: what
XLA inserts when a slice of a stacked weight feeds a custom call. The parser reads only the text; it needs no jax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator

__all__ = ["KERNEL_BYTES_KEY", "HloModule", "Instruction", "Launch", "LaunchReport", "launch_report", "parse_hlo"]

# The key of `pallas_call(metadata={KERNEL_BYTES_KEY: json.dumps([read, written])})`: bytes a kernel touches.
KERNEL_BYTES_KEY = "qlora_jax.bytes"

_ITEMSIZE = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "s4": 0.5,
    "u4": 0.5,
    "token": 0,
}
# Ops that launch nothing: bookkeeping, control flow (its bodies are walked), and the second half of async pairs.
_NOT_LAUNCHES = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "while",
    "conditional",
    "call",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
    "domain",
}
# Fused ops that move data without arithmetic.
_DATA_MOVEMENT = {
    "parameter",
    "constant",
    "bitcast",
    "copy",
    "reshape",
    "transpose",
    "slice",
    "dynamic-slice",
    "concatenate",
    "tuple",
    "get-tuple-element",
    "broadcast",
    "pad",
    "iota",
}
_SLICING = {"slice", "dynamic-slice", "gather"}
_VIEWS = {"bitcast", "reshape"}


@dataclasses.dataclass(frozen=True)
class Shape:
    """An HLO shape: an array (dtype, dims) or a tuple of shapes."""

    dtype: str | None
    dims: tuple[int, ...] = ()
    elements: tuple[Shape, ...] = ()

    @property
    def nbytes(self) -> int:
        if self.dtype is None:
            return sum(e.nbytes for e in self.elements)
        return int(math.prod(self.dims) * _ITEMSIZE.get(self.dtype, 4))

    def __str__(self) -> str:
        if self.dtype is None:
            return "(" + ", ".join(map(str, self.elements)) + ")"
        return f"{self.dtype}[{','.join(map(str, self.dims))}]"


@dataclasses.dataclass
class Instruction:
    name: str
    shape: Shape
    opcode: str
    operands: list[str]
    attributes: str
    is_root: bool = False
    literal: int | None = None  # N of parameter(N)

    def attribute(self, key: str) -> str | None:
        """The value of `key=%name` or `key="text"` or `key=word` in the attributes, or None."""
        match = re.search(rf'(?:^|[,\s]){re.escape(key)}=(?:%([\w.\-]+)|"([^"]*)"|([\w.\-]+))', self.attributes)
        return None if match is None else next(g for g in match.groups() if g is not None)


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]
    is_entry: bool = False

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instructions}
        self.users: dict[str, list[Instruction]] = {}
        for instruction in self.instructions:
            for operand in instruction.operands:
                self.users.setdefault(operand, []).append(instruction)

    @property
    def root(self) -> Instruction:
        return next((i for i in self.instructions if i.is_root), self.instructions[-1])

    def parameter(self, index: int) -> Instruction | None:
        return next((i for i in self.instructions if i.opcode == "parameter" and i.literal == index), None)


def _parse_shape(text: str, at: int = 0) -> tuple[Shape, int]:
    """The shape starting at text[at:], and the index after it (its layout included)."""
    while text[at] == " ":
        at += 1
    if text[at] == "(":
        at += 1
        elements = []
        while True:
            while text[at] in " ,":
                at += 1
            if text.startswith("/*", at):
                at = text.index("*/", at) + 2
                continue
            if text[at] == ")":
                return Shape(None, (), tuple(elements)), at + 1
            shape, at = _parse_shape(text, at)
            elements.append(shape)
    match = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]").match(text, at)
    if match is None:  # an opaque or token type
        word = re.compile(r"[\w\[\]]+").match(text, at)
        return Shape("token", ()), word.end() if word else at + 1
    at = match.end()
    if at < len(text) and text[at] == "{":  # the layout, e.g. {1,0} or {1,0:T(8,128)S(1)}
        at = _matching(text, at) + 1
    dims = tuple(int(d) for d in match[2].split(",") if d)
    return Shape(match[1], dims), at


def _matching(text: str, at: int) -> int:
    """The index of the bracket closing the one at text[at] (quoted strings skipped)."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack, quoted, i = [], False, at
    while i < len(text):
        c = text[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i
        i += 1
    raise ValueError(f"unbalanced brackets in HLO text from: {text[at : at + 80]!r}")


_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(")


def _parse_instruction(line: str) -> Instruction | None:
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    shape, at = _parse_shape(line, match.end())
    op = re.compile(r"\s*([a-z][a-z0-9\-]*)\(").match(line, at)
    if op is None:
        return None
    close = _matching(line, op.end() - 1)
    operand_text = line[op.end() : close]
    instruction = Instruction(
        name=match[2],
        shape=shape,
        opcode=op[1],
        operands=re.findall(r"%([\w.\-]+)", operand_text),
        attributes=line[close + 1 :],
        is_root=bool(match[1]),
    )
    literal = re.fullmatch(r"\s*(\d+)\s*", operand_text)
    instruction.literal = int(literal[1]) if literal else None
    return instruction


@dataclasses.dataclass
class HloModule:
    computations: dict[str, Computation]
    entry: Computation


def parse_hlo(text: str) -> HloModule:
    """The computations of an HLO module's text (`Compiled.as_text()`). Raises ValueError without an ENTRY."""
    computations: dict[str, Computation] = {}
    entry = None
    current: tuple[str, bool, list[Instruction]] | None = None
    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and line.rstrip().endswith("{"):
                current = (header[2], bool(header[1]), [])
            continue
        if line.strip() == "}":
            name, is_entry, instructions = current
            computations[name] = Computation(name, instructions, is_entry)
            entry = computations[name] if is_entry else entry
            current = None
            continue
        instruction = _parse_instruction(line)
        if instruction is not None:
            current[2].append(instruction)
    if entry is None:
        raise ValueError("not an HLO module: no ENTRY computation")
    return HloModule(computations, entry)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch of the program, as often as it runs (`count`: the trip counts of its enclosing loops).

    Attributes:
      name, opcode: the instruction (`fusion`, `custom-call`, `copy`, `fusion-start`, ...).
      kind: the fusion kind (kLoop, kInput, kCustom, ...) or the custom call's target.
      loops: the while bodies it sits in, outermost first.
      bytes_read, bytes_written: one execution's HBM traffic (see the module docstring).
      copy: moves data without arithmetic; slice_of: the program parameters it copies a slice of (a slice copy).
      label: the op name from its metadata (the jax function that made it), for reports.
    """

    name: str
    opcode: str
    kind: str
    loops: tuple[str, ...]
    count: int
    bytes_read: int
    bytes_written: int
    copy: bool
    slice_of: tuple[str, ...]
    label: str

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


@dataclasses.dataclass(frozen=True)
class LaunchReport:
    """Every launch of one execution of a program (see `launch_report`)."""

    launches: tuple[Launch, ...]
    trip_counts: dict[str, int]  # while body -> iterations

    @property
    def count(self) -> int:
        """Kernel launches in one execution."""
        return sum(launch.count for launch in self.launches)

    @property
    def bytes_read(self) -> int:
        return sum(launch.count * launch.bytes_read for launch in self.launches)

    @property
    def bytes_written(self) -> int:
        return sum(launch.count * launch.bytes_written for launch in self.launches)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written

    def in_loop(self, body: str) -> LaunchReport:
        """The launches inside one while body (its nested loops included), counted once per iteration of it."""
        trips = self.trip_counts[body]
        inside = [
            dataclasses.replace(launch, count=launch.count // trips) for launch in self.launches if body in launch.loops
        ]
        return LaunchReport(tuple(inside), self.trip_counts)

    @property
    def slice_copies(self) -> tuple[Launch, ...]:
        """Launches that copy a slice of one of the program's parameters (a weight or cache, say)."""
        return tuple(launch for launch in self.launches if launch.slice_of)

    def table(self, limit: int = 40) -> str:
        """The heaviest launches as text lines: count, bytes read / written, kind, name and label."""
        rows = sorted(self.launches, key=lambda launch: -launch.count * launch.bytes)[:limit]
        return "\n".join(
            f"{launch.count:5d} x {launch.bytes_read:>12,d} r {launch.bytes_written:>11,d} w  {launch.kind:24s} "
            f"{launch.name}{' COPY' if launch.copy else ''}{' SLICE OF ' + ','.join(launch.slice_of) if launch.slice_of else ''}"  # noqa: E501
            f"  {launch.label}"
            for launch in rows
        )


def launch_report(text: str) -> LaunchReport:
    """Every kernel launch of the compiled program `text` (XLA:GPU's scheduled HLO), with its bytes and count."""
    module = parse_hlo(text)
    walker = _Walker(module)
    walker.walk(module.entry, (), 1)
    return LaunchReport(tuple(walker.launches), walker.trip_counts)


class _Walker:
    def __init__(self, module: HloModule):
        self.module = module
        self.launches: list[Launch] = []
        self.trip_counts: dict[str, int] = {}
        self.callers: dict[str, tuple[Computation, Instruction]] = {}

    def walk(self, computation: Computation, loops: tuple[str, ...], count: int) -> None:
        for instruction in computation.instructions:
            opcode = instruction.opcode
            if opcode == "while":
                body = instruction.attribute("body")
                condition = instruction.attribute("condition")
                trips = _trip_count(instruction)
                self.trip_counts[body] = trips
                for name in (body, condition):
                    self.callers[name] = (computation, instruction)
                self.walk(self.module.computations[body], (*loops, body), count * trips)
                self.walk(self.module.computations[condition], (*loops, body), count * trips)
            elif opcode in ("call", "conditional"):
                names = re.findall(r"%([\w.\-]+)", instruction.attributes.split("to_apply=")[-1])
                if opcode == "conditional":
                    names = re.findall(r"%([\w.\-]+)", instruction.attributes)
                for name in names:
                    if name in self.module.computations:
                        self.callers[name] = (computation, instruction)
                        self.walk(self.module.computations[name], loops, count)
            elif opcode not in _NOT_LAUNCHES and not opcode.endswith("-done"):
                self.launches.append(self._launch(computation, instruction, loops, count))

    def _launch(self, computation: Computation, instruction: Instruction, loops, count) -> Launch:
        opcode = instruction.opcode
        result = instruction.shape
        if opcode.endswith("-start") and result.dtype is None and len(result.elements) >= 2:
            result = result.elements[1]  # ((operands), result, context)
        operands = [computation.by_name[name] for name in instruction.operands if name in computation.by_name]
        fused_name = instruction.attribute("calls")
        fused = self.module.computations.get(fused_name) if fused_name else None
        kind = instruction.attribute("kind") or opcode
        copy, sliced = opcode in ("copy", "copy-start"), []
        if opcode == "custom-call":
            kind = instruction.attribute("custom_call_target") or "custom-call"
            read, written = _custom_call_bytes(instruction, operands, result)
        elif fused is not None:
            read, written, sliced_params = _fusion_bytes(fused, operands, result)
            copy = all(i.opcode in _DATA_MOVEMENT for i in fused.instructions) and not _in_place_roots(fused)
            sliced = [operands[p] for p in sliced_params if p < len(operands)] if copy else []
        else:
            read, written = sum(o.shape.nbytes for o in operands), result.nbytes
        slice_of = tuple(dict.fromkeys(p for o in sliced if (p := self._parameter_origin(computation, o))))
        label = re.search(r'op_name="([^"]*)"', instruction.attributes)
        return Launch(
            instruction.name,
            opcode,
            kind,
            loops,
            count,
            int(read),
            int(written),
            copy,
            slice_of,
            label[1] if label else "",
        )

    def _parameter_origin(self, computation: Computation, value: Instruction, index: tuple[int, ...] = ()):
        """The ENTRY parameter a value is (a view of, a tuple element of, a loop-carried copy of), or None."""
        for _ in range(64):
            if value.opcode in _VIEWS | {"copy"} and value.operands:
                value = computation.by_name[value.operands[0]]
            elif value.opcode == "get-tuple-element":
                index = (int(value.attribute("index")), *index)
                value = computation.by_name[value.operands[0]]
            elif value.opcode == "tuple" and index:
                value, index = computation.by_name[value.operands[index[0]]], index[1:]
            elif value.opcode == "parameter":
                if computation.is_entry:
                    return value.name if not index else None
                caller = self.callers.get(computation.name)
                if caller is None:
                    return None
                computation, call = caller
                operand = call.operands[0] if call.opcode == "while" else call.operands[value.literal]
                value = computation.by_name[operand]
            else:
                return None
        return None


def _trip_count(instruction: Instruction) -> int:
    match = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', instruction.attributes)
    return int(match[1]) if match else 1


def _custom_call_bytes(instruction: Instruction, operands: list[Instruction], result: Shape) -> tuple[int, int]:
    metadata = re.search(r'serialized_metadata\s*=\s*"((?:[^"\\]|\\.)*)"', instruction.attributes)
    if metadata:
        try:
            text = re.sub(r"\\([0-9A-Fa-f]{2})", lambda m: chr(int(m[1], 16)), metadata[1])  # MLIR's escapes
            stated = json.loads(text).get(KERNEL_BYTES_KEY)
        except ValueError:
            stated = None
        if stated:
            read, written = json.loads(stated)
            return int(read), int(written)
    target = instruction.attribute("custom_call_target") or ""
    if target.startswith("__cublas") and result.dtype is None and result.elements:
        result = result.elements[0]  # (output, workspace)
    return sum(o.shape.nbytes for o in operands), result.nbytes


def _through_views(computation: Computation, name: str) -> Iterator[Instruction]:
    """The users of a value, looking through bitcasts and reshapes."""
    for user in computation.users.get(name, []):
        if user.opcode in _VIEWS:
            yield from _through_views(computation, user.name)
        else:
            yield user


def _in_place_roots(fused: Computation) -> list[Instruction]:
    """The dynamic-update-slice ops whose results are the fusion's outputs (written in place)."""
    root = fused.root
    outputs = [fused.by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
    found = []
    for out in outputs:
        while out.opcode in _VIEWS:
            out = fused.by_name[out.operands[0]]
        if out.opcode == "dynamic-update-slice":
            found.append(out)
    return found


def _fusion_bytes(fused: Computation, operands: list[Instruction], result: Shape) -> tuple[int, int, list[int]]:
    """(bytes read, bytes written, indices of the operands read only through slices) of one fusion."""
    in_place = _in_place_roots(fused)
    read, sliced = 0, []
    for index, operand in enumerate(operands):
        param = fused.parameter(index)
        if param is None:
            read += operand.shape.nbytes
            continue
        users = list(_through_views(fused, param.name))
        views = {param.name} | {u.name for u in _views_of(fused, param.name)}
        if users and all(u.opcode in _SLICING and u.operands[0] in views for u in users):
            read += min(operand.shape.nbytes, sum(u.shape.nbytes for u in users))
            sliced.append(index)
        elif users and all(
            u.opcode == "dynamic-update-slice" and u.operands[0] in views and u.name in {d.name for d in in_place}
            for u in users
        ):
            continue  # the buffer updated in place: only the update is written, nothing read
        else:
            read += operand.shape.nbytes
    written = result.nbytes
    if in_place:
        updates = sum(fused.by_name[u.operands[1]].shape.nbytes for u in in_place)
        replaced = sum(u.shape.nbytes for u in in_place)
        written = written - replaced + updates
    return read, written, sliced


def _views_of(computation: Computation, name: str) -> Iterator[Instruction]:
    for user in computation.users.get(name, []):
        if user.opcode in _VIEWS:
            yield user
            yield from _views_of(computation, user.name)
