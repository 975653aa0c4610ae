"""specdec: a lab for benchmarking speculative decoding of LLMs."""

import warnings

__version__ = "0.1.0"

# Our loops pass `past_key_values=` so they work on transformers 4.56 through 5.x; 5.x warns on every forward
# that the name goes away in 5.40 (pyproject caps transformers below that). One line per forward drowns the output.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)

EXIT_USAGE = 2


def fail(message: str, prog: str = "specdec") -> int:
    """Print a one-line usage error (whitespace collapsed) and return the usage exit code."""
    import sys

    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_USAGE


CRASH_ENV = "SPECDEC_SIMULATE_CRASH"


def simulated_crash(point: str) -> bool:
    """Whether $SPECDEC_SIMULATE_CRASH (comma-separated points) names `point`. Tests of crash isolation set it,
    since a native crash cannot be had on demand: `amx` makes this CPU pass for one with AMX whose llama.cpp
    extra buffers crash (engines.llamacpp), `decode:STRATEGY` makes a decode of STRATEGY crash (run.runner)."""
    import os

    return point in {p.strip() for p in os.environ.get(CRASH_ENV, "").split(",")}


def crash(where: str) -> None:
    """Die of SIGSEGV as a native crash would (faulthandler, where enabled, dumps the Python frames first)."""
    import os
    import signal
    import sys

    print(f"specdec: simulated native crash in {where} (${CRASH_ENV})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)
