"""Turning examples into batches, the training loss, and label scoring. All on the edge."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edge_client.data import Example

# (input_ids [B, T], attention_mask [B, T]) -> final hidden state [B, T, H] before the final norm
HiddenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# hidden states [N, H] -> logits [N, V]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Batch:
    # Prompt + completion without its last token, right-padded. The last token's
    # output predicts nothing, so it is never sent: the label of a one-token
    # completion does not reach the cloud in the input.
    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T] bool
    rows: torch.Tensor            # [N] row of each predicted token
    positions: torch.Tensor       # [N] position whose output predicts it
    targets: torch.Tensor         # [N] the token to predict

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> Batch:
        """The same batch on `device` (an in-process reference on an accelerator)."""
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.rows, self.positions,
                                              self.targets)))


def _pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = True
    return ids, mask


# Tokens kept from the end of an over-long prompt: the answer cue ("\nTopic:")
# lives there, the instruction at the start; the middle (the text) is cut.
PROMPT_TAIL = 8


def fit_prompt(ids: list[int], budget: int) -> list[int]:
    """Cut an over-long prompt from the middle, keeping its start and its last tokens."""
    if len(ids) <= budget:
        return ids
    tail = min(PROMPT_TAIL, budget // 2)
    return ids[: budget - tail] + ids[len(ids) - tail:]


def encode(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt and completion, the prompt cut (see fit_prompt) to fit max_length."""
    p = tokenizer(prompt).input_ids
    c = tokenizer(completion, add_special_tokens=False).input_ids
    if not c:
        raise ValueError(f"completion {completion!r} has no tokens")
    if len(c) >= max_length:
        raise ValueError(f"completion of {len(c)} tokens does not fit max_length {max_length}")
    return fit_prompt(p, max_length - len(c)), c


def make_batch(tokenizer, examples: Sequence[Example], max_length: int) -> Batch:
    seqs, rows, positions, targets = [], [], [], []
    for i, ex in enumerate(examples):
        p, c = encode(tokenizer, ex.prompt, ex.completion, max_length)
        seqs.append(p + c[:-1])  # teacher forcing needs every completion token but the last as input
        for j, tok in enumerate(c):
            rows.append(i)
            positions.append(len(p) - 1 + j)  # the output at this position predicts c[j]
            targets.append(tok)
    ids, mask = _pad(seqs, tokenizer.pad_token_id)
    return Batch(ids, mask, torch.tensor(rows), torch.tensor(positions), torch.tensor(targets))


def completion_loss(hidden: torch.Tensor, batch: Batch, logits_fn: LogitsFn) -> torch.Tensor:
    """Mean cross-entropy over completion tokens, with the LM head applied only where needed."""
    picked = hidden[batch.rows, batch.positions]
    return F.cross_entropy(logits_fn(picked), batch.targets)


def label_token_ids(tokenizer, labels: Sequence[str]) -> torch.Tensor | None:
    """The one token of each " label", or None if some label needs several tokens."""
    ids = [tokenizer(" " + lab, add_special_tokens=False).input_ids for lab in labels]
    if any(len(i) != 1 for i in ids) or len({i[0] for i in ids}) != len(ids):
        return None
    return torch.tensor([i[0] for i in ids])


def secret_label_tokens(tokenizer, count: int, avoid: Sequence[int] = ()) -> torch.Tensor:
    """`count` distinct vocabulary tokens drawn by the OS's secure random source, none special nor in `avoid`.

    Trained as the labels' tokens, they make the final-hidden gradient a mix of head rows the cloud
    cannot tie to label names (bench-privacy measures what it still can: grouping the labels).
    """
    import secrets

    banned = set(tokenizer.all_special_ids) | set(avoid)
    pool = [t for t in range(len(tokenizer)) if t not in banned]
    if len(pool) < count:
        raise ValueError(f"the vocabulary has {len(pool)} usable tokens for {count} secret labels")
    rng = secrets.SystemRandom()
    return torch.tensor(rng.sample(pool, count))


def label_loss(hidden: torch.Tensor, batch: Batch, label_ids: torch.Tensor, logits_fn: LogitsFn) -> torch.Tensor:
    """Cross-entropy over the label tokens only (a softmax restricted to the labels, as in PET).

    `logits_fn` maps hidden states to the logits of `label_ids` only, so the
    LM head costs C columns instead of the whole vocabulary.
    """
    picked = hidden[batch.rows, batch.positions]
    classes = (batch.targets[:, None] == label_ids[None, :]).int().argmax(dim=1)
    return F.cross_entropy(logits_fn(picked), classes)


def classify(tokenizer, prompts: Sequence[str], labels: Sequence[str], hidden_fn: HiddenFn,
             logits_fn: LogitsFn, max_length: int, batch_size: int = 16,
             progress: Callable[[int], None] | None = None,
             token_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             label_ids: torch.Tensor | None = None) -> list[int]:
    """Index of the most likely label for each prompt, by the label's log-likelihood.

    Labels of one token each (the common case) need one forward per prompt;
    longer labels are scored as full prompt + label sequences. `label_ids`
    replaces the labels' own tokens (the secret ones of --secret-labels).
    """
    cands = [" " + lab for lab in labels]
    ids = [tokenizer(c, add_special_tokens=False).input_ids for c in cands]
    if label_ids is not None:
        ids = [[int(t)] for t in label_ids]
    single = all(len(i) == 1 for i in ids)
    preds: list[int] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        if single:
            first = torch.tensor([i[0] for i in ids])
            seqs = [fit_prompt(tokenizer(p).input_ids, max_length - 1) for p in chunk]
            input_ids, mask = _pad(seqs, tokenizer.pad_token_id)
            h = hidden_fn(input_ids, mask)
            last = torch.tensor([len(s) - 1 for s in seqs])
            picked = h[torch.arange(len(seqs)), last]
            # The softmax normaliser is shared by all labels, so the argmax over
            # the label columns alone equals the argmax of their log-likelihoods.
            scores = token_logits(picked, first) if token_logits else logits_fn(picked)[:, first]
            preds.extend(scores.argmax(dim=1).tolist())
        else:
            exs = [Example(p, c) for p in chunk for c in cands]
            per_seq = log_likelihoods(tokenizer, exs, hidden_fn, logits_fn, max_length)
            preds.extend(per_seq.view(len(chunk), len(cands)).argmax(dim=1).tolist())
        if progress:
            progress(len(chunk))
    return preds


def log_likelihoods(tokenizer, examples: Sequence[Example], hidden_fn: HiddenFn, logits_fn: LogitsFn,
                    max_length: int) -> torch.Tensor:
    """Each example's completion log-likelihood given its prompt (the sum over its tokens), in one forward."""
    batch = make_batch(tokenizer, examples, max_length)
    h = hidden_fn(batch.input_ids, batch.attention_mask)
    logp = torch.log_softmax(logits_fn(h[batch.rows, batch.positions]).float(), dim=-1)
    tok_lp = logp[torch.arange(len(batch.targets)), batch.targets]
    return torch.zeros(len(examples)).index_add_(0, batch.rows, tok_lp)


def multiple_choice(tokenizer, examples: Sequence[Example], hidden_fn: HiddenFn, logits_fn: LogitsFn,
                    max_length: int, batch_size: int = 16,
                    progress: Callable[[int], None] | None = None) -> list[int]:
    """Index of the most likely choice of each example, by its summed log-likelihood (BIG-bench's
    multiple_choice_grade). Every (prompt, choice) pair is one sequence; about batch_size travel per forward."""
    pairs = [(i, Example(ex.prompt, c)) for i, ex in enumerate(examples) for c in ex.choices]
    scores = torch.empty(len(pairs))
    done = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        scores[start:start + len(chunk)] = log_likelihoods(tokenizer, [e for _, e in chunk], hidden_fn, logits_fn,
                                                           max_length)
        finished = chunk[-1][0] + 1 if start + len(chunk) == len(pairs) else chunk[-1][0]
        if progress and finished > done:
            progress(finished - done)
            done = finished
    preds, at = [], 0
    for ex in examples:
        preds.append(int(scores[at:at + len(ex.choices)].argmax()))
        at += len(ex.choices)
    return preds


def first_line(text: str) -> str:
    """A generated completion up to its first line break (a one-sentence answer; the model may run on)."""
    return text.strip().split("\n", 1)[0].strip()


def rouge_l(references: Sequence[str], generated: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (Google's rouge-score, Porter stemming) of each generated completion's first line
    against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref.strip(), first_line(gen))["rougeL"].fmeasure for ref, gen in zip(references, generated)]
    return sum(scores) / len(scores) if scores else 0.0
