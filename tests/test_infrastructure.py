"""Checkpoints, the training loop, the task/model registries and the CLI plumbing."""

import os

import pytest
import torch

import attnkit
from attnkit import checkpoint as ck
from attnkit.cli import main
from attnkit.tasks.vocab import Vocab, batch_indices, pad_batch
from attnkit.training import fit, rng_state, seed_everything, set_rng_state


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.out = torch.nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight


def test_checkpoint_round_trips_bit_exactly(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 2)).double()
    ck.save_checkpoint(tmp_path / "c", model=m, config={"model": "x", "vocab": ["a", "é", "日"]},
                       trainer_state={"epoch": 3, "rng": rng_state()})
    c = ck.load_checkpoint(tmp_path / "c", with_trainer=True)
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(), torch.nn.Linear(4, 2)).double()
    ck.load_weights(m2, c)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b) and a.dtype == b.dtype
    assert c.config["vocab"] == ["a", "é", "日"] and c.trainer_state["epoch"] == 3


def test_checkpoint_with_tied_weights(tmp_path):
    m = Tied()
    ck.save_checkpoint(tmp_path, model=m, config={})
    m2 = Tied()
    ck.load_weights(m2, ck.load_checkpoint(tmp_path))
    assert m2.out.weight is m2.emb.weight and torch.equal(m2.emb.weight, m.emb.weight)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    m = torch.nn.Linear(2, 2)
    ck.save_checkpoint(tmp_path, model=m, config={"v": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TypeError, match="JSON-serializable"):
        ck.save_checkpoint(tmp_path, model=torch.nn.Linear(2, 2), config={"bad": object()})
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert before == after  # no temporary files left, nothing overwritten


@pytest.mark.parametrize("damage,msg", [
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00garbage"), "not a readable safetensors file"),
    (lambda d: (d / "config.json").write_text("{not json"), "is not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
    (lambda d: os.remove(d / "model.safetensors"), "has no model.safetensors"),
])
def test_corrupt_checkpoints_give_clear_errors(tmp_path, damage, msg):
    ck.save_checkpoint(tmp_path, model=torch.nn.Linear(2, 2), config={})
    damage(tmp_path)
    # checkpoint.json catches the damage; without it (an earlier attnkit's folder) the parser does
    with pytest.raises(ValueError, match="does not match checkpoint.json|has no model.safetensors"):
        ck.load_checkpoint(tmp_path)
    os.remove(tmp_path / "checkpoint.json")
    with pytest.raises(ValueError, match=msg):
        ck.load_checkpoint(tmp_path)


def test_mismatched_checkpoint_names_the_difference(tmp_path):
    ck.save_checkpoint(tmp_path, model=torch.nn.Linear(2, 3), config={})
    with pytest.raises(ValueError, match=r"shape mismatch bias: .*weight: checkpoint \(3, 2\) vs model \(4, 2\)"):
        ck.load_weights(torch.nn.Linear(2, 4), ck.load_checkpoint(tmp_path))
    with pytest.raises(ValueError, match="missing"):
        ck.load_weights(torch.nn.Sequential(torch.nn.Linear(2, 3)), ck.load_checkpoint(tmp_path))
    with pytest.raises(ValueError, match="cannot be resumed"):
        ck.load_checkpoint(tmp_path, with_trainer=True)
    with pytest.raises(ValueError, match="is not a folder"):
        ck.load_checkpoint(tmp_path / "nope")


def test_fit_learns_stops_on_time_and_is_reproducible():
    def run(max_seconds=None):
        seed_everything(1)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        x = torch.randn(64, 2)
        y = x @ torch.tensor([[2.0], [-1.0]])

        def batches(epoch):
            g = torch.Generator().manual_seed(epoch)
            perm = torch.randperm(64, generator=g)
            return [(x[perm[i:i + 8]], y[perm[i:i + 8]]) for i in range(0, 64, 8)]

        h = fit(model, opt, batches, lambda b: torch.nn.functional.mse_loss(model(b[0]), b[1]), epochs=5,
                max_seconds=max_seconds, progress=False, log=None,
                evaluate=lambda e: {"mse": torch.nn.functional.mse_loss(model(x), y).item()})
        return h, model

    h1, m1 = run()
    h2, m2 = run()
    assert h1.losses == h2.losses and torch.equal(m1.weight, m2.weight)
    assert h1.metrics[-1]["mse"] < 0.1 * h1.metrics[0]["mse"]
    h3, _ = run(max_seconds=0.0)
    assert h3.stopped == "time" and h3.steps == 1 and len(h3.losses) == 1


def test_fit_stops_on_nan_loss():
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="loss became nan"):
        fit(model, opt, lambda e: [None], lambda b: torch.tensor(float("nan"), requires_grad=True), epochs=1,
            progress=False, log=None)


def test_rng_state_round_trip():
    s = rng_state()
    a = torch.rand(3)
    set_rng_state(s)
    assert torch.equal(torch.rand(3), a)


def test_vocab_and_batching():
    v = Vocab.build([["b", "a", "a"], ["c", "b", "a"]], max_size=6)
    assert v.itos[4:] == ["a", "b"]  # by frequency, then alphabetically; capped at max_size
    assert Vocab.from_json(v.to_json()).itos == v.itos
    ids, lengths = pad_batch([[5, 6, 7], [8]])
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and lengths.tolist() == [3, 1]
    b = batch_indices(10, 3, shuffle=True, seed=0)
    assert sorted(i for x in b for i in x) == list(range(10)) and b == batch_indices(10, 3, shuffle=True, seed=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        batch_indices(3, 0, shuffle=False)


def test_registries_list_valid_names():
    with pytest.raises(ValueError, match="unknown task 'nope'; valid names: 'captioning', 'dates', 'digits'"):
        attnkit.tasks.get("nope")
    with pytest.raises(ValueError, match="unknown model 'GPT'; valid names: 'AttentionClassifier'"):
        attnkit.models.get("GPT")


def test_cli_info_lists_every_family(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("sparsemax", "entmax15", "bigbird", "ALiBi", "performer_attention", "MultiheadAttention", "tiled"):
        assert word in out


def test_cli_errors_are_one_line_messages(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "attnkit: error: checkpoint" in capsys.readouterr().err
    ck.save_checkpoint(tmp_path, model=torch.nn.Linear(1, 1), config={"task": "nope"})
    assert main(["eval", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    ck.save_checkpoint(tmp_path, model=torch.nn.Linear(1, 1), config={"model": "x"})
    assert main(["translate", str(tmp_path), "hello"]) == 2
    assert "names no task" in capsys.readouterr().err


def test_checkpoint_files_get_ordinary_permissions(tmp_path):
    ck.save_checkpoint(tmp_path, model=torch.nn.Linear(1, 1), config={}, trainer_state={})
    umask = os.umask(0)
    os.umask(umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.json", "config.json", "model.safetensors", "trainer.json", "trainer.safetensors"]
    for name in ("checkpoint.json", "model.safetensors", "config.json", "trainer.json", "trainer.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
