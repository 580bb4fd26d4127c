"""The run directory: metrics.jsonl, resume truncation, TensorBoard events, plots."""

import json

from megarlhf.config import LayoutConfig
from megarlhf.trainers.run import RunDir

CFG = LayoutConfig()  # any config dataclass: written to config.yaml


def test_metrics_tensorboard_and_plot(tmp_path):
    run = RunDir(tmp_path, CFG, is_main=True, resume=False)
    for step in range(1, 4):
        run.log_metrics(step, {"objective/scores": step / 10, "objective/kl": float("nan")})
    png = run.plot("plots/ppo.png", ["objective/scores", "missing"], title="t")
    run.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["objective/scores"] for r in rows] == [0.1, 0.2, 0.3]
    assert rows[0]["objective/kl"] is None  # non-finite values become null
    assert png is not None and png.stat().st_size > 5_000

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("objective/scores")
    assert [(e.step, round(e.value, 6)) for e in scalars] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert "objective/kl" not in events.Tags()["scalars"]


def test_resume_truncates_later_steps(tmp_path):
    run = RunDir(tmp_path, CFG, is_main=True, resume=False)
    for step in range(1, 6):
        run.log_metrics(step, {"loss": float(step)})
    run.close()
    run = RunDir(tmp_path, CFG, is_main=True, resume=True)
    run.truncate_metrics(3)
    run.log_metrics(4, {"loss": 40.0})
    run.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_non_main_rank_writes_nothing(tmp_path):
    run = RunDir(tmp_path / "x", CFG, is_main=False, resume=False)
    run.log_metrics(1, {"loss": 1.0})
    assert run.plot("p.png", ["loss"], "t") is None
    run.close()
    assert not (tmp_path / "x").exists()


