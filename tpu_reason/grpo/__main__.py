"""`python -m tpu_reason.grpo`: see `tpu_reason.grpo.cli`."""

from tpu_reason.grpo.cli import main

main()
