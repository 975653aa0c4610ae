"""What a run measures, apart from running it: a generation's trace into metrics (metrics) and what else loaded
the machine meanwhile (noise). Imports only the model wing below it."""
