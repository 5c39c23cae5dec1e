"""`make docs-results`: docs/results/*.md, one page per bench, generated from bench/results/* and git history.

Each page says which command produced its figures, with the arguments the bench recorded, and which
commit last wrote its results folder (`git log -1 -- bench/results/NAME`). It is marked **stale** when
the code those figures measure (the bench module and the code it exercises, listed per bench below)
changed in a later commit or has uncommitted changes: the figures then describe older code. Tables come
from the results files; commentary (what the figures say, what was not measured) comes from the
hand-written docs/results/notes/NAME.md, which is printed under the tables as it is.

Pages are only rewritten when their text changes, and images the pages show are copied into
docs/results/img/ (git-ignored; the results folders keep the originals).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGES = ROOT / "docs" / "results"
NOTES = PAGES / "notes"
IMAGES = PAGES / "img"

# What a step costs and carries: the wire format, both ends of a step, the codec.
WIRE_PATH = ["proto/dlora.proto", "common/tensor_codec.py", "common/wire_format.py", "common/lora_wire.py",
             "edge_client/step_stream.py", "edge_client/remote_model.py", "cloud_server/step_runner.py",
             "cloud_server/edge_link.py", "cloud_server/taps.py"]
# What decides a training run's accuracy, on top of the wire path.
TRAINING = ["edge_client/trainer.py", "edge_client/objective.py", "edge_client/kill_revive.py", "common/lora.py"]
SPLIT = ["cloud_server/splitlora.py", "cloud_server/federation.py", "edge_client/split_model.py"]


@dataclass
class Bench:
    slug: str                      # the page: docs/results/SLUG.md, its notes: docs/results/notes/SLUG.md
    title: str
    folder: str | None             # bench/results/FOLDER; None: the bench has written no results yet
    command: str                   # the command that produced the figures (as run)
    code: list[str]                # the code its figures measure: a later change to any marks the page stale
    render: Callable[[Path], list[str]] | None = None
    images: list[str] = field(default_factory=list)


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def num(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def seeds(values: list[float]) -> str:
    return ", ".join(f"{100 * v:.1f}" for v in values)


def recorded_args(doc: dict) -> list[str]:
    args = doc.get("args")
    if not isinstance(args, dict):
        return []
    shown = ", ".join(f"`{k}={v if not isinstance(v, list) else ','.join(map(str, v))}`" for k, v in args.items())
    return [f"Arguments as the bench recorded them: {shown}.", ""]


# --- one renderer per results layout ------------------------------------------------------------------

def render_step_time(folder: Path) -> list[str]:
    out: list[str] = []
    for path in sorted(folder.glob("*.json")):
        rows = _load(path)
        out += [f"**`{path.name}`**", ""]
        out.append(table(["model", "batch", "wire", "in-process s", "distributed s", "ratio", "runs' ratios",
                          "MB on wire per step"],
                         [[r["model"], r.get("batch", ""), r["wire"], f"{r['in_process_s']:.4f}",
                           f"{r['distributed_s']:.4f}", f"{r['ratio']:.2f}×",
                           ", ".join(f"{x:.2f}" for x in r["run_ratios"]) if "run_ratios" in r else "one run",
                           f"{r['bytes_per_step'] / 1e6:.2f}"] for r in rows]))
        out.append("")
    return out


def render_kr(folder: Path) -> list[str]:
    doc = _load(folder / "results.json")
    out = recorded_args(doc)
    if doc.get("before"):
        out += [f"Held-out accuracy before training: {seeds(doc['before'])} (per seed).", ""]
    rows = []
    for r in doc["rows"]:
        rows.append([f"`{r['policy']}`", f"{pct(r['accuracy'])} ({seeds(r['accuracy_per_seed'])})",
                     r["live_modules"], num(r["mb_step_steady"], 1), num(r["gflop_step_steady"], 3),
                     pct(r.get("bytes_cut")) if "bytes_cut" in r else "—",
                     pct(r.get("flops_cut")) if "flops_cut" in r else "—", num(r.get("seconds_per_step_steady"))])
    out.append(table(["policy", "held-out acc, mean (per seed)", "live modules", "MB/step after warm-up",
                      "edge GFLOP/step", "bytes cut", "edge FLOPs cut", "s/step"], rows))
    return out + [""]


def render_modes(folder: Path) -> list[str]:
    out: list[str] = []
    for path in [folder / "results.json", *sorted(folder.glob("*/results.json"))]:
        doc = _load(path)
        out += [f"**`{path.relative_to(folder)}`**", ""] + recorded_args(doc)
        if doc.get("before"):
            out += [f"Held-out accuracy before training: {pct(doc['before']['accuracy'])} "
                    f"({doc['before']['examples']} examples).", ""]
        out.append(table(["variant", "held-out acc", "MB/step", "site round trips/step", "edge GFLOP/step",
                          "edge weights MB", "edge peak RSS MB", "s/step"],
                         [[f"`{r['variant']}`", pct(r["accuracy"]), num(r["mb_step"], 1),
                           num(r["site_exchanges_per_step"], 1), num(r["gflop_step"]), num(r["edge_param_mb"], 1),
                           f"{r['edge_peak_rss_mb']:.0f}", num(r["seconds_per_step"])] for r in doc["rows"]]))
        out.append("")
    return out


def render_wire(folder: Path) -> list[str]:
    doc = _load(folder / "results.json")
    out = recorded_args(doc)
    links = list(doc["rows"][0]["predicted"]) if doc["rows"] else []
    rows = []
    for r in doc["rows"]:
        acc = "not run" if r["accuracy"] is None else f"{pct(r['accuracy'])} ({seeds(r['accuracy_per_seed'])})"
        rows.append([f"`{r['combination']}`", num(r["mb_step"]), pct(r["bytes_cut"]), acc,
                     num(r["seconds_loopback"]), *(num(r["predicted"][k]) for k in links)])
    out.append(table(["combination", "MB/step", "cut vs fp32", "held-out acc, mean (per seed)", "s/step, loopback",
                      *(f"s/step at {k} (predicted)" for k in links)], rows))
    out.append("")
    if (folder / "cost.json").exists():
        out += ["`cost.json` holds the loopback measurements (bytes, seconds, round trips, steps) the table's "
                "cost columns come from.", ""]
    return out


def render_latency(folder: Path) -> list[str]:
    raw = _load(folder / "results.json")
    doc = raw["results"] if "results" in raw else raw   # older runs wrote the variants alone
    out = recorded_args(raw) if "args" in raw else []
    first = next(iter(doc.values()))
    links = [(c["rtt_ms"], c["mbit"]) for c in first["links"]]
    rows = []
    for name, r in doc.items():
        cells = []
        for c in r["links"]:
            measured = "" if c["measured"] is None else f" ({c['measured']:.1f})"
            cells.append(f"{c['predicted']:.1f}{measured}")
        lb = r["loopback"]
        rows.append([name, num(lb["bytes"] / 1e6, 1), f"{lb['round_trips']:.0f}", num(lb["seconds"]), *cells])
    out += ["Seconds per training step, predicted (measured through the delay proxy, where it was run):", ""]
    out.append(table(["variant", "MB/step", "round trips/step", "loopback s",
                      *(f"{rtt} ms, {mbit} Mbit/s" for rtt, mbit in links)], rows))
    if all("floor" in c for c in first["links"]):
        over = []
        for name, r in doc.items():
            cells = []
            for c in r["links"]:
                got = c["measured"]
                cells += ["—" if got is None else num(got), num(c["floor"]),
                          "—" if got is None else f"{got / r['loopback']['seconds']:.2f}×"]
            over.append([name, num(r["loopback"]["seconds"]), *cells])
        out += ["", "Measured against the floor, max(loopback step, the busier direction's bytes / bandwidth), "
                "and the variant's own loopback step:", ""]
        out.append(table(["variant", "loopback s", *(h for rtt, mbit in links for h in
                                                    (f"{rtt} ms, {mbit} Mbit/s: measured s", "floor s",
                                                     "× loopback"))], over))
    return out + [""]


def render_serve(folder: Path) -> list[str]:
    doc = _load(folder / "results.json")
    out = recorded_args(doc)
    n = doc["args"]["concurrent"] if isinstance(doc.get("args"), dict) else "several"
    base = doc["generate"]
    rows = [["`edge_client generate`, 1 prompt", num(base), "1.00×"],
            ["`edge_client serve`, 1 request", num(doc["one"]), f"{doc['one'] / base:.2f}×"],
            [f"`edge_client serve`, {n} requests at once (all replies' tokens)", num(doc["concurrent"]),
             f"{doc['concurrent'] / base:.2f}×"]]
    out.append(table(["what", "tokens/s", "against generate"], rows))
    return out + [""]


def render_soak(folder: Path) -> list[str]:
    doc = _load(folder / "results.json")
    out = recorded_args(doc)
    rows = [[r["edge"], r["mode"] + (" (proxy)" if r["via_proxy"] else ""),
             ", ".join(f"{f} ×{r['faults'].count(f)}" if r["faults"].count(f) > 1 else f
                       for f in dict.fromkeys(r["faults"])) or "—",
             "yes" if r["finished"] else "**no**", "yes" if r["steps_once"] else "**no**",
             "yes" if r["equals_replay"] else "**no**", r["bad_status"]] for r in doc["edges"]]
    out.append(table(["edge", "mode", "faults it saw", "finished", "steps 1..N once", "adapters = replay",
                      "INTERNAL/UNKNOWN"], rows))
    out += ["", table(["replica (incarnation)", "RSS peak, first half (MB)", "second half (MB)", "bounded"],
                      [[k, f"{m['first_half_mb']:.0f}", f"{m['second_half_mb']:.0f}", "yes" if m["held"] else "**no**"]
                       for k, m in doc["rss"].items()])]
    out += ["", table(["fault", "at s", "edges' progress", "while training"],
                      [[f["fault"], f"{f['at_seconds']:.0f}", f"{100 * f['progress']:.0f}%",
                        "yes" if f["during_training"] else "no"] for f in doc["faults"]])]
    out += ["", f"Hostile calls by status: {doc.get('hostile')}. Faulty run {doc['faulty_seconds']:.0f} s, "
            f"fault-free replay {doc['replay_seconds']:.0f} s." + (
                f" Waits for a full server's free slot: {doc['full_server_waits']}."
                if "full_server_waits" in doc else ""), "",
            table(["check", "result"], [[k, "PASS" if v else "**FAIL**"] for k, v in doc["checks"].items()])]
    return out + [""]


def render_edges(folder: Path) -> list[str]:
    doc = _load(folder / "results.json")
    out = recorded_args(doc)
    one: dict[float, float] = {r["window_ms"]: r["tokens_per_s"] for r in doc["rows"] if r["clients"] == 1}
    rows = []
    for r in doc["rows"]:
        window = f"window {r['window_ms']:g} ms" if r["window_ms"] else "off"
        base = one.get(r["window_ms"])
        rows.append([r["clients"], window, f"{r['tokens_per_s']:.0f}",
                     f"{r['tokens_per_s'] / base:.2f}×" if base else "—", num(r["mean_batch_sessions"], 1),
                     num(r["s_per_step"])])
    out.append(table(["edges", "batching", "aggregate tokens/s", "vs 1 edge", "sessions per joint batch",
                      "s/step per edge"], rows))
    return out + [""]


def render_scale(folder: Path) -> list[str]:
    out: list[str] = []
    for path in sorted(folder.glob("results*.json"), key=lambda p: (p.name != "results.json", p.name)):
        doc = _load(path)
        out += [f"**`{path.name}`**", ""] + recorded_args(doc)
        if doc.get("note"):
            out += [f"Note recorded with the results: {doc['note']}", ""]
        rows = [[r["setup"], f"{r['tokens_per_s']:.0f}", num(r["s_per_step"], 1), num(r["mean_batch_sessions"]),
                 " / ".join(str(v) for v in r.get("calls_per_replica", {}).values())] for r in doc["throughput"]]
        out.append(table([f"{doc['throughput'][0]['clients']} DLoRA edges", "aggregate tokens/s", "s/step per edge",
                          "sessions per joint batch", "calls per replica"], rows))
        out.append("")
        f = doc.get("failover")
        if f:
            out.append(table(["failover", "SplitLoRA", "DLoRA"],
                             [["normal step, s", num(f["normal_step_s"]["splitlora"]),
                               num(f["normal_step_s"]["dlora"])],
                              ["kill to the end of the interrupted step, s", num(f["kill_to_step_end_s"]["splitlora"]),
                               num(f["kill_to_step_end_s"]["dlora"])],
                              ["reconnects", f["reconnects"]["splitlora"], f["reconnects"]["dlora"]]]))
            out += ["", f"HAProxy marked the killed replica down {f['haproxy_marked_down_after_s']:.1f} s after "
                        "the kill.", ""]
        d = doc.get("durability")
        if d:
            out += [table(["SplitLoRA step", "s (median)"],
                          [["state in memory", num(d["memory"])], ["--state-dir (written and fsynced every step)",
                                                                    num(d["state-dir"])]]),
                    "", f"Federation state file: {d['state_file_bytes'] / 1e6:.1f} MB.", ""]
    return out


def render_privacy(folder: Path) -> list[str]:
    doc = _load(folder / "results.json")
    out = recorded_args(doc)
    if (folder / "table.md").exists():
        out += ["The bench's own table (`table.md`, written with `results.json`):", "",
                (folder / "table.md").read_text().strip(), ""]
    if (folder / "bench.log").exists():
        out += ["The run's log is `bench.log` in the results folder.", ""]
    return out


def render_gpu(folder: Path) -> list[str]:
    """The recorded arguments and the bench's own table.md (bench-gpu, bench-tasks)."""
    doc = _load(folder / "results.json")
    out = recorded_args(doc)
    if (folder / "table.md").exists():
        out += [(folder / "table.md").read_text().strip(), ""]
    return out


BENCHES = [
    Bench("step_time", "Step time: distributed against in-process", "step_time",
          "make bench-step  (= python -m bench.step_time; each file: python -m bench.step_time --wire W, W = "
          "fp32+full, fp32, int8, the -repeat files run back to back)",
          ["bench/step_time.py", *WIRE_PATH, "common/malloc_tuning.py", "cloud_server/served_model.py"],
          render_step_time),
    Bench("kr", "Kill and Revive: every policy", "kr", "make bench-kr  (= python -m bench.kill_revive)",
          ["bench/kill_revive.py", "bench/runs.py", *WIRE_PATH, *TRAINING], render_kr,
          ["loss.png", "live_kr-site@warmup_steps=20.png", "live_kr-site.png", "live_kr.png", "live_static.png",
           "live_random.png"]),
    Bench("kr-int8", "Kill and Revive on the int8 wire", "kr-int8",
          "python -m bench.kill_revive --variants kr-site@warmup_steps=20 --wire-dtype int8 --no-eval-before "
          "--out bench/out/kr-int8",
          ["bench/kill_revive.py", "bench/runs.py", *WIRE_PATH, *TRAINING], render_kr, ["loss.png"]),
    Bench("modes", "DLoRA against SplitLoRA", "modes", "make bench-modes  (= python -m bench.modes)",
          ["bench/modes.py", *WIRE_PATH, *TRAINING, *SPLIT], render_modes),
    Bench("wire", "Wire formats × factorised × Kill and Revive", "wire",
          "make bench-wire  (= python -m bench.wire; this table: python -m bench.wire --combos COMBOS --train none "
          "--no-reuse --cost-steps 5, after the training runs python -m bench.wire --combos COMBOS --train "
          "int8+fact+kr,int4+fact+kr --seeds 0,1,2,3 and --train int4-sr+fact+kr,int4-int8grad+fact+kr --seeds 0)",
          ["bench/wire.py", "bench/latency.py", "bench/runs.py", *WIRE_PATH, *TRAINING], render_wire),
    Bench("wire-modes", "Wire dtypes through bench-modes (earlier, one seed)", "wire-modes",
          "python -m bench.modes --variants dlora-fp16,dlora-bf16 --out bench/out/wire; int8/: python -m bench.modes "
          "--variants dlora-int8,dlora-kr-site-int8 --out bench/out/wire-int8",
          ["bench/modes.py", *WIRE_PATH, *TRAINING], render_modes),
    Bench("latency", "Step time on WAN links", "latency", "make bench-latency  (= python -m bench.latency)",
          ["bench/latency.py", "bench/netem.py", *WIRE_PATH, "edge_client/kill_revive.py", *SPLIT], render_latency),
    Bench("latency-pipelined", "Step time on WAN links: pipelined micro-batches", "latency-pipelined",
          "python -m bench.latency --variants \"dlora --network wan (3 sites),dlora --network wan + 2 micro-batches,"
          "dlora --network wan + 4 micro-batches,dlora --network wan + 8 micro-batches\" --links 10/100,50/10 "
          "--out bench/out/latency-pipelined",
          ["bench/latency.py", "bench/netem.py", *WIRE_PATH, "edge_client/kill_revive.py",
           "edge_client/pipelined_step.py"], render_latency),
    Bench("latency-wan", "Step time on WAN links: --network wan", "latency-wan",
          "python -m bench.latency --variants \"dlora --network wan (3 sites)\" --out bench/out/latency-wan",
          ["bench/latency.py", "bench/netem.py", *WIRE_PATH, "edge_client/kill_revive.py"], render_latency),
    Bench("serve", "The OpenAI endpoint: tokens per second", "serve", "make bench-serve  (= python -m bench.serve)",
          ["bench/serve.py", "edge_client/serve.py", "edge_client/generation.py", "cloud_server/generation.py",
           *WIRE_PATH], render_serve),
    Bench("soak", "Soak: many edges with faults mixed in", "soak",
          "make soak  (its first run: python -m bench.soak --replicas 2 --out bench/out/soak)",
          ["bench/soak.py", "bench/netem.py", "deploy/local.py", "cloud_server/session.py",
           "cloud_server/federation.py", "edge_client/session.py", "edge_client/pipelined_step.py",
           "edge_client/trainer.py", *WIRE_PATH], render_soak, ["soak.png"]),
    Bench("soak-one", "Soak against one replica", "soak-one",
          "make soak  (its second run: python -m bench.soak --replicas 1 --out bench/out/soak-one)",
          ["bench/soak.py", "bench/netem.py", "deploy/local.py", "cloud_server/session.py",
           "edge_client/session.py", "edge_client/pipelined_step.py", "edge_client/trainer.py", *WIRE_PATH],
          render_soak, ["soak.png"]),
    Bench("edges", "Many edges on one cloud", "edges", "make bench-edges  (= python -m bench.many_edges)",
          ["bench/many_edges.py", "cloud_server/batching.py", *WIRE_PATH], render_edges),
    Bench("scale", "Scaling out: replicas behind HAProxy", "scale", "make bench-scale  (= python -m bench.scale_out)",
          ["bench/scale_out.py", "bench/many_edges.py", "deploy/haproxy.py", "deploy/local.py",
           "cloud_server/federation_state.py", "cloud_server/batching.py", "edge_client/session.py", *WIRE_PATH],
          render_scale),
    Bench("privacy", "Privacy: what a curious cloud recovers", "privacy",
          "make bench-privacy  (= python -m bench.privacy)",
          ["bench/privacy.py", "bench/inverters.py", "bench/label_attacks.py", "bench/alignment.py",
           "bench/lm_prior.py", "cloud_server/recorder.py",
           "edge_client/label_privacy.py", "edge_client/token_privacy.py", "edge_client/objective.py",
           "edge_client/split_model.py", *WIRE_PATH], render_privacy, ["leakage.png"]),
    Bench("privacy-labels", "Privacy: label attacks and secret labels", "privacy-labels",
          "python -m bench.privacy --variants default,secret-labels --accuracy-seeds 0,1,2,3 "
          "--out bench/out/privacy-labels",
          ["bench/privacy.py", "bench/inverters.py", "bench/label_attacks.py", "cloud_server/recorder.py",
           "edge_client/objective.py", "edge_client/trainer.py", *WIRE_PATH], render_privacy, ["leakage.png"]),
    Bench("privacy-int8", "Privacy: the int8 wire, and secret labels drawn again", "privacy-int8",
          "python -m bench.privacy --variants int8-wire,secret-labels --accuracy-steps 0 --out bench/out/privacy-int8",
          ["bench/privacy.py", "bench/inverters.py", "bench/label_attacks.py", "cloud_server/recorder.py",
           "edge_client/objective.py", "edge_client/trainer.py", *WIRE_PATH], render_privacy),
    Bench("privacy-front", "Privacy: a private front, against adaptive attacks", "privacy-front",
          "python -m bench.privacy --variants default,edge-layers-2,private-front-2,private-front-2-strong "
          "--accuracy-seeds 0 --out bench/out/privacy-front",
          ["bench/privacy.py", "bench/inverters.py", "bench/label_attacks.py", "edge_client/private_front.py",
           "edge_client/trainer.py", *WIRE_PATH], render_privacy, ["leakage.png"]),
    Bench("privacy-front-seeds", "Privacy: the private front's accuracy on 4 seeds", "privacy-front-seeds",
          "python -m bench.privacy --variants private-front-2 --accuracy-seeds 0,1,2,3 --out "
          "bench/out/privacy-front-seeds --resume (its recorded row and seed 0 copied from bench/out/privacy-front)",
          ["bench/privacy.py", "edge_client/private_front.py", "edge_client/trainer.py", *WIRE_PATH],
          render_privacy),
    Bench("privacy-tweets", "Privacy: the tweet sentiment task", "privacy-tweets",
          "python -m bench.privacy --task tweets --variants default,edge-layers-2,private-front-2 --accuracy-steps 0 "
          "--out bench/out/privacy-tweets",
          ["bench/privacy.py", "bench/inverters.py", "bench/label_attacks.py", "edge_client/private_front.py",
           "edge_client/data.py", *WIRE_PATH], render_privacy),
    Bench("privacy-align", "Privacy: unpaired alignment and a language-model prior", "privacy-align",
          "python -m bench.privacy --variants private-front-2,edge-layers-2,private-front-2-strong "
          "--accuracy-steps 0 --out bench/out/privacy-align",
          ["bench/privacy.py", "bench/inverters.py", "bench/alignment.py", "bench/lm_prior.py",
           "edge_client/private_front.py", "edge_client/trainer.py", *WIRE_PATH], render_privacy),
    Bench("privacy-tokendp", "Privacy: token DP against a language-model prior", "privacy-tokendp",
          "python -m bench.privacy --variants token-dp-eps50,token-dp-eps25 --accuracy-steps 0 "
          "--out bench/out/privacy-tokendp",
          ["bench/privacy.py", "bench/inverters.py", "bench/lm_prior.py", "edge_client/token_privacy.py",
           *WIRE_PATH], render_privacy),
    Bench("tasks", "Models × tasks: every mode", "tasks", "make bench-tasks  (= python -m bench.tasks)",
          ["bench/tasks.py", "edge_client/data.py", "edge_client/bigbench.py", *WIRE_PATH, *TRAINING, *SPLIT],
          render_gpu, [f"loss-smollm2-135m-{t}.png" for t in ("bbc", "tweets", "social_iqa", "strategyqa")]),
    Bench("growth", "Growth with model size", "growth", "make bench-growth  (= python -m bench.growth)",
          ["bench/growth.py", "bench/step_time.py", *WIRE_PATH], render_gpu),
    Bench("gpu", "GPU: step time and many edges", "gpu", "make bench-gpu  (= python -m bench.gpu)",
          ["bench/gpu.py", "bench/step_time.py", "bench/many_edges.py", *WIRE_PATH], render_gpu),
    Bench("unrecorded", "Figures with no results file", None,
          "make demo, make docker-test, edge_client generate, python -m bench.profile_step (see each section)",
          []),
]


# --- git ----------------------------------------------------------------------------------------------

def git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return done.stdout.rstrip()


def last_commit(path: str) -> tuple[str, str, str] | None:
    """(short hash, date, subject) of the last commit that changed `path`, or None (no history here)."""
    line = git("log", "-1", "--format=%h%x09%cs%x09%s", "--", path).strip()
    if not line:
        return None
    h, date, subject = line.split("\t", 2)
    return h, date, subject


def changed_since(commit: str, files: list[str]) -> tuple[list[str], list[str]]:
    """(commits after `commit` that touch `files`, files with uncommitted changes)."""
    existing = [f for f in files if (ROOT / f).exists()]
    log = git("log", "--format=%h %cs %s", f"{commit}..HEAD", "--", *existing)
    dirty = git("status", "--porcelain", "--", *existing)
    return ([line for line in log.splitlines() if line],
            sorted({line[3:] for line in dirty.splitlines() if line}))


# --- pages --------------------------------------------------------------------------------------------

def page(b: Bench) -> tuple[list[str], str]:
    """The page's lines and its status: 'current', 'stale', 'no results' or 'unrecorded'."""
    lines = [f"# {b.title}", "",
             "<!-- Generated by bench/docs_results.py (`make docs-results`). Do not edit: the tables come from",
             f"     bench/results/{b.folder or ''}, the commentary from docs/results/notes/{b.slug}.md. -->", ""]
    status = "unrecorded"
    folder = RESULTS / b.folder if b.folder else None
    if folder is None:
        lines += ['!!! note "No results file"',
                  "    These figures were measured by hand-run commands that write nothing to `bench/results/`, so "
                  "the generator cannot date them or check them for staleness. Each section names its command.", ""]
    elif not folder.exists():
        status = "no results"
        lines += ['!!! note "No results yet"', f"    `{b.command}` has not written `bench/results/{b.folder}/` yet.",
                  ""]
    else:
        commit = last_commit(f"bench/results/{b.folder}")
        lines += [f"**Command:** `{b.command}`", ""]
        if commit is None:
            status = "stale"
            lines += ['!!! warning "Not dated"',
                      f"    No git history for `bench/results/{b.folder}/` here (a shallow or exported copy), so "
                      "these figures cannot be checked against the code.", ""]
        else:
            h, date, subject = commit
            lines += [f"**Results:** `bench/results/{b.folder}/`, last written by commit `{h}` ({date}): "
                      f"*{subject.replace('*', '')}*", ""]
            commits, dirty = changed_since(h, b.code)
            status = "stale" if commits or dirty else "current"
            if status == "stale":
                lines += ['!!! warning "Stale: the code these figures measure changed after they were written"',
                          "    Re-run the command above to refresh them. Changed since:", ""]
                lines += [f"    - `{c.split(' ', 1)[0]}` {c.split(' ', 1)[1]}" for c in commits[:8]]
                if len(commits) > 8:
                    lines.append(f"    - and {len(commits) - 8} earlier commits")
                if dirty:
                    lines.append(f"    - uncommitted changes to {', '.join(f'`{d}`' for d in dirty)}")
                lines.append("")
            else:
                lines += ['!!! success "Current"', "    No commit since has changed the code these figures measure.",
                          ""]
        lines += ["Code these figures measure (a change to any of it marks this page stale): "
                  + ", ".join(f"`{c}`" for c in b.code) + ".", ""]
        if b.render:
            lines += ["## Figures", ""] + b.render(folder)
        for img in b.images:
            if (folder / img).exists():
                dest = IMAGES / b.slug / img.replace("@", "-").replace("=", "-")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / img, dest)
                lines += [f"![{img}](img/{b.slug}/{dest.name})", "", f"*`bench/results/{b.folder}/{img}`*", ""]
    notes = NOTES / f"{b.slug}.md"
    if notes.exists():
        if status != "unrecorded":
            lines += ["## What the figures say", ""]
        lines += [notes.read_text().strip(), ""]
    return lines, status


def write(path: Path, lines: list[str]) -> None:
    text = "\n".join(lines).rstrip() + "\n"
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")


def main() -> int:
    PAGES.mkdir(parents=True, exist_ok=True)
    summary = []
    for b in BENCHES:
        lines, status = page(b)
        write(PAGES / f"{b.slug}.md", lines)
        commit = last_commit(f"bench/results/{b.folder}") if b.folder and (RESULTS / b.folder).exists() else None
        summary.append([f"[{b.title}]({b.slug}.md)", f"`{b.command.split('  (')[0]}`",
                        f"`{commit[0]}` ({commit[1]})" if commit else "—", f"**{status}**"])
    index = ["# Results", "",
             "<!-- Generated by bench/docs_results.py (`make docs-results`). Do not edit. -->", "",
             "One page per bench, generated from `bench/results/*` by `make docs-results`. Every page names the "
             "command that produced its figures and the commit that last wrote them; a page whose measured code "
             "changed after that commit is marked **stale** (the figures describe older code until the command "
             "is run again).", ""]
    if (NOTES / "index.md").exists():
        index += [(NOTES / "index.md").read_text().strip(), ""]
    index.append(table(["page", "command", "results last written", "status"], summary))
    write(PAGES / "index.md", index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
