"""The method: tokens, mask, record, collate, the latent recurrence (an eager loop and the reference passes), the
model class and the losses. Imports nothing from lcot but the leaves (errors, io); lcot.fast runs the same passes
faster behind one object the model is given."""
