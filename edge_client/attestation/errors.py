"""The one error every attestation check raises: which check failed, and what was expected."""
from __future__ import annotations

_MAX = 400  # an error names the thing and the fix; evidence dumps go to the debug log, not here


class AttestationFailed(Exception):
    """A check of the cloud's evidence failed; nothing may be sent to that cloud.

    `check` is a short stable name (e.g. "sev-snp.vcek-signature", "tdx.tcb-status", "binding.nonce"),
    `detail` says what was found and what was expected.
    """

    def __init__(self, check: str, detail: str) -> None:
        self.check = check
        self.detail = detail if len(detail) <= _MAX else detail[: _MAX - 1] + "…"
        super().__init__(f"attestation check {check} failed: {self.detail}")
