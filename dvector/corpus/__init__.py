"""corpus: what a corpus holds, however it is named: root folders of speaker folders (``roots``), Kaldi
data directories (``kaldi``), tables of path and speaker (``manifest``) and Lhotse manifests
(``lhotse_manifests``), all of them at once (``inputs``), each listed as :class:`Utterance` s with their speakers (``utterances``).

Used by the build (shards) and the evaluation. Owns: listing utterances and speakers; decoding them is
:mod:`dvector.signal`'s. Must not import any other part of the package (only the top-level modules).
"""

from dvector.corpus.inputs import CorpusInputs, scan_inputs
from dvector.corpus.roots import Aliases, scan_roots, walk_files
from dvector.corpus.utterances import ScanResult, Utterance, root_namespaces

__all__ = ["Aliases", "CorpusInputs", "ScanResult", "Utterance", "root_namespaces", "scan_inputs", "scan_roots",
           "walk_files"]
