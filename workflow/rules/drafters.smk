# Drafters specdec trains itself (`<target>+eagle`, `<target>+medusa` in a pair's draft slot): trained once per
# target, kind and training settings into results/drafters/<target>+<kind>-<settings hash>/, then reused by every
# cell that names them. Changing `drafter_settings` or the training prompts changes the folder, so the drafter is
# trained again.

DRAFTER_JOBS = {}  # drafter folder -> (target, kind), for every drafter a cell uses
DRAFTER_ON_GPU = set()  # folders of drafters that a GPU cell uses: they train on a GPU too
for _cell in CELLS.values():
    _trained = matrix.parse_alias(_cell["draft"])
    if _trained:
        _folder = matrix.drafter_folder(config, *_trained)
        DRAFTER_JOBS[_folder] = _trained
        if _cell["gpus"] > 0:
            DRAFTER_ON_GPU.add(_folder)

def drafter_input(wildcards):
    trained = matrix.parse_alias(CELLS[wildcards.cell]["draft"])
    return [f"{matrix.drafter_folder(config, *trained)}/drafter.json"] if trained else []


def train_drafter_args(wildcards):
    target, kind = DRAFTER_JOBS[wildcards.folder]
    args = ["--target", target, "--kind", kind, "--out", wildcards.folder]
    if wildcards.folder in DRAFTER_ON_GPU:
        args += ["--device", "auto"]  # the GPU the job was given (Slurm), or a free one claimed locally
    for key, value in (config.get("drafter_settings") or {}).items():  # the schema allows only keys with a flag
        args += ["--" + key.replace("_", "-"), str(value)]
    return " ".join(shlex.quote(a) for a in args)


def drafter_models_json(wildcards):
    target, _ = DRAFTER_JOBS[wildcards.folder]
    models = config.get("models") or {}
    return json.dumps({target: models[target]}) if target in models else ""


rule train_drafter:
    output:
        "{folder}/drafter.json",
    wildcard_constraints:
        folder="|".join(re.escape(f) for f in DRAFTER_JOBS) or "no-drafters",
    log:
        # beside the folder, not in it: the trainer replaces the folder atomically when it saves
        "{folder}.train.log",
    params:
        args=train_drafter_args,
        models=drafter_models_json,
    threads: workflow_threads
    resources:
        gpu=lambda wildcards: int(wildcards.folder in DRAFTER_ON_GPU),
        gpu_model=config["resources"].get("gpu_model") or "",
        mem_mb=config["resources"].get("mem_mb", 16000),
        runtime=config["resources"].get("runtime", 120),
    shell:
        # A target defined in the config's `models:` reaches the trainer through a small models file.
        "if [ -n {params.models:q} ]; then printf '%s' {params.models:q} > {wildcards.folder:q}.models.json;"
        " models='--models {wildcards.folder}.models.json'; else models=''; fi;"
        " OMP_NUM_THREADS={threads} specdec $models train-drafter {params.args} 2>&1 | tee {log:q}"
