"""Tests for tpu_reason.mesh and tpu_reason.sharding on 8 fake CPU devices (see conftest.py): mesh shapes, the
logical-axis rules, and sharded forwards that must match the single-device forward."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import TINY_GEMMA3, TINY_JIT, TINY_LLAMA, tiny_params
from tpu_reason import lora, mesh, sharding
from tpu_reason.config import LoraCfg, MeshCfg
from tpu_reason.errors import UserError
from tpu_reason.models.transformer import forward, logits, param_shapes
from tpu_reason.tree import flatten

fwd = jax.jit(forward, static_argnames=("cfg",))  # real weights
tiny_fwd = jax.jit(forward, static_argnames=("cfg",), compiler_options=TINY_JIT)
# (fsdp, tp) meshes of the sharded-forward tests; (1, 1) runs on a 1-device sub-mesh
MESHES = [(8, 1), (2, 4), (1, 1)]


def test_session_has_eight_devices():
  assert jax.device_count() == 8, "conftest.py must set XLA_FLAGS before jax is imported"


@pytest.mark.parametrize("fsdp,tp,want", [(8, 1, (8, 1)), (2, 4, (2, 4)), (1, 8, (1, 8)), (-1, 2, (4, 2)),
                                          (-1, 1, (8, 1)), (-1, 8, (1, 8))])
def test_make_mesh_shapes(fsdp, tp, want):
  m = mesh.make_mesh(MeshCfg(fsdp=fsdp, tp=tp))
  assert m.axis_names == ("fsdp", "tp")
  assert (m.shape["fsdp"], m.shape["tp"]) == want
  assert sorted(d.id for d in m.devices.flat) == list(range(8))  # every device exactly once


def test_make_mesh_on_explicit_devices():
  devs = jax.devices()[2:6]
  m = mesh.make_mesh(MeshCfg(fsdp=-1, tp=2), devices=devs)
  assert (m.shape["fsdp"], m.shape["tp"]) == (2, 2)
  assert [d.id for d in m.devices.flat] == [2, 3, 4, 5]


@pytest.mark.parametrize("fsdp,tp", [(4, 1), (3, 2), (2, 2), (16, 1), (-1, 3), (-1, 16)])
def test_make_mesh_size_mismatch_is_a_user_error(fsdp, tp):
  with pytest.raises(UserError, match="does not cover the 8"):
    mesh.make_mesh(MeshCfg(fsdp=fsdp, tp=tp))


@pytest.mark.parametrize("fsdp,tp", [(0, 1), (-2, 1), (2, 0)])
def test_mesh_cfg_rejects_nonpositive_sizes(fsdp, tp):
  with pytest.raises(UserError):
    MeshCfg(fsdp=fsdp, tp=tp)


# --------------------------------------------------------------------------- spec rules


@pytest.fixture(scope="module")
def mesh_2x4():
  return mesh.make_mesh(MeshCfg(fsdp=2, tp=4))


def test_spec_rules(mesh_2x4):
  m = mesh_2x4
  # kv_heads=3 (SmolLM2) is not divisible by tp=4: that dim stays replicated
  assert sharding.spec((30, 576, 3, 64), ("layers", "embed", "kv_heads", "head_dim"), m) == P(
      None, "fsdp", None, None)
  assert sharding.spec((30, 576, 8, 64), ("layers", "embed", "heads", "head_dim"), m) == P(None, "fsdp", "tp", None)
  assert sharding.spec((30, 576, 1536), ("layers", "embed", "mlp"), m) == P(None, "fsdp", "tp")
  assert sharding.spec((30, 1536, 576), ("layers", "mlp", "embed"), m) == P(None, "tp", "fsdp")
  assert sharding.spec((49152, 576), ("vocab", "embed"), m) == P("tp", "fsdp")
  assert sharding.spec((30, 576), ("layers", "norm"), m) == P(None, None)
  assert sharding.spec((30, 576, 16), ("layers", "embed", "lora"), m) == P(None, "fsdp", None)
  assert sharding.spec((8, 100), ("batch", "seq"), m) == P("fsdp", None)
  # odd model dim: not divisible by fsdp=2 -> replicated
  assert sharding.spec((30, 577, 1536), ("layers", "embed", "mlp"), m) == P(None, None, "tp")


def test_spec_never_uses_a_mesh_axis_twice(mesh_2x4):
  m = mesh_2x4
  assert sharding.spec((8, 8), ("embed", "embed"), m) == P("fsdp", None)
  assert sharding.spec((8, 8, 8), ("heads", "mlp", "vocab"), m) == P("tp", None, None)
  # the first dim falls back to replicated, so the second may take the axis
  assert sharding.spec((3, 8), ("heads", "mlp"), m) == P(None, "tp")


@pytest.mark.parametrize("fsdp,tp", [(8, 1), (2, 4), (1, 8), (4, 2)])
def test_every_param_spec_is_valid(fsdp, tp):
  """For real architectures' tables: each mesh axis at most once, sharded dims divisible."""
  m = mesh.make_mesh(MeshCfg(fsdp=fsdp, tp=tp))
  smollm2 = dataclasses.replace(TINY_LLAMA, vocab_size=49152, embed_dim=576, hidden_dim=1536, num_layers=30,
                                num_heads=9, num_kv_heads=3, head_dim=64)
  gemma = dataclasses.replace(TINY_GEMMA3, vocab_size=262144, embed_dim=640, hidden_dim=2048, num_layers=18,
                              num_heads=4, num_kv_heads=1, head_dim=256)
  for cfg in (smollm2, gemma, TINY_LLAMA):
    table = {**param_shapes(cfg), **{"lora/" + k: v for k, v in lora.shapes(cfg, LoraCfg()).items()}}
    for name, (shape, axes) in table.items():
      s = sharding.spec(shape, axes, m)
      used = [a for a in s if a is not None]
      assert len(used) == len(set(used)), (name, s)
      for dim, a in zip(shape, s):
        assert a is None or dim % m.shape[a] == 0, (name, s)
  # the big matrices really are sharded on a 2x4 mesh
  if (fsdp, tp) == (2, 4):
    assert sharding.spec(*param_shapes(smollm2)["embed"], m) == P("tp", "fsdp")
    assert sharding.spec(*param_shapes(smollm2)["layers/gate"], m) == P(None, "fsdp", "tp")


# --------------------------------------------------------------------------- sharded forward


def _mesh(fsdp, tp):
  devices = jax.devices()[3:4] if fsdp * tp == 1 else None  # a 1-device sub-mesh (not device 0)
  return mesh.make_mesh(MeshCfg(fsdp=fsdp, tp=tp), devices=devices)


def _sharded_hidden(params, cfg, tokens, m, adapters=None, lora_cfg=None, jit=fwd):
  placed = sharding.place(params, sharding.shardings(param_shapes(cfg), m))
  tok = jax.device_put(tokens, sharding.rows_sharding(m, tokens.shape))
  pos = jax.device_put(jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape),
                       sharding.rows_sharding(m, tokens.shape))
  kw = {}
  if adapters is not None:
    kw = dict(lora=sharding.place(adapters, sharding.shardings(lora.shapes(cfg, lora_cfg), m)), lora_scale=2.0)
  out = jit(placed, cfg, tok, pos, **kw)
  assert {d.id for d in out.sharding.device_set} == {d.id for d in m.devices.flat}
  return placed, out


def _expected_bytes_per_device(cfg, m):
  """Bytes one device must hold if every param is split exactly as `spec` says."""
  total = 0
  for shape, axes in param_shapes(cfg).values():
    parts = math.prod(m.shape[a] for a in sharding.spec(shape, axes, m) if a is not None)
    total += math.prod(shape) * 4 // parts
  return total


@pytest.mark.parametrize("fsdp,tp", MESHES)
def test_sharded_forward_matches_single_device_tiny(fsdp, tp):
  cfg, params = TINY_GEMMA3, tiny_params(TINY_GEMMA3)
  lcfg = LoraCfg(rank=4)
  adapters = lora.init(cfg, lcfg, jax.random.key(0, impl="rbg"))
  adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # nonzero B
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 12)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(12), (8, 12))
  ref = tiny_fwd(params, cfg, tokens, pos, lora=adapters, lora_scale=2.0)
  m = _mesh(fsdp, tp)
  placed, out = _sharded_hidden(params, cfg, tokens, m, adapters, lcfg, jit=tiny_fwd)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
  assert sharding.bytes_per_device(placed) == _expected_bytes_per_device(cfg, m)
  if fsdp == 8:  # embed dim 32 split 8 ways
    assert placed["embed"].addressable_shards[0].data.shape == (cfg.vocab_size, cfg.embed_dim // 8)


@pytest.fixture(scope="module")
def smol_batch(smollm2):
  texts = ["What is 2 + 2?", "Name a prime number.", "The capital of France is", "12 * 7 =",
           "Once upon a time", "def add(a, b):", "Tom has 5 apples.", "<reasoning>"]
  rows = [smollm2.encode(t)[:6] for t in texts]
  t = min(len(r) for r in rows)
  tokens = jnp.asarray([r[:t] for r in rows], jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t), tokens.shape)
  ref = fwd(smollm2.params, smollm2.cfg, tokens, pos)
  return tokens, ref, np.asarray(logits(smollm2.params, smollm2.cfg, ref[:, -1:]))


@pytest.mark.parametrize("fsdp,tp", MESHES)
@pytest.mark.slow
def test_sharded_forward_matches_single_device_smollm2(smollm2, smol_batch, fsdp, tp):
  cfg = smollm2.cfg
  tokens, ref_hidden, ref_logits = smol_batch
  m = _mesh(fsdp, tp)
  placed, hidden = _sharded_hidden(smollm2.params, cfg, tokens, m)
  # SmolLM2's final hidden states reach ~35: a sharded matmul sums in a different order,
  # which costs a few dozen f32 ulps there, hence rtol 1e-5 on top of atol 1e-4
  np.testing.assert_allclose(hidden, ref_hidden, atol=1e-4, rtol=1e-5)
  out = np.asarray(logits(placed, cfg, hidden[:, -1:]))
  np.testing.assert_allclose(out, ref_logits, atol=1e-4, rtol=1e-5)
  np.testing.assert_array_equal(out.argmax(-1), ref_logits.argmax(-1))
  total = sum(x.nbytes for x in flatten(smollm2.params).values())
  per_device = sharding.bytes_per_device(placed)
  assert per_device == _expected_bytes_per_device(cfg, m)
  if (fsdp, tp) == (8, 1):  # everything but the norms is split 8 ways over fsdp
    assert per_device < total / 7
    assert placed["layers"]["q"].addressable_shards[0].data.shape == (30, 576 // 8, 9, 64)
  elif (fsdp, tp) == (1, 1):
    assert per_device == total
  else:
    assert per_device < total / 4
