"""`pytest --nbval-lax notebooks`: run folders, figures and caches go into one temporary folder.

The kernels nbval starts inherit this process's environment, so setting the variables here (before any
notebook is collected) points `lcot.lab.notebook.setup` at the temporary folder. The notebooks share it for
the whole session: a stage one notebook builds is reused by the next, as in an interactive session.
Set LCOT_RUN_DIR / LCOT_FIGURES_DIR yourself to keep the results (e.g. LCOT_FIGURES_DIR=figures to
regenerate the repository's figures while testing).
"""

from __future__ import annotations

import os
import shutil
import tempfile

_TMP = tempfile.mkdtemp(prefix="lcot-nbval-")
_DEFAULTS = {
    "LCOT_RUN_DIR": os.path.join(_TMP, "runs"),
    "LCOT_FIGURES_DIR": os.path.join(_TMP, "figures"),
    "MPLCONFIGDIR": os.path.join(_TMP, "mpl"),
    "IPYTHONDIR": os.path.join(_TMP, "ipython"),
    "JUPYTER_RUNTIME_DIR": os.path.join(_TMP, "jupyter-runtime"),
    "HF_HOME": os.path.join(_TMP, "hf"),
    "TORCHINDUCTOR_CACHE_DIR": os.path.join(_TMP, "inductor"),
    "HF_HUB_OFFLINE": "1",
    "TQDM_MININTERVAL": "5",
}
for _key, _value in _DEFAULTS.items():
    os.environ.setdefault(_key, _value)


def pytest_sessionfinish(session, exitstatus) -> None:
    shutil.rmtree(_TMP, ignore_errors=True)
