"""Fixtures shared by test modules, and how pytest-xdist shares the suite out to its workers.

``pytest`` runs on 2 pytest-xdist workers (``addopts`` in pyproject.toml: ``-n 2 --dist
loadgroup --no-loadscope-reorder``; ``-n 0`` runs in one process). The controller hands out
work units in collection order, a unit being one test or one ``xdist_group``:

- the tests of a module that share a module-scoped fixture of that module form one group
  (:func:`_group_module_fixtures`), so each such fixture is set up once, on one worker;
- the long units go first, longest first (``EARLY``, from ``--durations``), so that neither
  worker is left with a long one at the end; the rest follow in file order.

The tiny DVC project after its first full ``dvc repro`` (:func:`built`) is built once per
session for all workers, behind a file lock in the session's shared temporary directory.
"""

from __future__ import annotations

import os

import pytest
import torch
from pipeline_helpers import OMNIGLOT, Built, built_project

# Units that start first, in this order (an xdist_group name, else a test id or its prefix,
# relative to tests/): the longest first, as measured with --durations. (b): needs the shared
# DVC build, which the first unit makes while the other worker starts the cold compile.
EARLY = (
    "test_pipeline_dvc.py::test_repro_runs_every_stage",  # the shared build: ~55 s
    "test_compiled.py::steps",  # a cold Inductor compile: 60-110 s
    "test_export_pipeline.py::project",  # its own, bigger, tiny pipeline: ~35 s
    "test_tune_ray.py::cluster",  # a Ray cluster, 3 searches: ~50 s
    "test_prefect_flow.py::served",  # (b) a Prefect server, 3 deployment runs: ~75 s
    "test_pipeline_dvc.py::forced",  # (b) every stage rerun: ~55 s
    "test_pipeline_dvc.py::backbone_change",  # (b) ~55 s
    "test_pipeline_dvc.py::leo_change",  # (b) ~55 s
    "test_remote.py::test_a_clone_pulls",  # (b) ~30 s
    "test_ddp.py::test_ddp_pretrain",  # torchrun twice: ~26 s
    "test_ddp.py::test_distributed_worker_errors",  # torchrun: ~24 s
    "test_live_dvc.py::run",  # (b) ~16 s
    "test_store.py::test_tiered_sized_split",  # ~12 s
    "test_gpu_check.py::test_gpu_check_short_mode",  # ~9 s
    "test_ddp.py::test_distributed_embed",  # ~9 s
    "test_pipeline_dvc.py::bad_params",  # (b) ~6 s
)


def pytest_configure(config: pytest.Config) -> None:
    """On a pytest-xdist worker, one intra-op torch thread: the workers share the cores (a
    test that wants more sets them itself)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors (OpenMP spinning on a shared 2-core
    box makes every small kernel many times slower); the previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Built:
    """The tiny DVC project after one full ``dvc repro`` (``pipeline_helpers.built_project``),
    one for the whole session: copy it (``pipeline_helpers.copy_built``), never change it."""
    if not OMNIGLOT.is_file():
        pytest.skip("real Omniglot data not available")
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, shared by the workers
    return built_project(base / "built-project")


def _group_module_fixtures(items: list[pytest.Item]) -> None:
    """Put the tests of a module that share (transitively) a module-scoped fixture defined in
    that module into one ``xdist_group``, named ``<module file>::<fixtures>``."""
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def find(key):
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    uses: dict[int, list[tuple[str, str]]] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is None or item.get_closest_marker("xdist_group"):
            continue
        info = getattr(item, "_fixtureinfo", None)
        keys = [
            (module.__name__, name)
            for name, defs in (info.name2fixturedefs.items() if info else ())
            if defs
            and defs[-1].scope == "module"
            and getattr(defs[-1].func, "__module__", None) == module.__name__
        ]
        for key in keys:
            parent[find(key)] = find(keys[0])
        if keys:
            uses[id(item)] = keys
    members: dict[tuple[str, str], list[str]] = {}
    for key in parent:
        members.setdefault(find(key), []).append(key[1])
    for item in items:
        if id(item) in uses:
            root = find(uses[id(item)][0])
            name = f"{item.path.name}::{'+'.join(sorted(members[root]))}"
            item.add_marker(pytest.mark.xdist_group(name))


def _rank(item: pytest.Item) -> int:
    """Where ``item``'s unit comes in ``EARLY`` (``len(EARLY)``: after all of them): a group
    ``<module>::<f1>+<f2>`` matches ``<module>::<f1>``; a test, an id it starts with."""
    mark = item.get_closest_marker("xdist_group")
    if mark and mark.args:
        module, _, fixtures = str(mark.args[0]).partition("::")
        names = {f"{module}::{f}" for f in fixtures.split("+")}
        return next((i for i, early in enumerate(EARLY) if early in names), len(EARLY))
    name = item.nodeid.split("/")[-1]
    return next((i for i, early in enumerate(EARLY) if name.startswith(early)), len(EARLY))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _group_module_fixtures(items)
    items.sort(key=_rank)  # stable: file order within a rank


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail loudly where xdist's groups did not take (a pytest that xdist cannot rename the
    test ids of: constraints.txt), rather than set up each shared fixture on every worker."""
    if getattr(session.config.option, "loadgroup", False):  # set on xdist workers
        lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group")]
        lost = [nodeid for nodeid in lost if "@" not in nodeid]
        if lost:
            raise pytest.UsageError(
                f"pytest-xdist did not group {lost[0]} (and {len(lost) - 1} more)"
            )
