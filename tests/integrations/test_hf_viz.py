"""Pictures of a Hugging Face model's heads, offline: akhf.draw and `attnkit viz --hf DIR`."""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
import attnkit.integrations.hf as akhf  # noqa: E402


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=20, initializer_range=0.2)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_draw_writes_the_page_and_a_grid_with_exact_weights(tmp_path):
    model = tiny_llama()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    files = akhf.draw(model, ids, list("abcdef"), tmp_path)
    assert [f.name for f in files][0] == "attention.html" and files[1].suffix == ".png"
    page = files[0].read_text(encoding="utf-8")
    assert "layers.0.self_attn" in page and '"f"' in page
    assert model.config._attn_implementation == "sdpa"  # switched back after the call
    with pytest.raises(ValueError, match="one label per input id"):
        akhf.draw(model, ids, list("abc"), tmp_path)


def test_cli_viz_of_a_saved_model_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    vocab = {w: i for i, w in enumerate("[UNK] the cat sat on a mat".split())}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]").save_pretrained(tmp_path / "m")
    out = tmp_path / "viz"
    r = subprocess.run([sys.executable, "-m", "attnkit", "viz", "--hf", str(tmp_path / "m"), "--text",
                        "the cat sat on a mat", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "attention.html").is_file() and list(out.glob("heads_*.png"))
    page = (out / "attention.html").read_text(encoding="utf-8")
    assert '"cat"' in page and '"mat"' in page
    bad = subprocess.run([sys.executable, "-m", "attnkit", "viz", "--hf", str(tmp_path / "nothing"), "--text", "x"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "attnkit viz: error: --hf" in bad.stderr and "Traceback" not in bad.stderr
