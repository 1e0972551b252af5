"""The selection cache handles its folder as untrusted: planted symlinks, FIFOs, foreign or stale records."""

import json
import logging
import os
import threading

import pytest
import torch
from helpers import make_mlp_policy
from test_selection import register  # noqa: F401 - the fixture registering fake backends

import fdp
from fdp.backends import selection


def _sampler(**kw):
    sched = fdp.DDIMScheduler(num_train_timesteps=100)
    return fdp.Sampler(make_mlp_policy(K=2, dtype=torch.float32), sched, num_inference_steps=3, **kw)


@pytest.fixture
def decided(register, tmp_path):  # noqa: F811
    """A fake backend that auto picks, and the cache file of that decision: ``(fake, path)``."""
    good = register("good", 500)
    s = _sampler()
    assert s.backend == "good" and not s.selection.cached
    return good, tmp_path / "cache" / os.path.basename(s.selection.cache_file)


def _selected_again(good, caplog, path, *warning_parts):
    runs = good.runs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fdp"):
        s = _sampler()
    assert s.backend == "good" and not s.selection.cached and good.runs == runs + 1  # checked again
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for part in (str(path), *warning_parts):
        assert part in warnings, (part, warnings)
    return s


def test_the_write_replaces_a_planted_symlink_instead_of_writing_through_it(decided, tmp_path):
    _, path = decided
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path.unlink()
    path.symlink_to(victim)
    s = _sampler()  # the symlink is not read (O_NOFOLLOW): selected again, then written in its place
    assert not s.selection.cached
    assert victim.read_text() == "precious"
    assert not path.is_symlink() and json.loads(path.read_text())["selection"]["backend"] == "good"
    # No temporary file is left behind, and none had a name another user could predict (the pid).
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_the_temporary_file_is_created_exclusively_under_an_unpredictable_name(decided, monkeypatch):
    _, path = decided
    made = []
    real = selection.tempfile.mkstemp

    def spy(*args, **kw):
        fd, name = real(*args, **kw)
        made.append(name)
        return fd, name

    monkeypatch.setattr(selection.tempfile, "mkstemp", spy)
    assert selection._write_record(path, {"key": 1})
    assert len(made) == 1 and os.path.dirname(made[0]) == str(path.parent)
    assert str(os.getpid()) not in os.path.basename(made[0]) and not os.path.exists(made[0])


def test_a_fifo_at_the_cache_path_does_not_block(decided, caplog):
    good, path = decided
    path.unlink()
    os.mkfifo(path)
    result = {}
    caplog.set_level(logging.WARNING, logger="fdp")
    thread = threading.Thread(target=lambda: result.update(s=_sampler()), daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "Sampler(backend='auto') blocked on a FIFO at the cache path"
    assert result["s"].backend == "good" and not result["s"].selection.cached
    assert "not a regular file" in caplog.text and str(path) in caplog.text


@pytest.mark.parametrize("content, why", [
    ("[1, 2, 3]", "a JSON list"),
    ("{not json", "not JSON"),
    ("wrong-selection", "not a selection record"),
    ("wrong-candidate", "does not hold a backend's record"),
    ("unknown-backend", "'gone', which is not registered"),
    ("unknown-backend-listed", "'gone', which is not registered"),  # even where the record's own table names it
    ("extra-field", "not a selection record"),
    ("unknown-status", "does not hold a backend's record"),
])
def test_a_record_of_the_wrong_schema_or_backend_warns_naming_the_file_and_selects_again(decided, caplog, content,
                                                                                        why):
    good, path = decided
    stored = json.loads(path.read_text())
    if content == "wrong-selection":
        stored["selection"]["batch_size"] = "1"
        content = json.dumps(stored)
    elif content == "wrong-candidate":
        stored["selection"]["candidates"][0]["priority"] = "high"
        content = json.dumps(stored)
    elif content == "unknown-backend":
        stored["selection"]["backend"] = "gone"
        content = json.dumps(stored)
    elif content == "unknown-backend-listed":
        stored["selection"]["backend"] = stored["selection"]["candidates"][0]["name"] = "gone"
        content = json.dumps(stored)
    elif content == "extra-field":
        stored["selection"]["extra"] = 1
        content = json.dumps(stored)
    elif content == "unknown-status":
        stored["selection"]["candidates"][0]["status"] = "great"
        content = json.dumps(stored)
    path.write_text(content)
    _selected_again(good, caplog, path, why)
    # ... and the bad record was replaced by the new decision.
    assert json.loads(path.read_text())["selection"]["backend"] == "good"
    assert _sampler().selection.cached


def test_an_oversized_file_is_not_read(decided, caplog):
    good, path = decided
    path.write_text(" " * (selection.MAX_CACHE_BYTES + 1))
    _selected_again(good, caplog, path, "more than a record's")


def test_a_stored_verdict_of_the_wrong_schema_is_checked_again(tmp_path, caplog):
    path = tmp_path / "isolated-x.json"
    path.write_text(json.dumps({"key": {"k": 1}, "verdict": {"name": "cuda", "priority": "40", "status": "failed"}}))
    data = selection._read_record(path, {"k": 1})
    with caplog.at_level(logging.WARNING, logger="fdp"):
        assert selection._candidate_from(data["verdict"], path) is None
    assert str(path) in caplog.text
    assert selection._read_record(path, {"k": 2}) is None  # another key: not this record, silently
