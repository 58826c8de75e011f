"""Regenerate the measured figures of docs/benchmarks.md and README.md from benchmarks/results/.

    python benchmarks/report.py           # rewrite the generated blocks in place
    python benchmarks/report.py --check   # exit 1 if a block is stale or the prose holds a typed figure

A generated block sits between ``<!-- generated:NAME -->`` and ``<!-- /generated -->``; the prose
around it is written by hand and must not hold measured figures (``--check`` looks for numbers
with units outside the blocks). A measured cell reads ``median (min–max, n=N)`` over the
repeats stored in the JSON; with fewer than 3 repeats, or no file, it reads "not yet measured
with 3 repeats — run: COMMAND". Quality figures from long training runs (Multi30k, the
classifiers) are shown from their single stored run and marked "1 run".
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import engine_targets  # noqa: E402
import engine_round2  # noqa: E402
import hf_targets  # noqa: E402

MIN_REPEATS = 3
IN_ROW = "the command in this row"
RES = "benchmarks/results/"

#: repeated results: file -> the command that writes it (run_all.py runs them in this order)
COMMANDS = {
    "engine_2threads.json": f"python benchmarks/engine_targets.py --run --threads 2 --repeat 3 --json {RES}engine_2threads.json",
    "causal_64k.json": f"python benchmarks/causal_64k_memory.py --threads 2 --repeat 3 --out {RES}causal_64k.json",
    "demo_quality.json": f"python benchmarks/demo_quality.py --threads 1 --repeat 3 --out {RES}demo_quality.json",
    "engine_1thread.json": f"python benchmarks/engine_targets.py --run --threads 1 --repeat 3 --json {RES}engine_1thread.json",
    "hf_2threads.json": f"python benchmarks/hf_targets.py --run --threads 2 --repeat 3 --json {RES}hf_2threads.json",
    "compile.json": f"python benchmarks/compile.py --threads 2 --repeat 3 --steps 10 --json {RES}compile.json",
    "distributed.json": f"python benchmarks/distributed.py --threads 2 --repeat 3 --seq 32768 --json {RES}distributed.json",
    "compile_window.json": ("python benchmarks/compile.py --threads 2 --repeat 3 --steps 3 --cases \"long-window encoder\" "
                            f"--json {RES}compile_window.json"),
    "small_calls.json": f"python benchmarks/small_calls.py --threads 2 --repeat 5 --json {RES}small_calls.json",
    "engine_round2.json": f"python benchmarks/engine_round2.py --run --threads 2 --repeat 3 --json {RES}engine_round2.json",
    "engine_round2_1thread.json": ("python benchmarks/engine_round2.py --run --threads 1 --repeat 3 --cases "
                                   f"window256_fwdbwd window256_fwd_ --json {RES}engine_round2_1thread.json"),
    "engine_round2_65k.json": ("python benchmarks/engine_round2.py --run --threads 2 --repeat 3 --cases "
                               f"sparse_causal_fwdbwd_N65536 --json {RES}engine_round2_65k.json"),
    "engine_round2_alibi_profile.json": ("python benchmarks/engine_round2.py --run --threads 2 --repeat 3 --cases "
                                         f"profile_alibi_causal_N8192 --json {RES}engine_round2_alibi_profile.json"),
    # one case of engine_2threads.json run again alone (a noisy miss checked, not replaced)
    "engine_window_scaling_recheck.json": ("python benchmarks/engine_targets.py --run --threads 2 --repeat 3 --cases "
                                           f"window256_scaling --json {RES}engine_window_scaling_recheck.json"),
}
#: the settings a stored file must have for the docs to use it (a smoke run with other sizes is ignored)
EXPECT = {"engine_2threads.json": {"threads": 2, "quick": False}, "engine_1thread.json": {"threads": 1, "quick": False},
          "hf_2threads.json": {"threads": 2, "quick": False}, "engine_round2.json": {"threads": 2, "quick": False},
          "engine_round2_1thread.json": {"threads": 1, "quick": False},
          "engine_round2_65k.json": {"threads": 2, "quick": False},
          "engine_round2_alibi_profile.json": {"threads": 2, "quick": False},
          "engine_window_scaling_recheck.json": {"threads": 2, "quick": False},
          "causal_64k.json": {"threads": 2, "n": 65536},
          "demo_quality.json": {"threads": 1, "max_seconds": 150, "epochs": 10}}
#: single-run quality results (long training, not repeated) and the command that appends or writes them
ONE_RUN = {"classifiers.jsonl": "python benchmarks/classifiers.py --task TASK --threads 1 --results "
                                f"{RES}classifiers.jsonl",
           "multi30k_transformer.json": "python benchmarks/multi30k.py --model transformer --threads 1 --out DIR "
                                        f"--results {RES}multi30k_transformer.json",
           "multi30k_seq2seq.json": "python benchmarks/multi30k.py --model seq2seq --threads 1 --out DIR "
                                    f"--results {RES}multi30k_seq2seq.json",
           "captioning.json": f"python benchmarks/captioning.py --threads 2 --json {RES}captioning.json",
           "vqa.json": f"python benchmarks/vqa.py --threads 2 --repeat 3 --json {RES}vqa.json",
           "speech.json": f"python benchmarks/speech.py --threads 2 --repeat 3 --json {RES}speech.json"}


# -- numbers -------------------------------------------------------------------------------------

def fmt(v: float, unit: str = "") -> str:
    if unit == "s":
        f = ",.0f" if v >= 100 else ".1f" if v >= 10 else ".2f" if v >= 1 else ".3f"
    elif unit in ("MiB", "GFLOP/s", "epochs"):
        f = ",.0f"
    elif unit == "GiB":
        f = ".2f"
    elif unit == "%":
        f = ".1f"
    elif unit == "fraction":  # the x of 1/x
        f = ".0f" if v >= 10 else ".1f"
    else:  # ratios
        f = ".1f" if v >= 10 else ".2f" if v >= 0.995 else ".3f"
    return format(v, f)


def measured(values, unit: str = "", plus: str = "") -> str | None:
    """``median unit (min–max, n=N)`` over the values that are not None; None with fewer than 3."""
    xs = [x for x in values or [] if x is not None]
    if len(xs) < MIN_REPEATS:
        return None
    sep = "" if unit in ("", "%", "×") else " "
    return (f"{plus}{fmt(statistics.median(xs), unit)}{sep}{unit} "
            f"({fmt(min(xs), unit)}–{fmt(max(xs), unit)}, n={len(xs)})")


def pending(cmd: str | None = None, where: str = "the command above") -> str:
    return f"not yet measured with 3 repeats — run: {f'`{cmd}`' if cmd else where}"


def judge(ok, values: list[float]) -> str:
    """met / missed on the median, with how many repeats agree when they do not all."""
    if ok is None:
        return "—"
    k = sum(bool(ok(v)) for v in values)
    text = "met" if ok(statistics.median(values)) else "**missed**"
    return text + (f" ({k} of {len(values)} repeats meet it)" if 0 < k < len(values) else "")


def read_json(path: Path):
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)


def load(results: Path, name: str):
    """The stored file, or None when it is absent or was run with other settings than the docs'."""
    path = results / name
    if not path.exists():
        return None
    data = read_json(path)
    return None if any(data.get(k) != v for k, v in EXPECT.get(name, {}).items()) else data


def provenance(data, name: str, cmd: str) -> str:
    if not data:
        return f"Not yet measured with 3 repeats — run: `{cmd}` (writes `{RES}{name}`), then `python benchmarks/report.py`."
    line = f"Command: `{cmd}` → `{RES}{name}`"
    m = data.get("machine") or {}
    load = (m.get("loadavg") or ["?"])[0]
    return (line + f"; run {data.get('date', '?')} on {m.get('cpu', '?')} ({m.get('cores', '?')} cores), "
            f"{m.get('threads', '?')} thread(s), torch {m.get('torch', '?')}, load average {load} at start.")


# -- the engine ----------------------------------------------------------------------------------

def _index(data) -> dict:
    return {} if not data else {(r["case"], r["variant"]): r for r in data["results"]}


def engine_table(data, cmd: str, name: str = "", targets=None, what: str = "issue #4 target") -> str:
    idx = _index(data)
    out = [provenance(data, name, cmd) if name else f"Source: `{cmd}`."]
    if data and measured(data.get("matmul_gflops"), "GFLOP/s"):
        out[0] += f" Float32 matmul in the same run: {measured(data['matmul_gflops'], 'GFLOP/s')}."
    out += ["", f"| case ({what}) | attnkit | anchor (same run) | ratio, repeat by repeat | target | |",
            "|---|---|---|---|---|---|"]
    for t in engine_targets.TARGETS if targets is None else targets:
        unit, plus = ("s", "") if t.metric == "seconds" else ("MiB", "+")
        ours = (idx.get(t.ours) or {}).get(t.metric)
        anchor = (idx.get(t.anchor) or {}).get(t.metric) if t.anchor else None
        a, b = measured(ours, unit, plus), measured(anchor, unit, plus) if t.anchor else "—"
        pairs = [(x, y) for x, y in zip(ours or [], anchor or ours or []) if x is not None and y is not None]
        ratios = [y / x if t.kind == "faster" else x / y for x, y in pairs] if t.anchor else [x for x, _ in pairs]
        if a is None or b is None or (t.anchor and measured(ratios) is None):
            out.append(f"| {t.label} | {pending()} | — | — | {t.target} | — |")
            continue
        if not t.anchor:
            ratio = "—"
        elif t.kind == "fraction":
            inv = [1 / r for r in ratios]  # anchor / ours, shown as 1/x
            ratio = (f"1/{fmt(statistics.median(inv), 'fraction')} (1/{fmt(min(inv), 'fraction')}–"
                     f"1/{fmt(max(inv), 'fraction')}, n={len(inv)})")
        else:
            ratio = ("speed-up " if t.kind == "faster" else "") + measured(ratios, "×" if t.kind == "faster" else "")
        anchor_cell = f"{t.anchor_label} {b}".strip() if t.anchor else "—"
        out.append(f"| {t.label} | {t.ours_label}{a} | {anchor_cell} | {ratio} | {t.target} | {judge(t.ok, ratios)} |")
    return "\n".join(out)


def _hours_apart(a: str, b: str) -> float:
    """Hours between two stored run dates (``YYYY-MM-DD HH:MM:SS``); infinite when either is unreadable."""
    import datetime

    try:
        t = [datetime.datetime.strptime(x[:19], "%Y-%m-%d %H:%M:%S") for x in (a, b)]
    except ValueError:
        return float("inf")
    return abs((t[1] - t[0]).total_seconds()) / 3600


def threads_table(one, two, names=("engine_1thread.json", "engine_2threads.json")) -> str:
    if not one or not two:
        missing = [n for n, d in zip(names, (one, two)) if not d]
        return "\n".join(f"* `{RES}{n}`: {pending(COMMANDS[n])}" for n in missing)
    cpus = [(d.get("machine") or {}).get("cpu") for d in (one, two)]
    if cpus[0] != cpus[1]:  # a ratio across two machines says nothing about threads
        return (f"`{RES}{names[0]}` ran on {cpus[0]} and `{RES}{names[1]}` on {cpus[1]}: no speed-up across "
                f"two machines. Rerun the one-thread file on the machine of the other: `{COMMANDS[names[0]]}`.")
    i1, i2 = _index(one), _index(two)
    g1, g2 = one.get("matmul_gflops") or [], two.get("matmul_gflops") or []
    dates = [str(d.get("date", "?")) for d in (one, two)]
    apart = "" if _hours_apart(*dates) <= 2 else (
        f" The two runs are not of one sitting (more than two hours apart: {dates[0]} and {dates[1]}): the code and the machine's state may "
        "differ between them, so a speed-up here mixes the second thread with both; the float32 matmul row below "
        "shows the machine's own change.")
    out = [f"From `{RES}{names[0]}` and `{RES}{names[1]}` (commands above); the speed-up "
           "from the second thread is taken over every pairing of a 1-thread and a 2-thread repeat." + apart, "",
           "| case | variant | 1 thread | 2 threads | speed-up from the second thread |", "|---|---|---|---|---|"]
    for key, r1 in i1.items():
        r2 = i2.get(key)
        s1, s2 = [x for x in r1["seconds"] if x], [x for x in (r2 or {}).get("seconds", []) if x]
        if measured(s1) and measured(s2):
            out.append(f"| {key[0]} | {key[1]} | {measured(s1, 's')} | {measured(s2, 's')} | "
                       f"{measured([x / y for x in s1 for y in s2], '×')} |")
    if measured(g1) and measured(g2):  # the machine's own bound: a large float32 GEMM's throughput
        out.append(f"| float32 matmul 2048×2048 (the hardware's scaling) | GFLOP/s | {measured(g1, 'GFLOP/s')} | "
                   f"{measured(g2, 'GFLOP/s')} | {measured([y / x for x in g1 for y in g2], '×')} |")
    return "\n".join(out)


def causal_table(data) -> str:
    name = "causal_64k.json"
    runs = (data or {}).get("runs", [])
    cells = [measured([r.get(k) for r in runs], unit) for k, unit in
             (("total_s", "s"), ("forward_s", "s"), ("peak_gib", "GiB"), ("growth_gib", "GiB"))]
    out = [provenance(data, name, COMMANDS[name]), "",
           "| case (issue #4 target) | fwd+bwd time | of which forward | process peak memory | growth over the inputs "
           "| target | |", "|---|---|---|---|---|---|---|"]
    label = "exact causal attention, N=65536, B=1, H=8, D=64, fwd+bwd (tiled)"
    if None in cells:
        out.append(f"| {label} | {pending()} | — | — | — | process peak < 4 GiB | — |")
    else:
        peaks = [r["peak_gib"] for r in runs if r.get("peak_gib") is not None]
        out.append(f"| {label} | {' | '.join(cells)} | process peak < 4 GiB | {judge(lambda v: v < 4, peaks)} |")
    return "\n".join(out)


# -- quality -------------------------------------------------------------------------------------

DEMO_MODEL = "`Seq2Seq`, Luong general + input feeding, GRU 128"
CLASSIFIERS = {  # task -> (label, model)
    "digits": ("digits", "`AttentionClassifier`, 2×2 patches, 2-layer Transformer, query pooling"),
    "mnist": ("MNIST", "`AttentionMemoryClassifier` (seed 001), bi-GRU over rows, 4 memory steps"),
    "sst2": ("SST-2", "`AttentionClassifier`, bi-GRU 128, MLP pooling, from scratch"),
}
M30K = {"transformer": ("`Transformer` d=256, 3+3 layers, BPE 8k", 35.0),
        "seq2seq": ("`Seq2Seq`, bi-GRU 512, Bahdanau attention, input feeding", 30.0)}
HEADER = ["| task | model | command | split | result | target | wall time | epochs | repeats, conditions |",
          "|---|---|---|---|---|---|---|---|---|"]


def demo_rows(data) -> list[str]:
    rows = []
    for run, label, target in (("demo", "dates (demo)", "≥ 95% within 3 minutes"), ("train", "dates (10 epochs)", "≥ 99.5%")):
        runs = [r for r in (data or {}).get("runs", []) if r["run"] == run]
        acc = measured([r["test_exact_match_percent"] for r in runs], "%")
        wall = measured([r["wall_seconds"] for r in runs], "s")
        ep = measured([r["epochs"] for r in runs], "epochs")
        cmd = COMMANDS["demo_quality.json"]
        if None in (acc, wall, ep):
            rows.append(f"| {label} | {DEMO_MODEL} | `{cmd}` | — | {pending(where=IN_ROW)} | {target} | — | — | — |")
            continue
        loads = measured([r["load_before"][0] for r in runs])
        rows.append(f"| {label} | {DEMO_MODEL} | `{runs[0]['command']}` (each repeat), from `{data['command']}` | "
                    f"{runs[0]['split']} | **{acc}** exact match | {target} | {wall} | {ep} | "
                    f"{len(runs)} repeats, {data['threads']} thread; load average at start {loads} |")
    return rows


def classifier_rows(records) -> list[str]:
    last = {r["task"]: r for r in records or [] if r.get("rc") == 0}
    rows = []
    for task, (label, model) in CLASSIFIERS.items():
        r = last.get(task)
        if r is None:
            rows.append(f"| {label} | {model} | — | — | no stored run: `{ONE_RUN['classifiers.jsonl'].replace('TASK', task)}` | — | — | — | — |")
            continue
        threads = re.search(r"--threads (\d+)", r["command"])
        rows.append(f"| {label} | {model} | `{r['command']}` | {r['split']} | **{100 * r['accuracy']:.1f}%** (1 run) | "
                    f"≥ {100 * r['target']:.1f}% | {fmt(r['wall_s'], 's')} s (1 run) | {r['epochs']} | "
                    f"1 run, {threads.group(1) if threads else '?'} thread; load average "
                    f"{r['loadavg_before'][0]:.1f} at start, {r['loadavg_after'][0]:.1f} at end |")
    return rows


def _m30k_command(d) -> str:
    return d.get("command") or "python benchmarks/multi30k.py " + " ".join(d["overrides"])


def m30k_row(model: str, d) -> str:
    desc, target = M30K[model]
    if d is None:
        return f"| Multi30k En→De | {desc} | — | — | no stored run: `{ONE_RUN[f'multi30k_{model}.json']}` | ≥ {target:.0f} BLEU | — | — | — |"
    t, train = d["test"], sum(r["seconds"] for r in d["history"])
    return (f"| Multi30k En→De | {desc} | `{_m30k_command(d)}` (last invocation) | test2016 (1,000) | "
            f"**{t['test_bleu']:.2f} BLEU**, chrF {t['test_chrf']:.2f} (beam {t['beam']}; 1 run) | ≥ {target:.0f} BLEU | "
            f"{fmt(train, 's')} s of training (1 run) | {len(d['history'])} | 1 run, {d['threads']} thread |")


def quality_table(results: Path) -> str:
    return "\n".join(HEADER + demo_rows(load(results, "demo_quality.json"))
                     + classifier_rows(load(results, "classifiers.jsonl"))
                     + [m30k_row(m, load(results, f"multi30k_{m}.json")) for m in M30K])


def m30k_block(results: Path, model: str) -> str:
    name = f"multi30k_{model}.json"
    d = load(results, name)
    if d is None:
        return f"No stored run: `{ONE_RUN[name]}`."
    t, g, hist = d["test"], d["test_greedy"], d["history"]
    train, target = sum(r["seconds"] for r in hist), M30K[model][1]
    out = [f"Command (the run's last invocation, as stored): `{_m30k_command(d)}`; file `{RES}{name}`. "
           "**1 run**: a training of hours is not repeated, so these figures have no spread.", "",
           f"test2016 with the epoch-{t['best_epoch']} checkpoint (best valid BLEU): **BLEU {t['test_bleu']:.2f}**, "
           f"chrF {t['test_chrf']:.2f} (beam {t['beam']}); greedy BLEU {g['bleu']:.2f}, chrF {g['chrf']:.2f}. "
           f"Target ≥ {target:.0f} BLEU: {'met' if t['test_bleu'] >= target else '**missed**'}. "
           f"Training wall time {fmt(train, 's')} s ({train / 3600:.1f} h, the sum of the epochs below) for "
           f"{len(hist)} epochs on {d['threads']} thread; decoding the test set with beam {t['beam']}: "
           f"{fmt(t['decode_s'], 's')} s.", "",
           "| epoch | train loss | valid BLEU (greedy) | valid chrF | epoch wall time |", "|---|---|---|---|---|"]
    best = max(r["valid_bleu"] for r in hist)
    for r in hist:
        bleu = f"{r['valid_bleu']:.1f}"
        out.append(f"| {r['epoch']} | {r['loss']:.2f} | {f'**{bleu}**' if r['valid_bleu'] == best else bleu} | "
                   f"{r['valid_chrf']:.1f} | {fmt(r['seconds'], 's')} s |")
    return "\n".join(out)


def readme_quality(results: Path) -> str:
    demo = [r for r in (load(results, "demo_quality.json") or {}).get("runs", []) if r["run"] == "demo"]
    acc, wall = measured([r["test_exact_match_percent"] for r in demo], "%"), measured([r["wall_seconds"] for r in demo], "s")
    demo_text = (f"demo {acc} test exact match in {wall} wall time (`attnkit demo`, 1 thread)" if acc and wall
                 else f"demo (`attnkit demo`): {pending(COMMANDS['demo_quality.json'])}")
    last = {r["task"]: r for r in load(results, "classifiers.jsonl") or [] if r.get("rc") == 0}
    parts = [demo_text] + [f"{label} {100 * last[t]['accuracy']:.1f}%{' dev' if t == 'sst2' else ''} (1 run)"
                           for t, (label, _) in CLASSIFIERS.items() if t in last]
    m30k = []
    for model, name in (("transformer", "Transformer"), ("seq2seq", "Seq2Seq with Bahdanau attention")):
        d = load(results, f"multi30k_{model}.json")
        if d:
            h = d["history"]
            m30k.append(f"{name} **{d['test']['test_bleu']:.1f} BLEU** ({len(h)} epochs, "
                        f"{sum(r['seconds'] for r in h) / 3600:.1f} h on {d['threads']} CPU thread)")
    text = "Quality reached so far (commands, conditions and raw JSON in [docs/benchmarks.md](docs/benchmarks.md)): "
    text += "; ".join(parts)
    if m30k:
        text += "; Multi30k En→De test2016, 1 run each: " + "; ".join(m30k)
    cap: dict[str, list[dict]] = {}
    for r in (load(results, "captioning.json") or {}).get("runs", []):
        if r.get("rc") == 0 and r.get("metrics"):
            cap.setdefault(r.get("label"), []).append(r["metrics"])

    def cap_med(label, key):
        return _median_spread([mt[key] for mt in cap[label]])[0]

    def n_runs(label):
        return f"{len(cap[label])} run{'s' if len(cap[label]) > 1 else ''}"

    if "soft" in cap and "hard" in cap:
        text += (f"; captioning (generated scenes, 1,000 test images): soft attention "
                 f"**{cap_med('soft', 'test_bleu4'):.3f} BLEU-4**, attention correctness "
                 f"{cap_med('soft', 'test_attention_correctness'):.3f} ({n_runs('soft')}, median); hard attention "
                 f"{cap_med('hard', 'test_bleu4'):.3f} BLEU-4 ({n_runs('hard')})")
    vqa: dict[str, list[dict]] = {}
    for r in (load(results, "vqa.json") or {}).get("runs", []):
        if r.get("rc") == 0 and r.get("metrics"):
            vqa.setdefault(r["label"], []).append(r["metrics"])
    parts = []
    for label, ms in vqa.items():
        acc = _median_spread([m["test_accuracy"] for m in ms])[0]
        rel = [m["test_relational_accuracy"] for m in ms if "test_relational_accuracy" in m]
        extra = (f" (relational {100 * _median_spread(rel)[0]:.1f}%, non-relational "
                 f"{100 * _median_spread([m['test_non_relational_accuracy'] for m in ms])[0]:.1f}%)" if rel else "")
        parts.append(f"{label} **{100 * acc:.2f}%**{extra} test accuracy ({len(ms)} run{'s' if len(ms) > 1 else ''})")
    if parts:
        text += "; VQA: " + "; ".join(parts)
    speech = [r["metrics"] for r in (load(results, "speech.json") or {}).get("runs", [])
              if r.get("rc") == 0 and r.get("metrics")]
    if speech:
        mid = {k: _median_spread([s[k] for s in speech])[0] for k in ("test_date_exact_match", "test_cer")}
        text += (f"; speech (generated, held-out voices): dates **{100 * mid['test_date_exact_match']:.1f}%** exact, "
                 f"CER **{100 * mid['test_cer']:.2f}%** ({len(speech)} run{'s' if len(speech) > 1 else ''})")
    return text + "."


def sources(results: Path) -> str:
    out = ["| file | written by | date | machine | repeats |", "|---|---|---|---|---|"]
    for name, cmd in COMMANDS.items():
        d = load(results, name)
        if d is None:
            out.append(f"| `{RES}{name}` | `{cmd}` | — | — | {pending(where=IN_ROW)} |")
        else:
            m = d["machine"]
            out.append(f"| `{RES}{name}` | `{d['command']}` | {d['date']} | {m['cpu']}, {m['cores']} cores, "
                       f"{m['threads']} thread(s), torch {m['torch']} | {d['repeat']} |")
    for name in ("gpu.json", "gpu_sweep.json"):
        d = load(results, name)
        if d is not None:
            out.append(f"| `{RES}{name}` | `{d.get('command', 'python benchmarks/gpu.py --cases sigmoid_sweep')}` | "
                       f"{d['date']} | one {d['machine']}, torch {d['torch']}, triton {d.get('triton', '—')} | "
                       + ("every repeat stored (see the GPU section)" if name == "gpu.json"
                          else "3 timings per setting") + " |")
    for name, cmd in ONE_RUN.items():
        d = load(results, name)
        last = (d[-1] if isinstance(d, list) else d) if d else None
        if last:
            m = last.get("machine") or {}
            machine = f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}" if m else "not recorded"
            runs = "1 run (long training, not repeated)"
            if isinstance(last.get("runs"), list):  # a file of several runs: how many of each kind
                counts: dict[str, int] = {}
                for r in last["runs"]:
                    counts[r.get("label", "?")] = counts.get(r.get("label", "?"), 0) + 1
                runs = "; ".join(f"{k}: {n} run{'s' if n > 1 else ''}" for k, n in counts.items())
            out.append(f"| `{RES}{name}` | `{cmd}` (the stored run's own command: quality table) | "
                       f"{last.get('date', 'not recorded')} | {machine} | {runs} |")
    return "\n".join(out)


def training_runs(results: Path, name: str):
    """A file of training runs (benchmarks/train_runs.py): ``(data, machine, successful runs, runs
    by label)``, or the line to print when it is not measured yet."""
    d = load(results, name)
    if not d:
        return f"Not yet measured — run: `{ONE_RUN[name]}`, then `python benchmarks/report.py`."
    ok = [r for r in d["runs"] if r["rc"] == 0 and r["metrics"]]
    by: dict[str, list] = {}
    for r in ok:
        by.setdefault(r.get("label") or r.get("attention"), []).append(r)
    return d, d["machine"], ok, by


def captioning_block(results: Path) -> str:
    """The captioning targets (soft: BLEU-4 and attention correctness >= 0.6; hard: BLEU-4 within
    10% of soft's) and each run's validation curve."""
    runs = training_runs(results, "captioning.json")
    if isinstance(runs, str):
        return runs
    d, m, ok, by = runs

    def med(kind, key):
        vals = [r["metrics"][key] for r in by.get(kind, []) if r["metrics"].get(key) is not None]
        return _median_spread(vals)[0] if vals else None

    lines = [f"Command: `{d['command']}` → `{RES}captioning.json`; run {d['date']} on {m['cpu']} ({m['cores']} cores), "
             f"{m['threads']} thread(s), torch {m['torch']}; {d['repeat']} run(s) per attention kind (long trainings).",
             "", "| attention | command | test BLEU-4 | CIDEr-D | attention correctness | target | | wall time | epochs |",
             "|---|---|---|---|---|---|---|---|---|"]
    soft_bleu = med("soft", "test_bleu4")

    def cell(rs, key, bold=False):  # the median over the runs, the spread in brackets
        vals = [r["metrics"][key] for r in rs if r["metrics"].get(key) is not None]
        if not vals:
            return "—"
        mid, lo, hi = _median_spread(vals)
        text = f"**{mid:.3f}**" if bold else f"{mid:.3f}"
        return text + (f" ({lo:.3f}–{hi:.3f})" if len(vals) > 1 else "")

    for kind, rs in by.items():
        if not rs:
            continue
        bleu, ac = med(kind, "test_bleu4"), med(kind, "test_attention_correctness")
        if kind == "soft":
            target = "BLEU-4 ≥ 0.6 and attention correctness ≥ 0.6"
            met = bleu >= 0.6 and (ac or 0) >= 0.6
        elif kind != "hard":
            target, met = "— (a comparison: what the penalty does)", None
        else:
            target = "BLEU-4 within 10% of soft's" + (f" (≥ {0.9 * soft_bleu:.3f})" if soft_bleu else "")
            met = soft_bleu is not None and bleu >= 0.9 * soft_bleu
        walls = sorted(r["wall_s"] for r in rs)
        wall = f"{fmt(walls[len(walls) // 2], 's')} s" + (
            f" ({fmt(walls[0], 's')}–{fmt(walls[-1], 's')}, {len(rs)} runs)" if len(rs) > 1 else " (1 run)")
        words = _median_spread([r["metrics"].get("test_grounded_words", 0) for r in rs])[0]
        lines.append(f"| {kind} | `{rs[0]['command']}`{' (seeds ' + ', '.join(str(r['seed']) for r in rs) + ')' if len(rs) > 1 else ''} | "
                     f"{cell(rs, 'test_bleu4', True)} | {cell(rs, 'test_cider_d')} | "
                     f"{cell(rs, 'test_attention_correctness', True)} ({words} words) | "
                     f"{target} | {'' if met is None else 'met' if met else '**missed**'} | {wall} | "
                     f"{len((rs[0]['history'] or {}).get('loss', []))} |")
    lines += ["", "Validation BLEU-4 (greedy, 300 scenes) after each epoch:", "",
              "| attention | " + " | ".join(str(i + 1) for i in range(max(len(r["history"]["valid_bleu4"]) for r in ok)))
              + " |", "|---|" + "---|" * max(len(r["history"]["valid_bleu4"]) for r in ok)]
    for r in ok:
        lines.append(f"| {r.get('label', r['attention'])} | " + " | ".join(f"{v:.3f}" for v in r["history"]["valid_bleu4"]) + " |")
    return "\n".join(lines)


#: VQA targets: (label, metric key, threshold, what it says)
VQA_TARGETS = {"easy-VQA, SAN": [("test_accuracy", 0.98, "accuracy ≥ 98%")],
               "Sort-of-CLEVR, SAN": [("test_relational_accuracy", 0.90, "relational ≥ 90%"),
                                      ("test_non_relational_accuracy", 0.98, "non-relational ≥ 98%")],
               "Sort-of-CLEVR, SAN, curriculum 5": [("test_relational_accuracy", 0.90, "relational ≥ 90%"),
                                                    ("test_non_relational_accuracy", 0.98, "non-relational ≥ 98%")],
               "Sort-of-CLEVR, relational, curriculum 6": [("test_relational_accuracy", 0.90, "relational ≥ 90%"),
                                                           ("test_non_relational_accuracy", 0.98,
                                                            "non-relational ≥ 98%")],
               "Sort-of-CLEVR, Transformer": [("test_relational_accuracy", 0.90, "relational ≥ 90%"),
                                              ("test_non_relational_accuracy", 0.98, "non-relational ≥ 98%")]}


def _median_spread(vals: list[float]) -> tuple[float, float, float]:
    vals = sorted(vals)
    return vals[len(vals) // 2], vals[0], vals[-1]


def _cell(rs: list[dict], key: str, pct: bool = True) -> str:
    """Median of ``key`` over the runs ``rs`` with the spread in brackets (percentages by default)."""
    vals = [r["metrics"][key] for r in rs if r["metrics"].get(key) is not None]
    if not vals:
        return "—"
    mid, lo, hi = _median_spread(vals)
    f = (lambda v: f"{100 * v:.2f}%") if pct else (lambda v: fmt(v, "s"))
    return f"{f(mid)}" + (f" ({f(lo)}–{f(hi)})" if len(vals) > 1 else "")


def _verdicts(rs: list[dict], targets: list[tuple]) -> tuple[str, str]:
    """``(what the targets say, met / missed for each)``; a target is ``(key, threshold, what)``
    (the median must reach the threshold) or ``(key, threshold, what, "max")`` (stay at or under it)."""
    said, verdicts = [], []
    for key, threshold, what, *how in targets:
        vals = [r["metrics"].get(key) for r in rs if r["metrics"].get(key) is not None]
        mid = _median_spread(vals)[0] if vals else None
        ok = mid is not None and (mid <= threshold if how == ["max"] else mid >= threshold)
        said.append(what)
        verdicts.append("met" if ok else "**missed**")
    return "; ".join(said), "; ".join(verdicts)


def _wall(rs: list[dict]) -> str:
    mid, lo, hi = _median_spread([r["wall_s"] for r in rs])
    return f"{fmt(mid, 's')} s" + (f" ({fmt(lo, 's')}–{fmt(hi, 's')})" if len(rs) > 1 else "")


def _header(d: dict, m: dict, name: str) -> str:
    commands = " and ".join(f"`{c}`" for c in d.get("commands", [d["command"]]))
    return (f"Commands: {commands} → `{RES}{name}`; last run {d['date']} on {m['cpu']} ({m['cores']} cores), "
            f"{m['threads']} thread(s), torch {m['torch']}. Figures are the median over the runs (seeds 0, 1, …) "
            "with the lowest and highest in brackets." + (
                f" The test figures were measured again on the same checkpoints, {d['reevaluated']['date']}, by "
                f"`{d['reevaluated']['command']}` after a change to decoding; wall times and curves are those of "
                "the training runs." if d.get("reevaluated") else ""))


def vqa_block(results: Path) -> str:
    """The VQA targets per variant (median over the stored runs, with the spread) and each run's
    validation curve."""
    runs = training_runs(results, "vqa.json")
    if isinstance(runs, str):
        return runs
    d, m, ok, by = runs
    lines = [_header(d, m, "vqa.json"), "",
             "| data, model | runs | test accuracy | per kind of question | target | | wall time | epochs |",
             "|---|---|---|---|---|---|---|---|"]
    for label, rs in by.items():
        kinds = sorted({k for r in rs for k in r["metrics"] if k.endswith("_accuracy") and k not in
                        ("test_accuracy", "test_vqa_accuracy")})
        per_kind = "; ".join(f"{k[5:-9].replace('_', '-')} {_cell(rs, k)}" for k in kinds)
        targets, verdicts = _verdicts(rs, VQA_TARGETS.get(label, []))
        lines.append(f"| {label} (`{rs[0]['command'].replace(' --seed 0', '')}`) | {len(rs)} | "
                     f"**{_cell(rs, 'test_accuracy')}** | {per_kind} | {targets} | {verdicts} | {_wall(rs)} | "
                     f"{len((rs[0]['history'] or {}).get('loss', []))} |")
    lines += ["", "Validation accuracy after each epoch (seed 0):", ""]
    for label, rs in by.items():
        h = rs[0]["history"]["valid_accuracy"]
        lines.append(f"- {label}: " + ", ".join(f"{100 * v:.1f}%" for v in h))
    return "\n".join(lines)


#: speech targets on the held-out speakers (see :func:`_verdicts`)
SPEECH_TARGETS = {"LAS, location-aware": [("test_date_exact_match", 0.95, "dates exact ≥ 95%"),
                                          ("test_cer", 0.05, "CER ≤ 5%", "max"),
                                          ("test_monotonic", 0.95, "monotonic ≥ 95%")]}


def speech_block(results: Path) -> str:
    """The speech targets (median over the stored runs, with the spread) and each run's validation
    curve."""
    runs = training_runs(results, "speech.json")
    if isinstance(runs, str):
        return runs
    d, m, ok, by = runs
    lines = [_header(d, m, "speech.json"), "",
             "| model | runs | dates exact | dates exact, normalized output alone | numbers exact | CER | WER | "
             "monotonic steps | target | | wall time | epochs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, rs in by.items():
        targets, verdicts = _verdicts(rs, SPEECH_TARGETS.get(label, []))
        lines.append(f"| {label} (`{rs[0]['command'].replace(' --seed 0', '')}`) | {len(rs)} | "
                     f"**{_cell(rs, 'test_date_exact_match')}** | {_cell(rs, 'test_norm_output_date_exact_match')} | "
                     f"{_cell(rs, 'test_number_exact_match')} | "
                     f"**{_cell(rs, 'test_cer')}** | {_cell(rs, 'test_wer')} | {_cell(rs, 'test_monotonic')} | "
                     f"{targets} | {verdicts} | {_wall(rs)} | {len((rs[0]['history'] or {}).get('loss', []))} |")
    lines += ["", "Validation CER and exact match (greedy) after each epoch (seed 0):", ""]
    for label, rs in by.items():
        h = rs[0]["history"]
        lines.append(f"- {label}: CER " + ", ".join(f"{100 * v:.1f}%" for v in h["valid_cer"]) + "; exact match "
                     + ", ".join(f"{100 * v:.1f}%" for v in h.get("valid_exact_match", [])))
    return "\n".join(lines)


def compile_block(results: Path) -> str:
    """Compiled against eager training steps (benchmarks/compile.py), same run."""
    d = load(results, "compile.json")
    if d is None:
        return f"Not yet measured — run: `{COMMANDS['compile.json']}`"
    m = d["machine"]
    steps = d["results"][0]["steps"] if d["results"] else 0
    lines = [f"Command: `{d['command']}` → `{RES}compile.json`; run {d['date']} on {m['cpu']} ({m['cores']} cores), "
             f"{m['threads']} thread(s), torch {m['torch']}. Seconds per step (a training step: forward, loss, "
             f"backward, AdamW; a decode: the batch decoded greedily, 12 steps for the Seq2Seq, 20 for the Transformer): the median over the timed repeats ({steps} "
             "steps each) with the spread; eager is timed before and after the compiled repeats. Compile cost: the "
             "first compiled step less a steady one, with inductor's graph caches off.", "",
             "| case | target tokens | eager | compiled | speed-up | tokens/s, eager → compiled "
             "| compile cost |", "|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        same = {True: " (tokens equal eager's)", False: " (tokens differ from eager's)"}.get(r.get("same_tokens"), "")
        lines.append(f"| {r['case']}{same} | {r['tokens_per_step']:,} | {measured(r['eager_s'], 's')} | "
                     f"{measured(r['compiled_s'], 's')} | {fmt(r['speedup'])}× | "
                     f"{r['eager_tokens_per_s']:,.0f} → {r['compiled_tokens_per_s']:,.0f} | "
                     f"{fmt(r['compile_cost_s'], 's')} s |")
    w = load(results, "compile_window.json")
    if w is None:
        lines += ["", f"The long-window encoder is not yet measured — run: `{COMMANDS['compile_window.json']}`"]
        return "\n".join(lines)
    m = w["machine"]
    lines += ["", f"A long window, compiled: attnkit's tiled operator against SDPA with a dense mask. Command: "
              f"`{w['command']}` → `{RES}compile_window.json`; run {w['date']} on {m['cpu']} ({m['cores']} cores), "
              f"{m['threads']} thread(s), torch {m['torch']}. Seconds per training step, median over the timed "
              "repeats with the spread (attnkit compiled is timed before and after the anchor).", "",
              "| case | tokens | attnkit eager | attnkit compiled | anchor compiled | anchor's time over attnkit's "
              "| compile cost, attnkit / anchor |", "|---|---|---|---|---|---|---|"]
    for r in w["results"]:
        if "anchor" not in r:
            continue
        lines.append(f"| {r['case']} (anchor: {r['anchor']}) | {r['tokens_per_step']:,} | "
                     f"{measured(r['eager_s'], 's')} | {measured(r['compiled_s'], 's')} | "
                     f"{measured(r['anchor_compiled_s'], 's')} | {fmt(r['anchor_over_compiled'])}× | "
                     f"{fmt(r['compile_cost_s'], 's')} s / {fmt(r['anchor_compile_cost_s'], 's')} s |")
    return "\n".join(lines)


def distributed_block(results: Path) -> str:
    """Ring attention over R gloo processes against one process (benchmarks/distributed.py)."""
    d = load(results, "distributed.json")
    if d is None:
        return f"Not yet measured — run: `{COMMANDS['distributed.json']}`"
    m, s = d["machine"], d["shape"]
    lines = [f"Command: `{d['command']}` → `{RES}distributed.json`; run {d['date']} on {m['cpu']} ({m['cores']} cores), "
             f"torch {m['torch']}. Causal attention, forward and backward, B={s['B']}, H={s['H']}, N={s['N']:,}, "
             f"D={s['D']}, {s['dtype']}; R gloo processes on this machine (zigzag ring attention) against one process "
             "(`attnkit.attention`, the tiled backend). Seconds: the median over the repeats with the spread, a "
             "repeat ending with its slowest rank. Peak memory: the largest rank's growth of its resident set "
             "over its size before the inputs (after a small warm-up call). Bytes: the most any rank sent, over "
             "the ring's minimum ((R-1)/R of the full K and V forward, twice that backward).", "",
             "| processes | threads each | time | peak memory per rank | against one process | bytes sent / minimum, "
             "forward · backward | time waiting on communication |", "|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        R = r["world_size"]
        ratio = f"{r['peak_over_one_process']:.2f}× memory, {fmt(r['speedup'])}× speed" if R > 1 else "—"
        traffic = (f"{r['forward_bytes_over_minimum']:.3f} · {r['backward_bytes_over_minimum']:.3f}" if R > 1 else "—")
        wait = f"{100 * r['wait_share_median']:.0f}%" if R > 1 else "—"
        lines.append(f"| {R} | {r['threads_per_rank']} | {measured(r['seconds'], 's')} | {r['peak_mib_max']:,.0f} MiB | "
                     f"{ratio} | {traffic} | {wait} |")
    return "\n".join(lines)


def small_calls_block(results: Path) -> str:
    """One decoding step, attnkit against SDPA (benchmarks/small_calls.py), same run."""
    d = load(results, "small_calls.json")
    if d is None:
        return f"Not yet measured — run: `{COMMANDS['small_calls.json']}`"
    m, s = d["machine"], d["shape"]
    lines = [f"Command: `{d['command']}` → `{RES}small_calls.json`; run {d['date']} on {m['cpu']} ({m['cores']} cores), "
             f"{m['threads']} thread(s), torch {m['torch']}. B={s['B']}, H={s['H']}, Tq={s['Tq']}, Tk={s['Tk']}, "
             f"D={s['D']}, float32, no grad; microseconds per call: the median over {d['repeat']} repeats of "
             f"{d['calls']:,} calls with the spread.", "",
             "| call | time per call | against SDPA without a mask (the same calls) |", "|---|---|---|"]
    for r in d["results"]:
        lines.append(f"| {r['case']} | {measured(r['us'], 'us')} | {fmt(r['ratio_to_sdpa'])}× |")
    return "\n".join(lines)


#: the GPU cases (benchmarks/gpu.py) and their targets: (case, what is compared, the ratio, target, met)
GPU_TARGETS = [
    ("sdpa_route", "routed to SDPA: time against calling SDPA directly", "time", "≤ 1.03×", lambda r: r <= 1.03),
    ("flex_route", "routed to flex: time against calling compiled flex directly", "time", "≤ 1.05×",
     lambda r: r <= 1.05),
    ("sigmoid_causal", "sigmoid, causal, fwd+bwd: TFLOP/s against SDPA-flash softmax", "tflops", "≥ 0.80×",
     lambda r: r >= 0.80),
    ("sigmoid_causal_fwd", "the same, forward only (no target)", "tflops", "—", None),
    ("entmax_causal", "1.5-entmax, causal, fwd+bwd: TFLOP/s (softmax's work) against SDPA-flash softmax", "tflops",
     "≥ 0.35×", lambda r: r >= 0.35),
    ("entmax_causal_fwd", "the same, forward only (no target)", "tflops", "—", None),
    ("weights_rows", "weights of 2 heads x every 64th row: time against the tiled engine (no target)", "time", "—",
     None),
    ("additive", "additive scores (hidden 128), T=4,096, fwd+bwd: time against the plain formula", "time", "< 1×",
     lambda r: r < 1.0),
    ("additive", "the same: peak memory against the plain formula", "peak", "≤ 1/20", lambda r: r <= 0.05),
]


def gpu_block(results: Path) -> str:
    """attnkit on a GPU against the kernels it routes to (benchmarks/gpu.py), same run."""
    d = load(results, "gpu.json")
    if d is None or d.get("smoke"):
        return ("Not yet measured — run on a machine with a GPU: `python benchmarks/gpu.py --json "
                "benchmarks/results/gpu.json` (or `bash benchmarks/gpu_session.sh`: the CUDA tests, then the benchmark)")
    s = d["shape"]
    lines = [f"Command: `{d['command']}` → `{RES}gpu.json`; run {d['date']} on one {d['machine']}, torch {d['torch']}, "
             f"triton {d.get('triton', '—')}. {s['dtype']}, B={s['B']}, H={s['H']}, N={s['N']:,}, D={s['D']}; "
             f"each time is the median of {d['repeat']} repeats of {d['iters']} calls (CUDA events) with the spread; "
             "TFLOP/s count the live work (the pairs the mask allows; backward = 2.5 × forward); peak = the most "
             "memory allocated above the inputs during one call.", "",
             "| case | variant | time | TFLOP/s | peak | ratio | target | |", "|---|---|---|---|---|---|---|---|"]
    for case, what, kind, target, ok in GPU_TARGETS:
        c = d["cases"].get(case)
        if c is None:
            continue
        if "error" in c:
            lines.append(f"| {what} | failed: {c['error'].splitlines()[0][:200]} | | | | | {target} | |")
            continue
        names = list(c["variants"])
        base, ours = c["variants"][names[0]], c["variants"][names[1]]
        r = (ours["median_s"] / base["median_s"] if kind == "time" else
             None if kind == "peak" and None in (ours["peak_mib"], base["peak_mib"]) else
             ours["peak_mib"] / base["peak_mib"] if kind == "peak" else ours["tflops"] / base["tflops"])
        verdict = "" if ok is None or r is None else ("met" if ok(r) else "**missed**")
        for i, n in enumerate(names):
            v = c["variants"][n]
            t = f"{v['median_s'] * 1e3:.2f} ms ({v['spread_s'][0] * 1e3:.2f}–{v['spread_s'][1] * 1e3:.2f})"
            row = ("—" if r is None else f"{r:.3f}×", target, verdict) if i == 1 else ("", "", "")
            peak = "—" if v["peak_mib"] is None else f"+{v['peak_mib']:,.0f} MiB"
            lines.append(f"| {what if i == 0 else ''} | {n} | {t} | {v['tflops']:.0f} | {peak} | "
                         + " | ".join(row) + " |")
    for case, c in d["cases"].items():   # sweeps run in this file (--cases ..._sweep)
        if case.endswith("_sweep") and "results" in c:
            lines += ["", f"`{case}`: {c['what']}; the defaults: {c.get('defaults', '—')}.", ""]
            lines += sweep_table(c["results"])
    sw = load(results, "gpu_sweep.json")
    if sw is not None:
        lines += ["", f"The Triton sigmoid kernel's settings (`{RES}gpu_sweep.json`, `{sw['command']}`): "
                  f"{sw['what']}."]
        for n, one in enumerate(sw["sweeps"], 1):
            lines += ["", f"Sweep {n} ({one['date']}; the defaults then: {one['defaults']}):", ""]
            lines += sweep_table(one["results"])
    return "\n".join(lines)


def sweep_table(results: dict) -> list[str]:
    """A Triton kernel's settings and their times (``"kernel (settings)" -> {median_s | error}``)."""
    lines = ["| kernel | block of queries, block of keys, warps, stages (or candidates) | time |", "|---|---|---|"]
    for key, v in results.items():
        name, cfg = key.split(" ", 1)
        lines.append(f"| {name} | {cfg} | " + (f"{v['median_s'] * 1e3:.2f} ms" if "median_s" in v else
                     "does not fit in shared memory" if "shared memory" in v.get("error", "") else "fails") + " |")
    return lines


def readme_gpu(results: Path) -> str:
    """The README's GPU sentence, from benchmarks/results/gpu.json (the cases it holds that ran)."""
    d = load(results, "gpu.json")
    if d is None or d.get("smoke"):
        return "Not yet measured on a GPU (`attnkit bench --device cuda`)."
    s, c = d["shape"], {name: one for name, one in d["cases"].items() if "variants" in one}

    def ratio(case, kind):
        v = list(c[case]["variants"].values())
        return v[1]["median_s"] / v[0]["median_s"] if kind == "time" else v[1]["tflops"] / v[0]["tflops"]

    parts = []
    if "sdpa_route" in c:
        parts.append(f"causal softmax routed to SDPA takes {ratio('sdpa_route', 'time'):.3f}× the time of calling "
                     "SDPA directly")
    if "flex_route" in c:
        parts.append(f"a sliding window routed to flex {ratio('flex_route', 'time'):.3f}× that of calling compiled "
                     "flex (the NaN check reads the inputs once)")
    if "sigmoid_causal" in c:
        sig = list(c["sigmoid_causal"]["variants"].values())
        fwd = (f" ({ratio('sigmoid_causal_fwd', 'tflops'):.0%} forward only)" if "sigmoid_causal_fwd" in c else "")
        mem = (f" with {sig[1]['peak_mib'] / sig[0]['peak_mib']:.0%} of its peak memory"
               if None not in (sig[0]["peak_mib"], sig[1]["peak_mib"]) else "")
        parts.append(f"causal sigmoid attention, forward and backward, runs at {ratio('sigmoid_causal', 'tflops'):.0%} "
                     f"of SDPA-flash softmax's TFLOP/s{fwd}{mem}")
    if "entmax_causal" in c:
        parts.append(f"causal 1.5-entmax, forward and backward, at {ratio('entmax_causal', 'tflops'):.0%} of it")
    if "additive" in c:
        add = list(c["additive"]["variants"].values())
        mem = (f" in {add[1]['peak_mib'] / add[0]['peak_mib']:.1%} of its peak memory"
               if None not in (add[0]["peak_mib"], add[1]["peak_mib"]) and add[0]["peak_mib"] else "")
        parts.append(f"additive scores take {ratio('additive', 'time'):.2f}× the time of the plain formula{mem}")
    failed = [name for name, one in d["cases"].items() if "error" in one]
    if not parts:
        return "Not yet measured on a GPU (`attnkit bench --device cuda`)."
    return (f"On one {d['machine']} ({s['dtype']}, B={s['B']}, H={s['H']}, N={s['N']:,}, D={s['D']}; "
            f"`{d['command']}`, median of {d['repeat']} repeats; the targets in "
            "[docs/benchmarks.md](docs/benchmarks.md#on-a-gpu-the-cuda-routes-and-the-triton-sigmoid-kernel)): "
            + "; ".join(parts) + "."
            + (f" Failed in that run: {', '.join(failed)} (see docs/benchmarks.md)." if failed else ""))


def render(results: Path) -> dict[str, dict[str, str]]:
    two, one = load(results, "engine_2threads.json"), load(results, "engine_1thread.json")
    causal = load(results, "causal_64k.json")
    engine2 = engine_table(two, COMMANDS["engine_2threads.json"], "engine_2threads.json")
    return {
        "docs/benchmarks.md": {
            "sources": sources(results), "quality": quality_table(results),
            "multi30k-transformer": m30k_block(results, "transformer"),
            "multi30k-seq2seq": m30k_block(results, "seq2seq"),
            "engine-2threads": engine2,
            "engine-1thread": engine_table(one, COMMANDS["engine_1thread.json"], "engine_1thread.json"),
            "causal-64k": causal_table(causal), "threads": threads_table(one, two),
            "captioning": captioning_block(results),
            "vqa": vqa_block(results),
            "speech": speech_block(results),
            "compile": compile_block(results),
            "small-calls": small_calls_block(results),
            "distributed": distributed_block(results),
            "gpu": gpu_block(results),
            "engine-round2": engine_table(load(results, "engine_round2.json"), COMMANDS["engine_round2.json"],
                                          "engine_round2.json", targets=engine_round2.TARGETS, what="target"),
            "engine-round2-65k": engine_table(load(results, "engine_round2_65k.json"),
                                              COMMANDS["engine_round2_65k.json"], "engine_round2_65k.json",
                                              targets=engine_round2.TARGETS_65K, what="target"),
            "engine-round2-alibi-profile": engine_table(
                load(results, "engine_round2_alibi_profile.json"), COMMANDS["engine_round2_alibi_profile.json"],
                "engine_round2_alibi_profile.json", targets=engine_round2.TARGETS_ALIBI_PROFILE, what="target"),
            "engine-window-recheck": engine_table(
                load(results, "engine_window_scaling_recheck.json"), COMMANDS["engine_window_scaling_recheck.json"],
                "engine_window_scaling_recheck.json",
                targets=[t for t in engine_targets.TARGETS if "cost linear" in t.label]),
            "engine-round2-threads": threads_table(load(results, "engine_round2_1thread.json"),
                                                   load(results, "engine_round2.json"),
                                                   ("engine_round2_1thread.json", "engine_round2.json")),
            "hf-targets": engine_table(load(results, "hf_2threads.json"), COMMANDS["hf_2threads.json"],
                                       "hf_2threads.json", targets=hf_targets.TARGETS, what="target")},
        "README.md": {"readme-quality": readme_quality(results), "readme-gpu": readme_gpu(results),
                      "readme-engine": engine2 + "\n\n" + causal_table(causal)},
    }


# -- the files -----------------------------------------------------------------------------------

BLOCK = re.compile(r"(<!-- generated:([\w-]+) -->\n)(.*?)(<!-- /generated -->)", re.S)
FIGURE = re.compile(r"(?<![\w.,/])\d[\d,]*(?:\.\d+)?\s?(?:ms|s|h|min|minutes|MiB|GiB|GB|GFLOP/s|%|×|BLEU)(?![\w])"
                    r"|\b(?:BLEU|chrF) \d+\.\d")
#: README sections whose prose this script polices (other sections are others')
README_SECTIONS = ("## The tiled engine and the benchmark table", "## On a GPU")


def fill(text: str, blocks: dict[str, str], fname: str) -> tuple[str, list[str], list[str]]:
    """``text`` with its blocks regenerated; the names of the stale blocks; errors."""
    stale, errors, seen = [], [], set()

    def sub(m):
        name = m.group(2)
        if name not in blocks:
            errors.append(f"{fname}: unknown generated block {name!r}")
            return m.group(0)
        seen.add(name)
        new = blocks[name].rstrip("\n") + "\n"
        if m.group(3) != new:
            stale.append(name)
        return m.group(1) + new + m.group(4)

    out = BLOCK.sub(sub, text)
    errors += [f"{fname}: block {name!r} has no <!-- generated:{name} --> marker" for name in blocks if name not in seen]
    return out, stale, errors


def typed_figures(text: str, fname: str) -> list[str]:
    """Measured-looking figures (a number with a unit) in the hand-written prose: not allowed."""
    text = BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = re.sub(r"`[^`\n]*`", "``", text)
    lines = text.splitlines()
    if fname == "README.md":  # only the sections this script owns
        keep, owned = [], False
        for line in lines:
            owned = line.startswith(README_SECTIONS) or (owned and not line.startswith("## "))
            keep.append(line if owned else "")
        lines = keep
    found = []
    for n, line in enumerate(lines, 1):
        for m in FIGURE.finditer(line):
            if not line[:m.start()].rstrip().endswith(("≥", "≤", "<", ">")):  # targets are not measurements
                found.append(f"{fname}:{n}: typed figure {m.group(0)!r} outside a generated block")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything is stale")
    p.add_argument("--root", default=str(HERE.parent), help="repository root (default: this one)")
    a = p.parse_args(argv)
    root = Path(a.root)
    problems = []
    for fname, blocks in render(root / "benchmarks" / "results").items():
        path = root / fname
        text = path.read_text(encoding="utf-8")
        new, stale, errors = fill(text, blocks, fname)
        problems += errors + typed_figures(new, fname)
        if stale and a.check:
            problems.append(f"{fname}: stale generated blocks {', '.join(stale)}: run python benchmarks/report.py")
        elif new != text:
            path.write_text(new, encoding="utf-8")
            print(f"wrote {fname} ({', '.join(stale)})")
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
