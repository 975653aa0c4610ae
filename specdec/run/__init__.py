"""What runs a cell: a strategy by name on a loaded pair (runner), a workflow job with its paired baseline (job),
devices and tensor parallelism (devices, parallel, tp_worker), and `specdec bench`'s in-process comparison (bench,
bench_measure). Imports every wing below it; only cli.py imports it."""
