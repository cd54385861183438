"""`python -m tpu_reason.curate [--config recipes/X.yaml] [key=value ...]`: curate a training set.

Reads the pool `data.*` describes (or `curate.tasks`, several reasoning-gym tasks),
keeps what passes quality, fits the training shapes, is hard for
`curate.baselines` and samples `curate.target_size` rows across strata; writes
curated.jsonl (teacher JSONL) and report.json / report.png to the output
directory and prints the report. Rerunning the same command reuses the baseline
scores cached there.
"""

from __future__ import annotations

import sys

from tpu_reason import config, config_io, errors
from tpu_reason.curate.pipeline import run


@errors.cli
def main(argv: list[str] | None = None):
  cfg, _ = config_io.parse_args(config.Config, sys.argv[1:] if argv is None else argv)
  report = run(cfg)
  print(report.table())
  print(f"outputs: {', '.join(f'{k}={v}' for k, v in report.outputs.items())}")


if __name__ == "__main__":
  main()
