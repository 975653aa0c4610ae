# One job per cell: load the cell's models once, decode all its prompts, write one result file.
# A cell that fails (missing weights, out of memory, too few GPUs) still writes its file, with failed rows and the
# error, and exits 0 so the rest of the matrix runs. So does a cell whose process crashes (a signal, e.g. a segfault
# in a native library): `specdec run-job` runs the cell in a child process and writes the failure when it dies.


def cell_threads(wildcards):
    # CPU cells take every core Snakemake may use, so they run one at a time and measure the whole machine
    # instead of two cells fighting over two cores. GPU cells need a core or two to feed their device.
    cores = workflow_threads()
    return cores if CELLS[wildcards.cell]["gpus"] == 0 else min(2, cores)


rule run_cell:
    input:
        drafter_input,
    output:
        cell_result("{cell}"),
    log:
        f"logs/{config['tag']}/{HOST}/{{cell}}.log",
    params:
        job=lambda wildcards: json.dumps(CELLS[wildcards.cell], sort_keys=True),
    threads: cell_threads
    resources:
        gpu=lambda wildcards: CELLS[wildcards.cell]["gpus"],
        gpu_model=config["resources"].get("gpu_model") or "",
        mem_mb=config["resources"].get("mem_mb", 16000),
        runtime=config["resources"].get("runtime", 120),
    shell:
        "OMP_NUM_THREADS={threads} specdec run-job --job {params.job:q} --out {output:q} 2>&1 | tee {log:q}"
