"""`python -m lcot.main`: one training stage, with the seed's flags (see `python -m lcot.main --help`).

The command lives in lcot.pipeline.train (importable by the notebooks' helpers); this module keeps the
seed's entry point.
"""

from lcot.pipeline.train import main

if __name__ == "__main__":
    main()
