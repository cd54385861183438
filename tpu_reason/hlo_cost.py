"""Per-chip FLOPs, HBM bytes and collective bytes of a compiled program, read from its HLO text.

XLA's `compiled.cost_analysis()` counts a loop body once, so under `scan` / `while_loop` (the
layer scan inside the decode loop) it is off by the trip counts. This module parses the
post-optimisation HLO text (`compiled.as_text()`) and weights every instruction by the trip
counts of all the loops around it:

  FLOPs        dots and convolutions only: 2 x output elements x contracted size (a convolution's
               padded window positions excluded, as XLA's own cost analysis does); elementwise,
               reductions and transcendentals are ignored (a few % of a transformer's matmuls)
  HBM bytes    each top-level instruction of a non-fused computation reads its operands and
               writes its output; a fusion reads its operands and writes its outputs, where an
               operand read only through a slice costs the slice, one updated in place (dynamic-
               update-slice) costs the update, and one passed straight through costs nothing;
               buffers the compiler placed off HBM (TPU layouts `S(n)`, n != 0: VMEM, SMEM) and
               layout padding are not counted; bookkeeping ops (parameter, tuple, bitcast, ...) move nothing
  collectives  each all-gather / all-reduce / reduce-scatter / all-to-all / collective-permute
               once per channel (an async one appears as a start, continuation fusions and a
               done sharing one `channel_id`), with its array size V (the gathered result, the
               reduced operand) and its replica group size

A while loop's trip count is its `known_trip_count` when the compiler gives one, else its
condition's `counter < constant` against the counter's constant start, else the caller's count
for the loop's `op_name` (the decode `while_loop` runs until every row stops: a data-dependent
count), else 1 (listed in `Cost.unknown_loops`). A conditional counts its costliest branch.

`roofline` turns a `Cost` into time on a chip from vendor figures (`Chip`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

# the op_name jax gives `sampler.decode`'s while_loop: one iteration generates one token of every row
DECODE_LOOP = "jit(decode)/while"
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# ops that move no data of their own (their operands' producers and users already count it)
FREE = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all", "partition-id", "replica-id",
        "opt-barrier", "add-dependency", "while", "call", "conditional", "domain", "iota"}
SLICING = {"dynamic-slice", "slice", "gather"}
DTYPE_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32,
              "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128, "token": 0}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\](?:\{([^}]*)\})?")


# --------------------------------------------------------------------------- parsing


@dataclasses.dataclass(frozen=True)
class Array:
  """One array of an instruction's (possibly tuple) type."""

  dtype: str
  dims: tuple[int, ...]
  space: int  # memory space: 0 = HBM (or a CPU's memory), else on-chip (TPU `S(1)` = VMEM)

  @property
  def elements(self) -> int:
    return math.prod(self.dims)

  @property
  def bytes(self) -> int:
    return self.elements * DTYPE_BITS.get(self.dtype, 32) // 8


@dataclasses.dataclass(frozen=True)
class Inst:
  """One HLO instruction: `name = type opcode(operands), attrs`."""

  name: str
  arrays: tuple[Array, ...]  # the leaves of its type, in order
  opcode: str
  operands: tuple[str, ...]
  args: str  # the text inside the parentheses (a parameter's index, a constant's value)
  attrs: str
  root: bool = False

  def attr(self, key: str) -> str | None:
    m = re.search(rf"\b{key}=(%?[\w.\-]+)", self.attrs)
    return m.group(1).lstrip("%") if m else None

  @property
  def op_name(self) -> str:
    m = re.search(r'op_name="([^"]*)"', self.attrs)
    return m.group(1) if m else ""

  @property
  def hbm_bytes(self) -> int:
    return sum(a.bytes for a in self.arrays if a.space == 0)


@dataclasses.dataclass(frozen=True)
class Module:
  """An HLO module: its computations' instructions by name, and the entry computation."""

  comps: dict[str, tuple[Inst, ...]]
  entry: str
  partitions: int

  @functools.cached_property
  def insts(self) -> dict[str, Inst]:
    return {i.name: i for body in self.comps.values() for i in body}


def arrays(type_text: str) -> tuple[Array, ...]:
  """The arrays of an HLO type (`bf16[8,64]{1,0:T(8,128)S(1)}`, or a tuple of them)."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(type_text):
    space = re.search(r"S\((\d+)\)", layout or "")
    out.append(Array(dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
  return tuple(out)


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at `text[start]`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def instruction(line: str) -> Inst | None:
  """Parse one instruction line (None for anything else)."""
  m = re.match(r"\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
  if not m:
    return None
  pos = m.end()
  end = _balanced(line, pos) if line[pos] == "(" else line.index(" ", pos)
  type_text = line[pos:end]
  op = re.match(r"\s*([\w\-]+)\(", line[end:])
  if not op:
    return None
  open_at = end + op.end() - 1
  close = _balanced(line, open_at)
  operands = tuple(re.findall(r"%([\w.\-]+)", line[open_at:close]))
  args = line[open_at + 1:close - 1]
  return Inst(m.group(2), arrays(type_text), op.group(1), operands, args, line[close:], bool(m.group(1)))


def parse(text: str) -> Module:
  """An HLO module from `compiled.as_text()` (or any HLO text dump)."""
  text = re.sub(r"/\*.*?\*/", "", text)
  comps, entry, current = {}, "", None
  for line in text.splitlines():
    head = re.match(r"(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$", line)
    if head and not line.startswith(" "):
      current = head.group(2)
      comps[current] = []
      entry = current if head.group(1) else entry
    elif line.strip() == "}":
      current = None
    elif current is not None and (inst := instruction(line)):
      comps[current].append(inst)
  partitions = re.search(r"num_partitions=(\d+)", text)
  return Module({k: tuple(v) for k, v in comps.items()}, entry, int(partitions.group(1)) if partitions else 1)


# --------------------------------------------------------------------------- counting


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective op: its kind, array size V in bytes, replica group size, and how many times it runs."""

  kind: str
  bytes: int
  group: int
  count: float = 1


@dataclasses.dataclass(frozen=True)
class Cost:
  """Loop-weighted per-chip totals of a computation."""

  flops: float = 0.0
  hbm_bytes: float = 0.0
  collectives: dict = dataclasses.field(default_factory=dict)  # channel (or op name) -> Collective
  unknown_loops: tuple[str, ...] = ()  # op_names of loops counted once for want of a trip count

  def __add__(self, other: Cost) -> Cost:
    merged = dict(self.collectives)
    for key, c in other.collectives.items():  # one async collective seen in several fusions: once
      merged[key] = max(merged.get(key, c), c, key=lambda x: x.count)
    return Cost(self.flops + other.flops, self.hbm_bytes + other.hbm_bytes, merged,
                tuple(dict.fromkeys(self.unknown_loops + other.unknown_loops)))

  def times(self, n: float) -> Cost:
    scaled = {k: dataclasses.replace(c, count=c.count * n) for k, c in self.collectives.items()}
    return Cost(self.flops * n, self.hbm_bytes * n, scaled, self.unknown_loops)

  def collective_bytes(self) -> dict[str, float]:
    """Bytes (V x runs) by collective kind."""
    out: dict[str, float] = {}
    for c in self.collectives.values():
      out[c.kind] = out.get(c.kind, 0.0) + c.bytes * c.count
    return out


def dot_flops(m: Module, i: Inst) -> float:
  """2 x output elements x the product of the lhs contracting dims."""
  lhs = m.insts[i.operands[0]].arrays[0].dims
  dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs)
  contracted = math.prod(lhs[int(d)] for d in dims.group(1).split(",") if d) if dims else 1
  return 2.0 * i.arrays[0].elements * contracted


def _window_pairs(size: int, out: int, window: dict) -> int:
  """(output position, window tap) pairs of one spatial dim that land on the input, not on padding."""
  stride, ld, last = window["stride"], window["lhs_dilate"], (size - 1) * window["lhs_dilate"]
  pairs = 0
  for tap in range(window["size"]):
    offset = tap * window["rhs_dilate"] - window["pad_lo"]  # input position of output 0 at this tap
    if ld == 1:  # outputs o with 0 <= o * stride + offset <= last
      lo, hi = max(0, -(offset // stride)), min(out - 1, (last - offset) // stride)
      pairs += max(0, hi - lo + 1)
    else:  # lhs dilation: only every ld-th position holds input
      pairs += sum(1 for o in range(out) if 0 <= o * stride + offset <= last and (o * stride + offset) % ld == 0)
  return pairs


def conv_windows(attrs: str, n: int) -> list[dict]:
  """The `window={...}` of a convolution, one dict per spatial dim."""
  text = re.search(r"window=\{([^}]*)\}", attrs)
  fields = dict(re.findall(r"(\w+)=(\S+)", text.group(1))) if text else {}

  def field(name, default):
    return [v for v in fields[name].split("x")] if name in fields else [default] * n

  pads = [p.split("_") for p in field("pad", "0_0")]
  return [{"size": int(s), "stride": int(st), "pad_lo": int(p[0]), "lhs_dilate": int(ld), "rhs_dilate": int(rd)}
          for s, st, p, ld, rd in zip(field("size", "1"), field("stride", "1"), pads, field("lhs_dilate", "1"),
                                      field("rhs_dilate", "1"))]


def conv_flops(m: Module, i: Inst) -> float:
  """2 x batch x output features x input features per group x valid window pairs (XLA's count)."""
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", i.attrs)
  lhs_l, rhs_l, out_l = labels.groups()
  lhs, rhs, out = (m.insts[i.operands[0]].arrays[0].dims, m.insts[i.operands[1]].arrays[0].dims, i.arrays[0].dims)
  spatial = [c for c in out_l if c.isdigit()]
  windows = conv_windows(i.attrs, len(spatial))
  pairs = math.prod(_window_pairs(lhs[lhs_l.index(c)], out[out_l.index(c)], w) for c, w in zip(spatial, windows))
  return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * rhs[rhs_l.index("i")] * pairs


def group_size(m: Module, i: Inst) -> int:
  """Devices in each replica group of a collective (every partition when the groups are left empty)."""
  a = i.attrs
  if (mesh := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", a)):
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    return math.prod(int(sizes[ax]) for ax in re.findall(r"'(\w+)'", mesh.group(2)))
  if (iota := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", a)):
    return int(iota.group(2))
  if (listed := re.search(r"replica_groups=\{\{([\d,]*)\}", a)):
    return len(listed.group(1).split(","))
  if "source_target_pairs" in a:
    return 2
  return m.partitions


def collective(m: Module, i: Inst) -> Collective | None:
  """The collective `i` starts (its `-done` half and non-collectives: None)."""
  kind = i.opcode.removesuffix("-start")
  if kind not in COLLECTIVES:
    return None
  operand = sum(a.bytes for o in i.operands if o in m.insts for a in m.insts[o].arrays)
  n = group_size(m, i)
  return Collective(kind, operand * n if kind == "all-gather" else operand, n)


def _users(body: tuple[Inst, ...]) -> dict[str, list[Inst]]:
  users: dict[str, list[Inst]] = {}
  for i in body:
    for o in i.operands:
      users.setdefault(o, []).append(i)
  return users


def _param_read(m: Module, param: Inst, users: dict[str, list[Inst]], depth: int = 0) -> int:
  """HBM bytes a fusion reads of one parameter: a slice's worth when only sliced, none when updated in place."""
  uses = users.get(param.name, [])
  if not uses:  # dead, or a nested fusion's result that its caller reads whole
    return param.hbm_bytes if param.root or param.opcode != "parameter" else 0
  if depth > 8:
    return param.hbm_bytes
  total = 0
  for u in uses:
    if u.opcode in SLICING and u.operands[0] == param.name:
      total += u.hbm_bytes or sum(a.bytes for a in u.arrays)  # sliced into on-chip memory: still read from HBM
    elif u.opcode == "dynamic-update-slice" and u.operands[0] == param.name:
      pass  # the buffer is updated in place: only the update moves (counted on the output side)
    elif u.opcode == "bitcast":
      total += _param_read(m, u, users, depth + 1)
    elif u.opcode == "tuple" and u.root:
      pass  # passed straight through to the output
    elif u.opcode == "fusion" and u.attr("calls") in m.comps:  # a nested fusion: how it reads its parameter
      inner = m.comps[u.attr("calls")]
      inner_users = _users(inner)
      slots = {k for k, o in enumerate(u.operands) if o == param.name}
      total += sum(_param_read(m, x, inner_users, depth + 1) for x in inner
                   if x.opcode == "parameter" and int(x.args) in slots)
    else:
      return param.hbm_bytes
  return min(total, param.hbm_bytes)


def _written(out: Inst, by_name: dict[str, Inst]) -> int:
  """HBM bytes one fusion output writes: nothing when passed through, the update when updated in place."""
  if out.opcode == "parameter":
    return 0
  if out.opcode == "dynamic-update-slice":
    return by_name[out.operands[1]].hbm_bytes if out.operands[1] in by_name else 0
  return out.hbm_bytes


def fusion_bytes(m: Module, i: Inst) -> int:
  """A top-level fusion's HBM traffic: the operands it reads, the outputs it writes."""
  body = m.comps.get(i.attr("calls") or "", ())
  if not body:
    return sum(m.insts[o].hbm_bytes for o in i.operands if o in m.insts) + i.hbm_bytes
  by_name, users = {x.name: x for x in body}, _users(body)
  # a parameter's layout says where the caller's buffer lives (TPU: `S(1)` is VMEM, not HBM)
  read = sum(_param_read(m, p, users) for p in body if p.opcode == "parameter")
  root = next(x for x in body if x.root)
  outs = [by_name[o] for o in root.operands] if root.opcode == "tuple" else [root]
  written = sum(_written(o, by_name) for o, a in zip(outs, i.arrays) if a.space == 0)
  return read + written


def inst_bytes(m: Module, i: Inst) -> int:
  """HBM bytes one top-level instruction of a non-fused computation moves."""
  if i.opcode in FREE:
    return 0
  if i.opcode == "fusion":
    return fusion_bytes(m, i)
  if i.opcode.endswith("-done"):  # the async pair: the start reads, the done writes
    return i.hbm_bytes
  if i.opcode.endswith("-start"):
    return sum(m.insts[o].hbm_bytes for o in i.operands if o in m.insts)
  if i.opcode in SLICING:
    return 2 * i.hbm_bytes
  if i.opcode == "dynamic-update-slice":
    return 2 * m.insts[i.operands[1]].hbm_bytes
  return sum(m.insts[o].hbm_bytes for o in i.operands if o in m.insts) + i.hbm_bytes


def _constant(m: Module, name: str) -> int | None:
  """The integer a scalar constant holds, seen through copies (None: not a constant)."""
  i = m.insts.get(name)
  while i is not None and i.opcode in ("copy", "bitcast", "convert") and i.operands:
    i = m.insts.get(i.operands[0])
  if i is None or i.opcode != "constant":
    return None
  value = re.fullmatch(r"\s*(-?\d+)\s*", i.args)
  return int(value.group(1)) if value else None


def counted_trips(m: Module, loop: Inst) -> int | None:
  """A while loop's trip count: the compiler's `known_trip_count`, else `counter < N` from a constant start."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
  if known:
    return int(known.group(1))
  cond = m.comps.get(loop.attr("condition") or "", ())
  root = next((x for x in cond if x.root), None)
  direction = re.search(r"direction=(\w+)", root.attrs) if root and root.opcode == "compare" else None
  if not direction or direction.group(1) not in ("LT", "LE") or len(root.operands) != 2:
    return None
  counter, limit = (m.insts.get(o) for o in root.operands)
  bound = _constant(m, root.operands[1])
  if counter is None or counter.opcode != "get-tuple-element" or bound is None:
    return None
  init = m.insts.get(loop.operands[0])
  index = int(re.search(r"index=(\d+)", counter.attrs).group(1))
  start = _constant(m, init.operands[index]) if init is not None and init.opcode == "tuple" else None
  if start is None:
    return None
  return bound - start + (direction.group(1) == "LE")


class Counter:
  """Walks a module's call graph from a computation, weighting each instruction by its loops' trip counts."""

  def __init__(self, m: Module, trips: dict[str, int] | None = None):
    self.m, self.trips = m, dict(trips or {})
    self.cost = functools.lru_cache(maxsize=None)(self._cost)

  def loop_trips(self, loop: Inst) -> tuple[float, tuple[str, ...]]:
    """(trip count, the loop's op_name when it had to be taken as 1)."""
    n = counted_trips(self.m, loop)
    if n is None and loop.op_name in self.trips:
      n = self.trips[loop.op_name]
    return (1.0, (loop.op_name or loop.name,)) if n is None else (float(n), ())

  def inst(self, i: Inst, fused: bool) -> Cost:
    m = self.m
    flops = dot_flops(m, i) if i.opcode == "dot" else conv_flops(m, i) if i.opcode == "convolution" else 0.0
    c = collective(m, i)
    key = re.search(r"channel_id=(\d+)", i.attrs)
    own = Cost(flops, 0.0 if fused else inst_bytes(m, i),
               {(key.group(1) if key else i.name): c} if c else {})
    if i.opcode == "while":
      n, unknown = self.loop_trips(i)
      body, cond = self.cost(i.attr("body"), False), self.cost(i.attr("condition"), False)
      return own + body.times(n) + cond.times(n + 1) + Cost(unknown_loops=unknown)
    if i.opcode == "conditional":
      names = re.findall(r"%([\w.\-]+)", (re.search(r"branch_computations=\{([^}]*)\}", i.attrs) or [None, ""])[1])
      names += [n for n in (i.attr("true_computation"), i.attr("false_computation")) if n]
      branches = [self.cost(n, False) for n in names]
      return own + max(branches, key=lambda b: (b.hbm_bytes, b.flops), default=Cost())
    if i.opcode == "call":
      return own + self.cost(i.attr("to_apply"), False)
    if i.attr("calls"):  # a fusion or an async op's wrapped computation: the caller counted its bytes
      return own + self.cost(i.attr("calls"), True)
    return own

  def _cost(self, comp: str, fused: bool) -> Cost:
    total = Cost()
    for i in self.m.comps.get(comp, ()):
      total = total + self.inst(i, fused)
    return total


def loops(m: Module, op_name: str) -> list[Inst]:
  """The while loops whose op_name is `op_name`."""
  return [i for body in m.comps.values() for i in body if i.opcode == "while" and i.op_name == op_name]


def program_cost(hlo: str | Module, trips: dict[str, int] | None = None) -> Cost:
  """Per-chip cost of a whole compiled program; `trips`: loop op_name -> count for loops the HLO can't count."""
  m = parse(hlo) if isinstance(hlo, str) else hlo
  return Counter(m, trips).cost(m.entry, False)


def iteration_cost(hlo: str | Module, loop: str, trips: dict[str, int] | None = None) -> Cost:
  """Per-chip cost of ONE iteration of the while loop whose op_name is `loop` (its inner loops at full count)."""
  m = parse(hlo) if isinstance(hlo, str) else hlo
  found = loops(m, loop)
  if not found:
    raise ValueError(f"no while loop with op_name {loop!r} in the HLO")
  counter = Counter(m, trips)
  return counter.cost(found[0].attr("body"), False) + counter.cost(found[0].attr("condition"), False)


def loop_collective_bytes(hlo: str, loop: str = DECODE_LOOP) -> dict[str, float]:
  """Bytes each kind of collective moves per chip in one iteration of `loop` (default: one decoded token)."""
  return iteration_cost(hlo, loop).collective_bytes()


# --------------------------------------------------------------------------- time on paper


@dataclasses.dataclass(frozen=True)
class Chip:
  """A chip's vendor figures: what a roofline divides by."""

  name: str
  flops: float  # peak dense bf16 FLOP/s
  hbm: float  # HBM bytes/s
  link: float  # ICI bytes/s of one link in one direction
  hop: float = 1e-6  # latency of one ICI hop (the scaling book's ~1 us)


# the scaling book's TPU chapter: 1.97e14 bf16 FLOP/s, 8.1e11 B/s HBM (Google's 819 GB/s), 4.5e10 B/s per ICI link
# and direction; a v5e slice below 16 chips a side has no wraparound links, so a ring over an axis is a line
V5E = Chip("TPU v5e", 197e12, 819e9, 45e9)


def collective_seconds(c: Collective, chip: Chip = V5E) -> float:
  """Time of `c.count` runs of a collective over a line of `c.group` chips (one torus axis, no wraparound).

  The chip at the line's end receives the other n - 1 shards over its one link: n - 1 hops of V / n bytes,
  each at least one hop's latency (the scaling book's bandwidth / latency model). An all-reduce is a
  reduce-scatter then an all-gather (2x); an all-to-all moves a quarter of an all-gather's bytes.
  """
  n = c.group
  if n <= 1:
    return 0.0
  line = (n - 1) * max(chip.hop, c.bytes / n / chip.link)
  one = {"all-gather": line, "reduce-scatter": line, "all-reduce": 2 * line, "all-to-all": line / 4,
         "collective-permute": max(chip.hop, c.bytes / chip.link)}[c.kind]
  return c.count * one


@dataclasses.dataclass(frozen=True)
class Roofline:
  """Seconds a cost takes on a chip: compute and HBM overlap each other, collectives do not (an upper bound)."""

  compute_s: float
  hbm_s: float
  ici_s: float

  @property
  def seconds(self) -> float:
    return max(self.compute_s, self.hbm_s) + self.ici_s

  @property
  def overlapped_s(self) -> float:
    """The lower bound: every collective hidden behind compute or HBM traffic."""
    return max(self.compute_s, self.hbm_s, self.ici_s)


def roofline(cost: Cost, chip: Chip = V5E) -> Roofline:
  """`cost` in time on `chip`: FLOPs at peak, HBM bytes at full bandwidth, collectives by `collective_seconds`."""
  ici = sum(collective_seconds(c, chip) for c in cost.collectives.values())
  return Roofline(cost.flops / chip.flops, cost.hbm_bytes / chip.hbm, ici)
