"""Running the harness on a run folder, and the Monte Carlo error of its scores.

:func:`mc_summary` puts the adapter's Monte Carlo standard errors next to the harness's results,
per task: the mean standard error of the scores (nats), for multiple-choice tasks the fraction of
items whose ranking could flip within 2 standard errors, for rolling-perplexity tasks the Monte
Carlo error of bits per byte. :func:`run_lm_eval` is what ``maskdiff lm-eval`` runs: it builds the
model, runs ``lm_eval.simple_evaluate`` (local tasks through ``include_path``), and writes the
harness's results with that summary and the settings to a JSON file that never replaces another.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from maskdiff.apps.checks import UsageError, check_output_folder, positive_int
from maskdiff.fileio import atomic_path
from maskdiff.metrics import LN2

__all__ = ["mc_summary", "flip_possible", "results_file", "run_lm_eval", "format_lmeval_table"]


def flip_possible(logliks: list[float], stderrs: list[float], z: float = 2.0) -> bool | None:
    """Whether the chosen answer (the first largest log-likelihood, as the harness's ``acc``) could
    change within ``z`` Monte Carlo standard errors: some other choice j has
    ``ll_best - ll_j ≤ z · sqrt(se_best² + se_j²)`` (a tie counts). None when an error is unknown."""
    best = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    if any(math.isnan(s) for s in stderrs):
        return None
    return any(logliks[best] - logliks[j] <= z * math.hypot(stderrs[best], stderrs[j])
               for j in range(len(logliks)) if j != best)


def _argument_keys(sample: Mapping[str, Any], kind: str) -> list[tuple]:
    """The record keys of a logged sample's requests (``arguments``: one list per request)."""
    return [(kind, *args) for args in sample.get("arguments", [])]


def mc_summary(results: Mapping[str, Any], records: Mapping[tuple, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task of ``results`` (from ``simple_evaluate(..., log_samples=True)``), from the adapter's
    ``records`` (:attr:`MaskdiffLM.records`): ``requests``, ``mean_mc_stderr`` (nats), and
    ``flip_fraction`` / ``flippable`` (multiple choice) or ``mc_stderr_bits_per_byte`` (rolling)."""
    out: dict[str, dict[str, Any]] = {}
    for task, samples in results.get("samples", {}).items():
        output_type = results.get("configs", {}).get(task, {}).get("output_type", "")
        kind = "loglikelihood_rolling" if output_type == "loglikelihood_rolling" else "loglikelihood"
        if output_type == "generate_until":
            continue
        stderrs, flips, known, variance, n_bytes = [], 0, 0, 0.0, 0
        for sample in samples:
            recs = [records[k] for k in _argument_keys(sample, kind) if k in records]
            errs = [float("nan") if r["mc_stderr"] is None else r["mc_stderr"] for r in recs]
            stderrs.extend(errs)
            if output_type == "multiple_choice" and len(recs) > 1:
                flip = flip_possible([r["loglikelihood"] for r in recs], errs)
                if flip is not None:
                    known += 1
                    flips += flip
            if kind == "loglikelihood_rolling":
                variance += sum(e**2 for e in errs)
                n_bytes += sum(len(a[0].encode("utf-8")) for a in sample.get("arguments", []))
        finite = [s for s in stderrs if not math.isnan(s)]
        entry: dict[str, Any] = {"requests": len(stderrs),
                                 "mean_mc_stderr": sum(finite) / len(finite) if finite else None}
        if output_type == "multiple_choice":
            entry.update(items=len(samples), flippable=flips, flip_fraction=flips / known if known else None)
        if kind == "loglikelihood_rolling" and n_bytes:
            entry["mc_stderr_bits_per_byte"] = math.sqrt(variance) / n_bytes / LN2 if finite else None
        out[task] = entry
    return out


def results_file(folder: Path, tasks: list[str], settings: Mapping[str, Any], limit: int | None) -> Path:
    """``lmeval-<tasks>[-n<limit>][-exact][-times][-K<draws>][-seed<S>][-fs<k>].json`` in ``folder``;
    ``-2``, ``-3``, ... when that name is taken (a result is never replaced)."""
    name = "lmeval-" + "+".join(tasks)[:80]
    name += f"-n{limit}" if limit is not None else ""
    name += "-exact" if settings.get("likelihood") == "exact-order" else ""
    name += "-times" if settings.get("estimator") == "times" else ""
    name += f"-K{settings['draws']}" if settings.get("draws") else ""
    name += f"-seed{settings['seed']}" if settings.get("seed") else ""
    name += f"-fs{settings['num_fewshot']}" if settings.get("num_fewshot") else ""
    path, k = folder / f"{name}.json", 1
    while path.exists():
        k += 1
        path = folder / f"{name}-{k}.json"
    return path


def _check_request(tasks: list[str], limit: int | None, include_path: str | None, draws: int,
                   likelihood: str, estimator: str, batch_size: int) -> None:
    from maskdiff.apps.lmeval.estimators import ESTIMATORS, LIKELIHOODS

    if not tasks or any(not t for t in tasks):
        raise UsageError("--tasks: give one or more task names separated by commas, e.g. --tasks hellaswag,wikitext")
    positive_int("--limit", limit, fix="omit it to evaluate every document")
    positive_int("--draws", draws)
    positive_int("--batch-size", batch_size)
    if likelihood not in LIKELIHOODS:
        raise UsageError(f"--likelihood {likelihood}: choose one of {', '.join(LIKELIHOODS)}")
    if estimator not in ESTIMATORS:
        raise UsageError(f"--estimator {estimator}: choose one of {', '.join(ESTIMATORS)}")
    if include_path is not None and not Path(include_path).is_dir():
        raise UsageError(f"--include-path {include_path}: not a folder; give the folder that holds the task YAML files")


def run_lm_eval(run_dir: str | os.PathLike, *, tasks: list[str], limit: int | None = None,
                include_path: str | None = None, draws: int = 4, likelihood: str = "elbo", estimator: str = "counts",
                seed: int = 0, batch_size: int = 32, device: str = "auto", weights: str = "ema",
                normalize: str = "text8", num_fewshot: int | None = None, sampler: str = "ancestral",
                sampler_options: dict[str, Any] | None = None, steps: int | None = None,
                out: str | os.PathLike | None = None, greedy: bool = True,
                progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Evaluate a run folder on harness tasks; returns (the file written, what it holds).

    The file (:func:`results_file`, in ``out`` or ``RUN_DIR/lm-eval/``) holds the harness's
    ``results``, ``n-samples``, ``configs`` and ``versions``, plus ``maskdiff``: the settings, the
    Monte Carlo summary (:func:`mc_summary`) and how many texts the character normalisation changed.
    ``greedy=False`` skips ``is_greedy`` (always False then): for tasks that do not read it (multiple
    choice, perplexity), it saves one network row per scored token of the ELBO.
    """
    _check_request(tasks, limit, include_path, draws, likelihood, estimator, batch_size)
    from maskdiff import runs

    runs.read_run_config(run_dir)  # a run folder, before anything heavy is imported
    from maskdiff.devices import resolve_device

    device = str(resolve_device(device))  # a CUDA device on a machine without one is an error here
    folder = check_output_folder(Path(out) if out is not None else Path(run_dir) / "lm-eval", "--out")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"{err}; install the harness with pip install 'maskdiff[lmeval]'") from None
    from maskdiff.apps.lmeval.model import MaskdiffLM

    lm = MaskdiffLM(run=str(run_dir), likelihood=likelihood, estimator=estimator, draws=draws,
                    batch_size=batch_size, seed=seed, device=device, weights=weights, normalize=normalize,
                    sampler=sampler, sampler_options=sampler_options, steps=steps, greedy=greedy, progress=progress)
    manager = None
    if include_path:  # the harness's own task index takes a while to build: only when a task needs it
        local = TaskManager(include_path=include_path, include_defaults=False)
        manager = local if all(t in local.all_tasks for t in tasks) else None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"--tasks: unknown task {', '.join(unknown)}; see `lm-eval ls tasks` "
                         "(or pass --include-path DIR with its YAML)")
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, log_samples=True, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    summary = mc_summary(results, lm.records)
    settings = dict(lm.settings, tasks=tasks, limit=limit, num_fewshot=num_fewshot, include_path=include_path, greedy=greedy,
                    lm_eval_version=lm_eval.__version__ if hasattr(lm_eval, "__version__") else None)
    kept = {k: results[k] for k in ("results", "n-samples", "configs", "versions", "higher_is_better") if k in results}
    kept["maskdiff"] = {"settings": settings, "mc": summary, "normalised_texts": lm.codec.normalised}
    folder.mkdir(parents=True, exist_ok=True)
    path = results_file(folder, tasks, dict(settings, likelihood=likelihood), limit)
    text = json.dumps(kept, indent=2, default=str) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path, kept


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else ("–" if value is None else str(value))


def format_lmeval_table(kept: Mapping[str, Any]) -> str:
    """The harness's metrics (value ± the harness's sampling stderr) with the Monte Carlo columns."""
    lines = ["task | metric | value | stderr (items) | mean MC stderr (nats) | flip fraction / MC stderr of bpb"]
    mc = kept.get("maskdiff", {}).get("mc", {})
    for task, metrics in kept.get("results", {}).items():
        extra = mc.get(task, {})
        last = extra.get("flip_fraction", extra.get("mc_stderr_bits_per_byte"))
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",")[0]
            se = metrics.get(key.replace(metric, f"{metric}_stderr", 1))
            lines.append(f"{task} | {metric} | {_fmt(value)} | {_fmt(se)} | "
                         f"{_fmt(extra.get('mean_mc_stderr'))} | {_fmt(last)}")
    return "\n".join(lines)
