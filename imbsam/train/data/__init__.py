"""Long-tailed datasets: the imbalance profile, loaders of the real file formats, GPU-side batches."""
from imbsam.train.data.profile import ACCURACY_KEYS, SHOT_GROUPS, long_tail_counts, shot_split

__all__ = ["ACCURACY_KEYS", "SHOT_GROUPS", "long_tail_counts", "shot_split"]
