import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

# The modules whose tests take tens of seconds each (subprocesses that import TensorFlow and KerasHub, executed
# notebooks, multi-process runs). They are collected first, so that pytest-xdist's workers start on them and the
# many short tests fill the gaps at the end, instead of one worker finishing a long test alone.
_LONG_MODULES = (
    "test_transformers.py",
    "test_notebooks.py",
    "test_distributed.py",
    "test_registries.py",
    "test_language.py",
    "test_cache.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return _LONG_MODULES.index(name) if name in _LONG_MODULES else len(_LONG_MODULES)

    items.sort(key=rank)  # stable: the order inside each module is kept
