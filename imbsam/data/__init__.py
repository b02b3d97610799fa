"""Long-tailed datasets: the imbalance profile, loaders of the real file formats, GPU-side batches."""
from imbsam.data.profile import long_tail_counts, shot_split

__all__ = ["long_tail_counts", "shot_split"]
