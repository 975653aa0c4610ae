-- Views of the results store (docs/results.md). Executed by specdec.db.store.init_db on every ingest,
-- so editing this file and re-running ingest updates the views. Keep statements separated by a
-- semicolon at the end of a line: init_db splits the file there (and nowhere else).

-- speedup: one row per ok measurement of a cell (every strategy, baselines included; paired baselines are
-- not cells: they appear only as the baseline of their cell's rows) with its baseline.
--
-- Paired (baseline_mode = 'paired', format 2): the baseline of a row is its own job's paired baseline decode
-- of the same prompt and repeat (the run whose paired_with is this run), decoded seconds apart on the same
-- loaded target by the same engine (llama.cpp cells pair with `llamacpp-generate`, every other cell with our
-- `baseline`) in the same weight format and thread count. If that decode failed, the row has no speedup: it
-- never falls back to another job.
-- Shared (baseline_mode = 'shared', runs stored before pairing, and baseline cells themselves): the plain
-- decoding cell of the row's engine (`llamacpp-generate` for llama.cpp strategies, named llamacpp-*, else
-- `baseline`) on the same machine — same hostname, CPU model and GPU models — with the same target, gpus,
-- temperature, top_p, top_k, max_new_tokens, weights, threads, batch size and prompt_id, taken from the most recent such
-- baseline run (by started_utc, then run_id) that has an ok measurement of that prompt, so a baseline run that
-- failed on a prompt does not hide an older good one. No speedup ever divides by a measurement from another
-- machine or device model.
--   baseline_tokens_per_s = paired: that decode's tokens/s; shared: median over the baseline run's ok repeats;
--   speedup               = tokens_per_s / baseline_tokens_per_s;
--   matches_baseline      = token_hash equals the baseline decode's (paired: the same repeat; shared: the
--                           baseline run's first ok repeat), only when temperature = 0 (greedy), else NULL;
--   baseline_source       = 'paired' | 'shared' | NULL (no baseline); baseline_run_id and baseline_repeat name
--                           the decode that was compared.
-- Baseline cells are matched like shared cells: the most recent baseline run's rows get a speedup around 1.0
-- (their own median), older baseline runs show drift against the newest one.
-- Rows with no baseline at all are kept, with NULL baseline_tokens_per_s / speedup / matches_baseline.
-- Key columns (baseline_key) are compared with IS NOT DISTINCT FROM so a NULL in e.g. top_k still matches.
-- cost_per_mtok = price of the run's devices per hour (run_cost, from the `prices` table) ÷ tokens per hour × 1e6: the cost of a
-- million generated tokens at this row's speed (NULL when no price was configured).
-- draft_length is k for strategies that draft (NULL for baseline and hf-generate, whatever k says).
-- run_cost: what the devices of each run cost per hour, from the `prices` table (config `prices`, replaced by
-- each workflow ingest). Every device of the run (its GPUs, or 'cpu' for a CPU run) takes the price of the
-- longest price key contained in its name, case-insensitively; NULL unless every device has a price.
CREATE OR REPLACE VIEW run_cost AS
WITH run_devices AS (
    SELECT run_id, unnest(CASE WHEN coalesce(gpu_count, 0) > 0 THEN from_json(gpu_names, '["VARCHAR"]')
                               ELSE ['cpu'] END) AS device
    FROM runs
),
priced AS (
    SELECT d.run_id, d.device,
           (SELECT p.price_per_hour FROM prices AS p WHERE contains(lower(d.device), lower(p.device))
            ORDER BY length(p.device) DESC LIMIT 1) AS price_per_hour
    FROM run_devices AS d
)
SELECT run_id, CASE WHEN count(price_per_hour) = count(*) THEN sum(price_per_hour) END AS cost_per_hour
FROM priced
GROUP BY run_id;

CREATE OR REPLACE VIEW speedup AS
WITH ok AS (
    SELECT m.*, r.host, r.cpu_name, r.gpu_names, r.target, r.draft, r.strategy, r.k, r.gpus, r.temperature,
           r.top_p, r.top_k, r.max_new_tokens, r.started_utc, r.paired_with, r.baseline_mode, c.cost_per_hour,
           r.weights, r.threads, coalesce(r.batch_size, 1) AS batch_size,
           CASE WHEN r.strategy LIKE 'llamacpp-%' THEN 'llamacpp' WHEN r.strategy LIKE 'server-%' THEN 'server'
                ELSE 'specdec' END AS engine,
           -- what a shared baseline must have in common with the row: the machine, the engine, the weight format,
           -- the threads and the decoding settings (serving cells: the same concurrency and request rate)
           row(r.host, r.cpu_name, r.gpu_names, r.target, r.gpus, r.temperature, r.top_p, r.top_k, r.max_new_tokens,
               CASE WHEN r.strategy LIKE 'llamacpp-%' THEN 'llamacpp' WHEN r.strategy LIKE 'server-%' THEN 'server'
                    ELSE 'specdec' END, r.weights, r.threads,
               coalesce(r.batch_size, 1), r.concurrency, r.request_rate)
               AS baseline_key
    FROM measurements AS m
    JOIN runs AS r ON r.run_id = m.run_id
    LEFT JOIN run_cost AS c ON c.run_id = m.run_id
    WHERE m.status = 'ok'
),
paired AS (
    SELECT paired_with AS cell_run_id, run_id, prompt_id, "repeat", tokens_per_s, token_hash
    FROM ok
    WHERE paired_with IS NOT NULL
),
baseline_runs AS (
    SELECT run_id, baseline_key, prompt_id, started_utc,
           median(tokens_per_s) AS baseline_tokens_per_s,
           arg_min(token_hash, "repeat") AS baseline_token_hash,
           min("repeat") AS baseline_repeat
    FROM ok
    WHERE strategy IN ('baseline', 'llamacpp-generate', 'server-plain') AND paired_with IS NULL
    GROUP BY ALL
),
latest_baseline AS (
    SELECT *
    FROM baseline_runs
    QUALIFY row_number() OVER (PARTITION BY baseline_key, prompt_id ORDER BY started_utc DESC, run_id DESC) = 1
)
SELECT
    o.run_id, o.host, o.target, o.draft, o.strategy,
    CASE WHEN o.strategy IN ('baseline', 'hf-generate', 'llamacpp-generate', 'server-plain') THEN NULL ELSE o.k END
        AS draft_length,
    o.gpus, o.temperature, o.top_p, o.top_k, o.max_new_tokens,
    o.prompt_id, o.category, o."repeat", o.new_tokens, o.tokens_per_s,
    coalesce(p.tokens_per_s, b.baseline_tokens_per_s) AS baseline_tokens_per_s,
    o.tokens_per_s / nullif(coalesce(p.tokens_per_s, b.baseline_tokens_per_s), 0) AS speedup,
    o.acceptance_rate, o.mean_accepted_tokens,
    CASE WHEN o.temperature = 0 THEN o.token_hash = coalesce(p.token_hash, b.baseline_token_hash)
    END AS matches_baseline,
    o.ttft_s, o.tpot_s, o.peak_memory_bytes, o.cost_ratio_c, o.leviathan_speedup, o.started_utc,
    o.cost_per_hour * 1e6 / 3600.0 / nullif(o.tokens_per_s, 0) AS cost_per_mtok,
    o.copy_share, o.repeat_share, o.degenerate,
    CASE WHEN p.run_id IS NOT NULL THEN 'paired' WHEN b.run_id IS NOT NULL THEN 'shared' END AS baseline_source,
    coalesce(p.run_id, b.run_id) AS baseline_run_id,
    coalesce(p."repeat", b.baseline_repeat) AS baseline_repeat,
    o.cpu_name, o.gpu_names, o.engine, o.weights, o.threads, o.batch_size
FROM ok AS o
LEFT JOIN paired AS p
    ON  p.cell_run_id = o.run_id
    AND p.prompt_id = o.prompt_id
    AND p."repeat" = o."repeat"
LEFT JOIN latest_baseline AS b
    ON  o.baseline_mode IS DISTINCT FROM 'paired'
    AND b.baseline_key IS NOT DISTINCT FROM o.baseline_key
    AND b.prompt_id = o.prompt_id
WHERE o.paired_with IS NULL;

-- run_noise: per run (paired baselines excluded: the cell's run holds the readings of the whole job), what else
-- loaded the machine while it ran (specdec/measure/noise.py) and whether that makes it `noisy`: a reading above its
-- threshold in noise_thresholds (config `noise:`; defaults other_cpu_cores 0.25 cores, steal_share 0.05,
-- gpu_other_processes 0, baseline_spread 0.35). noise_reason says which, in words. Runs without readings
-- (stored before format 2) have noisy NULL: unknown, not quiet.
CREATE OR REPLACE VIEW run_noise AS
WITH limits AS (
    SELECT max(value) FILTER (WHERE name = 'other_cpu_cores') AS other_cpu_cores,
           max(value) FILTER (WHERE name = 'steal_share') AS steal_share,
           max(value) FILTER (WHERE name = 'gpu_other_processes') AS gpu_other_processes,
           max(value) FILTER (WHERE name = 'baseline_spread') AS baseline_spread
    FROM noise_thresholds
),
checks AS (
    SELECT r.*,
           r.other_cpu_cores > t.other_cpu_cores AS busy_cpus,
           r.steal_share > t.steal_share AS stolen,
           r.gpu_other_processes > t.gpu_other_processes AS shared_gpus,
           r.baseline_spread > t.baseline_spread AS unsteady_baseline,
           coalesce(r.other_cpu_cores, r.steal_share, r.gpu_other_processes, r.baseline_spread) IS NOT NULL AS measured
    FROM runs AS r CROSS JOIN limits AS t
    WHERE r.paired_with IS NULL
)
SELECT run_id, load_avg, other_cpu_cores, steal_share, gpu_other_processes, baseline_spread, noise_samples,
       CASE WHEN measured THEN coalesce(busy_cpus OR stolen OR shared_gpus OR unsteady_baseline, false) END AS noisy,
       nullif(concat_ws('; ',
           CASE WHEN busy_cpus THEN printf('other processes used %.1f of %s cores', other_cpu_cores,
                                           coalesce(CAST(cpu_count AS VARCHAR), '?')) END,
           CASE WHEN stolen THEN printf('CPU steal %.0f %%', 100 * steal_share) END,
           CASE WHEN shared_gpus THEN printf('%d other process(es) on the claimed GPUs', gpu_other_processes) END,
           CASE WHEN unsteady_baseline THEN printf('baseline tok/s spread %.0f %%', 100 * baseline_spread) END),
       '') AS noise_reason
FROM checks;

-- median_ci(values): the 95 % bootstrap interval [low, high] of the median of `values` (NULL for fewer than 2),
-- computed exactly rather than by resampling (db/bootstrap.py explains): its ends are order statistics of the
-- sorted values, whose ranks depend only on n — from the median_ci_ranks table for n <= 200, and from the normal
-- approximation of the binomial (ci_rank, within one rank of exact there) beyond. Deterministic by construction,
-- and as cheap as a sort, where drawing 1000 resamples per cell took minutes on a store of 100 000 rows.
CREATE OR REPLACE MACRO ci_rank(n, r, z) AS
    greatest(1, least(n, CAST(ceil(r - 0.5 + z * sqrt(r * (n - r) / n)) AS INTEGER)));

CREATE OR REPLACE MACRO median_ci(vals) AS (
    SELECT CASE WHEN s.n >= 2 THEN [
        (s.x[coalesce(r.low_a, ci_rank(s.n, (s.n + 1) // 2, -1.959964))]
         + s.x[coalesce(r.low_b, ci_rank(s.n, s.n // 2 + 1, -1.959964))]) / 2,
        (s.x[coalesce(r.high_a, ci_rank(s.n, (s.n + 1) // 2, 1.959964))]
         + s.x[coalesce(r.high_b, ci_rank(s.n, s.n // 2 + 1, 1.959964))]) / 2] END
    FROM (SELECT list_sort(vals) AS x, len(vals) AS n) AS s
    LEFT JOIN median_ci_ranks AS r ON r.n = s.n);

-- cell_summary: one row per cell, i.e. per (host, target, draft, strategy, draft_length, gpus, temperature,
-- top_p, top_k, max_new_tokens, weights, threads, batch_size) of the speedup view (engine follows from strategy).
-- top_k, max_new_tokens, weights, threads and batch_size are part of the baseline key, so cells that differ only in them are kept
-- apart rather than mixed.
-- Medians and quantiles ignore NULLs (e.g. rows without a baseline have no speedup);
-- match_share is the share of rows with matches_baseline true among rows where it is not NULL.
-- speedup_ci_low / speedup_ci_high: 95 % bootstrap interval of speedup_median over the cell's prompt × repeat
-- pairs (median_ci; NULL with fewer than 2). noisy: some run of the cell was noisy (run_noise), with the
-- reasons; NULL when no run of the cell has noise readings. paired_share: share of rows whose baseline was
-- paired.
-- *_clean: the same medians over non-degenerate outputs only (degenerate = false; rows stored before the flag
-- existed have NULL and count in neither), n_clean of them; degenerate_share = share of flagged outputs.
CREATE OR REPLACE VIEW cell_summary AS
WITH agg AS (
    SELECT
        s.host, s.target, s.draft, s.strategy, s.draft_length, s.gpus, s.temperature, s.top_p, s.top_k,
        s.max_new_tokens, s.engine, s.weights, s.threads, s.batch_size,
        count(DISTINCT s.run_id) AS n_runs,
        count(*) AS n_measurements,
        median(s.speedup) AS speedup_median,
        quantile_cont(s.speedup, 0.25) AS speedup_p25,
        quantile_cont(s.speedup, 0.75) AS speedup_p75,
        min(s.speedup) AS speedup_min,
        max(s.speedup) AS speedup_max,
        median(s.tokens_per_s) AS tokens_per_s_median,
        median(s.baseline_tokens_per_s) AS baseline_tokens_per_s_median,
        median(s.acceptance_rate) AS acceptance_rate_median,
        median(s.mean_accepted_tokens) AS mean_accepted_tokens_median,
        avg(CAST(s.matches_baseline AS DOUBLE)) AS match_share,
        median(s.leviathan_speedup) AS leviathan_speedup_median,
        median(s.cost_ratio_c) AS cost_ratio_c_median,
        median(s.cost_per_mtok) AS cost_per_mtok_median,
        avg(CAST(s.degenerate AS DOUBLE)) AS degenerate_share,
        count(*) FILTER (WHERE NOT s.degenerate) AS n_clean,
        median(s.speedup) FILTER (WHERE NOT s.degenerate) AS speedup_median_clean,
        median(s.acceptance_rate) FILTER (WHERE NOT s.degenerate) AS acceptance_rate_median_clean,
        median(s.mean_accepted_tokens) FILTER (WHERE NOT s.degenerate) AS mean_accepted_tokens_median_clean,
        max(s.started_utc) AS last_started_utc,
        bool_or(n.noisy) AS noisy,
        string_agg(DISTINCT n.noise_reason, '; ' ORDER BY n.noise_reason) AS noise_reason,
        avg(CASE WHEN s.baseline_source = 'paired' THEN 1.0 ELSE 0.0 END) AS paired_share,
        list(s.speedup) FILTER (WHERE s.speedup IS NOT NULL) AS speedups
    FROM speedup AS s
    LEFT JOIN run_noise AS n ON n.run_id = s.run_id
    GROUP BY ALL
)
SELECT * EXCLUDE (speedups, interval), interval[1] AS speedup_ci_low, interval[2] AS speedup_ci_high
FROM (SELECT *, median_ci(speedups) AS interval FROM agg);

-- failures: every failed measurement, with the run's error when the measurement has none of its own
-- (a job that fails before decoding writes one failed measurement per prompt × repeat).
CREATE OR REPLACE VIEW failures AS
SELECT m.run_id, r.host, r.cell, r.target, r.draft, r.strategy, r.k, m.prompt_id, m."repeat",
       coalesce(m.error, r.error) AS error
FROM measurements AS m
JOIN runs AS r ON r.run_id = m.run_id
WHERE m.status <> 'ok';

-- batch_throughput: per batched cell run (batch_size > 1, from the run's `batches` in extra_json) and repeat, the
-- whole batch's throughput (all sequences' new tokens over the queue's wall time) of the cell and of its paired
-- baseline decoded in the same job at the same batch size, and their ratio. Per-sequence speeds (tokens/s of each
-- prompt while it was in a slot) and their paired speedups are in the speedup view as for batch size 1.
CREATE OR REPLACE VIEW batch_throughput AS
WITH batches AS (
    SELECT r.run_id, r.host, r.cpu_name, r.target, r.draft, r.strategy, r.k, r.batch_size, r.started_utc,
           unnest(from_json(json_extract(r.extra_json, '$.batches'),
                            '[{"side": "VARCHAR", "repeat": "INTEGER", "sequences": "INTEGER", "new_tokens": "BIGINT",
                               "wall_s": "DOUBLE", "tokens_per_s": "DOUBLE"}]')) AS b
    FROM runs AS r
    WHERE r.batch_size > 1 AND r.paired_with IS NULL AND r.status = 'ok'
)
SELECT run_id, host, cpu_name, target, draft, strategy, k AS draft_length, batch_size, started_utc,
       b."repeat" AS "repeat",
       max(b.tokens_per_s) FILTER (WHERE b.side = 'cell') AS tokens_per_s,
       max(b.tokens_per_s) FILTER (WHERE b.side = 'baseline') AS baseline_tokens_per_s,
       max(b.tokens_per_s) FILTER (WHERE b.side = 'cell')
           / nullif(max(b.tokens_per_s) FILTER (WHERE b.side = 'baseline'), 0) AS throughput_speedup
FROM batches
GROUP BY ALL;
