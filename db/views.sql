-- Views of the results store (docs/results.md). Executed by specdec.db.store.init_db on every ingest,
-- so editing this file and re-running ingest updates the views. Keep statements separated by a
-- semicolon at the end of a line: init_db splits the file there (and nowhere else).

-- speedup: one row per ok measurement (every strategy, baselines included) with its baseline.
--
-- The baseline of a row is its engine's plain decoding (`llamacpp-generate` for llama.cpp strategies,
-- named llamacpp-*, else `baseline`) with the same weight format and threads, on the same host, target, gpus, temperature,
-- top_p, top_k, max_new_tokens and prompt_id, taken from the most recent baseline run (by
-- started_utc, then run_id) that has an ok measurement of that prompt, so a baseline run that
-- failed on a prompt does not hide an older good one.
--   baseline_tokens_per_s = median tokens/s over that baseline run's ok repeats of the prompt;
--   speedup               = tokens_per_s / baseline_tokens_per_s;
--   matches_baseline      = token_hash equals the hash of that baseline run's first ok repeat
--                           (repeat 0 normally), only when temperature = 0 (greedy), else NULL.
-- Baseline rows are matched exactly like every other row: the most recent baseline run's rows get
-- a speedup around 1.0 (their own median), older baseline runs show drift against the newest one.
-- Rows with no baseline at all are kept, with NULL baseline_tokens_per_s / speedup / matches_baseline.
-- Key columns are compared with IS NOT DISTINCT FROM so a NULL in e.g. top_k still matches.
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
    SELECT m.*, r.host, r.target, r.draft, r.strategy, r.k, r.gpus, r.temperature, r.top_p, r.top_k,
           r.max_new_tokens, r.started_utc, c.cost_per_hour, r.weights, r.threads,
           CASE WHEN r.strategy LIKE 'llamacpp-%' THEN 'llamacpp' ELSE 'specdec' END AS engine
    FROM measurements AS m
    JOIN runs AS r ON r.run_id = m.run_id
    LEFT JOIN run_cost AS c ON c.run_id = m.run_id
    WHERE m.status = 'ok'
),
baseline_runs AS (
    SELECT run_id, host, target, gpus, temperature, top_p, top_k, max_new_tokens, prompt_id, started_utc,
           engine, weights, threads,
           median(tokens_per_s) AS baseline_tokens_per_s,
           arg_min(token_hash, "repeat") AS baseline_token_hash
    FROM ok
    WHERE strategy IN ('baseline', 'llamacpp-generate')
    GROUP BY run_id, host, target, gpus, temperature, top_p, top_k, max_new_tokens, prompt_id, started_utc,
             engine, weights, threads
),
latest_baseline AS (
    SELECT *
    FROM baseline_runs
    QUALIFY row_number() OVER (
        PARTITION BY host, target, gpus, temperature, top_p, top_k, max_new_tokens, prompt_id, engine, weights,
                     threads
        ORDER BY started_utc DESC, run_id DESC) = 1
)
SELECT
    o.run_id, o.host, o.target, o.draft, o.strategy,
    CASE WHEN o.strategy IN ('baseline', 'hf-generate', 'llamacpp-generate') THEN NULL ELSE o.k END AS draft_length,
    o.gpus, o.temperature, o.top_p, o.top_k, o.max_new_tokens,
    o.prompt_id, o.category, o."repeat", o.new_tokens, o.tokens_per_s,
    b.baseline_tokens_per_s,
    o.tokens_per_s / nullif(b.baseline_tokens_per_s, 0) AS speedup,
    o.acceptance_rate, o.mean_accepted_tokens,
    CASE WHEN o.temperature = 0 THEN o.token_hash = b.baseline_token_hash END AS matches_baseline,
    o.ttft_s, o.tpot_s, o.peak_memory_bytes, o.cost_ratio_c, o.leviathan_speedup, o.started_utc,
    o.cost_per_hour * 1e6 / 3600.0 / nullif(o.tokens_per_s, 0) AS cost_per_mtok,
    o.copy_share, o.repeat_share, o.degenerate,
    o.engine, o.weights, o.threads
FROM ok AS o
LEFT JOIN latest_baseline AS b
    ON  b.host IS NOT DISTINCT FROM o.host
    AND b.target IS NOT DISTINCT FROM o.target
    AND b.gpus IS NOT DISTINCT FROM o.gpus
    AND b.temperature IS NOT DISTINCT FROM o.temperature
    AND b.top_p IS NOT DISTINCT FROM o.top_p
    AND b.top_k IS NOT DISTINCT FROM o.top_k
    AND b.max_new_tokens IS NOT DISTINCT FROM o.max_new_tokens
    AND b.engine = o.engine
    AND b.weights IS NOT DISTINCT FROM o.weights
    AND b.threads IS NOT DISTINCT FROM o.threads
    AND b.prompt_id = o.prompt_id;

-- cell_summary: one row per cell, i.e. per (host, target, draft, strategy, draft_length, gpus,
-- temperature, top_p, top_k, max_new_tokens, weights, threads) of the speedup view (engine follows from strategy). top_k and max_new_tokens are part
-- of the baseline key, so cells that differ only in them are kept apart rather than mixed.
-- Medians and quantiles ignore NULLs (e.g. rows without a baseline have no speedup);
-- match_share is the share of rows with matches_baseline true among rows where it is not NULL.
-- *_clean: the same medians over non-degenerate outputs only (degenerate = false; rows stored before the flag
-- existed have NULL and count in neither), n_clean of them; degenerate_share = share of flagged outputs.
CREATE OR REPLACE VIEW cell_summary AS
SELECT
    host, target, draft, strategy, draft_length, gpus, temperature, top_p, top_k, max_new_tokens,
    any_value(engine) AS engine, weights, threads,
    count(DISTINCT run_id) AS n_runs,
    count(*) AS n_measurements,
    median(speedup) AS speedup_median,
    quantile_cont(speedup, 0.25) AS speedup_p25,
    quantile_cont(speedup, 0.75) AS speedup_p75,
    min(speedup) AS speedup_min,
    max(speedup) AS speedup_max,
    median(tokens_per_s) AS tokens_per_s_median,
    median(baseline_tokens_per_s) AS baseline_tokens_per_s_median,
    median(acceptance_rate) AS acceptance_rate_median,
    median(mean_accepted_tokens) AS mean_accepted_tokens_median,
    avg(CAST(matches_baseline AS DOUBLE)) AS match_share,
    median(leviathan_speedup) AS leviathan_speedup_median,
    median(cost_ratio_c) AS cost_ratio_c_median,
    median(cost_per_mtok) AS cost_per_mtok_median,
    avg(CAST(degenerate AS DOUBLE)) AS degenerate_share,
    count(*) FILTER (WHERE NOT degenerate) AS n_clean,
    median(speedup) FILTER (WHERE NOT degenerate) AS speedup_median_clean,
    median(acceptance_rate) FILTER (WHERE NOT degenerate) AS acceptance_rate_median_clean,
    median(mean_accepted_tokens) FILTER (WHERE NOT degenerate) AS mean_accepted_tokens_median_clean,
    max(started_utc) AS last_started_utc
FROM speedup
GROUP BY host, target, draft, strategy, draft_length, gpus, temperature, top_p, top_k, max_new_tokens, weights,
         threads;

-- failures: every failed measurement, with the run's error when the measurement has none of its own
-- (a job that fails before decoding writes one failed measurement per prompt × repeat).
CREATE OR REPLACE VIEW failures AS
SELECT m.run_id, r.host, r.cell, r.target, r.draft, r.strategy, r.k, m.prompt_id, m."repeat",
       coalesce(m.error, r.error) AS error
FROM measurements AS m
JOIN runs AS r ON r.run_id = m.run_id
WHERE m.status <> 'ok';
