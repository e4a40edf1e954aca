"""The shared tqdm settings: a bar only on a terminal (or forced), never when disabled, showing
rate and ETA; log lines printed above a live bar; no monitor thread."""

from __future__ import annotations

import io
import sys
import threading

import pytest
import tqdm.std

from megallama.data.progress_bar import is_terminal, progress_bar, write_line


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    """tqdm's clock (``self._time``, bound from ``tqdm.std.time`` when a bar is made)."""
    fake = _Clock()
    monkeypatch.setattr(tqdm.std, "time", fake)
    return fake


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_when_not_a_terminal_or_disabled(clock: _Clock) -> None:
    for out, enabled in ((io.StringIO(), True), (_Tty(), False), (io.StringIO(), False)):
        bar = progress_bar(10, enabled=enabled, file=out)
        bar.update(5)
        bar.close()
        assert bar.disable and out.getvalue() == ""
    forced_but_disabled = io.StringIO()
    progress_bar(10, enabled=False, file=forced_but_disabled, force=True).close()
    assert forced_but_disabled.getvalue() == ""


def test_default_stream_is_stderr_at_call_time(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert is_terminal(tty) and not is_terminal(io.StringIO())
    bar = progress_bar(4, unit="doc")
    bar.update(4)
    bar.close()
    assert "4/4" in tty.getvalue()


def test_forced_on_bar_shows_rate_and_eta(clock: _Clock) -> None:
    out = io.StringIO()
    bar = progress_bar(20, file=out, force=True, unit="step")
    for _ in range(5):
        clock.now += 0.5
        bar.update(1)
    last = out.getvalue().split("\r")[-1]
    assert "25%" in last and "5/20" in last and "2.00step/s" in last
    assert "elapsed 00:02" in last and "ETA 00:07" in last
    bar.close()


def test_bytes_bar_shows_bytes_per_second(clock: _Clock) -> None:
    out = io.StringIO()
    bar = progress_bar(3 * 10**9, file=out, force=True, unit="B", unit_scale=True, smoothing=0)
    clock.now += 2.0
    bar.set_postfix_str("layers.0.attention.wq.weight", refresh=False)
    bar.update(10**9)
    last = out.getvalue().split("\r")[-1]
    assert "1.00G/3.00G" in last and "500MB/s" in last and "ETA 00:04" in last
    assert last.rstrip().endswith("layers.0.attention.wq.weight]")
    bar.close()


def test_write_line_keeps_the_bar_below(clock: _Clock) -> None:
    out = _Tty()
    bar = progress_bar(10, file=out, unit="step")
    clock.now += 1.0
    bar.update(3)
    write_line("a log line", out)
    text = out.getvalue()
    before, after = text.split("a log line\n")
    assert before.endswith("\r")  # the bar was cleared, the line printed whole
    assert "3/10" in after  # and the bar redrawn below it
    bar.close()
    plain = io.StringIO()
    write_line("no bar here", plain)
    assert plain.getvalue() == "no bar here\n"


def test_no_monitor_thread() -> None:
    before = threading.active_count()
    bar = progress_bar(10, file=_Tty())
    assert threading.active_count() == before  # preprocessing forks only single-threaded
    assert type(bar).monitor_interval == 0
    bar.close()
