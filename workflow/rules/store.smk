# The only step that writes the DuckDB store: every result file of this tag and host, in one transaction.
# Runs already stored are skipped by run id, so re-running it (or a resumed workflow) never duplicates a row.
# It also replaces the store's device price table with the config's `prices`, if any (a price change re-runs only
# this step, not the measurements).


rule ingest:
    input:
        [cell_result(name) for name in CELLS],
    output:
        INGESTED,
    params:
        db=config["db"],
        # Only when the config sets prices, so a config without them leaves the stored table alone.
        prices=f"--prices {shlex.quote(json.dumps(config['prices'], sort_keys=True))}" if config["prices"] else "",
    log:
        f"logs/{config['tag']}/{HOST}/ingest.log",
    shell:
        "specdec ingest --db {params.db:q} {params.prices} {input:q} 2>&1 | tee {log:q} {output:q}"


SUMMARY_SQL = """
SELECT target, coalesce(draft, '-') AS draft, strategy, draft_length AS k, gpus, temperature,
       round(speedup_median, 2) AS speedup, round(tokens_per_s_median, 1) AS tok_s,
       round(acceptance_rate_median, 2) AS acceptance, round(mean_accepted_tokens_median, 2) AS tok_per_step,
       round(match_share, 2) AS identical,
       round(degenerate_share, 2) AS degenerate, round(speedup_median_clean, 2) AS speedup_clean,
       round(mean_accepted_tokens_median_clean, 2) AS tok_per_step_clean
FROM cell_summary
WHERE host = '{host}' AND strategy <> 'baseline'
QUALIFY row_number() OVER (PARTITION BY target, draft, strategy, gpus, temperature
                           ORDER BY speedup_median DESC NULLS LAST) = 1
ORDER BY target, draft, speedup_median DESC NULLS LAST
"""


onsuccess:
    # Best speedup per pair and strategy on this host, from the store (all runs so far, not only this one).
    if Path(config["db"]).exists():
        import socket

        sql = " ".join(SUMMARY_SQL.split()).replace("{host}", socket.gethostname().replace("'", "''"))
        print(f"\nBest speedup per pair and strategy (store: {config['db']}; more: specdec query / specdec dashboard)")
        shell("specdec query --db {db:q} {sql:q}", db=config["db"], sql=sql)
