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
