"""imbsam in the trainers people use, one import each; the frameworks are optional extras
and are imported only by the submodule that needs them.

- ``imbsam.integrations.lightning``: ``SharpnessModule``, a ``LightningModule`` whose
  automatic optimization runs SAM's and ImbSAM's passes (``pip install imbsam[lightning]``).
- ``imbsam.integrations.timm``: the optimizers by name in timm's factory, and
  ``sharpness_step`` for timm's train loop (``pip install imbsam[timm]``).
- ``imbsam.integrations.hf``: ``SharpnessTrainer``, a ``transformers.Trainer`` that runs
  SAM's and ImbSAM's passes (``pip install imbsam[hf]``).

``docs/integrations.md`` says what each supports and why.
"""
