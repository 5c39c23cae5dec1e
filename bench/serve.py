"""`make bench-serve`: tokens per second of `edge_client serve` against `edge_client generate`.

One cloud_server (SmolLM2-135M by default) and adapters on every default site computed on the device
(PEFT's fresh init, so B = 0: the cost of a trained adapter, the text of the base model). Measured side
by side in one run: `edge_client generate` on one prompt (its own tokens/s line), then the endpoint with
the official openai client, one request alone and then --concurrent at once (tokens of all the replies
over the wall time). Chat prompts through the model's template, greedy, --tokens new tokens per request
(the end-of-sequence token may stop one earlier). Writes bench/out/serve/results.json.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import report
from cloud_server import launch
from edge_client.remote_model import DLoRAModelForCausalLM

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how a bicycle stays upright.",
           "Describe a market on a rainy morning.", "What makes a good cup of tea?",
           "Tell me about the history of maps.", "Why do cats purr?", "Describe the view from a mountain.",
           "How do bees make honey?"]


def generate_cli(address: str, adapters: Path, tokens: int, cache: Path) -> float:
    """`edge_client generate`'s own tokens/s for one prompt."""
    res = subprocess.run([sys.executable, "-m", "edge_client", "generate", "--server", address, "--adapters",
                          str(adapters), "--prompt", PROMPTS[0], "--chat", "--max-new-tokens", str(tokens),
                          "--cache", str(cache)], capture_output=True, text=True, timeout=1800)
    m = re.search(r"\[(\d+) tokens in ([\d.]+) s", res.stderr)
    if res.returncode != 0 or m is None:
        raise SystemExit(f"edge_client generate failed ({res.returncode}): {res.stderr[-2000:]}")
    return int(m.group(1)) / float(m.group(2))


def endpoint(address: str, adapters: Path, tokens: int, concurrent: int, cache: Path) -> dict:
    """The endpoint's tokens/s: one request, then `concurrent` at once."""
    import openai

    proc = subprocess.Popen([sys.executable, "-m", "edge_client", "--log-level", "WARNING", "serve", "--server",
                             address, "--adapters", str(adapters), "--port", "0", "--sessions", str(concurrent),
                             "--cache", str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stdout:  # type: ignore[union-attr]
            if m := re.search(r"on (http://\S+/v1)", line):
                url = m.group(1)
                break
        if url is None:
            raise SystemExit(f"edge_client serve exited {proc.wait()}: {proc.stderr.read()[-2000:]}")  # type: ignore
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=1800)
        name = client.models.list().data[0].id

        def ask(prompt: str) -> int:
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=tokens, temperature=0)
            return reply.usage.completion_tokens

        ask(PROMPTS[1])   # warm: the sessions' first use
        t0 = time.perf_counter()
        one = ask(PROMPTS[0])
        single = one / (time.perf_counter() - t0)
        counts: list[int] = []
        threads = [threading.Thread(target=lambda p=p: counts.append(ask(p))) for p in PROMPTS[:concurrent]]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        return {"one": single, "concurrent": sum(counts) / wall, "concurrent_tokens": sum(counts),
                "concurrent_seconds": wall}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model the cloud serves (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request (default: %(default)s)")
    p.add_argument("--concurrent", type=int, default=4, help="requests at once (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="cloud_server torch threads (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench/out/serve"))
    args = p.parse_args()
    if not 1 <= args.concurrent <= len(PROMPTS):
        p.error(f"--concurrent must be 1 to {len(PROMPTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, \
            launch.start(["--model", args.model, "--threads", str(args.threads)], args.out / "cloud.log") as server:
        cache = Path(tmp) / "cache"
        adapters = Path(tmp) / "adapters"
        with DLoRAModelForCausalLM.connect(server.address, cache=cache) as model:
            model.save_pretrained(adapters)
        print(f"[{time.strftime('%H:%M:%S')}] edge_client generate ...", flush=True)
        cli = generate_cli(server.address, adapters, args.tokens, cache)
        print(f"[{time.strftime('%H:%M:%S')}] edge_client serve ...", flush=True)
        api = endpoint(server.address, adapters, args.tokens, args.concurrent, cache)
    rows = [["edge_client generate, 1 prompt", f"{cli:.2f}", "1.00×"],
            ["edge_client serve, 1 request", f"{api['one']:.2f}", f"{api['one'] / cli:.2f}×"],
            [f"edge_client serve, {args.concurrent} requests at once (all replies' tokens)",
             f"{api['concurrent']:.2f}", f"{api['concurrent'] / cli:.2f}×"]]
    print()
    print(f"{args.model}, greedy, {args.tokens} new tokens per request, tokens per second")
    print(report.table(["what", "tokens/s", "against generate"], rows))
    report.write_json(args.out / "results.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                                   "generate": cli, **api})
    print(f"\nwritten to {args.out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
