"""What the notebooks measure and draw: analysis, probes, plots, widgets and the notebook helpers."""
