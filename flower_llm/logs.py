"""Log setup for the apps: our own loggers at INFO, known noise filtered, no long silences.

A root ``basicConfig(INFO)`` would also switch on every HTTP request Flower's runtime
makes; the apps attach one handler to the project's loggers instead.

Known harmless messages are filtered one by one (:data:`HARMLESS_WARNINGS`), each by its
category, message and module, never with a blanket ignore: a new warning still shows.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings

PROJECT_LOGGERS = ("flower_llm", "strategies", "server_apps", "client_apps")

HARMLESS_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # torch 2.13 warns on its own TorchScript decorators, used inside transformers/peft.
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", r"torch\.jit\._script"),
    # peft asks transformers 5 through the deprecated name; behaviour is unchanged.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
    # Adapters name the embedded base model `embedded` (portable); peft then cannot open a
    # config by that name to check for resized embeddings, which LoRA here never resizes.
    (UserWarning, r"Could not find a config file in embedded", r"peft\.utils\.save_and_load"),
)
"""(category, message regex, module regex) of warnings the project knows to be harmless."""

QUIET_LOGGERS = {
    # On CPU, bitsandbytes looks for an optional hub kernel first, logs that it is missing,
    # and uses its own (correct) implementation.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}

QUIET_PROGRESS_BARS = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")
"""Per-load progress bars (weights, dataset splits) repeated by every site, every load."""


def filter_known_warnings() -> None:
    """Silence the known harmless warnings and progress bars in this process."""
    for category, message, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for variable in QUIET_PROGRESS_BARS:
        os.environ.setdefault(variable, "1")
    # Libraries already imported read those variables once: switch their bars off too.
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def setup_logging(level: int = logging.INFO) -> None:
    """Send the project's log records to stderr once, with a short prefix."""
    filter_known_warnings()
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "_flower_llm", False) for h in logger.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[flower-llm] %(message)s"))
            handler._flower_llm = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            logger.propagate = False


# --------------------------------------------------------------------------------------
# Progress: no silence longer than a few seconds on the server
# --------------------------------------------------------------------------------------

ROUND_START = re.compile(r"\[ROUND (\d+)/(\d+)\]")


class ProgressTicker(logging.Handler):
    """Logs where a run stands whenever the project's loggers were silent ``every`` seconds.

    It watches the server's own log lines: ``[ROUND n/N]`` starts a round. After a silence
    it logs the round, how long it has run, and an estimate from the rounds before
    (``about 25 s left``), so a user can tell a slow round from a hung one.
    """

    def __init__(self, every: float = 12.0, logger_name: str = "flower_llm.progress") -> None:
        super().__init__(level=logging.DEBUG)
        self.every = every
        self.log = logging.getLogger(logger_name)
        self.last_line = time.monotonic()
        self.round: tuple[int, int] | None = None
        self.round_started = 0.0
        self.round_seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="progress-ticker", daemon=True)

    def emit(self, record: logging.LogRecord) -> None:
        """Note the time of every project log line, and when a round starts."""
        now = time.monotonic()
        self.last_line = now
        match = ROUND_START.search(record.getMessage())
        if match:
            if self.round is not None:
                self.round_seconds.append(now - self.round_started)
            self.round = (int(match.group(1)), int(match.group(2)))
            self.round_started = now

    def status(self, now: float) -> str:
        """One line: which round, for how long, and roughly how long it still needs."""
        if self.round is None:
            return "starting: the sites load the base model and their data"
        current, total = self.round
        elapsed = now - self.round_started
        line = f"round {current}/{total}: running for {elapsed:.0f} s"
        # The first round loads models on every site: estimate from the later ones.
        later = self.round_seconds[1:] or self.round_seconds
        if later:
            typical = sum(later) / len(later)
            left = max(typical - elapsed, 0.0)
            line += f", about {left:.0f} s left (rounds took ~{typical:.0f} s)"
            if current < total:
                line += f"; run ends in ~{left + typical * (total - current):.0f} s"
        else:
            line += " (the first round also loads the model on every site)"
        return line

    def start(self) -> ProgressTicker:
        """Start watching; attach to the project's loggers first (:func:`start_progress`)."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the watcher thread."""
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            if now - self.last_line >= self.every:
                self.log.info("%s", self.status(now))  # emit() resets last_line


def start_progress(every: float = 12.0) -> ProgressTicker:
    """Attach a :class:`ProgressTicker` to the project's loggers and start it."""
    ticker = ProgressTicker(every)
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, ProgressTicker)]:
            old.stop()  # a ServerApp run again in the same process replaces its ticker
            logger.removeHandler(old)
        logger.addHandler(ticker)
    return ticker.start()
