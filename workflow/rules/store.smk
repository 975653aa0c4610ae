# The only step that writes the DuckDB store: every result file of this tag and host, in one transaction.
# Runs already stored are skipped by run id, so re-running it (or a resumed workflow) never duplicates a row.
# Result files of cells that crashed (their process died of a signal: job.crashed_document) are moved to
# {RUN_DIR}/crashed/ once stored, so the store keeps the failure and the next run measures those cells again.
# It also replaces the store's device price table with the config's `prices`, if any, and its noise thresholds with
# the config's `noise` (a change of either re-runs only this step, not the measurements).


rule ingest:
    input:
        [cell_result(name) for name in CELLS],
    output:
        INGESTED,
    params:
        db=config["db"],
        # Only when the config sets prices, so a config without them leaves the stored table alone.
        prices=f"--prices {shlex.quote(json.dumps(config['prices'], sort_keys=True))}" if config["prices"] else "",
        # Always: the thresholds the store judges noise by are the config's (a change re-runs only this step).
        noise=f"--noise {shlex.quote(json.dumps(config['noise'], sort_keys=True))}",
        crashed=f"{RUN_DIR}/crashed",
        # A new file there changes this parameter, so Snakemake reruns ingest and with it the missing cell (a
        # missing input alone does not rerun an ingest whose output exists).
        set_aside=sorted(p.name for p in Path(f"{RUN_DIR}/crashed").glob("*.json")),
    log:
        f"logs/{config['tag']}/{HOST}/ingest.log",
    shell:
        "specdec ingest --db {params.db:q} {params.prices} {params.noise} --set-aside-crashed {params.crashed:q}"
        " {input:q} 2>&1 | tee {log:q} {output:q}"


# The summary printed at the end of every run (rule all in the Snakefile; it always runs, also when every cell was
# already done): per pair, strategy, weight format and batch size the best k on this host, quiet cells first, so a noisy cell is shown only
# when every k of it was noisy, and then marked. The interval is cell_summary's 95 % bootstrap interval.
SUMMARY_SQL = """
SELECT target, coalesce(draft, '-') AS draft, strategy, coalesce(weights, '-') AS weights, draft_length AS k, gpus,
       temperature, batch_size AS batch,
       round(speedup_median, 2) AS speedup,
       CASE WHEN speedup_ci_low IS NOT NULL
            THEN printf('%.2f-%.2f', speedup_ci_low, speedup_ci_high) ELSE '-' END AS ci_95,
       round(tokens_per_s_median, 1) AS tok_s,
       round(acceptance_rate_median, 2) AS acceptance, round(mean_accepted_tokens_median, 2) AS tok_per_step,
       round(match_share, 2) AS identical,
       round(degenerate_share, 2) AS degenerate, round(speedup_median_clean, 2) AS speedup_clean,
       round(mean_accepted_tokens_median_clean, 2) AS tok_per_step_clean,
       CASE WHEN noisy THEN 'NOISY: ' || noise_reason WHEN noisy IS NULL THEN 'unknown' ELSE 'quiet' END AS noise
FROM cell_summary
WHERE host = '{host}' AND strategy NOT IN ('baseline', 'llamacpp-generate')
QUALIFY row_number() OVER (PARTITION BY target, draft, strategy, weights, threads, gpus, temperature, batch_size
                           ORDER BY coalesce(noisy, false), speedup_median DESC NULLS LAST) = 1
ORDER BY target, draft, batch_size, speedup_median DESC NULLS LAST
"""


# Then, when the matrix has plain-decoding cells (baseline, hf-generate, llamacpp-generate: each engine's own), their
# speeds side by side: what each engine decodes at before any speculation.
PLAIN_SQL = """
SELECT target, strategy AS plain_decoding, engine, coalesce(weights, '-') AS weights, gpus, temperature,
       batch_size AS batch, round(tokens_per_s_median, 1) AS tok_s, n_measurements AS n,
       CASE WHEN noisy THEN 'NOISY: ' || noise_reason WHEN noisy IS NULL THEN 'unknown' ELSE 'quiet' END AS noise
FROM cell_summary
WHERE host = '{host}' AND strategy IN ({plain})
ORDER BY target, gpus, temperature, batch_size, tokens_per_s_median DESC
"""


def summary_command():
    import socket

    from specdec.strategies import STRATEGIES

    host = socket.gethostname().replace("'", "''")
    sql = " ".join(SUMMARY_SQL.split()).replace("{host}", host)
    heading = (f"Best speedup per pair and strategy, quiet cells first (store: {config['db']}; "
               "more: specdec query / specdec dashboard)")
    command = (f"echo; echo {shlex.quote(heading)}; "
               f"specdec query --db {shlex.quote(config['db'])} {shlex.quote(sql)}")
    plain = [name for name in config["strategies"] if not STRATEGIES[name].uses_k]
    if plain:
        sql = " ".join(PLAIN_SQL.split()).replace("{host}", host).replace(
            "{plain}", ", ".join(f"'{name}'" for name in plain))
        command += (f"; echo; echo {shlex.quote('Plain decoding per engine (tokens/s, median over prompts and repeats)')}; "
                    f"specdec query --db {shlex.quote(config['db'])} {shlex.quote(sql)}")
    return command


def report_command():
    """With `report: true` (config.yaml sets it), the run ends by writing `specdec report` for this host, as the
    summary shows it, into report/<tag>/ and printing the HTML file's path; tests' configs leave it off (a report
    takes seconds). No --tag: that filter matches result folders named by the real hostname, so it would find
    nothing where the config's `host` label names them."""
    if not config.get("report"):
        return ":"
    import socket

    out = f"report/{config['tag']}"
    return (f"specdec report --db {shlex.quote(config['db'])} --host {shlex.quote(socket.gethostname())} "
            f"--out {shlex.quote(out)} && "
            f"echo && echo \"Report (open it in a browser): $(realpath {shlex.quote(out)}/report.html)\"")
