"""SQLAlchemy models of the results store: `runs` (one row per result file) and `measurements` (one per prompt × repeat).

The columns follow docs/results.md one to one. JSON lists (`gpu_names`, `devices`, `token_ids`, the per-position
counts) and the raw `params` object are stored as JSON *text*, not DuckDB LIST/JSON types: text survives any
client (pandas, the dashboard, a CSV export) unchanged and DuckDB can still parse it with `json_extract`/`from_json`
when someone needs to. There are no surrogate integer ids: `run_id` (a uuid4 hex chosen by the job) is the key, so
re-ingesting a file can be recognised, and `measurements` is keyed by `(run_id, prompt_id, repeat)`.

Times are `TIMESTAMP` (without time zone) holding UTC: the result files are all UTC, and a naive column avoids
DuckDB converting to the reader's local zone (which `TIMESTAMPTZ` does on display).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, Double, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One ingested result file: the `run` object of the file, with `params` flattened into columns."""

    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(String, primary_key=True)
    workflow_run_id: Mapped[str | None] = mapped_column(String)
    started_utc: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    finished_utc: Mapped[datetime | None] = mapped_column(DateTime)
    status: Mapped[str] = mapped_column(String, nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    git_commit: Mapped[str | None] = mapped_column(String)
    git_dirty: Mapped[bool | None] = mapped_column(Boolean)
    host: Mapped[str] = mapped_column(String, nullable=False)
    cpu_name: Mapped[str | None] = mapped_column(String)
    cpu_count: Mapped[int | None] = mapped_column(Integer)
    gpu_names: Mapped[str | None] = mapped_column(Text)  # JSON list as text
    gpu_count: Mapped[int | None] = mapped_column(Integer)
    cuda_version: Mapped[str | None] = mapped_column(String)
    driver_version: Mapped[str | None] = mapped_column(String)
    torch_version: Mapped[str | None] = mapped_column(String)
    transformers_version: Mapped[str | None] = mapped_column(String)
    specdec_version: Mapped[str | None] = mapped_column(String)
    python_version: Mapped[str | None] = mapped_column(String)
    seed: Mapped[int | None] = mapped_column(BigInteger)
    config_hash: Mapped[str | None] = mapped_column(String)
    devices: Mapped[str | None] = mapped_column(Text)  # JSON list as text
    # params, flattened: these are what the views group and match baselines on.
    cell: Mapped[str | None] = mapped_column(String)
    target: Mapped[str] = mapped_column(String, nullable=False)
    draft: Mapped[str | None] = mapped_column(String)
    strategy: Mapped[str] = mapped_column(String, nullable=False)
    k: Mapped[int | None] = mapped_column(Integer)
    gpus: Mapped[int] = mapped_column(Integer, nullable=False)
    temperature: Mapped[float] = mapped_column(Double, nullable=False)
    top_p: Mapped[float] = mapped_column(Double, nullable=False)
    top_k: Mapped[int] = mapped_column(Integer, nullable=False)
    draft_sampling: Mapped[str | None] = mapped_column(String)
    use_cache: Mapped[bool | None] = mapped_column(Boolean)
    max_new_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    repeats: Mapped[int | None] = mapped_column(Integer)
    warmup: Mapped[int | None] = mapped_column(Integer)
    dtype: Mapped[str | None] = mapped_column(String)
    gpu_mode: Mapped[str | None] = mapped_column(String)
    weights: Mapped[str | None] = mapped_column(String)  # format asked (NULL: the alias's); llama.cpp: gguf-Q4_1
    threads: Mapped[int | None] = mapped_column(Integer)  # CPU threads asked of the engine (NULL: torch's count)
    # sequences decoded at once (NULL: one, as every run before batching; the run's extra_json has `batches`: each
    # batch's new tokens, wall time and throughput)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    slurm_job_id: Mapped[str | None] = mapped_column(String)
    # serving cells (server-* strategies): concurrent clients and Poisson request rate (NULL: closed loop); the
    # cell metrics (throughput, TPOT quantiles, goodput, server counters) are the run's `serving` in extra_json
    concurrency: Mapped[int | None] = mapped_column(Integer)
    request_rate: Mapped[float | None] = mapped_column(Double)
    # Paired baselines and noise (format 2; NULL on older runs). A cell's paired baseline is a run of its own
    # with its engine's plain decoding (`baseline`, or `llamacpp-generate` for llama.cpp cells) as strategy and
    # `paired_with` = the cell's run_id; `baseline_mode` (a param) is 'paired' or 'shared' on cells that are not
    # baselines. The noise readings (specdec/measure/noise.py) are judged by the run_noise view against the
    # noise_thresholds table.
    baseline_mode: Mapped[str | None] = mapped_column(String)
    paired_with: Mapped[str | None] = mapped_column(String)
    load_avg: Mapped[float | None] = mapped_column(Double)
    other_cpu_cores: Mapped[float | None] = mapped_column(Double)
    steal_share: Mapped[float | None] = mapped_column(Double)
    gpu_other_processes: Mapped[int | None] = mapped_column(Integer)
    baseline_spread: Mapped[float | None] = mapped_column(Double)
    noise_samples: Mapped[int | None] = mapped_column(Integer)
    extra_json: Mapped[str | None] = mapped_column(Text)  # run fields without a column of their own (JSON object)
    params_json: Mapped[str] = mapped_column(Text, nullable=False)  # the whole params object, sources included
    result_file: Mapped[str] = mapped_column(Text, nullable=False)
    ingested_utc: Mapped[datetime] = mapped_column(DateTime, nullable=False)


class Measurement(Base):
    """One decode of one prompt (one repeat) within a run; failed decodes are rows too, with `status = 'failed'`."""

    __tablename__ = "measurements"

    run_id: Mapped[str] = mapped_column(String, ForeignKey("runs.run_id"), primary_key=True)
    prompt_id: Mapped[str] = mapped_column(String, primary_key=True)
    repeat: Mapped[int] = mapped_column(Integer, primary_key=True)
    category: Mapped[str | None] = mapped_column(String)
    status: Mapped[str] = mapped_column(String, nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    new_tokens: Mapped[int | None] = mapped_column(Integer)
    stop_reason: Mapped[str | None] = mapped_column(String)
    wall_s: Mapped[float | None] = mapped_column(Double)
    tokens_per_s: Mapped[float | None] = mapped_column(Double)
    ttft_s: Mapped[float | None] = mapped_column(Double)
    tpot_s: Mapped[float | None] = mapped_column(Double)
    target_forward_passes: Mapped[int | None] = mapped_column(Integer)
    draft_forward_passes: Mapped[int | None] = mapped_column(Integer)
    draft_s: Mapped[float | None] = mapped_column(Double)
    verify_s: Mapped[float | None] = mapped_column(Double)
    proposed_tokens: Mapped[int | None] = mapped_column(Integer)
    accepted_tokens: Mapped[int | None] = mapped_column(Integer)
    acceptance_rate: Mapped[float | None] = mapped_column(Double)
    mean_accepted_tokens: Mapped[float | None] = mapped_column(Double)
    proposed_per_position: Mapped[str | None] = mapped_column(Text)  # JSON list as text
    accepted_per_position: Mapped[str | None] = mapped_column(Text)  # JSON list as text
    cost_ratio_c: Mapped[float | None] = mapped_column(Double)
    leviathan_speedup: Mapped[float | None] = mapped_column(Double)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    memory_kind: Mapped[str | None] = mapped_column(String)
    token_ids: Mapped[str | None] = mapped_column(Text)  # JSON list as text
    token_hash: Mapped[str | None] = mapped_column(String)
    text: Mapped[str | None] = mapped_column(Text)
    # degenerate outputs (docs/results.md): shares of generated tokens inside n-grams copied from the prompt or
    # repeated from earlier in the output, and the flag of the run's rule (NULL in rows stored before they existed)
    copy_share: Mapped[float | None] = mapped_column(Double)
    repeat_share: Mapped[float | None] = mapped_column(Double)
    degenerate: Mapped[bool | None] = mapped_column(Boolean)
    decode_index: Mapped[int | None] = mapped_column(Integer)  # order of this decode within its job (pairing)
    extra_json: Mapped[str | None] = mapped_column(Text)  # fields without a column of their own (JSON object)


class Price(Base):
    """Hourly price of a device (config `prices`), replaced by every ingest that is given prices.

    Prices live apart from the measurements so a new rental price changes the cost figures without re-measuring.
    `device` matches a run's device names by case-insensitive substring ("A100" matches "NVIDIA A100-SXM4-40GB";
    the longest match wins); "cpu" prices CPU-only runs.
    """

    __tablename__ = "prices"

    device: Mapped[str] = mapped_column(String, primary_key=True)
    price_per_hour: Mapped[float] = mapped_column(Double, nullable=False)
    updated_utc: Mapped[datetime] = mapped_column(DateTime, nullable=False)


class NoiseThreshold(Base):
    """The thresholds the run_noise view judges runs by (config `noise:`, defaults specdec.measure.noise.THRESHOLDS),
    replaced by each workflow ingest. Kept apart from the readings, like prices: a changed threshold re-judges every
    stored run without measuring anything again."""

    __tablename__ = "noise_thresholds"

    name: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[float] = mapped_column(Double, nullable=False)
    updated_utc: Mapped[datetime] = mapped_column(DateTime, nullable=False)


class MedianCiRank(Base):
    """Which order statistics of a sorted sample of n values end the 95 % bootstrap interval of its median
    (specdec.db.bootstrap; filled by init_db for n up to bootstrap.MAX_EXACT, a normal approximation beyond)."""

    __tablename__ = "median_ci_ranks"

    n: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    low_a: Mapped[int] = mapped_column(Integer, nullable=False)
    low_b: Mapped[int] = mapped_column(Integer, nullable=False)
    high_a: Mapped[int] = mapped_column(Integer, nullable=False)
    high_b: Mapped[int] = mapped_column(Integer, nullable=False)


class Prune(Base):
    """One `specdec prune` that removed runs (db/prune.py): when, by which filter, how many, and which run ids."""

    __tablename__ = "prunes"

    prune_id: Mapped[str] = mapped_column(String, primary_key=True)  # uuid4 hex
    pruned_utc: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    filter: Mapped[str] = mapped_column(Text, nullable=False)  # the filter as the command line gave it
    runs: Mapped[int] = mapped_column(Integer, nullable=False)
    measurements: Mapped[int] = mapped_column(Integer, nullable=False)
    run_ids: Mapped[str] = mapped_column(Text, nullable=False)  # JSON list as text


runs = Run.__table__
prunes = Prune.__table__
prices = Price.__table__
noise_thresholds = NoiseThreshold.__table__
median_ci_ranks = MedianCiRank.__table__
measurements = Measurement.__table__

# Fields of a result file (of its run, then of its measurements) that the store keeps as JSON text rather than as
# a scalar column.
JSON_FIELDS = ("gpu_names", "devices", "proposed_per_position", "accepted_per_position", "token_ids")
# params keys flattened into `runs` columns (everything else stays in params_json only).
PARAM_COLUMNS = ("cell", "target", "draft", "strategy", "k", "gpus", "temperature", "top_p", "top_k",
                 "draft_sampling", "use_cache", "max_new_tokens", "repeats", "warmup", "dtype", "gpu_mode",
                 "baseline_mode", "weights", "threads", "batch_size", "concurrency", "request_rate")
# Filled by the store from whatever a result file carries beyond the columns, so no recorded field is lost.
EXTRA_FIELD = "extra_json"
