"""What a curious cloud recovers under a run's settings: the figures of the last `make bench-privacy` run.

`edge_client train` prints `notice(...)` at the start of every run, so a user
knows what the settings leak before any data leaves the device. The figures
come from bench/results/privacy (SmolLM2-135M, BBC News); other models and data
leak differently, and the notice says when a setting was not measured.
"""
from __future__ import annotations

from edge_client import label_privacy

SOURCE = "`make bench-privacy`, SmolLM2-135M + BBC News"

# Share of the training tokens the best attack (nearest neighbour or a learned inverter)
# read back, by (depth, token epsilon): depth is the block whose input the cloud receives
# first (0: the embedding; DLoRA's --edge-layers or SplitLoRA's --cut-layer), and the
# token epsilon is --token-epsilon (None: off).
TOKENS: dict[tuple[int, float | None], float] = {
    (0, None): 1.000,  # default
    (1, None): 0.970,  # edge-layers-1
    (2, None): 0.950,  # edge-layers-2
    (4, None): 0.946,  # edge-layers-4
    (0, 25.0): 0.160,  # token-dp-eps25
    (0, 50.0): 0.798,  # token-dp-eps50
    (2, 25.0): 0.151,  # combined
}
# Held-out accuracy points lost against the default, by --token-epsilon alone.
ACCURACY_LOSS_BY_TOKEN_EPSILON: dict[float, float] = {25: 71.0, 50: 7.0}
# Share of the labels the gradient attack named, without label privacy.
LABELS = 1.0
# With --secret-labels (bench/results/privacy-labels): grouped by clustering the gradients (scored with the
# best mapping of groups to labels), and the groups named by the public model classifying the text the
# cloud read back (the strongest attack that is given no names). The named solve on the gradient depends on
# the draw (9.4% and 68.8% on two), so the notice does not quote it.
SECRET_LABELS_GROUPED = 1.0
SECRET_LABELS_NAMED_BY_TEXT = 0.719
SUGGESTED_TOKEN_EPSILON = 50.0  # 25 hides more but leaves accuracy at chance
# With --front-privacy W, by (edge layers, W): the strongest attack measured, unpaired alignment with the
# language-model prior (bench/results/privacy-align): a cloud that knows no plaintext fits a front of the same
# shape to the recording. A cloud that knew every earlier batch's plaintext read 97.0% and 85.7%
# (bench/results/privacy-front); the public-trained inverter alone 75.2% and 45.1%.
FRONT_TOKENS: dict[tuple[int, float], float] = {
    (2, 0.1): 0.971,
    (2, 0.5): 0.971,   # and accuracy at chance
}


def _tokens(depth: int, token_epsilon: float | None, front_privacy: float = 0.0) -> str:
    where = "the embedding" if depth == 0 else f"the output of block {depth - 1}"
    if token_epsilon is not None:
        where += f" of the tokens --token-epsilon {token_epsilon:g} released"
    if front_privacy:
        where += (f" (--front-privacy {front_privacy:g} evades inverters that do not adapt, not a cloud that "
                  "fits a front of its shape)")
        got = FRONT_TOKENS.get((depth, front_privacy)) if token_epsilon is None else None
    else:
        got = TOKENS.get((depth, token_epsilon))
    read = f"{got:.0%} of your training tokens" if got is not None else "an unmeasured share of your training tokens"
    return f"{read} from {where}"


def notice(mode: str, edge_layers: int, cut_layer: int, label_epsilon: float | None,
           token_epsilon: float | None, classes: int, secret_labels: bool = False, front_privacy: float = 0.0) -> str:
    """One plain line: what the cloud can recover under these settings, and which flag hardens it."""
    depth = cut_layer if mode == "splitlora" else edge_layers
    tokens = _tokens(depth, token_epsilon, front_privacy)
    if label_epsilon is not None:
        keep = label_privacy.keep_probability(label_epsilon, classes)
        labels = f"at most {keep:.0%} of your labels (randomised response, --label-epsilon {label_epsilon:g})"
    elif secret_labels:
        labels = (f"{SECRET_LABELS_NAMED_BY_TEXT:.0%} of your labels (--secret-labels hides the label tokens, but the "
                  f"cloud still groups the labels {SECRET_LABELS_GROUPED:.0%} by clustering the gradients and names "
                  "the groups by reading your text)")
    else:
        labels = f"{LABELS:.0%} of your labels from the gradient"
    hardening = []
    if token_epsilon is None:
        loss = ACCURACY_LOSS_BY_TOKEN_EPSILON.get(SUGGESTED_TOKEN_EPSILON)
        cost = f" for {loss:.0f} points of held-out accuracy" if loss is not None else ""
        hardened = TOKENS.get((0, SUGGESTED_TOKEN_EPSILON))
        if hardened is not None:
            hardening.append(f"--token-epsilon {SUGGESTED_TOKEN_EPSILON:g} cuts the tokens to {hardened:.0%}{cost}")
    if label_epsilon is None:
        hardening.append("--label-epsilon bounds the labels")
    advice = f"; {' and '.join(hardening)}" if hardening else ""
    return (f"privacy: the cloud serving the model can read back {tokens}, and {labels} ({SOURCE}){advice} "
            "(docs/privacy.md)")
