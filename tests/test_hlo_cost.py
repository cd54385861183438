"""hlo_cost: loop-weighted FLOPs, HBM bytes and collective bytes from compiled HLO text, against hand counts.

CPU programs compile on this session's 8 fake devices (conftest); the TPU case reads a fixture that
`scripts/tpu_hlo_fixture.py` wrote with libtpu's compiler for compile-only v5e:2x4 chips.
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tpu_reason import hlo_cost

M, K, N = 16, 32, 24
TPU_FIXTURE = Path(__file__).parent / "fixtures/hlo/v5e8_decode_like.hlo"


def hlo(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def test_one_matmul_is_2mnk_flops_and_reads_both_operands_writes_the_product():
  cost = hlo_cost.program_cost(hlo(lambda a, b: a @ b, jnp.ones((M, K)), jnp.ones((K, N))))
  assert cost.flops == 2 * M * K * N
  assert cost.hbm_bytes == 4 * (M * K + K * N + M * N)
  assert cost.collectives == {} and cost.unknown_loops == ()


@pytest.mark.parametrize("trips", [3, 7])
def test_a_fori_loop_body_counts_once_per_trip(trips):
  def loop(x, w, n):
    return jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ w), x)

  x, w = jnp.ones((M, K)), jnp.ones((K, K))
  text = hlo(lambda x, w: loop(x, w, trips), x, w)
  assert hlo_cost.program_cost(text).flops == trips * 2 * M * K * K
  # bytes too: twice the trips add the body's bytes once more per trip
  longer = hlo_cost.program_cost(hlo(lambda x, w: loop(x, w, 2 * trips), x, w))
  body = hlo_cost.iteration_cost(text, "jit(<lambda>)/while")
  assert body.hbm_bytes > 0
  assert longer.hbm_bytes - hlo_cost.program_cost(text).hbm_bytes == pytest.approx(trips * body.hbm_bytes)


def fsdp_scan(layers: int):
  """A scan over `layers` weights split fsdp=4 x tp=2, each gathered whole inside the scan; 2 rows a chip."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tp"))
  w = jax.ShapeDtypeStruct((layers, K, K), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp", "tp")))
  x = jax.ShapeDtypeStruct((8, K), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))

  def forward(w_LxKxK, x_BxK):
    def layer(x, w):
      return jnp.tanh(x @ jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))), None
    return jax.lax.scan(layer, x_BxK, w_LxKxK)[0]

  return hlo(forward, w, x)


def test_all_gathers_inside_a_scan_count_once_per_layer_with_their_group():
  layers = 5
  cost = hlo_cost.program_cost(fsdp_scan(layers))
  # each chip: 2 rows x a whole K x K layer, per layer
  assert cost.flops == layers * 2 * 2 * K * K
  # a layer's weights leave the scan whole: K x K f32 gathered over fsdp (4), the tp half over tp (2) first
  assert cost.collective_bytes() == {"all-gather": layers * (K * K * 4 + K // 4 * K * 4)}
  assert sorted((c.group, c.count) for c in cost.collectives.values()) == [(2, layers), (4, layers)]


def test_a_data_dependent_loop_takes_the_callers_trip_count():
  def until(x, w):
    return jax.lax.while_loop(lambda c: c[1].sum() < 1e6, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w) + 1), (0, x))[1]

  text = hlo(until, jnp.ones((M, K)), jnp.ones((K, K)))
  once = hlo_cost.program_cost(text)
  assert once.unknown_loops == ("jit(until)/while",)  # counted once, and said so
  assert once.flops == 2 * M * K * K
  told = hlo_cost.program_cost(text, {"jit(until)/while": 9})
  assert told.unknown_loops == () and told.flops == 9 * 2 * M * K * K


def test_tpu_decode_like_program_per_token_and_per_rollout():
  """libtpu's HLO: async collective fusions, S(1) buffers, a scan inside a data-dependent while loop."""
  text = TPU_FIXTURE.read_text()
  layers, rows, d = 3, 8 // 4, 256  # scripts/tpu_hlo_fixture.py: bf16 weights [3, 256, 256] over fsdp=4 x tp=2
  token = hlo_cost.iteration_cost(text, "jit(decode_like)/while")
  assert token.flops == layers * 2 * rows * d * (d // 2)  # the chip's rows times its tp half of each layer
  by_group = {c.group: c for c in token.collectives.values()}
  assert by_group[4].bytes == d * (d // 2) * 2 and by_group[4].count == layers  # the layer's tp half, whole over fsdp
  assert by_group[2].bytes == rows * d * 2  # the activations' tp halves joined
  assert hlo_cost.loop_collective_bytes(text, "jit(decode_like)/while") == {
      "all-gather": layers * (d * (d // 2) * 2 + rows * d * 2)}
  assert hlo_cost.program_cost(text).unknown_loops == ("jit(decode_like)/while",)
  rollout = hlo_cost.program_cost(text, {"jit(decode_like)/while": 10})
  assert rollout.collective_bytes()["all-gather"] == 10 * token.collective_bytes()["all-gather"]
  assert rollout.flops == 10 * token.flops


# A hand-written TPU-style module: an async all-gather whose start, continuation and done fusions share
# channel 7, a VMEM (S(1)) operand, an in-place cache update, a padded convolution, and three ways of
# writing replica groups.
HAND = """HloModule hand, num_partitions=8

%ag_start (p0: bf16[4,64]) -> bf16[16,64] {
  %p0 = bf16[4,64]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[16,64]{1,0} all-gather(%p0), channel_id=7, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}
}

%ag_done (p0.1: bf16[4,64]) -> bf16[16,64] {
  %p0.1 = bf16[4,64]{1,0:S(1)} parameter(0)
  ROOT %all-gather.2 = bf16[16,64]{1,0} all-gather(%p0.1), channel_id=7, replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, dimensions={0}
}

%update (cache: bf16[32,64], row: bf16[1,64], at: s32[]) -> bf16[32,64] {
  %cache = bf16[32,64]{1,0} parameter(0)
  %row = bf16[1,64]{1,0} parameter(1)
  %at = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dus = bf16[32,64]{1,0} dynamic-update-slice(%cache, %row, %at, %zero)
}

%conv (a: bf16[8,32,1], b: bf16[2,16,32]) -> bf16[8,2,16] {
  %a = bf16[8,32,1]{2,1,0} parameter(0)
  %b = bf16[2,16,32]{2,1,0} parameter(1)
  ROOT %convolution.1 = bf16[8,2,16]{2,1,0} convolution(%a, %b), window={size=2 pad=1_1 rhs_reversal=1}, dim_labels=bf0_0oi->b0f
}

ENTRY %main (w: bf16[4,64], v: bf16[4,64], cache.1: bf16[32,64], row.1: bf16[1,64], at.1: s32[], a.1: bf16[8,32,1], b.1: bf16[2,16,32], s: f32[1024]) -> bf16[16,64] {
  %w = bf16[4,64]{1,0} parameter(0)
  %v = bf16[4,64]{1,0:T(8,128)S(1)} parameter(1)
  %cache.1 = bf16[32,64]{1,0} parameter(2)
  %row.1 = bf16[1,64]{1,0} parameter(3)
  %at.1 = s32[] parameter(4)
  %a.1 = bf16[8,32,1]{2,1,0} parameter(5)
  %b.1 = bf16[2,16,32]{2,1,0} parameter(6)
  %s = f32[1024]{0} parameter(7)
  %start = bf16[16,64]{1,0:T(8,128)S(1)} fusion(%w), kind=kCustom, calls=%ag_start
  %done = bf16[16,64]{1,0} fusion(%v), kind=kCustom, calls=%ag_done
  %new = bf16[32,64]{1,0} fusion(%cache.1, %row.1, %at.1), kind=kLoop, calls=%update
  %c = bf16[8,2,16]{2,1,0:S(1)} fusion(%a.1, %b.1), kind=kOutput, calls=%conv
  %ar = f32[1024]{0} all-reduce(%s), channel_id=8, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%update
  %rs = f32[256]{0} reduce-scatter(%s), channel_id=9, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%update
  %all = f32[1024]{0} all-reduce(%s), channel_id=10, replica_groups={}, to_apply=%update
  ROOT %t = (bf16[16,64]{1,0}, bf16[32,64]{1,0}) tuple(%done, %new)
}
"""


def test_hand_module_channels_memory_spaces_in_place_updates_and_padded_convolutions():
  cost = hlo_cost.program_cost(HAND)
  groups = {k: (c.kind, c.bytes, c.group) for k, c in cost.collectives.items()}
  assert groups == {"7": ("all-gather", 16 * 64 * 2, 4),  # start and done fusions: one channel, once
                    "8": ("all-reduce", 4096, 2), "9": ("reduce-scatter", 4096, 4), "10": ("all-reduce", 4096, 8)}
  # the padded window: each output position sees one of the 2 taps, so 8 x 16 outputs x 32 inputs x 2 positions
  assert cost.flops == 2 * 8 * 16 * 32 * 2
  hbm = {"start": 4 * 64 * 2,  # reads w from HBM, writes into VMEM
         "done": 16 * 64 * 2,  # reads v from VMEM, writes HBM
         "update": 2 * 64 * 2 + 4,  # the row in, the row written in place, the index
         "conv": 8 * 32 * 2 + 2 * 16 * 32 * 2,  # both operands from HBM, the result to VMEM
         "collectives": 2 * (4096 + 4096) + 4096 + 1024}
  assert cost.hbm_bytes == sum(hbm.values())


def test_collective_time_matches_the_scaling_books_v5e_all_gather():
  """sharding.md, pop quiz 2: AllGather bf16[2048, 8192] over a 4-chip v5e axis without wraparound."""
  big = hlo_cost.Collective("all-gather", 2 * 2048 * 8192, 4)
  assert hlo_cost.collective_seconds(big) == pytest.approx(3 * 2048 * 8192 * 2 / 4 / 45e9)  # the book's 560 us
  assert hlo_cost.collective_seconds(big) == pytest.approx(680e-6, rel=0.2)  # its measured profile: 680 us
  small = hlo_cost.Collective("all-gather", 2 * 256 * 256, 4)  # latency-bound: 3 hops of ~1 us (measured ~8 us)
  assert hlo_cost.collective_seconds(small) == pytest.approx(3e-6)
  assert hlo_cost.collective_seconds(dataclasses.replace(big, kind="all-reduce")) == pytest.approx(
      2 * hlo_cost.collective_seconds(big))


def test_roofline_overlaps_compute_with_hbm_and_adds_collectives():
  cost = hlo_cost.Cost(flops=197e12 * 2e-3, hbm_bytes=819e9 * 5e-3,
                       collectives={"1": hlo_cost.Collective("all-gather", int(4 * 45e9 * 1e-3), 4, 2)})
  r = hlo_cost.roofline(cost)
  assert (r.compute_s, r.hbm_s, r.ici_s) == pytest.approx((2e-3, 5e-3, 2 * 3e-3))
  assert r.seconds == pytest.approx(11e-3) and r.overlapped_s == pytest.approx(6e-3)
