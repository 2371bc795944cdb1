"""lorainit without the benchmark extra: `pip install lorainit` brings neither TRL nor `datasets`
nor `pandas` (they come with `.[bench]`, for `benchmarks/trl_compare.py`), so nothing a sweep
imports may need them."""

import subprocess
import sys
import textwrap

ABSENT = ("trl", "datasets", "pandas")
# what `lorainit sweep` imports, and the task families a pack loads
SWEEP_MODULES = ("lorainit", "lorainit.cli", "lorainit.config", "lorainit.tasks", "lorainit.sweeps.driver",
                 "lorainit.train", "lorainit.tasks.causal_lm", "lorainit.tasks.classification")

# Makes ABSENT look uninstalled, as far as an import can tell: every finder on sys.meta_path
# answers None for them (so `import` raises ModuleNotFoundError and `importlib.util.find_spec`
# returns None, the check transformers makes), and their installed metadata is not listed.
HIDE = textwrap.dedent("""
    import sys

    ABSENT = {absent!r}

    class Hidden:
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ABSENT:
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find is not None else None

        def find_distributions(self, *args, **kwargs):
            find = getattr(self.inner, "find_distributions", None)
            found = find(*args, **kwargs) if find is not None else ()
            return (d for d in found if (d.metadata["Name"] or "").lower() not in ABSENT)

        def invalidate_caches(self):
            if hasattr(self.inner, "invalidate_caches"):
                self.inner.invalidate_caches()

    sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
""").format(absent=ABSENT)


def _run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=120)


def test_hiding_works_as_an_uninstalled_package_would():
    done = _run("""
        import importlib.metadata, importlib.util
        for name in ABSENT:
            assert importlib.util.find_spec(name) is None, name
            try:
                importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
            else:
                raise AssertionError(f"{name}: metadata still listed")
        try:
            import pandas  # noqa: F401
        except ModuleNotFoundError as err:
            print("blocked:", err.name)
        import json  # an unblocked module still imports
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "blocked: pandas"


def test_sweep_modules_import_without_trl_datasets_or_pandas():
    done = _run(f"""
        import importlib
        for module in {SWEEP_MODULES!r}:
            importlib.import_module(module)
        try:
            import pandas  # noqa: F401
        except ModuleNotFoundError:
            print("pandas blocked")
        print("loaded:", sorted(name for name in sys.modules if name.partition(".")[0] in ABSENT))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["pandas blocked", "loaded: []"]
