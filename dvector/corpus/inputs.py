"""Everything a build (or an evaluation) is given to read, in any of the forms a corpus comes in, listed
as one :class:`ScanResult`: root folders, Kaldi data directories, manifests and Lhotse manifests together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from dvector.corpus.kaldi import scan_kaldi
from dvector.corpus.manifest import scan_manifests
from dvector.corpus.roots import scan_roots
from dvector.corpus.utterances import ScanResult
from dvector.errors import DvectorError


@dataclass(frozen=True)
class CorpusInputs:
    """What to read: ``roots`` (folders of speaker folders), ``kaldi`` data directories (paths in their
    ``wav.scp`` relative to ``kaldi_root``, default the current folder; commands run only with
    ``allow_commands``), ``manifests`` (CSV/TSV/JSON lines) and ``lhotse`` manifests."""

    roots: tuple[str, ...] = ()
    kaldi: tuple[str, ...] = ()
    kaldi_root: str | None = None
    manifests: tuple[str, ...] = ()
    lhotse: tuple[str, ...] = ()
    allow_commands: bool = False

    def __bool__(self) -> bool:
        return bool(self.roots or self.kaldi or self.manifests or self.lhotse)

    def describe(self) -> str:
        """``"roots a, b; Kaldi directory d"``: what was given, for messages."""
        parts = [(self.roots, "root"), (self.kaldi, "Kaldi directory"), (self.manifests, "manifest"),
                 (self.lhotse, "Lhotse manifest")]
        return "; ".join(f"{what}{'s' * (len(given) > 1)} {', '.join(given)}" for given, what in parts if given)


def scan_inputs(inputs: CorpusInputs, extensions: Iterable[str], merge_speakers: bool = False) -> ScanResult:
    """Every utterance of ``inputs``, each kind listed as its module says, as one scan; two inputs whose
    speakers would be named alike (``train/SPK`` from a root and a Kaldi directory both called ``train``)
    are refused, unless ``merge_speakers`` asks to merge same-named speakers."""
    if not inputs:
        raise DvectorError("give root directories, --kaldi DATA_DIR, --manifest FILE or --lhotse MANIFEST")
    scans = []
    if inputs.roots:
        scans.append(scan_roots(list(inputs.roots), extensions, merge_speakers))
    if inputs.kaldi:
        scans.append(scan_kaldi(list(inputs.kaldi), inputs.kaldi_root, inputs.allow_commands, merge_speakers))
    if inputs.manifests:
        scans.append(scan_manifests(list(inputs.manifests), merge_speakers))
    if inputs.lhotse:
        from dvector.corpus.lhotse_manifests import scan_lhotse
        scans.append(scan_lhotse(list(inputs.lhotse), inputs.allow_commands, merge_speakers))
    if len(scans) == 1:
        return scans[0]
    names: dict[str, str] = {}
    for scan in scans:
        for given, name in scan.root_names.items():
            if name in names.values() and not merge_speakers:
                other = next(g for g, n in names.items() if n == name)
                raise DvectorError(f"{other} and {given} are both named {name!r}, so their speakers would be too: "
                                   "rename one, or give --merge-speakers to merge same-named speakers")
            names[given] = name
    utterances = [u for scan in scans for u in scan.utterances]
    return ScanResult(utterances, sorted({u.speaker for u in utterances}), names,
                      [p for scan in scans for p in scan.problems], [r for scan in scans for r in scan.empty_roots])
