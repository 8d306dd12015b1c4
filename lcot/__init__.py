"""lcot: latent visual chain of thought for Qwen2.5-VL.

The pieces, one idea per module: `data` (records), `collate` (the collator), `mask` (the 4D mask),
`vision` (the vision tower without per-image loops), `patch` (the model with latent mode), `loss`, `trainer`,
`teacher`, `generate`, `evaluate`, `tiny` (the offline model), `synthetic` and `hops` (the bundled datasets),
`main` (the CLI), `experiment` (the whole matrix over seeds) and `probe` (linear probes of the latents). The
notebooks' helpers: `notebook` (parameters -> folders, cached earlier stages), `analysis` (what the notebooks
measure) and `widgets` (the interactive mask viewer).
"""

__version__ = "0.1.0"
