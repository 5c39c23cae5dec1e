"""Importing NVIDIA's GPU verifier package (nv-local-gpu-verifier) without its import-time side effects."""
from __future__ import annotations

import importlib
import logging
import os
import tempfile
from types import ModuleType

# The loggers `verifier.config` sets up on import, with handlers to stdout and ./verifier.log.
_LOGGERS = ("gpu-verifier-info", "gpu-verifier-event")


def quiet_import(module: str) -> ModuleType:
    """`module` of NVIDIA's verifier, imported from a private directory: on import `verifier.config` deletes
    and recreates ./verifier.log in the working directory and prints its progress to stdout. Its loggers then
    go to this process's logging, warnings and up. (The working directory is the process's: call this
    before threads that rely on it start, or under a lock.)"""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="dlora-nv-verifier-") as tmp:
        os.chdir(tmp)
        try:
            return importlib.import_module(module)
        finally:
            os.chdir(cwd)
            for name in _LOGGERS:
                logger = logging.getLogger(name)
                for handler in list(logger.handlers):
                    logger.removeHandler(handler)
                    handler.close()
                logger.setLevel(logging.WARNING)
