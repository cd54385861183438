"""Tests for tpu_reason.metrics: the JSONL log (later rows for a step win) and the PNG grid."""

import json

import matplotlib.image

from tpu_reason.metrics import MetricsLog


def test_plot_lays_panels_in_rows_and_skips_missing_keys(tmp_path):
  log = MetricsLog(tmp_path)
  for step in range(1, 21):
    log.log(step, {"reward": step / 10, "kl": 0.01 * step})
  log.log(20, {"reward": 5.0})  # a resumed step: the later row wins
  log.log(10, {"accuracy": 0.5}, "eval")
  keys = [("train", "reward"), ("train", "kl"), ("eval", "accuracy"), ("train", "absent")]
  path = log.plot(keys, "curves.png", "t", per_row=2)
  log.close()
  height, width, _ = matplotlib.image.imread(path).shape
  assert (width, height) == (round(2 * 4.2 * 110), round(2 * 3.2 * 110))  # 3 panels: a 2 x 2 grid
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[-2] == {"step": 20, "split": "train", "reward": 5.0}
  assert log.plot([("train", "absent")], "none.png", "t") is None


def test_truncate_drops_rows_a_resumed_run_logs_again(tmp_path):
  log = MetricsLog(tmp_path)
  log.log(0, {"eval_loss": 2.0}, "eval")
  for step in (1, 2, 3):  # killed after step 3, last checkpoint at step 2
    log.log(step, {"loss": float(step)})
  log.log(2, {"eval_loss": 1.5}, "eval")
  log.truncate(2)
  assert [(r["split"], r["step"]) for r in log.history()] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]
  log.truncate(0)  # a fresh start (train.resume=none) measures everything again
  assert log.history() == []
  quiet = MetricsLog(tmp_path / "other", write=False)  # not process 0 of a multi-host run
  quiet.log(1, {"loss": 1.0})
  quiet.truncate(0)
  assert not (tmp_path / "other").exists()
