"""Mining hard negatives, positives, triplets and pairs from a snapshot's index.

::

    from hardneg.miner.mining import MiningConfig, mine
    result = mine(snapshot.index, MiningConfig(strategy="semihard", per_anchor=2, margin=0.2))
    result.save_npz("mined.npz"); print(result.stats.to_dict())

One strategy per module (``hardest``, ``semihard``, ``window``, ``distance_weighted``) behind the thin
base class in ``base``; positives in ``positives``, false-negative guards in ``guards``.
"""

from hardneg.miner.mining.config import MiningConfig
from hardneg.miner.mining.miner import STRATEGIES, mine
from hardneg.miner.mining.result import MiningResult
from hardneg.miner.mining.stats import DistanceSummary, MiningStats

__all__ = ["STRATEGIES", "DistanceSummary", "MiningConfig", "MiningResult", "MiningStats", "mine"]
