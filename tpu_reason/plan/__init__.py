"""Will it fit? The memory plan of a recipe, known before any TPU is rented (`python -m tpu_reason.plan`).

  analytical  per-device bytes of SFT and GRPO's phases from abstract shapes: `plan`, `table`, `Plan`
  lowering    the programs a run compiles, lowered on a mesh; the CPU compile check (`--devices N`)
  tpu         libtpu's compiler on compile-only chips (`--tpu v5e-8`): per-chip HBM, time on paper
  cli         the command: flags, `run`, `main`
"""

from tpu_reason.plan.analytical import (GIB, Phase, Plan, abstract_batch, activation_bytes, base_params,  # noqa: F401
                                        check_mesh, full_tree, grpo_batch, grpo_loss, local_tree, nbytes,
                                        packed_batch, plan, residual_bytes, sft_batch, sft_loss, table)
from tpu_reason.plan.cli import main, n_devices, run  # noqa: F401
from tpu_reason.plan.lowering import lower_all, lower_sft_step, stand_in, xla_bytes  # noqa: F401
from tpu_reason.plan.tpu import (TIME_HEAD, TPU_HEAD, TPUS, V5E_HBM_GIB, Compiled, all_gathers,  # noqa: F401
                                 chosen_programs, refusal, run_tpu, tpu_devices)
