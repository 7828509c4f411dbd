"""`danlu tune`: a hyperparameter search over a config's `tune.space`, on Optuna (Akiba et al. 2019, KDD).

    danlu tune configs/tune_zh_sentiment.yaml --trials 20 --jobs 2

The tune directory (`tune.dir`, default runs/tune_<config name>, without a second tune_) holds:

    study.db                 the Optuna study in SQLite: every trial's parameters, per-epoch values and state
    trial_000/, trial_001/   one ordinary run directory per trial, made by the job skeleton (run_job)
    report.html, report.md   the trials table, the optimisation history and parameter importance, the best run
    plots/  tune.json        the report's figures; the search's outcome as JSON

Each trial draws its values (TPE or random), trains through the same skeleton as `danlu train`, and reports
its validation metric after every epoch to the pruner (a training callback), which may stop it early: the
run is then finished as any run stopped early is (evaluated, saved, reported) and recorded as pruned.

Running the same command again resumes the search: finished trials stay, a trial that was running when the
process died is marked failed and re-run with the same values, and trials run until `tune.trials` have
finished (completed, pruned, or failed with an error). With `--jobs J`, J trials run at once in processes of
their own, each with (free cores // J) torch threads, so that parallel trials do not oversubscribe the CPU.

>>> result = tune("configs/tune_zh_sentiment.yaml", trials=3)        # doctest: +SKIP
>>> result["best"]["run"]                                              # doctest: +SKIP
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import sys
from dataclasses import dataclass

from danlu import config as config_mod
from danlu.files import atomic_write_json
from danlu.jobs.skeleton import free_cores, run_job
from danlu.registry import ConfigError, tasks_for
from danlu.training.callbacks import Callback

STUDY_FILE, STUDY_NAME, LOCK_FILE, SUMMARY_FILE = "study.db", "danlu", ".lock", "tune.json"


@dataclass(frozen=True)
class Search:
    """What every trial needs; plain data, so that worker processes receive it whole."""

    dir: str
    raw: dict
    """The base config as a dict (overrides applied, no tune section)."""
    params: tuple
    """The SearchParams of tune.space, model.kind first."""
    column: str
    """The history column the search optimises, e.g. val_accuracy."""
    maximize: bool
    tune: config_mod.TuneConfig
    threads: int = 0
    """torch threads per trial (0: as `danlu train` chooses)."""

    @property
    def storage_url(self):
        return "sqlite:///" + os.path.abspath(os.path.join(self.dir, STUDY_FILE))


def tune(config, overrides=(), *, trials=0, jobs=0, overwrite=False, say=None) -> dict:
    """Run (or resume) the search of `config`'s tune section; write the report; return the summary (tune.json)."""
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("danlu tune needs Optuna: pip install 'danlu[tune]' (or optuna)") from None
    raw, where, name = config_mod.read_raw(config, overrides)
    cfg = config_mod.load(config, overrides)  # the base config and its space, validated, errors naming the file
    spec = dataclasses.replace(cfg.tune, **{k: v for k, v in (("trials", trials), ("jobs", jobs)) if v})
    if not spec.space:
        raise ConfigError(f"{where}: tune.space is empty; give the keys to search, e.g. "
                          "tune: {space: {train.lr: loguniform(1e-4, 1e-2)}}")
    if cfg.task not in tasks_for("train"):
        raise ConfigError(f"{where}: task: `danlu tune` searches what `danlu train` trains "
                          f"({', '.join(tasks_for('train'))}), got {cfg.task!r}")
    column, maximize = config_mod.tune_objective(cfg.task, spec.metric)
    tune_dir = spec.dir or os.path.join("runs", "tune_" + (name or "search").removeprefix("tune_"))
    base = {k: v for k, v in raw.items() if k != "tune"}
    search = Search(tune_dir, base, config_mod.parse_space(spec.space), column, maximize, spec,
                    threads_per_trial(cfg.train.threads, spec.jobs))
    _prepare_dir(tune_dir, overwrite)
    with _Lock(tune_dir):
        study = open_study(search)
        _check_same_search(study, search, tune_dir)
        rerun = _fail_interrupted(study)
        done = len(counted(study))
        left = max(spec.trials - done, 0)
        if done or rerun:
            say(f"resuming the search in {tune_dir}: {done} trial(s) finished"
                + (f", interrupted trial(s) {', '.join(map(str, rerun))} marked failed and re-run" if rerun else "")
                + f"; {left} to go")
        what = f"{spec.jobs} trials at once, {search.threads} thread(s) each" if spec.jobs > 1 else "one trial at a time"
        say(f"search: {spec.trials} trials of {', '.join(p.key for p in search.params)}; {column} "
            f"({'higher' if maximize else 'lower'} is better); {what}; study {os.path.join(tune_dir, STUDY_FILE)}")
        if spec.jobs > 1 and left > 1:
            _run_parallel(search, study, left, min(spec.jobs, left), say)
        else:
            for _ in range(left):
                trial = study.ask()
                run_trial(search, study, trial, sample(trial, search), say)
        return finish(search, study)


def threads_per_trial(threads, jobs):
    """train.threads when set; with several trials at once, the free cores shared out (and at most
    OMP_NUM_THREADS, when set); else 0: each trial chooses as `danlu train` does."""
    if threads or jobs <= 1:
        return threads
    share = max(1, free_cores(limit=os.cpu_count() or 1) // jobs)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return min(share, int(omp)) if omp.isdigit() and int(omp) > 0 else share


# ------------------------------------------------------------------------------------------------
# one trial


def sample(trial, search):
    """{config key: value} drawn for `trial`. A model.FIELD key is drawn only when the drawn (or fixed)
    model.kind has that field; model.KIND.FIELD and SECTION.KIND.KEY (train.ngram.lr) only for that kind, in
    place of the kind-free entry of the same key, so a kind never sees keys it lacks and may have its own ranges."""
    kind = (search.raw.get("model") or {}).get("kind", "lstm")
    values = {}
    for param in search.params:  # model.kind comes first
        if param.key != "model.kind" and not _drawn_for(param, kind, search.params):
            continue
        values[param.target] = param.value(_suggest(trial, param))
        if param.key == "model.kind":
            kind = values["model.kind"]
    return values


def _drawn_for(param, kind, params):
    from danlu.config import model_config_class

    if param.only_kind:
        return param.only_kind == kind
    if param.target.startswith("model.") and \
            param.target.split(".")[1] not in {f.name for f in dataclasses.fields(model_config_class(kind))}:
        return False
    return not any(p.only_kind == kind and p.target == param.target for p in params)  # the kind's own entry wins


def _suggest(trial, param):
    if param.kind == "categorical":
        return trial.suggest_categorical(param.key, list(param.labels))
    if param.kind == "int":
        return trial.suggest_int(param.key, int(param.low), int(param.high), step=param.step or 1, log=param.log)
    return trial.suggest_float(param.key, param.low, param.high, log=param.log)


def trial_config(search, values, run_dir):
    """The RunConfig of one trial: the base config, its values, its run directory. When the trial's
    model.kind differs from the base config's, the base's model keys that the kind lacks are left out."""
    from danlu.config import model_config_class

    raw = copy.deepcopy(search.raw)
    raw.setdefault("run", {})["dir"] = run_dir
    if search.threads:
        raw.setdefault("train", {})["threads"] = search.threads
    model = dict(raw.get("model") or {})
    kind = values.get("model.kind", model.get("kind", "lstm"))
    if kind != model.get("kind", "lstm"):
        fields = {f.name for f in dataclasses.fields(model_config_class(kind))}
        model = {k: v for k, v in model.items() if k in fields}
    raw["model"] = {**model, "kind": kind}
    return config_mod.load(raw, list(values.items()))


class PruneOnMetric(Callback):
    """Reports the trial's validation metric after every history row and stops training when the study's
    pruner says the trial is worse than it should be by now."""

    def __init__(self, trial, column, say):
        self.trial, self.column, self.say = trial, column, say
        self.pruned = False

    def on_epoch_end(self, trainer, row):
        value = row.get(self.column)
        if value is None or not math.isfinite(value):
            return
        step = len(trainer.history)
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.pruned, trainer.stop_training = True, True
            self.say(f"trial {self.trial.number} pruned after {step} epoch(s): {self.column} {value:.4f}")


def run_trial(search, study, trial, values, say):
    """Train one trial in trial_NNN/ and tell the study how it went."""
    from optuna.trial import TrialState

    from danlu.jobs.train import choose_job

    run_dir = os.path.join(search.dir, f"trial_{trial.number:03d}")
    trial.set_user_attr("run", os.path.basename(run_dir))
    shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
    say(f"trial {trial.number}: {shown}")
    try:
        cfg = trial_config(search, values, run_dir)
    except ConfigError as e:  # these values cannot make a run (e.g. embed_dim not divisible by num_heads)
        trial.set_user_attr("error", str(e))
        study.tell(trial, state=TrialState.FAIL)
        say(f"trial {trial.number} failed: {e}")
        return
    prune = PruneOnMetric(trial, search.column, say)
    try:  # a logger is a callback that runs on the main process: the pruner's place in the loop
        run = run_job(choose_job, cfg, loggers=[prune], overwrite=True)
    except Exception as e:  # recorded in the study; then the search stops with the error
        trial.set_user_attr("error", f"{type(e).__name__}: {e}")
        study.tell(trial, state=TrialState.FAIL)
        raise
    metric = search.column[len("val_"):]
    value = run.metrics["val"][metric]
    trial.set_user_attr("val", value)
    if metric in run.metrics.get("test", {}):
        trial.set_user_attr("test", run.metrics["test"][metric])
    trial.set_user_attr("epochs", run.metrics.get("epochs_run", 0))
    trial.set_user_attr("seconds", run.metrics.get("total_seconds", 0.0))
    if prune.pruned:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, value)
        say(f"trial {trial.number}: {search.column} {value:.4f} ({run_dir})")


# ------------------------------------------------------------------------------------------------
# the study


def open_study(search):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # danlu says what happens, once
    spec = search.tune
    study = optuna.create_study(storage=_storage(search), study_name=STUDY_NAME,
                                sampler=_sampler(spec.sampler, spec.seed), pruner=make_pruner(spec, search.maximize),
                                direction="maximize" if search.maximize else "minimize", load_if_exists=True)
    drawn = len(study.get_trials(deepcopy=False))
    if drawn:  # a resumed search: a sampler seeded as the first run's would draw its first (random) values again
        study.sampler = _sampler(spec.sampler, spec.seed + drawn)
    return study


def _sampler(kind, seed):
    import optuna

    return optuna.samplers.RandomSampler(seed=seed) if kind == "random" else optuna.samplers.TPESampler(seed=seed)


def _storage(search):
    import optuna

    # several processes write one SQLite file: a writer waits up to a minute for another's lock
    return optuna.storages.RDBStorage(search.storage_url, engine_kwargs={"connect_args": {"timeout": 60}})


def counted(study):
    """The trials that count towards tune.trials: completed, pruned, or failed other than by an interruption."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False)
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))]


def _fail_interrupted(study):
    """Trials left running by a process that died: marked failed (interrupted) and queued again with the
    same values. Returns their numbers. (Only one `danlu tune` works in a directory at a time: _Lock.)"""
    from optuna.trial import TrialState

    storage, numbers = study._storage, []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"rerun_of": t.number})
        numbers.append(t.number)
    return numbers


def _check_same_search(study, search, tune_dir):
    signature = {"space": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in search.tune.space.items()},
                 "metric": search.column}
    saved = study.user_attrs.get("search")
    if saved is None:
        study.set_user_attr("search", signature)
    elif saved != signature:
        raise ConfigError(f"{tune_dir} holds a search of another space or metric ({saved}); to start this one, "
                          "set another tune.dir or give --overwrite")


def _prepare_dir(tune_dir, overwrite):
    if os.path.isdir(tune_dir) and os.listdir(tune_dir):
        if overwrite:
            shutil.rmtree(tune_dir)
        elif not os.path.exists(os.path.join(tune_dir, STUDY_FILE)):
            raise ConfigError(f"{tune_dir} exists and holds no search ({STUDY_FILE}); set another tune.dir "
                              "or give --overwrite")
    os.makedirs(tune_dir, exist_ok=True)


class _Lock:
    """One `danlu tune` per tune directory: a second one would take the first's running trials for dead ones."""

    def __init__(self, tune_dir):
        self.path, self.file = os.path.join(tune_dir, LOCK_FILE), None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # no flock (Windows): unguarded
            return self
        self.file = open(self.path, "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise ConfigError(f"{os.path.dirname(self.path)}: another `danlu tune` is running this search") from None
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # the kernel drops the lock with the file, also when the process is killed


# ------------------------------------------------------------------------------------------------
# several trials at once


def _run_parallel(search, study, left, jobs, say):
    """Draw trials here (the sampler sees every finished one) and train them in `jobs` spawned processes."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")  # a forked child would inherit torch's thread pools
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_die_with_parent) as pool:
        running = set()
        while left or running:
            while left and len(running) < jobs:
                trial = study.ask()
                running.add(pool.submit(_trial_in_process, search, trial._trial_id, sample(trial, search)))
                left -= 1
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                future.result()  # a trial's unexpected error ends the search here too


def _trial_in_process(search, trial_id, values):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=STUDY_NAME, storage=_storage(search),
                              pruner=make_pruner(search.tune, search.maximize))
    run_trial(search, study, optuna.trial.Trial(study, trial_id), values,
              lambda m: print(m, file=sys.stderr, flush=True))


def make_pruner(spec, maximize):
    """The pruner tune.pruner names (a loaded study does not keep its pruner: each process makes its own)."""
    import optuna

    if spec.pruner == "median":  # worse than the median of earlier trials at the same epoch
        return optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=spec.warmup_epochs)
    if spec.pruner == "threshold":
        return optuna.pruners.ThresholdPruner(**{"lower" if maximize else "upper": spec.threshold},
                                              n_warmup_steps=spec.warmup_epochs)
    return optuna.pruners.NopPruner()


def _die_with_parent():
    """Linux: a worker ends with the search that started it, so a killed search leaves no trial running."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------------
# the outcome


def finish(search, study):
    """tune.json and the report; returns the summary."""
    from optuna.trial import TrialState

    rows = [_row(t) for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    complete = [r for r in rows if r["state"] == "complete"]
    best = (max if search.maximize else min)(complete, key=lambda r: r["value"]) if complete else None
    summary = {"metric": search.column, "direction": "maximize" if search.maximize else "minimize",
               "trials": rows, "best": best, "importance": importance(study),
               "counts": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "failed")}}
    atomic_write_json(os.path.join(search.dir, SUMMARY_FILE), summary)
    try:
        from danlu.evaluate.tune_report import write_tune_report
    except ImportError:  # matplotlib missing: no report
        report = None
    else:
        report = write_tune_report(search.dir, summary)
    summary["report"] = report
    return summary


def _row(t):
    state = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}.get(t.state.name,
                                                                                                   t.state.name.lower())
    attrs = t.user_attrs
    return {"number": t.number, "state": state, "value": t.value, "params": dict(t.params), "run": attrs.get("run"),
            "val": attrs.get("val"), "test": attrs.get("test"), "epochs": attrs.get("epochs"),
            "seconds": attrs.get("seconds"), "error": attrs.get("error"),
            "interrupted": bool(attrs.get("interrupted")), "rerun_of": attrs.get("rerun_of"),
            "curve": [t.intermediate_values[k] for k in sorted(t.intermediate_values)]}


def importance(study):
    """{parameter: share of the variance of the objective} over the completed trials (fANOVA, Hutter et al.
    2014, as optuna.importance computes it), or {} with fewer than two of them. Parameters drawn only for
    some kinds are left out (fANOVA needs every parameter in every trial)."""
    import optuna
    from optuna.trial import TrialState

    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))
    except (RuntimeError, ValueError):  # e.g. no parameter varies across the completed trials
        return {}


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)
