"""augment: online augmentation of log-mel crops in the training stream, per utterance.

Shards hold log-mels, so every kind works in the mel domain (power or log): additive noise
(coloured, or the user's recordings) and babble at a drawn SNR, reverberation as a per-band
exponentially decaying response (an approximation of a room; or decays fitted to the user's room
responses), channel colouring, random gain, and SpecAugment masks. :class:`Augmenter` changes a
batch of crops in place; every random choice for a row is a pure function of (seed, pass, sample
key, crop offset) (:mod:`dvector.augment.draws`), so a resumed run sees the same augmented batches.
Shards of mel power (``FeatureConfig.compression == "none"``) get each kind's power-domain counterpart:
``exp`` of what the log of the (floored) crop gets.

Imports: ``dvector.config``, ``dvector.errors``, ``dvector.files``, ``dvector.signal``; never
``dvector.stream``, ``dvector.training`` or anything above them.
"""

from dvector.augment.apply import AugmentPlan, Augmenter
from dvector.augment.plan import RowInfo

__all__ = ["AugmentPlan", "Augmenter", "RowInfo"]
