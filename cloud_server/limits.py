"""What one server allows: sessions, tokens per step, message sizes and timeouts (`cloud_server` flags)."""
from __future__ import annotations

from dataclasses import dataclass

from common.settings import setting

MAX_GRPC_MESSAGE = (1 << 31) - 1  # gRPC's size options are int32


@dataclass
class ServerLimits:
    max_sessions: int = setting(8, "most edge sessions open at once")
    max_sessions_per_client: int = setting(0, "most sessions one client identity (its token or certificate) may "
                                              "hold, so one client cannot take every slot; 0: no limit besides "
                                              "--max-sessions")
    max_batch_tokens: int = setting(16384, "largest batch x sequence length one step may carry")
    max_message_mb: float = setting(0.0, "largest gRPC message in MiB; 0 derives it from --max-batch-tokens so "
                                         "the largest site tensor fits")
    idle_timeout: float = setting(600.0, "seconds without a call before a session is freed")
    step_timeout: float = setting(300.0, "seconds one step may spend waiting on its edge (from its forward to the "
                                         "end of its backward); the cloud's own compute is not interrupted")

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_batch_tokens < 1:
            raise ValueError("--max-sessions and --max-batch-tokens must be positive")
        if self.max_sessions_per_client < 0 or self.max_message_mb < 0:
            raise ValueError("--max-sessions-per-client and --max-message-mb must not be negative (0: automatic)")
        if min(self.idle_timeout, self.step_timeout) <= 0:
            raise ValueError("--idle-timeout and --step-timeout must be positive")

    def message_bytes(self, max_site_width: int) -> int:
        """The largest gRPC message, as set, or derived from the widest site of the served model."""
        # Largest tensor in one message (fp32) plus room for framing, unless the operator set it.
        derived = self.max_batch_tokens * max_site_width * 4 + (1 << 20)
        return min(int(self.max_message_mb * (1 << 20)) or derived, MAX_GRPC_MESSAGE)
