"""A quiet console (gaelle_ray.ray_setup): Ray's and MLflow's informational lines leave the
console for Ray's log files, warnings and errors stay. No Ray instance is started here; the
slow demo test counts the lines of a real run."""

from __future__ import annotations

import io
import logging
import os
import warnings

import pytest
import ray
from ray.util.annotations import RayDeprecationWarning

from gaelle_ray import ray_setup
from gaelle_ray.ray_setup import _RayInfoFilter, build_torch_trainer, quiet_console, quiet_train_worker_console

RAY_FILE = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")


@pytest.fixture
def restored_logging():
    """Put back what quiet_console changes in this (test) process."""
    import ray.data

    with warnings.catch_warnings():  # Ray Data's own deprecated settings, at the context's creation
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ray.data.DataContext.get_current()
    saved = (ctx.use_ray_tqdm, logging.getLogger("mlflow.store.db.utils").level,
             [(h, h.level) for h in logging.getLogger("ray.data").handlers])
    yield
    ctx.use_ray_tqdm = saved[0]
    logging.getLogger("mlflow.store.db.utils").setLevel(saved[1])
    for handler, level in saved[2]:
        handler.setLevel(level)


def _record(level: int, pathname: str, name: str = "x") -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, "message", None, None)


def test_only_that_deprecation_warning_is_silenced(restored_logging):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_console()
        warnings.warn("`ExecutionOptions.exclude_resources` is deprecated and will be removed", RayDeprecationWarning)
        warnings.warn("`ExecutionOptions.other` is deprecated", RayDeprecationWarning)
        warnings.warn("`ExecutionOptions.exclude_resources` is deprecated", UserWarning)
    assert [str(w.message) for w in seen] == ["`ExecutionOptions.other` is deprecated",
                                              "`ExecutionOptions.exclude_resources` is deprecated"]


def test_ray_data_and_mlflow_consoles_at_warning(restored_logging):
    import ray.data

    quiet_console()
    assert ray.data.DataContext.get_current().use_ray_tqdm is False  # progress to Ray Data's log, not bars
    handlers = logging.getLogger("ray.data").handlers
    consoles = [h for h in handlers if ray_setup._is_console(h)]
    assert consoles and all(h.level >= logging.WARNING for h in consoles)
    assert any(not ray_setup._is_console(h) and h.level < logging.WARNING for h in handlers)  # the file keeps INFO
    db = logging.getLogger("mlflow.store.db.utils")
    assert not db.isEnabledFor(logging.INFO) and db.isEnabledFor(logging.WARNING)


def test_ray_info_filter():
    f = _RayInfoFilter()
    assert not f.filter(_record(logging.INFO, RAY_FILE, name=RAY_FILE))  # "Reporting training result ..."
    assert f.filter(_record(logging.WARNING, RAY_FILE))
    assert f.filter(_record(logging.ERROR, RAY_FILE))
    assert f.filter(_record(logging.INFO, ray_setup.__file__))  # ours stay


def test_train_worker_console_filter_on_console_handlers_only(tmp_path):
    root = logging.getLogger()
    console = logging.StreamHandler(io.StringIO())
    file = logging.FileHandler(tmp_path / "app.log")
    root.addHandler(console)
    root.addHandler(file)
    try:
        quiet_train_worker_console()
        quiet_train_worker_console()  # idempotent
        assert sum(isinstance(f, _RayInfoFilter) for f in console.filters) == 1
        assert not any(isinstance(f, _RayInfoFilter) for f in file.filters)
        for record in (_record(logging.INFO, RAY_FILE, name=RAY_FILE), _record(logging.INFO, __file__, name="ours")):
            console.handle(record)
            file.handle(record)
        file.flush()
        assert console.stream.getvalue().count("message") == 1  # ours only
        assert (tmp_path / "app.log").read_text().count("message") == 2  # the file keeps Ray's line
    finally:
        root.removeHandler(console)
        root.removeHandler(file)
        file.close()


def test_trainer_logs_ray_train_at_warning_on_the_console(tmp_path):
    trainer = build_torch_trainer(lambda config: None, {}, name="t", storage_path=str(tmp_path), num_workers=1,
                                  use_gpu=False, cpus_per_worker=1.0)
    assert trainer.run_config.logging_config.log_level == "WARNING"


def test_worker_hook_is_importable_by_name():
    import importlib

    module, _, name = ray_setup.WORKER_SETUP_HOOK.rpartition(".")
    assert getattr(importlib.import_module(module), name) is ray_setup.quiet_worker
