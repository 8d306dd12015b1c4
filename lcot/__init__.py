"""lcot: latent visual chain of thought for Qwen2.5-VL.

Layers (docs/architecture.md), each importing only from those before it:

    errors, io, config   leaves: the input error with file/line/field/hint; atomic writes, batch to device;
                 one dataclass per command -> its argparse parser
    core/        the method: tokens, mask, record, collate, latent (the forward primitives, the eager recurrence
                 and the reference passes), loss, model (latent mode, the model class)
    fast/        the speed machinery behind one object, lcot.fast.Runner: static caches and CUDA graphs, the
                 adjoint gradient, Triton kernels, grouped step attention, packed vision; optional (--fast off)
    pipeline/    records (data), processor, load, teacher files, runs (run-folder metadata), trainer, train
                 (one stage), generate, evaluate
    toy/         the offline tiny model and the bundled tasks (synthetic, hops)
    lab/         what the notebooks measure and draw: analysis, probe, plots, widgets, notebook helpers
    main, precompute_teacher_latents, experiment, demo: the commands
"""

# The one place the version is written: pyproject.toml reads it (dynamic), CITATION.cff repeats it and
# CHANGELOG.md names it (tests/test_env.py checks that they agree).
__version__ = "0.1.0"
