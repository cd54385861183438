"""`python -m tpu_reason.plan`: the memory plan's command (`plan.cli`)."""

from tpu_reason.plan.cli import main

if __name__ == "__main__":
  main()
