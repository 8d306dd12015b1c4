"""lcot: latent visual chain of thought for Qwen2.5-VL.

The pieces, one idea per module: `data` (records), `collate` (the collator), `mask` (the 4D mask),
`patch` (the model with latent mode), `loss`, `trainer`, `teacher`, `generate`, `evaluate`, `tiny`
(the offline model), `synthetic` (the bundled dataset) and `main` (the CLI). The notebooks' helpers:
`notebook` (parameters -> folders, cached earlier stages), `analysis` (what the notebooks measure) and
`widgets` (the interactive mask viewer).
"""

__version__ = "0.1.0"
