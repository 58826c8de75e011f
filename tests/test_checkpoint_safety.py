"""Checkpoints are safe to load and survive being killed (SPEC §7): no pickle is ever opened,
damaged or mismatched files give a clear error naming the file, the trainer state round-trips
exactly, and a save killed at any moment leaves the previous or the new checkpoint, never a mix."""

import json
import math
import os
import pickle
import random
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from attnkit import checkpoint as ck
from attnkit.cli import main
from attnkit.training import rng_state, set_rng_state


def _legacy_folder(d):
    """A checkpoint as an earlier attnkit left it: plain files, no checkpoint.json."""
    ck.save_checkpoint(d, model=torch.nn.Linear(2, 3), config={"model": "Linear"})
    os.remove(d / "checkpoint.json")


class _Payload:
    """Unpickling this creates ``marker``: what a hostile trainer.pt could do with any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- no pickle --------------------------------------------------------------------------------
def test_a_pickled_trainer_pt_is_refused_and_never_runs(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()  # the payload is real: unpickling it runs code

    marker = tmp_path / "pwned"
    d = tmp_path / "old"
    _legacy_folder(d)
    torch.save({"epoch": 3, "rng": _Payload(marker)}, d / "trainer.pt")
    with pytest.raises(ValueError, match=r"trainer.pt' is a pickle .*attnkit no longer loads pickles"):
        ck.load_checkpoint(d, with_trainer=True)
    assert ck.load_checkpoint(d).config == {"model": "Linear"}  # weights and config still load
    # with a manifest, a trainer.pt dropped into the folder is not even looked at
    ck.save_checkpoint(tmp_path / "new", model=torch.nn.Linear(2, 3), config={})
    torch.save({"rng": _Payload(marker)}, tmp_path / "new" / "trainer.pt")
    with pytest.raises(ValueError, match="has no trainer state .*cannot be resumed"):
        ck.load_checkpoint(tmp_path / "new", with_trainer=True)
    assert not marker.exists()


def test_resume_from_a_pickled_checkpoint_through_the_cli_is_refused(tmp_path, capsys):
    out = tmp_path / "ck"
    small = ["--out", str(out), "--train-size", "200", "--valid-size", "20", "--test-size", "20", "--emb-dim", "8",
             "--hidden-dim", "16", "--batch-size", "64", "--no-progress"]
    assert main(["train", "dates", "--epochs", "1", *small]) == 0
    assert main(["train", "dates", "--epochs", "2", "--resume", *small]) == 0  # resumes
    c = ck.load_checkpoint(out, with_trainer=True)
    assert c.trainer_state["epoch"] == 2 and len(c.config["history"]["loss"]) == 2
    # the same folder as an earlier attnkit would have left it, with a hostile trainer.pt
    for name in ("checkpoint.json", "trainer.json", "trainer.safetensors"):
        os.remove(out / name)
    torch.save({"epoch": 1, "rng": _Payload(tmp_path / "pwned")}, out / "trainer.pt")
    capsys.readouterr()
    assert main(["train", "dates", "--epochs", "3", "--resume", *small]) == 2
    assert "trainer.pt' is a pickle" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("doc,msg", [
    ({"format": "attnkit-trainer-state", "version": 1, "state": {"__type__": "object", "cls": "os.system"}},
     "unknown __type__ 'object'"),
    ({"format": "attnkit-trainer-state", "version": 1, "state": {"__type__": "ndarray", "dtype": "O", "shape": [1],
                                                                 "data": [1]}}, "not a number type"),
    ({"format": "attnkit-trainer-state", "version": 1, "state": {"__type__": "tensor", "name": "nope"}},
     "tensor 'nope' is not in trainer.safetensors"),
    ({"epoch": 3}, "expected an object with format 'attnkit-trainer-state'"),
])
def test_a_foreign_trainer_state_is_a_clear_error(tmp_path, doc, msg):
    ck.save_checkpoint(tmp_path, model=torch.nn.Linear(2, 3), config={}, trainer_state={})
    os.remove(tmp_path / "checkpoint.json")  # hand-made files, as they are
    (tmp_path / "trainer.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"trainer state '.*trainer.json' is malformed: .*{msg}"):
        ck.load_checkpoint(tmp_path, with_trainer=True)


# -- damaged and mismatched files -------------------------------------------------------------
def test_truncated_or_changed_files_are_named(tmp_path):
    ck.save_checkpoint(tmp_path, model=torch.nn.Linear(20, 30), config={"model": "Linear"}, trainer_state={"a": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(before["model.safetensors"][:-100])
    n = len(before["model.safetensors"])
    with pytest.raises(ValueError, match=rf"model.safetensors' does not match checkpoint.json \({n - 100} bytes, {n} "
                                         r"expected\): it is truncated"):
        ck.load_checkpoint(tmp_path)
    weights.write_bytes(before["model.safetensors"])
    (tmp_path / "trainer.json").write_text('{"a": 2}')
    assert ck.load_checkpoint(tmp_path).config == {"model": "Linear"}  # the trainer state is read on request
    with pytest.raises(ValueError, match="trainer.json' does not match checkpoint.json"):
        ck.load_checkpoint(tmp_path, with_trainer=True)
    os.remove(tmp_path / "checkpoint.json")  # the files as they are: a truncated file is then a parse error
    weights.write_bytes(before["model.safetensors"][:-100])
    with pytest.raises(ValueError, match="weights '.*model.safetensors' are not a readable safetensors file"):
        ck.load_checkpoint(tmp_path)


@pytest.mark.parametrize("manifest,msg", [
    ("{not json", "is not valid JSON"),
    ('{"format": "attnkit-checkpoint", "version": 2}', "has version 2; this attnkit reads version 1"),
    ('{"x": 1}', "is not an attnkit checkpoint manifest"),
    (json.dumps({"format": "attnkit-checkpoint", "version": 1, "generation": "0" * 16,
                 "files": {"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}}), "is malformed"),
])
def test_a_bad_manifest_is_named(tmp_path, manifest, msg):
    ck.save_checkpoint(tmp_path, model=torch.nn.Linear(2, 3), config={})
    (tmp_path / "checkpoint.json").write_text(manifest)
    with pytest.raises(ValueError, match=f"checkpoint manifest '.*checkpoint.json' {msg}"):
        ck.load_checkpoint(tmp_path)


@pytest.mark.parametrize("config,msg", [
    ({"task": 3}, "field 'task' must be a string; got 3"),
    ({"task": "dates", "model": {"name": "Seq2Seq"}}, "field 'model' must be a string; got {\"name\": \"Seq2Seq\"}"),
    ({"model": "Seq2Seq", "model_config": [16, 32]}, r"field 'model_config' must be an object; got \[16, 32\]"),
    ({"history": "none"}, "field 'history' must be an object or an array"),
    ({"task": "nope"}, "unknown task 'nope'; valid names: 'captioning', 'dates', 'digits', 'mnist', 'multi30k', 'speech', 'sst2'"),
])
def test_config_with_wrong_types_or_an_unknown_task_is_named(tmp_path, config, msg):
    ck.save_checkpoint(tmp_path, model=torch.nn.Linear(2, 3), config=config)
    with pytest.raises(ValueError, match=f"checkpoint config '.*config.json': {msg}"):
        ck.load_checkpoint(tmp_path)


def test_a_failed_save_removes_what_it_wrote(tmp_path):
    ck.save_checkpoint(tmp_path, model=torch.nn.Linear(2, 2), config={"v": 1}, trainer_state={"step": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TypeError, match=r"trainer_state.rng is a Random"):
        ck.save_checkpoint(tmp_path, model=torch.nn.Linear(2, 2), config={}, trainer_state={"rng": random.Random()})
    with pytest.raises(OSError, match="disk full"), pytest.MonkeyPatch.context() as mp:
        real = ck.write_durably
        calls = []

        def fail_on_second(path, data):
            calls.append(path)
            if len(calls) == 2:
                raise OSError("disk full")
            real(path, data)

        mp.setattr(ck, "write_durably", fail_on_second)
        ck.save_checkpoint(tmp_path, model=torch.nn.Linear(2, 2), config={"v": 2}, trainer_state={"step": 2})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# -- the trainer state round-trips exactly ----------------------------------------------------
def _same(a, b):
    """Equal, with the same types, NaN equal to NaN, tensors and arrays bit-identical."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def test_trainer_state_round_trips_exactly(tmp_path):
    state = {
        "rng": rng_state(), "epoch": 3, "history": {"loss": [0.5, float("nan"), float("inf"), -0.0]},
        "int_keys": {0: "a", 1.5: None, (1, "x"): [True], None: 2**70}, "__type__": "a key like a tag",
        "tuple": (1, (2.5, "é"), []), "empty": {}, "scalar": torch.tensor(7.0), "bf16": torch.randn(3).bfloat16(),
        "bool": torch.tensor([True, False]), "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "view": torch.arange(10.0)[::3],
    }
    ck.save_checkpoint(tmp_path, model=torch.nn.Linear(1, 1), config={}, trainer_state=state)
    loaded = ck.load_checkpoint(tmp_path, with_trainer=True).trainer_state
    assert _same(loaded, state)
    assert ck.load_checkpoint(tmp_path, with_trainer=True).trainer_state is not loaded


def _train(model, opt, sched, steps):
    """A few steps that draw from Python's, NumPy's and torch's RNGs (dropout, noise, data)."""
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 4) + float(np.random.rand()) + random.random()
        loss = (model(x) - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=12)
    return model, opt, sched


def test_resuming_from_a_checkpoint_continues_bit_identically(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    model, opt, sched = _setup()
    straight = _train(model, opt, sched, 10)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    model, opt, sched = _setup()
    first = _train(model, opt, sched, 4)
    ck.save_checkpoint(tmp_path, model=model, config={}, trainer_state={
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(), "step": 4})
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # a new process: other RNG states
    c = ck.load_checkpoint(tmp_path, with_trainer=True)
    model, opt, sched = _setup()
    ck.load_weights(model, c)
    opt.load_state_dict(c.trainer_state["optimizer"])
    sched.load_state_dict(c.trainer_state["scheduler"])
    set_rng_state(c.trainer_state["rng"])
    rest = _train(model, opt, sched, 6)
    assert first + rest == straight
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


# -- killed saves -----------------------------------------------------------------------------
def _generation(d, step, numel=4096):
    """Save generation ``step``: the step is in the weights, in config.json and in the trainer state
    (``numel`` floats of it: 1 MB make each save take milliseconds, so that kills land inside writes)."""
    model = torch.nn.Linear(64, 64)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    ck.save_checkpoint(d, model=model, config={"step": step},
                       trainer_state={"step": step, "moments": torch.full((numel,), float(step))})


def _loaded_step(d):
    """The step of the checkpoint in ``d``, after checking that every file belongs to it."""
    c = ck.load_checkpoint(d, with_trainer=True)
    step = c.trainer_state["step"]
    assert c.config["step"] == step
    assert all(bool((t == step).all()) for t in [*c.state_dict.values(), c.trainer_state["moments"]]), "a mix"
    return step


class _Killed(BaseException):
    """Like SIGKILL: no ``except Exception`` cleanup runs."""


def test_a_save_crashed_at_every_step_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch):
    real_write, real_fsync, real_replace, real_unlink = ck.write_durably, ck.fsync_dir, os.replace, Path.unlink
    outcomes = []
    for crash_at in range(100):
        d = tmp_path / str(crash_at)
        _generation(d, 1)
        (d / ".0123456789abcdef.model.safetensors").write_bytes(b"left by a save killed earlier")
        ops = []

        def op(fn, half=False):
            def wrapped(*args, **kw):
                if len(ops) == crash_at:
                    if half:  # killed in the middle of writing the file
                        real_write(args[0], args[1][: len(args[1]) // 2])
                    raise _Killed
                ops.append(fn.__name__)
                return fn(*args, **kw)
            return wrapped

        with monkeypatch.context() as mp:
            mp.setattr(ck, "write_durably", op(real_write, half=True))
            mp.setattr(ck, "fsync_dir", op(real_fsync))
            mp.setattr(ck, "os", types.SimpleNamespace(replace=op(real_replace)))
            mp.setattr(Path, "unlink", op(real_unlink))
            try:
                _generation(d, 2)
            except _Killed:
                pass
            else:
                break
        outcomes.append(_loaded_step(d))
        _generation(d, 3)  # the next save works and cleans up
        assert _loaded_step(d) == 3
        assert sorted(p.name for p in d.iterdir()) == [
            "checkpoint.json", "config.json", "model.safetensors", "trainer.json", "trainer.safetensors"]
    # 5 staged writes (4 files, the manifest), fsync, commit, fsync, 4 renames, fsync, the leftover deleted
    assert ops == ["write_durably"] * 5 + ["fsync_dir", "replace", "fsync_dir"] + ["replace"] * 4 + ["fsync_dir", "unlink"]
    assert outcomes == [1] * 7 + [2] * 7


_KILLER = textwrap.dedent("""
    # Fork a child that resumes the checkpoint and saves new generations in a loop; SIGKILL it
    # after a random delay; report; wait for the test to check the folder; repeat.
    import os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)  # fork-safe: no thread pool in the parent
    sys.path[:0] = [sys.argv[4]]
    from test_checkpoint_safety import _generation, _loaded_step
    d, rng, kills = sys.argv[1], random.Random(int(sys.argv[2])), int(sys.argv[3])
    for i in range(kills):
        pid = os.fork()
        if pid == 0:
            step = _loaded_step(d)  # resume
            while True:
                step += 1
                _generation(d, step, numel=1 << 18)
        time.sleep(rng.uniform(0.0, 0.05) if i % 4 else rng.uniform(0.05, 0.3))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, flush=True)
        sys.stdin.readline()
""")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_at_random_moments_never_leaves_a_mix(tmp_path):
    d, kills = tmp_path / "ck", 20
    _generation(d, 1)
    proc = subprocess.Popen([sys.executable, "-c", _KILLER, str(d), "1234", str(kills), str(Path(__file__).parent)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    steps, interrupted = [1], 0
    try:
        for _ in range(kills):
            line = proc.stdout.readline()
            assert line.strip() == "True", f"the saver ended before it was killed (did resuming fail?): {line!r}"
            interrupted += any(p.name.startswith(".") for p in d.iterdir())  # killed inside a save
            steps.append(_loaded_step(d))
            proc.stdin.write("\n")
            proc.stdin.flush()
    finally:
        proc.kill()
        proc.wait()
    print("steps at the kills:", steps, f"({interrupted} kills inside a save)")
    assert steps == sorted(steps) and steps[-1] > 1, steps
    assert interrupted > 0, "no kill landed inside a save"
    _generation(d, steps[-1] + 1)
    assert _loaded_step(d) == steps[-1] + 1 and not any(p.name.startswith(".") for p in d.iterdir())


def test_a_checkpoint_without_a_key_its_task_reads_names_the_key_and_the_file(tmp_path):
    ck.save_checkpoint(tmp_path / "run", model=torch.nn.Linear(2, 2), config={"model": "Linear"})
    c = ck.load_checkpoint(tmp_path / "run")
    assert c.require(("model",), "dates") is c.config
    with pytest.raises(ValueError, match=r"run'?: config.json has no 'vocab' \(not a dates checkpoint\?\)"):
        c.require(("model", "vocab"), "dates")
