"""The per-node measurement lock: two real processes never time at the same time."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

from pipeline.measure import MEASURE_LOCK_ENV, exclusive_measurement, measure_lock_path

HOLD_S = 0.15
ROUNDS = 3


def _worker(lock: str, log: str, start_at: float) -> None:
    """Wait for the common start, then take the lock ROUNDS times, logging when each critical section ran."""
    while time.time() < start_at:
        time.sleep(0.005)
    for _ in range(ROUNDS):
        with exclusive_measurement(lock):
            t0 = time.time()
            time.sleep(HOLD_S)  # the "timing loop"
            t1 = time.time()
        with open(log, "a") as fh:
            fh.write(f"{t0} {t1}\n")


def _sections(tmp_path: Path, locks: tuple[str, str]) -> list[tuple[float, float]]:
    ctx = mp.get_context("spawn")  # fresh interpreters, as separate Ray workers would be
    log = tmp_path / "sections.log"
    log.unlink(missing_ok=True)
    start_at = time.time() + 2.0  # both processes are up (spawn imports take a moment) before either starts
    procs = [ctx.Process(target=_worker, args=(lock, str(log), start_at)) for lock in locks]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())


def _overlaps(sections: list[tuple[float, float]]) -> int:
    return sum(1 for (a0, a1), (b0, b1) in zip(sections, sections[1:]) if b0 < a1)


def test_two_processes_never_measure_at_once(tmp_path):
    lock = str(tmp_path / "measure.lock")
    sections = _sections(tmp_path, (lock, lock))
    assert len(sections) == 2 * ROUNDS
    assert _overlaps(sections) == 0, sections


def test_without_a_shared_lock_the_same_processes_do_overlap(tmp_path):
    """The control: the check above can fail (different lock files give no exclusion)."""
    sections = _sections(tmp_path, (str(tmp_path / "a.lock"), str(tmp_path / "b.lock")))
    assert len(sections) == 2 * ROUNDS
    assert _overlaps(sections) > 0, sections


def test_lock_file_location(monkeypatch, tmp_path):
    monkeypatch.delenv(MEASURE_LOCK_ENV, raising=False)
    import tempfile

    assert measure_lock_path() == Path(tempfile.gettempdir()) / "precision-search-measure.lock"
    monkeypatch.setenv(MEASURE_LOCK_ENV, str(tmp_path / "node.lock"))
    assert measure_lock_path() == tmp_path / "node.lock"
    assert measure_lock_path(tmp_path / "explicit.lock") == tmp_path / "explicit.lock"
    with exclusive_measurement() as waited:
        assert waited >= 0 and (tmp_path / "node.lock").exists()
    with exclusive_measurement():  # released: taking it again does not block
        pass
