"""imbsam in the trainers people use, one import each; the frameworks are optional extras
and are imported only by the submodule that needs them.

- ``imbsam.integrations.lightning``: ``SharpnessModule``, a ``LightningModule`` whose
  automatic optimization runs SAM's and ImbSAM's passes (``pip install imbsam[lightning]``).

``docs/integrations.md`` says what each supports and why.
"""
