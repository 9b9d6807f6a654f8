"""The host's idle CPU share, as the drift monitor's schedule reads it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.monitoring.host import HostIdle


def write_stat(path: Path, user: int, idle: int) -> None:
    path.write_text(f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {user} 0 0 {idle} 0 0 0 0 0 0\n")


def test_a_saturated_host_drives_the_share_down_and_an_idle_one_back_up(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    host = HostIdle(stat, smoothing_seconds=1e-9)  # no smoothing: each sample is the share since the last
    write_stat(stat, 0, 0)
    assert host.sample() == 1.0  # nothing to compare with yet: idle
    write_stat(stat, 1000, 0)
    time.sleep(0.01)
    assert host.sample() == pytest.approx(0.0, abs=0.01)  # only this process's own few ticks count as idle
    write_stat(stat, 1000, 1000)
    time.sleep(0.01)
    assert host.sample() == pytest.approx(1.0)


def test_the_share_is_smoothed_over_the_window(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    host = HostIdle(stat, smoothing_seconds=3600)
    write_stat(stat, 0, 0)
    host.sample()
    write_stat(stat, 1000, 0)
    time.sleep(0.01)
    assert 0.99 < host.sample() < 1.0  # one busy moment barely moves an hour's mean


def test_an_unreadable_stat_counts_as_idle(tmp_path: Path) -> None:
    assert HostIdle(tmp_path / "missing").sample() == 1.0


def test_the_real_proc_stat_gives_a_share_between_0_and_1() -> None:
    host = HostIdle(smoothing_seconds=1e-9)
    host.sample()
    sum(i * i for i in range(200_000))  # some CPU of its own, which counts as idle
    time.sleep(0.05)
    assert 0.0 <= host.sample() <= 1.0
