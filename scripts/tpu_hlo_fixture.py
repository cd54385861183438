"""Write tests/fixtures/hlo/v5e8_decode_like.hlo: libtpu's compiled HLO of a tiny decode-shaped program.

A data-dependent `while_loop` (like `sampler.decode`) around a `scan` over 3 layers whose weights sit
over fsdp=4 x tp=2, as the training layout puts them: each layer's weights are all-gathered inside
the scan, every token. Compile-only v5e:2x4 chips, nothing runs. Run with ALLOW_MULTIPLE_LIBTPU_LOAD=1.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tpu_reason import plan

LAYERS, ROWS, D = 3, 8, 256  # weights bf16[3, 256, 256]: 128 KiB a layer


def decode_like(w_LxDxD, x_BxD, steps):
  def token(carry):
    i, x = carry
    def layer(x, w):
      return jnp.tanh(x @ w), None
    return i + 1, jax.lax.scan(layer, x, w_LxDxD)[0]
  return jax.lax.while_loop(lambda c: c[0] < steps, token, (jnp.int32(0), x_BxD))[1]


def main():
  jax.config.update("jax_platforms", "cpu")
  mesh = Mesh(np.array(plan.tpu_devices("v5e-8")).reshape(4, 2), ("fsdp", "tp"))
  w = jax.ShapeDtypeStruct((LAYERS, D, D), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "fsdp", "tp")))
  x = jax.ShapeDtypeStruct((ROWS, D), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
  steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
  text = jax.jit(decode_like).lower(w, x, steps).compile().as_text()
  out = pathlib.Path(__file__).parents[1] / "tests/fixtures/hlo/v5e8_decode_like.hlo"
  out.write_text(text)
  print(f"{out}: {len(text)} characters")


if __name__ == "__main__":
  main()
