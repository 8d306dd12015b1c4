"""The method: mask, collator, forward primitives, the latent recurrence (eager and CUDA graph), the model
class and the losses. Imports nothing from lcot but the leaves (errors, io)."""
