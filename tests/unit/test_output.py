"""megarlhf/output.py: progress bars in log files, --quiet, the known-warnings filter."""

import io
import warnings

import pytest

from megarlhf import output
from megarlhf.output import filter_known_warnings, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_bar(stream, steps: int = 200) -> str:
    """What a trainer does: a bar, update + set_postfix every step, a printed line now and then."""
    bar = progress_bar(total=steps, desc="sft", stream=stream, leave=True)
    for step in range(steps):
        bar.update(1)
        bar.set_postfix({"loss": f"{1 / (step + 1):.4g}"})
        if step % 50 == 0:
            bar.write(f"step {step}", file=stream)
    bar.close()
    return stream.getvalue()


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    monkeypatch.setenv(output.QUIET_ENV, "0")  # off, and removed again after the test whatever it sets


def test_file_gets_whole_lines_at_most_every_interval():
    text = run_bar(io.StringIO())
    assert "\r" not in text
    bars = [line for line in text.splitlines() if line.startswith("sft:")]
    # Well under 30 s: the bar is drawn when it starts and when it closes, nothing between,
    # although set_postfix ran 200 times and lines were printed between updates.
    assert len(bars) == 2, text
    assert "0/200" in bars[0] and "200/200" in bars[1] and "loss=" in bars[1]
    assert [line for line in text.splitlines() if line.startswith("step")] == [f"step {i}" for i in (0, 50, 100, 150)]


def test_file_interval_follows_tqdm_mininterval(monkeypatch):
    monkeypatch.setenv("TQDM_MININTERVAL", "0")  # every update is due: one line each
    text = run_bar(io.StringIO(), steps=20)
    bars = [line for line in text.splitlines() if line.startswith("sft:")]
    assert "\r" not in text
    assert len(bars) >= 21, text  # the start, then one line per update (and the close)
    assert all("|" in line and "/20" in line for line in bars)


def test_terminal_redraws_in_place():
    text = run_bar(Terminal())
    assert text.count("\r") > 3  # tqdm's usual redraw on the same line


def test_quiet_draws_nothing(monkeypatch):
    output.set_quiet()
    assert output.is_quiet()
    stream = io.StringIO()
    bar = progress_bar(total=5, desc="sft", stream=stream)
    for _ in range(5):
        bar.update(1)
    bar.close()
    assert stream.getvalue() == ""
    output.set_quiet(False)
    assert not output.is_quiet()


def test_known_warnings_filtered_others_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_known_warnings()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
        warnings.warn("Apex is not installed. Falling back to Torch Norm")
        warnings.warn("`load_state_dict` is deprecated and will be removed in future versions.", FutureWarning)
        warnings.warn("something a user should see")
    assert [str(w.message) for w in caught] == ["something a user should see"]


def test_quiet_run_dir_keeps_lines_in_its_log_only(tmp_path, capsys):
    """`megarlhf --quiet`: a trainer's lines and bar stay off the terminal, not out of train.log."""
    from megarlhf.cli import main
    from megarlhf.config import LayoutConfig
    from megarlhf.trainers.run import RunDir

    loud = RunDir(tmp_path / "loud", LayoutConfig(), is_main=True, resume=False)
    loud.say("step 1: loss 2")
    loud.close()
    assert "step 1: loss 2" in capsys.readouterr().out

    assert main(["--quiet", "plan", "--model", "llama3-8b", "--nodes", "1"]) == 0  # the flag sets the switch
    assert output.is_quiet()
    capsys.readouterr()
    quiet = RunDir(tmp_path / "quiet", LayoutConfig(), is_main=True, resume=False)
    bar = quiet.progress(3, 0, desc="sft")
    bar.update(3)
    quiet.say("step 1: loss 2")
    quiet.close()
    captured = capsys.readouterr()
    assert captured.out == "" and "sft" not in captured.err
    assert (tmp_path / "quiet" / "logs" / "train.log").read_text() == "step 1: loss 2\n"
