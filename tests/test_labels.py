"""Labels: validation, label files, the runtime file and its atomic write."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import wait_for

from lobbyd import (
    LabelError,
    LocalLabels,
    RuntimeLabels,
    changed_labels,
    parse_label_lines,
    parse_request_labels,
    scan_label_dir,
    validate_label,
)


def test_validate_label_trims_and_accepts_colons() -> None:
    assert validate_label("  public_ip6:2a03::1 \t") == "public_ip6:2a03::1"
    assert validate_label("ünïcode:ok") == "ünïcode:ok"


@pytest.mark.parametrize("bad", ["", "   ", "a\nb", "a\rb", "a\0b", "tab\tinside", "x" * 1025,
                                 "é" * 513, "a\x85b", "a\u2028b", "a\u2029b", "a\x0bb",
                                 "a\x1eb", "a\x9fb", "a\u202eb", "a\u200bb", "\ufeffa",
                                 "a\U000e0041b", "a\u00adb"])
def test_validate_label_rejects(bad: str) -> None:
    with pytest.raises(LabelError):
        validate_label(bad)


def test_label_of_exactly_1024_bytes_is_fine() -> None:
    assert validate_label("x" * 1024) == "x" * 1024


def test_only_newline_ends_a_label_line() -> None:
    labels, problems = parse_label_lines("inj:a\u2028inj:b\nok:1\r\n")
    assert labels == ["ok:1"] and "line 1" in problems[0]


def test_label_lines_skip_blanks_and_comments_and_report_problems() -> None:
    labels, problems = parse_label_lines("a:1\n\n# comment\n  b:2  \nbad\x01\n")
    assert labels == ["a:1", "b:2"]
    assert len(problems) == 1 and "line 5" in problems[0]


def test_request_labels_stop_at_the_first_bad_one() -> None:
    assert parse_request_labels("a\r\nb\n\n") == ["a", "b"]
    with pytest.raises(LabelError):
        parse_request_labels("ok\n" + "x" * 2000)


def test_label_dir_reads_every_regular_visible_file(tmp_path: Path) -> None:
    (tmp_path / "one").write_text("a:1\nb:2\n")
    (tmp_path / "two.conf").write_text("c:3\n")
    (tmp_path / ".one.swp").write_text("swap:file\n")
    (tmp_path / "latin1").write_bytes(b"caf\xe9\n")
    (tmp_path / "subdir").mkdir()
    (tmp_path / "subdir" / "deep").write_text("deep:no\n")
    scan = scan_label_dir(tmp_path)
    assert set().union(*scan.labels.values()) == {"a:1", "b:2", "c:3"}
    assert list(scan.problems) == [str(tmp_path / "latin1")]
    assert scan.complete and not scan.unreadable


def test_missing_label_dir_means_no_labels(tmp_path: Path) -> None:
    scan = scan_label_dir(tmp_path / "nope")
    assert scan.labels == {} and scan.problems == {} and scan.complete


def test_a_file_unreadable_for_now_keeps_its_labels(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a:1\n")
    (tmp_path / "b").write_text("b:1\n")
    local = LocalLabels([], tmp_path)
    assert local.collect() == ("a:1", "b:1")
    (tmp_path / "a").unlink()
    (tmp_path / "a").symlink_to(tmp_path / "loop")  # ELOOP on open: an I/O error
    (tmp_path / "loop").symlink_to(tmp_path / "a")
    assert local.collect() == ("a:1", "b:1")
    (tmp_path / "a").unlink()
    (tmp_path / "loop").unlink()
    assert local.collect() == ("b:1",)  # a file that is gone takes its labels with it


def test_local_labels_union_sorted(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("z:1\nservice:web\n")
    assert LocalLabels(["service:web", "a:0"], tmp_path).collect() == ("a:0", "service:web",
                                                                      "z:1")


def test_runtime_labels_add_remove_and_leave_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "labels" / "_runtime"
    runtime = RuntimeLabels(path)
    assert runtime.read() == []
    runtime.save(changed_labels(runtime.read(), ["b", "a"], ()))
    assert changed_labels(runtime.read(), ["a"], ()) == ["a", "b"]  # adding again: no change
    assert runtime.read() == ["a", "b"]
    runtime.save(changed_labels(runtime.read(), (), ["a", "not-there"]))
    assert runtime.read() == ["b"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["_runtime"]


def test_runtime_write_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "_runtime"
    runtime = RuntimeLabels(path)
    runtime.save(["keep:me"])
    # the temp file's path is taken by a directory: the write fails (even for root)
    (tmp_path / f"._runtime.{os.getpid()}.tmp").mkdir()
    with pytest.raises(OSError):
        runtime.save(["keep:me", "new:label"])
    assert runtime.read() == ["keep:me"]


# ----------------------------------------------------------------- with a daemon


def test_label_files_are_followed_live(lobbyd, tmp_path: Path) -> None:
    a = lobbyd("a", LABELS="env:1")
    labels_dir = Path(a.env["LABELS_PATH"])
    labels_dir.mkdir(exist_ok=True)
    (labels_dir / "extra").write_text("file:1\n# comment\nfile:2\n")
    wait_for(lambda: a.labels_of("a") == ["env:1", "file:1", "file:2"], what="file labels")
    (labels_dir / "extra").write_text("file:3\n")
    wait_for(lambda: a.labels_of("a") == ["env:1", "file:3"], what="edited file")
    (labels_dir / "extra").unlink()
    wait_for(lambda: a.labels_of("a") == ["env:1"], what="removed file")
    local = json.loads(a.request("GET", "/v1/discovery")[2])
    assert local["labels"] == ["env:1"]


def test_bad_label_file_does_not_drop_other_labels(lobbyd) -> None:
    a = lobbyd("a", start=False)
    labels_dir = Path(a.env["LABELS_PATH"])
    labels_dir.mkdir()
    (labels_dir / "good").write_text("good:1\n")
    (labels_dir / "binary").write_bytes(b"\xff\xfe\x00garbage")
    a.start()
    wait_for(lambda: a.labels_of("a") == ["good:1"], what="good labels")
    assert "binary" in a.logs() and "not valid UTF-8" in a.logs()
