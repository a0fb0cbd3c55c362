"""LogFile rotation by size and time, on real files in a temp directory."""
import gzip
import os
import sys
import time
from types import SimpleNamespace

from prefork.master.logfiles import LogFile, next_rollover


def settings(**kw):
    base = dict(max_bytes=0, backups=3, when="", compress=False)
    base.update(kw)
    return SimpleNamespace(**base)


def test_size_rotation_shifts_and_keeps_backups(tmp_path):
    path = str(tmp_path / "access.log")
    log = LogFile(path, sys.stdout, settings(max_bytes=10, backups=2))
    for i in range(5):
        log.write(f"line{i}xxxx\n")      # 10 bytes: every write after the first rotates
    log.close()
    assert open(path).read() == "line4xxxx\n"
    assert open(path + ".1").read() == "line3xxxx\n"
    assert open(path + ".2").read() == "line2xxxx\n"
    assert not os.path.exists(path + ".3")   # beyond backups: removed


def test_a_batch_is_never_split_across_files(tmp_path):
    path = str(tmp_path / "access.log")
    log = LogFile(path, sys.stdout, settings(max_bytes=10))
    log.write("a\n" * 20)
    log.close()
    assert open(path).read() == "a\n" * 20


def test_compressed_rotation(tmp_path):
    path = str(tmp_path / "access.log")
    log = LogFile(path, sys.stdout, settings(max_bytes=5, compress=True))
    log.write("first\n")
    log.write("second\n")
    log.close()   # waits for the compression thread
    assert gzip.open(path + ".1.gz", "rt").read() == "first\n"
    assert not os.path.exists(path + ".1")


def test_time_rotation_names_files_by_period_and_prunes(tmp_path):
    path = str(tmp_path / "error.log")
    log = LogFile(path, sys.stdout, settings(when="H", backups=2))
    for hour in range(4):
        log.write(f"hour {hour}\n")
        log.rollover_at = time.time() - 3600 * (4 - hour)   # pretend the hour is over
    log.write("now\n")
    log.close()
    rotated = sorted(p for p in os.listdir(tmp_path) if p != "error.log")
    assert len(rotated) == 2 and all(p.startswith("error.log.20") for p in rotated)
    assert open(path).read() == "now\n"


def test_next_rollover():
    now = time.mktime((2026, 11, 21, 19, 42, 0, 0, 0, -1))
    assert next_rollover("H", now) == time.mktime((2026, 11, 21, 20, 0, 0, 0, 0, -1))
    assert next_rollover("midnight", now) == time.mktime((2026, 11, 22, 0, 0, 0, 0, 0, -1))
    assert next_rollover("", now) == 0.0
